"""SHiRA: train a sparse, fixed subset of a projection's weight entries (Bhardwaj et al., 2024).

At each projection a set ``S`` of ``K = r · (d_in · k + d_out)`` entries of the weight
(``k``: kernel elements, 1 for a Linear) is chosen once, when the adapter is created, and
only those entries train: the weight becomes ``W + ΔW`` with ``ΔW`` zero outside ``S``,

    y' = y + x ΔWᵀ,        ΔW[S] = values,   ΔW = 0 elsewhere

``K`` is the number of parameters LoRA of rank ``r`` has at the same projection, but the
update is not low-rank (sparse, high rank). ``values`` starts at zero, so the adapter is the
identity at init, and ``merge()`` adds ``ΔW`` to the weight.

The mask is ``mask_type="random"``: the ``K`` entries are the first ``K`` of a random
permutation of the flattened ``(d_out, d_in · k)`` weight, sorted. With ``random_seed`` the
permutation comes from a generator seeded with it at every site, as PEFT draws it (so the
same seed gives PEFT's mask, and every site of one shape the same mask); without it, from
torch's global generator (``torch.manual_seed`` decides it), a new mask at every site.
The chosen entries are kept as a persistent integer buffer ``indices`` (flat positions in
the ``(d_out, d_in · k)`` weight, ``K`` of them), saved and loaded with ``values``: a loaded
adapter never draws its mask again. Nothing is shared between sites.

Paper: Bhardwaj et al., *Sparse High Rank Adapters*, 2024, arXiv:2406.13175.

PEFT equivalent: ``peft_type="SHIRA"`` (``ShiraConfig``): ``r``, ``mask_type`` and
``random_seed`` are the same fields (PEFT's default ``r`` is 32, unipeft's 8, like its LoRA);
PEFT saves ``shira_weight`` ``(K,)`` and ``shira_indices`` ``(2, K)`` (int32 rows and
columns), which the codec in ``unipeft.features.interop.codecs.shira`` converts to ``values``
and ``indices``. PEFT adapts ``nn.Linear`` only.

Sites: every projection layout (Linear, GPT-2 ``Conv1D``, convolutions, where the weight is
taken as ``(d_out, d_in · k)``, and the slices of fused projections: timm's ``qkv``, GPT-2's
``c_attn``, ``nn.MultiheadAttention``'s ``in_proj_weight``, where only the slice's rows are
eligible). Refused: module sites without a weight (sublayers, norms, blocks: there is no
weight of theirs to select entries from). ``r`` is checked against each site: ``K`` must not
exceed the number of weight entries.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, SelectiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site


class ShiraConfig(DeltaConfig):
    """How many weight entries train, and how they are chosen."""

    r: int = Field(
        8,
        ge=1,
        le=4096,
        description="r · (d_in · k + d_out) weight entries train at each projection (as many "
        "as LoRA of rank r has parameters); not a rank: the update is sparse, of high rank",
    )
    mask_type: Literal["random"] = Field(
        "random", description="how the entries are chosen: uniformly at random"
    )
    random_seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="seed of the random mask, the same at every site (as PEFT); None draws "
        "from torch's global generator, a new mask per site",
    )


def _dims(shape: ProjectionShape) -> tuple[int, int]:
    """``(d_out, d_in · k)``: the weight as a matrix."""
    return shape.out_features, shape.in_features * math.prod(shape.kernel_size)


def shira_count(r: int, shape: ProjectionShape) -> int:
    """``K = r · (d_in · k + d_out)``: the number of trained entries."""
    rows, cols = _dims(shape)
    return r * (rows + cols)


def random_indices(rows: int, cols: int, count: int, seed: int | None) -> Tensor:
    """``count`` distinct flat positions of a ``(rows, cols)`` matrix, sorted (int64)."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    chosen = torch.randperm(rows * cols, generator=gen)[:count]
    return chosen.sort().values


class ShiraDelta(SelectiveDelta):
    """``y + x ΔWᵀ`` with ``ΔW`` zero outside ``indices``. ``values`` ``(K,)`` are the trained
    entries, ``indices`` ``(K,)`` (int64, persistent buffer) their flat positions in the
    ``(d_out, d_in · k)`` weight."""

    def __init__(self, shape: ProjectionShape, r: int, seed: int | None) -> None:
        rows, cols = _dims(shape)
        count = shira_count(r, shape)
        if count > rows * cols:
            raise ValueError(
                f"r={r} asks for {count} entries of a {rows}x{cols} weight, which has {rows * cols}"
            )
        super().__init__("weight", (count,), projection=shape)
        self.register_buffer("indices", random_indices(rows, cols, count, seed))

    def dense(self) -> Tensor:
        """``ΔW`` ``(d_out, d_in, *kernel)``: ``values`` scattered to ``indices``."""
        shape = self.projection
        assert shape is not None
        rows, cols = _dims(shape)
        flat = self.values.new_zeros(rows * cols).scatter(0, self.indices, self.values)
        return flat.view(rows, shape.in_features, *shape.kernel_size)


def _build(cfg: ShiraConfig, site: Site) -> ShiraDelta:
    assert isinstance(site, ModuleSite)
    return ShiraDelta(ProjectionShape.of(site), cfg.r, cfg.random_seed)


def _count(cfg: ShiraConfig, site: Site) -> int:
    return shira_count(cfg.r, ProjectionShape.of(site))  # type: ignore[arg-type]


def _accepts(cfg: ShiraConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite) or site.weight is None or site.entry is not None:
        return (
            f"{site.name!r} is not a projection: shira trains entries of a projection's "
            "weight; target projections such as attn.q or mlp.up"
        )
    return None


def _size(cfg: ShiraConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite) or site.weight is None:
        return None
    shape = ProjectionShape.of(site)
    rows, cols = _dims(shape)
    count = shira_count(cfg.r, shape)
    if count <= rows * cols:
        return None
    most = (rows * cols) // (rows + cols)
    return (
        f"r={cfg.r} asks for r · (d_in · k + d_out) = {count} trained entries, more than the "
        f"{rows}x{cols} weight has ({rows * cols}). Choose r <= {most}"
    )


METHOD = Method(
    id="shira",
    refuses="r · (d_in · k + d_out) above the weight's number of entries",
    family="selective",
    config=ShiraConfig,
    build=_build,
    num_parameters=_count,
    formula="r · (d_in · k + d_out) per projection (k: kernel elements, 1 for Linear): "
    "that many fixed weight entries",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    mergeable=True,
    identity_at_init=True,
    paper="Bhardwaj et al., Sparse High Rank Adapters, 2024, arXiv:2406.13175",
    summary="trains a fixed random sparse subset of each projection's weight entries; mergeable",
    accepts=_accepts,
    size_check=_size,
    budget_field="r",
)
