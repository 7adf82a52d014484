"""pytest plugin (entry point ``pytest11``): the conformance kit for any method.

``pytest --unipeft-conformance ia3`` runs every invariant on method ``ia3`` over every tiny
backbone; ``--unipeft-conformance all`` runs every registered method. Narrow the backbones
with ``--unipeft-backbones bert,timm_vit``. Hypothesis profiles: ``unipeft-fast`` (default,
for CI) and ``unipeft-thorough``; choose with ``--unipeft-profile`` or the environment
variable ``UNIPEFT_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from .backbones import BACKBONES, TinyBackbone

settings.register_profile(
    "unipeft-fast",
    max_examples=3,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
    print_blob=True,
)
settings.register_profile(
    "unipeft-thorough",
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
    print_blob=True,
)

_PROFILE = {"name": os.environ.get("UNIPEFT_HYPOTHESIS_PROFILE", "unipeft-fast")}
SUITE = Path(__file__).with_name("suite.py")


def hypothesis_profile() -> str:
    return _PROFILE["name"]


@dataclass(frozen=True)
class ConformanceCase:
    method: object  # unipeft.Method
    backbone: TinyBackbone

    @property
    def id(self) -> str:
        return f"{self.method.id}-{self.backbone.name}"  # type: ignore[attr-defined]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("unipeft", "unipeft conformance kit")
    group.addoption(
        "--unipeft-conformance",
        action="append",
        default=[],
        metavar="METHOD",
        help="run the conformance suite on these method ids (comma-separated or repeated; "
        "'all' for every registered method)",
    )
    group.addoption(
        "--unipeft-backbones",
        default="",
        metavar="NAMES",
        help=f"comma-separated tiny backbones to use (default all: {', '.join(BACKBONES)})",
    )
    group.addoption(
        "--unipeft-profile",
        default=None,
        choices=("unipeft-fast", "unipeft-thorough"),
        help="hypothesis profile of the conformance suite",
    )


def _split(values: list[str] | str) -> list[str]:
    items = values if isinstance(values, list) else [values]
    return [v.strip() for item in items for v in item.split(",") if v.strip()]


def pytest_configure(config: pytest.Config) -> None:
    profile = config.getoption("--unipeft-profile")
    if profile:
        _PROFILE["name"] = profile
    wanted = _split(config.getoption("--unipeft-conformance"))
    if wanted:
        _check_methods(wanted)
        config.args.append(str(SUITE))


def _check_methods(wanted: list[str]) -> None:
    import unipeft

    known = {m.id for m in unipeft.list_methods()}
    unknown = [w for w in wanted if w not in known and w != "all"]
    if unknown:
        raise pytest.UsageError(
            f"--unipeft-conformance: unknown method(s) {unknown}; registered: "
            f"{', '.join(sorted(known))}. Is the plugin's distribution installed?"
        )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_case" not in metafunc.fixturenames:
        return
    import unipeft

    config = metafunc.config
    wanted = _split(config.getoption("--unipeft-conformance"))
    methods = unipeft.list_methods()
    if wanted and "all" not in wanted:
        _check_methods(wanted)
        methods = [m for m in methods if m.id in wanted]
    names = _split(config.getoption("--unipeft-backbones")) or list(BACKBONES)
    unknown_bb = [n for n in names if n not in BACKBONES]
    if unknown_bb:
        raise pytest.UsageError(
            f"--unipeft-backbones: unknown {unknown_bb}; known {list(BACKBONES)}"
        )
    cases = [ConformanceCase(m, BACKBONES[n]) for m in methods for n in names]
    metafunc.parametrize("conformance_case", cases, ids=[c.id for c in cases])
