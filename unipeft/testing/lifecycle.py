"""The lifecycle state machine: random sequences of a model's operations, checked against a
shadow of what the model should be after each.

For one method and one tiny backbone, hypothesis drives a :class:`LifecycleMachine` through
``add_adapter`` (drawn configs; valid, taken and invalid names), ``delete_adapter``,
``set_active`` (known, unknown and no names), ``merge``/``unmerge``, ``disable()``, mixed
batches, save and load into a fresh backbone, in-place changes of an adapter's parameters
(an optimizer step, or ``p.add_`` under ``no_grad``) and ``unload()``, which ends the run:
after it every operation on the handle must raise ``AdapterError``. Bad inputs are mixed in:
each must raise the documented error and leave the model's fingerprint (adapters, active and
merged sets, mode, every tensor of its state dict) as it was.

After every step the machine checks the model against its shadow: the adapters, the active
and merged sets and the adapters in the state dict are what the shadow expects; with no
adapter active the output is the base model's bit for bit; with a set of adapters active the
output equals the one recorded the last time that set was active, unless one of them changed
since (bit for bit when the same adapters are merged as then, close otherwise; close to the
base output for an adapter just added by a method that is the identity at init).
``pytest --unipeft-conformance ID`` runs it as ``test_lifecycle[<method>-<backbone>]``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from torch import Tensor

from ..contract.config import DeltaConfig
from ..contract.errors import AdapterError, ConfigError, MergeError, TargetError
from ..contract.method import Method
from ..contract.plan import BASE, adapter_name_refusal
from ..model import DeltaModel
from ._common import close, equal, outputs, reference, same_state, state
from .backbones import TinyBackbone
from .pytest_plugin import lifecycle_settings
from .strategies import configs, default_config

NAMES = ("default", "a", "b")
"""The valid adapter names the machine uses (so that names get reused after a delete)."""
BAD_NAMES = ("", BASE, "has space", "dot.ted", "x" * 129)
UNKNOWN = "not_an_adapter"
STEP_KINDS = ("optimizer", "no_grad")


class LifecycleMachine(RuleBasedStateMachine):
    """The machine for ``method`` on ``bb`` (class attributes: see :func:`machine_for`)."""

    method: Method
    bb: TinyBackbone
    base: Tensor  # the frozen backbone's output on the machine's inputs
    unload_after: int = 6  # steps before unload() may end the run

    def __init__(self) -> None:
        super().__init__()
        self.model: DeltaModel | None = None
        self.unloaded = False
        self.configs: dict[str, DeltaConfig] = {}
        self.active: tuple[str, ...] = ()
        self.merged: set[str] = set()
        # active set -> (output, the merged set when recorded, exact): the shadow's outputs
        self.known: dict[tuple[str, ...], tuple[Tensor, frozenset[str], bool]] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="unipeft-lifecycle-")
        self.saves = 0
        self.steps = 0

    def teardown(self) -> None:
        self.tmp.cleanup()

    # ------------------------------------------------------------------ helpers
    def _run(self) -> Tensor:
        assert self.model is not None
        return outputs(self.model, self.bb)

    def _fingerprint(self) -> tuple[Any, ...]:
        m = self.model
        assert m is not None
        return (tuple(m.adapters), m.active_adapters, tuple(m.merged_adapters), m.training)

    def _refused(self, error: type[Exception], what: str, call: Any) -> None:
        """``call()`` must raise ``error`` and leave the model as it was."""
        assert self.model is not None
        before, tensors = self._fingerprint(), state(self.model)
        try:
            call()
        except error:
            pass
        else:
            raise AssertionError(f"{what} was accepted; expected {error.__name__}")
        after = self._fingerprint()
        assert after == before, f"the refused {what} changed the model: {before} -> {after}"
        same_state(state(self.model), tensors, f"state dict after the refused {what}")

    def _forget(self, name: str) -> None:
        """``name``'s parameters changed or it is gone: drop the outputs recorded with it."""
        self.known = {k: v for k, v in self.known.items() if name not in k}

    def _per_adapter(self, name: str) -> Tensor:
        assert self.model is not None
        with torch.no_grad():
            if name == BASE:
                with self.model.disable():
                    return torch.stack(list(self._rows()))
            self.model.set_active(name)
            try:
                return torch.stack(list(self._rows()))
            finally:
                self.model.set_active(self.active)

    def _rows(self) -> Any:
        """Each sample's outputs, flattened: row ``i`` is sample ``i``."""
        assert self.model is not None
        outs = self.bb.outputs(self.model, self.bb.sample(0))
        n = outs[0].shape[0]
        return (torch.cat([t[i].flatten() for t in outs]) for i in range(n))

    # ------------------------------------------------------------------ rules
    @initialize(data=st.data())
    def apply(self, data: st.DataObject) -> None:
        import unipeft

        cfg = data.draw(configs(self.method), label="config")
        backbone = self.bb.make()
        self.base_state = state(backbone)
        try:
            self.model = unipeft.apply(backbone, self.method.id, **cfg.model_dump())
        except (ConfigError, TargetError):
            same_state(state(backbone), self.base_state, "backbone after a refused apply")
            assume(False)  # this config cannot attach here: draw another
        self.backbone = backbone
        self._added("default", cfg)

    def _added(self, name: str, cfg: DeltaConfig) -> None:
        self.configs[name] = cfg
        if not self.active:
            self.active = (name,)  # the first adapter becomes active
        if self.method.is_identity_at_init(cfg):
            self.known[(name,)] = (self.base, frozenset(), False)

    def live(self) -> bool:
        return self.model is not None and not self.unloaded

    @precondition(live)
    @rule(data=st.data())
    def add_adapter(self, data: st.DataObject) -> None:
        assert self.model is not None
        name = data.draw(st.sampled_from(NAMES + BAD_NAMES), label="name")
        cfg = data.draw(configs(self.method), label="config")
        kwargs = cfg.model_dump()
        if adapter_name_refusal(name) is not None or name in self.configs:
            self._refused(
                AdapterError,
                f"add_adapter({name!r})",
                lambda: self.model.add_adapter(name, self.method.id, **kwargs),  # type: ignore[union-attr]
            )
            return
        before, tensors = self._fingerprint(), state(self.model)
        try:
            self.model.add_adapter(name, self.method.id, **kwargs)
        except (ConfigError, TargetError):  # a valid config this backbone cannot take
            assert self._fingerprint() == before, "a refused add_adapter changed the model"
            same_state(state(self.model), tensors, "state dict after a refused add_adapter")
            return
        self._added(name, cfg)

    @precondition(live)
    @rule(data=st.data())
    def delete_adapter(self, data: st.DataObject) -> None:
        assert self.model is not None
        name = data.draw(st.sampled_from([*self.configs, UNKNOWN]), label="name")
        if name not in self.configs or name in self.active:
            self._refused(
                AdapterError,
                f"delete_adapter({name!r})",
                lambda: self.model.delete_adapter(name),  # type: ignore[union-attr]
            )
            return
        self.model.delete_adapter(name)
        del self.configs[name]
        self._forget(name)

    @precondition(live)
    @rule(data=st.data())
    def set_active(self, data: st.DataObject) -> None:
        assert self.model is not None
        names = data.draw(
            st.one_of(
                st.lists(st.sampled_from(list(self.configs) or [UNKNOWN]), unique=True, max_size=2),
                st.just([UNKNOWN]),
            ),
            label="names",
        )
        arg: Any = names[0] if len(names) == 1 and data.draw(st.booleans()) else names
        if any(n not in self.configs for n in names):
            self._refused(AdapterError, f"set_active({arg!r})", lambda: self.model.set_active(arg))  # type: ignore[union-attr]
        elif self.merged - set(names):
            self._refused(MergeError, f"set_active({arg!r})", lambda: self.model.set_active(arg))  # type: ignore[union-attr]
        else:
            self.model.set_active(arg)
            self.active = tuple(names)

    @precondition(live)
    @rule()
    def merge(self) -> None:
        assert self.model is not None
        if self.active and not self.method.mergeable:
            self._refused(MergeError, "merge() of a method that cannot merge", self.model.merge)
            return
        before = self._run()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merging an adapter already merged warns
            self.model.merge()
        self.merged |= set(self.active)
        close(self._run(), before, "merged output vs unmerged")

    @precondition(live)
    @rule()
    def unmerge(self) -> None:
        assert self.model is not None
        self.model.unmerge()
        self.merged = set()
        same_state(state(self.backbone), self.base_state, "backbone weights after unmerge")

    @precondition(live)
    @rule()
    def disable(self) -> None:
        assert self.model is not None
        with self.model.disable():
            equal(self._run(), self.base, "output inside disable() vs base")

    @precondition(live)
    @rule(data=st.data())
    def mixed_batch(self, data: st.DataObject) -> None:
        assert self.model is not None
        pool = [*self.configs, BASE, UNKNOWN]
        names = data.draw(st.lists(st.sampled_from(pool), min_size=2, max_size=2), label="names")
        if UNKNOWN in names:
            self._refused(AdapterError, f"mixed_batch({names})", lambda: self._mixed(names))
            return
        if self.merged:
            what = f"mixed_batch({names}) while merged"
            self._refused(MergeError, what, lambda: self._mixed(names))
            return
        try:
            got = self._mixed(names)
        except ValueError as exc:
            if "mixed batches with soft prompts" in str(exc):
                return  # documented: no attention mask to hide other samples' prompts
            raise
        for i, name in enumerate(names):
            close(got[i], self._per_adapter(name)[i], f"mixed {names}: sample {i}")

    def _mixed(self, names: list[str]) -> Tensor:
        assert self.model is not None
        with torch.no_grad(), self.model.mixed_batch(names):
            return torch.stack(list(self._rows()))

    def _unmerged(self) -> list[str]:
        return [n for n in self.configs if n not in self.merged]

    @precondition(lambda self: self.live() and self._unmerged())
    @rule(data=st.data())
    def change_parameters(self, data: st.DataObject) -> None:
        """An in-place change of one unmerged adapter's parameters."""
        assert self.model is not None
        free = self._unmerged()
        name = data.draw(st.sampled_from(free), label="name")
        how = data.draw(st.sampled_from(STEP_KINDS), label="how")
        seed = data.draw(st.integers(0, 2**16), label="seed")
        gen = torch.Generator().manual_seed(seed)
        params = [p for p in self.model.deltas[name].parameters() if p.requires_grad]
        if how == "optimizer":
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            torch.optim.SGD(params, lr=0.05).step()
            for p in params:
                p.grad = None
        else:
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)
        self._forget(name)

    @precondition(live)
    @rule()
    def save_and_load(self) -> None:
        import unipeft

        assert self.model is not None
        self.saves += 1
        folder = str(Path(self.tmp.name) / f"save{self.saves}")
        if not self.configs:
            self._refused(AdapterError, "save() with no adapter", lambda: self.model.save(folder))  # type: ignore[union-attr]
            return
        self.model.save(folder)
        loaded = unipeft.load(self.bb.make(), folder)
        assert set(loaded.adapters) == set(self.configs), (
            f"loaded adapters {sorted(loaded.adapters)}, saved {sorted(self.configs)}"
        )
        if self.active:
            assert loaded.active_adapters == self.active, (
                f"loaded active {loaded.active_adapters}, saved {self.active}"
            )
        loaded.set_active(self.active)
        mine, theirs = self._run(), outputs(loaded, self.bb)
        if self.merged:
            close(theirs, mine, "loaded output vs saved model's (merged)")
        else:
            equal(theirs, mine, "loaded output vs saved model's")

    @precondition(lambda self: self.live() and self.steps >= self.unload_after)
    @rule()
    def unload(self) -> None:
        assert self.model is not None
        back = self.model.unload()
        self.unloaded = True
        assert back is self.backbone, "unload() did not return the backbone"
        same_state(state(back), self.base_state, "backbone after unload")
        back.requires_grad_(False)  # as the reference: MHA's kernel depends on the flag
        equal(outputs(back, self.bb), self.base, "backbone's output after unload")

    @precondition(lambda self: self.unloaded)
    @rule(data=st.data())
    def use_after_unload(self, data: st.DataObject) -> None:
        m = self.model
        assert m is not None
        calls = {
            "add_adapter": lambda: m.add_adapter("a", self.method.id),
            "delete_adapter": lambda: m.delete_adapter("default"),
            "set_active": lambda: m.set_active([]),
            "merge": m.merge,
            "unmerge": m.unmerge,
            "disable": lambda: m.disable().__enter__(),
            "mixed_batch": lambda: m.mixed_batch([BASE, BASE]).__enter__(),
            "save": lambda: m.save(str(Path(self.tmp.name) / "after")),
            "unload": m.unload,
            "forward": lambda: m(),  # the handle's forward checks first, before its arguments
        }
        what = data.draw(st.sampled_from(sorted(calls)), label="operation")
        try:
            calls[what]()
        except AdapterError:
            return
        raise AssertionError(f"{what} after unload() did not raise AdapterError")

    # ------------------------------------------------------------------ the shadow
    @invariant()
    def matches_shadow(self) -> None:
        self.steps += 1
        m = self.model
        if m is None or self.unloaded:
            return
        assert set(m.adapters) == set(self.configs), (
            f"adapters {sorted(m.adapters)}, expected {sorted(self.configs)}"
        )
        assert m.active_adapters == self.active, (
            f"active {m.active_adapters}, expected {self.active}"
        )
        assert set(m.merged_adapters) == self.merged, (
            f"merged {m.merged_adapters}, expected {sorted(self.merged)}"
        )
        in_state = {k.split(".")[1] for k in m.state_dict() if k.startswith("deltas.")}
        assert in_state == set(self.configs), (
            f"the state dict holds adapters {sorted(in_state)}, expected {sorted(self.configs)}"
        )
        try:
            out = self._run()
        except ValueError as exc:
            # prefix adapters active together may take more positions than the backbone's
            # position table holds: a documented refusal that names the fix
            if "position table" not in str(exc) or "give at most" not in str(exc):
                raise
            assert self._fingerprint() == (
                tuple(m.adapters),
                m.active_adapters,
                tuple(m.merged_adapters),
                m.training,
            )
            return
        if not self.active:
            equal(out, self.base, "output with no adapter active vs base")
            return
        merged_now = frozenset(self.merged)
        recorded = self.known.get(self.active)
        if recorded is None:
            self.known[self.active] = (out, merged_now, True)
            return
        expected, was_merged, exact = recorded
        what = f"output with {list(self.active)} active vs when last seen"
        if not exact:
            what = f"output with {list(self.active)} active, at init, vs base"
        if exact and was_merged == merged_now:
            equal(out, expected, what)
        else:
            close(out, expected, what)


def machine_for(method: Method, bb: TinyBackbone, steps: int = 10) -> type[LifecycleMachine]:
    """The state machine class for ``method`` on ``bb``, for runs of ``steps`` steps:
    ``unload()``, which ends a run, comes only in the last third of them."""
    name = f"Lifecycle_{method.id}_{bb.name}".replace("-", "_")
    attrs = {"method": method, "bb": bb, "base": reference(bb), "unload_after": steps * 2 // 3}
    return type(name, (LifecycleMachine,), attrs)


def run_lifecycle(method: Method, bb: TinyBackbone, base: settings | None = None) -> None:
    """Run the machine with the profile's examples and steps (or ``base``'s)."""
    import unipeft

    default = default_config(method)
    if default is not None:
        try:
            unipeft.apply(bb.make(), method.id, **default.model_dump())
        except TargetError as exc:
            if "match" in str(exc) and "nothing" in str(exc):
                pytest.skip(f"{method.id} has no default target it attaches to on {bb.name}: {exc}")
            # refused by site kind (the default config's sizes are not at issue): no config can
            pytest.skip(f"{method.id} refuses its default targets on {bb.name}: {exc}")
        except ConfigError:
            pass
    chosen = base or lifecycle_settings()
    machine = machine_for(method, bb, chosen.stateful_step_count)
    run_state_machine_as_test(machine, settings=chosen)
