"""Running one invariant on one method and backbone the way the suite does, with or
without pytest: the method's default config and its wide config (integers just above the
tiny backbones' width) as explicit examples, then configs drawn by hypothesis.

``check(method, backbone, invariant)`` raises the invariant's ``AssertionError`` for the
first config that breaks it; :mod:`unipeft.testing.suite` calls it for every case.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from ..contract.config import DeltaConfig
from ..contract.errors import TargetError
from ..contract.method import Method
from ._common import Refused
from .backbones import TinyBackbone
from .invariants import INVARIANTS
from .pytest_plugin import hypothesis_profile
from .strategies import configs, default_config, wide_config

EXAMPLES: dict[str, int] = {"fresh_interpreter_load": 1}
"""Invariants that draw fewer configs than the profile asks (besides the explicit default
and wide configs), to keep the suite's time: the fresh-interpreter load costs a save and a
round trip to the worker per example, and what it catches does not depend on the config."""


class Explicit:
    """An explicit example of the suite: a config derived from the method's defaults."""

    def __init__(self, name: str, make: Callable[[Method], DeltaConfig | None]) -> None:
        self.name, self.make = name, make

    def __repr__(self) -> str:
        return f"<the method's {self.name} config>"


DEFAULT = Explicit("default", default_config)
WIDE = Explicit("wide", wide_config)


FAST_EXAMPLES: dict[str, int] = {
    name: 1
    for name in (
        "composition",
        "mixed_batch_after_step",
        "save_load_roundtrip",
        "unload_leaves_no_trace",
        "unload_restores",
        "adapters_isolated",
        "disabled_is_base",
        "dtype_follows_backbone",
        "train_mode",
        "mixed_batch_matches",
    )
}
"""On the fast profile only: invariants about the adapter's plumbing (saving, unloading,
isolation, composition, routing), which the default and wide configs already exercise, draw
one config instead of the profile's two; those about sizes and numerics (parameter counts,
gradients, identity, merging, half precision, config bounds) keep two."""


def invariant_settings(invariant: str, base: settings | None = None) -> settings:
    """The profile's settings, with the invariant's own number of drawn examples."""
    profile = hypothesis_profile()
    base = base or settings.get_profile(profile)
    wanted = EXAMPLES.get(invariant)
    if wanted is None and profile == "unipeft-fast":
        wanted = FAST_EXAMPLES.get(invariant)
    if wanted is None or wanted >= base.max_examples:
        return base
    return settings(base, max_examples=wanted)


def case_seed(method: Method, bb: TinyBackbone, invariant: str, cfg: DeltaConfig) -> int:
    """The seed of torch's global generator for one run: fixed by the method, backbone,
    invariant and config, so that a delta's random initialisation (drawn when it is built)
    is the same in every process, whatever ran before, and a failure reproduces."""
    return zlib.crc32(f"{method.id}|{bb.name}|{invariant}|{cfg.model_dump_json()}".encode())


def run_one(method: Method, bb: TinyBackbone, invariant: str, cfg: DeltaConfig) -> None:
    """Run one invariant on one config; a config that cannot attach here is discarded."""
    try:
        with torch.random.fork_rng():
            torch.manual_seed(case_seed(method, bb, invariant, cfg))
            INVARIANTS[invariant](method, bb, cfg)
    except TargetError as exc:
        if "match" in str(exc) and "nothing" in str(exc):
            pytest.skip(f"{method.id} has no default target it attaches to on {bb.name}: {exc}")
        if cfg == default_config(method):  # refused by site kind, not by a size: no config can
            pytest.skip(f"{method.id} refuses its default targets on {bb.name}: {exc}")
        # this config cannot attach here (e.g. bitfit without biases to tune): draw another;
        # hypothesis reports the test unsatisfiable if no config ever can
        assume(False)
    except Refused:
        # a valid config refused at apply with a ConfigError (a size above what a site
        # allows, naming the limit): allowed, draw another
        assume(False)


def check(method: Method, bb: TinyBackbone, invariant: str, base: settings | None = None) -> None:
    """Run ``invariant`` on the default config, the wide config and drawn configs."""

    @invariant_settings(invariant, base)
    @example(data=DEFAULT)
    @example(data=WIDE)
    @given(data=st.data())
    def conformance(data: st.DataObject | Explicit) -> None:
        if isinstance(data, Explicit):
            cfg = data.make(method)
            if cfg is None:  # no such config for this method: nothing to run
                return
        else:
            cfg = data.draw(configs(method), label="config")
        run_one(method, bb, invariant, cfg)

    conformance()
