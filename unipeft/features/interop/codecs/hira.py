"""PEFT's ``HIRA`` as unipeft's ``hira``.

A PEFT HiRA folder holds, per adapted module, ``hira_A`` ``(r, d_in[, *kernel])`` and
``hira_B`` ``(d_out, r[, 1, ...])``: unipeft's ``A`` and ``B`` (``B`` without the trailing
ones on a convolution). ``hira_dropout`` is ``dropout``; ``init_weights`` (``True`` or
``"gaussian"``) is ``init`` (it only decides how a new adapter starts). PEFT's HiRA adapts
``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv1d/2d/3d`` modules; its ``nn.Embedding``
tensors (``hira_embedding_A/B``) and a ``rank_pattern`` are refused.

This module also holds :func:`module_refusal`, the site check the DeLoRA and GraLoRA codecs
share with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....contract.errors import LoadError
from ....contract.sites import Layout, ModuleSite
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter

_KINDS: dict[Layout, str] = {
    "linear": "nn.Linear",
    "conv1d_t": "GPT-2 Conv1D",
    "conv": "nn.Conv1d/2d/3d",
}


def module_refusal(peft_name: str, site: ModuleSite, layouts: tuple[Layout, ...]) -> str | None:
    """Why PEFT's ``peft_name``, which adapts modules of the weight ``layouts``, cannot adapt
    ``site`` as a module (None when it can): the site must be the whole module, called as a
    module (not a projection of an ``nn.MultiheadAttention``)."""
    kind = type(site.module).__name__
    if site.weight is None or site.weight.layout not in layouts:
        names = ", ".join(_KINDS[k] for k in layouts)
        return f"module {site.path!r} ({kind}) is not one PEFT's {peft_name} adapts ({names})"
    if site.entry is not None:
        return f"site {site.name!r} is a path between modules, not a module PEFT can name"
    if site.out_slice is not None:
        return (
            f"site {site.name!r} is a slice of the fused module {site.path!r}, which PEFT "
            "adapts whole; target the whole module"
        )
    if site.host is not None:
        return (
            f"module {site.path!r} is the out_proj of an nn.MultiheadAttention, whose forward "
            f"does not call it as a module, so PEFT's {peft_name} would not run there"
        )
    return None


def refuse_fields(peft_type: str, config: dict[str, Any], refused: dict[str, str]) -> None:
    """Raise :class:`LoadError` for the first of ``refused`` that ``config`` sets."""
    for name, why in refused.items():
        value = config.get(name)
        if value not in (None, "none", {}, [], False):
            raise LoadError(f"this {peft_type} adapter sets {name}={value!r}: {why}")


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_fields(
        "HIRA",
        config,
        {
            "rank_pattern": "ranks differ between modules, and a unipeft hira adapter has one "
            "r. Train with one rank, or split the modules into several adapters",
        },
    )
    init = config.get("init_weights", True)
    return {
        "r": config.get("r", 32),
        "dropout": config.get("hira_dropout", 0.0),
        "init": "gaussian" if init == "gaussian" else "kaiming",
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "r": cfg.r,  # type: ignore[attr-defined]
        "hira_dropout": cfg.dropout,  # type: ignore[attr-defined]
        "init_weights": "gaussian" if cfg.init == "gaussian" else True,  # type: ignore[attr-defined]
        "rank_pattern": {},
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    parts = dict(site.tensors)
    out = {n: parts[n] for n in ("A", "B") if n in parts}
    if "B" in out and out["B"].ndim > 2:  # a convolution's (d_out, r, 1, ...)
        b = out["B"]
        if any(d != 1 for d in b.shape[2:]):
            raise LoadError(
                f"module {site.site.path!r}: hira_B has shape {tuple(b.shape)}; a convolution's "
                "must be (d_out, r, 1, ...)"
            )
        out["B"] = b.reshape(b.shape[0], b.shape[1])
    return out


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    delta = adapter.delta_at(site)
    b: Tensor = delta.B  # type: ignore[assignment]
    ones = [1] * len(site.weight.kernel_size) if site.weight is not None else []
    return {"A": delta.A, "B": b.reshape(*b.shape, *ones)}  # type: ignore[dict-item]


CODECS = (
    PeftCodec(
        method="hira",
        peft_type="HIRA",
        module_keys={"hira_A": "A", "hira_B": "B"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=lambda site: module_refusal("HiRA", site, ("linear", "conv1d_t", "conv")),
        known_fields=frozenset({"r", "hira_dropout", "rank_pattern"}),
    ),
)
