"""The spectrum of a trained update ``ΔW`` per site, as in the LoRA paper's analysis (§7):
its singular values, its effective rank, and how much of the subspace one adapter learned
another adapter (of another rank, or another seed) learned too.

- ``effective_rank(ΔW) = exp(H(p))`` with ``p_i = σ_i / Σσ`` (Roy and Vetterli, 2007): 1 for
  a rank-one update, ``k`` for ``k`` equal singular values;
- ``subspace_overlap(ΔW_1, ΔW_2, i, j) = ‖U_1[:, :i]ᵀ U_2[:, :j]‖_F² / min(i, j)`` with
  ``U`` the left singular vectors: 1 when the top-``i`` directions of one lie in the
  top-``j`` of the other, 0 when they are orthogonal (the LoRA paper's φ).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..contract.errors import ConfigError

__all__ = ["adapter_spectra", "effective_rank", "singular_values", "subspace_overlap"]


def _matrix(delta: Tensor) -> Tensor:
    if delta.dim() < 2:
        raise ConfigError(
            f"a weight update has at least 2 dimensions, got shape {tuple(delta.shape)}"
        )
    return delta.detach().reshape(delta.shape[0], -1).double()


def singular_values(delta: Tensor) -> Tensor:
    """The singular values of ``ΔW`` ``(out, in, *kernel)``, largest first, in float64."""
    return torch.linalg.svdvals(_matrix(delta))


def effective_rank(delta: Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values; 0 for a zero update."""
    s = singular_values(delta)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def subspace_overlap(a: Tensor, b: Tensor, i: int, j: int) -> float:
    """How much of ``a``'s top-``i`` left singular subspace lies in ``b``'s top-``j``."""
    if i < 1 or j < 1:
        raise ConfigError(f"i={i}, j={j}: both subspace sizes must be at least 1")
    ua = torch.linalg.svd(_matrix(a), full_matrices=False).U
    ub = torch.linalg.svd(_matrix(b), full_matrices=False).U
    if i > ua.shape[1] or j > ub.shape[1]:
        raise ConfigError(
            f"i={i}, j={j}: the updates have {ua.shape[1]} and {ub.shape[1]} singular directions"
        )
    m = ua[:, :i].t() @ ub[:, :j]
    return float(m.square().sum() / min(i, j))


def adapter_spectra(model: Any, adapter: str | None = None) -> list[dict[str, Any]]:
    """Per site of ``adapter`` (default: the first active) of a DeltaModel: the site, its
    role and layer, the update's shape, its Frobenius norm, effective rank and top
    singular values. Methods whose deltas have no weight update (prompts, adapters) are
    left out."""
    name = adapter if adapter is not None else model.active_adapters[0]
    rows = []
    for att in model.adapters[name].attachments:
        fn = getattr(att.delta, "delta_weight", None)
        if fn is None:
            continue
        try:
            delta = fn()
        except (NotImplementedError, TypeError):
            continue
        s = singular_values(delta)
        rows.append(
            {
                "site": att.site.name,
                "role": att.site.role,
                "layer": att.site.layer,
                "shape": list(delta.shape),
                "norm": float(s.square().sum().sqrt()),
                "effective_rank": effective_rank(delta),
                "top_singular_values": [float(v) for v in s[:8]],
            }
        )
    return rows
