"""Adapter arithmetic (unipeft.features.arithmetic.combine) against hand-computed cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _matrix import backbones
from _state import fingerprint
from torch import Tensor

import unipeft
from unipeft import AdapterError, ConfigError, DeltaModel
from unipeft.features.arithmetic import combine, lora_factors
from unipeft.methods.reparameterized.lora import LoraDelta
from unipeft.model import site_key
from unipeft.testing.backbones import BACKBONES

BERT = BACKBONES["bert"]
Q0 = "encoder.layer.0:attn.q"  # the site of targets=["attn.q[0]"] on the tiny BERT
Q0_PATH = "encoder.layer.0.attention.self.query"
D = 32  # hidden width of the tiny BERT: ΔW at Q0 is (32, 32)


def _vec(*values: float, n: int = D) -> Tensor:
    """A length-``n`` vector starting with ``values``, zeros after."""
    out = torch.zeros(n)
    out[: len(values)] = torch.tensor(values)
    return out


def _set_lora(model: DeltaModel, name: str, b: Tensor, a: Tensor) -> None:
    """Set the LoRA factors of adapter ``name`` at Q0: ``B (32, r)``, ``A (r, 32)``."""
    delta = model.deltas[name][site_key(model.adapters[name].sites[0])]
    assert isinstance(delta, LoraDelta)
    with torch.no_grad():
        delta.B.copy_(b)
        delta.A.copy_(a)


def _hand_model() -> DeltaModel:
    """Two rank-1 LoRA adapters at Q0 whose ΔW is zero outside the top-left 2x3 block.

    ``a`` (scaling 1):  B = [1, 2]ᵀ,     A = [1, -1, 2]  ->  ΔW_a = [[1, -1, 2], [2, -2, 4]]
    ``b`` (scaling 2):  B = [1.5, -.5]ᵀ, A = [1, 2, -1]  ->  ΔW_b = [[3, 6, -3], [-1, -2, 1]]
    """
    model = unipeft.apply(
        BERT.make(), "lora", adapter_name="a", r=1, alpha=1.0, targets=["attn.q[0]"]
    )
    model.add_adapter("b", "lora", r=1, alpha=2.0, targets=["attn.q[0]"])
    _set_lora(model, "a", _vec(1, 2)[:, None], _vec(1, -1, 2)[None])
    _set_lora(model, "b", _vec(1.5, -0.5)[:, None], _vec(1, 2, -1)[None])
    return model


def _block(*rows: list[float]) -> Tensor:
    """A (32, 32) matrix with ``rows`` in its top-left corner, zeros elsewhere."""
    out = torch.zeros(D, D)
    block = torch.tensor(rows)
    out[: block.shape[0], : block.shape[1]] = block
    return out


def _dw(model: DeltaModel, name: str, site: str = Q0) -> Tensor:
    delta = model.deltas[name][site.replace(".", "__")]
    assert isinstance(delta, LoraDelta)
    with torch.no_grad():
        return delta.delta_weight()


def _exact(actual: Tensor, expected: Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


DW_A = _block([1, -1, 2], [2, -2, 4])
DW_B = _block([3, 6, -3], [-1, -2, 1])


def test_hand_model_is_what_the_docstring_says() -> None:
    model = _hand_model()
    assert torch.equal(_dw(model, "a"), DW_A)
    assert torch.equal(_dw(model, "b"), DW_B)


# --------------------------------------------------------------------------- linear


def test_linear_lora_is_exact_with_concatenated_factors() -> None:
    model = _hand_model()
    new = combine(model, {"a": 1.0, "b": 0.5}, "ab", how="linear")
    # 1·ΔW_a + 0.5·ΔW_b = [[1+1.5, -1+3, 2-1.5], [2-0.5, -2-1, 4+0.5]]
    _exact(_dw(model, "ab"), _block([2.5, 2.0, 0.5], [1.5, -3.0, 4.5]), atol=0)
    assert new.method.id == "lora"
    assert (new.config.r, new.config.alpha, new.config.use_rslora) == (2, 2.0, False)
    delta = model.deltas["ab"][site_key(new.sites[0])]
    assert delta.scaling == 1.0
    # factors: A = cat(A_a, A_b); B = cat(w_a·s_a·B_a, w_b·s_b·B_b) = cat(B_a, 1.0·B_b)
    assert torch.equal(delta.A[:, :3], torch.tensor([[1.0, -1, 2], [1, 2, -1]]))
    assert torch.equal(delta.B[:2], torch.tensor([[1.0, 1.5], [2, -0.5]]))


def test_linear_negative_weight_subtracts() -> None:
    model = _hand_model()
    combine(model, {"a": 1.0, "b": -1.0}, "a_minus_b")
    _exact(_dw(model, "a_minus_b"), DW_A - DW_B, atol=0)


def test_linear_lora_random_multi_site_sum() -> None:
    torch.manual_seed(0)
    model = unipeft.apply(BERT.make(), "lora", adapter_name="a", r=2, targets=["attn.q", "attn.v"])
    model.add_adapter("b", "lora", r=3, alpha=5.0, use_rslora=True, targets=["attn.q", "attn.v"])
    for name in ("a", "b"):
        for delta in model.deltas[name].values():
            torch.nn.init.normal_(delta.B)
    new = combine(model, {"a": 0.7, "b": 0.3}, "ab")
    assert new.config.r == 5 and len(new.sites) == 4
    for site in new.sites:
        expected = 0.7 * _dw(model, "a", site.name) + 0.3 * _dw(model, "b", site.name)
        _exact(_dw(model, "ab", site.name), expected)


def test_linear_on_bottleneck_adapters_averages_parameters() -> None:
    torch.manual_seed(0)
    model = unipeft.apply(BERT.make(), "bottleneck_adapter", adapter_name="c", bottleneck=4)
    model.add_adapter("d", "bottleneck_adapter", bottleneck=4)
    for name in ("c", "d"):
        for p in model.deltas[name].parameters():
            torch.nn.init.normal_(p)
    new = combine(model, {"c": 0.25, "d": 0.75}, "cd")
    assert new.method.id == "bottleneck_adapter" and new.config == model.adapters["c"].config
    sd = model.state_dict()
    for key, value in sd.items():
        if key.startswith("deltas.cd."):
            rest = key.removeprefix("deltas.cd.")
            expected = 0.25 * sd[f"deltas.c.{rest}"] + 0.75 * sd[f"deltas.d.{rest}"]
            _exact(value, expected, atol=1e-6)


# --------------------------------------------------------------------------- svd


def _diag_model() -> DeltaModel:
    """ΔW_a = 3·e0 e0ᵀ, ΔW_b = e1 e1ᵀ (rank 1 each): singular values known by hand."""
    model = unipeft.apply(
        BERT.make(), "lora", adapter_name="a", r=1, alpha=1.0, targets=["attn.q[0]"]
    )
    model.add_adapter("b", "lora", r=1, alpha=1.0, targets=["attn.q[0]"])
    _set_lora(model, "a", _vec(3)[:, None], _vec(1)[None])
    _set_lora(model, "b", _vec(0, 1)[:, None], _vec(0, 1)[None])
    return model


def test_svd_truncates_to_the_largest_singular_values() -> None:
    model = _diag_model()
    # Σ w ΔW = diag(3, 1): default rank = max source rank = 1 keeps σ=3 only
    new = combine(model, {"a": 1.0, "b": 1.0}, "top1", how="svd")
    assert new.config.r == 1
    _exact(_dw(model, "top1"), _block([3, 0], [0, 0]))
    combine(model, {"a": 1.0, "b": 1.0}, "top2", how="svd", rank=2)
    _exact(_dw(model, "top2"), _block([3, 0], [0, 1]))
    # weights can reorder the singular values: diag(0.75, 2) -> keep the 2
    combine(model, {"a": 0.25, "b": 2.0}, "flip", how="svd")
    _exact(_dw(model, "flip"), _block([0, 0], [0, 2]))


def test_svd_with_enough_rank_equals_the_dense_sum() -> None:
    model = _hand_model()
    new = combine(model, {"a": 1.0, "b": 0.5}, "ab", how="svd", rank=2)
    assert new.config.r == 2
    _exact(_dw(model, "ab"), _block([2.5, 2.0, 0.5], [1.5, -3.0, 4.5]))
    # the largest rank a site allows is exact; a larger one is refused, naming the limit
    combine(model, {"a": 1.0, "b": 0.5}, "full", how="svd", rank=32)
    _exact(_dw(model, "full"), _block([2.5, 2.0, 0.5], [1.5, -3.0, 4.5]))
    before = fingerprint(model)
    with pytest.raises(ConfigError, match=r"r=40 is above the largest rank .* Choose r <= 32"):
        combine(model, {"a": 1.0, "b": 0.5}, "wide", how="svd", rank=40)
    assert fingerprint(model) == before


def test_svd_truncation_error_is_eckart_young() -> None:
    model = _hand_model()
    combine(model, {"a": 1.0, "b": 0.5}, "ab1", how="svd")  # rank 1 of a rank-2 matrix
    dense = _block([2.5, 2.0, 0.5], [1.5, -3.0, 4.5]).double()
    s = torch.linalg.svdvals(dense)
    err = torch.linalg.matrix_norm(_dw(model, "ab1").double() - dense)
    torch.testing.assert_close(err, s[1], atol=1e-5, rtol=1e-5)


def test_lora_factors_reshape_conv_kernels() -> None:
    gen = torch.Generator().manual_seed(0)
    dw = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)  # (out, in, kh, kw)
    a, b = lora_factors(dw, 4)
    assert a.shape == (4, 3, 2, 2) and b.shape == (4, 4)
    torch.testing.assert_close((b @ a.reshape(4, -1)).reshape(dw.shape), dw)


# --------------------------------------------------------------------------- ties


def test_ties_hand_computed() -> None:
    model = _hand_model()
    # density 4/1024: keep the 4 largest |entries| of each 32x32 ΔW
    new = combine(model, {"a": 1.0, "b": 0.5}, "t", how="ties", density=4 / 1024)
    # trim   ΔW_a: magnitudes 1,1,2,2,2,4 -> keep >= 2        -> [[0, 0, 2], [2, -2, 4]]
    #        ΔW_b: magnitudes 3,6,3,1,2,1 -> keep >= 2        -> [[3, 6, -3], [0, -2, 0]]
    # weight c_a = 1·τ̂_a = [[0, 0, 2], [2, -2, 4]];  c_b = 0.5·τ̂_b = [[1.5, 3, -1.5], [0, -1, 0]]
    # elect  sign(c_a + c_b) = sign([[1.5, 3, 0.5], [2, -3, 4]]) = [[+, +, +], [+, -, +]]
    # mean   of the non-zero c_i agreeing with the sign:
    #        (0,0) 1.5   (0,1) 3   (0,2) 2 (c_b disagrees)   (1,0) 2   (1,1) (-2-1)/2   (1,2) 4
    _exact(_dw(model, "t"), _block([1.5, 3.0, 2.0], [2.0, -1.5, 4.0]))
    assert new.config.r == 2  # default rank: exact (the result's numerical rank)


def _ties_by_hand(taus: list[Tensor], weights: list[float], density: float) -> Tensor:
    """TIES spelled out with plain torch ops, for flat task vectors."""
    n = taus[0].numel()
    k = max(1, int(density * n + 0.5))
    trimmed = []
    for tau in taus:
        kth = tau.abs().sort(descending=True).values[k - 1]
        trimmed.append(tau * (tau.abs() >= kth))
    contrib = [w * t for w, t in zip(weights, trimmed)]
    sign = torch.sign(sum(contrib))
    num = torch.zeros(n, dtype=taus[0].dtype)
    cnt = torch.zeros(n, dtype=taus[0].dtype)
    for c in contrib:
        agrees = (torch.sign(c) == sign) & (c != 0)
        num += torch.where(agrees, c, 0.0)
        cnt += agrees
    return torch.where(cnt > 0, num / cnt.clamp(min=1), 0.0)


def test_ties_random_lora_matches_spelled_out_steps() -> None:
    torch.manual_seed(1)
    model = unipeft.apply(BERT.make(), "lora", adapter_name="a", r=2, targets=["attn.q[0]"])
    model.add_adapter("b", "lora", r=2, targets=["attn.q[0]"])
    model.add_adapter("c", "lora", r=4, alpha=2.0, targets=["attn.q[0]"])
    for name in "abc":
        torch.nn.init.normal_(next(iter(model.deltas[name].values())).B)
    weights = {"a": 0.5, "b": -0.25, "c": 1.0}
    combine(model, weights, "t", how="ties", density=0.3)
    taus = [_dw(model, n).double().flatten() for n in weights]
    expected = _ties_by_hand(taus, list(weights.values()), 0.3).reshape(D, D)
    _exact(_dw(model, "t").double(), expected)
    # with an explicit rank the result is the SVD truncation of the same matrix
    combine(model, weights, "t4", how="ties", density=0.3, rank=4)
    u, s, vh = torch.linalg.svd(expected)
    _exact(_dw(model, "t4").double(), (u[:, :4] * s[:4]) @ vh[:4])


def test_ties_on_bottleneck_adapters_works_on_parameters() -> None:
    torch.manual_seed(2)
    model = unipeft.apply(
        BERT.make(), "bottleneck_adapter", adapter_name="c", bottleneck=2, targets=["mlp[0]"]
    )
    model.add_adapter("d", "bottleneck_adapter", bottleneck=2, targets=["mlp[0]"])
    for name in ("c", "d"):
        for p in model.deltas[name].parameters():
            torch.nn.init.normal_(p)
    combine(model, {"c": 1.0, "d": 0.5}, "t", how="ties", density=0.5)
    deltas = {n: next(iter(model.deltas[n].values())) for n in ("c", "d", "t")}
    names = [n for n, _ in deltas["c"].named_parameters()]

    def flat(delta: Any) -> Tensor:
        params = dict(delta.named_parameters())
        return torch.cat([params[n].detach().double().flatten() for n in names])

    expected = _ties_by_hand([flat(deltas["c"]), flat(deltas["d"])], [1.0, 0.5], 0.5)
    _exact(flat(deltas["t"]), expected, atol=1e-6)


# --------------------------------------------------------------------------- dare


def test_dare_matches_an_independently_drawn_mask() -> None:
    model = _hand_model()
    combine(model, {"a": 1.0, "b": 0.5}, "d", how="dare", density=0.5, seed=7)
    gen = torch.Generator().manual_seed(7)
    keep_a = torch.rand(D * D, generator=gen) < 0.5  # site by site, sources in order
    keep_b = torch.rand(D * D, generator=gen) < 0.5
    expected = (
        1.0 * torch.where(keep_a, DW_A.flatten() / 0.5, 0.0)
        + 0.5 * torch.where(keep_b, DW_B.flatten() / 0.5, 0.0)
    ).reshape(D, D)
    _exact(_dw(model, "d"), expected)
    # the 2x3 block by hand for this seed, from the masks' first entries
    ka, kb = keep_a.reshape(D, D)[:2, :3], keep_b.reshape(D, D)[:2, :3]
    block = 2 * DW_A[:2, :3] * ka + 0.5 * 2 * DW_B[:2, :3] * kb
    _exact(_dw(model, "d")[:2, :3], block)


def test_dare_is_reproducible_and_seeded() -> None:
    model = _hand_model()
    combine(model, {"a": 1.0, "b": 0.5}, "d1", how="dare", density=0.5, seed=3)
    combine(model, {"a": 1.0, "b": 0.5}, "d2", how="dare", density=0.5, seed=3)
    combine(model, {"a": 1.0, "b": 0.5}, "d3", how="dare", density=0.5, seed=4)
    assert torch.equal(_dw(model, "d1"), _dw(model, "d2"))
    assert not torch.allclose(_dw(model, "d1"), _dw(model, "d3"))


def test_dare_with_density_one_is_linear() -> None:
    model = _hand_model()
    new = combine(model, {"a": 1.0, "b": 0.5}, "d", how="dare", density=1.0)
    _exact(_dw(model, "d"), _block([2.5, 2.0, 0.5], [1.5, -3.0, 4.5]))
    assert new.config.r == 2  # the exact default rank finds the rank of the sum


def test_dare_on_bottleneck_adapters_works_on_parameters() -> None:
    torch.manual_seed(3)
    model = unipeft.apply(
        BERT.make(), "bottleneck_adapter", adapter_name="c", bottleneck=2, targets=["mlp[0]"]
    )
    model.add_adapter("d", "bottleneck_adapter", bottleneck=2, targets=["mlp[0]"])
    for name in ("c", "d"):
        for p in model.deltas[name].parameters():
            torch.nn.init.normal_(p)
    combine(model, {"c": 1.0, "d": 0.5}, "x", how="dare", density=0.25, seed=5)
    deltas = {n: next(iter(model.deltas[n].values())) for n in ("c", "d", "x")}
    names = [n for n, _ in deltas["c"].named_parameters()]

    def flat(delta: Any) -> Tensor:
        params = dict(delta.named_parameters())
        return torch.cat([params[n].detach().double().flatten() for n in names])

    gen = torch.Generator().manual_seed(5)
    expected = torch.zeros_like(flat(deltas["c"]))
    for name, w in (("c", 1.0), ("d", 0.5)):
        tau = flat(deltas[name])
        keep = torch.rand(tau.numel(), generator=gen) < 0.25
        expected += w * torch.where(keep, tau / 0.25, 0.0)
    _exact(flat(deltas["x"]), expected, atol=1e-6)


# --------------------------------------------------------------------------- model output


@pytest.mark.parametrize(
    ("how", "kwargs", "expected"),
    [
        ("linear", {}, _block([2.5, 2.0, 0.5], [1.5, -3.0, 4.5])),
        ("svd", {"rank": 2}, _block([2.5, 2.0, 0.5], [1.5, -3.0, 4.5])),
        ("ties", {"density": 4 / 1024}, _block([1.5, 3.0, 2.0], [2.0, -1.5, 4.0])),
        ("dare", {"density": 1.0}, _block([2.5, 2.0, 0.5], [1.5, -3.0, 4.5])),
    ],
)
def test_combined_output_equals_backbone_with_merged_dense_delta(
    how: str, kwargs: dict[str, Any], expected: Tensor
) -> None:
    model = _hand_model()
    combine(model, {"a": 1.0, "b": 0.5}, "new", how=how, **kwargs)  # type: ignore[arg-type]
    model.set_active("new")
    reference = BERT.make()
    with torch.no_grad():
        reference.get_submodule(Q0_PATH).weight += expected
        inputs = BERT.sample(0)
        _exact(BERT.run(model, inputs), BERT.run(reference, inputs), atol=1e-4)


def test_multi_site_output_equals_merged_dense_sum() -> None:
    torch.manual_seed(4)
    model = unipeft.apply(BERT.make(), "lora", adapter_name="a", r=2, targets=["attn.q", "attn.v"])
    model.add_adapter("b", "lora", r=2, targets=["attn.q", "attn.v"])
    for name in ("a", "b"):
        for delta in model.deltas[name].values():
            torch.nn.init.normal_(delta.B, std=0.1)
    new = combine(model, {"a": 0.6, "b": 0.4}, "ab", how="svd", rank=4)
    model.set_active("ab")
    reference = BERT.make()
    with torch.no_grad():
        for site in new.sites:
            dense = 0.6 * _dw(model, "a", site.name) + 0.4 * _dw(model, "b", site.name)
            reference.get_submodule(site.path).weight += dense
        inputs = BERT.sample(1)
        _exact(BERT.run(model, inputs), BERT.run(reference, inputs), atol=1e-4)


# --------------------------------------------------------------------------- bookkeeping


def test_new_adapter_is_inactive_and_saved_like_any_other(tmp_path: Path) -> None:
    model = _hand_model()
    rng = torch.get_rng_state()
    new = combine(model, {"a": 1.0, "b": 0.5}, "ab", how="ties", density=0.01)
    assert torch.equal(torch.get_rng_state(), rng)  # combining does not consume the RNG
    assert model.active_adapters == ("a",)
    assert list(model.adapters) == ["a", "b", "ab"]
    assert new.targets == ["attn.q[0]"] and [s.name for s in new.sites] == [Q0]
    assert all(p.requires_grad for p in model.deltas["ab"].parameters())
    model.set_active("ab")
    inputs = BERT.sample(0)
    with torch.no_grad():
        out = BERT.run(model, inputs)
    model.save(str(tmp_path), ["ab"])
    reloaded = unipeft.load(BERT.make(), str(tmp_path))
    with torch.no_grad():
        _exact(BERT.run(reloaded, inputs), out, atol=0)


def test_new_adapter_becomes_active_when_none_is() -> None:
    model = _hand_model()
    model.set_active([])
    combine(model, {"a": 1.0}, "half_a", how="linear")
    assert model.active_adapters == ("half_a",)


# --------------------------------------------------------------------------- errors


def _snapshot(model: DeltaModel) -> tuple[dict[str, Tensor], list[str], tuple[str, ...]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, list(model.adapters), model.active_adapters


def _assert_unchanged(model: DeltaModel, snap: tuple[Any, ...]) -> None:
    state, names, active = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert list(model.adapters) == names
    assert model.active_adapters == active
    assert set(model.deltas.keys()) == set(names)


def _errors_model() -> DeltaModel:
    model = _hand_model()
    model.add_adapter("bitfit_q", "bitfit", targets=["attn.q[0]"])
    model.add_adapter("lora_v", "lora", r=1, targets=["attn.v[0]"])
    model.add_adapter("ad4", "bottleneck_adapter", bottleneck=4, targets=["mlp[0]"])
    model.add_adapter("ad8", "bottleneck_adapter", bottleneck=8, targets=["mlp[0]"])
    return model


ERROR_CASES: list[tuple[str, Callable[[DeltaModel], object], type[Exception], str]] = [
    (
        "mismatched methods",
        lambda m: combine(m, {"a": 1.0, "bitfit_q": 1.0}, "x"),
        AdapterError,
        r"'a' and 'bitfit_q' use different methods \('lora' and 'bitfit'\)",
    ),
    (
        "mismatched sites",
        lambda m: combine(m, {"a": 1.0, "lora_v": 1.0}, "x"),
        AdapterError,
        r"attach at different sites \(only 'a': \['encoder.layer.0:attn.q'\]; "
        r"only 'lora_v': \['encoder.layer.0:attn.v'\]\)",
    ),
    (
        "unknown name",
        lambda m: combine(m, {"a": 1.0, "nope": 1.0}, "x"),
        AdapterError,
        r"unknown adapter 'nope'",
    ),
    (
        "name taken",
        lambda m: combine(m, {"a": 1.0, "b": 1.0}, "b"),
        AdapterError,
        r"adapter name 'b' is already in use",
    ),
    (
        "invalid name",
        lambda m: combine(m, {"a": 1.0}, "no spaces"),
        AdapterError,
        r"adapter name 'no spaces' is invalid",
    ),
    ("no sources", lambda m: combine(m, {}, "x"), AdapterError, r"non-empty mapping"),
    (
        "bad weight",
        lambda m: combine(m, {"a": float("nan")}, "x"),
        AdapterError,
        r"weight of adapter 'a' must be a finite number",
    ),
    (
        "unknown how",
        lambda m: combine(m, {"a": 1.0}, "x", how="mean"),  # type: ignore[arg-type]
        AdapterError,
        r"how='mean' is not a combination; choose one of linear, svd, ties, dare",
    ),
    (
        "density out of range",
        lambda m: combine(m, {"a": 1.0, "b": 1.0}, "x", how="ties", density=0.0),
        AdapterError,
        r"density must be a number in \(0, 1\]",
    ),
    (
        "rank with linear",
        lambda m: combine(m, {"a": 1.0, "b": 1.0}, "x", rank=2),
        AdapterError,
        r"rank is not used by how='linear'",
    ),
    (
        "bad rank",
        lambda m: combine(m, {"a": 1.0, "b": 1.0}, "x", how="svd", rank=0),
        AdapterError,
        r"rank must be a positive integer",
    ),
    (
        "rank too large for LoRA",
        lambda m: combine(m, {"a": 1.0, "b": 1.0}, "x", how="svd", rank=5000),
        ConfigError,
        r"field 'r'",
    ),
    (
        "svd of non-reparameterized",
        lambda m: combine(m, {"ad4": 1.0}, "x", how="svd"),
        AdapterError,
        r"has no delta weight ΔW; how='svd' needs a reparameterized method",
    ),
    (
        "parameter shapes differ",
        lambda m: combine(m, {"ad4": 1.0, "ad8": 1.0}, "x"),
        AdapterError,
        r"'ad4' and 'ad8' have delta parameters of different shapes at site "
        r"'encoder.layer.0:mlp' \(down.bias: \(4,\) vs \(8,\)",
    ),
    (
        "rank for parameter ties",
        lambda m: combine(m, {"ad4": 1.0}, "x", how="ties", rank=2),
        AdapterError,
        r"combines parameters and makes no LoRA adapter",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [pytest.param(c, e, m, id=i) for i, c, e, m in ERROR_CASES],
)
def test_errors_leave_the_model_unchanged(
    call: Callable[[DeltaModel], object], exc: type[Exception], match: str
) -> None:
    model = _errors_model()
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        call(model)
    _assert_unchanged(model, snap)


def test_failure_while_loading_the_state_removes_the_new_adapter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _hand_model()
    snap = _snapshot(model)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(LoraDelta, "load_state_dict", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        combine(model, {"a": 1.0, "b": 0.5}, "ab")
    monkeypatch.undo()
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("backbone", backbones())
@pytest.mark.parametrize("how", ["linear", "svd", "dare"])
def test_unit_weights_equal_both_sources_active(backbone: str, how: str) -> None:
    """{a: 1, b: 1} runs like a and b active together (fused slices, Conv1D, MHA included)."""
    bb = BACKBONES[backbone]
    torch.manual_seed(5)
    model = unipeft.apply(bb.make(), "lora", adapter_name="a", r=2, targets=["attn.q", "attn.v"])
    model.add_adapter("b", "lora", r=1, alpha=3.0, targets=["attn.q", "attn.v"])
    for name in ("a", "b"):
        for delta in model.deltas[name].values():
            torch.nn.init.normal_(delta.B, std=0.1)
    kwargs: dict[str, Any] = {"rank": 3} if how == "svd" else {}
    if how == "dare":
        kwargs["density"] = 1.0
    combine(model, {"a": 1.0, "b": 1.0}, "ab", how=how, **kwargs)  # type: ignore[arg-type]
    inputs = bb.sample(0)
    with torch.no_grad():
        model.set_active(["a", "b"])
        both = bb.run(model, inputs)
        model.set_active("ab")
        _exact(bb.run(model, inputs), both, atol=1e-4)
