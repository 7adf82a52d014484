"""A fingerprint of everything a refused call must leave as it was.

``fingerprint(model)`` covers the state-dict tensors bit for bit (with dtypes), every
parameter's ``requires_grad``, the hooks and overridden ``forward`` of every module, every
module's type and attribute names, and, on a :class:`~unipeft.DeltaModel`, its adapters,
their sites, the active set and what is merged. ``files(path)`` does the same for a folder.
Two fingerprints compare equal exactly when nothing observable changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _tensor_digest(t: Any) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256()
    h.update(str((t.dtype, tuple(t.shape))).encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {
        "state": {k: _tensor_digest(v) for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": {
            n: (
                type(m).__qualname__,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(getattr(m, "_forward_hooks_with_kwargs", {})),
                "forward" in m.__dict__,
                tuple(sorted(k for k in m.__dict__ if not k.startswith("_"))),
                m.training,
            )
            for n, m in model.named_modules()
        },
    }
    adapters = getattr(model, "adapters", None)
    if isinstance(adapters, dict):
        out["adapters"] = {
            name: (a.method.id, a.config.model_dump_json(), tuple(sorted(s.name for s in a.sites)))
            for name, a in adapters.items()
        }
        out["active"] = tuple(model.active_adapters)
        out["merged"] = tuple(model.merged_adapters)
    return out


def files(path: Path | str) -> dict[str, str]:
    """Every file under ``path`` (recursively) by relative name, with a hash of its bytes."""
    root = Path(path)
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
