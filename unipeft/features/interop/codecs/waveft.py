"""PEFT's ``WAVEFT`` as unipeft's ``waveft``.

A PEFT WaveFT folder holds, per adapted module, only ``waveft_spectrum`` ``(n,)``: unipeft's
``spectrum``. As for FourierFT, PEFT does not save the coefficients' positions but draws them
again from ``random_loc_seed``; loading draws them the same way into the delta's ``indices``
buffer, and saving checks that they are still the seed's. ``n_frequency``, ``scaling``,
``wavelet_family``, ``use_idwt`` and ``random_loc_seed`` keep their names; ``init_weights``
only decides how a new adapter starts (``True`` is ``init="zeros"``, ``False`` is
``"gaussian"``). PEFT's WaveFT adapts ``nn.Linear`` and GPT-2 ``Conv1D`` modules.
Refused: ``n_frequency_pattern`` and ``proportional_parameters`` (the number of
coefficients would differ between modules), ``bias`` other than ``"none"``, and wavelet
families unipeft does not compute (coiflets, and the Daubechies and symlet orders above
10, which PEFT's own wavelet table lacks too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ....contract.errors import LoadError
from ....methods.reparameterized.waveft import DAUBECHIES, SYMLETS
from ..codec import PeftCodec
from .fourierft import positions_in, positions_out, spectral_fields_in
from .hira import module_refusal, refuse_fields

if TYPE_CHECKING:
    from ....model import Adapter


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_fields(
        "WAVEFT",
        config,
        {
            "proportional_parameters": "each module gets its own share of coefficients, and a "
            "unipeft adapter has one n_frequency. Train with proportional_parameters=False",
        },
    )
    fields = spectral_fields_in(
        "WAVEFT", config, {"n_frequency": 2592, "scaling": 25.0, "random_loc_seed": 777}
    )
    family = config.get("wavelet_family", "db1")
    if family not in DAUBECHIES + SYMLETS:
        raise LoadError(
            f"this WAVEFT adapter uses wavelet_family={family!r}, which unipeft's waveft does "
            f"not compute; it has {', '.join(DAUBECHIES + SYMLETS)}"
        )
    return {
        **fields,
        "wavelet_family": family,
        "use_idwt": config.get("use_idwt", True),
        "init": "gaussian" if config.get("init_weights") is False else "zeros",
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "n_frequency": cfg.n_frequency,  # type: ignore[attr-defined]
        "scaling": cfg.scaling,  # type: ignore[attr-defined]
        "wavelet_family": cfg.wavelet_family,  # type: ignore[attr-defined]
        "use_idwt": cfg.use_idwt,  # type: ignore[attr-defined]
        "random_loc_seed": cfg.random_loc_seed,  # type: ignore[attr-defined]
        "init_weights": cfg.init == "zeros",  # type: ignore[attr-defined]
        "n_frequency_pattern": {},
        "proportional_parameters": False,
        "bias": "none",
    }


CODECS = (
    PeftCodec(
        method="waveft",
        peft_type="WAVEFT",
        module_keys={"waveft_spectrum": "spectrum"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=positions_in,
        state_out=lambda adapter, site: positions_out("WAVEFT", adapter, site),
        site_refusal=lambda site: module_refusal("WaveFT", site, ("linear", "conv1d_t")),
        known_fields=frozenset(
            {
                "n_frequency",
                "scaling",
                "wavelet_family",
                "use_idwt",
                "random_loc_seed",
                "n_frequency_pattern",
                "proportional_parameters",
                "bias",
            }
        ),
    ),
)
