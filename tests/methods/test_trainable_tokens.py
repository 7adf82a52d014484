"""Trainable tokens: parity with Hugging Face PEFT's TRAINABLE_TOKENS both ways (BERT and
GPT-2 token embeddings; PEFT has no token embedding to adapt on a timm ViT), the merged
table, the config's token ids, and the refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _parity import IDS, base, close, make, randomise  # noqa: E402

import unipeft  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402

# three ids the fixed inputs contain, and one they do not
TOKENS = [*sorted(set(IDS.flatten().tolist()))[:3], 99]
MODULE = {"bert": ("word_embeddings", "embeddings.word_embeddings"), "gpt2": ("wte", "wte")}


def backbone(arch: str) -> nn.Module:
    return make("bert") if arch == "bert" else base("gpt2")


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def peft_model(model: nn.Module, arch: str) -> nn.Module:
    cfg = peft.TrainableTokensConfig(token_indices=TOKENS, target_modules=[MODULE[arch][0]])
    out = peft.get_peft_model(model, cfg).eval()
    randomise(p for p in out.parameters() if p.requires_grad)
    return out


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_from_peft(arch: str, tmp_path: Path) -> None:
    plain = backbone(arch)
    theirs = peft_model(copy.deepcopy(plain), arch)
    theirs.save_pretrained(str(tmp_path))
    expected = run(theirs)
    assert (expected - run(plain)).abs().max() > 1e-2  # not the identity
    ours = interop.load(copy.deepcopy(plain), tmp_path)
    adapter = ours.adapters["default"]
    assert adapter.method.id == "trainable_tokens" and list(adapter.config.indices) == TOKENS
    close(run(ours), expected, f"{arch} PEFT -> unipeft")
    # merged table: PEFT's merge_and_unload and the delta's merged() write the same rows
    delta = adapter.delta_at(adapter.sites[0])
    weight = dict(ours.base_model.named_parameters())[f"{MODULE[arch][1]}.weight"]
    mine, _ = delta.merged(weight.detach(), None)
    merged = theirs.merge_and_unload().state_dict()[f"{MODULE[arch][1]}.weight"]
    worst = (mine - merged).abs().max().item()
    print(f"{arch} merged table: max |diff| = {worst:.3e}")
    assert worst == 0.0


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_to_peft(arch: str, tmp_path: Path) -> None:
    plain = backbone(arch)
    ours = unipeft.apply(copy.deepcopy(plain), "trainable_tokens", token_indices=TOKENS).eval()
    assert [s.name for s in ours.adapters["default"].sites] == [MODULE[arch][1]]
    randomise(ours.deltas.parameters())
    expected = run(ours)
    assert (expected - run(plain)).abs().max() > 1e-2
    interop.save(ours, tmp_path)
    keys = set(load_file(tmp_path / interop.WEIGHTS_FILE))
    assert keys == {f"base_model.model.{MODULE[arch][1]}.trainable_tokens_delta"}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path)).eval()
    close(run(theirs), expected, f"{arch} unipeft -> PEFT")


def test_identity_at_init_counts_and_rows() -> None:
    plain = make("bert")
    model = unipeft.apply(copy.deepcopy(plain), "trainable_tokens", token_indices="[7, 3]")
    assert torch.equal(run(model), run(plain))
    assert model.num_trainable_parameters() == 2 * 32
    delta = model.adapters["default"].delta_at(model.adapters["default"].sites[0])
    table = plain.embeddings.word_embeddings.weight
    assert torch.equal(delta.values.detach(), table[[7, 3]].detach())
    # only the chosen rows change: the output of any other id is untouched
    with torch.no_grad():
        delta.values.add_(torch.randn_like(delta.values))
        emb = model.base_model.embeddings.word_embeddings(torch.tensor([[3, 4, 7]]))
    assert torch.equal(emb[0, 1], table[4].detach())
    assert torch.equal(emb[0, 0], delta.values[1]) and torch.equal(emb[0, 2], delta.values[0])


def test_config_ids() -> None:
    cfg = unipeft.get_method("trainable_tokens").config
    assert cfg(token_indices=[5, 17]).token_indices == "[5,17]"
    assert cfg(token_indices="[5 17,2-4]").indices == (5, 17, 2, 3, 4)
    assert cfg(token_indices=[9, 3, 4, 5]).token_indices == "[9,3-5]"
    assert len(cfg().indices) == 64
    bad = {
        "distinct": [1, 1],
        "at least one": [],
        "not a bracketed list": "[a,b]",
        "bracketed": "1,2",
        ">= 0": [-1],
        "ends below its start": "[9-7]",
    }
    for words, value in bad.items():
        with pytest.raises(unipeft.ConfigError, match=f"(?s)token_indices.*{words}"):
            cfg.parse("trainable_tokens", {"token_indices": value})
    with pytest.raises(unipeft.ConfigError, match=r"token_indices: \[100\].*vocabulary size 100"):
        unipeft.apply(make("bert"), "trainable_tokens", token_indices=[3, 100])


def test_vision_and_projections_are_refused() -> None:
    with pytest.raises(unipeft.TargetError, match=r"patch_embed\.proj.*takes pixels, not ids"):
        unipeft.apply(make("vit"), "trainable_tokens", token_indices=[1], targets=["embed"])
    with pytest.raises(unipeft.TargetError, match=r"match nothing on VisionTransformer"):
        unipeft.apply(make("vit"), "trainable_tokens", token_indices=[1])
    with pytest.raises(unipeft.TargetError, match=r"attn\.q.*token-embedding table"):
        unipeft.apply(make("bert"), "trainable_tokens", token_indices=[1], targets=["attn.q"])
