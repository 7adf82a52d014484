"""Hypothesis strategies drawn from a method's pydantic schema.

Numbers are drawn inside the declared bounds, mostly near their lower end, so tiny
backbones stay tiny (a rank of 4000 is valid but tests nothing a rank of 40 does not).
Integers are sometimes drawn just above :data:`WIDTH`, the width of the tiny backbones, so
that sizes larger than a site's features (a rank above ``in_features``) are tried; and
:func:`configs` includes the method's default config. :func:`default_config` and
:func:`wide_config` give those two configs directly: the suite runs both as explicit
examples of every case.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from hypothesis import assume
from hypothesis import strategies as st
from pydantic import ValidationError

from ..contract.config import DeltaConfig
from ..contract.method import Method

INT_SPAN = 7
FLOAT_SPAN = 4.0
WIDTH = 32
"""The width (hidden size) of the tiny backbones; integer draws sometimes exceed it."""
WIDE_SPAN = 8


def _bounds(info: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for meta in info.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            value = getattr(meta, attr, None)
            if value is not None:
                out[attr] = value
    return out


def _int_range(b: dict[str, float]) -> tuple[int, int | None]:
    lo = int(b["ge"]) if "ge" in b else int(b["gt"]) + 1 if "gt" in b else 0
    hi = int(b["le"]) if "le" in b else int(b["lt"]) - 1 if "lt" in b else None
    return lo, hi


def _int_strategy(b: dict[str, float]) -> st.SearchStrategy[int]:
    """Near the lower bound, or (when the bounds allow) just above :data:`WIDTH`."""
    lo, hi = _int_range(b)
    small = st.integers(lo, lo + INT_SPAN if hi is None else min(hi, lo + INT_SPAN))
    above = max(lo, WIDTH + 1)
    if above <= lo + INT_SPAN or (hi is not None and hi < above):
        return small
    wide = st.integers(above, above + WIDE_SPAN if hi is None else min(hi, above + WIDE_SPAN))
    return st.one_of(small, wide)


def _float_strategy(b: dict[str, float]) -> st.SearchStrategy[float]:
    # exclusive lower bounds move up a little: a scale of 1e-300 is valid, and useless
    lo = float(b["ge"]) if "ge" in b else float(b["gt"]) + 1e-3 if "gt" in b else 0.0
    hi = float(b["le"]) if "le" in b else float(b["lt"]) if "lt" in b else lo + FLOAT_SPAN
    hi = min(hi, lo + FLOAT_SPAN)
    return st.floats(
        lo,
        hi,
        exclude_max="lt" in b and hi == float(b["lt"]),
        allow_nan=False,
        allow_infinity=False,
        allow_subnormal=False,
    )


def field_strategy(annotation: Any, info: Any) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        strategies = [field_strategy(a, info) for a in inner]
        if len(inner) < len(args):
            strategies.append(st.none())
        return st.one_of(*strategies)
    if origin is Literal:
        return st.sampled_from(args)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return _int_strategy(_bounds(info))
    if annotation is float:
        return _float_strategy(_bounds(info))
    if annotation is str:
        return st.text(min_size=1, max_size=8)
    raise TypeError(
        f"no strategy for field type {annotation!r}; the conformance kit draws bool, int, "
        "float, str, Literal and Optional fields"
    )


def configs(method: Method) -> st.SearchStrategy[DeltaConfig]:
    """A valid config of ``method``: every field drawn from its schema, or the method's
    default config."""
    default = default_config(method)
    drawn = drawn_configs(method)
    return drawn if default is None else st.one_of(drawn, st.just(default))


def default_config(method: Method) -> DeltaConfig | None:
    """The config with every field at its default (None if a field has no default)."""
    try:
        return method.config()
    except ValidationError:
        return None


def wide_config(method: Method) -> DeltaConfig | None:
    """The default config with every integer field raised to just above :data:`WIDTH` (where
    its bounds allow): sizes larger than the tiny backbones' features. None when no integer
    field can go there, or when the config's own rules refuse the result."""
    default = default_config(method)
    if default is None:
        return None
    values = default.model_dump()
    changed = False
    for name, info in method.config.model_fields.items():
        ints = info.annotation is int or (
            typing.get_origin(info.annotation) in (typing.Union, types.UnionType)
            and int in typing.get_args(info.annotation)
        )
        if not ints or not isinstance(values[name], int) or isinstance(values[name], bool):
            continue
        lo, hi = _int_range(_bounds(info))
        target = max(values[name], lo, WIDTH + 1)
        if hi is not None:
            target = min(target, hi)
        if target > WIDTH and target != values[name]:
            values[name], changed = target, True
    if not changed:
        return None
    try:
        return method.config.model_validate(values)
    except ValidationError:
        return None


@st.composite
def drawn_configs(draw: st.DrawFn, method: Method) -> DeltaConfig:
    """A valid config of ``method``, every field drawn from its schema."""
    cls = method.config
    values = {
        name: draw(field_strategy(info.annotation, info)) for name, info in cls.model_fields.items()
    }
    try:
        return cls.model_validate(values)
    except ValidationError:
        assume(False)  # a cross-field rule (e.g. top_k <= num_experts) refused the draw
        raise  # pragma: no cover


def invalid_values(method: Method) -> list[tuple[str, Any]]:
    """``(field, value)`` pairs outside a field's declared bounds or choices."""
    out: list[tuple[str, Any]] = []
    for name, info in method.config.model_fields.items():
        ann = info.annotation
        if typing.get_origin(ann) is Literal:
            out.append((name, "__not_a_choice__"))
            continue
        b = _bounds(info)
        if ann in (int, float):
            if "ge" in b:
                out.append((name, b["ge"] - 1))
            elif "gt" in b:
                out.append((name, b["gt"]))
            if "le" in b:
                out.append((name, b["le"] + 1))
            elif "lt" in b:
                out.append((name, b["lt"]))
    return out
