"""Which host runs a site: the host kinds decide, :class:`HostTable` keeps one per anchor.

A host wraps one object of the backbone (its *anchor*: a module, an
``nn.MultiheadAttention``, the module whose input holds a token sequence) and runs every
attachment on it, from every adapter. Each kind says which sites it claims
(``claims(site)``), what it anchors on (``anchor(site)``) and how it is built
(``create(site, state)``); the first kind in :data:`HOST_KINDS` that claims a site hosts
it. A host whose last attachment leaves removes its hooks and is dropped from the table.
A delta that provides prefix keys and values (:meth:`~unipeft.DeltaModule.prefix`) at a
module site goes to the host of the attention itself instead: :class:`MHAHost` for an
``nn.MultiheadAttention``, else :class:`AttentionHost`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from torch import nn

from ..contract.deltas import provides_prefix
from ..contract.sites import ModuleSite, SequenceSite
from .attention_host import AttentionHost, attention_of
from .mha_host import MHAHost
from .module_host import ModuleHost
from .rnn_host import RNNHost
from .sequence_host import SequenceHost
from .state import AdapterState, Attachment
from .weight_host import EffectiveWeightHost

__all__ = [
    "HOST_KINDS",
    "AttentionHost",
    "EffectiveWeightHost",
    "HostKind",
    "HostTable",
    "MHAHost",
    "ModuleHost",
    "RNNHost",
    "SequenceHost",
]


class HostKind(Protocol):
    """What :class:`HostTable` asks of a host class."""

    @staticmethod
    def claims(site: ModuleSite | SequenceSite) -> bool: ...

    @staticmethod
    def anchor(site: ModuleSite | SequenceSite) -> Any: ...

    @classmethod
    def create(cls, site: Any, state: AdapterState) -> Any: ...


HOST_KINDS: tuple[type, ...] = (SequenceHost, MHAHost, RNNHost, EffectiveWeightHost, ModuleHost)
"""Host kinds in the order they are asked; :class:`ModuleHost` takes any module site."""


class HostTable:
    """The hosts of one model, at most one per (kind, anchor)."""

    def __init__(self, state: AdapterState) -> None:
        self.state = state
        self._hosts: dict[tuple[type, int], Any] = {}

    def add(self, att: Attachment) -> None:
        kind = _kind_of(att)
        self.open(kind, att.site).add(att, self)

    def remove(self, att: Attachment) -> None:
        kind = _kind_of(att)
        self.release(kind, att.site, att)

    def open(self, kind: type, site: Any) -> Any:
        """The host of ``kind`` anchored where ``site`` is, created on first use."""
        key = (kind, id(kind.anchor(site)))  # type: ignore[attr-defined]
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = kind.create(site, self.state)  # type: ignore[attr-defined]
        return host

    def release(self, kind: type, site: Any, att: Attachment) -> None:
        """Take ``att`` off its host of ``kind``; drop the host once it is empty."""
        key = (kind, id(kind.anchor(site)))  # type: ignore[attr-defined]
        host = self._hosts[key]
        host.remove(att, self)
        if host.empty:
            del self._hosts[key]

    def values(self) -> Iterator[Any]:
        return iter(list(self._hosts.values()))

    def __len__(self) -> int:
        return len(self._hosts)


def _kind_of(att: Attachment) -> type:
    site = att.site
    if isinstance(site, ModuleSite) and provides_prefix(att.delta):
        if isinstance(attention_of(site), nn.MultiheadAttention):
            return MHAHost
        return AttentionHost
    return _kind(site)


def _kind(site: ModuleSite | SequenceSite) -> type:
    for kind in HOST_KINDS:
        if kind.claims(site):  # type: ignore[attr-defined]
            return kind
    raise TypeError(f"no host runs site {site.name!r} ({type(site).__name__})")
