"""Plugin isolation: a plugin's method is called through guards that name it when it fails.

The registry hands every method a plugin registers through :func:`guard_method`. Each of
the method's callables (``build``, ``num_parameters``, ``accepts``, ``size_check``, and
``default_targets`` / ``identity_at_init`` when they are functions) then turns anything it
raises, and anything of the wrong type it returns, into a
:class:`~unipeft.contract.errors.PluginError` naming the method and its distribution, and
reports it as a :class:`~unipeft.runtime.registry.PluginFailure`. Errors of unipeft's own
types (a plugin refusing a config with ``ConfigError``, say) pass through unchanged, and so
do running out of memory and interrupts.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch

from ..contract.deltas import DeltaModule
from ..contract.errors import PluginError, UnipeftError
from ..contract.method import Method

Report = Callable[[Method, str, BaseException], PluginError]
"""Records a failure of ``method`` at a stage (``build``...) and returns the error to raise."""

_PASS = (UnipeftError, MemoryError, torch.OutOfMemoryError)


class WrongResult(TypeError):
    """A plugin callable returned something of the wrong type."""


Check = Callable[[Any], "tuple[str | None, Any]"]
"""What a guard does with a result: ``(problem, value)``, the value possibly converted."""


def _guard(method: Method, stage: str, fn: Callable, check: Check, report: Report) -> Callable:
    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            out = fn(*args, **kwargs)
        except _PASS:
            raise
        except Exception as exc:
            raise report(method, stage, exc) from exc
        problem, value = check(out)
        if problem is not None:
            raise report(method, stage, WrongResult(problem))
        return value

    guarded.__unipeft_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def _is_delta(out: Any) -> tuple[str | None, Any]:
    if isinstance(out, DeltaModule):
        return None, out
    return f"build() returned a {type(out).__name__}; it must return a unipeft DeltaModule", out


def _is_count(out: Any) -> tuple[str | None, Any]:
    try:
        value = operator.index(out) if not isinstance(out, bool) else -1
    except TypeError:
        value = -1
    if value >= 0:
        return None, value
    return f"num_parameters() returned {out!r:.60}; it must return an int >= 0", out


def _is_reason(name: str) -> Check:
    def check(out: Any) -> tuple[str | None, Any]:
        if out is None or isinstance(out, str):
            return None, out
        return (
            f"{name}() returned a {type(out).__name__}; it must return a str (why) or None",
            out,
        )

    return check


def _is_targets(out: Any) -> tuple[str | None, Any]:
    if not isinstance(out, str) and isinstance(out, Iterable):
        targets = tuple(out)
        if all(isinstance(t, str) for t in targets):
            return None, targets
    return f"default_targets() returned {out!r:.60}; it must return strings", out


def _any(out: Any) -> tuple[str | None, Any]:
    return None, out


def guard_method(method: Method, report: Report) -> Method:
    """``method`` with every plugin callable guarded (see the module docstring)."""
    if getattr(method.build, "__unipeft_guarded__", False):
        return method
    changes: dict[str, Any] = {
        "build": _guard(method, "build", method.build, _is_delta, report),
        "num_parameters": _guard(
            method, "num_parameters", method.num_parameters, _is_count, report
        ),
    }
    if method.accepts is not None:
        changes["accepts"] = _guard(
            method, "accepts", method.accepts, _is_reason("accepts"), report
        )
    if method.size_check is not None:
        changes["size_check"] = _guard(
            method, "size_check", method.size_check, _is_reason("size_check"), report
        )
    if callable(method.default_targets):
        changes["default_targets"] = _guard(
            method, "default_targets", method.default_targets, _is_targets, report
        )
    if callable(method.identity_at_init):
        changes["identity_at_init"] = _guard(
            method, "identity_at_init", method.identity_at_init, _any, report
        )
    return replace(method, **changes)
