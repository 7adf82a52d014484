"""Recurrent backbones (nn.LSTM, nn.GRU, nn.RNN): the structure map's sites, the recurrent
host against a plain computation with the adapted weights, merging into the packed
weights, mixed batches, saving, and the refusals that name the site kind."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import unipeft
from unipeft.contract.errors import TargetError
from unipeft.maps import LayoutMap
from unipeft.maps.recurrent import RECURRENT_TINY, RecurrentClassifier, RecurrentMap
from unipeft.runtime.registry import registry

TINY = {bb.name: bb for bb in RECURRENT_TINY}


def _perturb(model: unipeft.DeltaModel, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _with_deltas(plain: nn.Module, model: unipeft.DeltaModel) -> nn.Module:
    """``plain`` (an unadapted copy of the backbone) with each LoRA delta's ``ΔW`` of
    ``model`` added to its packed weights: the reference computation."""
    with torch.no_grad():
        for att in model.get_adapter(model.active_adapters[0]).attachments:
            rnn = plain.get_submodule(att.site.path) if att.site.path else plain
            getattr(rnn, att.site.weight.weight_name).add_(att.delta.delta_weight())
    return plain


# ------------------------------------------------------------------------------- the map


def test_tiny_lstm_sites_cover_every_layer_direction_and_weight() -> None:
    model = TINY["lstm"].make()
    assert registry().pick_map(model).name == "recurrent"
    sites = {s.name: s for s in unipeft.inspect_sites(model) if s.role in ("rnn.ih", "rnn.hh")}
    expected = {
        f"rnn.weight_{part}_l{layer}{d}"
        for part in ("ih", "hh")
        for layer in (0, 1)
        for d in ("", "_reverse")
    }
    assert set(sites) == expected
    for name, site in sites.items():
        part = "ih" if "_ih_" in name else "hh"
        assert site.role == f"rnn.{part}"
        assert site.layer == int(name.split("_l")[1][0])
        assert site.module is model.rnn and site.host is model.rnn
        assert site.weight.bias_name == site.weight.weight_name.replace("weight", "bias")
        w = getattr(model.rnn, site.weight.weight_name)
        assert (site.features, site.in_features) == tuple(w.shape)
        assert site.merged_form_only and "nn.LSTM" in site.merged_form_only
    embed = [s for s in unipeft.inspect_sites(model) if s.role == "embed"]
    assert [s.module for s in embed] == [model.embed_tokens]


def test_realistic_configurations_read_their_shapes() -> None:
    lstm = nn.LSTM(128, 256, num_layers=3, bidirectional=True)
    sites = {s.name: s for s in RecurrentMap().sites(nn.Sequential(lstm))}
    assert len(sites) == 3 * 2 * 2
    assert (sites["0.weight_ih_l0"].in_features, sites["0.weight_ih_l0"].features) == (128, 1024)
    # deeper layers read both directions of the layer below
    assert sites["0.weight_ih_l2_reverse"].in_features == 512
    assert sites["0.weight_hh_l1"].in_features == 256
    gru = RecurrentMap().sites(nn.GRU(64, 96, num_layers=2))
    assert {(s.name, s.features) for s in gru if s.role == "rnn.hh"} == {
        ("weight_hh_l0", 288),
        ("weight_hh_l1", 288),
    }
    proj = {s.name: s for s in RecurrentMap().sites(nn.LSTM(8, 12, proj_size=5))}
    assert proj["weight_hh_l0"].in_features == 5 and proj["weight_hh_l0"].features == 48


def test_map_order_and_what_it_does_not_match() -> None:
    maps = registry().sorted_maps()
    names = [m.name for m in maps]
    assert names.index("recurrent") < names.index("generic")
    for other in maps:
        if isinstance(other, LayoutMap):  # transformer maps come first
            assert names.index(other.name) < names.index("recurrent")
    assert not RecurrentMap().matches(nn.Sequential(nn.Linear(3, 3)))

    class OwnForward(nn.LSTM):  # a forward of its own may not read the packed weights
        def forward(self, x, hx=None):  # type: ignore[override]
            return super().forward(x, hx)

    assert not RecurrentMap().matches(OwnForward(3, 3))


# ------------------------------------------------------------------------------- the host


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_lora_by_default_equals_the_adapted_weights_and_trains(name: str) -> None:
    bb = TINY[name]
    inputs = bb.sample(0)
    # frozen, as the adapted model's backbone: CPU kernels differ with and without gradients
    base = bb.run(bb.make().requires_grad_(False), inputs)
    model = unipeft.apply(bb.make(), "lora", r=2)
    roles = {model.get_adapter("default").attachments[i].site.role for i in range(2)}
    assert roles <= {"rnn.ih", "rnn.hh"}
    # 2 layers x (2 directions for the LSTM) x (input, recurrent)
    assert len(model.get_adapter("default").attachments) == (8 if name == "lstm" else 4)
    _perturb(model)
    out = bb.run(model, inputs)
    reference = bb.run(_with_deltas(bb.make(), model), inputs)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert (out - base).abs().max() > 1e-3  # the delta does something
    weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    out.square().sum().backward()
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0
    for n, p in model.base_model.named_parameters():
        assert torch.equal(p, weights[n]), f"{n} changed on the forward pass"
    with model.disable():
        assert torch.equal(bb.run(model, inputs), base)


@pytest.mark.parametrize(
    ("method", "config"),
    [("lora", {}), ("dora", {}), ("ia3", {}), ("bitfit", {}), ("ssf", {}), ("oft", {"r": 4})],
)
def test_train_then_merge_equals_unmerged(method: str, config: dict) -> None:
    bb = TINY["lstm"]
    inputs = bb.sample(1)
    model = unipeft.apply(bb.make(), method, **config)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        loss = bb.run(model, bb.sample(step)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        unmerged = bb.run(model, inputs)
        rnn = model.base_model.rnn
        before = {n: p.detach().clone() for n, p in rnn.named_parameters()}
        model.merge()
        # merged into the layer's own packed parameters, which its kernel reads
        assert any(not torch.equal(p, before[n]) for n, p in rnn.named_parameters())
        merged = bb.run(model, inputs)
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
        plain = bb.run(model.base_model, inputs)  # the bare backbone, weights merged
        torch.testing.assert_close(plain, unmerged, rtol=1e-4, atol=1e-5)
        model.unmerge()
        assert all(torch.equal(p, before[n]) for n, p in rnn.named_parameters())


def test_mixed_batch_with_hidden_state_matches_each_adapter() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True)  # (L, N, H) layout, hx given
    model = unipeft.DeltaModel(lstm)
    model.add_adapter("a", "lora", r=2)
    model.add_adapter("b", "ia3")
    _perturb(model)
    x = torch.randn(4, 3, 6)
    hx = (torch.randn(4, 3, 5), torch.randn(4, 3, 5))
    names = ["b", "__base__", "a"]
    with model.mixed_batch(names):
        out, (h, c) = model(x, hx)
    for i, name in enumerate(names):
        sample = (x[:, i : i + 1], (hx[0][:, i : i + 1], hx[1][:, i : i + 1]))
        if name == "__base__":
            with model.disable():
                ref, (rh, rc) = model(*sample)
        else:
            model.set_active(name)
            ref, (rh, rc) = model(*sample)
        torch.testing.assert_close(out[:, i : i + 1], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h[:, i : i + 1], rh, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c[:, i : i + 1], rc, rtol=1e-5, atol=1e-6)


def test_packed_sequences_run_with_one_adapter_and_are_refused_mixed() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(4, 3, batch_first=True)
    model = unipeft.apply(gru, "lora", r=2)
    _perturb(model)
    x = torch.randn(2, 5, 4)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    _, h_packed = model(packed)
    _, h_short = model(x[1:, :3])  # the shorter sequence alone, unpadded
    torch.testing.assert_close(h_packed[:, 1:], h_short, rtol=1e-5, atol=1e-6)
    with model.disable():
        _, h_base = model(packed)
    assert (h_packed - h_base).abs().max() > 1e-4
    with (
        pytest.raises(ValueError, match="PackedSequence"),
        model.mixed_batch(["default", "default"]),
    ):
        model(packed)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
def test_lstm_with_projection_adapts_its_input_and_recurrent_weights() -> None:
    torch.manual_seed(0)
    rnn = nn.LSTM(6, 8, proj_size=3, batch_first=True)
    backbone = RecurrentClassifier(rnn)
    plain = copy.deepcopy(backbone)
    model = unipeft.apply(backbone, "lora", r=2)
    assert {a.site.in_features for a in model.get_adapter("default").attachments} == {6, 3}
    _perturb(model)
    ids = torch.randint(0, 50, (2, 4))
    out = model(ids)[0]
    torch.testing.assert_close(out, _with_deltas(plain, model)(ids)[0], rtol=1e-5, atol=1e-6)


def test_save_and_load_onto_a_fresh_backbone(tmp_path) -> None:
    bb = TINY["gru"]
    model = unipeft.apply(bb.make(), "lora", r=2)
    _perturb(model)
    inputs = bb.sample(0)
    out = bb.run(model, inputs)
    model.save(str(tmp_path / "a"))
    again = unipeft.load(bb.make(), str(tmp_path / "a"))
    assert torch.equal(bb.run(again, inputs), out)
    back = again.unload()
    assert "forward" not in back.rnn.__dict__


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("method", ["bottleneck_adapter", "moe_lora", "prompt_tuning"])
def test_methods_without_a_merged_form_are_refused_naming_the_site_kind(method: str) -> None:
    with pytest.raises(TargetError) as info:
        unipeft.apply(TINY["lstm"].make(), method, targets=["rnn.ih"])
    text = str(info.value)
    assert "recurrent weight of nn.LSTM" in text and "merged-weight form" in text
    assert repr(method) in text and "'rnn.weight_ih_l0'" in text
    # by default: the method's own targets, which name the roles this backbone has
    with pytest.raises(TargetError, match=r"matches nothing .* rnn\.hh \(x4\), rnn\.ih \(x4\)"):
        unipeft.apply(TINY["lstm"].make(), method)


def test_a_bias_on_a_layer_built_without_one_is_refused_clearly() -> None:
    model = unipeft.apply(nn.GRU(4, 3, bias=False), "ssf")
    _perturb(model)
    with pytest.raises(RuntimeError, match="bias=False"):
        model(torch.randn(5, 2, 4))
    lora = unipeft.apply(nn.GRU(4, 3, bias=False), "lora", r=2)
    _perturb(lora)
    assert lora(torch.randn(5, 2, 4))[0].shape == (5, 2, 3)


def test_a_plain_rnn_at_the_root_runs_its_effective_weights() -> None:
    torch.manual_seed(0)
    rnn = nn.RNN(5, 7, num_layers=2, nonlinearity="relu")
    plain = copy.deepcopy(rnn)
    model = unipeft.apply(rnn, "lora", r=2)
    assert {a.site.name for a in model.get_adapter("default").attachments} == {
        "weight_ih_l0",
        "weight_hh_l0",
        "weight_ih_l1",
        "weight_hh_l1",
    }
    _perturb(model)
    x = torch.randn(3, 2, 5)
    with torch.no_grad():
        for att in model.get_adapter("default").attachments:
            getattr(plain, att.site.weight.weight_name).add_(att.delta.delta_weight())
    out, h = model(x)
    ref, ref_h = plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-6)
