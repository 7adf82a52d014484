"""How one unipeft method reads and writes one Hugging Face PEFT adapter type.

:mod:`unipeft.features.interop.peft` does everything a PEFT folder has in common (finding
and reading the files, checking them, grouping the tensor keys by module, finding the
modules in the backbone, building the :class:`~unipeft.AdapterPlan`, the crash-safe write);
a :class:`PeftCodec` says only what is particular to one type: which keys it writes, how its
config fields and tensors become unipeft's and back. A plugin registers its own codec with
:func:`register_codec`; the built-in ones live in :mod:`unipeft.features.interop.codecs`.

A PEFT folder names each tensor ``base_model.model.<module path>.<suffix>`` (the adapter
name removed), where ``<module path>`` is the module's path in the wrapped model; a few
types also keep tensors shared by every module under a key of their own (VeRA's
``base_model.vera_A``). ``module_keys`` maps the suffixes to the names the codec's
functions use ("parts"); ``shared_keys`` does the same for whole keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ...contract.sites import ModuleSite

if TYPE_CHECKING:
    from ...model import Adapter

__all__ = ["PeftCodec", "PeftSite"]


@dataclass(frozen=True)
class PeftSite:
    """What :attr:`PeftCodec.state_in` gets for one module of a PEFT folder."""

    peft_config: Mapping[str, Any]
    """The folder's ``adapter_config.json`` as read (after :attr:`PeftCodec.config_in` ran)."""
    config: Any
    """The unipeft config :attr:`PeftCodec.config_in`'s fields parsed into."""
    site: ModuleSite
    """The unipeft site of the module (a whole module: ``site.path`` is PEFT's path)."""
    tensors: Mapping[str, Tensor]
    """This module's tensors, by part name (:attr:`PeftCodec.module_keys`'s values)."""
    shared: Mapping[str, Tensor]
    """The folder's shared tensors, by part name (:attr:`PeftCodec.shared_keys`'s values)."""


@dataclass(frozen=True)
class PeftCodec:
    """One PEFT adapter type ``peft_type`` as unipeft's method ``method``.

    Loading (:func:`unipeft.interop.peft.load`): ``config_in`` turns PEFT's config into the
    method's fields (raising :class:`~unipeft.LoadError` for a field whose effect unipeft
    cannot reproduce); each module's tensors become the delta's state dict through
    ``state_in``, and the shared tensors the adapter's shared state through ``shared_in``.
    The loader then builds the deltas and checks every tensor's shape against them.

    Saving (:func:`unipeft.interop.peft.save`): ``config_out`` gives the type's own config
    fields (the writer adds ``peft_type``, ``task_type``, ``target_modules``,
    ``fan_in_fan_out`` and the bookkeeping fields), ``state_out`` each site's tensors by
    part, ``shared_out`` the shared ones.
    """

    method: str
    peft_type: str
    module_keys: Mapping[str, str]
    """PEFT key suffix (after ``<module path>.``) -> part name, e.g.
    ``{"hada_w1_a": "w1_a"}``."""
    config_in: Callable[[dict[str, Any]], dict[str, Any]]
    config_out: Callable[[Adapter], dict[str, Any]]
    state_in: Callable[[PeftSite], dict[str, Tensor]]
    state_out: Callable[[Adapter, ModuleSite], dict[str, Tensor]]
    known_fields: frozenset[str] = frozenset()
    """The type's config fields the codec understands (beyond the bookkeeping and module
    selection fields every type has); any other field that is set is warned about."""
    shared_keys: Mapping[str, str] = field(default_factory=dict)
    """Whole PEFT key -> part name, for tensors shared by every module."""
    shared_in: Callable[[dict[str, Any], Any, Mapping[str, Tensor]], dict[str, Tensor]] | None = (
        None
    )
    """``(peft_config, config, shared parts) -> the state dict of the adapter's shared module``."""
    shared_out: Callable[[Adapter], dict[str, Tensor]] | None = None
    """``adapter -> {part: tensor}`` for :attr:`shared_keys`."""
    shared_optional: bool = False
    """The shared tensors may be missing from a folder (PEFT's ``save_projection=False``):
    the method's shared module then draws them from the config's seed, as PEFT does."""
    site_refusal: Callable[[ModuleSite], str | None] | None = None
    """Why PEFT's type cannot adapt this module (None if it can). By default a site must be
    a whole projection module (nn.Linear, GPT-2 Conv1D, nn.Conv1d/2d/3d)."""
    absent_fields: frozenset[str] = frozenset()
    """Module-selection fields the writer adds by default (``fan_in_fan_out``,
    ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``) that this type's PEFT
    config does not have: they are left out, or PEFT warns about unexpected arguments."""
    integer_parts: frozenset[str] = frozenset()
    """Parts stored as integer tensors (indices); every other tensor must be floating."""
