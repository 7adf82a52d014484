"""What the PEFT-parity tests of LoHa, LoKr, FourierFT, WaveFT and C3A share, on top of
``_parity``'s tiny backbones (seed 0) and inputs (seed 7): an ``nn.Conv1d`` stack as a
fourth backbone, noise of unit scale on adapter tensors, the output comparison at float32
tolerance, the merged-weights comparison, and the LyCORIS-style checks (merged weights,
train-time dropouts under one seed, counts/identity/merge on every layout)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from _parity import base as _parity_base
from _parity import max_diff
from _parity import run as _parity_run
from _parity_ortho import close as close_lycoris
from _parity_ortho import merged_weights  # noqa: F401  (used by the LoHa and LoKr tests)
from torch import Tensor, nn

import unipeft
from unipeft.testing.backbones import BACKBONES

# ----------------------------------------------------------------------------- backbones


def base(kind: str, conv1d: Callable[[], nn.Module] | None = None) -> nn.Module:
    """``_parity.base`` (``bert``, ``bert-*``, ``gpt2``, ``vit``), or ``conv1d()`` when ``kind``
    is ``conv1d``; seed 0 either way."""
    if kind == "conv1d":
        assert conv1d is not None
        torch.manual_seed(0)
        return conv1d().eval()
    return _parity_base("bert" if kind.startswith("bert") else kind)


def run(model: nn.Module, kind: str, channels: int = 0) -> Tensor:
    """``_parity.run``; on ``conv1d``, a (2, channels, 11) input drawn from seed 7."""
    if kind == "conv1d":
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            return model(torch.randn(2, channels, 11, generator=g))
    return _parity_run(model, kind)


def randn_(params: Iterable[nn.Parameter], seed: int) -> None:
    """N(0, 1) noise on every tensor (``_parity.randomise`` draws N(0, 0.25))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- comparisons


def close(a: Tensor, b: Tensor, what: str) -> float:
    """``a`` and ``b`` agree within ``1e-5`` of the output scale (at least 1); printed."""
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    d = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    print(f"{what}: max abs diff {d:.3e} (output scale {scale:.3g})")
    assert d <= 1e-5 * scale, f"{what}: {d:.3e}"
    return d


def merged_diff(
    a: nn.Module, b: nn.Module, what: str, *, scaled: bool = True, same_keys: bool = True
) -> float:
    """Largest difference between the parameters of ``a`` and ``b``: at most ``1e-6`` times
    the weight scale (at least 1), or ``1e-6`` itself where ``scaled`` is false."""
    got = {n: p.detach() for n, p in a.named_parameters()}
    want = {n: p.detach() for n, p in b.named_parameters()}
    if same_keys:
        assert got.keys() == want.keys()
    diff = max((got[k] - want[k]).abs().max().item() for k in got)
    scale = max(1.0, max(w.abs().max().item() for w in want.values())) if scaled else 1.0
    print(f"{what} merged weights: max abs diff {diff:.3e} (weight scale {scale:.3g})")
    assert diff <= 1e-6 * scale
    return diff


# ----------------------------------------------------------------------------- LyCORIS style


def train_mode_diff(theirs: nn.Module, ours: nn.Module, kind: str) -> float:
    """Four training forwards of each model from seed 11 agree, and dropout changed one."""
    outs = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(11)
        outs.append([run(model, kind) for _ in range(4)])
    eval_out = run(ours.eval(), kind)
    assert any(max_diff(o, eval_out) > 1e-4 for o in outs[1]), "dropout changed nothing"
    return max(
        close_lycoris(a, b, "train-mode output") for a, b in zip(outs[1], outs[0], strict=True)
    )


def counts_identity_and_merge(
    method: str, sites: dict[str, list[str]], cfg: dict[str, Any], identity: bool
) -> None:
    """On each backbone of ``sites``: exact trainable counts, the identity at init where
    ``identity``, and merge == unmerged after noise on the adapter."""
    for name, targets in sites.items():
        bb = BACKBONES[name]
        model = unipeft.apply(bb.make(), method, targets=targets, **cfg)
        adapter = model.adapters["default"]
        want = sum(adapter.method.num_parameters(adapter.config, s) for s in adapter.sites)
        assert model.num_trainable_parameters() == want
        ref = bb.run(bb.make(), bb.sample(0)).detach()
        out = bb.run(model, bb.sample(0)).detach()
        if identity:
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        with torch.no_grad():
            for p in model.deltas.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            unmerged = bb.run(model, bb.sample(0))
            model.merge()
            merged = bb.run(model, bb.sample(0))
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
        assert max_diff(unmerged, ref) > 1e-4


def every_layout_merges(method: str, seed: int | None = None, **config: Any) -> None:
    """Fused q/v slices (timm), GPT-2 Conv1D, MHA in_proj slices and out_proj (open_clip):
    the output after merge() is the output before (after noise from ``seed`` if given)."""
    for name, targets in (
        ("timm_vit", ["attn.q", "attn.v", "mlp.up"]),
        ("gpt2", ["attn.q", "attn.v", "mlp.up"]),
        ("open_clip", ["attn.q", "attn.k", "attn.v", "attn.out"]),
    ):
        bb = BACKBONES[name]
        model = unipeft.apply(bb.make(), method, targets=targets, **config)
        if seed is not None:
            randn_(list(model.deltas.parameters()), seed)
        with torch.no_grad():
            x = bb.sample(0)
            before = bb.run(model, x)
            model.merge()
            merged = bb.run(model, x)
        torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-4)
