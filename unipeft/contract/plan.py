"""An adapter ready to enter a model: the one thing :meth:`DeltaModel.attach` accepts.

Every way an adapter enters a model goes through a plan: ``add_adapter`` (from a method id
and config fields, via :meth:`DeltaModel.plan`), ``unipeft.load`` (from a saved folder),
``unipeft.arithmetic.combine`` (from other adapters) and ``unipeft.interop.peft.load``
(from another library's format). An importer of any other format builds the same record
from public names alone::

    spec = unipeft.get_method("lora")
    plan = unipeft.AdapterPlan(
        method=spec,
        config=spec.config.parse(spec.id, {"r": 4}),
        sites=tuple(s for s in unipeft.inspect_sites(backbone) if s.role == "attn.q"),
        state={site.name: {"A": a, "B": b} for site, (a, b) in my_tensors.items()},
    )
    model = unipeft.DeltaModel(backbone)
    model.attach("imported", plan)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from .config import DeltaConfig
from .method import Method
from .sites import ModuleSite, SequenceSite, Site

BASE = "__base__"
"""The name of the plain backbone in a mixed batch (``adapter_names=[..., "__base__"]``)."""

SHARED = "__shared__"
"""The key of an adapter's shared module (:attr:`Method.shared`) in ``AdapterPlan.state``,
in ``DeltaModel.deltas[name]`` and in a save's sites."""

_NAME = re.compile(r"[A-Za-z0-9_\-]{1,128}")


def adapter_name_refusal(name: object) -> str | None:
    """Why ``name`` cannot name an adapter, or ``None`` when it can.

    The rule, the same for every way an adapter enters a model: 1 to 128 characters among
    ASCII letters, digits, ``_`` and ``-`` (so a name is safe in a file, a state-dict key
    and a tensor key), and not ``"__base__"``, which names the plain backbone."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return f"adapter name {name!r} is invalid: use 1 to 128 ASCII letters, digits, '_' or '-'"
    if name == BASE:
        return f"adapter name {BASE!r} is reserved: it names the plain backbone in mixed batches"
    return None


@dataclass(frozen=True)
class AdapterPlan:
    """What one adapter is: a method, its validated config, the sites it occupies, and
    optionally the tensors its deltas start from.

    ``state`` maps a site's name to the full ``state_dict`` of the delta built there (every
    parameter and buffer, in any dtype and device: they are converted to the delta's), and
    :data:`SHARED` to the state dict of the adapter's shared module, for methods that have
    one. Sites without an entry keep the method's initialisation; ``None`` initialises every
    site.
    ``targets`` records what was asked for (saved with the adapter); ``structure_map``, the
    map that resolved them, which the model reports as its ``structure_map`` when it has
    none yet.
    """

    method: Method
    config: DeltaConfig
    sites: tuple[Site, ...]
    targets: tuple[str, ...] = ()
    state: Mapping[str, Mapping[str, Tensor]] | None = field(default=None, repr=False)
    structure_map: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, Method):
            raise TypeError(
                f"the plan's method must be a unipeft.Method (unipeft.get_method(id)), got "
                f"{type(self.method).__name__}"
            )
        if not isinstance(self.config, self.method.config):
            raise TypeError(
                f"the plan's config is a {type(self.config).__name__}, but method "
                f"{self.method.id!r} takes a {self.method.config.__name__}: build it with "
                f"method.config.parse(method.id, fields)"
            )
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "targets", tuple(self.targets))
        for i, site in enumerate(self.sites):
            if not isinstance(site, ModuleSite | SequenceSite):
                raise TypeError(
                    f"the plan's sites[{i}] is a {type(site).__name__}; each must be a site of "
                    "the backbone (unipeft.inspect_sites(backbone) lists them)"
                )
        if self.state is not None and not isinstance(self.state, Mapping):
            raise TypeError(
                f"the plan's state must map site names to state dicts, got "
                f"{type(self.state).__name__}"
            )
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"the plan names sites {dup} more than once")
        if self.state is not None:
            unknown = sorted(set(self.state) - set(names) - {SHARED})
            if unknown:
                raise ValueError(
                    f"the plan's state has tensors for sites {unknown}, which are not among "
                    "its sites"
                )
