"""X-LoRA: a classifier over the base model's hidden states scales frozen LoRA experts.

Given ``E`` trained LoRA experts ``ΔW_e = s_e · B_e A_e`` at the adapted projections (the
*layers* ``ℓ = 0 .. n-1``), X-LoRA runs the model twice:

1. **scaling pass**: the base model (every adapter off) gives its last hidden state
   ``H`` ``(N, L, d)``; a classifier ``c`` (``xlora_depth`` linear layers of width
   ``xlora_size`` with ReLU and dropout between them, the last with ``E`` outputs, or
   ``n · E`` with ``layerwise_scalings``) gives logits, broadcast to every layer when not
   layerwise, and ``λ = softmax(c(H) / T)`` (``enable_softmax``; ``T`` the temperature),
   ``(N, L, n, E)``;
2. **adapted pass**: at layer ``ℓ``, with ``λ_ℓ = λ[:, :, ℓ]`` (with ``top_k_lora``: zero
   but the k largest; with ``enable_softmax_topk``: a softmax over the kept ones),

       y' = y + w · Σ_e s_e · B_e A_e (λ_ℓ,e ⊙ x)

   ``w = global_scaling_weight``. Only the classifier trains (and the experts too with
   ``use_trainable_adapters``).

Run both passes with :func:`xlora_forward` (``xlora_forward(model, input_ids=ids)``): it
does the scaling pass (``with model.disable()``) and the adapted pass. ``H`` is
``hidden_states[-1]`` for a Hugging Face model (asked with ``output_hidden_states=True``, as
PEFT), ``forward_features(x)`` for a timm model, else the backbone's output when that is an
``(N, L, d)`` tensor. A plain ``model(...)`` call (training loops, the conformance kit)
has no scaling pass: each site then feeds its own input ``x`` to the classifier (so
``hidden_size`` must be the input width of every targeted site) — one pass instead of two,
the classifier reading the hidden state entering each adapted layer instead of the last
base hidden state. So every targeted site's input must be ``hidden_size`` wide (q, k, v,
``attn.out``, ``mlp.up``/``gate``; ``mlp.down`` is refused when ``hidden_size`` is set, and
fails at the first plain forward otherwise).

Layers are numbered by sorting the adapter's sites by module path (numbers compared as
numbers), then by slice; PEFT numbers its LoRA layers in module registration order, which
is the same for one projection per block or for ``query``/``value``-style names in
alphabetical order (matters only with ``layerwise_scalings``).

Experts: ``experts`` lists folders of LoRA adapters, PEFT (``adapter_config.json`` +
``adapter_model.safetensors``) or unipeft (one ``lora`` adapter in
``unipeft_adapters.json``), trained on the same backbone. Their tensors are copied into the
adapter as buffers (saved with it); the folders must still exist when the adapter is loaded
again (they give the shapes). Without ``experts``, ``num_experts`` random frozen LoRA experts
of rank ``r`` are made (for tests and from-scratch mixtures). A site a folder does not
adapt contributes nothing for that expert, as in PEFT.

Paper: Buehler & Buehler, *X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible
Framework for Large Language Models*, 2024, arXiv:2402.07148.

Shared across sites: the classifier (``Method.shared``), trained and saved once.

PEFT equivalent: ``peft_type="XLORA"`` (``XLoraConfig``: ``hidden_size``,
``enable_softmax``, ``enable_softmax_topk``, ``layerwise_scalings``, ``xlora_depth``,
``xlora_size``, ``xlora_dropout_p``, ``softmax_temperature``, ``top_k_lora``,
``global_scaling_weight``, ``use_trainable_adapters`` map one to one; ``adapters``' folders
are ``experts``; ``scaling_pass_value`` is fixed at 0, the adapters off). Computations
match PEFT's (tests/methods/test_xlora.py compares outputs with the same classifier
weights); PEFT's X-LoRA checkpoint folder is not read or written.

Sites: projections with channels last (Linear, GPT-2 ``Conv1D``, fused q/k/v slices,
``nn.MultiheadAttention`` in-projection slices). Refused: convolutions (the scalings are
per position, channels last). Not mergeable: the scalings depend on the input.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import DeltaModule, ProjectionShape
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site
from .moe import channels_last_refusal


class XLoraConfig(DeltaConfig):
    """The experts and the classifier (the PEFT XLoraConfig's fields)."""

    experts: str | None = Field(
        None,
        description="folders of trained LoRA adapters (PEFT or unipeft), as a list or its JSON "
        "text; None: num_experts random frozen LoRA experts",
    )
    num_experts: int = Field(2, ge=1, le=64, description="random experts made when experts is None")
    r: int = Field(4, ge=1, le=4096, description="rank of the random experts")
    hidden_size: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        description="width of the hidden state the classifier reads; None: the most common "
        "input width of the adapter's sites",
    )
    enable_softmax: bool = Field(True, description="softmax over the experts' logits")
    enable_softmax_topk: bool = Field(
        False, description="softmax over the top_k_lora kept scalings (PEFT's option)"
    )
    softmax_temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="T: the logits are divided by it before softmax"
    )
    layerwise_scalings: bool = Field(
        False, description="one set of scalings per layer (else one, broadcast to all)"
    )
    top_k_lora: int | None = Field(
        None, ge=1, le=64, description="keep the k largest scalings per position (None: all)"
    )
    xlora_depth: int = Field(1, ge=1, le=8, description="linear layers of the classifier")
    xlora_size: int = Field(
        2048, ge=1, le=65536, description="hidden width of the classifier (depth > 1)"
    )
    xlora_dropout_p: float = Field(
        0.2, ge=0.0, lt=1.0, description="dropout between the classifier's layers (depth > 1)"
    )
    global_scaling_weight: float = Field(
        1.0, gt=0.0, le=100.0, description="w: factor on every expert's output"
    )
    use_trainable_adapters: bool = Field(False, description="train the experts too")

    @field_validator("experts", mode="before")
    @classmethod
    def _to_text(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return json.dumps([str(v) for v in value])
        return value

    @field_validator("experts")
    @classmethod
    def _folders(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            folders = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("give a list of folders (or its JSON text)") from None
        if not isinstance(folders, list) or not folders:
            raise ValueError("give a non-empty list of LoRA adapter folders")
        missing = [f for f in folders if not Path(str(f)).is_dir()]
        if missing:
            raise ValueError(f"not folders: {missing}; save the LoRA experts there first")
        return json.dumps([str(f) for f in folders])

    def folders(self) -> list[Path]:
        return [Path(f) for f in json.loads(self.experts)] if self.experts else []

    def count(self) -> int:
        return len(self.folders()) or self.num_experts


# ------------------------------------------------------------------ reading the experts


def _natural(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def site_order(sites: tuple[Site, ...]) -> list[str]:
    """The adapter's site names in layer order (module path, numbers as numbers; slice)."""
    ordered = sorted(sites, key=lambda s: (_natural(s.path), getattr(s, "out_slice", None) or ()))
    return [s.name for s in ordered]


def _read_peft(folder: Path, sites: tuple[Site, ...]) -> dict[str, tuple[Tensor, Tensor, float]]:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: a PEFT {cfg.get('peft_type')} adapter, not LORA")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora"):
        raise ValueError(f"{folder}: rank_pattern, alpha_pattern and DoRA are not supported")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    weights = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for site in sites:
        if getattr(site, "out_slice", None) is not None:
            continue  # PEFT adapts whole modules
        key = f"base_model.model.{site.path}.lora_"
        if key + "A.weight" in weights:
            out[site.name] = (weights[key + "A.weight"], weights[key + "B.weight"], scale)
    return out


def _read_unipeft(folder: Path, sites: tuple[Site, ...]) -> dict[str, tuple[Tensor, Tensor, float]]:
    meta = json.loads((folder / "unipeft_adapters.json").read_text())
    loras = [(n, a) for n, a in meta["adapters"].items() if a["method"] == "lora"]
    if len(loras) != 1:
        raise ValueError(f"{folder}: needs exactly one lora adapter, found {len(loras)}")
    name, adapter = loras[0]
    c = adapter["config"]
    r, alpha = c.get("r", 8), c.get("alpha", 16.0)
    scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
    weights = load_file(str(folder / "unipeft_adapters.safetensors"))
    out = {}
    for site in sites:
        key = f"{name}::{site.name}::lora."
        if key + "A" in weights:
            out[site.name] = (weights[key + "A"], weights[key + "B"], scale)
    return out


def read_expert(folder: Path, sites: tuple[Site, ...]) -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{site name: (A, B, scale)}`` of one LoRA folder (PEFT or unipeft)."""
    if (folder / "adapter_config.json").is_file():
        return _read_peft(folder, sites)
    if (folder / "unipeft_adapters.json").is_file():
        return _read_unipeft(folder, sites)
    raise ValueError(f"{folder} holds neither a PEFT nor a unipeft LoRA adapter")


# ------------------------------------------------------------------ classifier


def hidden_width(cfg: XLoraConfig, sites: tuple[Site, ...]) -> int:
    if cfg.hidden_size is not None:
        return cfg.hidden_size
    widths = [ProjectionShape.of(s).in_features for s in sites]  # type: ignore[arg-type]
    return max(set(widths), key=widths.count)


class XLoraClassifier(nn.Module):
    """The classifier and the scalings of the current scaling pass (the adapter's shared
    module). ``layers``: ``Linear(d, size) ReLU [Dropout]`` × (depth − 1), then
    ``Linear(·, E or n·E)``."""

    def __init__(self, cfg: XLoraConfig, sites: tuple[Site, ...]) -> None:
        super().__init__()
        self.cfg = cfg
        self.order = site_order(sites)
        self.num_layers = len(self.order)
        self.num_experts = cfg.count()
        self.hidden = hidden_width(cfg, sites)
        out = self.num_experts * (self.num_layers if cfg.layerwise_scalings else 1)
        layers: list[nn.Module] = []
        width = self.hidden
        for _ in range(cfg.xlora_depth - 1):
            layers += [nn.Linear(width, cfg.xlora_size), nn.ReLU()]
            if cfg.xlora_dropout_p > 0:
                layers.append(nn.Dropout(cfg.xlora_dropout_p))
            width = cfg.xlora_size
        layers.append(nn.Linear(width, out))
        self.layers = nn.Sequential(*layers)
        self.experts = [read_expert(f, sites) for f in cfg.folders()]
        self.pending: Tensor | None = None

    def scalings(self, hidden: Tensor) -> Tensor:
        """``(N, ..., n, E)`` scalings from hidden states ``(N, ..., d)``."""
        if hidden.shape[-1] != self.hidden:
            raise ValueError(
                f"the X-LoRA classifier reads width {self.hidden} (hidden_size), got a hidden "
                f"state of width {hidden.shape[-1]}; set hidden_size to the model's width"
            )
        logits = self.layers(hidden.to(self.layers[-1].weight.dtype))
        lead = logits.shape[:-1]
        if self.cfg.layerwise_scalings:
            logits = logits.reshape(*lead, self.num_layers, self.num_experts)
        else:
            logits = logits.unsqueeze(-2).expand(*lead, self.num_layers, self.num_experts)
        if self.cfg.enable_softmax:
            logits = torch.softmax(logits / self.cfg.softmax_temperature, dim=-1)
        return logits


def layer_scalings(cfg: XLoraConfig, scalings: Tensor) -> Tensor:
    """One layer's ``(…, E)`` scalings after ``top_k_lora`` and ``enable_softmax_topk``."""
    if cfg.top_k_lora is not None:
        k = min(cfg.top_k_lora, scalings.shape[-1])
        idx = scalings.topk(k, dim=-1).indices
        keep = torch.zeros_like(scalings, dtype=torch.bool).scatter(-1, idx, True)
        scalings = scalings * keep.to(scalings.dtype)
    if cfg.enable_softmax_topk:
        nonzero = scalings != 0
        soft = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1)
        scalings = soft.masked_fill(~nonzero, 0.0)
    return scalings


# ------------------------------------------------------------------ the delta


def _absent(shape: ProjectionShape) -> tuple[Tensor, Tensor, float]:
    """A rank-1 zero expert: a site the expert's folder does not adapt."""
    return torch.zeros(1, shape.in_features), torch.zeros(shape.out_features, 1), 0.0


class XLoraDelta(DeltaModule):
    """``y + w Σ_e s_e B_e A_e (λ_e ⊙ x)`` at one projection (layer ``index``)."""

    family = "moe"

    def __init__(self, cfg: XLoraConfig, site: Site, shared: XLoraClassifier) -> None:
        super().__init__()
        self.use_shared(shared)
        shape = ProjectionShape.of(site)  # type: ignore[arg-type]
        self.index = shared.order.index(site.name)
        self.cfg = cfg
        gen = torch.Generator().manual_seed(1234 + self.index)
        scales, factors = [], []
        for e in range(shared.num_experts):
            if shared.experts:
                a, b, s = shared.experts[e].get(site.name, _absent(shape))
            else:
                a = torch.randn(cfg.r, shape.in_features, generator=gen)
                a = a / math.sqrt(shape.in_features)
                b = torch.randn(shape.out_features, cfg.r, generator=gen) * 0.1
                s = 1.0
            factors.append((a.float().clone(), b.float().clone()))
            scales.append(s)
        for e, (a, b) in enumerate(factors):
            if cfg.use_trainable_adapters:
                setattr(self, f"A{e}", nn.Parameter(a))
                setattr(self, f"B{e}", nn.Parameter(b))
            else:
                self.register_buffer(f"A{e}", a)
                self.register_buffer(f"B{e}", b)
        self.register_buffer("scale", torch.tensor(scales, dtype=torch.float32))

    def _scalings(self, x: Tensor) -> Tensor:
        shared: XLoraClassifier = self.shared  # type: ignore[assignment]
        if shared.pending is not None:
            full = shared.pending
            if full.shape[:-2] != x.shape[:-1]:
                raise ValueError(
                    f"the scaling pass gave scalings for positions {tuple(full.shape[:-2])} but "
                    f"this site's input has {tuple(x.shape[:-1])}; X-LoRA's scaling pass needs "
                    "sites that see the model's token sequence (one tower)"
                )
        else:
            full = shared.scalings(x)
        return layer_scalings(self.cfg, full[..., self.index, :])

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        if x is None:
            raise RuntimeError("X-LoRA needs the projection's input, which was not captured")
        lam = self._scalings(x).to(x.dtype)
        out = y
        w = self.cfg.global_scaling_weight
        for e in range(lam.shape[-1]):
            a, b = getattr(self, f"A{e}"), getattr(self, f"B{e}")
            h = (x * lam[..., e : e + 1]) @ a.to(x.dtype).t()
            out = out + (h @ b.to(x.dtype).t()) * (self.scale[e].to(x.dtype) * w)
        return out


# ------------------------------------------------------------------ two passes


def _last_hidden(model: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    base = getattr(model, "base_model", model)
    if hasattr(getattr(base, "config", None), "output_hidden_states"):
        out = model(*args, **{**kwargs, "output_hidden_states": True, "return_dict": True})
        return out.hidden_states[-1]
    if hasattr(base, "forward_features"):
        return base.forward_features(*args, **kwargs)
    out = model(*args, **kwargs)
    if isinstance(out, Tensor) and out.ndim >= 3:
        return out
    raise TypeError(
        f"cannot find the last hidden state of {type(base).__name__}: X-LoRA's scaling pass "
        "reads hidden_states[-1] (Hugging Face), forward_features (timm) or an (N, L, d) output"
    )


def xlora_forward(model: Any, *args: Any, **kwargs: Any) -> Any:
    """X-LoRA's two passes on a :class:`~unipeft.DeltaModel`: the base model (every adapter
    off) gives the last hidden state, each X-LoRA adapter's classifier the scalings, and the
    adapted model runs with them. Returns the adapted pass's output."""
    classifiers = {
        id(d.shared): d.shared for d in model.deltas.modules() if isinstance(d, XLoraDelta)
    }
    if not classifiers:
        raise ValueError("the model has no xlora adapter; add one with add_adapter(..., 'xlora')")
    with torch.no_grad(), model.disable():
        hidden = _last_hidden(model, args, kwargs)
    try:
        for c in classifiers.values():
            c.pending = c.scalings(hidden)
        return model(*args, **kwargs)
    finally:
        for c in classifiers.values():
            c.pending = None


# ------------------------------------------------------------------ the record


def _shared(cfg: XLoraConfig, sites: tuple[Site, ...]) -> XLoraClassifier:
    return XLoraClassifier(cfg, sites)


def _shared_count(cfg: XLoraConfig, sites: tuple[Site, ...]) -> int:
    d, e = hidden_width(cfg, sites), cfg.count()
    out = e * (len(sites) if cfg.layerwise_scalings else 1)
    if cfg.xlora_depth == 1:
        return (d + 1) * out
    size = cfg.xlora_size
    return (d + 1) * size + (cfg.xlora_depth - 2) * (size + 1) * size + (size + 1) * out


def _build(cfg: XLoraConfig, site: Site, shared: XLoraClassifier) -> XLoraDelta:
    return XLoraDelta(cfg, site, shared)


def _count(cfg: XLoraConfig, site: Site) -> int:
    if not cfg.use_trainable_adapters:
        return 0
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    if not cfg.experts:
        return cfg.num_experts * cfg.r * (shape.in_features + shape.out_features)
    total = 0
    for folder in cfg.folders():
        a, b, _ = read_expert(folder, (site,)).get(site.name, _absent(shape))
        total += a.numel() + b.numel()
    return total


def _accepts(cfg: XLoraConfig, site: Site) -> str | None:
    assert isinstance(site, ModuleSite)
    return channels_last_refusal("xlora", site)


def _size_check(cfg: XLoraConfig, site: Site) -> str | None:
    if cfg.hidden_size is None or site.weight is None:
        return None
    width = ProjectionShape.of(site).in_features  # type: ignore[arg-type]
    if width == cfg.hidden_size:
        return None
    return (
        f"hidden_size={cfg.hidden_size} but {site.name!r} takes inputs of width {width}; "
        "a plain forward feeds each site's input to the classifier, so every site's input "
        f"must be hidden_size wide. Set hidden_size={width} or target other projections"
    )


METHOD = Method(
    id="xlora",
    family="moe",
    config=XLoraConfig,
    build=_build,
    num_parameters=_count,
    formula="the classifier once per adapter: (d + 1) · E' at depth 1, else (d + 1) · S + "
    "(depth − 2) · (S + 1) · S + (S + 1) · E' (E' = E, or E · layers when layerwise); "
    "0 per site (frozen experts), or the experts' A and B with use_trainable_adapters",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="xlora_size",
    mergeable=False,
    identity_at_init=False,
    paper="Buehler & Buehler, X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible "
    "Framework for Large Language Models, 2024, arXiv:2402.07148",
    summary="a classifier over the base model's hidden states scales frozen LoRA experts per "
    "layer and position (two passes: xlora_forward)",
    accepts=_accepts,
    size_check=_size_check,
    shared=_shared,
    shared_parameters=_shared_count,
    refuses="convolutions (the scalings are per position, channels last); sites whose input "
    "is not hidden_size wide (mlp.down)",
)
