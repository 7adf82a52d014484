"""pytest plugin (entry point ``pytest11``): the conformance kit for any method.

``pytest --unipeft-conformance ia3`` runs every invariant on method ``ia3`` over every
registered tiny backbone; ``--unipeft-conformance all`` runs every registered method. Narrow
the backbones with ``--unipeft-backbones bert,timm_vit`` (any registered name, a plugin's
too). Hypothesis profiles: ``unipeft-fast`` (default, for CI) and ``unipeft-thorough``;
choose with ``--unipeft-profile`` or the environment variable ``UNIPEFT_HYPOTHESIS_PROFILE``.

The suite's tests have the node ids ``unipeft/testing/suite.py::test_conformance[...]``
wherever unipeft is installed, and such a node id given on the command line selects the test
from any directory. When the kit runs (``--unipeft-conformance``, or such a node id from a
directory without the suite), hypothesis keeps its files in :func:`kit_storage_dir` instead
of ``.hypothesis/`` in the current directory, unless ``HYPOTHESIS_STORAGE_DIRECTORY`` says
where.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from ..maps.tiny import TinyBackbone

settings.register_profile(
    "unipeft-fast",
    max_examples=2,  # drawn configs, after the explicit default and wide ones (see runner)
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
LIFECYCLE = {"unipeft-fast": (3, 10), "unipeft-thorough": (25, 30)}
"""Per profile: runs of the lifecycle state machine per case, and steps per run."""
SUITE = Path(__file__).with_name("suite.py")
SUITE_NODE_PATH = "unipeft/testing/suite.py"
"""The path part of the suite's node ids, the same wherever unipeft is installed."""
STORAGE_ENV = "HYPOTHESIS_STORAGE_DIRECTORY"


def hypothesis_profile() -> str:
    return _PROFILE["name"]


def lifecycle_settings() -> settings:
    """The profile's settings with its number of lifecycle runs and steps per run."""
    name = hypothesis_profile()
    runs, steps = LIFECYCLE[name]
    return settings(settings.get_profile(name), max_examples=runs, stateful_step_count=steps)


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
        help="comma-separated names of registered tiny backbones to run the suite on "
        "(default: all of them)",
    )
    parser.addini(
        "unipeft_slow_families",
        type="linelist",
        default=[],
        help="tiny-backbone families whose conformance cases are marked slow when "
        "--unipeft-backbones does not name backbones (a project's quick default run)",
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
    given = list(config.args)
    config.args[:] = [_suite_arg(arg, config.invocation_params.dir) for arg in given]
    wanted = _split(config.getoption("--unipeft-conformance"))
    if wanted:
        _check_methods(wanted)
        _backbones(config)
        if not any(arg.partition("::")[0] == str(SUITE) for arg in config.args):
            config.args.append(str(SUITE))
    if (wanted or config.args != given) and not os.environ.get(STORAGE_ENV):
        # the kit runs (from a plugin's folder, say): keep hypothesis's files out of it
        from hypothesis.configuration import set_hypothesis_home_dir

        set_hypothesis_home_dir(kit_storage_dir())


def kit_storage_dir() -> Path:
    """Where hypothesis keeps its files while the kit runs: ``unipeft/hypothesis`` in the
    user's cache directory (``$XDG_CACHE_HOME``, else ``~/.cache``; ``%LOCALAPPDATA%`` on
    Windows), or in the temporary directory when there is no home."""
    base = os.environ.get("XDG_CACHE_HOME") or (
        os.environ.get("LOCALAPPDATA") if os.name == "nt" else None
    )
    try:
        root = Path(base) if base else Path.home() / ".cache"
    except RuntimeError:  # no home directory
        root = Path(tempfile.gettempdir())
    return root / "unipeft" / "hypothesis"


def _suite_arg(arg: str, invocation_dir: Path) -> str:
    """A node id of the suite (``unipeft/testing/suite.py::test_conformance[...]``) pointed
    at the installed suite, unless that relative path exists here."""
    path, sep, rest = arg.partition("::")
    if path.replace(os.sep, "/") == SUITE_NODE_PATH and not (invocation_dir / path).exists():
        return str(SUITE) + sep + rest
    return arg


def pytest_pycollect_makemodule(
    module_path: Path, parent: pytest.Collector
) -> pytest.Module | None:
    """Give the suite a real path in its node ids, also when it lies outside the rootdir
    (pytest would give a file named on the command line an empty one there)."""
    if module_path.name == SUITE.name and module_path.resolve() == SUITE.resolve():
        return pytest.Module.from_parent(parent, path=module_path, nodeid=SUITE_NODE_PATH)
    return None


def _check_methods(wanted: list[str]) -> None:
    import unipeft

    known = {m.id for m in unipeft.list_methods()}
    unknown = [w for w in wanted if w not in known and w != "all"]
    if unknown:
        raise pytest.UsageError(
            f"--unipeft-conformance: unknown method(s) {unknown}; registered: "
            f"{', '.join(sorted(known))}. Is the plugin's distribution installed?"
        )


def _backbones(config: pytest.Config) -> list[TinyBackbone]:
    """The tiny backbones ``--unipeft-backbones`` names (all registered ones by default)."""
    from ..runtime.registry import registry

    registered = registry().tiny_backbones
    names = _split(config.getoption("--unipeft-backbones")) or list(registered)
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise pytest.UsageError(
            f"--unipeft-backbones: unknown tiny backbone(s) {unknown}; registered: "
            f"{', '.join(registered) or 'none'}. A plugin adds its own with the "
            "register_tiny_backbones hook; is its distribution installed?"
        )
    return [registered[n] for n in names]


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
    cases = [ConformanceCase(m, bb) for m in methods for bb in _backbones(config)]
    slow = set() if config.getoption("--unipeft-backbones") else set(_slow_families(config))
    params = [
        pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.backbone.family in slow else [])
        for c in cases
    ]
    metafunc.parametrize("conformance_case", params)


def _slow_families(config: pytest.Config) -> list[str]:
    return [f for line in config.getini("unipeft_slow_families") for f in line.split()]
