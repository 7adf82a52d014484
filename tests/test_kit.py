"""The conformance kit as a plugin author uses it: ``pytest --unipeft-conformance ID``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

import unipeft
from unipeft.testing.invariants import INVARIANTS
from unipeft.testing.strategies import configs, invalid_values


def test_plugin_author_command_runs_the_suite(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-v",
        "--unipeft-conformance",
        "lora",
        "--unipeft-backbones",
        "bert,timm_vit,open_clip",
    )
    result.assert_outcomes(passed=3 * len(INVARIANTS))
    result.stdout.fnmatch_lines(["*lora-open_clip-unload_restores*PASSED*"])


def test_unknown_method_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--unipeft-conformance", "not_a_method")
    assert result.ret == pytest.ExitCode.INTERRUPTED or result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown method(s) ['not_a_method']" in result.stderr.str()


def test_kit_catches_a_broken_method(pytester: pytest.Pytester) -> None:
    """A method whose formula lies fails the trainable-count invariant."""
    pytester.makeconftest(
        """
import unipeft
from dataclasses import replace
from unipeft.runtime.registry import registry

def pytest_configure(config):
    reg = registry()
    lora = reg.methods["lora"]
    reg.methods["lying_lora"] = replace(
        lora, id="lying_lora", num_parameters=lambda cfg, site: 1
    )
"""
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-q",
        "--unipeft-conformance",
        "lying_lora",
        "--unipeft-backbones",
        "bert",
        "-k",
        "trainable_count",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*trainable parameters, but the formula*"])


@settings(max_examples=20, deadline=None)
@given(data=__import__("hypothesis").strategies.data())
def test_drawn_configs_are_valid_for_every_method(data) -> None:
    for method in unipeft.list_methods():
        cfg = data.draw(configs(method))
        assert isinstance(cfg, method.config)


def test_invalid_values_cover_every_bounded_field() -> None:
    fields = {f for f, _ in invalid_values(unipeft.get_method("lora"))}
    assert fields == {"r", "alpha", "dropout", "init"}
