"""WaveFT: a weight change given by a few trainable coefficients of its 2-D wavelet transform.

Bilican et al., 2025, *Exploring Sparsity for Parameter Efficient Fine Tuning Using
Wavelets* (arXiv:2505.12532). At a projection of ``d_out × d_in``, ``n`` positions
``(u_k, v_k)`` are drawn once, as FourierFT draws them (the first ``n`` of a random
permutation of the ``d_out · d_in`` entries, seeded with ``random_loc_seed``), and fixed;
the coefficients ``c_k`` there train. With the inverse transform (``use_idwt``, the default):

    S = 0 ((H, W), padded) except S[p + u_k, q + v_k] = c_k
    ΔW = scaling · crop(IDWT2(S))

``S`` is padded by the filter's reach (``2N - 2`` rows and columns for a filter of length
``2N``, then to even sizes), the positions centred in it (``p = (H - d_out) // 2``,
``q = (W - d_in) // 2``). ``S``'s four quadrants are one level of wavelet coefficients
(top-left: approximation; top-right: detail, high-pass along rows; bottom-left: detail,
high-pass along columns; bottom-right: both), ``IDWT2`` is one level of the separable
inverse transform (an upsampling transposed convolution with the reconstruction filters
along each axis, trimmed by ``L - 2`` at both ends), and ``crop`` keeps the centred
``d_out × d_in`` window. Without it (``use_idwt=False``) ``ΔW = scaling · S`` unpadded: a
sparse update. Computed in float32 (float64 for a float64 backbone).

The filters are computed here, not tabulated: Daubechies ``dbN`` (length ``2N``) by spectral
factorisation of ``P(y) = Σ_{k<N} C(N-1+k, k) y^k``, keeping the roots inside the unit circle
(minimum phase); symlets ``symN`` by the same factorisation with the classical choice of
roots for near-linear phase, given per order below. Coiflets are not provided.

Trainable: ``n`` values per site (``spectrum``); the positions are a persistent ``int64``
buffer ``indices`` ``(2, n)``, saved and loaded, never trained. Nothing is shared across
sites. The default (``init="zeros"``, as PEFT's) is the identity.

PEFT equivalent: ``peft_type="WAVEFT"`` with the same ``n_frequency``, ``scaling``,
``wavelet_family``, ``use_idwt`` and ``random_loc_seed``; ``init_weights=True`` is
``init="zeros"``, ``False`` is ``"gaussian"`` (``N(0, 0.01²)``); the coefficients are
``waveft_spectrum``, and PEFT draws the positions again from the seed when it loads.
``n_frequency_pattern`` and ``proportional_parameters`` have no equivalent, nor do PEFT's
coiflets.

Sites: linear projections of every layout (``nn.Linear``, GPT-2 ``Conv1D``, slices of fused
projections, the ``in_proj`` slices of ``nn.MultiheadAttention``). Convolutions are refused,
as PEFT refuses them. ``n_frequency`` above a site's ``d_in · d_out`` is refused before
anything is built.
"""

from __future__ import annotations

import cmath
import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site
from .fourierft import MAX_SEED, frequencies_fit, refuse_conv, spectral_positions

# Symlets: which groups of roots of P (sorted by real part, then imaginary part; one of each
# conjugate pair) are reflected outside the unit circle. sym2 and sym3 are db2 and db3.
_SYMLET_REFLECTED = {
    2: "0",
    3: "0",
    4: "01",
    5: "10",
    6: "101",
    7: "100",
    8: "0101",
    9: "0110",
    10: "10101",
}
DAUBECHIES = tuple(f"db{n}" for n in range(1, 11))
SYMLETS = tuple(f"sym{n}" for n in _SYMLET_REFLECTED)
WaveletFamily = Literal[
    "db1", "db2", "db3", "db4", "db5", "db6", "db7", "db8", "db9", "db10",
    "sym2", "sym3", "sym4", "sym5", "sym6", "sym7", "sym8", "sym9", "sym10",
]  # fmt: skip


class WaveFTConfig(DeltaConfig):
    n_frequency: int = Field(
        2592,
        ge=1,
        le=2**31 - 1,
        description="number n of trainable wavelet coefficients per site; at most d_in · d_out "
        "of every site",
    )
    scaling: float = Field(25.0, gt=0.0, le=1e9, description="scale of the reconstructed ΔW")
    wavelet_family: WaveletFamily = Field(
        "db1",
        description="the wavelet of the inverse transform: Daubechies db1 (Haar) to db10, or "
        "symlets sym2 to sym10",
    )
    use_idwt: bool = Field(
        True,
        description="reconstruct ΔW with the inverse wavelet transform; False uses the "
        "coefficients directly as a sparse ΔW",
    )
    random_loc_seed: int = Field(
        777,
        ge=0,
        le=MAX_SEED,
        description="seed of the generator that draws the coefficients' positions (fixed, saved)",
    )
    init: Literal["zeros", "gaussian"] = Field(
        "zeros",
        description="init of the coefficients: 'zeros' (PEFT's default; the adapter starts as "
        "the identity) or 'gaussian' N(0, 0.01²)",
    )


# ----------------------------------------------------------------------------- filters


def _daubechies_roots(n: int) -> list[complex]:
    """Roots of ``P(y) = Σ_{k<n} C(n-1+k, k) y^k``, one of each conjugate pair, sorted."""
    if n == 1:
        return []
    coeffs = [float(math.comb(n - 1 + k, k)) for k in range(n)]  # ascending powers
    companion = torch.zeros(n - 1, n - 1, dtype=torch.float64)
    companion[1:, :-1] = torch.eye(n - 2, dtype=torch.float64)
    companion[:, -1] = -torch.tensor(coeffs[:-1], dtype=torch.float64) / coeffs[-1]
    roots = [complex(r) for r in torch.linalg.eigvals(companion).tolist()]
    kept = [r for r in roots if r.imag > -1e-12]
    return sorted(kept, key=lambda r: (round(r.real, 9), r.imag))


@functools.cache
def reconstruction_lowpass(family: str) -> tuple[float, ...]:
    """The reconstruction low-pass filter of ``family`` (``dbN`` or ``symN``): length ``2N``,
    summing to ``sqrt(2)``, unit norm."""
    if family in DAUBECHIES:
        n, reflected = int(family[2:]), None
    elif family in SYMLETS:
        n = int(family[3:])
        reflected = _SYMLET_REFLECTED[n]
    else:
        raise ValueError(f"unknown wavelet {family!r}; choose one of {DAUBECHIES + SYMLETS}")
    poly: list[complex] = [1.0]
    factors: list[complex] = [-1.0] * n  # N zeros at z = -1
    for i, y in enumerate(_daubechies_roots(n)):
        c = 1.0 - 2.0 * y  # y = (2 - z - 1/z) / 4  <=>  z² - 2c z + 1 = 0
        root = c - cmath.sqrt(c * c - 1.0)
        if abs(root) > 1.0:
            root = 1.0 / root
        if reflected is not None and reflected[i] == "1":
            root = 1.0 / root
        factors += [root] if abs(y.imag) < 1e-12 else [root, root.conjugate()]
    for r in factors:  # poly *= (1 - r z⁻¹), coefficients of z⁻ᵏ
        poly = [a - r * b for a, b in zip([*poly, 0.0], [0.0, *poly], strict=True)]
    total = sum(p.real for p in poly)
    return tuple(p.real * math.sqrt(2.0) / total for p in poly)


def filter_bank(family: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(2, 1, L)``: the low-pass and high-pass reconstruction filters of ``family``."""
    lo = reconstruction_lowpass(family)
    length = len(lo)
    hi = [(-1) ** k * lo[length - 1 - k] for k in range(length)]
    return torch.tensor([[lo], [hi]], dtype=dtype, device=device)


def _synthesis(low: Tensor, high: Tensor, bank: Tensor) -> Tensor:
    """One level of the 1-D inverse transform along the last dim: ``(B, n)`` low and high
    bands -> ``(B, 2n - L + 2)``: the upsampled bands convolved with their filters, summed,
    and trimmed by ``L - 2`` samples at each end."""
    length = bank.shape[-1]
    n = low.shape[-1]
    full = F.conv_transpose1d(torch.stack([low, high], dim=1), bank, stride=2)
    return full[:, 0, length - 2 : 2 * n]


def inverse_dwt2(coefficients: Tensor, bank: Tensor) -> Tensor:
    """One level of the separable 2-D inverse transform of ``(H, W)`` (both even) whose
    quadrants are ``[[approximation, high along rows], [high along columns, both]]``."""
    h, w = coefficients.shape
    quads = coefficients.reshape(2, h // 2, 2, w // 2)  # [row half, i, column half, j]
    # along the columns first: the left quadrants are low-pass there, the right high-pass
    # (the row-high-pass detail sits top right, so each row-band pairs top with bottom)
    rows_low = _synthesis(quads[0, :, 0], quads[1, :, 0], bank)  # (h/2, W')
    rows_high = _synthesis(quads[0, :, 1], quads[1, :, 1], bank)
    return _synthesis(rows_low.t(), rows_high.t(), bank).t()  # (H', W')


# ----------------------------------------------------------------------------- the delta


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class WaveFTDelta(ReparameterizedDelta):
    """``ΔW = scaling · crop(IDWT2(S))``, ``S`` zero but for ``spectrum`` at ``indices``
    (shifted to the centre of the padded coefficient matrix).

    ``spectrum``: ``(n,)``; ``indices``: ``(2, n)`` int64 buffer, in ``(d_out, d_in)``.
    """

    def __init__(
        self,
        shape: ProjectionShape,
        n_frequency: int,
        scaling: float,
        wavelet_family: str = "db1",
        use_idwt: bool = True,
        random_loc_seed: int = 777,
        init: str = "zeros",
    ) -> None:
        super().__init__(shape)
        d_in, d_out = shape.in_features, shape.out_features
        if shape.is_conv or n_frequency > d_in * d_out:
            raise ValueError(
                f"WaveFT needs a linear projection with at least n_frequency={n_frequency} "
                f"weights; got d_in={d_in}, d_out={d_out}, layout {shape.layout!r}"
            )
        reconstruction_lowpass(wavelet_family)  # an unknown family fails here, not in forward
        self.scaling = scaling
        self.wavelet_family = wavelet_family
        self.use_idwt = use_idwt
        self.register_buffer(
            "indices", spectral_positions(d_out, d_in, n_frequency, random_loc_seed)
        )
        self.spectrum = nn.Parameter(torch.zeros(n_frequency))
        if init == "gaussian":
            with torch.no_grad():
                self.spectrum.normal_().mul_(0.01)
        elif init != "zeros":
            raise ValueError(f"unknown WaveFT init {init!r}; choose 'zeros' or 'gaussian'")

    def padded_size(self) -> tuple[int, int]:
        """``(H, W)`` of the coefficient matrix: the weight's size grown by the filter's
        reach, then to even sizes."""
        reach = len(reconstruction_lowpass(self.wavelet_family)) - 2
        h, w = self.shape.out_features + reach, self.shape.in_features + reach
        return h + h % 2, w + w % 2

    def delta_weight(self) -> Tensor:
        """``ΔW`` ``(d_out, d_in)`` in the dtype of ``spectrum``."""
        d_out, d_in = self.shape.out_features, self.shape.in_features
        dtype = _compute_dtype(self.spectrum.dtype)
        values = self.spectrum.to(dtype)
        rows, cols = self.indices[0], self.indices[1]
        if not self.use_idwt:
            dense = values.new_zeros((d_out, d_in)).index_put((rows, cols), values)
            return (dense * self.scaling).to(self.spectrum.dtype)
        h, w = self.padded_size()
        top, left = (h - d_out) // 2, (w - d_in) // 2
        dense = values.new_zeros((h, w)).index_put((rows + top, cols + left), values)
        bank = filter_bank(self.wavelet_family, dtype, values.device)
        full = inverse_dwt2(dense, bank)
        top, left = (full.shape[0] - d_out) // 2, (full.shape[1] - d_in) // 2
        delta = full[top : top + d_out, left : left + d_in] * self.scaling
        return delta.to(self.spectrum.dtype)


def _build(cfg: WaveFTConfig, site: Site) -> WaveFTDelta:
    assert isinstance(site, ModuleSite)
    return WaveFTDelta(
        ProjectionShape.of(site),
        cfg.n_frequency,
        cfg.scaling,
        cfg.wavelet_family,
        cfg.use_idwt,
        cfg.random_loc_seed,
        cfg.init,
    )


METHOD = Method(
    id="waveft",
    refuses="convolutions; n_frequency above d_in · d_out of a site",
    family="reparameterized",
    config=WaveFTConfig,
    build=_build,
    num_parameters=lambda cfg, site: cfg.n_frequency,
    formula="n_frequency per projection",
    site_kinds=("projection",),
    accepts=lambda cfg, site: refuse_conv("waveft", site),
    size_check=lambda cfg, site: frequencies_fit("n_frequency", cfg.n_frequency, site),
    default_targets=("attn.q", "attn.v"),
    budget_field="n_frequency",
    mergeable=True,
    identity_at_init=lambda cfg: cfg.init == "zeros",
    paper="Bilican et al., Exploring Sparsity for Parameter Efficient Fine Tuning Using "
    "Wavelets, 2025, arXiv:2505.12532",
    summary="trainable coefficients at fixed random positions of ΔW's 2-D wavelet transform "
    "(inverse transform in torch); mergeable",
)
