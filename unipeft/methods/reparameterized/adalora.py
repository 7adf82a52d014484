"""AdaLoRA: an SVD-form low-rank update whose rank is allocated across sites during training.

Zhang et al., *Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning* (ICLR 2023,
arXiv:2303.10512). At every projection site the update is written as a singular value
decomposition:

    ΔW = s · P diag(E ⊙ m) Q        s = alpha / (init_r + 1e-5)
    y' = y + s · ((dropout(x) Qᵀ) ⊙ (E ⊙ m)) Pᵀ

with ``P`` (``B`` here, ``d_out × init_r``), ``E`` (``init_r``) and ``Q`` (``A`` here,
``init_r × d_in·k``) trained, and ``m`` a 0/1 mask over the singular values (a persistent
buffer, saved with the adapter). ``E`` starts at zero and ``A``, ``B`` at ``N(0, 0.02²)``, so
the adapter starts as the identity. The ``1e-5`` and the ``init_r`` in ``s`` are PEFT's
(``scaling / (ranknum + 1e-5)``, where ``ranknum`` stays ``init_r`` even after pruning).
``delta.aux_loss()`` is the orthogonality regulariser ``orth_reg_weight · mean over the
adapter's factors of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F`` (each delta returns its share, so
``DeltaModel.aux_loss()`` sums to the mean). :class:`unipeft.training.Trainer` adds
``model.aux_loss()`` to the loss by itself; with a Hugging Face ``Trainer`` add it yourself
(override ``compute_loss`` to return ``super().compute_loss(...) + model.aux_loss()``), as
PEFT's ``AdaLoraModel.forward`` adds it to ``outputs.loss``. Without it the schedule still
runs; only the regulariser is missing.

**Shared across sites**: the rank allocator (:class:`AdaLoraAllocator`, the adapter's shared
module). It holds the schedule's step counter (a persistent buffer) and exponential moving
averages of each parameter's sensitivity ``I = |p · ∂L/∂p|`` (``Ī ← β1 Ī + (1−β1) I``) and of
its uncertainty (``Ū ← β2 Ū + (1−β2) |I − Ī|``), in float32, kept in memory only (not saved,
as in PEFT: a run resumed mid-schedule restarts them; the step and the masks are saved).
A singular value's importance is ``Ī Ū`` of its ``E`` entry plus the mean of ``Ī Ū`` over its
row of ``A`` and its column of ``B``. The budget (kept singular values over ALL sites) is
``init_r · n`` up to step ``tinit``, then falls cubically,
``int((init_r·n − target_r·n) · (1 − (t − tinit)/(total_step − tfinal − tinit))³ + target_r·n)``,
and every ``delta_t`` steps the masks keep the ``budget`` most important singular values over
all sites (exactly that many: ties are broken arbitrarily, where PEFT's ``<= threshold``
masks every tied value); at step ``total_step − tfinal`` they keep exactly
``target_r · n`` and are fixed from then on, and the averages are dropped. A singular value
that comes back after being masked restarts from ``E = 0``, as it does in PEFT, which zeroes
it when it masks it.

**When it runs, and how it differs from PEFT**: unipeft calls the allocator's
``after_backward`` at the end of every backward pass that gave the adapter gradients while
the model is in training mode (any training loop: plain PyTorch,
:class:`unipeft.training.Trainer`, an unmodified Hugging Face ``Trainer``); nothing needs to
be called by hand. The n-th such pass is step n (1-based), so training ``total_step`` steps
ends with the final allocation. PEFT's ``update_and_allocate(global_step)`` is called by the
user *after* ``optimizer.step()`` and zeroes masked ``E`` entries in place; here the
importance is read from the gradients *before* the optimizer step (the sensitivities use the
parameters the gradients were computed at) and pruning is the mask ``m``, which forward and
``merged()`` apply, so what the optimizer then does to a masked entry does not matter. With
gradient accumulation every micro-batch's backward is a step: count ``total_step`` in
backward passes. ``total_step=None`` (the default) keeps every singular value (no schedule;
a warning says so once when training starts).

**PEFT equivalent**: ``peft_type="ADALORA"`` (``AdaLoraConfig``): ``init_r``, ``target_r``,
``tinit``, ``tfinal``, ``beta1``, ``beta2``, ``orth_reg_weight`` and ``total_step`` keep their
names, ``deltaT`` is ``delta_t``, ``lora_alpha`` is ``alpha``, ``lora_dropout`` is
``dropout``; PEFT's ``lora_A``/``lora_E``/``lora_B`` are ``A``, ``E`` (``(r,)`` here,
``(r, 1)`` there) and ``B``, and its ``rank_pattern`` is the masks (see
:mod:`unipeft.features.interop.codecs.adalora`).

**Sites**: every projection layout (Linear, GPT-2 ``Conv1D``, convolutions, with ``A``
flattened to ``(init_r, d_in·k)`` as PEFT's ``SVDConv2d`` does, slices of fused projections,
``nn.MultiheadAttention`` in_proj slices). Nothing is refused beyond non-projection sites
(norms, sublayer paths, token sequences), which have no weight for an SVD-form update:
target projections (``attn.q``, ``attn.v``, ``mlp.up``...) instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...blocks import add_low_rank, low_rank_refusal
from ...contract.config import DeltaConfig
from ...contract.deltas import DeltaModule, ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import Site

RANKNUM_EPS = 1e-5
"""PEFT's ``ranknum + 1e-5`` in the scaling ``alpha / (init_r + 1e-5)``."""

INIT_STD = 0.02
"""Standard deviation of the initial ``A`` and ``B`` (PEFT's ``reset_lora_parameters``)."""


class AdaLoraConfig(DeltaConfig):
    """AdaLoRA's fields (PEFT's names, ``deltaT`` as ``delta_t``, ``lora_alpha`` as
    ``alpha``, ``lora_dropout`` as ``dropout``)."""

    init_r: int = Field(
        12, ge=1, le=4096, description="initial rank of every site's update (singular values)"
    )
    target_r: int = Field(
        8,
        ge=1,
        le=4096,
        description="average rank at the end of the schedule: target_r × (number of sites) "
        "singular values are kept over all sites; <= init_r",
    )
    alpha: float = Field(
        8.0, gt=0, description="scale numerator: ΔW is scaled by alpha / (init_r + 1e-5)"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the update's input")
    tinit: int = Field(
        0, ge=0, le=10**9, description="warm-up steps before any singular value is pruned"
    )
    tfinal: int = Field(
        0, ge=0, le=10**9, description="final steps with the allocation fixed at target_r"
    )
    delta_t: int = Field(
        1, ge=1, le=10**9, description="steps between two allocations (PEFT's deltaT)"
    )
    beta1: float = Field(
        0.85, gt=0.0, lt=1.0, description="EMA factor of the sensitivity |p · grad|"
    )
    beta2: float = Field(
        0.85, gt=0.0, lt=1.0, description="EMA factor of the sensitivity's uncertainty"
    )
    orth_reg_weight: float = Field(
        0.5,
        ge=0.0,
        le=1e6,
        description="weight of the orthogonality regulariser on A and B (aux_loss)",
    )
    total_step: int | None = Field(
        None,
        ge=1,
        le=10**9,
        description="training steps (backward passes) of the schedule; None: no pruning, "
        "every singular value is kept",
    )

    @model_validator(mode="after")
    def _schedule_fits(self) -> AdaLoraConfig:
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r ({self.target_r}) must be <= init_r ({self.init_r}): the schedule "
                "only prunes singular values"
            )
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit ({self.tinit}) must be < total_step - tfinal "
                f"({self.total_step} - {self.tfinal}): the schedule needs a pruning phase. "
                "Lower tinit or tfinal, or raise total_step"
            )
        return self


# ------------------------------------------------------------------------------ the delta


class AdaLoraDelta(ReparameterizedDelta):
    """``y + s · ((dropout(x) Aᵀ) ⊙ (E ⊙ mask)) Bᵀ`` on one projection.

    ``A``: ``(init_r, d_in·k)``, ``E``: ``(init_r,)``, ``B``: ``(d_out, init_r)``;
    ``mask``: ``(init_r,)`` of 0/1, a persistent buffer the allocator rewrites.
    """

    def __init__(
        self,
        shape: ProjectionShape,
        init_r: int,
        alpha: float,
        dropout: float = 0.0,
        orth_reg_weight: float = 0.0,
        num_sites: int = 1,
    ) -> None:
        super().__init__(shape)
        self.r = init_r
        self.scaling = alpha / (init_r + RANKNUM_EPS)
        self.orth_reg_weight = orth_reg_weight
        self.num_sites = max(1, num_sites)
        fan_in = shape.in_features * math.prod(shape.kernel_size)
        self.A = nn.Parameter(torch.empty(init_r, fan_in))
        self.E = nn.Parameter(torch.zeros(init_r))
        self.B = nn.Parameter(torch.empty(shape.out_features, init_r))
        nn.init.normal_(self.A, mean=0.0, std=INIT_STD)
        nn.init.normal_(self.B, mean=0.0, std=INIT_STD)
        self.register_buffer("mask", torch.ones(init_r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def singular_values(self) -> Tensor:
        """``E ⊙ mask``: the singular values that take part, pruned ones at zero."""
        return self.E * self.mask

    def rank(self) -> int:
        """How many singular values the mask keeps."""
        return int(torch.count_nonzero(self.mask))

    def delta_weight(self) -> Tensor:
        w = (self.B * self.singular_values()) @ self.A
        return (w * self.scaling).reshape(self.shape.out_features, *self._in_shape())

    def _in_shape(self) -> tuple[int, ...]:
        return (self.shape.in_features, *self.shape.kernel_size)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        h = self.dropout(x)
        if self.shape.is_conv:
            return y + self.shape.project(h, self.delta_weight().to(h.dtype)).to(y.dtype)
        u = F.linear(h, self.A.to(h.dtype)) * self.singular_values().to(h.dtype)
        return add_low_rank(y, u, self.B, self.scaling)

    def aux_loss(self) -> Tensor | None:
        """This site's share of the orthogonality regulariser:
        ``w · (‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F) / (2 · sites)``, so that the sum over the
        adapter's sites is PEFT's mean over its factors."""
        if self.orth_reg_weight == 0:
            return None
        eye = torch.eye(self.r, dtype=self.A.dtype, device=self.A.device)
        reg = torch.linalg.matrix_norm(self.A @ self.A.t() - eye) + torch.linalg.matrix_norm(
            self.B.t() @ self.B - eye
        )
        return reg * (self.orth_reg_weight / (2 * self.num_sites))


# ------------------------------------------------------------------------------ the allocator


class AdaLoraAllocator(nn.Module):
    """The adapter's rank allocator (its shared module): the step counter, the importance
    averages, and the pruning of singular values to the budget over all sites.

    unipeft calls :meth:`after_backward` after every training backward pass (see the
    module docstring); it can also be called by hand with ``{site name: delta}``.
    """

    def __init__(self, config: AdaLoraConfig, num_sites: int) -> None:
        super().__init__()
        self.config = config
        self.num_sites = num_sites
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # site name -> parameter name -> (sensitivity EMA, uncertainty EMA), float32
        self.averages: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
        self._warned = False

    # -------------------------------------------------------------- the schedule
    @property
    def initial_budget(self) -> int:
        return self.config.init_r * self.num_sites

    @property
    def target_budget(self) -> int:
        return self.config.target_r * self.num_sites

    @property
    def final_step(self) -> int | None:
        """The step of the last allocation (``total_step - tfinal``), None without a schedule."""
        cfg = self.config
        return None if cfg.total_step is None else cfg.total_step - cfg.tfinal

    def budget(self, step: int) -> tuple[int, bool]:
        """``(singular values kept over all sites, whether step allocates)`` at ``step``."""
        cfg, end = self.config, self.final_step
        if end is None or step <= cfg.tinit:
            return self.initial_budget, False
        if step >= end:
            return self.target_budget, step == end
        left = 1 - (step - cfg.tinit) / (end - cfg.tinit)
        spread = self.initial_budget - self.target_budget
        return int(spread * left**3 + self.target_budget), step % cfg.delta_t == 0

    @property
    def finished(self) -> bool:
        """Whether the allocation is final (the masks no longer change)."""
        end = self.final_step
        return end is not None and int(self.step) >= end

    # -------------------------------------------------------------- the hook
    @torch.no_grad()
    def after_backward(self, deltas: Mapping[str, DeltaModule]) -> None:
        """Count one step; update the importance from the gradients; prune to the budget
        when the schedule says so (see the module docstring)."""
        step = int(self.step) + 1
        self.step.fill_(step)
        end = self.final_step
        if end is None:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "adalora: total_step is not set, so no singular value is pruned (the "
                    "adapter trains at init_r everywhere). Pass total_step=<number of "
                    "training steps> to run AdaLoRA's rank allocation",
                    UserWarning,
                    stacklevel=2,
                )
            return
        if step > end:
            return
        self.update_importance(deltas)
        budget, allocate = self.budget(step)
        if allocate:
            self.mask_to_budget(deltas, budget)
        if step == end:
            self.averages.clear()

    @torch.no_grad()
    def update_importance(self, deltas: Mapping[str, DeltaModule]) -> None:
        """Fold ``|p · p.grad|`` of every ``A``, ``E``, ``B`` into the moving averages
        (parameters without a gradient are left out)."""
        b1, b2 = self.config.beta1, self.config.beta2
        params, grads, means, uncs = [], [], [], []
        for name, delta in deltas.items():
            store = self.averages.setdefault(name, {})
            for part in ("A", "E", "B"):
                p = getattr(delta, part)
                if p.grad is None:
                    continue
                old = store.get(part)
                if old is None or old[0].shape != p.shape or old[0].device != p.device:
                    zeros = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    old = store[part] = (zeros, zeros.clone())
                params.append(p.detach().float())
                grads.append(p.grad.float())
                means.append(old[0])
                uncs.append(old[1])
        if not params:
            return
        # a few batched kernels for every factor of every site (torch._foreach_*)
        sensitivity = torch._foreach_mul(params, grads)
        torch._foreach_abs_(sensitivity)
        torch._foreach_mul_(means, b1)
        torch._foreach_add_(means, sensitivity, alpha=1 - b1)
        spread = torch._foreach_sub(sensitivity, means)
        torch._foreach_abs_(spread)
        torch._foreach_mul_(uncs, b2)
        torch._foreach_add_(uncs, spread, alpha=1 - b2)

    def scores(self, deltas: Mapping[str, DeltaModule]) -> dict[str, Tensor]:
        """Each site's importance of its singular values, ``(init_r,)`` float32: the
        score ``Ī Ū`` of ``E`` plus its mean over the row of ``A`` and the column of ``B``."""
        out: dict[str, Tensor] = {}
        for name, delta in deltas.items():
            store = self.averages.get(name, {})
            r = delta.E.shape[0]  # type: ignore[union-attr]
            score = torch.zeros(r, dtype=torch.float32, device=delta.E.device)  # type: ignore[union-attr]
            for part, reduce in (("E", None), ("A", 1), ("B", 0)):
                if part in store:
                    s = store[part][0] * store[part][1]
                    score = score + (s if reduce is None else s.mean(dim=reduce)).to(score.device)
            out[name] = score
        return out

    @torch.no_grad()
    def mask_to_budget(self, deltas: Mapping[str, DeltaModule], budget: int) -> None:
        """Keep the ``budget`` most important singular values over all sites; a value that
        comes back after being masked restarts from zero."""
        scores = self.scores(deltas)
        if not scores:
            return
        names = list(scores)
        device = scores[names[0]].device
        flat = torch.cat([scores[n].to(device) for n in names])
        keep = torch.zeros_like(flat)
        keep[torch.topk(flat, min(max(budget, 0), flat.numel())).indices] = 1.0
        start = 0
        for name in names:
            delta = deltas[name]
            mask: Tensor = delta.mask  # type: ignore[assignment]
            new = keep[start : start + mask.numel()].to(device=mask.device, dtype=mask.dtype)
            start += mask.numel()
            revived = (new > 0) & (mask == 0)
            if bool(revived.any()):
                delta.E.masked_fill_(revived, 0.0)  # type: ignore[union-attr]
            mask.copy_(new)


# ------------------------------------------------------------------------------ the record


def _shared(cfg: AdaLoraConfig, sites: tuple[Site, ...]) -> AdaLoraAllocator:
    return AdaLoraAllocator(cfg, len(sites))


def _build(cfg: AdaLoraConfig, site: Site, shared: AdaLoraAllocator) -> AdaLoraDelta:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    delta = AdaLoraDelta(
        shape, cfg.init_r, cfg.alpha, cfg.dropout, cfg.orth_reg_weight, shared.num_sites
    )
    delta.use_shared(shared)
    return delta


def _count(cfg: AdaLoraConfig, site: Site) -> int:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    return cfg.init_r * (shape.in_features * math.prod(shape.kernel_size) + shape.out_features + 1)


def _rank_fits(cfg: AdaLoraConfig, site: Site) -> str | None:
    return low_rank_refusal("init_r", cfg.init_r, site)


METHOD = Method(
    id="adalora",
    refuses="nothing beyond non-projection sites",
    family="reparameterized",
    config=AdaLoraConfig,
    build=_build,  # type: ignore[arg-type]
    shared=_shared,
    num_parameters=_count,
    formula="init_r · (d_in · k + d_out + 1) per projection (k: kernel elements, 1 for Linear)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    mergeable=True,
    identity_at_init=True,
    paper="Zhang et al., Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning "
    "(AdaLoRA), ICLR 2023, arXiv:2303.10512",
    summary="SVD-form low-rank update whose singular values are pruned to a budget over all "
    "sites by gradient importance during training; mergeable",
    size_check=_rank_fits,
)
