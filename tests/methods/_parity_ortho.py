"""What the PEFT-parity tests of OFT, BOFT, HRA, MiSS and RoAd share, on top of
:mod:`_parity`'s tiny backbones (``base``, 5-class ViT) and inputs (``run``, seed 7): noise
*added* to the adapter's tensors, the shape-checked comparison at float32 tolerance, merged
weights against PEFT's ``merge_and_unload()``, and the two halves of a PEFT folder round trip
(each asserting that the adapter moved the output past ``floor`` before anything is
compared)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _parity import base, max_diff, run
from torch import Tensor, nn

peft = pytest.importorskip("peft")

import unipeft  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402

__all__ = [
    "base", "close", "from_peft", "max_diff", "merged_weights", "randomise", "report", "run",
    "to_peft",
]  # fmt: skip


def randomise(params: Any, seed: int, scale: float = 0.5) -> None:
    """Add noise (``scale`` times a standard normal, from ``seed``) to every tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def close(a: Tensor, b: Tensor, what: str) -> float:
    """``a`` and ``b`` have one shape and agree to ``1e-5`` of ``max(1, |b|)``."""
    d = max_diff(a, b)
    scale = max(1.0, b.abs().max().item())
    assert d <= 1e-5 * scale, f"{what}: largest difference {d:.3e} (output scale {scale:.3g})"
    return d


def merged_weights(peft_model: Any, ours: unipeft.DeltaModel) -> float:
    """Largest difference between PEFT's merge_and_unload() and unipeft's merge()."""
    ours.merge()
    mine = ours.base_model.state_dict()
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(mine) == set(theirs)
    return max(close(mine[k], theirs[k], f"merged {k}") for k in mine)


def from_peft(
    backbone: nn.Module, kind: str, peft_config: Any, folder: Path, *, noise: str | None,
    seed: int = 1, scale: float = 0.5, floor: float = 1e-3,
) -> tuple[Any, unipeft.DeltaModel, Tensor]:  # fmt: skip
    """PEFT's adapter on a copy of ``backbone`` (its parameters whose name holds ``noise``
    randomised, unless ``noise`` is None), saved to ``folder`` and loaded by unipeft onto
    another copy: ``(theirs, ours, PEFT's output)``."""
    theirs = peft.get_peft_model(copy.deepcopy(backbone), peft_config).eval()
    if noise is not None:
        randomise((p for n, p in theirs.named_parameters() if noise in n), seed, scale)
    theirs.save_pretrained(folder)
    expected = run(theirs, kind)
    assert max_diff(expected, run(backbone, kind)) > floor, "the PEFT adapter is the identity"
    ours = interop.load(copy.deepcopy(backbone), folder).eval()
    return theirs, ours, expected


def to_peft(
    backbone: nn.Module, kind: str, method: str, targets: list[str], cfg: dict[str, Any],
    folder: Path, *, seed: int = 2, scale: float = 0.5, floor: float = 1e-3,
) -> tuple[Any, unipeft.DeltaModel, Tensor, dict[str, Any]]:  # fmt: skip
    """unipeft's adapter on a copy of ``backbone`` (randomised), saved as a PEFT folder and
    loaded by PEFT onto another copy: ``(theirs, ours, unipeft's output, the saved config)``."""
    ours = unipeft.apply(copy.deepcopy(backbone), method, targets=targets, **cfg).eval()
    randomise(ours.deltas.parameters(), seed, scale)
    expected = run(ours, kind)
    assert max_diff(expected, run(backbone, kind)) > floor, "the unipeft adapter is the identity"
    interop.save(ours, folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(backbone), folder).eval()
    return theirs, ours, expected, saved


def report(
    got: nn.Module, kind: str, expected: Tensor, theirs: Any, ours: unipeft.DeltaModel,
    what: str, label: str,
) -> None:  # fmt: skip
    """``got``'s output is ``expected`` (``what`` names the direction), and the merged
    weights agree; prints both differences after ``label``."""
    d = close(run(got, kind), expected, f"{what} output")
    m = merged_weights(theirs, ours)
    print(f"\n{label} {what}: output {d:.2e}, merged weights {m:.2e}")
