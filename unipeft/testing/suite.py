"""The conformance suite as pytest tests, parametrised over every method × backbone.

Run it on any registered method (a plugin's too) with ``pytest --unipeft-conformance ID``;
the project's own tests import it. Cases come from the registry (``unipeft.list_methods()``
and the tiny backbones every plugin registers): nobody keeps a list by hand. The tests'
node ids are ``unipeft/testing/suite.py::test_conformance[<method>-<backbone>-<invariant>]``
and ``unipeft/testing/suite.py::test_lifecycle[<method>-<backbone>]`` wherever unipeft is
installed.
"""

from __future__ import annotations

import pytest

from .invariants import INVARIANTS
from .lifecycle import run_lifecycle
from .pytest_plugin import ConformanceCase
from .runner import check

KNOWN_FAILURES: dict[tuple[str, str], tuple[str, str]] = {}
"""``(method id, invariant)``: a known bug of a built-in method, as ``(the message the
invariant must fail with, the reason)``. The case must fail exactly so (it is then reported
as xfail, with the reason); if it passes, or fails otherwise, it fails, so that the entry is
removed once the bug is fixed."""


@pytest.mark.parametrize("invariant", list(INVARIANTS))
def test_conformance(conformance_case: ConformanceCase, invariant: str) -> None:
    """One invariant: the method's default config, its wide config, then drawn configs."""
    method, backbone = conformance_case.method, conformance_case.backbone
    known = KNOWN_FAILURES.get((method.id, invariant))  # type: ignore[attr-defined]
    if known is None:
        check(method, backbone, invariant)  # type: ignore[arg-type]
        return
    with pytest.raises(AssertionError, match=known[0]):
        check(method, backbone, invariant)  # type: ignore[arg-type]
    pytest.xfail(known[1])


def test_lifecycle(conformance_case: ConformanceCase) -> None:
    """Random sequences of the model's operations, checked against a shadow model."""
    run_lifecycle(conformance_case.method, conformance_case.backbone)  # type: ignore[arg-type]
