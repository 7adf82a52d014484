"""PEFT's ``FOURIERFT`` as unipeft's ``fourierft``.

A PEFT FourierFT folder holds, per adapted module, only ``fourierft_spectrum`` ``(n,)``:
unipeft's ``spectrum``. PEFT does not save the spectral positions; it draws them again
from ``random_loc_seed`` when it loads (the first ``n_frequency`` entries of a seeded random
permutation of ``d_out · d_in``). Loading draws them the same way into the delta's ``indices``
buffer; saving checks that the adapter's positions are still the ones the seed gives, since
PEFT could not know others. ``n_frequency``, ``scaling`` and ``random_loc_seed`` keep their
names; ``init_weights`` only decides how a new adapter starts (``True`` is
``init="zeros"``, ``False`` is ``"gaussian"``). PEFT's FourierFT adapts ``nn.Linear`` and
GPT-2 ``Conv1D`` modules; ``n_frequency_pattern`` and ``bias`` other than ``"none"`` are
refused.

This module also holds what the WaveFT codec shares with it: the positions and the checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ....contract.deltas import ProjectionShape
from ....contract.errors import AdapterError, LoadError
from ....contract.sites import ModuleSite
from ....methods.reparameterized.fourierft import spectral_positions
from ..codec import PeftCodec, PeftSite
from .hira import module_refusal, refuse_fields
from .vera import refuse_bias

if TYPE_CHECKING:
    from ....model import Adapter


def spectral_fields_in(peft_type: str, config: dict[str, Any], defaults: dict[str, Any]) -> dict:
    """``n_frequency``, ``scaling`` and ``random_loc_seed`` of a PEFT FourierFT or WaveFT
    config (PEFT's ``defaults`` for absent ones), after refusing what unipeft cannot honour."""
    refuse_bias(peft_type, config, "fourier_only" if peft_type == "FOURIERFT" else "waveft_only")
    refuse_fields(
        peft_type,
        config,
        {
            "n_frequency_pattern": "the number of coefficients differs between modules, and a "
            "unipeft adapter has one n_frequency. Train with one n_frequency, or split the "
            "modules into several adapters",
        },
    )
    fields = {name: config.get(name, default) for name, default in defaults.items()}
    seed = fields["random_loc_seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LoadError(
            f"this {peft_type} config has random_loc_seed={seed!r}; the positions of its "
            "coefficients are drawn from that seed, so it must be an integer"
        )
    scaling = fields["scaling"]
    if isinstance(scaling, int) and not isinstance(scaling, bool):
        fields["scaling"] = float(scaling)
    return fields


def positions_in(site: PeftSite) -> dict[str, Tensor]:
    """The delta's state from a PEFT module: its ``spectrum``, and the ``indices`` PEFT draws
    again from the seed for a ``(d_out, d_in)`` weight."""
    state = {k: v for k, v in site.tensors.items() if k == "spectrum"}
    spectrum = state.get("spectrum")
    n = site.config.n_frequency
    if spectrum is None or tuple(spectrum.shape) != (n,):
        return state  # the loader names the missing or misshapen tensor
    shape = ProjectionShape.of(site.site)
    state["indices"] = spectral_positions(
        shape.out_features, shape.in_features, n, site.config.random_loc_seed
    )
    return state


def positions_out(peft_type: str, adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    """``{"spectrum": ...}`` of the delta at ``site``, after checking that its positions are
    the ones PEFT will draw from the seed (PEFT does not store them)."""
    delta = adapter.delta_at(site)
    cfg = adapter.config
    shape = ProjectionShape.of(site)
    expected = spectral_positions(
        shape.out_features,
        shape.in_features,
        cfg.n_frequency,  # type: ignore[attr-defined]
        cfg.random_loc_seed,  # type: ignore[attr-defined]
    )
    if not torch.equal(delta.indices.cpu(), expected):  # type: ignore[union-attr]
        raise AdapterError(
            f"adapter {adapter.name!r}: the coefficient positions at site {site.name!r} are "
            f"not the ones random_loc_seed={cfg.random_loc_seed} gives; PEFT's {peft_type} "  # type: ignore[attr-defined]
            "does not store positions but draws them from the seed, so it would compute "
            "another function. Export only adapters whose indices buffers were not edited"
        )
    return {"spectrum": delta.spectrum}  # type: ignore[dict-item]


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    fields = spectral_fields_in(
        "FOURIERFT", config, {"n_frequency": 1000, "scaling": 150.0, "random_loc_seed": 777}
    )
    return {**fields, "init": "zeros" if config.get("init_weights") is True else "gaussian"}


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "n_frequency": cfg.n_frequency,  # type: ignore[attr-defined]
        "scaling": cfg.scaling,  # type: ignore[attr-defined]
        "random_loc_seed": cfg.random_loc_seed,  # type: ignore[attr-defined]
        "init_weights": cfg.init == "zeros",  # type: ignore[attr-defined]
        "n_frequency_pattern": {},
        "bias": "none",
    }


CODECS = (
    PeftCodec(
        method="fourierft",
        peft_type="FOURIERFT",
        module_keys={"fourierft_spectrum": "spectrum"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=positions_in,
        state_out=lambda adapter, site: positions_out("FOURIERFT", adapter, site),
        site_refusal=lambda site: module_refusal("FourierFT", site, ("linear", "conv1d_t")),
        known_fields=frozenset(
            {"n_frequency", "scaling", "random_loc_seed", "n_frequency_pattern", "bias"}
        ),
    ),
)
