"""Helpers of :class:`unipeft.DeltaModel` that need none of its state: loading a plan's
tensors into a freshly built delta, linking fast-path classes, and the handle's forward
signature."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..contract.errors import AdapterError
from ..contract.method import Method
from ..contract.sites import Site
from .state import Attachment

__all__ = ["count_parameters", "forward_signature", "link", "load_state"]


def load_state(delta: nn.Module, state: Any, site: Site | str, spec: Method) -> None:
    """Load a plan's tensors for one site (or the shared module) into its freshly built
    module, converting them to its dtype and device; errors name the site and the entries
    that differ."""
    where = site if isinstance(site, str) else site.name
    current = delta.state_dict()
    if set(state) != set(current):
        raise AdapterError(
            f"the tensors given for site {where!r} are {sorted(state)}, but method "
            f"{spec.id!r} builds a delta there with {sorted(current)}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise AdapterError(
                f"the tensor {k!r} given for site {where!r} has shape {tuple(v.shape)}, "
                f"but method {spec.id!r} builds one of shape {tuple(current[k].shape)} there"
            )
    with torch.no_grad():
        delta.load_state_dict(
            {k: v.to(dtype=current[k].dtype, device=current[k].device) for k, v in state.items()},
            strict=True,
        )


def link(attachments: list[Attachment]) -> None:
    """Show each fast-path class this adapter's attachments of that class, so it can share
    work between sites (:meth:`~unipeft.contract.fastpath.FastPath.link`)."""
    by_class: dict[type, list[Attachment]] = {}
    for att in attachments:
        if att.fast is not None:
            by_class.setdefault(type(att.delta), []).append(att)
    for group in by_class.values():
        group[0].fast.link(group)  # type: ignore[union-attr]


def forward_signature(backbone: nn.Module) -> inspect.Signature:
    """The backbone's forward signature with the keyword-only ``adapter_names`` added."""
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    try:
        sig = inspect.signature(backbone.forward)
    except (TypeError, ValueError):
        return inspect.Signature(
            [
                inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                extra,
                inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
            ]
        )
    params = [p for p in sig.parameters.values() if p.name != "adapter_names"]
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    return sig.replace(parameters=[*params[:at], extra, *params[at:]])


def count_parameters(model: nn.Module, only_trainable: bool, exclude_embeddings: bool) -> int:
    """Parameters of ``model``: only trainable ones, or without embedding tables, if asked."""
    skip = set()
    if exclude_embeddings:
        skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(
        p.numel()
        for p in model.parameters()
        if id(p) not in skip and (p.requires_grad or not only_trainable)
    )
