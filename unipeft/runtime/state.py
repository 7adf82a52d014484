"""What every host reads on a forward pass: which adapters run, on which samples, and the
record of one delta attached at one site."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..contract.deltas import DeltaModule
from ..contract.fastpath import FastPath
from ..contract.sites import ModuleSite, SequenceSite


@dataclass
class Routing:
    """A mixed batch: which adapter each sample uses, grouped once per forward pass."""

    names: tuple[str, ...]
    groups: dict[str, Tensor]  # adapter -> indices of its samples (int64)
    _slots: dict[tuple, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, names: tuple[str, ...], device: torch.device | None = None) -> Routing:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        return cls(names, {k: torch.tensor(v, device=device) for k, v in groups.items()})

    def slots(self, adapters: tuple[str, ...], device: torch.device) -> Tensor:
        """``(N,)``: the position in ``adapters`` of each sample's adapter; ``len(adapters)``
        for samples whose adapter is not among them. Cached for the forward pass."""
        key = (adapters, device)
        slot = self._slots.get(key)
        if slot is None:
            slot = torch.full((len(self.names),), len(adapters), dtype=torch.int64)
            for j, name in enumerate(adapters):
                if name in self.groups:
                    slot[self.groups[name].cpu()] = j
            slot = self._slots[key] = slot.to(device)
        return slot

    def indices(self, adapter: str, device: torch.device) -> Tensor:
        idx = self.groups[adapter]
        if idx.device != device:
            idx = self.groups[adapter] = idx.to(device)
        return idx


@dataclass
class AdapterState:
    """What the hooks read on every forward: which adapters run, on which samples."""

    active: tuple[str, ...] = ()
    enabled: bool = True
    routing: Routing | None = None
    composed: Any = None
    """The active composition when module hosts evaluate it (it holds an Average or a Fuse;
    :func:`unipeft.runtime.compose.run_composed`), else None."""
    parallel: tuple[str, ...] | None = None
    """The adapters of an active ``Parallel``: the model replicates the batch for them."""
    parallel_batch: int | None = None
    """The batch size the last Parallel call replicated (``N``, not ``k·N``)."""
    fusions: dict[str, Any] = field(default_factory=dict)
    """Fusion name -> its :class:`~unipeft.runtime.compose.Fusion` (the model owns them)."""

    def runs(self, adapter: str) -> bool:
        if not self.enabled:
            return False
        if self.routing is not None:
            return adapter in self.routing.groups
        return adapter in self.active

    def running(self, attachments: Sequence[Attachment]) -> list[Attachment]:
        """The ``attachments`` that run now, in the order of the active adapters (the order
        ``set_active`` was given: serial deltas compose in it). In a mixed batch each
        sample has one adapter, so attachment order is kept."""
        running = [a for a in attachments if self.runs(a.adapter)]
        if running and self.parallel is not None and self.routing is None:
            raise RuntimeError(
                f"Parallel{self.parallel} is active, and it needs the batch replicated: call "
                "the model through its DeltaModel (model(...), or model.encode_image(...) and "
                "other methods looked up on it), not the backbone directly"
            )
        if len(self.active) > 1 and self.routing is None and len(running) > 1:
            rank = {name: i for i, name in enumerate(self.active)}
            running.sort(key=lambda a: rank[a.adapter])  # stable: a site's own order stays
        return running


@dataclass(eq=False)
class Attachment:
    """One delta of one adapter at one site. ``fast`` is the delta when its class
    implements :class:`~unipeft.contract.fastpath.FastPath` (looked up once, here)."""

    adapter: str
    site: ModuleSite | SequenceSite
    delta: DeltaModule
    merged: bool = False
    fast: FastPath | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.fast = self.delta if _has_fast_path(type(self.delta)) else None


_FAST_CLASSES: dict[type, bool] = {}


def _has_fast_path(cls: type) -> bool:
    """Whether instances of ``cls`` implement :class:`FastPath`, decided once per class (a
    runtime protocol check inspects every member, which adds up over hundreds of sites)."""
    known = _FAST_CLASSES.get(cls)
    if known is None:
        known = _FAST_CLASSES[cls] = all(
            callable(getattr(cls, name, None)) for name in _FAST_MEMBERS
        )
    return known


_FAST_MEMBERS = ("update_", "fused_linear", "update_slices", "link", "mixed")


def first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    hs = kwargs.get("hidden_states")
    if isinstance(hs, Tensor):
        return hs
    for value in kwargs.values():
        if isinstance(value, Tensor):
            return value
    return None
