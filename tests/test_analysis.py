"""unipeft.analysis: the sensitivity scores against autograd's own weight gradients, their
invariants, placement under a budget, and the spectrum helpers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import unipeft
from unipeft.analysis import (
    Auto,
    effective_rank,
    place,
    score_sites,
    scores_table,
    subspace_overlap,
)
from unipeft.analysis.sensitivity import DEFAULT_TARGETS
from unipeft.analysis.spectrum import adapter_spectra
from unipeft.contract.errors import ConfigError
from unipeft.testing.backbones import BACKBONES


def _loss(bb):  # type: ignore[no-untyped-def]
    return lambda model, batch: bb.run(model, batch).double().square().mean()


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("llama", None),
        ("gpt2", None),
        ("timm_vit", None),
        ("open_clip", None),  # nn.MultiheadAttention: in_proj slices read off its weight
        ("lstm", ["rnn.ih", "rnn.hh"]),  # packed weights, read inside the fused kernel
        ("mamba", ["ssm.in", "ssm.x", "ssm.dt", "ssm.out"]),  # dt_proj: read by the mixer
        ("resnet", ["conv.in", "conv.mid", "conv.out"]),  # convolutions
    ],
)
def test_scores_equal_autograd_weight_gradients(name: str, targets: list[str] | None) -> None:
    """On one batch, ``grad_norm`` is the norm of autograd's gradient of the site's weight
    rows (GPT-2's transposed Conv1D, timm's fused qkv slices, an MHA's in-projection slices,
    recurrent, directly-read and convolution weights included), and ``fisher`` its square."""
    bb = BACKBONES[name]
    model = bb.make().double()
    batch = bb.sample(seed=1, dtype=torch.float64)
    scores = {s.name: s for s in score_sites(model, [batch], _loss(bb), targets=targets, rank=2)}
    ref = copy.deepcopy(model)
    _loss(bb)(ref, batch).backward()
    from unipeft.analysis.sensitivity import resolve_sites

    checked = 0
    for site in resolve_sites(ref, targets):
        if site.name not in scores:
            continue
        w = site.parameter("weight")
        g = w.grad.t() if site.weight.layout == "conv1d_t" else w.grad
        if site.out_slice is not None:
            g = g[site.out_slice[0] : site.out_slice[1]]
        s = scores[site.name]
        norm = float(g.norm())
        assert s.grad_norm == pytest.approx(norm, rel=1e-6, abs=1e-12), site.name
        assert s.fisher == pytest.approx(norm**2, rel=1e-6, abs=1e-20), site.name
        checked += 1
    assert checked == len(scores) >= 4
    if name == "open_clip":
        assert {"attn.q", "attn.k", "attn.v", "attn.out"} <= {s.role for s in scores.values()}


def test_score_invariants_and_the_model_left_as_it_was() -> None:
    bb = BACKBONES["llama"]
    model = bb.make()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    batches = [bb.sample(seed=i) for i in range(3)]
    x = bb.sample(seed=9)
    out_before = bb.run(model, x).detach()
    low = score_sites(model, batches, _loss(bb), rank=1)
    full = score_sites(model, batches, _loss(bb), rank=10_000)
    for a, b in zip(low, full):
        assert a.name == b.name
        assert 0 <= a.taylor <= b.taylor + 1e-12
        assert b.taylor == pytest.approx(b.grad_norm, rel=1e-9)  # every direction allowed
        assert a.fisher >= a.grad_norm**2 * (1 - 1e-9)  # mean of squares ≥ square of mean
    assert any(a.taylor < b.taylor for a, b in zip(low, full))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n
    assert all(not m._forward_hooks for m in model.modules())
    torch.testing.assert_close(bb.run(model, x), out_before)
    rows = scores_table(low)
    assert sorted(r["taylor_rank"] for r in rows) == list(range(1, len(rows) + 1))


def test_scoring_by_weight_gradients_puts_flags_and_gradients_back() -> None:
    """Sites scored off their weight's gradient (an MHA's in-projection) take gradients only
    during scoring: every flag and every ``.grad`` a user had is as before."""
    bb = BACKBONES["open_clip"]
    model = bb.make()
    params = dict(model.named_parameters())
    mine = {n: torch.full_like(p, 0.5) for n, p in list(params.items())[::3]}
    for n, g in mine.items():
        params[n].grad = g
    flags = {n: p.requires_grad for n, p in params.items()}
    scores = score_sites(model, [bb.sample(seed=i) for i in range(2)], _loss(bb))
    assert any(s.role == "attn.q" for s in scores)
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n], n
        assert (p.grad is mine[n]) if n in mine else p.grad is None, n
    assert all(not m._forward_hooks for m in model.modules())


def test_placement_on_clip_reaches_mha_slices() -> None:
    bb = BACKBONES["open_clip"]
    model = bb.make()
    scores = score_sites(model, [bb.sample(seed=i) for i in range(2)], _loss(bb))
    placed = place(model, scores, "lora", 0.05, r=2)
    adapted = unipeft.apply(model, "lora", targets=placed.targets, r=2)
    sites = adapted.adapters["default"].sites
    assert sorted(s.name for s in sites) == sorted(placed.sites)
    assert adapted.num_trainable_parameters() == placed.parameters <= 0.05 * placed.total
    assert any(s.role in ("attn.q", "attn.k", "attn.v") for s in sites)


def test_placement_fits_the_budget_and_reaches_exactly_its_sites() -> None:
    bb = BACKBONES["llama"]
    model = bb.make()
    scores = score_sites(model, [bb.sample(seed=i) for i in range(2)], _loss(bb), rank=2)
    small = place(model, scores, "lora", 0.02, r=2)
    large = place(model, scores, "lora", 0.06, r=2)
    total = sum(p.numel() for p in model.parameters())
    assert small.parameters <= 0.02 * total and large.parameters <= 0.06 * total
    assert 0 < small.parameters < large.parameters
    adapted = unipeft.apply(copy.deepcopy(model), "lora", r=2, targets=small.targets)
    got = sorted(a.site.name for a in adapted.adapters["default"].attachments)
    assert got == sorted(small.sites)
    assert (
        unipeft.count_trainable(adapted) == small.parameters
        if hasattr(unipeft, "count_trainable")
        else sum(p.numel() for p in adapted.parameters() if p.requires_grad) == small.parameters
    )
    best = max(scores, key=lambda s: s.taylor / (2 * (s.in_features + s.out_features)))
    assert best.name in small.sites  # the best score per parameter always goes first
    with pytest.raises(ConfigError, match="cheapest site needs"):
        place(model, scores, "lora", 1e-6, r=2)
    with pytest.raises(ConfigError, match="score 'nope'"):
        place(model, scores, "lora", 0.02, score="nope", r=2)


def test_bad_calibration_input_is_refused() -> None:
    bb = BACKBONES["llama"]
    model = bb.make()
    with pytest.raises(ConfigError, match="batches is empty"):
        score_sites(model, [], _loss(bb))
    with pytest.raises(ConfigError, match="scalar loss"):
        score_sites(model, [bb.sample()], lambda m, b: bb.run(m, b))
    with pytest.raises(ConfigError, match="rank=0"):
        score_sites(model, [bb.sample()], _loss(bb), rank=0)


def test_spectrum_helpers_on_known_matrices() -> None:
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(12, 1, generator=g), torch.randn(1, 9, generator=g)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert effective_rank(torch.zeros(4, 4)) == 0.0
    a = torch.randn(12, 9, generator=g)
    assert subspace_overlap(a, a, 3, 3) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    b1 = q[:, :3] @ torch.randn(3, 9, generator=g)
    b2 = q[:, 3:6] @ torch.randn(3, 9, generator=g)
    assert subspace_overlap(b1, b2, 3, 3) == pytest.approx(0.0, abs=1e-10)
    assert subspace_overlap(b1, b1 + 1e-9 * b2, 3, 6) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ConfigError):
        subspace_overlap(a, a, 0, 1)


def test_adapter_spectra_of_a_lora() -> None:
    bb = BACKBONES["llama"]
    model = unipeft.apply(bb.make(), "lora", r=2, targets=["attn.q", "attn.v"])
    with torch.no_grad():
        for att in model.adapters["default"].attachments:
            att.delta.B.normal_(0, 0.1)
    rows = adapter_spectra(model)
    assert len(rows) == len(model.adapters["default"].attachments)
    for r in rows:
        assert 1.0 <= r["effective_rank"] <= 2.0 + 1e-6  # a rank-2 update
        assert r["norm"] > 0 and len(r["top_singular_values"]) >= 2
        assert r["top_singular_values"][2:] == pytest.approx(
            [0.0] * (len(r["top_singular_values"]) - 2), abs=1e-6
        )


def test_analyze_command_writes_scores_placement_and_heatmap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from unipeft.cli import app

    rows = ["text,label"] + [
        f"{'good fine' if i % 2 else 'bad poor'} film {i},{'pos' if i % 2 else 'neg'}"
        for i in range(32)
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "run.yaml").write_text(
        "model: tiny:bert\ndata: {path: train.csv}\nmethod: lora\nconfig: {r: 2}\n"
        "budget: 2%\ntrainer: {steps: 5, batch_size: 8}\noutput_dir: out\n"
    )
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["analyze", str(tmp_path / "run.yaml"), "--batches", "2", "--output", str(tmp_path / "a")],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert len(data["scores"]) == 12 and data["calibration"]["examples"] == 16
    assert 0 < data["placement"]["fraction"] <= 0.02
    assert (tmp_path / "a" / "heatmap-taylor.png").stat().st_size > 1000
    assert "placement of lora" in res.output
    assert not (tmp_path / "out").exists()  # analysis writes no run folder
    bad = runner.invoke(app, ["analyze", str(tmp_path / "run.yaml"), "--score", "x"])
    assert bad.exit_code == 2 and "score 'x' is not one of" in bad.output
    probed = runner.invoke(
        app,
        [
            "analyze", str(tmp_path / "run.yaml"), "--batches", "2", "--score", "probe",
            "--by", "role", "--probe-steps", "2", "--output", str(tmp_path / "p"),
        ],
    )  # fmt: skip
    assert probed.exit_code == 0, probed.output
    data = json.loads((tmp_path / "p" / "analysis.json").read_text())
    assert data["calibration"] | {"by": "role", "probe_steps": 2} == data["calibration"]
    assert all(row["probe"] > 0 for row in data["scores"])
    assert all(t.endswith("[0,1]") for t in data["placement"]["targets"])  # whole roles
    assert data["placement"]["by"] == "role" and data["placement"]["score"] == "probe"
    assert (tmp_path / "p" / "heatmap-probe.png").stat().st_size > 1000


def test_auto_targets_place_the_method_inside_apply(tmp_path: Path) -> None:
    """``targets=Auto(...)`` attaches where ``place`` puts the method on the same scores; the
    adapter records plain role targets, so it saves and loads without the batches."""
    bb = BACKBONES["llama"]
    batches = [bb.sample(seed=i) for i in range(2)]
    backbone = bb.make()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = unipeft.apply(backbone, "lora", targets=Auto(batches, _loss(bb), budget=0.02), r=2)
    scores = score_sites(bb.make(), batches, _loss(bb), rank=2)
    placed = place(bb.make(), scores, "lora", 0.02, r=2)
    adapter = model.adapters["default"]
    assert sorted(s.name for s in adapter.sites) == sorted(placed.sites)
    assert list(adapter.targets) == placed.targets
    assert all(isinstance(t, str) for t in placed.targets)
    assert model.num_trainable_parameters() == placed.parameters <= 0.02 * placed.total
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in before.items())
    model.save(tmp_path)
    loaded = unipeft.load(bb.make(), tmp_path)
    assert sorted(s.name for s in loaded.adapters["default"].sites) == sorted(placed.sites)


def test_auto_as_a_string_is_refused_with_the_way_to_ask_for_it() -> None:
    bb = BACKBONES["llama"]
    with pytest.raises(unipeft.TargetError, match=r"targets=unipeft\.analysis\.Auto\(batches"):
        unipeft.apply(bb.make(), "lora", targets="auto")
    with pytest.raises(ConfigError, match="no site fits a budget"):
        unipeft.apply(bb.make(), "lora", targets=Auto([bb.sample(0)], _loss(bb), budget=1e-7))


def test_the_probe_score_is_a_trained_loras_sensitivity_and_leaves_no_trace() -> None:
    """``probe`` equals AdaLoRA's sensitivity ``Σ|θ·∂L/∂θ|`` of a LoRA trained by hand with
    the same steps, averaged over the batches; the backbone, its flags, gradients and hooks
    and the global random state are as they were."""
    bb = BACKBONES["llama"]
    model = bb.make()
    batches = [bb.sample(seed=i) for i in range(3)]
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    rng = torch.random.get_rng_state()
    scores = score_sites(model, batches, _loss(bb), rank=2, probe_steps=4, probe_lr=1e-2)
    assert torch.equal(torch.random.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n
        assert p.grad is None, n
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    torch.manual_seed(0)
    hand = unipeft.apply(bb.make(), "lora", r=2, alpha=2, targets=list(DEFAULT_TARGETS))
    hand.eval()
    per_site = {
        a.site.name: list(a.delta.parameters()) for a in hand.adapters["default"].attachments
    }
    opt = torch.optim.Adam([p for ps in per_site.values() for p in ps], lr=1e-2)
    for batch in [*batches, batches[0]]:  # 4 steps over the 3 batches, cycled
        opt.zero_grad()
        _loss(bb)(hand, batch).backward()
        opt.step()
    want = dict.fromkeys(per_site, 0.0)
    for batch in batches:
        opt.zero_grad()
        _loss(bb)(hand, batch).backward()
        for name, ps in per_site.items():
            want[name] += sum(float((p.detach() * p.grad).abs().sum()) for p in ps) / len(batches)
    assert {s.name for s in scores} == set(want)
    for s in scores:
        assert s.probe == pytest.approx(want[s.name], rel=1e-5), s.name
        assert s.probe > 0
    assert len({round(s.probe / s.taylor, 6) for s in scores}) > 1  # not the taylor order
    assert [r["probe_rank"] for r in scores_table(scores)]
    plain = score_sites(model, batches, _loss(bb), rank=2)
    assert plain[0].probe is None
    with pytest.raises(ConfigError, match="given probe_steps"):
        place(model, plain, "lora", 0.05, score="probe", r=2)
    with pytest.raises(ConfigError, match="probe_steps=-1"):
        score_sites(model, batches, _loss(bb), probe_steps=-1)


def test_placement_by_role_takes_whole_roles_best_per_parameter_first() -> None:
    bb = BACKBONES["llama"]
    model = bb.make()
    scores = score_sites(model, [bb.sample(seed=i) for i in range(2)], _loss(bb), rank=2)
    layers = sorted({s.layer for s in scores})
    placed = place(model, scores, "lora", 0.03, by="role", r=2)
    assert placed.parameters <= 0.03 * placed.total
    roles: dict[str, list[float]] = {}
    cost: dict[str, int] = {}
    for s in scores:
        roles.setdefault(s.role, []).append(s.taylor)
        cost[s.role] = cost.get(s.role, 0) + 2 * (s.in_features + s.out_features)
    chosen = {s.role for s in scores if s.name in placed.sites}
    assert placed.targets == [
        f"{role}[{','.join(map(str, layers))}]" for role in dict.fromkeys(roles) if role in chosen
    ]
    assert placed.parameters == sum(cost[r] for r in chosen)
    best = max(roles, key=lambda r: sum(roles[r]) / cost[r])
    assert best in chosen
    left = 0.03 * placed.total - placed.parameters
    assert all(cost[r] > left for r in roles if r not in chosen)  # nothing else still fits
    adapted = unipeft.apply(bb.make(), "lora", r=2, targets=placed.targets)
    assert sorted(s.name for s in adapted.adapters["default"].sites) == sorted(placed.sites)
    with pytest.raises(ConfigError, match="by='layer'"):
        place(model, scores, "lora", 0.03, by="layer", r=2)


def test_auto_with_the_probe_score_by_role() -> None:
    bb = BACKBONES["llama"]
    batches = [bb.sample(seed=i) for i in range(2)]
    rule = Auto(batches, _loss(bb), budget=0.03, score="probe", by="role", probe_steps=3)
    model = unipeft.apply(bb.make(), "lora", targets=rule, r=2)
    scores = score_sites(bb.make(), batches, _loss(bb), rank=2, probe_steps=3)
    placed = place(bb.make(), scores, "lora", 0.03, score="probe", by="role", r=2)
    assert list(model.adapters["default"].targets) == placed.targets
    assert model.num_trainable_parameters() == placed.parameters
