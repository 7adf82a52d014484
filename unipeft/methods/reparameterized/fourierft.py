"""FourierFT: a weight change given by a few trainable coefficients of its 2-D spectrum.

Gao et al., 2024, *Parameter-Efficient Fine-Tuning with Discrete Fourier Transform*
(arXiv:2405.03003). At a projection of ``d_out × d_in``, ``n`` spectral positions
``(u_k, v_k)`` are drawn once (the first ``n`` of a random permutation of the
``d_out · d_in`` entries, from a generator seeded with ``random_loc_seed``) and fixed; the
coefficients ``c_k`` at those positions train:

    S = 0 except S[u_k, v_k] = c_k        ΔW = scaling · Re(IDFT2(S))

where ``IDFT2`` is the normalised inverse 2-D DFT (``torch.fft.ifft2``, which divides by
``d_out · d_in``), computed in float32 (float64 for a float64 backbone). Trainable: ``n``
values per site (``spectrum``). The positions are a persistent ``int64`` buffer ``indices``
``(2, n)`` (rows, then columns): saved and loaded with the adapter, never trained. Every site
of one shape gets the same positions, as in PEFT; nothing is shared across sites.

The PEFT default (``init="gaussian"``: ``c ~ N(0, 1)``) is not the identity;
``init="zeros"`` is.

PEFT equivalent: ``peft_type="FOURIERFT"`` with the same ``n_frequency``, ``scaling`` and
``random_loc_seed``; ``init_weights=True`` is ``init="zeros"``, ``False`` is ``"gaussian"``;
the coefficients are ``fourierft_spectrum``. PEFT does not save the positions: it draws them
again from the seed when it loads, exactly as here. ``n_frequency_pattern`` has no equivalent.

Sites: linear projections of every layout (``nn.Linear``, GPT-2 ``Conv1D``, slices of fused
projections, the ``in_proj`` slices of ``nn.MultiheadAttention``; a slice draws its positions
for its own ``d_out``). Convolutions are refused, as PEFT's FourierFT refuses them: a 2-D
spectrum of an ``(out, in, *kernel)`` weight is not defined by the paper. ``n_frequency``
above a site's ``d_in · d_out`` is refused before anything is built.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

MAX_SEED = 2**63 - 1


class FourierFTConfig(DeltaConfig):
    n_frequency: int = Field(
        1000,
        ge=1,
        le=2**31 - 1,
        description="number n of trainable spectral coefficients per site; at most d_in · d_out "
        "of every site",
    )
    scaling: float = Field(
        150.0, gt=0.0, le=1e9, description="scale of ΔW = scaling · Re(IDFT2(S))"
    )
    random_loc_seed: int = Field(
        777,
        ge=0,
        le=MAX_SEED,
        description="seed of the generator that draws the spectral positions (fixed, saved)",
    )
    init: Literal["gaussian", "zeros"] = Field(
        "gaussian",
        description="init of the coefficients: 'gaussian' N(0, 1) (PEFT's default), or 'zeros' "
        "(the adapter starts as the identity)",
    )


def spectral_positions(d_out: int, d_in: int, n: int, seed: int) -> Tensor:
    """``(2, n)`` int64 ``(rows, columns)``: the first ``n`` entries of a random permutation
    of the ``d_out · d_in`` entries of a ``(d_out, d_in)`` matrix, drawn on the CPU from a
    generator seeded with ``seed`` (the positions PEFT's FourierFT and WaveFT draw)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=generator)[:n]
    return torch.stack([flat // d_in, flat % d_in])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class FourierFTDelta(ReparameterizedDelta):
    """``ΔW = scaling · Re(ifft2(S))``, ``S`` zero but for ``spectrum`` at ``indices``.

    ``spectrum``: ``(n,)``; ``indices``: ``(2, n)`` int64 buffer.
    """

    def __init__(
        self,
        shape: ProjectionShape,
        n_frequency: int,
        scaling: float,
        random_loc_seed: int,
        init: str = "gaussian",
    ) -> None:
        super().__init__(shape)
        d_in, d_out = shape.in_features, shape.out_features
        if shape.is_conv or n_frequency > d_in * d_out:
            raise ValueError(
                f"FourierFT needs a linear projection with at least n_frequency={n_frequency} "
                f"weights; got d_in={d_in}, d_out={d_out}, layout {shape.layout!r}"
            )
        self.scaling = scaling
        self.register_buffer(
            "indices", spectral_positions(d_out, d_in, n_frequency, random_loc_seed)
        )
        self.spectrum = nn.Parameter(torch.zeros(n_frequency))
        if init == "gaussian":
            with torch.no_grad():
                self.spectrum.normal_()
        elif init != "zeros":
            raise ValueError(f"unknown FourierFT init {init!r}; choose 'gaussian' or 'zeros'")

    def delta_weight(self) -> Tensor:
        """``ΔW`` ``(d_out, d_in)`` in the dtype of ``spectrum``."""
        dtype = _compute_dtype(self.spectrum.dtype)
        dense = self.spectrum.new_zeros(
            (self.shape.out_features, self.shape.in_features), dtype=dtype
        )
        dense = dense.index_put((self.indices[0], self.indices[1]), self.spectrum.to(dtype))
        delta = torch.fft.ifft2(dense).real * self.scaling
        return delta.to(self.spectrum.dtype)


def refuse_conv(method: str, site: Site) -> str | None:
    """Why ``method`` (one of the spectral ones) refuses a convolution site, or None."""
    if isinstance(site, ModuleSite) and site.weight is not None and site.weight.layout == "conv":
        return (
            f"{method} adapts linear projections (nn.Linear, GPT-2 Conv1D, fused q/k/v slices, "
            f"nn.MultiheadAttention in_proj slices), and {site.name!r} is a convolution "
            "(layout 'conv'); target the attention or MLP projections instead (e.g. attn.q, "
            "attn.v, mlp.up), or use lora, which adapts convolutions"
        )
    return None


def frequencies_fit(field: str, n: int, site: Site) -> str | None:
    """Why ``n`` positions do not fit in ``site``'s ``d_out × d_in`` weight, or None."""
    if not isinstance(site, ModuleSite) or site.weight is None or site.weight.layout == "conv":
        return None
    shape = ProjectionShape.of(site)
    size = shape.in_features * shape.out_features
    if n <= size:
        return None
    return (
        f"{field}={n} is more than the {size} entries of site {site.name!r} (d_out="
        f"{shape.out_features} × d_in={shape.in_features}); {field} must be <= {size}"
    )


def _build(cfg: FourierFTConfig, site: Site) -> FourierFTDelta:
    assert isinstance(site, ModuleSite)
    return FourierFTDelta(
        ProjectionShape.of(site), cfg.n_frequency, cfg.scaling, cfg.random_loc_seed, cfg.init
    )


METHOD = Method(
    id="fourierft",
    refuses="convolutions; n_frequency above d_in · d_out of a site",
    family="reparameterized",
    config=FourierFTConfig,
    build=_build,
    num_parameters=lambda cfg, site: cfg.n_frequency,
    formula="n_frequency per projection",
    site_kinds=("projection",),
    accepts=lambda cfg, site: refuse_conv("fourierft", site),
    size_check=lambda cfg, site: frequencies_fit("n_frequency", cfg.n_frequency, site),
    default_targets=("attn.q", "attn.v"),
    budget_field="n_frequency",
    mergeable=True,
    identity_at_init=lambda cfg: cfg.init == "zeros",
    paper="Gao et al., Parameter-Efficient Fine-Tuning with Discrete Fourier Transform, 2024, "
    "arXiv:2405.03003",
    summary="trainable coefficients at fixed random positions of ΔW's 2-D spectrum; mergeable",
)
