"""Placing a method under a parameter budget from per-site scores.

:func:`place` picks sites greedily by score per trainable parameter until the budget is
spent and returns role targets with layer selectors (``"attn.q[0,3]"``), which
``unipeft.apply`` takes like any other targets. With one ``method`` config for every site,
each chosen site costs what the method's ``num_parameters`` says for it. :class:`Auto` does
both steps inside ``unipeft.apply``: ``targets=Auto(batches, loss_fn, budget=0.005)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..contract.errors import ConfigError
from ..features.budget import parse_budget
from ..runtime.checks import require_method_id
from ..runtime.registry import registry
from .sensitivity import LossFn, SiteScore, resolve_sites, score_sites

__all__ = ["BY", "Auto", "Placement", "place"]

BY = ("site", "role")  # what place() chooses: single sites, or whole roles


@dataclass(frozen=True)
class Placement:
    """The sites chosen for ``method`` and the targets that reach exactly them."""

    method: str
    config: dict[str, Any]
    targets: list[str]
    sites: list[str]
    parameters: int
    total: int
    score: str
    skipped: list[str] = field(default_factory=list)
    by: str = "site"

    @property
    def fraction(self) -> float:
        return self.parameters / self.total


def place(
    model: nn.Module,
    scores: Sequence[SiteScore],
    method: str,
    budget: float | str,
    *,
    score: str = "taylor",
    by: str = "site",
    **config: Any,
) -> Placement:
    """Sites for ``method`` (with ``config``) chosen by ``score`` under ``budget`` (a
    fraction of ``model``'s parameters, ``0.005`` or ``"0.5%"``): the highest score per
    parameter first, every candidate that still fits. ``by="site"`` chooses sites one by
    one; ``by="role"`` chooses whole roles (a role's sites in every scored layer, its score
    and cost their sums), the way conventions place methods. Raises :class:`ConfigError`
    when not even one candidate fits."""
    require_by(by)
    fraction = parse_budget(budget)
    reg = registry()
    spec = reg.method(require_method_id(method))
    cfg = spec.config.parse(spec.id, config)
    total = sum(p.numel() for p in model.parameters())
    by_name = {s.name: s for s in resolve_sites(model, _role_targets(scores))}
    limit = fraction * total
    skipped = [s.name for s in scores if spec.size_refusal(cfg, by_name[s.name]) is not None]
    groups: dict[Any, list[SiteScore]] = {}
    for s in scores:
        if s.name not in skipped:
            groups.setdefault(s.name if by == "site" else (s.tower, s.role), []).append(s)
    costs = {k: sum(_cost(spec, cfg, by_name[s.name]) for s in g) for k, g in groups.items()}
    value = {k: sum(s.score(score) for s in g) / max(1, costs[k]) for k, g in groups.items()}
    chosen: list[SiteScore] = []
    spent = 0
    for key in sorted(groups, key=value.__getitem__, reverse=True):
        if spent + costs[key] <= limit:
            chosen.extend(groups[key])
            spent += costs[key]
    if not chosen:
        cheapest = min(costs.values(), default=0)
        raise ConfigError(
            f"no {by} fits a budget of {100 * fraction:.4g}% of {total} parameters with "
            f"{spec.id} {config or '(defaults)'}: the cheapest {by} needs {cheapest} "
            f"({100 * cheapest / total:.4g}%). Raise the budget or lower the method's size."
        )
    order = {s.name: i for i, s in enumerate(scores)}
    chosen.sort(key=lambda s: order[s.name])
    return Placement(
        method=spec.id,
        config=cfg.model_dump(mode="json"),
        targets=_role_targets(chosen),
        sites=[s.name for s in chosen],
        parameters=spent,
        total=total,
        score=score,
        skipped=skipped,
        by=by,
    )


@dataclass(frozen=True)
class Auto:
    """A target rule: ``unipeft.apply(model, "lora", targets=Auto(batches, loss_fn,
    budget=0.005))`` scores the sites ``candidates`` reach (the attention and MLP
    projections by default) on ``batches`` with ``loss_fn(model, batch)`` (the scalar loss;
    ``model`` is the backbone as it runs now), and attaches the method where :func:`place`
    puts it under ``budget``. ``score`` picks the score (``"probe"`` trains a probe LoRA
    for ``probe_steps`` steps at ``probe_lr`` first); ``by`` chooses sites or whole roles;
    ``rank`` is the rank of the update it scores (default: the method's size field, LoRA's
    ``r``, else 8). The adapter records the resolved role targets, so a saved adapter loads
    without the batches."""

    batches: Iterable[Any]
    loss_fn: LossFn
    budget: float | str
    score: str = "taylor"
    candidates: Sequence[str] | None = None
    rank: int | None = None
    by: str = "site"
    probe_steps: int = 32
    probe_lr: float = 1e-3

    def targets_for(self, model: nn.Module, method: str, config: Mapping[str, Any]) -> list[str]:
        require_by(self.by)
        spec = registry().method(require_method_id(method))
        cfg = spec.config.parse(spec.id, dict(config))
        rank = self.rank
        if rank is None:
            size = getattr(cfg, spec.budget_field, None) if spec.budget_field else None
            rank = size if isinstance(size, int) and size > 0 else 8
        scores = score_sites(
            model, self.batches, self.loss_fn, targets=self.candidates, rank=rank,
            probe_steps=self.probe_steps if self.score == "probe" else 0, probe_lr=self.probe_lr,
        )  # fmt: skip
        placed = place(model, scores, spec.id, self.budget, score=self.score, by=self.by, **config)
        return placed.targets


def require_by(by: str) -> None:
    if by not in BY:
        raise ConfigError(f"by={by!r}: place by 'site' (each site) or 'role' (whole roles)")


def _cost(spec: Any, cfg: Any, site: Any) -> int:
    return int(spec.num_parameters(cfg, site))


def _role_targets(scores: Sequence[SiteScore]) -> list[str]:
    """Role targets with layer selectors reaching exactly these sites."""
    groups: dict[tuple[str | None, str], list[int]] = {}
    for s in scores:
        if s.role is None or s.layer is None:
            raise ConfigError(
                f"site {s.name!r} has no role and layer in the structure map, so no role "
                "target can name it; score role targets only"
            )
        groups.setdefault((s.tower, s.role), []).append(s.layer)
    out = []
    for (tower, role), layers in groups.items():
        prefix = f"{tower}/" if tower else ""
        out.append(f"{prefix}{role}[{','.join(str(i) for i in sorted(set(layers)))}]")
    return out
