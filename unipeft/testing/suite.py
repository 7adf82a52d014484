"""The conformance suite as pytest tests, parametrised over every method × backbone.

Run it on any registered method (a plugin's too) with ``pytest --unipeft-conformance ID``;
the project's own tests import it. Cases come from the registry (``unipeft.list_methods()``
and the tiny backbones every plugin registers): nobody keeps a list by hand. The tests'
node ids are ``unipeft/testing/suite.py::test_conformance[<method>-<backbone>-<invariant>]``
wherever unipeft is installed.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ..contract.errors import TargetError
from .invariants import INVARIANTS
from .pytest_plugin import ConformanceCase, hypothesis_profile
from .strategies import configs


@pytest.mark.parametrize("invariant", list(INVARIANTS))
@settings(settings.get_profile(hypothesis_profile()))
@given(data=st.data())
def test_conformance(
    conformance_case: ConformanceCase, invariant: str, data: st.DataObject
) -> None:
    method, backbone = conformance_case.method, conformance_case.backbone
    cfg = data.draw(configs(method), label="config")
    try:
        INVARIANTS[invariant](method, backbone, cfg)
    except TargetError as exc:
        if "match" in str(exc) and "nothing" in str(exc):
            pytest.skip(f"{method.id}'s default targets do not exist on {backbone.name}: {exc}")
        # this config cannot attach here (e.g. bitfit without biases to tune): draw another;
        # hypothesis reports the test unsatisfiable if no config ever can
        assume(False)
