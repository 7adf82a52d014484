"""LN-tuning: tune only the affine parameters of the backbone's norms (Zhao et al., 2023).

A norm computes ``y = n(x) ⊙ w + b`` (``n``: the normalisation, LayerNorm's
``(x - mean) / sqrt(var + eps)`` or RMSNorm's ``x / sqrt(mean(x²) + eps)``). LN-tuning trains
``w`` and ``b``. Here the backbone's ``w`` and ``b`` stay frozen and the delta holds their
change ``Δw``, ``Δb``, so the adapted norm is

    y' = n(x) ⊙ (w + Δw) + (b + Δb) = y + n(x) ⊙ Δw + Δb

``n(x)`` is recomputed from the norm's input (its kind and ``eps`` read from the module), and
the change starts at zero, so the adapter is the identity at init. ``merge()`` writes
``w + Δw`` and ``b + Δb`` into the norm. Norms whose output is ``n(x) ⊙ (1 + w)`` (Gemma's
RMSNorm) are tuned the same way: the change of ``w`` enters the output the same way.

Parameters per norm: ``Δw`` and, where the norm has a bias, ``Δb``, stacked in one tensor
``values`` ``(2, *shape)`` (row 0 the weight's change, row 1 the bias's), ``(1, *shape)``
for a norm without a bias (RMSNorm). Nothing is shared between sites.

Paper: Zhao et al., *Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM
Finetuning*, 2023, arXiv:2312.11420.

PEFT equivalent: ``peft_type="LN_TUNING"`` (``LNTuningConfig``, no hyperparameters besides
``target_modules``). PEFT keeps a full trained copy of each norm and saves its whole
``weight`` and ``bias`` (``<module>.ln_tuning_layers.weight`` / ``.bias``); the codec in
``unipeft.features.interop.codecs.ln_tuning`` turns them into this delta's change against the
backbone's own norm weights, and back.

Sites: norm modules only: ``nn.LayerNorm`` (Hugging Face, timm and open_clip LayerNorms,
which subclass it), ``nn.RMSNorm`` and RMSNorm-style modules (Llama's ``LlamaRMSNorm`` and
others that keep a ``variance_epsilon`` or are named ``*RMSNorm``). Refused, with the reason:
any other module (projections, sublayers, blocks: ln_tuning has nothing to tune there),
channels-first norms (timm's ``LayerNorm2d``), ``GroupNorm`` / batch norms (their
normalisation is over other dimensions), norms without an affine weight
(``elementwise_affine=False``), RMS norms that add a bias (their formula is not known), and
gated norms whose forward takes a second input (Mamba2's ``MambaRMSNormGated``: the gate
scales the input before it is normalised, and the delta sees the first input only).
Default targets: every norm a structure map lists (role ``norm``) that it can tune; the
others are left out (``norm?``), so a ConvNeXt's channels-first head norm or Mamba2's gated
norms do not stop it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import SelectiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site


class LnTuningConfig(DeltaConfig):
    """LN-tuning has no hyperparameters beyond its targets."""


@dataclass(frozen=True)
class NormSpec:
    """What LN-tuning needs to know about one norm module."""

    kind: Literal["layer", "rms"]
    eps: float | None
    """``None``: the input dtype's machine epsilon (``nn.RMSNorm(eps=None)``)."""
    shape: tuple[int, ...]
    """The affine weight's shape: the trailing dimensions the norm normalises."""
    has_bias: bool


_CHANNELS_FIRST = ("2d", "3d", "channelsfirst", "channels_first")


def norm_spec(module: nn.Module) -> NormSpec | str:
    """How ``module`` normalises, or why LN-tuning cannot tune it."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    lowered = name.lower()
    if isinstance(module, nn.GroupNorm | nn.modules.batchnorm._NormBase):
        return (
            f"it is an {name}, which normalises over other dimensions than the features; "
            "ln_tuning tunes LayerNorm and RMSNorm modules"
        )
    is_layer = isinstance(module, nn.LayerNorm)
    rms_type = getattr(nn, "RMSNorm", None)
    is_rms = (rms_type is not None and isinstance(module, rms_type)) or (
        not is_layer
        and (
            "rmsnorm" in lowered
            or (hasattr(module, "variance_epsilon") and "norm" in lowered)  # HF T5LayerNorm...
        )
    )
    if not (is_layer or is_rms):
        return (
            f"it is an {name}, not a LayerNorm or RMSNorm; ln_tuning tunes only the affine "
            "parameters of norms. Target the role 'norm', or norm modules by name"
        )
    if any(tag in lowered for tag in _CHANNELS_FIRST):
        return (
            f"it is a channels-first norm ({name}), which normalises dimension 1; ln_tuning "
            "tunes norms over the last dimensions"
        )
    if not isinstance(weight, nn.Parameter | Tensor) or weight.ndim == 0:
        return f"the {name} has no affine weight (elementwise_affine=False): nothing to tune"
    extra = _more_inputs(module)
    if extra:
        return (
            f"the {name}'s forward takes more than the features ({', '.join(extra)}: a gated "
            "norm), which ln_tuning cannot see when it recomputes the normalisation; tune "
            "its output with ssf, or its weight with bitfit-style methods, instead"
        )
    if is_layer:
        return NormSpec("layer", float(module.eps), tuple(weight.shape), bias is not None)
    if bias is not None:
        return f"the {name} is an RMS norm with a bias, whose formula ln_tuning does not know"
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return NormSpec("rms", None if eps is None else float(eps), tuple(weight.shape), False)


def _more_inputs(module: nn.Module) -> list[str]:
    """The forward's parameters after the first (the features), for modules of classes of
    their own (a gate that scales the input before normalising: Mamba2's gated RMSNorm)."""
    if type(module).forward in (nn.LayerNorm.forward, getattr(nn, "RMSNorm", nn.LayerNorm).forward):
        return []
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[2:]
    except (TypeError, ValueError):
        return []
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in plain]


class LnTuningDelta(SelectiveDelta):
    """``y + n(x) ⊙ Δw + Δb`` at one norm. ``values``: ``(2, *shape)`` (Δw, Δb), or
    ``(1, *shape)`` (Δw) for a norm without a bias.

    :class:`SelectiveDelta`'s targets are a bias or a projection's weight; a norm's affine
    pair is both, so this class keeps the pair in ``values`` and overrides ``forward`` and
    ``merged``.
    """

    def __init__(self, spec: NormSpec) -> None:
        rows = 2 if spec.has_bias else 1
        super().__init__("bias", (rows, *spec.shape))
        self.spec = spec  # plain attribute, rebuilt from the site

    def normalized(self, x: Tensor) -> Tensor:
        """``n(x)``: the norm's input normalised, without its affine parameters."""
        spec = self.spec
        if spec.kind == "layer":
            return F.layer_norm(x, spec.shape, None, None, spec.eps)
        # RMS: in float32 (or wider), as Hugging Face's RMS norms compute it
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        dims = tuple(range(-len(spec.shape), 0))
        eps = torch.finfo(x.dtype).eps if spec.eps is None else spec.eps
        return (wide * torch.rsqrt(wide.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        if x is None:
            raise RuntimeError("ln_tuning needs the norm's input, which was not captured")
        change = self.values.to(y.dtype)
        out = torch.addcmul(y, self.normalized(x).to(y.dtype), change[0])
        return out + change[1] if self.spec.has_bias else out

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # weight: the norm's own affine weight; w + Δw and b + Δb are the tuned norm
        new_weight = weight + self.values[0].to(weight.dtype).reshape(weight.shape)
        if bias is None or not self.spec.has_bias:
            return new_weight, bias
        return new_weight, bias + self.values[1].to(bias.dtype).reshape(bias.shape)


def _spec(site: Site) -> NormSpec:
    assert isinstance(site, ModuleSite)
    spec = norm_spec(site.module)
    if isinstance(spec, str):  # accepts() refused it first
        raise TypeError(f"site {site.name!r}: {spec}")
    return spec


def _build(cfg: LnTuningConfig, site: Site) -> LnTuningDelta:
    return LnTuningDelta(_spec(site))


def _count(cfg: LnTuningConfig, site: Site) -> int:
    spec = _spec(site)
    return (2 if spec.has_bias else 1) * math.prod(spec.shape)


def _accepts(cfg: LnTuningConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite):  # pragma: no cover - site_kinds excludes it
        return f"{site.name!r} is a token sequence"
    if site.entry is not None or site.out_slice is not None or site.weight is not None:
        return (
            f"{site.name!r} ({site.role or type(site.module).__name__}) is not a norm: "
            "ln_tuning tunes LayerNorm / RMSNorm modules; target the role 'norm'"
        )
    spec = norm_spec(site.module)
    if isinstance(spec, str):
        return f"{site.name!r} cannot be tuned: {spec}"
    return None


METHOD = Method(
    id="ln_tuning",
    refuses=(
        "modules other than affine LayerNorm / RMSNorm (GroupNorm, batch norms, channels-"
        "first norms, norms without a weight, RMS norms with a bias, gated norms whose "
        "forward takes a second input)"
    ),
    family="selective",
    config=LnTuningConfig,
    build=_build,
    num_parameters=_count,
    formula="2 · d per LayerNorm (weight and bias), d per norm without a bias (RMSNorm)",
    site_kinds=("module",),
    default_targets=("norm?",),  # every norm it can tune; the others are left out
    mergeable=True,
    identity_at_init=True,
    paper="Zhao et al., Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM "
    "Finetuning, 2023, arXiv:2312.11420",
    summary="tunes the weight and bias of every norm (LayerNorm / RMSNorm); mergeable",
    accepts=_accepts,
)
