"""GLoRA: parity with Hugging Face PEFT's GLORA both ways (BERT and a timm ViT, several
support forms), merged weights, counts, identity at init and refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from _parity import close, make, randomise  # noqa: E402
from _parity import run_fixed as run  # noqa: E402

import unipeft  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402

# PEFT module names, and the same modules as unipeft targets (generic sites, by path)
CASES = {
    "bert": (
        ["query", "value", "intermediate.dense"],
        [r".*self\.(query|value)", r".*\.intermediate\.dense"],
    ),
    "vit": (["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]),
}
FORMS = [
    {},  # PEFT's defaults: lora, lora, constant
    {"config_A_B": "vector", "config_C": "vector", "config_D_E": "vector"},
    {"config_A_B": "constant", "config_C": "none", "config_D_E": "none"},
]


def peft_model(base: nn.Module, arch: str, **kw) -> nn.Module:
    config = peft.GloraConfig(r=3, target_modules=CASES[arch][0], **kw)
    model = peft.get_peft_model(base, config).eval()
    randomise(p for p in model.parameters() if p.requires_grad)
    return model


@pytest.mark.parametrize("form", range(len(FORMS)))
@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_from_peft(arch: str, form: int, tmp_path: Path) -> None:
    base = make(arch)
    theirs = peft_model(copy.deepcopy(base), arch, **FORMS[form])
    theirs.save_pretrained(str(tmp_path))
    expected = run(theirs, arch)
    assert (expected - run(base, arch)).abs().max() > 1e-2  # not the identity
    ours = interop.load(copy.deepcopy(base), tmp_path)
    adapter = ours.adapters["default"]
    assert adapter.method.id == "glora" and adapter.config.r == 3
    close(run(ours, arch), expected, f"{arch} form {form} PEFT -> unipeft")
    # merged weights: PEFT's merge_and_unload and unipeft's merge write the same weights
    ours.merge()
    close(run(ours, arch), expected, f"{arch} form {form} merged output")
    merged = theirs.merge_and_unload().state_dict()
    worst = max((ours.base_model.state_dict()[k] - v).abs().max().item() for k, v in merged.items())
    print(f"{arch} form {form} merged weights: max |diff| = {worst:.3e}")
    assert worst <= 1e-5


@pytest.mark.parametrize("form", range(len(FORMS)))
@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_to_peft(arch: str, form: int, tmp_path: Path) -> None:
    base = make(arch)
    ours = unipeft.apply(copy.deepcopy(base), "glora", r=2, targets=CASES[arch][1], **FORMS[form])
    ours.eval()
    randomise(ours.deltas.parameters())
    expected = run(ours, arch)
    assert (expected - run(base, arch)).abs().max() > 1e-2
    interop.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(run(theirs, arch), expected, f"{arch} form {form} unipeft -> PEFT")
    # the folder holds exactly the keys PEFT writes for the same config
    ref = peft.get_peft_model(
        copy.deepcopy(base), peft.GloraConfig(r=2, target_modules=CASES[arch][0], **FORMS[form])
    )
    ref.save_pretrained(str(tmp_path / "ref"))
    want = load_file(tmp_path / "ref" / interop.WEIGHTS_FILE)
    got = load_file(tmp_path / interop.WEIGHTS_FILE)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}


def test_sites_without_bias_have_no_bias_supports(tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=100, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaModel(cfg).eval()
    ours = unipeft.apply(copy.deepcopy(base), "glora", r=2, targets=[r".*\.q_proj"])
    assert ours.num_trainable_parameters() == 2 * 2 * (32 + 32)  # A and B only
    randomise(ours.deltas.parameters())
    interop.save(ours, tmp_path)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        want = theirs(input_ids=ids).last_hidden_state
        got = ours(input_ids=ids).last_hidden_state
    close(got, want, "llama (no bias) unipeft -> PEFT")
    with pytest.raises(unipeft.ConfigError, match="config_A_B='none' trains nothing"):
        unipeft.apply(copy.deepcopy(base), "glora", config_A_B="none", targets=[r".*\.q_proj"])


def test_identity_counts_and_fused_slices() -> None:
    base = make("vit")
    model = unipeft.apply(copy.deepcopy(base), "glora", r=4, targets=["attn.q", "attn.v"])
    assert torch.equal(run(model, "vit"), run(base, "vit"))
    # per slice (32 -> 32, biased): A, B 2·4·64, C 4·33, D, E 2
    assert model.num_trainable_parameters() == 4 * (2 * 4 * 64 + 4 * 33 + 2)
    randomise(model.deltas.parameters())
    before = run(model, "vit")
    model.merge()
    close(run(model, "vit"), before, "vit slices merged vs unmerged")
    model.unmerge()
    assert torch.equal(run(model, "vit"), before)


def test_refusals() -> None:
    with pytest.raises(unipeft.ConfigError, match=r"(?s)all 'none'"):
        unipeft.apply(make("bert"), "glora", config_A_B="none", config_C="none", config_D_E="none")
    with pytest.raises(unipeft.ConfigError, match="config_C"):
        unipeft.apply(make("bert"), "glora", config_C="constant")
    ours = unipeft.apply(make("vit"), "glora", r=2, targets=["attn.q"])
    with pytest.raises(unipeft.AdapterError, match="slice of the fused module"):
        interop.save(ours, "/tmp/unused-glora-folder")
