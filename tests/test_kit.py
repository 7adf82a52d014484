"""The conformance kit as a plugin author uses it: ``pytest --unipeft-conformance ID``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings

import unipeft
from unipeft.testing.invariants import INVARIANTS
from unipeft.testing.strategies import (
    WIDTH,
    configs,
    default_config,
    drawn_configs,
    invalid_values,
    wide_config,
)
from unipeft.testing.suite import KNOWN_FAILURES

# a known failure of lora's on every backbone (KNOWN_FAILURES, none today) would be xfail
LORA_XFAILS = sum(1 for key in KNOWN_FAILURES if key[0] == "lora" and len(key) == 2)
assert not [key for key in KNOWN_FAILURES if key[0] == "lora" and len(key) == 3]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No hypothesis storage chosen by the environment; a user cache directory of our own."""
    monkeypatch.delenv("HYPOTHESIS_STORAGE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_plugin_author_command_runs_the_suite(pytester: pytest.Pytester, clean_env: Path) -> None:
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-v",
        "--unipeft-conformance",
        "lora",
        "--unipeft-backbones",
        "bert,timm_vit,open_clip",
    )
    # every invariant and the lifecycle machine, on each backbone
    result.assert_outcomes(passed=3 * (len(INVARIANTS) - LORA_XFAILS + 1), xfailed=3 * LORA_XFAILS)
    # the suite lies outside this rootdir; its node ids still have a path
    result.stdout.fnmatch_lines(
        [
            "unipeft/testing/suite.py::test_conformance[[]lora-open_clip-unload_restores[]] PASS*",
            "unipeft/testing/suite.py::test_lifecycle[[]lora-open_clip[]] PASSED*",
        ]
    )
    # hypothesis kept its files in the user's cache, not in the plugin author's folder
    assert not (pytester.path / ".hypothesis").exists()
    assert (clean_env / "unipeft" / "hypothesis").is_dir()


def test_a_printed_node_id_selects_its_test_from_anywhere(
    pytester: pytest.Pytester, clean_env: Path
) -> None:
    node = "unipeft/testing/suite.py::test_conformance[lora-bert-trainable_count]"
    for extra in (["--unipeft-conformance", "lora"], []):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", node, *extra)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"{node.replace('[', '[[]')} PASSED*"])
    assert not (pytester.path / ".hypothesis").exists()


def test_unknown_backbone_is_a_usage_error_listing_the_registered_ones(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest_subprocess(
        "--unipeft-conformance", "lora", "--unipeft-backbones", "bert,nope"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown tiny backbone(s) ['nope']; registered: bert, gpt2" in result.stderr.str()


TOY_PLUGIN = """
import torch
from torch import nn

import unipeft
from unipeft.maps import BlockLayout, LayoutMap, Tower
from unipeft.maps.tiny import TinyBackbone


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.wq, self.wv, self.up, self.down = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        x = x + self.wv(h) * torch.sigmoid(self.wq(h))
        return x + self.down(torch.relu(self.up(x)))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.stack:
            x = block(x)
        return x


@unipeft.hookimpl
def register_backbones(register):
    register(
        LayoutMap(
            name="toy-map",
            class_names=("Toy",),
            towers=(Tower(r"stack"),),
            layout=BlockLayout(
                projections={"attn.q": "wq", "attn.v": "wv", "mlp.up": "up", "mlp.down": "down"},
                sublayers={"mlp": ("up", "down")},
                norms=("norm",),
            ),
        )
    )


@unipeft.hookimpl
def register_tiny_backbones(register):
    register(
        TinyBackbone(
            "toy",
            "vectors",
            Toy,
            lambda gen: {"x": torch.randn(2, 3, 8, generator=gen)},
            lambda model, inputs: [model(inputs["x"])],
        )
    )
"""


def fake_distribution(site: Path, dist: str, module: str, source: str) -> None:
    """What installing a plugin distribution leaves on ``sys.path``: its module, and the
    metadata that declares its ``unipeft`` entry point."""
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[unipeft]\n{module} = {module}\n")


def test_the_kit_runs_on_a_plugins_tiny_backbone(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    fake_distribution(pytester.path / "site", "unipeft-toy", "unipeft_toy", TOY_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path / "site"))
    monkeypatch.setenv("UNIPEFT_STRICT_PLUGINS", "1")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-v",
        "--unipeft-conformance",
        "lora,bitfit",
        "--unipeft-backbones",
        "toy",
    )
    result.assert_outcomes(passed=2 * (len(INVARIANTS) + 1) - LORA_XFAILS, xfailed=LORA_XFAILS)
    result.stdout.fnmatch_lines(
        [
            "*::test_conformance[[]bitfit-toy-merge_roundtrip[]] PASSED*",
            "*::test_conformance[[]bitfit-toy-fresh_interpreter_load[]] PASSED*",
            "*::test_lifecycle[[]bitfit-toy[]] PASSED*",
        ]
    )


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


# cross-field rules (gralora's r must be a multiple of gralora_k) refuse many independent draws
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[__import__("hypothesis").HealthCheck.filter_too_much],
)
@given(data=__import__("hypothesis").strategies.data())
def test_drawn_configs_are_valid_for_every_method(data) -> None:
    for method in unipeft.list_methods():
        cfg = data.draw(configs(method))
        assert isinstance(cfg, method.config)


def test_invalid_values_cover_every_bounded_field() -> None:
    fields = {f for f, _ in invalid_values(unipeft.get_method("lora"))}
    assert fields == {"r", "alpha", "dropout", "init", "loraplus_lr_ratio"}


def test_configs_include_the_default_and_sizes_above_the_width() -> None:
    lora = unipeft.get_method("lora")
    assert default_config(lora) == lora.config()
    assert wide_config(lora) == lora.config(r=WIDTH + 1)
    moe = unipeft.get_method("moe_lora")
    assert (wide_config(moe).num_experts, wide_config(moe).r) == (WIDTH + 1, WIDTH + 1)
    assert wide_config(unipeft.get_method("bitfit")) is None  # no integer field

    seen: list = []

    @settings(max_examples=60, deadline=None, database=None)
    @given(data=__import__("hypothesis").strategies.data())
    def draw(data) -> None:
        seen.append(data.draw(configs(lora)))

    draw()
    assert lora.config() in seen
    assert any(c.r > WIDTH for c in seen) and any(c.r <= 8 for c in seen)


@settings(max_examples=30, deadline=None, database=None)
@given(data=__import__("hypothesis").strategies.data())
def test_drawn_integers_stay_inside_their_bounds(data) -> None:
    moe = unipeft.get_method("moe_lora")
    cfg = data.draw(drawn_configs(moe))
    assert 2 <= cfg.num_experts <= WIDTH + 9 and 1 <= cfg.r <= WIDTH + 9


def test_fresh_interpreter_names_a_method_it_cannot_resolve(tmp_path: Path) -> None:
    """A method registered only in this process, whose record does not pickle, cannot be
    checked in a fresh interpreter: the worker says so instead of passing."""
    from dataclasses import replace

    from unipeft.runtime.registry import registry
    from unipeft.testing.backbones import BACKBONES
    from unipeft.testing.fresh import FreshInterpreterError, fresh_outputs

    bb = BACKBONES["bert"]
    local = replace(unipeft.get_method("lora"), id="local_lora", num_parameters=lambda c, s: 0)
    reg = registry().methods
    reg["local_lora"] = local
    try:
        unipeft.apply(bb.make(), "local_lora", r=2).save(str(tmp_path))
        with pytest.raises(FreshInterpreterError, match="'local_lora' is unknown in a fresh"):
            fresh_outputs(local, bb, str(tmp_path))
    finally:
        del reg["local_lora"]
