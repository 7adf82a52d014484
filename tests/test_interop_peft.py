"""unipeft.features.interop.peft: Hugging Face PEFT directories in, and out, with equal outputs.

Every comparison starts both libraries from ``copy.deepcopy`` of one base model, so the
only difference between the two sides is the adapter.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _matrix import ENCODERS, backbones, sites  # noqa: E402

import unipeft  # noqa: E402
from unipeft import AdapterError, DeltaModel, LoadError  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

ATOL = 1e-5
P = 3  # soft tokens


# ----------------------------------------------------------------------------- backbones

TEXT = backbones(family="text")  # the tiny text backbones, decoders under their LM head
DECODERS = backbones(family="text", exclude=ENCODERS)


def _with_head(name: str) -> nn.Module:
    """The tiny text backbone ``name``, from its own config: under its causal language-model
    head for a decoder, as it is for an encoder."""
    config = BACKBONES[name].make().config
    if name in ENCODERS:
        return transformers.AutoModel.from_config(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def _llama(**kw: Any) -> nn.Module:
    """A Llama other than the tiny one, for the refusals (another width, depth...)."""
    cfg = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def peft_names(name: str, roles: tuple[str, ...]) -> list[str]:
    """PEFT ``target_modules`` for these roles: the last part of each module's name (PEFT
    matches by suffix; a fused projection, GPT-2's ``c_attn``, is named whole)."""
    return sorted({s.path.rpartition(".")[2] for s in sites(name) if s.role in roles})


def fan_in_fan_out(name: str) -> bool:
    """Whether the projections store their weight as ``(in, out)`` (GPT-2's ``Conv1D``)."""
    return any(
        s.weight.layout == "conv1d_t" for s in sites(name) if s.kind == "module" and s.is_projection
    )


LORA_ROLES = ("attn.q", "attn.v", "mlp.up")
IA3_ROLES = ("attn.k", "attn.v", "mlp.up")  # scaled on their output side


@pytest.fixture(scope="module")
def bases() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: _with_head(name).eval() for name in TEXT}


@pytest.fixture
def fresh(bases: dict[str, nn.Module]) -> Callable[[str], nn.Module]:
    return lambda name: copy.deepcopy(bases[name]).eval()


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])


def run(model: nn.Module, **kwargs: Any) -> torch.Tensor:
    """Logits for LM heads, else the last hidden state."""
    with torch.no_grad():
        out = model(input_ids=IDS, **kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def perturb(model: DeltaModel, seed: int = 0) -> None:
    """Make every delta parameter non-trivial (LoRA's B and IA3's scales start neutral).

    Matrices get noise; vectors (IA3's scales) get noise around 1, so they stay scales.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.deltas.parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.5
            p.copy_(1 + noise if p.ndim == 1 else noise)


def peft_save(base: nn.Module, config: Any, directory: Path) -> nn.Module:
    """Wrap ``base`` with PEFT, save the adapter, and return the PEFT model (eval mode)."""
    model = peft.get_peft_model(base, config).eval()
    model.save_pretrained(str(directory))
    return model


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("arch", TEXT)
def test_lora_from_peft(arch: str, use_rslora: bool, fresh, tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=peft_names(arch, LORA_ROLES),
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out(arch),  # GPT-2's Conv1D stores its weight as (in, out)
        init_lora_weights=False,  # random B: the adapter is not the identity
    )
    expected = run(peft_save(fresh(arch), config, tmp_path))
    backbone = fresh(arch)
    plain = run(backbone)
    model = interop.load(backbone, tmp_path)
    assert model.base_model is backbone
    assert not torch.allclose(expected, plain, atol=1e-3)
    close(run(model), expected)
    adapter = model.adapters["default"]
    assert adapter.method.id == "lora"
    assert adapter.config.use_rslora is use_rslora
    assert all("." in s.name and ":" not in s.name for s in adapter.sites)  # module paths


def test_lora_whole_fused_module_maps_to_generic_site(fresh, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_save(fresh("gpt2"), config, tmp_path)
    model = interop.load(fresh("gpt2"), tmp_path)
    sites = model.adapters["default"].sites
    assert [s.name for s in sites] == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    assert all(s.out_slice is None and s.features == 96 for s in sites)


def test_lora_layers_to_transform_is_honoured_by_the_keys(fresh, tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj"], layers_to_transform=[1], init_lora_weights=False
    )
    expected = run(peft_save(fresh("llama"), config, tmp_path))
    model = interop.load(fresh("llama"), tmp_path)
    assert [s.name for s in model.adapters["default"].sites] == ["model.layers.1.self_attn.q_proj"]
    close(run(model), expected)


@pytest.mark.parametrize(
    ("arch", "targets", "config"),
    [
        ("llama", [r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r".*down_proj"], {}),
        ("llama", ["attn.q", "mlp.up"], {"use_rslora": True, "alpha": 3.5}),
        ("bert", [r".*attention\.self\.(query|value)", r".*output\.dense"], {"dropout": 0.1}),
        ("gpt2", [r"transformer\.h\.\d+\.attn\.c_attn", r".*mlp\.c_proj"], {}),
    ],
)
def test_lora_to_peft(arch: str, targets: list[str], config: dict, fresh, tmp_path) -> None:
    model = unipeft.apply(fresh(arch), "lora", r=3, targets=targets, **config)
    model.eval()
    perturb(model)
    interop.save(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh(arch), str(tmp_path)).eval()
    close(run(loaded), run(model))
    # and back again: the directory loads into unipeft with the same function
    close(run(interop.load(fresh(arch), tmp_path)), run(model))


def test_lora_to_peft_writes_plain_lora_config(fresh, tmp_path: Path) -> None:
    model = unipeft.apply(fresh("gpt2"), "lora", r=2, alpha=4, targets=[r".*c_fc"])
    interop.save(model, tmp_path)
    cfg = json.loads((tmp_path / interop.CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 4
    assert cfg["fan_in_fan_out"] is True  # GPT-2 Conv1D
    assert cfg["target_modules"] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    keys = set(load_file(tmp_path / interop.WEIGHTS_FILE))
    assert "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight" in keys


def test_lora_conv_round_trip(tmp_path: Path) -> None:
    """Conv LoRA: PEFT's lora_B is a 1x1 conv ``(out, r, 1, 1)``, unipeft's B ``(out, r)``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    config = peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    expected = peft_save(copy.deepcopy(base), config, tmp_path)(x)
    model = interop.load(copy.deepcopy(base), tmp_path)
    close(model(x), expected)
    interop.save(model, tmp_path / "back")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    close(loaded(x), expected)


def test_ia3_conv_round_trip(tmp_path: Path) -> None:
    """Conv (IA)^3: PEFT's ia3_l is ``(1, out, 1, 1)``, unipeft's l ``(out,)``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    config = peft.IA3Config(
        target_modules=["0", "2"], feedforward_modules=[], init_ia3_weights=False
    )
    expected = peft_save(copy.deepcopy(base), config, tmp_path)(x)
    model = interop.load(copy.deepcopy(base), tmp_path)
    close(model(x), expected)
    interop.save(model, tmp_path / "back")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    close(loaded(x), expected)


def test_load_adds_to_an_existing_delta_model(fresh, tmp_path: Path) -> None:
    peft_save(fresh("llama"), peft.LoraConfig(r=2, target_modules=["k_proj"]), tmp_path)
    model = unipeft.apply(fresh("llama"), "lora", r=2, targets=["attn.q"])
    assert interop.load(model, tmp_path, adapter_name="from_peft") is model
    assert set(model.adapters) == {"default", "from_peft"}


def test_loaded_adapter_survives_unipeft_save_and_load(fresh, tmp_path: Path) -> None:
    peft_dir, own_dir = tmp_path / "peft", tmp_path / "unipeft"
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    expected = run(peft_save(fresh("llama"), config, peft_dir))
    interop.load(fresh("llama"), peft_dir).save(str(own_dir))
    close(run(unipeft.load(fresh("llama"), str(own_dir))), expected)


# ----------------------------------------------------------------------------- prompt tuning


def _peft_prompt(arch: str, fresh, directory: Path) -> nn.Module:
    task = "FEATURE_EXTRACTION" if arch in ENCODERS else "CAUSAL_LM"
    config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    return peft_save(fresh(arch), config, directory)


@pytest.mark.parametrize("arch", DECODERS)
def test_prompt_tuning_from_peft_on_decoders(arch: str, fresh, tmp_path: Path) -> None:
    reference = _peft_prompt(arch, fresh, tmp_path)
    model = interop.load(fresh(arch), tmp_path)
    assert model.adapters["default"].config.num_tokens == P
    for kwargs in ({}, {"attention_mask": MASK}):
        # PEFT keeps its soft tokens in its outputs; unipeft strips them
        close(run(model, **kwargs), run(reference, **kwargs)[:, P:])


@pytest.mark.parametrize("arch", DECODERS)
def test_prompt_tuning_to_peft_on_decoders(arch: str, fresh, tmp_path: Path) -> None:
    model = unipeft.apply(fresh(arch), "prompt_tuning", num_tokens=4, init_std=0.5).eval()
    interop.save(model, tmp_path)
    cfg = json.loads((tmp_path / interop.CONFIG_FILE).read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["num_virtual_tokens"] == 4
    loaded = peft.PeftModel.from_pretrained(fresh(arch), str(tmp_path)).eval()
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    for kwargs in ({}, {"attention_mask": MASK}):
        close(run(loaded, **kwargs)[:, 4:], run(model, **kwargs))


def test_prompt_tuning_on_encoders_loads_with_a_warning(fresh, tmp_path: Path) -> None:
    _peft_prompt("bert", fresh, tmp_path)
    with pytest.warns(UserWarning, match="differ from PEFT's by design"):
        model = interop.load(fresh("bert"), tmp_path)
    assert run(model).shape == (2, 7, 32)
    with pytest.warns(UserWarning, match="index 1"):
        interop.save(model, tmp_path / "back")
    loaded = peft.PeftModel.from_pretrained(fresh("bert"), str(tmp_path / "back"))
    assert isinstance(loaded, peft.PeftModelForFeatureExtraction)


# ----------------------------------------------------------------------------- (IA)^3


@pytest.mark.parametrize("arch", TEXT)
def test_ia3_from_peft(arch: str, fresh, tmp_path: Path) -> None:
    config = peft.IA3Config(
        target_modules=peft_names(arch, IA3_ROLES),
        feedforward_modules=[],
        fan_in_fan_out=fan_in_fan_out(arch),
        init_ia3_weights=False,
    )
    expected = run(peft_save(fresh(arch), config, tmp_path))
    model = interop.load(fresh(arch), tmp_path)
    assert model.adapters["default"].method.id == "ia3"
    close(run(model), expected)


@pytest.mark.parametrize("arch", TEXT)
def test_ia3_to_peft(arch: str, fresh, tmp_path: Path) -> None:
    targets = [rf".*\.{t}" for t in peft_names(arch, IA3_ROLES)]
    model = unipeft.apply(fresh(arch), "ia3", targets=targets).eval()
    perturb(model)
    interop.save(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh(arch), str(tmp_path)).eval()
    close(run(loaded), run(model))


# ----------------------------------------------------------------------------- refusals


def snapshot(module: nn.Module) -> dict[str, Any]:
    """What an error must leave untouched: weights, requires_grad, hooks."""
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__)
            for n, m in module.named_modules()
        },
        "output": run(module),
    }


def assert_unchanged(module: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(module)
    assert after["grad"] == before["grad"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    close(after["output"], before["output"])
    DeltaModel(module)  # not left registered as wrapped by a half-built handle


def expect_load_error(backbone: nn.Module, path: Path, *fragments: str) -> LoadError:
    before = snapshot(backbone)
    with pytest.raises(LoadError) as info:
        interop.load(backbone, path)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert_unchanged(backbone, before)
    return info.value


@pytest.fixture
def lora_dir(fresh, tmp_path: Path) -> Path:
    """A plain PEFT LoRA directory for the Llama base."""
    directory = tmp_path / "lora"
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_save(fresh("llama"), config, directory)
    return directory


def edit_config(directory: Path, **changes: Any) -> None:
    path = directory / interop.CONFIG_FILE
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_tensors(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = directory / interop.WEIGHTS_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (dict(bias="all"), "bias"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(rank_pattern={"v_proj": 4}), "rank_pattern"),
        (dict(alpha_pattern={"v_proj": 4}), "alpha_pattern"),
    ],
)
def test_lora_fields_unipeft_cannot_honour(config: dict, field: str, fresh, tmp_path) -> None:
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **config)
    peft_save(fresh("llama"), lora, tmp_path)
    expect_load_error(fresh("llama"), tmp_path, field, "cannot honour")


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"use_qalora": True}, "use_qalora"),
        ({"r": "two"}, "field r = 'two'"),
    ],
)
def test_lora_config_edits_refused(changes: dict, fragment: str, lora_dir, fresh) -> None:
    edit_config(lora_dir, **changes)
    expect_load_error(fresh("llama"), lora_dir, fragment)


def test_unknown_config_field_warns(lora_dir, fresh) -> None:
    edit_config(lora_dir, some_future_variant={"on": True})
    with pytest.warns(UserWarning, match="some_future_variant"):
        interop.load(fresh("llama"), lora_dir)


def test_other_peft_types_are_refused(lora_dir, fresh, tmp_path: Path) -> None:
    edit_config(lora_dir, peft_type="POLY")
    error = expect_load_error(fresh("llama"), lora_dir, "'POLY'", "LORA", "IA3", "LOHA", "VERA")
    assert "supports" in str(error)
    multitask = tmp_path / "multitask"  # a prompt type unipeft does not convert
    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2, num_tasks=1
    )
    peft_save(fresh("llama"), config, multitask)
    expect_load_error(fresh("llama"), multitask, "'MULTITASK_PROMPT_TUNING'")


def test_a_lora_folder_relabelled_adalora_is_refused(lora_dir, fresh) -> None:
    edit_config(lora_dir, peft_type="ADALORA")  # AdaLoRA's modules also need lora_E
    expect_load_error(fresh("llama"), lora_dir, "ADALORA")


def test_shape_mismatch_names_module_tensor_and_shapes(fresh, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=2, target_modules=["down_proj"])
    peft_save(_llama(intermediate_size=48).eval(), config, tmp_path)
    expect_load_error(
        fresh("llama"),
        tmp_path,
        "model.layers.0.mlp.down_proj",
        "lora_A.weight",
        "(2, 48)",
        "(2, 64)",
    )


def test_rank_differing_from_config_is_a_shape_error(lora_dir, fresh) -> None:
    edit_config(lora_dir, r=3)
    expect_load_error(fresh("llama"), lora_dir, "lora_A.weight", "(2, 32)", "(3, 32)")


@pytest.mark.parametrize("content", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(content: str, lora_dir, fresh) -> None:
    path = lora_dir / interop.WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\x00junk", "empty": b""}[content]
    )
    expect_load_error(fresh("llama"), lora_dir, "truncated or corrupt")


def test_missing_files(lora_dir, fresh, tmp_path: Path) -> None:
    expect_load_error(fresh("llama"), tmp_path / "nowhere", "is not a directory")
    (lora_dir / interop.CONFIG_FILE).rename(tmp_path / "kept.json")
    expect_load_error(fresh("llama"), lora_dir, "adapter_config.json does not exist")
    (tmp_path / "kept.json").rename(lora_dir / interop.CONFIG_FILE)
    (lora_dir / interop.WEIGHTS_FILE).unlink()
    expect_load_error(fresh("llama"), lora_dir, "adapter_model.safetensors does not exist")


def test_pickle_only_directory_is_never_unpickled(lora_dir, fresh) -> None:
    (lora_dir / interop.WEIGHTS_FILE).unlink()
    (lora_dir / "adapter_model.bin").write_bytes(b"this would be a pickle")
    expect_load_error(fresh("llama"), lora_dir, "never unpickles", "safe_serialization=True")


def test_named_adapter_subfolder_hint(lora_dir, fresh, tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    outer.mkdir()
    lora_dir.rename(outer / "other")
    expect_load_error(fresh("llama"), outer, "subfolders", "other")


def test_config_value_unipeft_rejects(lora_dir, fresh) -> None:
    edit_config(lora_dir, lora_dropout=1.0)
    expect_load_error(fresh("llama"), lora_dir, "lora_dropout", "'dropout'")


def test_invalid_json(lora_dir, fresh) -> None:
    (lora_dir / interop.CONFIG_FILE).write_text("{not json")
    expect_load_error(fresh("llama"), lora_dir, "not valid JSON")


def test_missing_module(lora_dir, fresh) -> None:
    one_layer = _llama(num_hidden_layers=1).eval()
    expect_load_error(one_layer, lora_dir, "'model.layers.1.self_attn.q_proj'", "does not have")


def test_wrapper_path_hint(lora_dir, fresh) -> None:
    """Saved on LlamaForCausalLM (paths start with ``model.``), loaded on its inner LlamaModel."""
    inner = fresh("llama").model
    expect_load_error(inner, lora_dir, "LlamaForCausalLM", "a model that contains this one")


def test_inner_model_path_hint(fresh, tmp_path: Path) -> None:
    """Saved on the inner LlamaModel, loaded on the LlamaForCausalLM around it."""
    peft_save(fresh("llama").model, peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path)
    expect_load_error(fresh("llama"), tmp_path, "saved for a LlamaModel", "pass backbone.model")


def test_missing_factor(lora_dir, fresh) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(lora_dir, lambda t: t.pop(key))
    expect_load_error(fresh("llama"), lora_dir, "model.layers.0.self_attn.q_proj", "lora_B")


def test_unexpected_tensor(lora_dir, fresh) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.bias"

    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.zeros(32)

    edit_tensors(lora_dir, add)
    expect_load_error(fresh("llama"), lora_dir, key, "trained bias")


def test_lora_on_embedding_is_refused(fresh, tmp_path: Path) -> None:
    peft_save(fresh("llama"), peft.LoraConfig(r=2, target_modules=["embed_tokens"]), tmp_path)
    expect_load_error(fresh("llama"), tmp_path, "nn.Embedding")


def test_failed_load_into_existing_model_keeps_its_adapters(lora_dir, fresh) -> None:
    model = unipeft.apply(fresh("llama"), "lora", r=2, targets=["attn.k"])
    edit_config(lora_dir, use_dora=True)  # without the magnitude vectors DoRA needs
    with pytest.raises(
        LoadError,
        match=r"lora_magnitude_vector in adapter_model\.safetensors although the config",
    ):
        interop.load(model, lora_dir, adapter_name="x")
    assert list(model.adapters) == ["default"]


def test_ia3_without_the_method_says_so(monkeypatch, fresh, tmp_path: Path) -> None:
    config = peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    peft_save(fresh("llama"), config, tmp_path)
    monkeypatch.delitem(unipeft.registry().methods, "ia3")
    expect_load_error(fresh("llama"), tmp_path, "PEFT type IA3 needs unipeft's", "ia3")


def test_prompt_tuning_shape_mismatch(fresh, tmp_path: Path) -> None:
    _peft_prompt("llama", fresh, tmp_path)
    wide = _llama(hidden_size=48).eval()
    expect_load_error(wide, tmp_path, "prompt_embeddings", f"({P}, 32)", f"({P}, 48)")


# ----------------------------------------------------------------------------- save refusals


def test_save_refuses_slices(fresh, tmp_path: Path) -> None:
    model = unipeft.apply(fresh("gpt2"), "lora", r=2, targets=["attn.q"])
    with pytest.raises(AdapterError, match="cannot express a slice"):
        interop.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_refuses_other_methods(fresh, tmp_path: Path) -> None:
    model = unipeft.apply(fresh("llama"), "bottleneck_adapter", targets=["mlp"])
    with pytest.raises(AdapterError, match=r"exports adalora, boft, .*, ia3, .*, lora, .*vera"):
        interop.save(model, tmp_path)


def test_save_unknown_adapter(fresh, tmp_path: Path) -> None:
    model = unipeft.apply(fresh("llama"), "lora", r=2, targets=["attn.q"])
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        interop.save(model, tmp_path, adapter_name="nope")
