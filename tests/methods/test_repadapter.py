"""RepAdapter: the adapted timm ViT against the block maths written out (a linear adapter,
the paper's grouped 1x1 convolutions, on the input of qkv and fc1), BERT against plain torch
hooks (one adapter shared by query, key and value), re-parameterisation (merged output ==
unmerged, the folded weights are W (I + s U D), unmerge exact), refusals."""

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


def _rep(adapter, scale: float, groups: int):
    """``x + s · (U (D x + b_D) + b_U)`` as the paper's code writes it: two 1x1 Conv1d on
    ``(B, C, N)``, the second grouped (eval: no dropout)."""
    dw, db = adapter.down.weight.detach(), adapter.down.bias.detach()
    conv_w = _grouped_conv_weight(adapter, groups)
    ub = adapter.up_bias.detach()

    def f(x):
        t = x.transpose(1, 2)
        t = F.conv1d(t, dw[:, :, None], db)
        t = F.conv1d(t, conv_w, ub, groups=groups)
        return x + scale * t.transpose(1, 2)

    return f


def _blocks(adapter, groups: int) -> list:
    """The diagonal blocks ``(d/g, h/g)`` of ``U`` (stored side by side, ``(d/g, h)``)."""
    return adapter.up_weight.detach().chunk(groups, dim=1)


def _grouped_conv_weight(adapter, groups: int):
    """``U`` as the weight ``(d, h/g, 1)`` of the paper's grouped ``nn.Conv1d``."""
    return torch.cat(_blocks(adapter, groups), dim=0)[:, :, None]


def _vit_out(model):
    with torch.no_grad():
        return model.base_model.forward_features(IMAGES)


def _adapters(model, name: str = "default"):
    return model.adapters[name].shared.adapters


@pytest.mark.parametrize("groups", [1, 4])
def test_vit_matches_reference_and_merges(groups: int) -> None:
    vit = tiny_vit()
    base_out = vit_tokens(vit, IMAGES)
    model = unipeft.apply(copy.deepcopy(vit), "repadapter", hidden=8, groups=groups, scale=0.7)
    close(_vit_out(model), base_out, "repadapter at init vs base")
    banks = _adapters(model)
    assert sorted(banks) == ["layer0_attn_in", "layer0_mlp_in", "layer1_attn_in", "layer1_mlp_in"]
    assert model.num_trainable_parameters() == 4 * (32 * 8 + 8 + 32 * 8 // groups + 32)
    randomise(model.deltas.parameters(), seed=1)
    before = {(i, "qkv"): _rep(banks[f"layer{i}_attn_in"], 0.7, groups) for i in range(2)}
    before.update({(i, "fc1"): _rep(banks[f"layer{i}_mlp_in"], 0.7, groups) for i in range(2)})
    want = vit_tokens(vit, IMAGES, before=before)
    got = _vit_out(model)
    close(got, want, f"repadapter (groups={groups}) vs reference", base=base_out)

    # re-parameterisation: W' = W (I + s U D), b' = b + s W (U b_D + b_U)
    w0 = vit.blocks[1].attn.qkv.weight.detach()
    b0 = vit.blocks[1].attn.qkv.bias.detach()
    a = banks["layer1_attn_in"]
    u = torch.block_diag(*_blocks(a, groups))
    m = 0.7 * u @ a.down.weight.detach()
    c = 0.7 * (u @ a.down.bias.detach() + a.up_bias.detach())
    state = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    model.merge()
    close(_vit_out(model), got, f"repadapter (groups={groups}) merged vs unmerged")
    sd = model.base_model.state_dict()
    diff_w = (sd["blocks.1.attn.qkv.weight"] - w0 @ (torch.eye(32) + m)).abs().max().item()
    diff_b = (sd["blocks.1.attn.qkv.bias"] - (b0 + w0 @ c)).abs().max().item()
    print(f"merged qkv weight vs W (I + sUD): {diff_w:.3e}; bias: {diff_b:.3e}")
    assert diff_w < 1e-6 and diff_b < 1e-6
    model.unmerge()
    for k, v in model.base_model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} not restored bit for bit by unmerge"


def test_whole_qkv_module_target() -> None:
    """PEFT-style module targets: one adapter before the fused qkv Linear (the paper's
    placement on timm), the same maths as the shared adapter of the q/k/v slices."""
    vit = tiny_vit()
    targets = [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]
    model = unipeft.apply(copy.deepcopy(vit), "repadapter", targets=targets, dropout=0.0)
    banks = _adapters(model)
    names = [f"blocks__{i}__{m}" for i in range(2) for m in ("attn__qkv", "mlp__fc1")]
    assert sorted(banks) == names
    randomise(model.deltas.parameters(), seed=2)
    before = {(i, "qkv"): _rep(banks[f"blocks__{i}__attn__qkv"], 1.0, 2) for i in range(2)}
    before.update({(i, "fc1"): _rep(banks[f"blocks__{i}__mlp__fc1"], 1.0, 2) for i in range(2)})
    got = _vit_out(model)
    close(got, vit_tokens(vit, IMAGES, before=before), "repadapter on whole qkv vs reference")
    model.merge()
    close(_vit_out(model), got, "repadapter on whole qkv merged vs unmerged")


def test_bert_shares_one_adapter_for_qkv() -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    model = unipeft.apply(copy.deepcopy(bert), "repadapter", scale=0.5)
    assert len(model.adapters["default"].sites) == 8  # q, k, v, up in two layers
    assert model.num_trainable_parameters() == 4 * (32 * 8 + 8 + 32 * 4 + 32)  # 4 adapters
    randomise(model.deltas.parameters(), seed=3)
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    ref = copy.deepcopy(bert)
    banks = _adapters(model)
    for i, layer in enumerate(ref.encoder.layer):
        fa, fm = _rep(banks[f"layer{i}_attn_in"], 0.5, 2), _rep(banks[f"layer{i}_mlp_in"], 0.5, 2)
        sa = layer.attention.self
        for proj in (sa.query, sa.key, sa.value):
            proj.register_forward_pre_hook(lambda m, a, f=fa: (f(a[0]),))
        layer.intermediate.dense.register_forward_pre_hook(lambda m, a, f=fm: (f(a[0]),))
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        base_out = bert(input_ids=ids).last_hidden_state
    close(got, want, "repadapter on BERT vs torch hooks", base=base_out)
    model.merge()
    with torch.no_grad():
        close(model(input_ids=ids).last_hidden_state, got, "repadapter on BERT merged")


def test_save_load_and_two_adapters(tmp_path) -> None:
    vit = tiny_vit()
    model = unipeft.apply(copy.deepcopy(vit), "repadapter", hidden=4)
    model.add_adapter("b", "repadapter", hidden=12, groups=4, targets=["mlp.up"])
    randomise(model.deltas.parameters(), seed=4, scale=0.3)
    model.set_active(["default", "b"])
    got = _vit_out(model)
    model.save(tmp_path)
    loaded = unipeft.load(copy.deepcopy(vit), tmp_path)
    assert torch.equal(_vit_out(loaded), got)
    a, b = _adapters(model), _adapters(model, "b")
    before = {(i, "qkv"): _rep(a[f"layer{i}_attn_in"], 1.0, 2) for i in range(2)}
    for i in range(2):  # unmerged, two adapters on fc1 add their changes: W (x + a1 + a2)
        fa, fb = _rep(a[f"layer{i}_mlp_in"], 1.0, 2), _rep(b[f"layer{i}_mlp_in"], 1.0, 4)
        before[(i, "fc1")] = lambda x, fa=fa, fb=fb: fa(x) + fb(x) - x
    close(got, vit_tokens(vit, IMAGES, before=before), "two repadapters vs reference")


def test_refusals() -> None:
    with pytest.raises(TargetError, match="convolution"):
        unipeft.apply(tiny_vit(), "repadapter", targets=["embed"])
    with pytest.raises(unipeft.ConfigError, match="groups"):
        unipeft.apply(tiny_vit(), "repadapter", hidden=6, groups=3)  # 3 does not divide 32


def test_hidden_not_a_multiple_of_groups() -> None:
    """Any hidden width is valid (the budget planner searches it): the hidden columns are
    split into groups as evenly as they go, here 3 + 2."""
    vit = tiny_vit()
    model = unipeft.apply(copy.deepcopy(vit), "repadapter", hidden=5, groups=2, dropout=0.0)
    assert model.num_trainable_parameters() == 4 * (32 * 5 + 5 + 16 * 5 + 32)
    randomise(model.deltas.parameters(), seed=5)
    a = _adapters(model)["layer0_attn_in"]
    u = a.up_dense().detach()
    assert u[:16, 3:].abs().sum() == 0 and u[16:, :3].abs().sum() == 0
    assert u[:16, :3].abs().min() > 0 and u[16:, 3:].abs().min() > 0
    got = _vit_out(model)
    model.merge()
    close(_vit_out(model), got, "repadapter (hidden=5, groups=2) merged vs unmerged")
    plan = unipeft.plan_budget(copy.deepcopy(vit), "repadapter", "5%")
    assert plan.fraction <= 0.05 and plan.config["hidden"] >= 1
