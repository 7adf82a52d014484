"""The base of every method's configuration."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError


class DeltaConfig(BaseModel):
    """Base configuration of a delta method.

    Subclasses declare their fields with ``pydantic.Field(description=...)`` and constraints
    (``ge``, ``le``, ``Literal``...). Configs are frozen, reject unknown fields, and
    round-trip through JSON. Types are strict: no ``True`` for an integer, no ``"8"`` for a
    number (an integer is taken for a float); floats must be finite.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, strict=True, allow_inf_nan=False
    )

    @classmethod
    def parse(cls, method_id: str, values: dict[str, Any]) -> Self:
        """Validate ``values``, raising :class:`ConfigError` that names each bad field."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(method_id, cls, exc)) from None


def format_validation_error(method_id: str, cls: type[BaseModel], exc: ValidationError) -> str:
    lines = [f"invalid configuration for method {method_id!r}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<config>"
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(cls.model_fields))
            lines.append(f"  - unknown field {field!r}; the fields of {cls.__name__} are: {known}")
            continue
        detail = err["msg"]
        info = cls.model_fields.get(str(err["loc"][0])) if err["loc"] else None
        allowed = _allowed(info) if info is not None else ""
        got = err.get("input")
        lines.append(f"  - field {field!r}: {detail} (got {got!r}){allowed}")
    return "\n".join(lines)


def _allowed(info: Any) -> str:
    bounds = []
    for meta in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sym} {value}")
    text = f"; allowed: {' and '.join(bounds)}" if bounds else ""
    if info.description:
        text += f"; {info.description}"
    return text
