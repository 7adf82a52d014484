"""The handle returned by :func:`unipeft.apply`: the backbone, plus its adapters."""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._hosts import AdapterState, Attachment, MHAHost, ModuleHost, SequenceHost
from ._plugins import Registry, registry
from ._targets import resolve_targets
from .config import DeltaConfig
from .delta import DeltaModule
from .errors import AdapterError, MergeError
from .registry import Method
from .sites import ModuleSite, SequenceSite, Site

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
BASE = "__base__"
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


@dataclass
class Adapter:
    """One named adapter: a method, its config, the targets asked for, the sites used."""

    name: str
    method: Method
    config: DeltaConfig
    targets: list[str]
    sites: list[Site]
    attachments: list[Attachment]

    def num_parameters(self) -> int:
        return sum(p.numel() for a in self.attachments for p in a.delta.parameters())


def site_key(site: Site) -> str:
    """A ModuleDict key for a site (module names may not contain dots)."""
    return site.name.replace(".", "__")


class DeltaModel(nn.Module):
    """A backbone with unipeft adapters. Call and use it exactly like the backbone.

    Attributes the handle does not define are looked up on the backbone (``encode_image``,
    ``config``, ``generate``...). The backbone's parameters are frozen while it is wrapped;
    :meth:`unload` gives it back as it was.
    """

    def __init__(self, backbone: nn.Module, *, _registry: Registry | None = None) -> None:
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
        self._registry = _registry or registry()
        self._state = AdapterState()
        self._adapters: dict[str, Adapter] = {}
        self._hosts: dict[int, ModuleHost | MHAHost | SequenceHost] = {}
        self._requires_grad: dict[str, bool] | None = None
        self._merge_stack: list[Attachment] = []
        self._unloaded = False
        self._structure_map: str | None = None

    # ------------------------------------------------------------------ passthrough
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_live()
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "deltas") or name.startswith("_"):
                raise
            return getattr(self.base_model, name)

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

    def num_parameters(self) -> int:  # type: ignore[override]
        return sum(p.numel() for p in self.parameters())

    def aux_loss(self) -> Tensor | None:
        """Sum of the auxiliary losses (e.g. MoE load balancing) of the last forward pass,
        over the active adapters; ``None`` if no delta keeps one. Add it to the task loss."""
        total: Tensor | None = None
        for name in self._state.active:
            for att in self._adapters[name].attachments:
                loss = att.delta.aux_loss()
                if loss is not None:
                    total = loss if total is None else total + loss
        return total

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        adapter_name: str,
        method: str,
        *,
        targets: Sequence[str] | str | None = None,
        **config: Any,
    ) -> Adapter:
        """Build an adapter and attach it. The first adapter becomes active.

        Everything is validated and built before the backbone is touched: on any error the
        model is exactly as before the call.
        """
        self._check_live()
        self._check_new_name(adapter_name)
        spec = self._registry.method(method)
        cfg = spec.config.parse(spec.id, config)
        return self._attach(adapter_name, spec, cfg, targets)

    def _attach(
        self,
        adapter_name: str,
        spec: Method,
        cfg: DeltaConfig,
        targets: Sequence[str] | str | None,
        sites: list[Site] | None = None,
    ) -> Adapter:
        from .errors import TargetError

        if targets is None:
            target_list = spec.targets_for(cfg)
        else:
            target_list = [targets] if isinstance(targets, str) else list(targets)
        optional: set[str] = set()
        if sites is None:
            smap, sites, optional = resolve_targets(
                self.base_model, target_list, self._registry.sorted_maps()
            )
            self._structure_map = smap.name
        sites = [s for s in sites if s.name not in optional or spec.refusal(cfg, s) is None]
        if not sites:
            raise TargetError(
                f"method {spec.id!r} found no site it can attach to among targets {target_list}"
            )
        refused = [(s, r) for s in sites if (r := spec.refusal(cfg, s)) is not None]
        if refused:
            site, reason = refused[0]
            more = f" ({len(refused) - 1} more sites refused)" if len(refused) > 1 else ""
            raise TargetError(
                f"method {spec.id!r} cannot attach where targets {target_list} point: {reason}"
                f"{more}. Choose targets of the kinds it accepts: {', '.join(spec.site_kinds)}."
            )
        built: dict[str, DeltaModule] = {}
        for site in sites:
            delta = spec.build(cfg, site)
            ref = site.reference_tensor()
            built[site_key(site)] = delta.to(device=ref.device, dtype=ref.dtype)
        for delta in built.values():
            delta.requires_grad_(True)
            delta.train(self.training)

        # -- mutation starts here; undo everything on failure
        first = self._requires_grad is None
        if first:
            self._requires_grad = {
                n: p.requires_grad for n, p in self.base_model.named_parameters()
            }
        attachments = [Attachment(adapter_name, site, built[site_key(site)]) for site in sites]
        done: list[Attachment] = []
        try:
            for att in attachments:
                self._host_add(att)
                done.append(att)
            self.deltas[adapter_name] = nn.ModuleDict(built)
            if first:
                for p in self.base_model.parameters():
                    p.requires_grad_(False)
        except BaseException:
            for att in reversed(done):
                self._host_remove(att)
            self.deltas.pop(adapter_name, None)
            if first:
                self._requires_grad = None
            raise
        adapter = Adapter(adapter_name, spec, cfg, target_list, list(sites), attachments)
        self._adapters[adapter_name] = adapter
        if not self._state.active:
            self._state.active = (adapter_name,)
        _WRAPPED[self.base_model] = self
        return adapter

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name) or name == BASE:
            raise AdapterError(
                f"adapter name {name!r} is invalid: use letters, digits, '_' or '-' "
                f"(and not {BASE!r}, which names the plain backbone)"
            )
        if name in self._adapters:
            raise AdapterError(
                f"adapter name {name!r} is already in use (adapters: {', '.join(self._adapters)}); "
                "choose another name or delete_adapter() it first"
            )

    def _check_live(self) -> None:
        if self._unloaded:
            raise AdapterError("this DeltaModel was unloaded; apply unipeft to the backbone again")

    def set_active(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapters (the ones that run)."""
        names = (names,) if isinstance(names, str) else tuple(names)
        for n in names:
            self._adapter(n)
        if self._merge_stack:
            raise AdapterError("unmerge() before changing the active adapters")
        self._state.active = names

    def _adapter(self, name: str) -> Adapter:
        try:
            return self._adapters[name]
        except KeyError:
            known = ", ".join(self._adapters) or "none"
            raise AdapterError(
                f"unknown adapter {name!r}; adapters on this model: {known}"
            ) from None

    def delete_adapter(self, name: str) -> None:
        adapter = self._adapter(name)
        if any(a.adapter == name for a in self._merge_stack):
            raise MergeError(f"adapter {name!r} is merged; unmerge() it before deleting it")
        for att in adapter.attachments:
            self._host_remove(att)
        del self.deltas[name]
        del self._adapters[name]
        self._state.active = tuple(a for a in self._state.active if a != name)

    # ------------------------------------------------------------------ hosts
    def _host_add(self, att: Attachment) -> None:
        site = att.site
        if isinstance(site, SequenceSite):
            host = self._hosts.get(id(site.insert))
            if host is None:
                host = self._hosts[id(site.insert)] = SequenceHost(site, self._state)
            assert isinstance(host, SequenceHost)
            host.add(att)
            return
        mha = site.host
        if isinstance(mha, nn.MultiheadAttention):
            mh = self._hosts.get(id(mha))
            if mh is None:
                mh = self._hosts[id(mha)] = MHAHost(mha, self._state)
            assert isinstance(mh, MHAHost)
            if site.module is mha:
                mh.projections.add(att)
            else:
                self._module_host(site.module).add(att)
                mh.out_host = self._module_host(site.module)
            mh.add_user(att)
            return
        self._module_host(site.module).add(att)

    def _module_host(self, module: nn.Module) -> ModuleHost:
        key = id(module)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = ModuleHost(module, self._state)
        assert isinstance(host, ModuleHost)
        return host

    def _host_remove(self, att: Attachment) -> None:
        site = att.site
        if isinstance(site, SequenceSite):
            host = self._hosts[id(site.insert)]
            host.remove(att)  # type: ignore[arg-type]
            if host.empty:
                del self._hosts[id(site.insert)]
            return
        mha = site.host
        if isinstance(mha, nn.MultiheadAttention):
            mh = self._hosts[id(mha)]
            assert isinstance(mh, MHAHost)
            if site.module is mha:
                mh.projections.remove(att)
            else:
                self._drop_module_host(site.module, att)
            mh.remove_user(att)
            if mh.empty:
                del self._hosts[id(mha)]
            return
        self._drop_module_host(site.module, att)

    def _drop_module_host(self, module: nn.Module, att: Attachment) -> None:
        host = self._hosts[id(module)]
        host.remove(att)  # type: ignore[arg-type]
        if host.empty:
            del self._hosts[id(module)]

    # ------------------------------------------------------------------ modes
    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Run the plain backbone inside the block (merged adapters are unmerged for it)."""
        self._check_live()
        remerge = list(self._merge_stack)
        if remerge:
            self.unmerge()
        previous = self._state.enabled
        self._state.enabled = False
        try:
            yield
        finally:
            self._state.enabled = previous
            for att in remerge:
                self._merge_one(att)

    def merge(self) -> None:
        """Fold the active adapters into the backbone's weights (exactly reversible)."""
        self._check_live()
        todo: list[Attachment] = []
        for name in self._state.active:
            adapter = self._adapters[name]
            if not adapter.method.mergeable:
                raise MergeError(
                    f"adapter {name!r} uses method {adapter.method.id!r}, which cannot be merged "
                    "into the backbone's weights (its output is not a fixed weight change)"
                )
            for att in adapter.attachments:
                if att.merged:
                    continue
                why = _merge_refusal(att)
                if why:
                    raise MergeError(f"adapter {name!r} cannot be merged: {why}")
                todo.append(att)
        for att in todo:
            self._merge_one(att)

    def _merge_one(self, att: Attachment) -> None:
        site = att.site
        assert isinstance(site, ModuleSite)
        weight, bias, bias_param = _views(site)
        with torch.no_grad():
            new_w, new_b = att.delta.merged(weight, bias)
            att.saved = (
                weight.detach().clone(),
                None if bias is None else bias.detach().clone(),
                bias_param is None and new_b is not None,
            )
            weight.copy_(new_w.to(weight.dtype))
            if new_b is not None:
                if bias is None:
                    _create_bias(site, new_b)
                else:
                    bias.copy_(new_b.to(bias.dtype))
        att.merged = True
        self._merge_stack.append(att)

    def unmerge(self) -> None:
        """Restore the exact weights the backbone had before :meth:`merge`."""
        self._check_live()
        while self._merge_stack:
            att = self._merge_stack.pop()
            site = att.site
            assert isinstance(site, ModuleSite) and att.saved is not None
            weight, bias, _ = _views(site)
            saved_w, saved_b, created = att.saved
            with torch.no_grad():
                weight.copy_(saved_w)
                if created:
                    _drop_bias(site)
                elif bias is not None and saved_b is not None:
                    bias.copy_(saved_b)
            att.saved = None
            att.merged = False

    @property
    def merged(self) -> bool:
        return bool(self._merge_stack)

    def unload(self) -> nn.Module:
        """Remove every adapter and return the backbone with its original state."""
        self._check_live()
        self.unmerge()
        for name in list(self._adapters):
            self.delete_adapter(name)
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
        from ._io import save_adapters

        self._check_live()
        save_adapters(self, directory, adapters)


def _views(site: ModuleSite) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(weight view, bias view, bias parameter)`` in canonical layout for the site."""
    w = site.parameter("weight")
    b = site.parameter("bias")
    assert w is not None
    s = site.out_slice
    layout = site.weight.layout if site.weight is not None else None
    if layout == "conv1d_t":
        wv = w.data[:, s[0] : s[1]].t() if s else w.data.t()
    else:
        wv = w.data[s[0] : s[1]] if s else w.data
    bv = None if b is None else (b.data[s[0] : s[1]] if s else b.data)
    return wv, bv, b


def _merge_refusal(att: Attachment) -> str | None:
    site = att.site
    if not isinstance(site, ModuleSite):
        return f"site {site.name!r} is a token sequence"
    if site.entry is not None or site.parameter("weight") is None:
        return f"site {site.name!r} ({site.role or 'module'}) has no weight to fold the delta into"
    if site.weight is None and site.role != "norm" and not _is_affine(site.module):
        return f"site {site.name!r} is not a projection or a norm"
    return None


def _is_affine(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.modules.batchnorm._NormBase)


def _create_bias(site: ModuleSite, value: Tensor) -> None:
    name = site.weight.bias_name if site.weight is not None else "bias"
    w = site.parameter("weight")
    assert w is not None
    n_out = (
        w.shape[1] if site.weight is not None and site.weight.layout == "conv1d_t" else w.shape[0]
    )
    full = torch.zeros(n_out, dtype=w.dtype, device=w.device)
    s = site.out_slice
    if s:
        full[s[0] : s[1]] = value.to(w.dtype)
    else:
        full.copy_(value.to(w.dtype))
    setattr(site.module, name, nn.Parameter(full, requires_grad=False))


def _drop_bias(site: ModuleSite) -> None:
    name = site.weight.bias_name if site.weight is not None else "bias"
    module = site.module
    del module._parameters[name]
    module.register_parameter(name, None)
