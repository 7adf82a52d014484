"""Which projections deserve the trainable budget: per-site scores from a few calibration
batches, and a placement of a method under a parameter budget.

Every score is computed from the gradient a dense update ``ΔW`` would receive at the site
if it were added at zero, ``G = ∂L/∂ΔW = Σ_tokens dYᵀ x`` (``out × in``, the site's rows of
a fused projection only), one ``G_b`` per calibration batch and ``Ḡ`` their mean:

- ``grad_norm = ‖Ḡ‖_F``: how fast the loss falls, to first order, along the best dense
  update of unit norm at this site;
- ``fisher = mean_b ‖G_b‖_F²``: the trace of the empirical Fisher information of a
  zero-initialised dense delta at the site (batch gradients, not their mean: a site whose
  batches pull in different directions still scores);
- ``taylor = (Σ_{i≤r} σ_i(Ḡ)²)^½``: the first-order loss change that the best *rank-r*
  update of unit norm at the site can make (the top ``r`` singular values of ``Ḡ``): what
  a LoRA of rank ``r`` can reach there, to first order;
- ``probe`` (only with ``probe_steps``): how much a rank-``r`` LoRA *trained* for a few
  steps at the site matters, AdaLoRA's sensitivity ``Σ |θ · ∂L/∂θ|`` over its parameters
  (:mod:`.probe`): a score past initialisation.

Where the module returns the projection's own output, ``G`` is read through hooks on it
(``dY`` from the output's gradient, ``x`` from its input). Elsewhere ``G`` is the gradient of
the weight itself, which is the same sum ``dYᵀ x``: ``nn.MultiheadAttention``'s fused input
projection (rows of ``in_proj_weight`` per slice), weights a recurrent layer or Mamba's
mixer reads inside its own arithmetic, and convolutions (their ``(out, in, *kernel)``
gradient as ``out × (in · kernel)``, the shape in which a convolution LoRA's update has rank
``r``). Only those weights then take gradients, for the scoring's own backward passes.

No parameter of the model changes: the model is run with every other parameter frozen,
hooks are removed afterwards, and every ``requires_grad`` flag and ``.grad`` is put back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..contract.errors import ConfigError
from ..contract.sites import ModuleSite
from ..runtime.registry import registry
from ..runtime.targets import resolve_targets
from .probe import probe_importance

__all__ = ["SCORES", "SiteScore", "score_sites"]

SCORES = ("taylor", "fisher", "grad_norm", "probe")

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class SiteScore:
    """The scores of one site (see the module docstring for the formulas)."""

    name: str
    role: str | None
    layer: int | None
    tower: str | None
    out_features: int
    in_features: int
    grad_norm: float
    fisher: float
    taylor: float
    rank: int
    probe: float | None = None

    def score(self, which: str) -> float:
        if which not in SCORES:
            raise ConfigError(f"score {which!r} is not one of {', '.join(SCORES)}")
        value = getattr(self, which)
        if value is None:
            raise ConfigError(
                f"site {self.name!r} has no {which} score: score_sites computes it only when "
                "given probe_steps (the steps a probe LoRA trains before it is measured)"
            )
        return float(value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_TARGETS = (
    "attn.q?", "attn.k?", "attn.v?", "attn.out?", "mlp.gate?", "mlp.up?", "mlp.down?",
)  # fmt: skip


def score_sites(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    targets: Iterable[str] | None = None,
    rank: int = 8,
    probe_steps: int = 0,
    probe_lr: float = 1e-3,
) -> list[SiteScore]:
    """Score every projection site ``targets`` reach (default: the attention and MLP
    projections the structure map names) on ``batches``: ``loss_fn(model, batch)`` returns
    the scalar loss of one batch. Returns one :class:`SiteScore` per site, in the map's
    order. Sites whose module output is not the projection's own output (an
    ``nn.MultiheadAttention``'s fused input projection, a site read through an entry
    module) cannot be hooked and are left out; :func:`unscorable` names them."""
    if rank < 1:
        raise ConfigError(f"rank={rank}: the rank of the update to score must be at least 1")
    resolved = resolve_sites(model, targets)
    sites = [s for s in resolved if _hookable(s) or _by_weight(s)]
    if not sites:
        raise ConfigError(
            f"no projection of {type(model).__name__} can be scored for targets "
            f"{list(targets or DEFAULT_TARGETS)}; name attention or MLP roles, or module-name "
            "regexes of nn.Linear layers"
        )
    sums: dict[str, Tensor] = {}
    fisher: dict[str, float] = {s.name: 0.0 for s in sites}
    n = 0
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was_training = model.training
    handles: list[Any] = []
    current: dict[str, Tensor] = {}
    weighed = [s for s in sites if not _hookable(s)]  # read off their weight's gradient
    try:
        for p, _, _ in flags:
            p.requires_grad_(False)
            p.grad = None
        for s in weighed:
            s.parameter("weight").requires_grad_(True)  # type: ignore[union-attr]
        model.eval()
        by_module: dict[int, list[ModuleSite]] = {}
        for s in sites:
            if _hookable(s):
                by_module.setdefault(id(s.module), []).append(s)
        for group in by_module.values():
            handles.append(group[0].module.register_forward_hook(_hook(group, current)))
        for batch in batches:
            current.clear()
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ConfigError("loss_fn(model, batch) must return the scalar loss tensor")
            if not loss.requires_grad:
                raise ConfigError(
                    "the loss does not depend on any scored site's output: check that "
                    "loss_fn runs the model passed to score_sites"
                )
            loss.backward()
            _read_weight_gradients(weighed, current)
            for s in sites:
                g = current.get(s.name)
                if g is None:
                    continue
                fisher[s.name] += float(g.double().square().sum())
                sums[s.name] = g if s.name not in sums else sums[s.name] + g
            n += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    if n == 0:
        raise ConfigError("batches is empty: pass at least one calibration batch")
    probed: dict[str, float] = {}
    if probe_steps:
        wanted = list(targets) if targets is not None else list(DEFAULT_TARGETS)
        probed = probe_importance(
            model, batches, loss_fn, wanted, rank=rank, steps=probe_steps, lr=probe_lr
        )
    out = []
    for s in sites:
        total = sums.get(s.name)
        if total is None:
            continue  # the site never ran on these batches
        mean = total / n
        sv = torch.linalg.svdvals(mean.double())
        assert s.weight is not None
        out.append(
            SiteScore(
                name=s.name,
                role=s.role,
                layer=s.layer,
                tower=s.tower,
                out_features=mean.shape[0],
                in_features=mean.shape[1],
                grad_norm=float(sv.square().sum().sqrt()),
                fisher=fisher[s.name] / n,
                taylor=float(sv[:rank].square().sum().sqrt()),
                rank=rank,
                probe=probed.get(s.name) if probe_steps else None,
            )
        )
    return out


def unscorable(model: nn.Module, targets: Iterable[str] | None = None) -> list[str]:
    """The sites ``targets`` reach that :func:`score_sites` cannot score: read through an
    entry module, or a quantized weight."""
    return [s.name for s in resolve_sites(model, targets) if not (_hookable(s) or _by_weight(s))]


def resolve_sites(model: nn.Module, targets: Iterable[str] | None) -> list[Any]:
    reg = registry()
    wanted = list(targets) if targets is not None else list(DEFAULT_TARGETS)
    _, sites, _ = resolve_targets(model, wanted, reg.sorted_maps(), reg.map_failed)
    return sites


def _hookable(site: Any) -> bool:
    return (
        isinstance(site, ModuleSite)
        and site.is_projection
        and site.entry is None
        and site.host is None
        and site.weight is not None
        and not site.weight.kernel_size
        and site.weight.layout in ("linear", "conv1d_t")
    )


def _by_weight(site: Any) -> bool:
    """A projection whose ``G`` is its plain float weight's gradient (see the docstring)."""
    if not isinstance(site, ModuleSite) or site.weight is None or site.entry is not None:
        return False
    if site.weight.layout not in ("linear", "conv", "mha_in"):
        return False
    w = site.parameter("weight")
    return type(w) is nn.Parameter and w.is_floating_point()


def _read_weight_gradients(sites: list[ModuleSite], current: dict[str, Tensor]) -> None:
    """``G`` of each site scored by its weight's gradient: its rows, as a matrix; the
    gradients are then cleared for the next batch."""
    weights = []
    for s in sites:
        w = s.parameter("weight")
        assert w is not None
        weights.append(w)
        if w.grad is None:
            continue  # the site did not take part in this batch's loss
        rows = w.grad if s.out_slice is None else w.grad[s.out_slice[0] : s.out_slice[1]]
        current[s.name] = rows.detach().reshape(rows.shape[0], -1).float()
    for w in weights:
        w.grad = None


def _hook(group: list[ModuleSite], current: dict[str, Tensor]) -> Callable[..., None]:
    """Keep the module's input; when the output's gradient arrives, add each site's
    ``dYᵀ x`` (its rows of the output) to ``current``."""

    def forward_hook(_module: nn.Module, args: tuple, output: Any) -> Any:
        x = args[0] if args else None
        y = output[0] if isinstance(output, tuple) else output
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            return None
        x2 = x.detach().reshape(-1, x.shape[-1])
        new = y
        if not y.requires_grad:  # nothing upstream needs gradients: make this a leaf
            new = y.detach().requires_grad_(True)

        def on_grad(dy: Tensor) -> None:
            dy2 = dy.detach().reshape(-1, dy.shape[-1]).to(x2.dtype)
            for s in group:
                rows = dy2 if s.out_slice is None else dy2[:, s.out_slice[0] : s.out_slice[1]]
                g = (rows.t() @ x2).float()
                current[s.name] = g if s.name not in current else current[s.name] + g

        new.register_hook(on_grad)
        if new is y:
            return None
        if isinstance(output, tuple):
            return (new, *output[1:])
        return new

    return forward_hook


def scores_table(scores: list[SiteScore]) -> list[Mapping[str, Any]]:
    """Plain rows for printing or JSON, each site with its rank in every score."""
    rows = [s.as_dict() for s in scores]
    for which in SCORES:
        if which == "probe" and any(s.probe is None for s in scores):
            continue
        order = sorted(range(len(scores)), key=lambda i: -scores[i].score(which))
        for place, i in enumerate(order):
            rows[i][f"{which}_rank"] = place + 1
    return rows
