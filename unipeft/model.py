"""The handle returned by :func:`unipeft.apply`: the backbone, plus its adapters."""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .compose import Composition, Fuse, Parallel
from .contract.config import DeltaConfig
from .contract.deltas import DeltaModule
from .contract.errors import AdapterError, MergeError, UnipeftError
from .contract.method import Method
from .contract.plan import BASE, SHARED, AdapterPlan, adapter_name_refusal
from .contract.sites import Site
from .distributed.gather import refresh_versions
from .runtime import checks
from .runtime import compose as composing
from .runtime.attaching import count_parameters
from .runtime.attaching import forward_signature as _forward_signature
from .runtime.attaching import link as _link
from .runtime.attaching import load_state as _load_state
from .runtime.hosts import HostTable
from .runtime.ledger import MergeLedger, sync_residuals
from .runtime.norms import FrozenNormStatistics
from .runtime.registry import Registry, registry
from .runtime.shared import BackwardTrigger, backward_trigger
from .runtime.state import AdapterState, Attachment, Routing
from .runtime.targets import method_targets, resolve_targets

_WRAPPED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@dataclass
class Adapter:
    """One named adapter: a method, its config, the targets asked for, the sites used."""

    name: str
    method: Method
    config: DeltaConfig
    targets: list[str]
    sites: list[Site]
    attachments: list[Attachment]
    shared: nn.Module | None = None
    """The adapter's shared module (:attr:`Method.shared`), or None."""
    trigger: BackwardTrigger | None = None

    def num_parameters(self) -> int:
        own = sum(p.numel() for a in self.attachments for p in a.delta.parameters())
        return own + sum(p.numel() for p in self.shared.parameters()) if self.shared else own

    def delta_at(self, site: Site | str) -> DeltaModule:
        """The delta module this adapter placed at ``site`` (a site or its name)."""
        name = site if isinstance(site, str) else getattr(site, "name", None)
        if not isinstance(name, str):
            raise TypeError(f"site must be a Site or a site name, got {type(site).__name__}")
        for att in self.attachments:
            if att.site.name == name:
                return att.delta
        raise AdapterError(f"adapter {self.name!r} has no delta at site {name!r}")


def site_key(site: Site) -> str:
    """A ModuleDict key for a site (module names may not contain dots)."""
    return site.name.replace(".", "__")


class DeltaModel(FrozenNormStatistics, nn.Module):
    """A backbone with unipeft adapters. Call and use it exactly like the backbone.

    Attributes the handle does not define are looked up on the backbone (``encode_image``,
    ``config``, ``generate``...). The backbone's parameters are frozen while it is wrapped;
    :meth:`unload` gives it back as it was."""

    def __init__(self, backbone: nn.Module, *, _registry: Registry | None = None) -> None:
        checks.require_module(backbone)
        if isinstance(backbone, DeltaModel):
            raise AdapterError("this model is already a unipeft DeltaModel; use add_adapter()")
        if backbone in _WRAPPED:
            raise AdapterError(
                "this backbone already carries unipeft adapters through another handle; use "
                "that handle's add_adapter(), or unload() it first"
            )
        super().__init__()
        self.training = backbone.training  # the handle starts in the backbone's mode
        self.base_model = backbone
        self.deltas = nn.ModuleDict()
        self.fusions = nn.ModuleDict()  # Fuse name -> its per-site fusion layers (trainable)
        self._composition: Composition | None = None
        self._registry = _registry or registry()
        self._state = AdapterState()
        self._adapters: dict[str, Adapter] = {}
        self._hosts = HostTable(self._state)
        self._requires_grad: dict[str, bool] | None = None
        self._ledger = MergeLedger()
        self._unloaded = False
        self._structure_map: str | None = None
        self._routings: dict[tuple[str, ...], Routing] = {}  # recent mixed-batch routings
        # forward's signature is the backbone's (+ adapter_names): the HF Trainer reads it
        forward = functools.partial(type(self).forward, self)
        forward.__signature__ = _forward_signature(backbone)  # type: ignore[attr-defined]
        self.forward = forward

    # ------------------------------------------------------------------ passthrough
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Call the backbone. ``adapter_names`` (one per sample; ``"__base__"`` for the plain
        backbone) runs a mixed batch: each sample through its own adapter."""
        self._check_live()
        refresh_versions(self)  # engines that gather into parameters in place (FSDP, ZeRO-3)
        if adapter_names is None:
            if self._state.parallel is not None and self._state.enabled:
                return self._parallel(self.base_model, True, *args, **kwargs)
            return self.base_model(*args, **kwargs)
        if self._state.parallel is not None:
            raise AdapterError("adapter_names cannot be given while Parallel(...) is active")
        adapter_names = checks.sample_names(adapter_names)
        self._routing(adapter_names)  # validates the names before anything runs
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
        if first is not None and first.dim() and first.shape[0] != len(adapter_names):
            raise AdapterError(
                f"adapter_names has {len(adapter_names)} entries for a batch of "
                f"{first.shape[0]}; give exactly one adapter name per sample"
            )
        with self.mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "deltas") or name.startswith("_"):
                raise
            if self.__dict__.get("_unloaded"):
                self._check_live()  # the backbone was handed back: use it, not this handle
            attr = getattr(self.base_model, name)
            if self.__dict__["_state"].parallel is not None and inspect.ismethod(attr):
                return functools.partial(self._parallel, attr, False)  # encode_image(...)
            return attr

    def _parallel(self, fn: Any, whole: bool, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` on the batch replicated once per adapter of the active Parallel."""
        args, kwargs, names = composing.parallel_inputs(self._state, args, kwargs, whole)
        if names is None:
            return fn(*args, **kwargs)
        with self.mixed_batch(names):
            return fn(*args, **kwargs)

    # ------------------------------------------------------------------ introspection
    @property
    def adapters(self) -> dict[str, Adapter]:
        return dict(self._adapters)

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self._state.active

    @property
    def structure_map(self) -> str | None:
        """The name of the structure map used to resolve role targets."""
        return self._structure_map

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of backbone and deltas (the signature of transformers' models)."""
        return count_parameters(self, only_trainable, exclude_embeddings)

    def aux_loss(self) -> Tensor | None:
        """Sum of the auxiliary losses (e.g. MoE load balancing) of the last forward pass,
        over the active adapters; ``None`` if no delta keeps one. Add it to the task loss."""
        total: Tensor | None = None
        for name in self._state.active:
            for att in self._adapters[name].attachments:
                if (loss := att.delta.aux_loss()) is not None:
                    total = loss if total is None else total + loss
        reg = composing.fusion_loss(self._composition, self.fusions)
        return total if reg is None else reg if total is None else total + reg

    # ------------------------------------------------------------------ adapters
    @property
    def registry(self) -> Registry:
        """The registry this model takes methods from."""
        return self._registry

    def add_adapter(
        self,
        adapter_name: str,
        method: str,
        *,
        targets: checks.Targets = None,
        **config: Any,
    ) -> Adapter:
        """Build an adapter and attach it. The first adapter becomes active.

        Everything is validated and built before the backbone is touched: on any error the
        model is exactly as before the call. The same as
        ``attach(adapter_name, plan(method, targets=targets, **config))``.
        """
        self._check_live()
        self.check_adapter_name(adapter_name)
        return self.attach(adapter_name, self.plan(method, targets=targets, **config))

    def plan(self, method: str, *, targets: checks.Targets = None, **config: Any) -> AdapterPlan:
        """Resolve ``method``, its config and ``targets`` (the method's defaults when
        ``None``) on this model's backbone, without changing anything. Every site is checked
        against the method (:class:`TargetError`) and the config's sizes against every site
        (:class:`ConfigError`, e.g. more soft tokens than a position table holds)."""
        self._check_live()
        spec = self._registry.method(checks.require_method_id(method))
        asked = checks.target_list(targets, self.base_model, spec.id, config)
        cfg = spec.config.parse(spec.id, config)
        maps, failed = self._registry.sorted_maps(), self._registry.map_failed
        target_list = method_targets(self.base_model, spec, cfg, asked, maps, failed)
        smap, sites, optional = resolve_targets(self.base_model, target_list, maps, failed)
        # sites a role pattern reached only by the way (optional) are dropped if refused
        kept = [s for s in sites if s.name not in optional or spec.refusal(cfg, s) is None]
        checks.all_refused(spec, cfg, sites, kept, target_list, self.base_model)
        checks.check_sites(spec, cfg, sites := kept, target_list)
        checks.check_sizes(spec, cfg, sites)
        return AdapterPlan(spec, cfg, tuple(sites), tuple(target_list), None, smap.name)

    def attach(self, adapter_name: str, plan: AdapterPlan) -> Adapter:
        """Attach the adapter ``plan`` describes under ``adapter_name``: the one way in.

        Every site is checked against the method, every delta built (and loaded from
        ``plan.state``) before the backbone is touched; if anything fails, even halfway
        through hooking the deltas in, the model is left exactly as it was. The first
        adapter becomes active.
        """
        self._check_live()
        self.check_adapter_name(adapter_name)
        checks.plan_type(plan)
        spec, cfg, sites = plan.method, plan.config, list(plan.sites)
        checks.sites_in(self.base_model, sites)
        checks.check_sites(spec, cfg, sites, list(plan.targets))
        checks.check_sizes(spec, cfg, sites)
        built, shared = self._build(spec, cfg, sites, plan.state)

        # -- mutation starts here; undo everything on failure
        first = self._requires_grad is None
        if first:
            self._requires_grad = {
                n: p.requires_grad for n, p in self.base_model.named_parameters()
            }
        attachments = [Attachment(adapter_name, site, built[site.name]) for site in sites]
        done: list[Attachment] = []
        try:
            for att in attachments:
                self._hosts.add(att)
                done.append(att)
            modules = {site_key(s): built[s.name] for s in sites}
            if shared is not None:
                modules[SHARED] = shared
            self.deltas[adapter_name] = nn.ModuleDict(modules)
            try:
                _link(attachments)
            except UnipeftError:
                raise
            except Exception as exc:  # a plugin's fast path: name it, undo everything
                raise self._registry.method_failed(spec, "link", exc) from exc
            if first:
                for p in self.base_model.parameters():
                    p.requires_grad_(False)
        except BaseException:
            for att in reversed(done):
                self._hosts.remove(att)
            if adapter_name in self.deltas:
                del self.deltas[adapter_name]
            if first:
                self._requires_grad = None
            raise
        adapter = Adapter(adapter_name, spec, cfg, list(plan.targets), sites, attachments, shared)
        adapter.trigger = backward_trigger(shared, built)
        self._adapters[adapter_name] = adapter
        if not self._state.active:
            self._state.active = (adapter_name,)
            self._sync()
        if self._structure_map is None:
            self._structure_map = plan.structure_map
        _WRAPPED[self.base_model] = True  # a value that holds the key would keep it alive
        return adapter

    def _build(
        self,
        spec: Method,
        cfg: DeltaConfig,
        sites: list[Site],
        state: Any,
    ) -> tuple[dict[str, DeltaModule], nn.Module | None]:
        """One delta per site, on the site's device and dtype, loaded from ``state``, and the
        adapter's shared module (on the first site's device and dtype), or None."""
        built: dict[str, DeltaModule] = {}
        # initialisation draws random numbers; when a state replaces them, keep the RNG as is
        rng = torch.random.fork_rng(devices=[]) if state is not None else contextlib.nullcontext()
        with rng:
            shared = spec.build_shared(cfg, tuple(sites))
            if shared is not None:
                ref = sites[0].reference_tensor() if sites else torch.empty(0)
                shared.to(device=ref.device, dtype=ref.dtype)
                if state is not None and SHARED in state:
                    _load_state(shared, state[SHARED], SHARED, spec)
                shared.requires_grad_(True)
                shared.train(self.training)
            for site in sites:
                ref = site.reference_tensor()
                made = spec.build(cfg, site) if shared is None else spec.build(cfg, site, shared)
                delta = made.to(device=ref.device, dtype=ref.dtype)
                if state is not None and site.name in state:
                    _load_state(delta, state[site.name], site, spec)
                delta.requires_grad_(True)
                delta.train(self.training)
                built[site.name] = delta
        return built, shared

    def check_adapter_name(self, name: str) -> None:
        """Raise :class:`AdapterError` unless ``name`` is a valid, unused adapter name (the
        rule of :func:`unipeft.contract.plan.adapter_name_refusal`, for every way in)."""
        reason = adapter_name_refusal(name)
        if reason is not None:
            raise AdapterError(reason)
        if name in self._adapters:
            raise AdapterError(
                f"adapter name {name!r} is already in use (adapters: {', '.join(self._adapters)}); "
                "choose another name or delete_adapter() it first"
            )

    def _check_live(self) -> None:
        if self._unloaded:
            raise AdapterError("this DeltaModel was unloaded; apply unipeft to the backbone again")

    def set_active(self, names: str | Sequence[str] | Composition) -> None:
        """Make ``names`` the active adapters: they run together, in this order. An empty
        sequence leaves only the backbone. A composition of :mod:`unipeft.compose`
        (``Stack``, ``Parallel``, ``Average``, ``Fuse``) runs its adapters as it says
        (``docs/composition.md``); a ``Fuse`` creates its fusion layers on first use."""
        self._check_live()
        comp = names if isinstance(names, Composition) else None
        names = comp.leaves() if comp else tuple(checks.adapter_names(names, "set_active(names)"))  # type: ignore[arg-type]
        for n in names:
            self.get_adapter(n)
        stranded = sorted(set(self.merged_adapters) - set(names))
        if stranded:
            raise MergeError(
                f"adapters {stranded} are merged into the weights; unmerge() them before "
                "making them inactive"
            )
        if comp is not None:
            composing.check_composition(comp, self._adapters, self.merged_adapters)
            for fuse in composing.fuse_nodes(comp):
                self.add_fusion(fuse)
        self._set_composition(comp, names)

    def _set_composition(self, comp: Composition | None, names: tuple[str, ...]) -> None:
        self._composition = comp
        self._state.active = names
        self._state.composed = comp if composing.needs_evaluation(comp) else None
        self._state.parallel = comp.leaves() if isinstance(comp, Parallel) else None
        self._sync()

    @property
    def active_composition(self) -> Composition | None:
        """The composition given to :meth:`set_active`, or None for a name or a list."""
        return self._composition

    def add_fusion(self, fuse: Fuse, state: dict[str, dict[str, Tensor]] | None = None) -> None:
        """Create the trainable fusion layers of ``fuse`` (one per site its adapters adapt)
        and freeze the fused adapters, as AdapterFusion trains the fusion alone
        (``model.deltas[name].requires_grad_(True)`` undoes that). Layers that exist under
        ``fuse.name`` for the same adapters are kept. ``state``: saved tensors by site."""
        self._check_live()
        if not isinstance(fuse, Fuse):
            raise TypeError(f"add_fusion takes a unipeft.compose.Fuse, got {type(fuse).__name__}")
        for n in fuse.leaves():
            self.get_adapter(n)
        if state is None and composing.reuse_fusion(self.fusions, fuse):
            return
        composing.check_composition(fuse, self._adapters, self.merged_adapters)
        fusion = composing.build_fusion(fuse, self._adapters, state)
        fusion.requires_grad_(True)
        fusion.train(self.training)
        self.fusions[fuse.name] = fusion
        self._state.fusions[fuse.name] = fusion
        for n in fuse.leaves():
            self.deltas[n].requires_grad_(False)

    def _sync(self) -> None:
        if self._state.composed is not None:  # Average / Fuse weigh d(x, y) - y: base y
            sync_residuals(self._ledger, AdapterState(enabled=False), ())
            return
        sync_residuals(self._ledger, self._state, self._adapters.values())

    def list_adapters(self) -> list[dict[str, Any]]:
        """One row per adapter: name, method, family, targets, sites, parameters, state."""
        self._check_live()
        merged = set(self.merged_adapters)
        return [
            {
                "name": a.name,
                "method": a.method.id,
                "family": a.method.family,
                "targets": list(a.targets),
                "sites": len(a.sites),
                "parameters": a.num_parameters(),
                "active": a.name in self._state.active,
                "merged": a.name in merged,
            }
            for a in self._adapters.values()
        ]

    def get_adapter(self, name: str) -> Adapter:
        """The adapter called ``name``; an :class:`AdapterError` names the known ones."""
        self._check_live()
        checks.require_adapter_name(name, "get_adapter(name)")
        try:
            return self._adapters[name]
        except KeyError:
            known = ", ".join(self._adapters) or "none"
            raise AdapterError(
                f"unknown adapter {name!r}; adapters on this model: {known}"
            ) from None

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter: its hooks, its parameters and its state-dict entries."""
        self._check_live()
        checks.refuse_sharded(self, "delete_adapter")
        checks.require_adapter_name(name, "delete_adapter(name)")
        self.get_adapter(name)
        if name in self._state.active:
            others = [a for a in self._adapters if a != name]
            hint = f"set_active({others[:1]!r})" if others else "set_active([])"
            raise AdapterError(
                f"adapter {name!r} is active; {hint} first, then delete it (unload() removes "
                "every adapter at once)"
            )
        self._remove_adapter(name)

    def _remove_adapter(self, name: str) -> None:
        if self._adapters[name].trigger is not None:
            self._adapters[name].trigger.remove()  # type: ignore[union-attr]
        for att in self._adapters[name].attachments:
            self._hosts.remove(att)
        for fusion in [f for f, m in self.fusions.items() if name in m.spec.leaves()]:
            del self.fusions[fusion]  # a fusion without one of its adapters means nothing
            self._state.fusions.pop(fusion, None)
        del self.deltas[name]
        del self._adapters[name]

    # ------------------------------------------------------------------ modes
    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Run the plain backbone inside the block (merged adapters are unmerged for it)."""
        self._check_live()
        remerge = self._ledger.merged()
        self._ledger.unmerge(remerge)
        previous = self._state.enabled
        self._state.enabled = False
        self._sync()
        try:
            yield
        finally:
            self._state.enabled = previous
            self._sync()
            self._ledger.merge(remerge)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Sequence[str]) -> Iterator[None]:
        """Inside the block, sample ``i`` of every batch uses adapter ``adapter_names[i]``
        (``"__base__"``: the plain backbone). For calls that are not ``forward``, such as
        CLIP's ``encode_image``; ``model(..., adapter_names=[...])`` does the same."""
        self._check_live()
        self._state.routing = self._routing(adapter_names)
        self._sync()
        try:
            yield
        finally:
            self._state.routing = None
            self._sync()

    def _routing(self, adapter_names: Sequence[str]) -> Routing:
        names = checks.sample_names(adapter_names)
        for n in set(names) - {BASE}:
            self.get_adapter(n)
        if self.merged_adapters:
            raise MergeError("unmerge() before running a mixed batch: merged weights are shared")
        # the same list of names gets the same Routing, so what deltas derive from it (sample
        # slots, masks) is computed once, not on every call; a few recent lists are kept
        cache = self._routings
        routing = cache.pop(names, None) or Routing.of(names)
        cache[names] = routing  # most recent last
        while len(cache) > 8:
            cache.pop(next(iter(cache)))
        return routing

    @property
    def merged_adapters(self) -> list[str]:
        seen = dict.fromkeys(a.adapter for a in self._ledger.merged())
        return list(seen)

    @property
    def merged(self) -> bool:
        return bool(self._ledger.merged())

    def merge(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the backbone's weights.

        Exactly reversible: :meth:`unmerge` restores the original bits. Merging an adapter
        that is already merged warns and does nothing.
        """
        self._check_live()
        checks.refuse_sharded(self, "merge")
        if why := composing.merge_refusal(self._composition):
            raise MergeError(why)
        names = self._names(adapter_names, self._state.active, "merge(adapter_names)")
        for name in names:
            self.get_adapter(name)
        todo: list[Attachment] = []
        for name in names:
            adapter = self.get_adapter(name)
            if not adapter.method.mergeable:
                raise MergeError(
                    f"adapter {name!r} uses method {adapter.method.id!r}, which cannot be merged "
                    "into the backbone's weights (its output is not a fixed weight change)"
                )
            if name in self.merged_adapters:
                warnings.warn(
                    f"adapter {name!r} is already merged; merge() leaves it as is", stacklevel=2
                )
                continue
            if name not in self._state.active:
                raise MergeError(f"adapter {name!r} is not active; set_active() it to merge it")
            for att in adapter.attachments:
                why = checks.merge_refusal(att.site)
                if why:
                    raise MergeError(f"adapter {name!r} cannot be merged: {why}")
                todo.append(att)
        self._ledger.merge(todo)

    def unmerge(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Take adapters (default: all merged) out of the weights, bit-exactly; warns for one
        that is not merged."""
        self._check_live()
        if self._ledger.merged():
            checks.refuse_sharded(self, "unmerge")
        names = self._names(adapter_names, self.merged_adapters, "unmerge(adapter_names)")
        merged = self.merged_adapters
        for name in names:
            if self.get_adapter(name) and name not in merged:
                warnings.warn(
                    f"adapter {name!r} is not merged (merged: {merged or 'none'}); unmerge() "
                    "leaves it as is",
                    stacklevel=2,
                )
        todo = [a for a in self._ledger.merged() if a.adapter in names]
        self._ledger.unmerge(todo)

    def _names(
        self, names: str | Sequence[str] | None, default: Sequence[str], argument: str
    ) -> list[str]:
        if names is None:
            return list(default)
        return checks.adapter_names(names, argument)

    def unload(self) -> nn.Module:
        """Remove every adapter and return the backbone with its original state."""
        self._check_live()
        checks.refuse_sharded(self, "unload")
        self.unmerge()
        self._set_composition(None, ())
        for name in list(self._adapters):
            self._remove_adapter(name)
        if self._requires_grad is not None:
            for n, p in self.base_model.named_parameters():
                p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        backbone = self.base_model
        _WRAPPED.pop(backbone, None)
        self._unloaded = True
        return backbone

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str, adapters: Sequence[str] | None = None) -> None:
        """Write the adapters (delta parameters only) as safetensors + a JSON config."""
        from .features.saving import save_adapters

        self._check_live()
        path = checks.save_directory(directory)
        names = None if adapters is None else checks.adapter_names(adapters, "save(adapters)")
        for name in names or ():
            self.get_adapter(name)
        save_adapters(self, path, names)
