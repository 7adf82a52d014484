"""PEFT's ``OFT`` as unipeft's ``oft``.

A PEFT OFT folder holds, per adapted module, ``oft_R.weight`` ``(n or 1, b (b - 1) / 2)``:
the upper triangles of the skew-symmetric blocks, row by row, exactly unipeft's ``skew``.
Config: ``r`` and ``oft_block_size`` map to the fields of the same names (PEFT's 0, "not
set", is None here), and ``module_dropout``, ``coft``, ``eps``, ``block_share``,
``use_cayley_neumann`` and ``num_cayley_neumann_terms`` map one to one. ``init_weights``
only matters before training (the tensors are loaded over it); a ``bias`` other than
``"none"`` is refused, as are folders of PEFT before 0.14 (another OFT) and Cayley-Neumann
adapters of PEFT before 0.18 (another series).

PEFT moves a block size that does not divide a layer's width to a nearby one, per layer;
unipeft has one block size per adapter, so such a folder is refused, naming the layer.

Modules: PEFT's OFT adapts whole ``nn.Linear`` and ``nn.Conv2d`` modules (and embeddings,
which unipeft's oft does not). On a Conv2d with a kernel larger than 1x1 its forward
unfolds the input with stride 1, rotates every patch and folds the patches back by summing
them, which is neither its merged weight nor the identity at init; only 1x1 convolutions,
where both agree, are converted.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ....runtime.registry import registry
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter

NEUMANN_SINCE = (0, 18, 0)
"""The PEFT version whose Cayley-Neumann series unipeft's oft computes."""


def version_tuple(text: Any) -> tuple[int, ...] | None:
    """``"0.18.1.dev0"`` -> ``(0, 18, 1)``; None when ``text`` is not a version."""
    if not isinstance(text, str):
        return None
    found = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if found is None:
        return None
    return tuple(int(g) for g in found.groups(default="0"))


def refuse_bias(peft_type: str, config: dict[str, Any]) -> None:
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise LoadError(
            f"this {peft_type} adapter sets bias={bias!r}: it trains the backbone's biases, "
            f"which unipeft's {peft_type.lower()} leaves alone. Train with bias='none'"
        )


def unset_zero(value: Any) -> Any:
    """PEFT's 0 ("not set") as None."""
    return None if value == 0 else value


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_bias("OFT", config)
    if "oft_block_size" not in config:
        raise LoadError(
            "this OFT adapter has no oft_block_size: it was written by PEFT before 0.14, "
            "whose OFT is another parametrisation. Retrain it with a newer PEFT"
        )
    neumann = config.get("use_cayley_neumann", False)
    version = version_tuple(config.get("peft_version"))
    if neumann and version is not None and version < NEUMANN_SINCE:
        raise LoadError(
            f"this OFT adapter uses the Cayley-Neumann series of PEFT {config['peft_version']}; "
            "PEFT 0.18 changed the series, and unipeft computes the new one. Retrain it with "
            "PEFT >= 0.18, or with use_cayley_neumann=False"
        )
    return {
        "r": unset_zero(config.get("r", 0)),
        "oft_block_size": unset_zero(config.get("oft_block_size", 0)),
        "module_dropout": config.get("module_dropout", 0.0),
        "coft": config.get("coft", False),
        "eps": config.get("eps", 6e-5),
        "block_share": config.get("block_share", False),
        "use_cayley_neumann": neumann,
        "num_cayley_neumann_terms": config.get("num_cayley_neumann_terms", 5),
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg: Any = adapter.config
    out = {
        "r": cfg.r or 0,
        "oft_block_size": cfg.oft_block_size or 0,
        "module_dropout": cfg.module_dropout,
        "coft": cfg.coft,
        "eps": cfg.eps,
        "block_share": cfg.block_share,
        "use_cayley_neumann": cfg.use_cayley_neumann,
        "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms,
        "init_weights": True,
        "bias": "none",
    }
    if cfg.use_cayley_neumann:  # the series of PEFT >= 0.18: say so, or PEFT warns it is older
        out["peft_version"] = ".".join(map(str, NEUMANN_SINCE))
    return out


def sizes_fit(peft_type: str, method: str, site: PeftSite) -> None:
    """Raise :class:`LoadError` when the config's block sizes do not fit ``site`` (PEFT
    adjusted them for that layer)."""
    why = registry().method(method).size_refusal(site.config, site.site)
    if why is not None:
        raise LoadError(
            f"module {site.site.path!r}: {why}. PEFT's {peft_type} moves such a size to one "
            "that fits, per layer, and unipeft keeps one size per adapter: load the layers "
            "that need another size as a separate adapter"
        )


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    sizes_fit("OFT", "oft", site)
    return {k: v for k, v in site.tensors.items() if k == "skew"}


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    return {"skew": adapter.delta_at(site).skew}  # type: ignore[dict-item]


def whole_module_refusal(site: ModuleSite, peft_type: str) -> str | None:
    """Why ``site`` is not a whole module PEFT's ``peft_type`` would run (None if it is);
    the module's class is left to the caller."""
    if site.entry is not None or site.out_slice is not None:
        return f"site {site.name!r} is not a whole module PEFT can name"
    if site.host is not None:
        return (
            f"module {site.path!r} is the out_proj of an nn.MultiheadAttention, whose forward "
            f"does not call it as a module, so PEFT's {peft_type} would not run there"
        )
    return None


def _site_refusal(site: ModuleSite) -> str | None:
    why = whole_module_refusal(site, "OFT")
    if why is not None:
        return why
    module = site.module
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.kernel_size != (1, 1) or module.groups != 1 or module.dilation != (1, 1):
            return (
                f"module {site.path!r} is an nn.Conv2d with kernel {module.kernel_size}, "
                f"groups {module.groups}, dilation {module.dilation}: PEFT's OFT forward "
                "there folds rotated overlapping patches back by summing them, which is "
                "not its merged weight (nor the identity at init), so no unipeft adapter "
                "computes it. Only 1x1, ungrouped, undilated convolutions convert"
            )
        return None
    return (
        f"module {site.path!r} ({type(module).__name__}) is not an nn.Linear or nn.Conv2d, "
        "the projections PEFT's OFT adapts (GPT-2's Conv1D and nn.Conv1d/3d are not)"
    )


CODECS = (
    PeftCodec(
        method="oft",
        peft_type="OFT",
        module_keys={"oft_R.weight": "skew"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=_site_refusal,
        known_fields=frozenset(
            {
                "r",
                "oft_block_size",
                "module_dropout",
                "coft",
                "eps",
                "block_share",
                "use_cayley_neumann",
                "num_cayley_neumann_terms",
                "init_weights",
                "bias",
            }
        ),
    ),
)
