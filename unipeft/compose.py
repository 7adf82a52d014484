"""Composition of adapters: :class:`Stack`, :class:`Parallel`, :class:`Average`, :class:`Fuse`.

A composition is a small frozen tree whose leaves are adapter names. Pass one to
:meth:`unipeft.DeltaModel.set_active`; ``model.save`` records it and ``unipeft.load``
restores it. At a site with output ``y = f(x)`` and the deltas ``d_a(x, y)`` of adapter
``a`` (for an output-additive method ``d_a(x, y) = y + Δ_a(x)``):

- ``Stack(a, b)``: ``y' = d_b(x, d_a(x, y))``, a's output feeds b (``set_active(["a", "b"])``
  is the same). For output-additive deltas this is ``y + Δ_a(x) + Δ_b(x)``; soft prompts are
  concatenated in order.
- ``Parallel(a, b)``: the batch is replicated once per child; copy ``i`` runs child ``i``
  alone, and the outputs come back concatenated along the batch (``2N`` samples).
- ``Average(a, b, weights=w)``: ``y' = y + Σ_i w_i (d_i(x, y) − y)``, with ``w``
  normalised to sum to 1 unless ``normalize=False`` (default: equal weights). With weights
  that sum to 1 this is ``Σ_i w_i d_i(x, y)``; for weight-change methods it is
  ``y + (Σ_i w_i ΔW_i) x``.
- ``Fuse(a, b)``: AdapterFusion (Pfeiffer et al., 2021): with ``o_i = d_i(x, y) − y``,
  ``α = softmax_i((Q y)·(K o_i) / T)`` and ``y' = y + Σ_i α_i V o_i``, where ``Q``, ``K``
  (with biases) and ``V`` (no bias, initialised to the identity) are trainable per site.

The exact rules, the refusals and the table per family are in ``docs/composition.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

from .contract.errors import ConfigError
from .contract.plan import adapter_name_refusal

__all__ = ["Average", "Composition", "Fuse", "Parallel", "Stack", "from_json"]


class Composition:
    """Base of the four operators: an ordered, frozen tuple of children (adapter names or
    compositions). Equal when of the same operator with equal children and settings."""

    op: ClassVar[str] = ""
    __slots__ = ("children",)

    def __init__(self, *children: str | Composition) -> None:
        if len(children) == 1 and isinstance(children[0], list | tuple):
            children = tuple(children[0])  # Stack(["a", "b"]) reads as Stack("a", "b")
        name = type(self).__name__
        if not children:
            raise ConfigError(f"{name}() needs at least one adapter name or composition")
        for child in children:
            if isinstance(child, Composition):
                continue
            if not isinstance(child, str):
                raise ConfigError(
                    f"{name}(...) takes adapter names (str) and compositions, got "
                    f"{type(child).__name__} {child!r}"
                )
            reason = adapter_name_refusal(child)
            if reason is not None:
                raise ConfigError(f"{name}(...): {reason}")
        object.__setattr__(self, "children", tuple(children))
        seen: set[str] = set()
        for leaf in self.leaves():
            if leaf in seen:
                raise ConfigError(
                    f"{name}(...) names adapter {leaf!r} twice; an adapter runs at most once "
                    "per composition (add a copy under another name to use it twice)"
                )
            seen.add(leaf)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __iter__(self) -> Iterator[str | Composition]:
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def leaves(self) -> tuple[str, ...]:
        """Every adapter name in the tree, depth first, in order."""
        out: list[str] = []
        for child in self.children:
            out.extend(child.leaves() if isinstance(child, Composition) else (child,))
        return tuple(out)

    def settings(self) -> dict[str, Any]:
        """The operator's own settings (JSON values), beside its children."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """``{"op": ..., "children": [...], **settings}``: JSON values only."""
        children = [c.to_json() if isinstance(c, Composition) else c for c in self.children]
        return {"op": self.op, "children": children, **self.settings()}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_json() == other.to_json()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        parts = [repr(c) for c in self.children]
        parts += [f"{k}={v!r}" for k, v in self.settings().items() if v is not None]
        return f"{type(self).__name__}({', '.join(parts)})"


class Stack(Composition):
    """Serial composition: each child's output feeds the next, at every site."""

    op = "stack"
    __slots__ = ()


class Parallel(Composition):
    """The batch replicated once per child; copy ``i`` runs child ``i``; outputs are
    concatenated along the batch. Only at the top level, with adapter names as children."""

    op = "parallel"
    __slots__ = ()

    def __init__(self, *children: str | Composition) -> None:
        super().__init__(*children)
        for child in self.children:
            if isinstance(child, Composition):
                raise ConfigError(
                    f"Parallel(...) takes adapter names only, got {child!r}: a composition per "
                    "branch is not supported; run each branch as its own batch instead"
                )


class Average(Composition):
    """``y + Σ_i w_i (d_i(x, y) − y)`` at every site (``weights`` normalised to sum to 1
    unless ``normalize=False``; default: equal weights)."""

    op = "average"
    __slots__ = ("normalize", "weights")

    def __init__(
        self,
        *children: str | Composition,
        weights: list[float] | tuple[float, ...] | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__(*children)
        if not isinstance(normalize, bool):
            raise ConfigError(f"Average(normalize=...) must be True or False, got {normalize!r}")
        n = len(self.children)
        given = None
        if weights is not None:
            if not isinstance(weights, list | tuple) or len(weights) != n:
                raise ConfigError(
                    f"Average(weights=...) needs one number per child ({n}), got {weights!r}"
                )
            bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, int | float)]
            if bad or not all(math.isfinite(float(w)) for w in weights):
                raise ConfigError(f"Average(weights=...) must be finite numbers, got {weights!r}")
            given = tuple(float(w) for w in weights)
            if normalize and (any(w < 0 for w in given) or sum(given) <= 0):
                raise ConfigError(
                    f"Average(weights={list(given)}) cannot be normalised: give "
                    "non-negative weights with a positive sum, or normalize=False"
                )
        object.__setattr__(self, "weights", given)
        object.__setattr__(self, "normalize", normalize)

    def effective_weights(self) -> tuple[float, ...]:
        """The ``w_i`` of the formula: the weights given, normalised to sum to 1 unless
        ``normalize=False``; equal weights ``1/n`` when none were given."""
        n = len(self.children)
        if self.weights is None:
            return tuple(1.0 / n for _ in range(n))
        if not self.normalize:
            return self.weights
        total = sum(self.weights)
        return tuple(w / total for w in self.weights)

    def settings(self) -> dict[str, Any]:
        weights = None if self.weights is None else list(self.weights)
        return {"weights": weights, "normalize": self.normalize}


class Fuse(Composition):
    """AdapterFusion over the children's output changes at every site, with trainable
    query, key and value per site (created on the first ``set_active`` with this fusion).

    ``name`` keys the fusion's parameters (default: the adapter names joined with ``+``);
    ``temperature`` divides the attention scores; ``regularization`` weighs
    ``Σ_sites ‖I − V‖²`` in ``model.aux_loss()`` (the paper's 0.01; 0 turns it off)."""

    op = "fuse"
    __slots__ = ("name", "regularization", "temperature")

    def __init__(
        self,
        *children: str | Composition,
        name: str | None = None,
        temperature: float = 1.0,
        regularization: float = 0.01,
    ) -> None:
        super().__init__(*children)
        for child in self.children:
            if isinstance(child, Composition) and not isinstance(child, Stack):
                raise ConfigError(
                    f"Fuse(...) takes adapter names and Stack(...) of them, got {child!r}: "
                    "the fusion attends over its children's outputs; wrap other operators in "
                    "a Stack outside the Fuse instead"
                )
        if name is None:
            name = "+".join(self.leaves())
        if not isinstance(name, str) or not 0 < len(name) <= 256 or "." in name:
            raise ConfigError(
                f"Fuse(name=...) must be 1 to 256 characters without '.', got {name!r}"
            )
        for field, value in (("temperature", temperature), ("regularization", regularization)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"Fuse({field}=...) must be a number, got {value!r}")
            low_ok = value > 0 if field == "temperature" else value >= 0
            if not math.isfinite(value) or not low_ok:
                bound = "> 0" if field == "temperature" else ">= 0"
                raise ConfigError(f"Fuse({field}={value!r}) is refused: it must be finite, {bound}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "temperature", float(temperature))
        object.__setattr__(self, "regularization", float(regularization))

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "temperature": self.temperature,
            "regularization": self.regularization,
        }


OPERATORS: dict[str, type[Composition]] = {c.op: c for c in (Stack, Parallel, Average, Fuse)}


def from_json(data: Any, where: str = "composition") -> Composition:
    """The composition a :meth:`Composition.to_json` value describes; a :class:`ConfigError`
    names the JSON path of anything wrong. Builds only the four operators (no code runs)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object with op and children, got {data!r}")
    op = data.get("op")
    cls = OPERATORS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ConfigError(f"{where}.op = {op!r} is refused: one of {', '.join(OPERATORS)}")
    children = data.get("children")
    if not isinstance(children, list):
        raise ConfigError(f"{where}.children must be a JSON array, got {children!r}")
    allowed = {"op", "children", *(cls.__slots__ if cls.__slots__ != () else ())}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {unknown} for op {op!r}")
    kids = [
        from_json(c, f"{where}.children[{i}]") if isinstance(c, dict) else c
        for i, c in enumerate(children)
    ]
    settings = {k: v for k, v in data.items() if k not in ("op", "children")}
    try:
        return cls(*kids, **settings)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
