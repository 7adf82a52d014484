"""Budget planning: choose a method's size so its trainable parameters fit a fraction.

Every method declares a trainable-parameter formula (``Method.num_parameters``) and, where
one integer field sets its size, that field (``Method.budget_field``: LoRA's ``r``, an
adapter's ``bottleneck``, prompt tuning's ``num_tokens``). The planner resolves the targets
once and searches that field for the largest value whose count fits the budget, so methods
can be compared at matched budgets without building a single delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..contract.errors import ConfigError
from ..runtime.checks import require_method_id, require_module, target_list
from ..runtime.registry import registry
from ..runtime.targets import method_targets, resolve_targets


@dataclass(frozen=True)
class BudgetPlan:
    """A config that fits the budget, and what it costs."""

    method: str
    config: dict[str, Any]
    targets: list[str]
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        """Trainable parameters over the backbone's parameters."""
        return self.trainable / self.total


def parse_budget(budget: float | str) -> float:
    """``0.005``, ``"0.5%"`` or ``"0.005"`` -> 0.005."""
    text = str(budget).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(
            f"budget {budget!r} is not a number or a percentage like '0.5%'"
        ) from None
    if not 0 < value <= 1:
        raise ConfigError(f"budget {budget!r} must be above 0 and at most 100%")
    return value


def plan_budget(
    backbone: nn.Module,
    method: str,
    budget: float | str,
    *,
    targets: list[str] | None = None,
    **fixed: Any,
) -> BudgetPlan:
    """The largest configuration of ``method`` whose trainable parameters fit ``budget``.

    ``budget`` is a fraction of the backbone's parameters (``0.005`` or ``"0.5%"``);
    ``fixed`` holds config fields to keep as given. Raises :class:`ConfigError` when no
    value of the method's size field fits, naming the smallest fraction it can reach.
    """
    require_module(backbone)
    fraction = parse_budget(budget)
    spec = registry().method(require_method_id(method))
    total = sum(p.numel() for p in backbone.parameters())
    cfg = spec.config.parse(spec.id, fixed)
    asked = target_list(targets, backbone, spec.id, fixed)
    reg = registry()
    wanted = method_targets(backbone, spec, cfg, asked, reg.sorted_maps(), reg.map_failed)
    _, sites, optional = resolve_targets(backbone, wanted, reg.sorted_maps(), reg.map_failed)
    field = spec.budget_field

    def count(values: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Trainable parameters of ``values`` (more than any budget when a size does not
        fit a site, e.g. a rank above a layer's width), and the config."""
        c = spec.config.parse(spec.id, values)
        usable = [s for s in sites if s.name not in optional or spec.refusal(c, s) is None]
        if any(spec.size_refusal(c, s) is not None for s in usable):
            return total + 1, c.model_dump(mode="json")
        own = sum(spec.num_parameters(c, s) for s in usable)
        return own + spec.count_shared(c, tuple(usable)), c.model_dump(mode="json")

    limit = fraction * total
    if field is None or field in fixed:
        chosen = spec.config.parse(spec.id, fixed)
        for site in sites:
            reason = spec.size_refusal(chosen, site)
            if reason is not None:
                raise ConfigError(f"{spec.id} does not fit site {site.name!r}: {reason}")
        n, config = count(fixed)
        if n > limit:
            raise ConfigError(
                f"{spec.id} with {fixed or 'its defaults'} trains {n} parameters "
                f"({100 * n / total:.4g}% of {total}), over the budget of {100 * fraction:.4g}%"
            )
        return BudgetPlan(spec.id, config, wanted, n, total)
    lo, hi = _bounds(spec.config, field)
    n_lo, _ = count({**fixed, field: lo})
    if n_lo > limit:
        raise ConfigError(
            f"no configuration of {spec.id!r} fits {100 * fraction:.4g}% of {total} parameters: "
            f"the smallest, {field}={lo}, trains {n_lo} ({100 * n_lo / total:.4g}%). Raise the "
            "budget or choose fewer targets."
        )
    while lo < hi:  # the count grows with the size field: find the largest value that fits
        mid = (lo + hi + 1) // 2
        if count({**fixed, field: mid})[0] <= limit:
            lo = mid
        else:
            hi = mid - 1
    n, config = count({**fixed, field: lo})
    return BudgetPlan(spec.id, config, wanted, n, total)


def _bounds(config: type, field: str) -> tuple[int, int]:
    info = config.model_fields[field]
    lo, hi = 1, 1 << 20
    for meta in info.metadata:
        if getattr(meta, "ge", None) is not None:
            lo = int(meta.ge)
        if getattr(meta, "gt", None) is not None:
            lo = int(meta.gt) + 1
        if getattr(meta, "le", None) is not None:
            hi = int(meta.le)
        if getattr(meta, "lt", None) is not None:
            hi = int(meta.lt) - 1
    return lo, hi
