"""PEFT's ``RANDLORA`` as unipeft's ``randlora``.

A PEFT RandLoRA folder holds, per adapted module, ``randlora_lambda`` ``(r, n)`` and
``randlora_gamma`` ``(n, min(d_in, d_out))``, and once for the adapter the frozen bases
``base_model.randlora_A`` ``(r, 1, m)`` and ``base_model.randlora_B`` ``(M, n_max, r)`` (with
``save_projection=True``, PEFT's default). PEFT also writes a copy of both bases under every
module (``<module>.randlora_A`` / ``.randlora_B``: the same buffers, reached from each layer);
loading reads the adapter-wide ones, as PEFT does (they are loaded last there), and ignores
the copies; saving writes the copies too, so the folder is laid out as PEFT's own.
``sparse`` / ``very_sparse`` become unipeft's ``bases``; ``bias`` other than ``"none"`` is
refused. PEFT's RandLoRA adapts ``nn.Linear`` and GPT-2 ``Conv1D`` modules only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite
from .vera import linear_module_refusal, refuse_bias, tensors

if TYPE_CHECKING:
    from ....model import Adapter


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_bias("RANDLORA", config, "randlora_only")
    if config.get("very_sparse"):
        bases = "very_sparse"
    elif config.get("sparse"):
        bases = "sparse"
    else:
        bases = "dense"
    return {
        "r": config.get("r", 32),
        "alpha": config.get("randlora_alpha", 640),
        "dropout": config.get("randlora_dropout", 0.0),
        "projection_seed": config.get("projection_prng_key", 0),
        "bases": bases,
        "save_projection": config.get("save_projection", True),
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg: Any = adapter.config
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "r": cfg.r,
        "randlora_alpha": alpha,
        "randlora_dropout": cfg.dropout,
        "projection_prng_key": cfg.projection_seed,
        "sparse": cfg.bases == "sparse",
        "very_sparse": cfg.bases == "very_sparse",
        "save_projection": cfg.save_projection,
        "bias": "none",
        "init_weights": True,
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    return tensors(dict(site.tensors), ("lam", "gamma"))


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    delta: Any = adapter.delta_at(site)
    out = {"lam": delta.lam, "gamma": delta.gamma}
    if adapter.config.save_projection:  # type: ignore[attr-defined]
        shared: Any = adapter.shared
        # a copy each: safetensors refuses tensors that share memory
        out.update({"A_copy": shared.A.clone(), "B_copy": shared.B.clone()})
    return out


def _shared_in(config: dict[str, Any], cfg: Any, parts: Any) -> dict[str, Tensor]:
    return tensors(dict(parts), ("A", "B"))


def _shared_out(adapter: Adapter) -> dict[str, Tensor]:
    if not adapter.config.save_projection:  # type: ignore[attr-defined]
        return {}  # PEFT redraws them from projection_prng_key, as unipeft does
    shared: Any = adapter.shared
    return {"A": shared.A, "B": shared.B}


CODECS = (
    PeftCodec(
        method="randlora",
        shared_optional=True,
        absent_fields=frozenset({"exclude_modules"}),
        peft_type="RANDLORA",
        module_keys={
            "randlora_lambda": "lam",
            "randlora_gamma": "gamma",
            "randlora_A": "A_copy",
            "randlora_B": "B_copy",
        },
        shared_keys={"base_model.randlora_A": "A", "base_model.randlora_B": "B"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        shared_in=_shared_in,
        shared_out=_shared_out,
        site_refusal=lambda site: linear_module_refusal("RandLoRA", site),
        known_fields=frozenset(
            {
                "r",
                "randlora_alpha",
                "randlora_dropout",
                "projection_prng_key",
                "sparse",
                "very_sparse",
                "save_projection",
                "bias",
            }
        ),
    ),
)
