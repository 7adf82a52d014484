"""The generic half of every :class:`~unipeft.features.interop.codec.PeftCodec`: a PEFT
folder of a codec's type into a load plan, and an adapter into a PEFT folder's config and
tensors. :mod:`unipeft.features.interop.peft` calls these for every type a codec handles."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...contract.errors import AdapterError, ConfigError, LoadError
from ...contract.plan import SHARED
from ...contract.sites import ModuleSite, Site
from ...model import Adapter, DeltaModel
from ...runtime.registry import registry
from ._peft_common import PREFIX, WEIGHTS_FILE, LoadPlan
from .codec import PeftCodec, PeftSite

# the module-selection fields every PEFT type with target modules has
SELECTION_KEYS = frozenset(
    {
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "fan_in_fan_out",
        "init_weights",
    }
)


def plan(
    backbone: nn.Module,
    codec: PeftCodec,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    *,
    group: Callable[[str, dict[str, Tensor], dict[str, str]], dict[str, dict[str, Tensor]]],
    find_sites: Callable[[nn.Module, Any, dict[str, Any]], list[Site]],
    projection: Callable[[Site, str, str], ModuleSite],
) -> LoadPlan:
    """The adapter of a PEFT folder of ``codec``'s type, every tensor checked against the
    delta it will fill (shapes, by building a probe of each delta)."""
    if config.get("modules_to_save"):
        raise LoadError(
            f"this {codec.peft_type} adapter sets modules_to_save={config['modules_to_save']!r}: "
            "it carries full trained copies of those modules, and unipeft adapters hold deltas "
            "only. Train without modules_to_save, or load it with PEFT and merge it"
        )
    reg = registry()
    if codec.method not in reg.methods:
        raise LoadError(
            f"PEFT type {codec.peft_type} needs unipeft's method {codec.method!r}, which is not "
            "registered; install the distribution that provides it"
        )
    spec = reg.method(codec.method)
    fields = codec.config_in(dict(config))
    try:
        cfg = spec.config.parse(spec.id, fields)
    except ConfigError as exc:
        raise LoadError(
            f"the {codec.peft_type} config does not fit unipeft's {spec.id}: {exc}"
        ) from None
    shared_parts = {part: tensors[k] for k, part in codec.shared_keys.items() if k in tensors}
    missing = sorted(k for k in codec.shared_keys if k not in tensors)
    redraw = bool(missing) and len(missing) == len(codec.shared_keys) and codec.shared_optional
    if redraw:
        shared_parts = {}  # drawn again from the config's seed, as PEFT does
    elif missing and codec.shared_keys:
        raise LoadError(
            f"{WEIGHTS_FILE} lacks {missing}, the tensors this {codec.peft_type} adapter shares "
            "between its modules; PEFT writes them when the adapter is saved with its "
            "projections (e.g. save_projection=True). Save it again that way"
        )
    rest = {k: v for k, v in tensors.items() if k not in codec.shared_keys}
    if not rest:
        raise LoadError(f"{WEIGHTS_FILE} holds no module's tensors; the adapter is incomplete")
    groups = group(codec.peft_type, rest, dict(codec.module_keys))
    sites = find_sites(backbone, groups, config)
    for site in sites:
        why = (
            codec.site_refusal(site)
            if codec.site_refusal and isinstance(site, ModuleSite)
            else None
        )
        if codec.site_refusal is None:
            projection(site, site.name, spec.id)
        elif why is not None or not isinstance(site, ModuleSite):
            raise LoadError(f"module {site.name!r}: {why or 'not a module site'}")
    states: dict[str, dict[str, Tensor]] = {}
    with torch.random.fork_rng(devices=[]):  # probes: leave the RNG as it was
        shared = spec.build_shared(cfg, tuple(sites))
        if shared is not None and not redraw:
            if codec.shared_in is None:
                raise LoadError(f"the {codec.peft_type} codec cannot read shared tensors")
            states[SHARED] = codec.shared_in(config, cfg, shared_parts)
            _check_state(SHARED, codec.peft_type, states[SHARED], shared.state_dict())
        for site in sites:
            assert isinstance(site, ModuleSite)
            state = codec.state_in(PeftSite(config, cfg, site, groups[site.name], shared_parts))
            probe = spec.build(cfg, site) if shared is None else spec.build(cfg, site, shared)
            _check_state(site.name, codec.peft_type, state, probe.state_dict())
            states[site.name] = state
    return LoadPlan(
        method=spec.id,
        config=cfg.model_dump(mode="json"),
        targets=[re.escape(s.name) for s in sites],
        sites=sites,
        states=states,
    )


def _check_state(
    where: str, peft_type: str, state: dict[str, Tensor], wanted: dict[str, Tensor]
) -> None:
    if set(state) != set(wanted):
        raise LoadError(
            f"module {where!r}: the {peft_type} tensors give {sorted(state)}, but the delta "
            f"needs {sorted(wanted)}; the file is incomplete or of another PEFT version"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(wanted[name].shape):
            raise LoadError(
                f"module {where!r}: tensor {name} has shape {tuple(tensor.shape)} in the "
                f"checkpoint but this backbone needs {tuple(wanted[name].shape)}; the adapter "
                "was trained on a backbone of another size (or with other sizes in its config)"
            )
        if tensor.is_floating_point() != wanted[name].is_floating_point():
            raise LoadError(
                f"module {where!r}: tensor {name} is {tensor.dtype}, but the delta needs "
                f"{wanted[name].dtype}"
            )


def export(
    model: DeltaModel,
    adapter: Adapter,
    codec: PeftCodec,
    *,
    whole_sites: Callable[[Adapter, str], list[ModuleSite]],
    common: dict[str, Any],
    target_modules: Callable[[nn.Module, list[str]], Any],
    fan_in_fan_out: Callable[[list[ModuleSite]], bool],
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config and tensors of ``adapter`` as a PEFT folder of ``codec``'s type."""
    if codec.site_refusal is None:
        sites = whole_sites(adapter, codec.method)
    else:
        sites = []
        for site in adapter.sites:
            why = codec.site_refusal(site) if isinstance(site, ModuleSite) else "not a module"
            if why is None and isinstance(site, ModuleSite) and site.out_slice is not None:
                why = "a slice of a fused module, which PEFT cannot name"
            if why is not None:
                raise AdapterError(
                    f"adapter {adapter.name!r} has site {site.name!r}, which PEFT's "
                    f"{codec.peft_type} cannot express: {why}"
                )
            sites.append(site)  # type: ignore[arg-type]
    suffix = {part: key for key, part in codec.module_keys.items()}
    tensors: dict[str, Tensor] = {}
    for site in sites:
        for part, tensor in codec.state_out(adapter, site).items():
            tensors[f"{PREFIX}{site.path}.{suffix[part]}"] = tensor.detach()
    if codec.shared_out is not None:
        whole = {part: key for key, part in codec.shared_keys.items()}
        for part, tensor in codec.shared_out(adapter).items():
            tensors[whole[part]] = tensor.detach()
    config = dict(common)
    config.update(
        {
            "target_modules": target_modules(model.base_model, [s.path for s in sites]),
            "fan_in_fan_out": fan_in_fan_out(sites),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
    )
    for name in codec.absent_fields:
        config.pop(name, None)
    config.update(codec.config_out(adapter))
    return config, tensors
