"""(IA)^3, built in: output-side scaling ``l ⊙ y`` and the input-side (feed-forward) form
``W (l ⊙ x) + b``; PEFT ``IA3`` folders with ``feedforward_modules`` both ways on BERT and a
timm ViT (a Conv2d included), merged weights included.

The PEFT conversions run through the IA3 codec (``unipeft.features.interop.codecs.ia3``):
directly, and through ``unipeft.interop.peft.load`` / ``save`` once those hand IA3 to it
(until then ``peft.py``'s own IA3 converter, output side only, answers there).

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import unipeft  # noqa: E402
from unipeft import ConfigError, LoadError, TargetError  # noqa: E402
from unipeft.contract.maps import generic_sites  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.features.interop.codec import PeftSite  # noqa: E402
from unipeft.features.interop.codecs import codec_for_method, codec_for_type  # noqa: E402
from unipeft.methods.additive.ia3 import Ia3Delta, Ia3InputDelta  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

# unipeft's export writes the module-selection fields every PEFT type has; PEFT drops the
# ones IA3Config lacks, with a warning
pytestmark = pytest.mark.filterwarnings("ignore:Unexpected keyword arguments")

# whether peft.py still converts IA3 itself (before the lead hands IA3 to the codec)
LEGACY_LOAD = callable(getattr(interop, "_plan_ia3", None))
LEGACY_SAVE = "ia3" in getattr(interop, "_EXPORTERS", {})

CASES = {
    # kind: (PEFT target_modules, PEFT feedforward_modules, unipeft targets, feedforward)
    "bert": (
        ["key", "value", "intermediate.dense", "output.dense"],
        ["intermediate.dense", "output.dense"],
        ["attn.k", "attn.v", "mlp.up", "mlp.down"],
        "mlp.up|mlp.down",
    ),
    "vit": (
        ["qkv", "fc1", "fc2", "patch_embed.proj"],
        ["fc2", "patch_embed.proj"],  # the Conv2d patch embedding: input side on a conv
        [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc[12]", r"patch_embed\.proj"],
        r".*fc2|patch_embed\.proj",
    ),
}


def _base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return transformers.BertModel(cfg).eval()
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=5, drop_rate=0.0,
    ).eval()  # fmt: skip


def _run(model: nn.Module, kind: str) -> Tensor:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if kind == "vit":
            return model(torch.randn(2, 3, 32, 32, generator=g))
        return model(input_ids=torch.randint(0, 100, (2, 7), generator=g)).last_hidden_state


def _diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _close(a: Tensor, b: Tensor, what: str) -> float:
    d = _diff(a, b)
    scale = max(1.0, b.abs().max().item())
    assert d <= 1e-5 * scale, f"{what}: largest difference {d:.3e} (output scale {scale:.3g})"
    return d


def _merged_weights(peft_model: Any, ours: unipeft.DeltaModel) -> float:
    """Largest difference between PEFT's merge_and_unload() and unipeft's merge()."""
    ours.merge()
    mine = ours.base_model.state_dict()
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(mine) == set(theirs)
    return max(_close(mine[k], theirs[k], f"merged {k}") for k in mine)


def _perturb(model: unipeft.DeltaModel) -> None:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def _peft_model(kind: str, base: nn.Module) -> Any:
    targets, feedforward, _, _ = CASES[kind]
    config = peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False
    )
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def _ours(kind: str, base: nn.Module) -> unipeft.DeltaModel:
    _, _, targets, feedforward = CASES[kind]
    model = unipeft.apply(copy.deepcopy(base), "ia3", targets=targets, feedforward=feedforward)
    _perturb(model.eval())
    return model


# --------------------------------------------- the codec on its own (what interop will call)


def _load_with_codec(backbone: nn.Module, folder: Path) -> unipeft.DeltaModel:
    """A PEFT IA3 folder through the IA3 codec and DeltaModel.attach, as the loader does."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    codec = codec_for_type("IA3")
    assert codec is not None
    spec = unipeft.get_method(codec.method)
    cfg = spec.config.parse(spec.id, codec.config_in(dict(config)))
    by_path = {s.name: s for s in generic_sites(backbone)}
    groups = {
        k.removeprefix("base_model.model.").removesuffix(".ia3_l"): t for k, t in tensors.items()
    }
    sites = tuple(by_path[p] for p in sorted(groups))
    for site in sites:
        assert codec.site_refusal is None or codec.site_refusal(site) is None
    state = {
        s.name: codec.state_in(PeftSite(config, cfg, s, {"l": groups[s.name]}, {})) for s in sites
    }
    plan = unipeft.AdapterPlan(
        method=spec, config=cfg, sites=sites, targets=tuple(re.escape(p) for p in groups),
        state=state,
    )  # fmt: skip
    model = unipeft.DeltaModel(backbone)
    model.attach("default", plan)
    return model


def _save_with_codec(model: unipeft.DeltaModel, folder: Path) -> None:
    """The adapter as a PEFT IA3 folder through the IA3 codec, as the exporter does."""
    adapter = model.adapters["default"]
    codec = codec_for_method("ia3")
    assert codec is not None
    tensors = {}
    for site in adapter.sites:
        assert codec.site_refusal is None or codec.site_refusal(site) is None
        for part, tensor in codec.state_out(adapter, site).items():
            assert part == "l"
            tensors[f"base_model.model.{site.path}.ia3_l"] = tensor.contiguous()
    paths = sorted(s.path for s in adapter.sites)
    config = {
        "peft_type": "IA3",
        "task_type": None,
        "inference_mode": True,
        "target_modules": "|".join(re.escape(p) for p in paths),
        "fan_in_fan_out": False,
        **codec.config_out(adapter),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")


@pytest.mark.parametrize("kind", sorted(CASES))
def test_codec_peft_to_unipeft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    theirs = _peft_model(kind, base)
    theirs.save_pretrained(tmp_path)
    expected = _run(theirs, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the PEFT adapter is the identity"
    ours = _load_with_codec(copy.deepcopy(base), tmp_path).eval()
    kinds = {type(ours.adapters["default"].delta_at(s)) for s in ours.adapters["default"].sites}
    assert kinds == {Ia3Delta, Ia3InputDelta}
    d = _close(_run(ours, kind), expected, "PEFT -> unipeft output")
    m = _merged_weights(theirs, ours)
    print(f"\nia3 {kind} PEFT->unipeft (codec): output {d:.2e}, merged weights {m:.2e}")


@pytest.mark.parametrize("kind", sorted(CASES))
def test_codec_unipeft_to_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    ours = _ours(kind, base)
    expected = _run(ours, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the unipeft adapter is the identity"
    _save_with_codec(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    d = _close(_run(theirs, kind), expected, "unipeft -> PEFT output")
    m = _merged_weights(theirs, ours)
    print(f"\nia3 {kind} unipeft->PEFT (codec): output {d:.2e}, merged weights {m:.2e}")


def test_codec_maps_feedforward_modules() -> None:
    codec = codec_for_type("IA3")
    assert codec is not None
    assert codec.config_in({"feedforward_modules": ["output.dense"]}) == {
        "feedforward": r".*output\.dense"
    }
    assert codec.config_in({"feedforward_modules": r".*\.fc2"}) == {"feedforward": r".*\.fc2"}
    assert codec.config_in({"feedforward_modules": None}) == {"feedforward": ""}
    with pytest.raises(LoadError, match="feedforward_modules"):
        codec.config_in({"feedforward_modules": 3})


# ----------------------------------------------------- through unipeft.interop.peft itself


@pytest.mark.parametrize("kind", sorted(CASES))
def test_interop_peft_to_unipeft(kind: str, tmp_path: Path) -> None:
    if LEGACY_LOAD:
        pytest.skip("peft.py still converts IA3 itself (output side only), not with the codec")
    base = _base(kind)
    theirs = _peft_model(kind, base)
    theirs.save_pretrained(tmp_path)
    ours = interop.load(copy.deepcopy(base), tmp_path).eval()
    d = _close(_run(ours, kind), _run(theirs, kind), "PEFT -> unipeft output")
    m = _merged_weights(theirs, ours)
    print(f"\nia3 {kind} PEFT->unipeft (interop): output {d:.2e}, merged weights {m:.2e}")


@pytest.mark.parametrize("kind", sorted(CASES))
def test_interop_unipeft_to_peft(kind: str, tmp_path: Path) -> None:
    if LEGACY_SAVE:
        pytest.skip("peft.py still exports IA3 itself (output side only), not with the codec")
    base = _base(kind)
    ours = _ours(kind, base)
    interop.save(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["feedforward_modules"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    d = _close(_run(theirs, kind), _run(ours, kind), "unipeft -> PEFT output")
    m = _merged_weights(theirs, ours)
    print(f"\nia3 {kind} unipeft->PEFT (interop): output {d:.2e}, merged weights {m:.2e}")


# ----------------------------------------------------------------------------- the method


def test_default_targets_scale_the_ffn_input() -> None:
    """The paper's and PEFT's placement: keys and values on their output, the FFN's hidden
    activation on the input of mlp.down; counts d_out, d_out, d_ff per block."""
    bb = BACKBONES["bert"]
    model = unipeft.apply(bb.make(), "ia3")
    adapter = model.adapters["default"]
    down = [s for s in adapter.sites if s.role == "mlp.down"]
    assert down and all(isinstance(adapter.delta_at(s), Ia3InputDelta) for s in down)
    assert all(adapter.delta_at(s).l.shape == (s.in_features,) for s in down)
    want = sum(adapter.method.num_parameters(adapter.config, s) for s in adapter.sites)
    assert model.num_trainable_parameters() == want
    torch.testing.assert_close(bb.run(model, bb.sample(0)), bb.run(bb.make(), bb.sample(0)))


def test_input_side_merges_on_every_layout() -> None:
    """Input side on fused slices (timm qkv, GPT-2 c_attn, MHA in_proj), GPT-2 Conv1D and a
    Conv2d: merged outputs equal unmerged ones."""
    for name, targets in (
        ("timm_vit", ["attn.k", "mlp.down", "embed"]),
        ("gpt2", ["attn.v", "mlp.down"]),
        ("open_clip", ["attn.q", "attn.out"]),
    ):
        bb = BACKBONES[name]
        model = unipeft.apply(bb.make(), "ia3", targets=targets, feedforward=".*")
        adapter = model.adapters["default"]
        assert all(isinstance(adapter.delta_at(s), Ia3InputDelta) for s in adapter.sites)
        _perturb(model)
        ref = bb.run(bb.make(), bb.sample(0)).detach()
        out = bb.run(model, bb.sample(0)).detach()
        assert _diff(out, ref) > 1e-3
        model.merge()
        torch.testing.assert_close(bb.run(model, bb.sample(0)).detach(), out, atol=1e-4, rtol=1e-4)
        model.unmerge()


def test_config_and_site_refusals() -> None:
    with pytest.raises(ConfigError, match="feedforward"):
        unipeft.apply(BACKBONES["bert"].make(), "ia3", feedforward="(")
    cfg = unipeft.get_method("ia3").config.parse("ia3", {"feedforward": ["mlp.down", ".*fc2"]})
    assert cfg.feedforward == "mlp.down|.*fc2"  # type: ignore[attr-defined]
    with pytest.raises(TargetError, match="projection"):
        unipeft.apply(BACKBONES["bert"].make(), "ia3", targets=["mlp"])
