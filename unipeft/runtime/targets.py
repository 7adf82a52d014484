"""Resolve targets (roles with layer selection, or module-name regexes) to sites.

Target syntax::

    attn.q              every layer's query projection (every tower)
    attn.q[0:4]         layers 0..3 (Python slice, negative indices allowed)
    attn.q[0,2,-1]      layers 0, 2 and the last
    text/attn.v         the text tower only (open_clip: ``visual`` / ``text``)
    re:.*\\.fc1          modules whose full name matches the regex (the generic map)
    encoder.layer.0.attention.self.query    anything not a role is a module-name regex
    mlp.gate?           a trailing ``?`` makes a target optional: it may match nothing,
                        and sites it reaches that the method refuses are skipped
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..contract.errors import PluginError, TargetError
from ..contract.maps import ROLES, StructureMap, generic_sites
from ..contract.sites import ModuleSite, SequenceSite, Site

_TARGET = re.compile(
    r"^(?:(?P<tower>[A-Za-z_]\w*)/)?(?P<role>[a-z][a-z_]*(?:\.[a-z]+)?)(?:\[(?P<sel>[^\]]*)\])?$"
)


@dataclass(frozen=True)
class RoleTarget:
    text: str
    role: str
    tower: str | None
    selector: str | None
    optional: bool = False

    def layers(self, n_layers: int) -> set[int]:
        if self.selector is None:
            return set(range(n_layers))
        sel = self.selector.strip()
        try:
            if ":" in sel:
                parts = [int(p) if p.strip() else None for p in sel.split(":")]
                if len(parts) > 3:
                    raise ValueError("a slice has at most start:stop:step")
                return set(range(n_layers)[slice(*parts)])
            picked = [int(p) for p in sel.split(",")]
        except ValueError:
            raise TargetError(
                f"target {self.text!r}: layer selector [{sel}] must be a slice like [0:4] "
                "(start:stop or start:stop:step, step not 0) or a list like [0,2,-1]"
            ) from None
        for i in picked:
            if not -n_layers <= i < n_layers:
                raise TargetError(
                    f"target {self.text!r}: layer {i} is out of range; this stack has "
                    f"{n_layers} layers (0..{n_layers - 1})"
                )
        return {i % n_layers for i in picked}


@dataclass(frozen=True)
class RegexTarget:
    text: str
    pattern: re.Pattern[str]
    optional: bool = False


def parse_target(text: str) -> RoleTarget | RegexTarget:
    if not isinstance(text, str) or not text or text == "?":
        raise TargetError(
            f"a target must be a non-empty string (a role such as 'attn.q[0:2]' or a "
            f"module-name regex), got {text!r}"
        )
    optional = text.endswith("?")
    body = text[:-1] if optional else text
    if body.startswith("re:"):
        return RegexTarget(text, _compile(text, body[3:]), optional)
    m = _TARGET.match(body)
    if m and m["role"] in ROLES:
        return RoleTarget(text, m["role"], m["tower"], m["sel"], optional)
    return RegexTarget(text, _compile(text, body), optional)


def _compile(text: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TargetError(f"target {text!r} is not a role and not a valid regex: {exc}") from None


MapFailure = Callable[[StructureMap, BaseException, str], None]
"""Told of a structure map whose ``matches`` or ``sites`` (the third argument) raised or
returned the wrong type (the registry records it for the plugin)."""


def pick_map(
    model: nn.Module, maps: Sequence[StructureMap], on_failure: MapFailure | None = None
) -> StructureMap:
    """The first of ``maps`` (sorted by priority) that matches ``model``.

    A map whose ``matches`` or ``sites`` raises (or whose ``sites`` returns anything but a
    list of sites) is skipped, so one broken plugin map does not stop any backbone from
    being adapted: ``on_failure`` is told (the registry records a plugin failure, an error
    in strict mode); without it, the error is raised naming the map."""
    return _pick(model, maps, on_failure)[0]


def _pick(
    model: nn.Module, maps: Sequence[StructureMap], on_failure: MapFailure | None
) -> tuple[StructureMap, list[Site]]:
    """The map :func:`pick_map` returns, and its sites: a map whose ``sites`` raises or
    returns anything but a list of sites is skipped like one whose ``matches`` raises."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"the backbone must be a torch.nn.Module, got {type(model).__name__} {model!r:.60}"
        )
    for smap in maps:
        try:
            hit = smap.matches(model)
        except Exception as exc:
            _failed(smap, exc, "matches", on_failure)
            continue
        if not hit:
            continue
        try:
            sites = _checked_sites(smap, model)
        except Exception as exc:
            _failed(smap, exc, "sites", on_failure)
            continue
        return smap, sites
    raise TargetError(f"no structure map matches {type(model).__name__}")  # generic always does


def _failed(
    smap: StructureMap, exc: BaseException, stage: str, on_failure: MapFailure | None
) -> None:
    if on_failure is None:
        raise PluginError(
            f"structure map {getattr(smap, 'name', smap)!r} raised in {stage}(): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    on_failure(smap, exc, stage)


def _checked_sites(smap: StructureMap, model: nn.Module) -> list[Site]:
    if smap.name == "generic":
        return []
    sites = smap.sites(model)
    if isinstance(sites, str | bytes) or not isinstance(sites, Sequence | Iterator):
        raise TypeError(
            f"sites() returned a {type(sites).__name__}; it must return a list of sites"
        )
    sites = list(sites)
    for s in sites:
        if not isinstance(s, ModuleSite | SequenceSite):
            raise TypeError(
                f"sites() returned a {type(s).__name__} among its sites; each must be a "
                "unipeft ModuleSite or SequenceSite"
            )
    return sites


def all_sites(model: nn.Module, smap: StructureMap) -> list[Site]:
    """The map's sites plus generic sites for every module (names are unique)."""
    seen: set[str] = set()
    out: list[Site] = []
    sites = _checked_sites(smap, model)
    for site in [*sites, *generic_sites(model)]:
        if site.name not in seen:
            seen.add(site.name)
            out.append(site)
    return out


def describe_roles(sites: Sequence[Site]) -> str:
    counts = Counter(
        (f"{s.tower}/" if s.tower else "") + s.role for s in sites if s.role is not None
    )
    return ", ".join(f"{r} (x{n})" for r, n in sorted(counts.items())) or "none"


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str],
    maps: Sequence[StructureMap],
    on_failure: MapFailure | None = None,
) -> tuple[StructureMap, list[Site], set[str]]:
    """Sites for ``targets``, without duplicates, and the names of the sites reached only
    through optional targets."""
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise TargetError("targets is empty; name at least one role or module regex")
    parsed = [parse_target(t) for t in targets]
    smap, smap_sites = _pick(model, maps, on_failure)
    role_targets = [p for p in parsed if isinstance(p, RoleTarget)]
    if role_targets and smap.name == "generic":
        roles = ", ".join(p.text for p in role_targets)
        raise TargetError(
            f"targets {roles} are semantic roles, but no structure map recognises "
            f"{type(model).__name__}. The generic map reaches any module by name instead: pass "
            "module-name regexes such as 're:.*\\.fc1' or 'encoder.0.linear' (see "
            "unipeft.inspect_sites(model) for the names), or register a structure map for "
            "this architecture through the register_backbones hook."
        )
    map_sites = smap_sites if role_targets else []
    generic = generic_sites(model) if len(role_targets) < len(parsed) else []
    chosen: dict[tuple, Site] = {}
    required: set[str] = set()
    for target in parsed:
        matched = _match(target, map_sites, generic)
        if not matched and not target.optional:
            raise TargetError(_no_match_message(target, model, smap, map_sites or smap_sites))
        for site in matched:
            site = chosen.setdefault(_physical_key(site), site)
            if not target.optional:
                required.add(site.name)
    if not chosen:
        roles = describe_roles(map_sites or smap_sites)
        raise TargetError(
            f"targets {list(targets)} match nothing on {type(model).__name__} (map "
            f"{smap.name!r}); roles on this backbone: {roles}"
        )
    optional_only = {s.name for s in chosen.values()} - required
    return smap, list(chosen.values()), optional_only


def method_targets(
    model: nn.Module,
    method: Any,
    config: Any,
    asked: list[str] | None,
    maps: Sequence[StructureMap],
    on_failure: MapFailure | None = None,
) -> list[str]:
    """The targets ``method`` attaches to on ``model``: ``asked`` when given, else the
    method's default targets, unless they reach no site it accepts there and the backbone's
    structure map names defaults of its own for the method (``default_targets``, keyed by
    method id, family or site kind; see :class:`~unipeft.contract.maps.StructureMap`)."""
    if asked is not None:
        return asked
    own = list(method.targets_for(config))
    if not any(_claims(m, model) for m in maps if getattr(m, "default_targets", None)):
        return own  # no map with defaults of its own reads this model: skip picking one
    smap, _ = _pick(model, maps, on_failure)
    fallback = getattr(smap, "default_targets", None)
    if not fallback:
        return own
    if _reaches(model, own, method, config, maps, on_failure, any_site=True):
        return own
    for key in (method.id, method.family, *method.site_kinds):
        if key in fallback:  # None: no default of the map's own for this method
            theirs = fallback[key]
            # the map's targets when they reach sites (a refusal there names the site kind)
            if theirs is None or not _reaches(
                model, theirs, method, config, maps, on_failure, any_site=True
            ):
                return own
            return list(theirs)
    return own


def _claims(smap: StructureMap, model: nn.Module) -> bool:
    """``smap.matches(model)``, a raising map counting as no match (picking it reports)."""
    try:
        return bool(smap.matches(model))
    except Exception:
        return False


def _reaches(
    model: nn.Module,
    targets: Sequence[str],
    method: Any,
    config: Any,
    maps: Sequence[StructureMap],
    on_failure: MapFailure | None,
    any_site: bool = False,
) -> bool:
    """Whether ``targets`` reach a site ``method`` accepts (``any_site``: or any site
    through a required target, which the method's refusal then reports)."""
    try:
        _, reached, optional = resolve_targets(model, targets, maps, on_failure)
    except TargetError:
        return False
    return any(
        (any_site and s.name not in optional) or method.refusal(config, s) is None for s in reached
    )


def _physical_key(site: Site) -> tuple:
    entry = getattr(site, "entry", None)
    module = getattr(site, "module", None) or getattr(site, "insert", None)
    # one module may hold several weights that are sites of their own (nn.LSTM's packed ones)
    weight = getattr(getattr(site, "weight", None), "weight_name", "weight")
    return (
        site.kind,
        id(module),
        None if weight == "weight" else weight,
        getattr(site, "out_slice", None),
        id(entry) if entry else None,
        site.name if site.kind == "sequence" else None,
    )


def _match(target, map_sites: list[Site], generic: list[Site]) -> list[Site]:
    if isinstance(target, RegexTarget):
        return [s for s in generic if target.pattern.fullmatch(s.name)]
    candidates = [
        s
        for s in map_sites
        if s.role == target.role and (target.tower is None or s.tower == target.tower)
    ]
    if target.selector is None or target.role in ("embed", "tokens"):
        return candidates
    out: list[Site] = []
    by_tower: dict[str | None, list[Site]] = {}
    for s in candidates:
        by_tower.setdefault(s.tower, []).append(s)
    depths = []
    for tower_sites in by_tower.values():
        layers = [s.layer for s in tower_sites if s.layer is not None]
        if not layers:
            continue
        n_layers = 1 + max(layers)
        depths.append(n_layers)
        keep = target.layers(n_layers)
        out.extend(s for s in tower_sites if s.layer in keep)
    if depths and not out and not target.optional:
        stacks = " and ".join(f"{n} layers (0..{n - 1})" for n in sorted(set(depths)))
        raise TargetError(
            f"target {target.text!r}: layer selector [{target.selector}] selects no layer; "
            f"this backbone's stacks have {stacks}. A slice [start:stop] keeps the layers "
            "start..stop-1 (negative bounds count from the end)"
        )
    return out


def _no_match_message(target, model: nn.Module, smap: StructureMap, sites: list[Site]) -> str:
    name = type(model).__name__
    if isinstance(target, RegexTarget):
        sample = [s.name for s in generic_sites(model)][:8]
        return (
            f"target {target.text!r} matches no module of {name}. Module-name targets are "
            f"regexes matched against full names such as {', '.join(sample)}. "
            f"Roles on this backbone (map {smap.name!r}): {describe_roles(sites)}"
        )
    return (
        f"target {target.text!r} matches nothing on {name} (map {smap.name!r}). Roles on "
        f"this backbone: {describe_roles(sites)}"
    )
