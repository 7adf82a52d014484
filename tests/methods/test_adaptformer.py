"""AdaptFormer: the adapted timm ViT against the block maths written out (AdaptMLP beside
each MLP, on the MLP's input), BERT against plain torch hooks, the options (learned scale,
LayerNorm in/out), several adapters, identity at init, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from _vision_ref import IMAGES, close, randomise, tiny_vit, vit_tokens  # noqa: E402

import unipeft  # noqa: E402
from unipeft.contract.errors import TargetError  # noqa: E402


def _adapt_mlp(delta, scale: float, layernorm: str = "none"):
    """AdaptMLP written out from the delta's tensors (eval: no dropout)."""
    dw, db = delta.down.weight.detach(), delta.down.bias.detach()
    uw, ub = delta.up.weight.detach(), delta.up.bias.detach()
    norm = delta.norm

    def f(h):
        if layernorm == "in":
            h = F.layer_norm(h, h.shape[-1:], norm.weight, norm.bias, norm.eps)
        out = F.linear(F.relu(F.linear(h, dw, db)), uw, ub) * scale
        if layernorm == "out":
            out = F.layer_norm(out, out.shape[-1:], norm.weight, norm.bias, norm.eps)
        return out

    return f


def _vit_out(model):
    with torch.no_grad():
        return model.base_model.forward_features(IMAGES)


@pytest.mark.parametrize("layernorm", ["none", "in", "out"])
def test_vit_matches_reference(layernorm: str) -> None:
    vit = tiny_vit()
    base_out = vit_tokens(vit, IMAGES)
    model = unipeft.apply(copy.deepcopy(vit), "adaptformer", bottleneck=8, layernorm=layernorm)
    adapter = model.adapters["default"]
    assert [s.name for s in adapter.sites] == ["blocks.0:mlp", "blocks.1:mlp"]
    close(_vit_out(model), base_out, "adaptformer at init vs base")  # identity at init
    randomise(model.deltas.parameters(), seed=1)
    extra = 2 * 32 if layernorm != "none" else 0
    assert model.num_trainable_parameters() == 2 * (32 * 8 + 8 + 8 * 32 + 32 + extra)
    beside = {
        (i, "mlp"): _adapt_mlp(adapter.delta_at(f"blocks.{i}:mlp"), 0.1, layernorm)
        for i in range(2)
    }
    want = vit_tokens(vit, IMAGES, beside=beside)
    close(_vit_out(model), want, f"adaptformer (layernorm={layernorm}) vs reference", base=base_out)


def test_learnable_scale_and_two_adapters() -> None:
    vit = tiny_vit()
    model = unipeft.apply(copy.deepcopy(vit), "adaptformer", bottleneck=4, learnable_scale=True)
    model.add_adapter("b", "adaptformer", bottleneck=6, scale=0.5)
    assert model.adapters["default"].num_parameters() == 2 * (32 * 4 + 4 + 4 * 32 + 32 + 1)
    randomise(model.deltas.parameters(), seed=2)
    model.set_active(["default", "b"])
    a, b = model.adapters["default"], model.adapters["b"]
    beside = {}
    for i in range(2):
        da = a.delta_at(f"blocks.{i}:mlp")
        fa = _adapt_mlp(da, da.learned_scale.item())
        fb = _adapt_mlp(b.delta_at(f"blocks.{i}:mlp"), 0.5)
        beside[(i, "mlp")] = lambda h, fa=fa, fb=fb: fa(h) + fb(h)
    close(_vit_out(model), vit_tokens(vit, IMAGES, beside=beside), "two adaptformers")


def test_bert_against_torch_hooks() -> None:
    """On a text model: beside BERT's FFN (intermediate -> output.dense), fed with its input."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    model = unipeft.apply(copy.deepcopy(bert), "adaptformer", bottleneck=8, scale=0.3)
    randomise(model.deltas.parameters(), seed=3)
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    ref = copy.deepcopy(bert)
    handles = []
    for i, layer in enumerate(ref.encoder.layer):
        f = _adapt_mlp(model.adapters["default"].delta_at(f"encoder.layer.{i}:mlp"), 0.3)
        seen = {}
        handles.append(
            layer.intermediate.register_forward_pre_hook(
                lambda m, a, seen=seen: seen.update(h=a[0])
            )
        )
        handles.append(
            layer.output.dense.register_forward_hook(
                lambda m, a, y, f=f, seen=seen: y + f(seen["h"])
            )
        )
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        base_out = bert(input_ids=ids).last_hidden_state
    close(got, want, "adaptformer on BERT vs torch hooks", base=base_out)


def test_dropout_only_in_training() -> None:
    model = unipeft.apply(tiny_vit(), "adaptformer", bottleneck=8, dropout=0.5)
    randomise(model.deltas.parameters(), seed=1)
    model.train()
    with torch.no_grad():
        a, b = model(IMAGES), model(IMAGES)
    assert not torch.equal(a, b), "dropout 0.5 in training changed nothing"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(IMAGES), model(IMAGES))


def test_refusals() -> None:
    with pytest.raises(TargetError, match="convolution"):
        unipeft.apply(tiny_vit(), "adaptformer", targets=["embed"])
    with pytest.raises(unipeft.ConfigError, match="bottleneck"):
        unipeft.apply(tiny_vit(), "adaptformer", bottleneck=0)
    with pytest.raises(unipeft.MergeError, match="cannot be merged"):
        unipeft.apply(tiny_vit(), "adaptformer").merge()
