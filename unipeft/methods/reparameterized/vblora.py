"""VB-LoRA: every LoRA factor composed from one trained vector bank shared by the whole adapter
(Li, Han, Ji, 2024).

A bank ``V`` of ``N`` vectors of length ``L`` is shared by all sites. A projection
``d_in -> d_out`` (both multiples of ``L``) keeps logits ``ℓ_A`` ``(r, d_in/L, N)`` and
``ℓ_B`` ``(d_out/L, r, N)``; each length-``L`` piece of its factors is a mixture of the ``k``
bank vectors with the largest logits:

    piece(ℓ) = Σ_{j ∈ top-k(ℓ)} softmax(ℓ_top-k)_j · V_j
    A = piece(ℓ_A).reshape(r, d_in)                              (r, d_in)
    B = piece(ℓ_B).transpose(1, 2).reshape(d_out, r)             (d_out, r)
    ΔW = B A        y' = y + B A dropout(x)

**Shared across sites:** the bank ``V`` ``(num_vectors, vector_length)``, a trained
parameter counted and saved once per adapter, initialised uniformly in
``±init_vector_bank_bound``. The logits start normal with std ``init_logits_std``, so, as in
PEFT, the adapter is not the identity at initialisation.

PEFT equivalent: ``peft_type="VBLORA"`` with the same field names (``dropout`` ->
``vblora_dropout``); PEFT's per-module ``vblora_logits_A`` / ``vblora_logits_B`` are
``ℓ_A`` / ``ℓ_B``, and ``base_model.vblora_vector_bank`` is ``V``. ``save_only_topk_weights``
changes only what a PEFT export writes (the top-k indices and the first k-1 weights of each
piece instead of the logits: enough for inference and merging, not for training); unipeft's
own save always stores the logits, and a PEFT folder saved that way loads with ``-inf`` for
the logits outside the top k.

Sites: Linear-like projections (nn.Linear, GPT-2 ``Conv1D``, fused q/k/v slices,
``nn.MultiheadAttention`` in_proj slices) whose input and output widths are multiples of
``vector_length`` (a size refused at apply otherwise); convolutions are refused (PEFT's VB-LoRA
does not adapt them).
"""

from __future__ import annotations

import math
from typing import Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import Site
from .vera import refuse_convolutions


class VBLoraConfig(DeltaConfig):
    """VB-LoRA's fields (PEFT's defaults)."""

    r: int = Field(4, ge=1, le=4096, description="rank of the composed factors A and B")
    num_vectors: int = Field(
        256, ge=1, le=2**20, description="number of vectors in the shared bank"
    )
    vector_length: int = Field(
        256,
        ge=1,
        le=2**16,
        description="length of each bank vector; must divide every site's input and output width",
    )
    topk: int = Field(
        2, ge=1, le=2**20, description="bank vectors mixed into each piece (at most num_vectors)"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")
    init_vector_bank_bound: float = Field(
        0.02, gt=0.0, le=1e3, description="the bank starts uniform in ±init_vector_bank_bound"
    )
    init_logits_std: float = Field(
        0.1, gt=0.0, le=1e3, description="the logits start normal with this standard deviation"
    )
    save_only_topk_weights: bool = Field(
        False,
        description="whether a PEFT export writes only the top-k indices and weights "
        "(inference only, as PEFT's option); unipeft's own save always stores the logits",
    )

    @model_validator(mode="after")
    def _topk_fits(self) -> Self:
        if self.topk > self.num_vectors:
            raise ValueError(
                f"topk={self.topk} is above num_vectors={self.num_vectors}: a piece mixes at "
                "most every vector of the bank; choose topk <= num_vectors"
            )
        return self


class VectorBank(nn.Module):
    """The adapter's trained bank ``vectors`` ``(num_vectors, vector_length)``."""

    def __init__(self, num_vectors: int, vector_length: int, bound: float) -> None:
        super().__init__()
        self.vectors = nn.Parameter(torch.empty(num_vectors, vector_length).uniform_(-bound, bound))


def compose(logits: Tensor, bank: Tensor, topk: int) -> Tensor:
    """``(..., N)`` logits -> ``(..., L)`` pieces: the softmax-weighted sum of the ``topk``
    bank vectors with the largest logits."""
    top, index = logits.topk(topk, dim=-1)
    weights = torch.softmax(top, dim=-1)
    return (weights.unsqueeze(-1) * bank[index]).sum(-2)


class VBLoraDelta(ReparameterizedDelta):
    """``y + B A dropout(x)`` with ``A`` and ``B`` composed from the adapter's bank (read
    through :attr:`shared`) by this site's ``logits_A`` ``(r, d_in/L, N)`` and ``logits_B``
    ``(d_out/L, r, N)``."""

    def __init__(
        self,
        shape: ProjectionShape,
        shared: VectorBank,
        r: int,
        topk: int,
        dropout: float = 0.0,
        init_logits_std: float = 0.1,
    ) -> None:
        super().__init__(shape)
        self.use_shared(shared)
        self.r, self.topk = r, topk
        n, length = shared.vectors.shape
        self.logits_A = nn.Parameter(torch.empty(r, shape.in_features // length, n))
        self.logits_B = nn.Parameter(torch.empty(shape.out_features // length, r, n))
        nn.init.normal_(self.logits_A, 0.0, init_logits_std)
        nn.init.normal_(self.logits_B, 0.0, init_logits_std)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[Tensor, Tensor]:
        """``A`` ``(r, d_in)`` and ``B`` ``(d_out, r)``, in the logits' dtype."""
        bank = self.shared.vectors.to(self.logits_A.dtype)
        a = compose(self.logits_A, bank, self.topk).reshape(self.r, -1)
        b = compose(self.logits_B, bank, self.topk).transpose(1, 2).reshape(-1, self.r)
        return a, b

    def delta_weight(self) -> Tensor:
        a, b = self.factors()
        return b @ a

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        a, b = self.factors()
        out = F.linear(F.linear(self.dropout(x), a.to(x.dtype)), b.to(x.dtype))
        return y + out.to(y.dtype)


def _shared(cfg: VBLoraConfig, sites: tuple[Site, ...]) -> VectorBank:
    return VectorBank(cfg.num_vectors, cfg.vector_length, cfg.init_vector_bank_bound)


def _shared_count(cfg: VBLoraConfig, sites: tuple[Site, ...]) -> int:
    return cfg.num_vectors * cfg.vector_length


def _build(cfg: VBLoraConfig, site: Site, shared: VectorBank) -> VBLoraDelta:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    return VBLoraDelta(shape, shared, cfg.r, cfg.topk, cfg.dropout, cfg.init_logits_std)


def _count(cfg: VBLoraConfig, site: Site) -> int:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    pieces = (shape.in_features + shape.out_features) // cfg.vector_length
    return cfg.r * pieces * cfg.num_vectors


def _accepts(cfg: VBLoraConfig, site: Site) -> str | None:
    return refuse_convolutions("VB-LoRA", site)


def _size_check(cfg: VBLoraConfig, site: Site) -> str | None:
    """``vector_length`` must divide the site's input and output widths."""
    if getattr(site, "weight", None) is None:
        return None
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    d_in, d_out, length = shape.in_features, shape.out_features, cfg.vector_length
    if d_in % length == 0 and d_out % length == 0:
        return None
    common = math.gcd(d_in, d_out)
    fits = max(d for d in range(1, min(common, length) + 1) if common % d == 0)
    return (
        f"vector_length={length} does not divide the widths of this {d_in}->{d_out} "
        "projection: VB-LoRA cuts each row of A and column of B into pieces of that length. "
        f"Choose a vector_length that divides {common} (e.g. {fits})"
    )


METHOD = Method(
    id="vblora",
    refuses="convolutions; a vector_length that does not divide both widths of a site",
    family="reparameterized",
    config=VBLoraConfig,
    build=_build,  # type: ignore[arg-type]
    num_parameters=_count,
    formula="r · (d_in + d_out) / vector_length · num_vectors per projection, plus "
    "num_vectors · vector_length for the bank shared by the adapter",
    site_kinds=("projection",),
    accepts=_accepts,
    size_check=_size_check,
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=False,
    shared=_shared,
    shared_parameters=_shared_count,
    paper="Li, Han, Ji, VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks, "
    "2024, arXiv:2405.15179",
    summary="LoRA factors composed by top-k mixtures of one trained vector bank shared by all "
    "sites; mergeable",
)
