"""C3A: a block-circulant weight change, applied as circular convolutions in the FFT domain.

Chen et al., 2024, *Parameter-Efficient Fine-Tuning via Circular Convolution*
(arXiv:2407.19342). With block size ``b`` dividing both ``d_in`` and ``d_out``, the update of
a projection is a grid of ``(d_out / b) × (d_in / b)`` circulant blocks, each defined by one
kernel row ``w_ij`` of length ``b``:

    ΔW = C / d_in        C[i·b + t, j·b + s] = w_ij[(s - t) mod b]

so that on input block ``x_j`` the output block ``i`` is the circular cross-correlation
``Σ_j Σ_l w_ij[l] x_j[t + l]``. The forward never forms ``ΔW``: it computes
``irfft(Σ_j conj(rfft(w_ij)) · rfft(x_j)) / d_in``, ``O(d_in log b + d_in·d_out / b)`` per
token, in float32 (float64 for a float64 backbone) as FFTs need. ``merge()`` builds ``ΔW``
exactly, by indexing the kernel (no FFT). Trainable: the kernel ``(d_out/b, d_in/b, b)``, so
``d_in · d_out / b`` values per site. Nothing is shared across sites.

The PEFT default (``init="xavier_uniform"``) is not the identity; ``init="zeros"`` is.

PEFT equivalent: ``peft_type="C3A"``: ``block_size`` is ``block_size``; ``init_weights``
``True`` is ``init="zeros"``, ``False``/``"xavier_uniform"`` is ``"xavier_uniform"``, and
``"kaiming_uniform"``/``"gaussian"`` keep their names; the kernel is ``c3a_kernel``.
``block_size_pattern`` (a block size per module) has no equivalent.

Sites: linear projections of every layout (``nn.Linear``, GPT-2 ``Conv1D``, slices of fused
projections, the ``in_proj`` slices of ``nn.MultiheadAttention``). Convolutions are refused:
a circulant structure over ``(out, in·kernel)`` is not what the paper defines, and PEFT's C3A
takes ``nn.Linear`` only. A ``block_size`` that does not divide a site's ``d_in`` and
``d_out`` is refused before anything is built, naming the widths and their gcd.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

C3AInit = Literal["xavier_uniform", "kaiming_uniform", "gaussian", "zeros"]


class C3AConfig(DeltaConfig):
    block_size: int = Field(
        256,
        ge=1,
        le=65536,
        description="size b of the circulant blocks; must divide d_in and d_out of every site "
        "(the trainable count is d_in · d_out / b per site, so a larger b trains fewer values)",
    )
    init: C3AInit = Field(
        "xavier_uniform",
        description="init of the kernel: 'xavier_uniform' (PEFT's default; U(±sqrt(6 / (d_in + "
        "d_out)))), 'kaiming_uniform' (U(±sqrt(1 / d_in))), 'gaussian' (N(0, 1)), or 'zeros' "
        "(the adapter starts as the identity)",
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs run in float32, or float64 when the tensors are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class C3ADelta(ReparameterizedDelta):
    """``y + irfft(Σ_j conj(rfft(w_ij)) rfft(x_j)) / d_in`` per output block ``i``.

    ``kernel``: ``(d_out / b, d_in / b, b)``.
    """

    def __init__(self, shape: ProjectionShape, block_size: int, init: str = "xavier_uniform"):
        super().__init__(shape)
        d_in, d_out, b = shape.in_features, shape.out_features, block_size
        if shape.is_conv or d_in % b or d_out % b:
            raise ValueError(
                f"C3A needs a linear projection whose widths the block size divides; got "
                f"d_in={d_in}, d_out={d_out}, block_size={b}, layout {shape.layout!r}"
            )
        self.block_size = b
        self.kernel = nn.Parameter(torch.zeros(d_out // b, d_in // b, b))
        self.reset(init)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        """Initialise the kernel as PEFT's ``init_weights`` does (see :class:`C3AConfig`)."""
        d_in, d_out = self.shape.in_features, self.shape.out_features
        if init == "zeros":
            self.kernel.zero_()
        elif init == "gaussian":
            self.kernel.normal_()
        elif init == "xavier_uniform":
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (d_in + d_out))
            self.kernel.uniform_(-bound, bound)
        elif init == "kaiming_uniform":
            bound = math.sqrt(1.0 / d_in)
            self.kernel.uniform_(-bound, bound)
        else:
            raise ValueError(f"unknown C3A init {init!r}; choose one of {get_args(C3AInit)}")

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        b = self.block_size
        m, n, _ = self.kernel.shape
        dtype = _compute_dtype(x.dtype)
        blocks = x.to(dtype).reshape(*x.shape[:-1], n, b)
        spectrum = torch.fft.rfft(blocks, dim=-1)  # (..., n, b//2 + 1)
        kernel = torch.fft.rfft(self.kernel.to(dtype), dim=-1).conj()  # (m, n, b//2 + 1)
        mixed = torch.einsum("...nf,mnf->...mf", spectrum, kernel)
        out = torch.fft.irfft(mixed, n=b, dim=-1).reshape(*x.shape[:-1], m * b)
        return y + (out / self.shape.in_features).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """``ΔW`` ``(d_out, d_in)``, built exactly by indexing the kernel, in its dtype."""
        b = self.block_size
        m, n, _ = self.kernel.shape
        t = torch.arange(b, device=self.kernel.device)
        shift = (t[None, :] - t[:, None]) % b  # [t, s] -> (s - t) mod b
        blocks = self.kernel[:, :, shift]  # (m, n, t, s)
        dense = blocks.permute(0, 2, 1, 3).reshape(m * b, n * b)
        return dense / self.shape.in_features


def _refuse_conv(cfg: C3AConfig, site: Site) -> str | None:
    if isinstance(site, ModuleSite) and site.weight is not None and site.weight.layout == "conv":
        return (
            f"c3a adapts linear projections (nn.Linear, GPT-2 Conv1D, fused q/k/v slices, "
            f"nn.MultiheadAttention in_proj slices), and {site.name!r} is a convolution "
            "(layout 'conv'); target the attention or MLP projections instead (e.g. attn.q, "
            "attn.v, mlp.up), or use lora, which adapts convolutions"
        )
    return None


def _sizes_fit(cfg: C3AConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite) or site.weight is None or site.weight.layout == "conv":
        return None
    shape = ProjectionShape.of(site)
    d_in, d_out, b = shape.in_features, shape.out_features, cfg.block_size
    if d_in % b == 0 and d_out % b == 0:
        return None
    g = math.gcd(d_in, d_out)
    return (
        f"block_size={b} does not divide the widths of site {site.name!r} (d_in={d_in}, "
        f"d_out={d_out}); block_size must be a common divisor of d_in and d_out: a divisor of "
        f"{g} (their gcd), at most {g}"
    )


def _build(cfg: C3AConfig, site: Site) -> C3ADelta:
    assert isinstance(site, ModuleSite)
    return C3ADelta(ProjectionShape.of(site), cfg.block_size, cfg.init)


def _count(cfg: C3AConfig, site: Site) -> int:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    return shape.in_features * shape.out_features // cfg.block_size


METHOD = Method(
    id="c3a",
    refuses="convolutions; a block_size that does not divide both widths of a site",
    family="reparameterized",
    config=C3AConfig,
    build=_build,
    num_parameters=_count,
    formula="d_in · d_out / block_size per projection",
    site_kinds=("projection",),
    accepts=_refuse_conv,
    size_check=_sizes_fit,
    default_targets=("attn.q", "attn.v"),
    mergeable=True,
    identity_at_init=lambda cfg: cfg.init == "zeros",
    paper="Chen et al., Parameter-Efficient Fine-Tuning via Circular Convolution, 2024, "
    "arXiv:2407.19342",
    summary="block-circulant weight change computed with FFTs; mergeable",
)
