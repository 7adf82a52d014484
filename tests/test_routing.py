"""The routers of unipeft.blocks.routing against computations by hand on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from unipeft.blocks import (
    Router,
    gates_from_probs,
    load_balancing_loss,
    top_k_gates,
    top_p_gates,
    top_p_mask,
    z_loss,
)
from unipeft.blocks.routing import dispatch

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def _softmax_by_hand(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


PROBS_HAND = [_softmax_by_hand(r) for r in LOGITS.tolist()]
PROBS = torch.tensor(PROBS_HAND)


def test_top_k_keeps_the_k_largest_renormalised() -> None:
    g = top_k_gates(PROBS, 2)
    p = PROBS_HAND[0]
    want0 = [p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0.0, 0.0]
    assert torch.allclose(g[0], torch.tensor(want0))
    assert torch.allclose(g.sum(-1), torch.ones(3))
    assert ((g > 0).sum(-1) == 2).all()


def test_top_p_is_the_smallest_set_reaching_p() -> None:
    p0 = PROBS_HAND[0]  # 0.6439, 0.2369, 0.0871, 0.0321
    assert p0[0] < 0.7 < p0[0] + p0[1]
    assert top_p_mask(PROBS[:1], 0.7).tolist() == [[True, True, False, False]]
    assert top_p_mask(PROBS[:1], 0.5).tolist() == [[True, False, False, False]]
    assert top_p_mask(PROBS[:1], p0[0] + p0[1] + p0[2] + 1e-4).tolist() == [[True] * 4]
    # uniform row: mass 0.25 per expert; p = 0.6 needs three of them
    assert int(top_p_mask(PROBS[2:], 0.6).sum()) == 3
    # never empty, even for a tiny p
    assert top_p_mask(PROBS, 1e-6).sum(-1).tolist() == [1, 1, 1]
    g = top_p_gates(PROBS[:1], 0.7)
    want = [p0[0] / (p0[0] + p0[1]), p0[1] / (p0[0] + p0[1]), 0.0, 0.0]
    assert torch.allclose(g[0], torch.tensor(want))


def test_soft_gates_are_the_probabilities() -> None:
    assert torch.equal(gates_from_probs(PROBS, "soft"), PROBS)
    with pytest.raises(ValueError, match=r"unknown router"):
        gates_from_probs(PROBS, "top_q")  # type: ignore[arg-type]


def test_load_balancing_loss_by_hand() -> None:
    gates = top_k_gates(PROBS, 1)
    chosen = dispatch(gates, PROBS, "top_k")
    # row 0 -> expert 0, row 1 -> expert 2, row 2 (a tie) -> one expert
    assert chosen.sum().item() == 3
    counts = chosen.sum(0).tolist()
    f = [c / 3 for c in counts]
    mean_p = [sum(PROBS_HAND[r][i] for r in range(3)) / 3 for i in range(4)]
    want = 4 * sum(fi * pi for fi, pi in zip(f, mean_p, strict=True))
    assert load_balancing_loss(PROBS, chosen).item() == pytest.approx(want, rel=1e-6)
    # uniform probabilities and decisions give exactly 1
    uniform = torch.full((4, 4), 0.25)
    assert load_balancing_loss(uniform, torch.eye(4)).item() == pytest.approx(1.0)
    # the soft router's decisions are each row's most probable expert
    soft = dispatch(PROBS, PROBS, "soft")
    assert soft[0].tolist() == [1, 0, 0, 0] and soft[1].tolist() == [0, 0, 1, 0]


def test_z_loss_by_hand() -> None:
    rows = LOGITS.tolist()
    want = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in rows) / len(rows)
    assert z_loss(LOGITS).item() == pytest.approx(want, rel=1e-6)


def test_router_per_sample_routes_the_mean_and_broadcasts() -> None:
    torch.manual_seed(0)
    router = Router(5, 3, "top_k", top_k=1, routing="sample")
    x = torch.randn(2, 4, 5)
    g = router(x)
    assert g.shape == (2, 1, 3)
    logits = x.mean(1) @ router.weight.t()
    assert torch.allclose(router.last[0], logits)
    assert torch.equal(g[:, 0].argmax(-1), logits.argmax(-1))
    loss = router.aux_loss(0.5, 0.1)
    want = 0.5 * router.balance_loss() + 0.1 * router.z_loss()
    assert torch.allclose(loss, want)
    assert Router(5, 3).aux_loss(1.0, 1.0) is None  # nothing routed yet


def test_router_per_token() -> None:
    router = Router(5, 4, "top_p", top_p=0.9)
    g = router(torch.randn(2, 3, 5))
    assert g.shape == (2, 3, 4)
    assert torch.allclose(g.sum(-1), torch.ones(2, 3))
    assert router.aux_loss(0.0, 0.0) is None


def test_same_choices_replays_the_recorded_experts() -> None:
    import torch
    from torch import nn

    from unipeft.blocks import Router, same_choices

    torch.manual_seed(0)
    a = nn.ModuleList([Router(8, 4, "top_k", top_k=2), Router(8, 4, "top_p", top_p=0.6)])
    b = nn.ModuleList([Router(8, 4, "top_k", top_k=2), Router(8, 4, "top_p", top_p=0.6)])
    x = torch.randn(5, 8)
    assert not torch.equal(a[0](x) > 0, b[0](x) > 0)  # different weights choose otherwise
    with same_choices(a, b):
        chosen = [r(x) > 0 for r in a]
        replayed = [r(x) for r in b]
    for want, got in zip(chosen, replayed, strict=True):
        assert torch.equal(got > 0, want)  # the recorded experts, and only those
        assert torch.allclose(got.sum(-1), torch.ones(5))  # renormalised
    assert a[0].tape is None and not b[0].replaying  # nothing left behind
    assert torch.equal(b[0](x) > 0, b[0](x) > 0) and not torch.equal(b[0](x) > 0, chosen[0])
