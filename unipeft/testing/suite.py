"""The conformance suite as pytest tests, parametrised over every method × backbone.

Run it on any registered method (a plugin's too) with ``pytest --unipeft-conformance ID``;
the project's own tests import it. Cases come from the registry (``unipeft.list_methods()``
and the tiny backbones every plugin registers): nobody keeps a list by hand. The tests'
node ids are ``unipeft/testing/suite.py::test_conformance[<method>-<backbone>-<invariant>]``
and ``unipeft/testing/suite.py::test_lifecycle[<method>-<backbone>]`` wherever unipeft is
installed.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import pytest

from .invariants import INVARIANTS
from .lifecycle import run_lifecycle
from .pytest_plugin import ConformanceCase
from .runner import check


class KnownFailure(NamedTuple):
    """How a known case fails: the message it must fail with and why. ``strict``: the
    case must fail (an entry for a bug, removed once fixed); not strict: a numerical limit
    that some drawn configs reach and others miss, so a pass is a pass."""

    message: str
    reason: str
    strict: bool = True


_RECURRENT_HALF = KnownFailure(
    r"float16 output differs from float32",  # bfloat16 or float16, by platform
    "numerical: a recurrent layer carries the bf16 rounding of its effective weights through "
    "every time step, and this drawn config's change is several times the weight it adapts "
    "(docs/backbones.md, 'Known numerical failures')",
    strict=False,
)

_GRAPH_SUMS = KnownFailure(
    r"merged vs unmerged output|vs 'default' alone",
    "numerical: RandLoRA's default scale (alpha 640) makes the change hundreds of times the "
    "weight, and the graph layers sum it over neighbours; an output near 0 among outputs "
    "near 500 then differs by about 3e-4 between two float32 orders of summation (seen with "
    "torch 2.11's CPU kernels; docs/backbones.md, 'Known numerical failures')",
    strict=False,
)

KNOWN_FAILURES: dict[tuple[str, ...], KnownFailure] = {
    ("fourierft", "half_precision", "lstm"): _RECURRENT_HALF,
    ("randlora", "half_precision", "lstm"): _RECURRENT_HALF,
    ("randlora", "half_precision", "gru"): _RECURRENT_HALF,
    ("vblora", "half_precision", "lstm"): _RECURRENT_HALF,
    ("vblora", "half_precision", "gru"): _RECURRENT_HALF,
    ("randlora", "merge_roundtrip", "gnn"): _GRAPH_SUMS,
    ("randlora", "composition", "gnn"): _GRAPH_SUMS,
    ("vblora", "half_precision", "mamba2"): KnownFailure(
        r"bfloat16 output differs from float32",
        "numerical: Mamba2's in_proj also yields the time step, so this drawn VB-LoRA update "
        "(one bank vector of length 1: every entry of the change alike) makes the time steps "
        "large, and the chunked scan's exponentials of their bf16-rounded sums move the "
        "output by more than 0.1 of its scale (docs/backbones.md, 'Known numerical failures')",
        strict=False,
    ),
    ("vblora", "merge_roundtrip", "mamba"): KnownFailure(
        r"merged vs unmerged output",
        "numerical: float32 rounding of the merged in_proj, carried through the selective "
        "scan's B·C term (quadratic in that change), exceeds 1e-5 on this drawn config; it "
        "is exactly 0 in float64 (docs/backbones.md, 'Known numerical failures')",
        strict=False,
    ),
}
"""Known failures of built-in methods, keyed by ``(method id, invariant)`` (on every
backbone) or ``(method id, invariant, backbone)`` (on that tiny backbone only). A case that
fails with the entry's message is reported as xfail, with the reason; one that fails
otherwise fails; one that passes fails if the entry is strict (so that the entry is removed
once the bug is fixed)."""


def known_failure(method: str, invariant: str, backbone: str) -> KnownFailure | None:
    """The :data:`KNOWN_FAILURES` entry of one case, the backbone's own first."""
    return KNOWN_FAILURES.get((method, invariant, backbone)) or KNOWN_FAILURES.get(
        (method, invariant)
    )


@pytest.mark.parametrize("invariant", list(INVARIANTS))
def test_conformance(conformance_case: ConformanceCase, invariant: str) -> None:
    """One invariant: the method's default config, its wide config, then drawn configs."""
    method, backbone = conformance_case.method, conformance_case.backbone
    known = known_failure(method.id, invariant, backbone.name)  # type: ignore[attr-defined]
    if known is None:
        check(method, backbone, invariant)  # type: ignore[arg-type]
        return
    try:
        check(method, backbone, invariant)  # type: ignore[arg-type]
    except Exception as exc:  # hypothesis groups distinct failures of one test together
        failures = _leaves(exc)
        if not all(
            isinstance(e, AssertionError) and re.search(known.message, str(e)) for e in failures
        ):
            raise
        pytest.xfail(known.reason)
    if known.strict:
        pytest.fail(f"known failure no longer fails ({known.reason}): remove its entry")


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside an exception group, however nested (``exc`` alone otherwise)."""
    inner = getattr(exc, "exceptions", None)
    if not isinstance(inner, tuple):
        return [exc]
    return [leaf for e in inner for leaf in _leaves(e)]


def test_lifecycle(conformance_case: ConformanceCase) -> None:
    """Random sequences of the model's operations, checked against a shadow model."""
    run_lifecycle(conformance_case.method, conformance_case.backbone)  # type: ignore[arg-type]
