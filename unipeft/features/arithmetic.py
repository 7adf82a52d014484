"""Adapter arithmetic: a weighted combination of adapters of one model, as a new adapter.

::

    from unipeft.features.arithmetic import combine

    combine(model, {"a": 0.7, "b": 0.3}, "ab", how="linear")

``how`` chooses the rule (see ``docs/arithmetic.md`` for the full semantics):

``linear``
    LoRA sources: exact, ``ΔW_new = Σ_i w_i ΔW_i`` at every site, by concatenating the
    sources' factors (rank ``Σ_i r_i``). Any other method whose delta parameters have the same
    shapes in every source: ``p_new = Σ_i w_i p_i`` for every parameter (parameter averaging,
    which for non-linear deltas such as bottleneck adapters is *not* the weighted sum of the
    sources' outputs).
``svd``
    Reparameterized sources (a ``delta_weight()``): the dense ``Σ_i w_i ΔW_i``, truncated by
    SVD to ``rank`` (default: the largest source rank), as a new LoRA adapter.
``ties``
    TIES-merging (Yadav et al., 2023): trim each task vector to its largest ``density``
    fraction, elect a sign per entry, average the weighted entries that agree with it.
``dare``
    DARE (Yu et al., 2023): drop each task-vector entry with probability ``1 - density``,
    rescale the kept ones by ``1 / density``, then take the weighted sum.

For ``ties`` and ``dare`` the task vector of a LoRA source at a site is its dense ``ΔW``
and the result is refactored into a LoRA adapter by SVD (default rank: exact); for any
other method it is the delta's parameters, flattened, and the result is written back into
parameters of the same method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ..contract.deltas import DeltaModule, ReparameterizedDelta
from ..contract.errors import AdapterError
from ..contract.plan import AdapterPlan
from ..contract.sites import Site
from ..methods.reparameterized.lora import LoraDelta
from ..model import Adapter

if TYPE_CHECKING:
    from ..model import DeltaModel

How = Literal["linear", "svd", "ties", "dare"]
HOWS: tuple[str, ...] = ("linear", "svd", "ties", "dare")

__all__ = ["HOWS", "How", "combine", "dare", "dare_mask", "lora_factors", "ties", "trim"]


@dataclass(frozen=True)
class _Source:
    """One source adapter and its weight."""

    adapter: Adapter
    weight: float


# --------------------------------------------------------------------------- public


def combine(
    model: DeltaModel,
    weights: Mapping[str, float],
    new_name: str,
    how: How = "linear",
    *,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
) -> Adapter:
    """Add adapter ``new_name`` to ``model``: the ``how`` combination of ``weights``' adapters.

    Args:
        model: the :class:`~unipeft.DeltaModel` holding the source adapters.
        weights: source adapter name -> weight ``w_i`` (any finite real; negative subtracts).
        new_name: the new adapter's name (must be free).
        how: ``"linear"``, ``"svd"``, ``"ties"`` or ``"dare"`` (see the module docstring
            and ``docs/arithmetic.md``).
        rank: rank of the LoRA adapter made by ``svd`` (default: largest source rank) or by
            ``ties``/``dare`` on LoRA sources (default: the smallest rank reproducing every
            site's combined ``ΔW`` to float precision). Not used by other combinations.
        density: kept fraction for ``ties`` (trim) and ``dare`` (keep probability), in
            ``(0, 1]``. Ignored by ``linear`` and ``svd``.
        seed: seed of the ``torch.Generator`` drawing ``dare``'s drop masks.

    Returns:
        The new :class:`~unipeft.Adapter`. It is inactive, unless the model had no active
        adapter, in which case it becomes the active one (as ``add_adapter`` does).

    Raises:
        AdapterError: unknown or taken names, sources of different methods or sites,
            options that do not fit ``how`` or the method.
        ConfigError: the new LoRA adapter's rank is above LoraConfig's limit (4096).

        On any error the model is unchanged.
    """
    model.check_adapter_name(new_name)
    _check_how(how)
    sources = _sources(model, weights)
    sites = _common_sites(sources)
    _check_options(how, rank, density, seed)
    lora = _all_lora(model, sources, sites)
    if how == "linear":
        plan = _linear_lora(model, sources, sites) if lora else _params_plan(model, sources, sites)
    elif how == "svd":
        plan = _svd_plan(model, sources, sites, rank)
    elif lora:
        plan = _refactored_plan(model, sources, sites, how, rank, density, seed)
    else:
        if rank is not None:
            raise AdapterError(
                f"rank={rank} was given, but how={how!r} on method "
                f"{sources[0].adapter.method.id!r} combines parameters and makes no LoRA "
                "adapter; leave rank out"
            )
        plan = _params_plan(model, sources, sites, how, density, seed)
    return model.attach(new_name, plan)  # on failure the model is left as it was


# --------------------------------------------------------------------------- validation


def _check_how(how: str) -> None:
    if how not in HOWS:
        raise AdapterError(f"how={how!r} is not a combination; choose one of {', '.join(HOWS)}")


def _sources(model: DeltaModel, weights: Mapping[str, float]) -> list[_Source]:
    """The source adapters with their weights, in the mapping's order."""
    if not isinstance(weights, Mapping) or not weights:
        raise AdapterError(
            "weights must be a non-empty mapping of adapter name -> weight, e.g. "
            f"{{'a': 0.5, 'b': 0.5}}; got {weights!r}"
        )
    out = []
    for name, w in weights.items():
        adapter = model.get_adapter(name)
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(float(w)):
            raise AdapterError(f"the weight of adapter {name!r} must be a finite number, got {w!r}")
        out.append(_Source(adapter, float(w)))
    return out


def _common_sites(sources: list[_Source]) -> list[Site]:
    """The sites every source attaches to (the first source's order); one method for all."""
    first = sources[0].adapter
    for src in sources[1:]:
        other = src.adapter
        if other.method.id != first.method.id:
            raise AdapterError(
                f"adapters {first.name!r} and {other.name!r} use different methods "
                f"({first.method.id!r} and {other.method.id!r}); only adapters of one method "
                "can be combined"
            )
        mine = {s.name for s in first.sites}
        theirs = {s.name for s in other.sites}
        if mine != theirs:
            only_first = sorted(mine - theirs)
            only_other = sorted(theirs - mine)
            raise AdapterError(
                f"adapters {first.name!r} and {other.name!r} attach at different sites "
                f"(only {first.name!r}: {only_first or 'none'}; only {other.name!r}: "
                f"{only_other or 'none'}); combine adapters made with the same targets"
            )
    return list(first.sites)


def _check_options(how: str, rank: int | None, density: float, seed: int) -> None:
    if rank is not None:
        if how == "linear":
            raise AdapterError(
                "rank is not used by how='linear' (on LoRA it is exact, with the sum of the "
                "sources' ranks); leave rank out, or use how='svd' to choose a rank"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    if how in ("ties", "dare"):
        ok = isinstance(density, Real) and not isinstance(density, bool)
        if not ok or not 0.0 < float(density) <= 1.0:
            raise AdapterError(
                f"density must be a number in (0, 1] (the kept fraction), got {density!r}"
            )
    if how == "dare" and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise AdapterError(f"seed must be an integer, got {seed!r}")


def _delta(model: DeltaModel, src: _Source, site: Site) -> DeltaModule:
    return src.adapter.delta_at(site)


def _all_lora(model: DeltaModel, sources: list[_Source], sites: list[Site]) -> bool:
    """Whether the sources are LoRA adapters (a :class:`LoraDelta` at every site)."""
    if sources[0].adapter.method.id != "lora":
        return False
    return all(isinstance(_delta(model, s, site), LoraDelta) for s in sources for site in sites)


# --------------------------------------------------------------------------- linear on LoRA


def _linear_lora(model: DeltaModel, sources: list[_Source], sites: list[Site]) -> AdapterPlan:
    """Exact weighted sum by concatenated factors.

    At each site, with source ``i`` holding ``A_i (r_i, in, *k)``, ``B_i (out, r_i)`` and
    scaling ``s_i``: ``A = cat_i A_i`` is ``(R, in, *k)``, ``B = cat_i (w_i s_i B_i)`` is
    ``(out, R)`` with ``R = Σ r_i``; the new config has ``alpha = r = R`` (scaling 1), so
    ``ΔW = B A = Σ_i w_i s_i B_i A_i = Σ_i w_i ΔW_i``.
    """
    states = {}
    for site in sites:
        parts = [(s.weight, _delta(model, s, site)) for s in sources]
        dtype = _work_dtype(parts[0][1].A)
        a = torch.cat([d.A.detach().to(dtype) for _, d in parts], dim=0)
        b = torch.cat([d.B.detach().to(dtype) * (w * d.scaling) for w, d in parts], dim=1)
        states[site.name] = {"A": a, "B": b}
    total = sum(_lora_rank(model, s) for s in sources)
    return _lora_plan(model, sources, sites, total, states)


def _lora_rank(model: DeltaModel, src: _Source) -> int:
    first = _delta(model, src, src.adapter.sites[0])
    assert isinstance(first, LoraDelta)
    return first.r


def _lora_plan(
    model: DeltaModel,
    sources: list[_Source],
    sites: list[Site],
    r: int,
    states: dict[str, dict[str, Tensor]],
) -> AdapterPlan:
    """A plan for a LoRA adapter of rank ``r`` and scaling 1 (``alpha = r``, no rsLoRA)."""
    spec = model.registry.method("lora")
    dropouts = {getattr(s.adapter.config, "dropout", 0.0) for s in sources}
    dropout = dropouts.pop() if len(dropouts) == 1 else 0.0
    cfg = spec.config.parse(
        spec.id, {"r": r, "alpha": float(r), "dropout": dropout, "use_rslora": False}
    )
    return AdapterPlan(
        spec, cfg, tuple(sites), tuple(sources[0].adapter.targets), states, model.structure_map
    )


# --------------------------------------------------------------------------- dense ΔW paths


def _work_dtype(t: Tensor) -> torch.dtype:
    """float64 for the arithmetic, where the device has it."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _dense(delta: DeltaModule, site: Site, name: str) -> Tensor:
    """``ΔW`` of a reparameterized delta, ``(out, in, *kernel)``, in the work dtype."""
    if not isinstance(delta, ReparameterizedDelta):
        raise AdapterError(
            f"adapter {name!r} at site {site.name!r} is a {type(delta).__name__}, which has no "
            "delta weight ΔW; how='svd' needs a reparameterized method (lora...), use "
            "how='linear', 'ties' or 'dare' for others"
        )
    if delta.delta_bias() is not None:
        raise AdapterError(
            f"adapter {name!r} at site {site.name!r} also changes the bias, which a LoRA "
            "adapter cannot hold; how='svd' needs deltas that change the weight only"
        )
    with torch.no_grad():
        if isinstance(delta, LoraDelta):  # from the factors, so it stays exactly low-rank
            dtype = _work_dtype(delta.A)
            a = delta.A.detach().to(dtype).reshape(delta.r, -1)
            w = (delta.B.detach().to(dtype) @ a) * delta.scaling
            return w.reshape(delta.B.shape[0], *delta.A.shape[1:])
        w = delta.delta_weight().detach()
    return w.to(_work_dtype(w))


def _svd_plan(
    model: DeltaModel, sources: list[_Source], sites: list[Site], rank: int | None
) -> AdapterPlan:
    """Dense ``Σ_i w_i ΔW_i`` per site, truncated to ``rank`` by SVD, as LoRA."""
    sums: dict[str, Tensor] = {}
    source_rank = 0
    for site in sites:
        total: Tensor | None = None
        for src in sources:
            delta = _delta(model, src, site)
            dw = _dense(delta, site, src.adapter.name)
            if isinstance(delta, LoraDelta):
                source_rank = max(source_rank, delta.r)
            else:
                source_rank = max(source_rank, _numerical_rank(dw, _eps(delta)))
            total = dw * src.weight if total is None else total + dw * src.weight
        assert total is not None
        sums[site.name] = total
    r = rank if rank is not None else max(1, source_rank)
    return _factored_plan(model, sources, sites, sums, r)


def _refactored_plan(
    model: DeltaModel,
    sources: list[_Source],
    sites: list[Site],
    how: str,
    rank: int | None,
    density: float,
    seed: int,
) -> AdapterPlan:
    """``ties``/``dare`` on the dense ``ΔW`` of LoRA sources, refactored into LoRA."""
    gen = torch.Generator().manual_seed(seed)
    combined: dict[str, Tensor] = {}
    for site in sites:
        taus = torch.stack([_dense(_delta(model, s, site), site, s.adapter.name) for s in sources])
        shape = taus.shape[1:]
        flat = taus.reshape(len(sources), -1)
        w = torch.tensor([s.weight for s in sources], dtype=flat.dtype, device=flat.device)
        merged = ties(flat, w, density) if how == "ties" else dare(flat, w, density, gen)
        combined[site.name] = merged.reshape(shape)
    if rank is None:
        ranks = (_numerical_rank(m, float(torch.finfo(m.dtype).eps)) for m in combined.values())
        rank = max([1, *ranks])
    return _factored_plan(model, sources, sites, combined, rank)


def _eps(delta: DeltaModule) -> float:
    """Machine epsilon of the delta's parameters (the precision its ``ΔW`` is computed at)."""
    p = next(delta.parameters())
    return float(torch.finfo(p.dtype).eps)


def _numerical_rank(dw: Tensor, eps: float) -> int:
    """Rank of ``dw`` ``(out, in, *kernel)`` as a matrix ``(out, in·k)``: the singular values
    above ``σ_max · max(out, in·k) · eps`` (0 for a zero matrix)."""
    m = dw.reshape(dw.shape[0], -1)
    s = torch.linalg.svdvals(m)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(m.shape) * eps
    return int((s > tol).sum())


def lora_factors(dw: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Split ``dw`` ``(out, in, *kernel)`` into LoRA factors of rank ``rank`` (scaling 1).

    With ``dw`` as the matrix ``M (out, in·k) = U S Vᵀ``: ``B = U_r S_r^½`` ``(out, rank)`` and
    ``A = S_r^½ V_rᵀ`` reshaped to ``(rank, in, *kernel)``, keeping the ``rank`` largest
    singular values (the best rank-``rank`` approximation, Eckart–Young); ``B A = M`` exactly
    (up to float error) when ``rank`` is at least the rank of ``M``. A ``rank`` above
    ``min(out, in·k)`` is padded with zero rows of ``A`` and zero columns of ``B`` (an
    adapter of such a rank is refused by LoRA's size check at attach).
    """
    out = dw.shape[0]
    m = dw.reshape(out, -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = m.new_zeros(out, rank)
    a = m.new_zeros(rank, m.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return a.reshape(rank, *dw.shape[1:]), b


def _factored_plan(
    model: DeltaModel,
    sources: list[_Source],
    sites: list[Site],
    dense: dict[str, Tensor],
    rank: int,
) -> AdapterPlan:
    states = {}
    for key, dw in dense.items():
        a, b = lora_factors(dw, rank)
        states[key] = {"A": a, "B": b}
    return _lora_plan(model, sources, sites, rank, states)


# --------------------------------------------------------------------------- merging rules


def ties(taus: Tensor, weights: Tensor, density: float) -> Tensor:
    """TIES-merging of task vectors ``taus`` ``(S, n)`` with ``weights`` ``(S,)`` -> ``(n,)``.

    1. Trim: in each row keep the entries whose magnitude is at least the ``k``-th largest,
       ``k = max(1, ⌊density · n + ½⌋)`` (entries tied at the threshold are all kept); the
       others become 0 (``τ̂_i``).
    2. Weight: ``c_i = w_i · τ̂_i``.
    3. Elect: ``γ = sign(Σ_i c_i)`` per entry.
    4. Disjoint mean: ``Σ_{i ∈ A} c_i / |A|`` with ``A`` the sources whose ``c_i`` is non-zero
       and has sign ``γ``; 0 where ``A`` is empty (including where ``γ = 0``).

    With equal weights ``λ`` this is the paper's ``λ · τ_m``.
    """
    trimmed = torch.stack([trim(t, density) for t in taus])
    contrib = weights.to(trimmed.dtype)[:, None] * trimmed
    elected = torch.sign(contrib.sum(dim=0))
    agree = (torch.sign(contrib) == elected) & (contrib != 0)
    count = agree.sum(dim=0)
    total = (contrib * agree).sum(dim=0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def trim(tau: Tensor, density: float) -> Tensor:
    """``tau`` ``(n,)`` with all but its ``max(1, ⌊density · n + ½⌋)`` largest-magnitude
    entries set to 0 (every entry tied with the smallest kept magnitude is kept)."""
    n = tau.numel()
    k = min(n, max(1, math.floor(density * n + 0.5)))
    mag = tau.abs()
    threshold = torch.topk(mag, k).values[-1]
    return torch.where(mag >= threshold, tau, torch.zeros_like(tau))


def dare(taus: Tensor, weights: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE of task vectors ``taus`` ``(S, n)`` with ``weights`` ``(S,)`` -> ``(n,)``.

    For each row ``i`` in order, ``u = torch.rand(n, generator=generator)`` (float32, CPU);
    entries with ``u < density`` are kept and multiplied by ``1 / density``, the others
    dropped; the result is ``Σ_i w_i · τ̃_i``. ``density = 1`` keeps everything (linear).
    """
    total = torch.zeros_like(taus[0])
    for tau, w in zip(taus, weights):
        keep = dare_mask(tau.numel(), density, generator).to(tau.device)
        total = total + w * torch.where(keep, tau / density, torch.zeros_like(tau))
    return total


def dare_mask(n: int, density: float, generator: torch.Generator) -> Tensor:
    """Boolean keep mask ``(n,)``: ``torch.rand(n, generator=generator) < density``."""
    return torch.rand(n, generator=generator) < density


# --------------------------------------------------------------------------- parameter paths


def _params_plan(
    model: DeltaModel,
    sources: list[_Source],
    sites: list[Site],
    how: str = "linear",
    density: float = 1.0,
    seed: int = 0,
) -> AdapterPlan:
    """Combine the sources' parameters site by site into a delta of the same method.

    ``linear``: ``p = Σ_i w_i p_i`` per parameter. ``ties``/``dare``: the task vector of a
    source at a site is all its delta's parameters flattened and concatenated (in
    ``named_parameters`` order), combined by :func:`ties` / :func:`dare` and split back.
    Buffers must be equal in every source and are copied. The config is the first source's.
    """
    first = sources[0].adapter
    residual = any(
        callable(getattr(_delta(model, src, site), "residual", None))
        for src in sources
        for site in sites
    )
    if first.shared is not None or residual:
        what = "tensors shared by all its sites" if first.shared is not None else "a residual"
        raise AdapterError(
            f"how={how!r} combines parameters site by site, and method {first.method.id!r} "
            f"(adapter {first.name!r}) keeps {what} in its function; use how='svd' (the "
            "weighted sum of the dense weight changes, as a LoRA adapter)"
        )
    gen = torch.Generator().manual_seed(seed)
    states = {}
    for site in sites:
        deltas = [_delta(model, s, site) for s in sources]
        names = _check_same_shapes(deltas, sources, site)
        flat = torch.stack([_flatten(d, names) for d in deltas])
        w = torch.tensor([s.weight for s in sources], dtype=flat.dtype, device=flat.device)
        if how == "linear":
            merged = (w[:, None] * flat).sum(dim=0)
        elif how == "ties":
            merged = ties(flat, w, density)
        else:
            merged = dare(flat, w, density, gen)
        states[site.name] = _unflatten(merged, deltas[0], names)
    return AdapterPlan(
        first.method, first.config, tuple(sites), tuple(first.targets), states, model.structure_map
    )


def _check_same_shapes(deltas: list[DeltaModule], sources: list[_Source], site: Site) -> list[str]:
    """The parameter names of the deltas at ``site`` (after checking that every source has
    the same parameters, shapes and buffers there)."""
    ref = deltas[0]
    params = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    buffers = dict(ref.named_buffers())
    for src, delta in zip(sources[1:], deltas[1:]):
        theirs = {n: tuple(p.shape) for n, p in delta.named_parameters()}
        if theirs != params:
            diff = sorted(
                f"{n}: {params.get(n)} vs {theirs.get(n)}"
                for n in params.keys() | theirs.keys()
                if params.get(n) != theirs.get(n)
            )
            raise AdapterError(
                f"adapters {sources[0].adapter.name!r} and {src.adapter.name!r} have delta "
                f"parameters of different shapes at site {site.name!r} ({'; '.join(diff)}); "
                "their parameters cannot be combined entry by entry: use the same config, or "
                "how='svd' for reparameterized methods"
            )
        other = dict(delta.named_buffers())
        same = other.keys() == buffers.keys() and all(
            other[n].shape == b.shape and torch.equal(other[n], b) for n, b in buffers.items()
        )
        if not same:
            raise AdapterError(
                f"adapters {sources[0].adapter.name!r} and {src.adapter.name!r} have different "
                f"buffers at site {site.name!r} (e.g. different sparse masks), so their "
                "parameters do not describe the same entries; they cannot be combined"
            )
    return list(params)


def _flatten(delta: DeltaModule, names: list[str]) -> Tensor:
    """All parameters of ``delta`` named ``names``, flattened and concatenated: ``(n,)``."""
    params = dict(delta.named_parameters())
    first = params[names[0]]
    dtype = _work_dtype(first)
    return torch.cat([params[n].detach().reshape(-1).to(dtype) for n in names])


def _unflatten(flat: Tensor, like: DeltaModule, names: list[str]) -> dict[str, Tensor]:
    """Split ``flat`` ``(n,)`` into a state dict shaped like ``like`` (buffers copied)."""
    params = dict(like.named_parameters())
    state = {n: b.detach().clone() for n, b in like.named_buffers()}
    offset = 0
    for n in names:
        p = params[n]
        state[n] = flat[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return state
