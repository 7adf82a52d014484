"""What a method is: the record a plugin passes to ``register``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import nn

from .config import DeltaConfig
from .deltas import FAMILIES, DeltaModule, Family
from .sites import SequenceSite, Site

SiteKind = Literal["projection", "module", "sequence"]
"""``projection``: a module site with a weight (Linear, Conv, fused slices); ``module``: any
module site (its output, or a sublayer's input-to-output path); ``sequence``: the token
sequence."""


def site_kinds_of(site: Site) -> tuple[SiteKind, ...]:
    if isinstance(site, SequenceSite):
        return ("sequence",)
    return ("projection", "module") if site.weight is not None else ("module",)


@dataclass(frozen=True)
class Method:
    """A registered PEFT method.

    ``build(config, site)`` returns the delta module for one site; ``num_parameters(config,
    site)`` is the trainable-parameter formula at that site (the conformance kit checks it
    against the real count); ``formula`` says the same in words for people.
    """

    id: str
    family: Family
    config: type[DeltaConfig]
    build: Callable[[Any, Site], DeltaModule]
    num_parameters: Callable[[Any, Site], int]
    formula: str
    site_kinds: tuple[SiteKind, ...]
    default_targets: Sequence[str] | Callable[[Any], Sequence[str]]
    mergeable: bool
    identity_at_init: bool | Callable[[Any], bool]
    paper: str
    summary: str = ""
    accepts: Callable[[Any, Site], str | None] | None = None
    """Optional finer check than ``site_kinds``: return why a site is refused, or None."""
    size_check: Callable[[Any, Site], str | None] | None = None
    """Optional check of the config's sizes against one site: return why they do not fit
    (naming the field and the limit, e.g. ``"num_tokens=80 ... must be <= 63"``), or None.
    Unlike ``accepts``, a refusal here is never skipped, even on optional targets: the
    call raises :class:`~unipeft.contract.errors.ConfigError` before anything is built."""
    shared: Callable[[Any, tuple[Site, ...]], nn.Module] | None = None
    """Optional: builds the adapter's **shared module** once per adapter, from the config and
    every site the adapter occupies, before any delta. Its parameters are trained and counted
    once, its persistent buffers saved once, and it moves with the model; each delta refers to
    it. When set, ``build`` is called as ``build(config, site, shared)`` and the delta keeps
    the reference with :meth:`~unipeft.DeltaModule.use_shared`. A shared module may define
    ``after_backward(deltas)``: unipeft calls it at the end of every backward pass that gave
    the adapter's parameters gradients, in any training loop (see docs/methods.md)."""
    shared_parameters: Callable[[Any, tuple[Site, ...]], int] | None = None
    """Trainable parameters of the shared module (the formula's adapter-wide term), given
    the config and the adapter's sites; None when it trains nothing."""
    refuses: str = ""
    """In words, what the method refuses at ``apply`` beyond ``site_kinds`` (through
    ``accepts`` and ``size_check``): site kinds such as convolutions, sizes that do not fit
    a site. Shown by ``describe()``, ``unipeft list --json`` and the method's page."""
    budget_field: str | None = None
    """The integer config field that sets the method's size (LoRA's ``r``), which the
    budget planner searches; None for methods of fixed size."""
    distribution: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise TypeError(f"method id must be a string, got {type(self.id).__name__}")
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.id!r}: family must be one of {FAMILIES}")
        if not self.id or not self.id.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"method id {self.id!r} must be letters, digits, '_' or '-'")
        if not (isinstance(self.config, type) and issubclass(self.config, DeltaConfig)):
            raise TypeError(f"method {self.id!r}: config must be a DeltaConfig subclass")
        if self.budget_field is not None and self.budget_field not in self.config.model_fields:
            raise ValueError(
                f"method {self.id!r}: budget_field {self.budget_field!r} is not a config field"
            )
        undescribed = [n for n, f in self.config.model_fields.items() if not f.description]
        if undescribed:
            raise ValueError(
                f"method {self.id!r}: config fields {undescribed} need a description "
                "(pydantic.Field(description=...)); list_methods() and the docs show it"
            )

    def targets_for(self, config: DeltaConfig) -> list[str]:
        t = self.default_targets
        return list(t(config) if callable(t) else t)

    def is_identity_at_init(self, config: DeltaConfig) -> bool:
        f = self.identity_at_init
        return bool(f(config) if callable(f) else f)

    def refusal(self, config: DeltaConfig, site: Site) -> str | None:
        """Why this method cannot attach at ``site`` (None if it can)."""
        only = getattr(site, "merged_form_only", None)
        if only and not self.mergeable:
            return (
                f"site {site.name!r} is {only}: only methods with a merged-weight form "
                f"apply there; {self.id!r} has none"
            )
        kinds = site_kinds_of(site)
        if not set(kinds) & set(self.site_kinds):
            want = " or ".join(self.site_kinds)
            return f"it attaches to {want} sites and {site.name!r} is a {kinds[0]} site"
        if self.accepts is not None:
            return self.accepts(config, site)
        return None

    def size_refusal(self, config: DeltaConfig, site: Site) -> str | None:
        """Why ``config``'s sizes do not fit ``site`` (None if they do or nothing checks)."""
        return self.size_check(config, site) if self.size_check is not None else None

    def build_shared(self, config: DeltaConfig, sites: tuple[Site, ...]) -> nn.Module | None:
        """The adapter's shared module (None for methods without one)."""
        if self.shared is None:
            return None
        module = self.shared(config, tuple(sites))
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"method {self.id!r}: shared() must return an nn.Module, "
                f"got {type(module).__name__}"
            )
        return module

    def count_shared(self, config: DeltaConfig, sites: tuple[Site, ...]) -> int:
        """The formula's adapter-wide term: :attr:`shared_parameters`, or 0."""
        f = self.shared_parameters
        return int(f(config, tuple(sites))) if f is not None else 0

    def with_distribution(self, distribution: str) -> Method:
        return replace(self, distribution=distribution)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description of the method."""
        return {
            "id": self.id,
            "family": self.family,
            "config": f"{self.config.__module__}.{self.config.__qualname__}",
            "mergeable": self.mergeable,
            "identity_at_init": self.identity_at_init
            if isinstance(self.identity_at_init, bool)
            else "depends on config",
            "site_kinds": list(self.site_kinds),
            "formula": self.formula,
            "paper": self.paper,
            "summary": self.summary,
            "budget_field": self.budget_field,
            "shares_tensors": self.shared is not None,
            "refuses": self.refuses,
            "distribution": self.distribution,
            "fields": {
                name: {
                    "type": _type_name(info.annotation),
                    "required": info.is_required(),
                    "default": None if info.is_required() else info.default,
                    "description": info.description,
                }
                for name, info in self.config.model_fields.items()
            },
        }


def _type_name(annotation: Any) -> str:
    """``int`` rather than ``<class 'int'>``; ``Literal['a', 'b']`` and unions as written."""
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)
