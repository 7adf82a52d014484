"""PEFT's ``ADALORA`` as unipeft's ``adalora``.

A PEFT AdaLoRA folder holds, per adapted module, ``lora_A`` ``(r, d_in·k)``, ``lora_E``
``(r, 1)`` and ``lora_B`` ``(d_out, r)`` (``ranknum`` is never saved: PEFT rebuilds it as
``init_r``). Once PEFT's rank allocator has masked singular values, the config carries
``rank_pattern`` (``{"<module path>.lora_E": [kept?] * init_r}``) and ``save_pretrained``
keeps only the kept rows (``r = sum(kept)``, possibly 0); loading resizes the modules to
those ranks and keeps the scale ``alpha / (init_r + 1e-5)``.

unipeft's deltas always hold ``init_r`` singular values and a 0/1 ``mask``: reading puts each
kept row back at its index in ``rank_pattern`` (zeros elsewhere, masked); writing keeps the
rows the masks keep and writes ``rank_pattern`` when any singular value is masked, as PEFT
does. A folder with a ``rank_pattern`` loads with the schedule finished (its step set to
``total_step``), so the masks stay as PEFT left them; one without loads at step 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite

PEFT_DEFAULT_R = 8
"""``r`` of PEFT's ``LoraConfig``, which AdaLoRA ignores (and warns about when it differs)."""

_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "beta1", "beta2", "orth_reg_weight")

_REFUSED = {
    "use_dora": "DoRA is not part of AdaLoRA (PEFT refuses it too)",
    "lora_bias": "the adapter has a bias on lora_B, which unipeft's adalora does not have",
    "layer_replication": "the adapter duplicates layers of the backbone, which unipeft never "
    "restructures",
    "trainable_token_indices": "the adapter trains embedding rows, which unipeft's adalora "
    "does not",
}

_KNOWN = frozenset(
    {
        *_FIELDS,
        *_REFUSED,
        "deltaT",
        "total_step",
        "rank_pattern",
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "init_lora_weights",
        "use_rslora",  # AdaLoRA's layers ignore it: the scale is alpha / (init_r + 1e-5)
        "alpha_pattern",  # ignored by AdaLoRA's layers too
        "loftq_config",
        "megatron_config",
        "megatron_core",
        "qalora_group_size",
        "ensure_weight_tying",
    }
)


def _set(value: Any) -> bool:
    return value not in (None, False, "", "none") and value != [] and value != {}


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    for name, why in _REFUSED.items():
        if _set(config.get(name)):
            raise LoadError(
                f"this ADALORA adapter sets {name}={config[name]!r}, which unipeft cannot "
                f"honour: {why}"
            )
    if config.get("bias", "none") != "none":
        raise LoadError(
            f"this ADALORA adapter sets bias={config['bias']!r}: it changes the backbone's "
            "biases, which unipeft's adalora leaves alone. Train with bias='none'"
        )
    fields: dict[str, Any] = {k: config[k] for k in _FIELDS if config.get(k) is not None}
    if config.get("deltaT") is not None:
        fields["delta_t"] = config["deltaT"]
    if config.get("total_step") is not None:
        fields["total_step"] = config["total_step"]
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise LoadError(f"this ADALORA config has lora_alpha={alpha!r}; PEFT writes a number")
    if alpha <= 0:  # PEFT then scales by the module's rank instead of alpha
        if _set(config.get("rank_pattern")):
            raise LoadError(
                f"this ADALORA adapter has lora_alpha={alpha} and a rank_pattern: PEFT then "
                "scales each module by its own pruned rank, which unipeft's adalora (one "
                "alpha) cannot express. Train with lora_alpha > 0"
            )
        alpha = config.get("init_r", 12)
    fields["alpha"] = float(alpha)
    fields["dropout"] = float(config.get("lora_dropout") or 0.0)
    return fields


def _kept(peft_config: dict[str, Any] | Any, path: str, init_r: int) -> list[bool] | None:
    """The module's entry of ``rank_pattern`` (None when it has none: every row kept)."""
    pattern = peft_config.get("rank_pattern")
    if not _set(pattern):
        return None
    if not isinstance(pattern, dict):
        raise LoadError(
            f"this ADALORA config's rank_pattern is {type(pattern).__name__}, not a map"
        )
    key = f"{path}.lora_E"
    found = [k for k in pattern if k == key or k.startswith(key + ".")]
    if not found:
        return None
    kept = pattern[found[0]]
    if (
        not isinstance(kept, list)
        or len(kept) != init_r
        or any(not isinstance(v, bool | int) for v in kept)
    ):
        raise LoadError(
            f"rank_pattern[{found[0]!r}] must list init_r={init_r} booleans (one per singular "
            f"value), got {kept!r}"
        )
    return [bool(v) for v in kept]


def _fan_in(site: ModuleSite) -> int:
    assert site.weight is not None
    k = 1
    for d in site.weight.kernel_size:
        k *= d
    return site.weight.in_features * k


def _state_in(ps: PeftSite) -> dict[str, Tensor]:
    site, init_r = ps.site, ps.config.init_r
    for part in ("A", "E", "B"):
        if part not in ps.tensors:
            raise LoadError(
                f"module {site.path!r} has no lora_{part} in the adapter's weights; the file is "
                "incomplete"
            )
    kept = _kept(ps.peft_config, site.path, init_r)
    rows = list(range(init_r)) if kept is None else [i for i, k in enumerate(kept) if k]
    r, d_in, d_out = len(rows), _fan_in(site), site.features
    a, e, b = ps.tensors["A"], ps.tensors["E"], ps.tensors["B"]
    for name, tensor, want in (
        ("lora_A", a, (r, d_in)),
        ("lora_E", e, (r, 1)),
        ("lora_B", b, (d_out, r)),
    ):
        if tuple(tensor.shape) != want:
            why = (
                "its rank_pattern keeps"
                if kept is not None
                else "without a rank_pattern it keeps init_r ="
            )
            raise LoadError(
                f"module {site.path!r}: {name} has shape {tuple(tensor.shape)} but {why} {r} "
                f"singular values of a {d_in}->{d_out} projection, so it needs {want}"
            )
    index = torch.tensor(rows, dtype=torch.long)
    full_a = a.new_zeros(init_r, d_in)
    full_e = e.new_zeros(init_r)
    full_b = b.new_zeros(d_out, init_r)
    mask = torch.zeros(init_r, dtype=e.dtype if e.is_floating_point() else torch.float32)
    if r:
        full_a[index] = a
        full_e[index] = e.reshape(r)
        full_b[:, index] = b
        mask[index] = 1.0
    return {"A": full_a, "E": full_e, "B": full_b, "mask": mask}


def _shared_in(peft_config: dict[str, Any], config: Any, parts: Any) -> dict[str, Tensor]:
    done = _set(peft_config.get("rank_pattern")) and config.total_step is not None
    return {"step": torch.tensor(config.total_step if done else 0, dtype=torch.long)}


def _masks(adapter: Any) -> dict[str, Tensor]:
    return {s.name: adapter.delta_at(s).mask.detach() for s in adapter.sites}


def _pruned(adapter: Any) -> bool:
    return any(bool((m == 0).any()) for m in _masks(adapter).values())


def _state_out(adapter: Any, site: ModuleSite) -> dict[str, Tensor]:
    delta = adapter.delta_at(site)
    mask = delta.mask.detach()
    a, b = delta.A.detach(), delta.B.detach()
    e = (delta.E.detach() * mask).reshape(-1, 1)
    if _pruned(adapter):
        rows = torch.nonzero(mask != 0).reshape(-1)
        a, e, b = a[rows], e[rows], b[:, rows]
    return {"A": a.contiguous(), "E": e.contiguous(), "B": b.contiguous()}


def _config_out(adapter: Any) -> dict[str, Any]:
    cfg = adapter.config
    pattern = None
    if _pruned(adapter):
        pattern = {
            f"{site.path}.lora_E": [bool(v) for v in (mask != 0).tolist()]
            for site, mask in zip(adapter.sites, _masks(adapter).values(), strict=True)
        }
    return {
        "r": PEFT_DEFAULT_R,
        "init_r": cfg.init_r,
        "target_r": cfg.target_r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "tinit": cfg.tinit,
        "tfinal": cfg.tfinal,
        "deltaT": cfg.delta_t,
        "beta1": cfg.beta1,
        "beta2": cfg.beta2,
        "orth_reg_weight": cfg.orth_reg_weight,
        # PEFT needs a schedule even to load: the shortest valid one when unipeft has none
        "total_step": cfg.total_step if cfg.total_step is not None else cfg.tinit + cfg.tfinal + 1,
        "rank_pattern": pattern,
        "bias": "none",
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }


def _site_refusal(site: ModuleSite) -> str | None:
    w = site.weight
    if w is None:
        return (
            f"{type(site.module).__name__} is not a projection; PEFT's AdaLoRA adapts "
            "nn.Linear, GPT-2 Conv1D and nn.Conv2d"
        )
    if site.entry is not None:
        return "it is a sublayer path, not a module PEFT can name"
    if w.layout == "mha_in" or site.host is not None:
        return (
            "it belongs to an nn.MultiheadAttention, which PEFT's AdaLoRA does not adapt; "
            "target nn.Linear modules"
        )
    if w.layout == "conv" and len(w.kernel_size) != 2:
        return (
            f"it is a {len(w.kernel_size)}-d convolution; PEFT's AdaLoRA adapts nn.Conv2d only "
            "among convolutions"
        )
    return None


CODECS = (
    PeftCodec(
        method="adalora",
        peft_type="ADALORA",
        module_keys={"lora_A": "A", "lora_E": "E", "lora_B": "B"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        known_fields=_KNOWN,
        shared_in=_shared_in,
        site_refusal=_site_refusal,
    ),
)
