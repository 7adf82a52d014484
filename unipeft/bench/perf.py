"""``unipeft bench perf``: unipeft and Hugging Face PEFT measured in one process, side by side.

Every figure is measured for both libraries on copies of one model (same weights, same
inputs), in interleaved rounds: each round runs every variant of a section once, starting
from a different variant each round, after warm-up rounds; the figure is the median over the
rounds. On CUDA a run is timed with CUDA events and a synchronize, on the CPU with
``time.perf_counter``.

Sections:

* training step (forward, backward, AdamW step; the same loss for every variant): the
  frozen-base *floor* (every weight frozen, the embedding output made to require grad, so
  backward runs through every layer but computes no weight gradient and nothing is
  optimised), full fine-tuning, LoRA on q,v, LoRA on every linear layer, DoRA on every
  linear layer; peak memory on CUDA;
* inference: the base, LoRA unmerged and merged, and the time to merge;
* mixed batch: 8 adapters loaded, sample ``i`` through adapter ``i``, against the same
  model's single-adapter forward;
* open_clip: LoRA on the image tower's ``nn.MultiheadAttention`` against the plain tower;
* apply: ``unipeft.apply`` against ``peft.get_peft_model``.

Before timing LoRA, both libraries get the same factors (``B`` randomised, since it starts
at zero) and their outputs are compared; the largest difference is part of the result.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from statistics import median
from typing import Any

import torch
from torch import Tensor, nn

import unipeft
from unipeft.errors import UnipeftError
from unipeft.model import DeltaModel, site_key

__all__ = [
    "FULL_TARGETS",
    "QUICK_TARGETS",
    "PeftMissingError",
    "PerfConfig",
    "full_config",
    "quick_config",
    "report_sections",
    "require_peft",
    "run_perf",
]

GIB = 2**30
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
    seed: int = 0
    sections: tuple[str, ...] = (
        "train",
        "inference",
        "mixed",
        "open_clip",
        "apply",
        "cuda_graphs",  # CUDA only
    )
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
    )


# ================================================================================ targets


@dataclass(frozen=True)
class Target:
    figure: str
    quantity: str
    limit: float
    text: str


FULL_TARGETS = (
    Target("train_step_lora_all_linear", "unipeft_to_floor", 1.10, "LoRA all-linear step / floor"),
    Target(
        "train_step_lora_all_linear",
        "unipeft_peak_to_floor",
        1.15,
        "LoRA all-linear peak memory / floor",
    ),
    Target("train_step_dora_all_linear", "unipeft_to_unipeft_lora", 1.25, "DoRA step / LoRA step"),
    Target("inference_unmerged", "unipeft_to_base", 1.10, "unmerged LoRA inference / base"),
    Target("mixed_batch", "unipeft_mixed_to_single", 1.30, "mixed batch of 8 / single adapter"),
    Target("open_clip_mha_lora", "unipeft_to_base", 1.15, "open_clip MHA LoRA forward / base"),
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
)


def _check_targets(profile: str, figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for t in FULL_TARGETS if profile == "full" else QUICK_TARGETS:
        value = figures.get(t.figure, {}).get(t.quantity)
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


# ================================================================================= timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _run_once(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """Seconds one call of ``fn`` takes (CUDA events on the GPU, perf_counter on the CPU),
    and seconds until the call returned to Python (on CUDA, before the synchronize: when
    that is as long as the device time, the host's launches set the pace)."""
    if device == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000, host
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    return elapsed, elapsed


def time_interleaved(
    variants: dict[str, Callable[[], Any]],
    *,
    device: str,
    warmup: int,
    repeats: int,
    host: dict[str, float] | None = None,
) -> dict[str, float]:
    """Median milliseconds per call of each variant. Every round calls each variant once,
    starting one variant later than the round before, so slow drift and ordering effects
    fall on every variant alike. ``host`` receives the median milliseconds until each call
    returned to Python."""
    names = list(variants)
    if not names:
        return {}
    for _ in range(warmup):
        for name in names:
            variants[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    returned: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, back = _run_once(variants[name], device)
            times[name].append(elapsed)
            returned[name].append(back)
    if host is not None:
        host.update({name: 1000 * median(ts) for name, ts in returned.items()})
    return {name: 1000 * median(ts) for name, ts in times.items()}


def _wall(fn: Callable[[], Any], device: str) -> float:
    """Seconds of ``fn`` by the wall clock, the device synchronized before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer | None) -> int:
    """Bytes that stay allocated between steps: parameters, buffers, optimizer state."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    if opt is not None:
        tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)]
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _peak_bytes(fn: Callable[[], Any], resident: int) -> int:
    """Peak CUDA memory of one call of ``fn`` as if its model were alone on the device:
    the allocation peak above what was allocated before the call, plus ``resident``."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before + resident


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


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
    from unipeft.zoo import load_minilm, minilm_path

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
            "init": f"pretrained all-MiniLM-L6-v2 from {minilm_path()}",
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
        for site in um.adapters[name].sites:
            b = um.deltas[name][site_key(site)].B
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
            delta = um.deltas[uname][site_key(site)]
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


# ============================================================================== sections


def _train_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Training step and peak memory of every variant, interleaved."""
    dev = cfg.device
    models: dict[str, nn.Module] = {}
    opts: dict[str, torch.optim.Optimizer | None] = {}
    notes: dict[str, str] = {}

    def fresh() -> nn.Module:
        return copy.deepcopy(work.model)

    floor = fresh().train()
    floor.requires_grad_(False)
    floor.get_input_embeddings().register_forward_hook(_input_grad_hook)
    models["floor"], opts["floor"] = floor, None

    full = fresh().train()
    full.requires_grad_(True)
    models["full"] = full

    agree: dict[str, dict[str, float]] = {}
    for tag, targets in (("qv", work.qv), ("all", work.all_linear)):
        um = _unipeft_lora(fresh(), cfg, targets)
        pm = _peft_lora(fresh(), cfg, targets)
        _randomise(um, ADAPTER, cfg.seed)
        _copy_lora(um, ADAPTER, pm, ADAPTER)
        agree[tag] = _agreement(um, pm, work.inputs, base=floor)
        models[f"unipeft_lora_{tag}"], models[f"peft_lora_{tag}"] = um, pm
        if tag == "all":
            pn = _peft_lora(fresh(), cfg, targets, autocast=False)
            _copy_lora(um, ADAPTER, pn, ADAPTER)
            agree["all_native"] = _agreement(um, pn, work.inputs)
            models["peft_native_lora_all"] = pn

    try:
        models["unipeft_dora"] = _unipeft_lora(fresh(), cfg, work.all_linear, method=DORA)
    except Exception as exc:  # the method is optional: report, do not fail
        notes["unipeft_dora"] = f"unipeft DoRA not available: {type(exc).__name__}: {exc}"
    try:
        models["peft_dora"] = _peft_lora(fresh(), cfg, work.all_linear, use_dora=True)
    except Exception as exc:
        notes["peft_dora"] = f"PEFT DoRA failed: {type(exc).__name__}: {exc}"

    steps: dict[str, Callable[[], None]] = {}
    for name, model in models.items():
        model.train()
        if name != "floor":
            params = [p for p in model.parameters() if p.requires_grad]
            opts[name] = torch.optim.AdamW(params, lr=1e-5)
        steps[name] = _train_step(model, opts[name], work)

    progress(f"{work.name}: timing {len(steps)} training-step variants")
    ms = time_interleaved(
        steps,
        device=dev,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        host=host.setdefault(f"{work.name}_train_step", {}),
    )
    peak: dict[str, int | None] = dict.fromkeys(steps)
    if dev == "cuda":
        for name, step in steps.items():
            peak[name] = _peak_bytes(step, _state_bytes(models[name], opts[name]))
    trainable = {name: _trainable(m) for name, m in models.items()}
    del steps, models, opts, floor, full
    _free(dev)
    return _train_figures(work.name, ms, peak, trainable, agree, notes)


def _train_step(
    model: nn.Module, opt: torch.optim.Optimizer | None, work: Workload
) -> Callable[[], None]:
    def step() -> None:
        loss = work.loss(model(**work.train_inputs))
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _pair(
    ms: dict[str, float],
    peak: dict[str, int | None],
    u: str,
    p: str,
    ref: str,
    ref_name: str,
) -> dict[str, Any]:
    """The keys of a unipeft-vs-PEFT training figure, ratios from the stored figures."""
    u_ms, p_ms, ref_ms = ms.get(u), ms.get(p), ms[ref]
    u_pk, p_pk, ref_pk = _gib(peak.get(u)), _gib(peak.get(p)), _gib(peak[ref])
    return {
        "unipeft_ms": u_ms,
        "peft_ms": p_ms,
        "unipeft_to_peft": _ratio(u_ms, p_ms),
        f"unipeft_to_{ref_name}": _ratio(u_ms, ref_ms),
        f"peft_to_{ref_name}": _ratio(p_ms, ref_ms),
        "unipeft_peak_gib": u_pk,
        "peft_peak_gib": p_pk,
        f"unipeft_peak_to_{ref_name}": _ratio(u_pk, ref_pk),
        f"peft_peak_to_{ref_name}": _ratio(p_pk, ref_pk),
    }


def _train_figures(
    prefix: str,
    ms: dict[str, float],
    peak: dict[str, int | None],
    trainable: dict[str, int],
    agree: dict[str, dict[str, float]],
    notes: dict[str, str],
) -> dict[str, Any]:
    pre = "" if prefix == "llama" else f"{prefix}_"
    mem_note = (
        {}
        if peak["floor"] is not None
        else {"memory_note": "peak memory is measured on CUDA only; null on the CPU"}
    )
    floor_pk = _gib(peak["floor"])
    figs: dict[str, Any] = {
        f"{pre}train_step_floor": {
            "what": "frozen base: forward + backward to the activations (the embedding output "
            "requires grad), no weight gradient, no optimizer",
            "ms": ms["floor"],
            "peak_gib": floor_pk,
            **mem_note,
        },
        f"{pre}train_step_full": {
            "what": "full fine-tuning: forward + backward + AdamW step over every weight",
            "ms": ms["full"],
            "to_floor": _ratio(ms["full"], ms["floor"]),
            "peak_gib": _gib(peak["full"]),
            "peak_to_floor": _ratio(_gib(peak["full"]), floor_pk),
            "trainable": trainable["full"],
            **mem_note,
        },
    }
    for tag, key, what in (
        ("qv", "lora_qv", "LoRA r=16 on q,v"),
        ("all", "lora_all_linear", "LoRA r=16 on every linear layer of the blocks"),
    ):
        fig = {
            "what": f"{what}: forward + backward + AdamW step",
            **_pair(ms, peak, f"unipeft_lora_{tag}", f"peft_lora_{tag}", "floor", "floor"),
            "unipeft_trainable": trainable[f"unipeft_lora_{tag}"],
            "peft_trainable": trainable[f"peft_lora_{tag}"],
            "agreement": agree[tag],
            **mem_note,
        }
        if tag == "all":
            native = "peft_native_lora_all"
            fig.update(
                {
                    "peft_native_dtype_ms": ms[native],
                    "unipeft_to_peft_native_dtype": _ratio(ms["unipeft_lora_all"], ms[native]),
                    "peft_native_dtype_to_floor": _ratio(ms[native], ms["floor"]),
                    "peft_native_dtype_peak_gib": _gib(peak[native]),
                    "agreement_native_dtype": agree["all_native"],
                    "peft_note": "peft_*: PEFT's defaults (autocast_adapter_dtype=True keeps "
                    "adapter weights in fp32 on a bf16 model); peft_native_dtype_*: "
                    "autocast_adapter_dtype=False (adapters in the model's dtype)",
                }
            )
        figs[f"{pre}train_step_{key}"] = fig
    dora = {
        "what": "DoRA r=16 on every linear layer: forward + backward + AdamW step",
        **_pair(ms, peak, "unipeft_dora", "peft_dora", "floor", "floor"),
        "unipeft_to_unipeft_lora": _ratio(ms.get("unipeft_dora"), ms["unipeft_lora_all"]),
        "peft_to_peft_lora": _ratio(ms.get("peft_dora"), ms["peft_lora_all"]),
        **mem_note,
    }
    if notes:
        dora["note"] = "; ".join(notes.values())
    figs[f"{pre}train_step_dora_all_linear"] = dora
    return figs


def _inference_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Base, LoRA unmerged and merged (both libraries), and the time a merge takes."""
    dev = cfg.device
    base = copy.deepcopy(work.model).eval()
    u_un = _unipeft_lora(copy.deepcopy(work.model), cfg, work.all_linear).eval()
    p_un = _peft_lora(copy.deepcopy(work.model), cfg, work.all_linear).eval()
    u_m = _unipeft_lora(copy.deepcopy(work.model), cfg, work.all_linear).eval()
    p_m = _peft_lora(copy.deepcopy(work.model), cfg, work.all_linear).eval()
    _randomise(u_un, ADAPTER, cfg.seed)
    _copy_unipeft(u_un, u_m, ADAPTER)
    _copy_lora(u_un, ADAPTER, p_un, ADAPTER)
    _copy_lora(u_un, ADAPTER, p_m, ADAPTER)
    unmerged_agree = _agreement(u_un, p_un, work.inputs, base=base)

    progress(f"{work.name}: timing merges")
    merge_s: dict[str, list[float]] = {"unipeft": [], "peft": []}
    for i in range(cfg.merge_repeats):
        if i:
            u_m.unmerge()
            p_m.unmerge_adapter()
        merge_s["unipeft"].append(_wall(u_m.merge, dev))
        merge_s["peft"].append(_wall(p_m.merge_adapter, dev))
    merged_agree = {
        "unipeft_merged_vs_unmerged": _agreement(u_m, u_un, work.inputs)["max_abs_diff"],
        "peft_merged_vs_unmerged": _agreement(p_m, p_un, work.inputs)["max_abs_diff"],
        "unipeft_merged_vs_peft_merged": _agreement(u_m, p_m, work.inputs)["max_abs_diff"],
    }

    def forward(model: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(**work.inputs)

        return run

    progress(f"{work.name}: timing inference")
    ms = time_interleaved(
        {
            "base": forward(base),
            "unipeft_unmerged": forward(u_un),
            "peft_unmerged": forward(p_un),
            "unipeft_merged": forward(u_m),
            "peft_merged": forward(p_m),
        },
        device=dev,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        host=host.setdefault(f"{work.name}_inference", {}),
    )
    del base, u_un, p_un, u_m, p_m
    _free(dev)
    figs: dict[str, Any] = {
        "inference_base": {"what": "the plain model, no_grad", "ms": ms["base"]}
    }
    for kind, agree in (("unmerged", unmerged_agree), ("merged", merged_agree)):
        u, p = ms[f"unipeft_{kind}"], ms[f"peft_{kind}"]
        figs[f"inference_{kind}"] = {
            "what": f"LoRA r=16 on every linear layer, {kind}, no_grad",
            "unipeft_ms": u,
            "peft_ms": p,
            "unipeft_to_peft": _ratio(u, p),
            "unipeft_to_base": _ratio(u, ms["base"]),
            "peft_to_base": _ratio(p, ms["base"]),
            "agreement": agree,
        }
    u_merge, p_merge = 1000 * median(merge_s["unipeft"]), 1000 * median(merge_s["peft"])
    figs["merge_time"] = {
        "what": "unipeft merge() vs PEFT merge_adapter(), LoRA on every linear layer "
        "(wall clock, device synchronized)",
        "unipeft_ms": u_merge,
        "peft_ms": p_merge,
        "unipeft_to_peft": _ratio(u_merge, p_merge),
        "repeats": cfg.merge_repeats,
    }
    return figs


def _mixed_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """``cfg.adapters`` LoRA adapters loaded; sample ``i`` uses adapter ``i``."""
    dev = cfg.device
    names = [f"a{i}" for i in range(cfg.adapters)]
    um = _unipeft_lora(copy.deepcopy(work.model), cfg, work.all_linear, name=names[0])
    pm = _peft_lora(copy.deepcopy(work.model), cfg, work.all_linear, name=names[0])
    for i, name in enumerate(names):
        if i:
            um.add_adapter(
                name, "lora", r=cfg.rank, alpha=cfg.alpha, targets=work.all_linear.unipeft
            )
            pm.add_adapter(name, _peft_config(cfg, work.all_linear))
        _randomise(um, name, cfg.seed + i)
        _copy_lora(um, name, pm, name)
    um.set_active(names[0])
    pm.set_adapter(names[0])
    um.eval()
    pm.eval()
    batch = next(iter(work.inputs.values())).shape[0]
    routing = [names[i % len(names)] for i in range(batch)]
    agree = _agreement(um, pm, work.inputs, adapter_names=routing)

    def forward(model: nn.Module, **kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(**work.inputs, **kw)

        return run

    progress(f"{work.name}: timing a mixed batch of {len(names)} adapters")
    ms = time_interleaved(
        {
            "unipeft_single": forward(um),
            "unipeft_mixed": forward(um, adapter_names=routing),
            "peft_single": forward(pm),
            "peft_mixed": forward(pm, adapter_names=routing),
        },
        device=dev,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        host=host.setdefault(f"{work.name}_mixed_batch", {}),
    )
    del um, pm
    _free(dev)
    return {
        "mixed_batch": {
            "what": f"{len(names)} LoRA adapters (r=16, every linear layer) loaded; sample i "
            "uses adapter i (adapter_names=...) vs the same model with one adapter active",
            "adapters": len(names),
            "batch": batch,
            "unipeft_single_ms": ms["unipeft_single"],
            "unipeft_mixed_ms": ms["unipeft_mixed"],
            "unipeft_mixed_to_single": _ratio(ms["unipeft_mixed"], ms["unipeft_single"]),
            "peft_single_ms": ms["peft_single"],
            "peft_mixed_ms": ms["peft_mixed"],
            "peft_mixed_to_single": _ratio(ms["peft_mixed"], ms["peft_single"]),
            "unipeft_to_peft": _ratio(ms["unipeft_mixed"], ms["peft_mixed"]),
            "agreement": agree,
        }
    }


def _clip_tower(cfg: PerfConfig) -> tuple[nn.Module, dict[str, Any]]:
    from unipeft.zoo import ClipImageTower

    torch.manual_seed(cfg.seed)
    if cfg.clip_model is not None:
        import open_clip

        clip = open_clip.create_model(cfg.clip_model, pretrained=None)
        label = cfg.clip_model
        source = f"open_clip.create_model({cfg.clip_model!r}, pretrained=None).visual"
    else:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        assert cfg.clip_vision is not None
        clip = CLIP(
            embed_dim=64,
            vision_cfg=CLIPVisionCfg(**cfg.clip_vision),
            text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        )
        label = "small CLIP image tower"
        source = f"open_clip CLIP(vision_cfg=CLIPVisionCfg(**{cfg.clip_vision})).visual"
    tower = ClipImageTower(clip.visual).to(device=cfg.device, dtype=cfg.dtype).eval()
    del clip
    return tower, {"model": label, "source": source, "batch": cfg.clip_batch}


def _clip_section(
    cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """LoRA on the image tower's attention (q, k, v slices of in_proj, and out_proj)."""
    dev = cfg.device
    base, describe = _clip_tower(cfg)
    size = base.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    pixels = torch.randn(cfg.clip_batch, 3, size, size, generator=gen)
    pixels = pixels.to(device=dev, dtype=cfg.dtype)
    um = unipeft.apply(
        copy.deepcopy(base),
        "lora",
        r=cfg.rank,
        alpha=cfg.alpha,
        targets=["visual/attn.q", "visual/attn.k", "visual/attn.v", "visual/attn.out"],
    ).eval()
    _randomise(um, "default", cfg.seed)
    variants: dict[str, Callable[[], Any]] = {}
    note = None
    peft_trainable = None
    try:
        peft = require_peft()
        pm = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.alpha,
                target_modules=r"visual\.transformer\.resblocks\.\d+\.attn",
            ),
        ).eval()
        peft_trainable = _trainable(pm)
        with torch.no_grad():
            pm(pixels[:1])  # fail here, not in the timing loop
    except Exception as exc:
        note = f"PEFT could not adapt nn.MultiheadAttention: {type(exc).__name__}: {exc}"
        pm = None

    def forward(model: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(pixels)

        return run

    variants = {"base": forward(base), "unipeft": forward(um)}
    if pm is not None:
        variants["peft"] = forward(pm)
    progress(f"open_clip: timing the image tower at batch {cfg.clip_batch}")
    ms = time_interleaved(
        variants,
        device=dev,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        host=host.setdefault("open_clip", {}),
    )
    fig = {
        "what": "open_clip image tower, LoRA r=16 on attention q, k, v (slices of the MHA's "
        "in_proj) and out_proj, no_grad forward vs the plain tower",
        **describe,
        "base_ms": ms["base"],
        "unipeft_ms": ms["unipeft"],
        "peft_ms": ms.get("peft"),
        "unipeft_to_base": _ratio(ms["unipeft"], ms["base"]),
        "peft_to_base": _ratio(ms.get("peft"), ms["base"]),
        "unipeft_to_peft": _ratio(ms["unipeft"], ms.get("peft")),
        "unipeft_trainable": _trainable(um),
        "peft_trainable": peft_trainable,
        "peft_targets": "the nn.MultiheadAttention modules (PEFT puts one LoRA on the fused "
        "in_proj and one on out_proj, so its parameter count differs)",
    }
    if note:
        fig["note"] = note
    del base, um, pm, variants
    _free(dev)
    return {"open_clip_mha_lora": fig}


def _capture(fn: Callable[[], Any], warmup: int) -> Callable[[], None]:
    """``fn`` captured as one CUDA graph; the returned callable replays it."""
    from ..training.graphs import capture

    return capture(fn, warmup)[0].replay


def _graph_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """The training step and the unmerged forward captured as CUDA graphs, so the host's
    kernel launches drop out and what is left is device time: frozen-base floor, LoRA on
    every linear layer (both libraries), unipeft's DoRA; base and unmerged LoRA inference.
    AdamW runs with ``capturable=True`` inside the graph."""
    if cfg.device != "cuda":
        return {}
    steps: dict[str, Callable[[], None]] = {}
    forwards: dict[str, Callable[[], None]] = {}
    notes: dict[str, str] = {}
    keep: list[Any] = []

    def fresh() -> nn.Module:
        return copy.deepcopy(work.model)

    def train(model: nn.Module) -> Callable[[], None]:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, capturable=True) if params else None
        keep.append((model, opt))

        def step() -> None:
            if opt is not None:  # backward creates the gradients inside the graph
                opt.zero_grad(set_to_none=True)
            work.loss(model(**work.train_inputs)).backward()
            if opt is not None:
                opt.step()

        return step

    def infer(model: nn.Module) -> Callable[[], None]:
        model.eval()
        keep.append(model)

        def run() -> None:
            with torch.no_grad():
                model(**work.inputs)

        return run

    builders: dict[str, Callable[[], nn.Module]] = {
        "floor": lambda: _frozen_floor(fresh()),
        "unipeft_lora": lambda: _randomised(_unipeft_lora(fresh(), cfg, work.all_linear), cfg),
        "peft_lora": lambda: _peft_lora(fresh(), cfg, work.all_linear),
        "unipeft_dora": lambda: _unipeft_lora(fresh(), cfg, work.all_linear, method=DORA),
    }
    progress(f"{work.name}: capturing CUDA graphs")
    for name, build in builders.items():
        try:
            steps[name] = _capture(train(build()), cfg.warmup + 1)
        except Exception as exc:  # report, do not fail: capture is a property of the code
            notes[f"train_{name}"] = f"capture failed: {type(exc).__name__}: {exc}"
    infer_builders: dict[str, Callable[[], nn.Module]] = {
        "base": fresh,
        "unipeft_lora": builders["unipeft_lora"],
        "peft_lora": builders["peft_lora"],
    }
    for name, build in infer_builders.items():
        try:
            forwards[name] = _capture(infer(build()), cfg.warmup + 1)
        except Exception as exc:
            notes[f"inference_{name}"] = f"capture failed: {type(exc).__name__}: {exc}"
    progress(f"{work.name}: timing graph replays")
    t = time_interleaved(steps, device=cfg.device, warmup=cfg.warmup, repeats=cfg.repeats)
    i = time_interleaved(forwards, device=cfg.device, warmup=cfg.warmup, repeats=cfg.repeats)
    # (an empty dict of variants, every capture failed, times nothing)
    steps.clear()
    forwards.clear()
    keep.clear()
    _free(cfg.device)
    floor, base = t.get("floor"), i.get("base")
    return {
        "train_step_cuda_graph": {
            "what": "the training step (forward, backward, AdamW with capturable=True) of LoRA "
            "r=16 on every linear layer, captured as one CUDA graph and replayed: device "
            "time without the host's launches",
            "floor_ms": floor,
            "unipeft_ms": t.get("unipeft_lora"),
            "peft_ms": t.get("peft_lora"),
            "unipeft_dora_ms": t.get("unipeft_dora"),
            "unipeft_to_floor": _ratio(t.get("unipeft_lora"), floor),
            "peft_to_floor": _ratio(t.get("peft_lora"), floor),
            "unipeft_to_peft": _ratio(t.get("unipeft_lora"), t.get("peft_lora")),
            "unipeft_dora_to_unipeft_lora": _ratio(t.get("unipeft_dora"), t.get("unipeft_lora")),
            "notes": {k: v for k, v in notes.items() if k.startswith("train_")},
        },
        "inference_unmerged_cuda_graph": {
            "what": "the no-grad forward of the base and of unmerged LoRA on every linear "
            "layer, captured as one CUDA graph and replayed",
            "base_ms": base,
            "unipeft_ms": i.get("unipeft_lora"),
            "peft_ms": i.get("peft_lora"),
            "unipeft_to_base": _ratio(i.get("unipeft_lora"), base),
            "peft_to_base": _ratio(i.get("peft_lora"), base),
            "unipeft_to_peft": _ratio(i.get("unipeft_lora"), i.get("peft_lora")),
            "notes": {k: v for k, v in notes.items() if k.startswith("inference_")},
        },
    }


def _frozen_floor(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(_input_grad_hook)
    return model


def _randomised(model: DeltaModel, cfg: PerfConfig) -> DeltaModel:
    _randomise(model, ADAPTER, cfg.seed)
    return model


def _apply_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """unipeft.apply vs peft.get_peft_model on fresh copies of the big model."""
    dev = cfg.device
    progress(f"{work.name}: timing apply ({cfg.apply_repeats} fresh copies each)")
    appliers: dict[str, Callable[[nn.Module], Any]] = {
        "unipeft": lambda m: _unipeft_lora(m, cfg, work.all_linear),
        "peft": lambda m: _peft_lora(m, cfg, work.all_linear),
    }
    times: dict[str, list[float]] = {lib: [] for lib in appliers}
    for _ in range(cfg.apply_repeats):
        for lib, apply_to in appliers.items():
            fresh = copy.deepcopy(work.model)
            _sync(dev)
            t0 = time.perf_counter()
            wrapped = apply_to(fresh)
            _sync(dev)
            times[lib].append(time.perf_counter() - t0)
            del wrapped, fresh
            _free(dev)
    u, p = median(times["unipeft"]), median(times["peft"])
    return {
        "apply_time": {
            "what": "unipeft.apply vs peft.get_peft_model, LoRA r=16 on every linear layer, "
            "on a fresh copy of the model each time (wall clock, device synchronized)",
            "unipeft_s": u,
            "peft_s": p,
            "unipeft_to_peft": _ratio(u, p),
            "repeats": cfg.apply_repeats,
        }
    }


# ==================================================================================== run


def environment(device: str) -> dict[str, Any]:
    import transformers

    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "unipeft": unipeft.__version__,
    }
    for lib in ("peft", "open_clip"):
        try:
            versions[lib] = __import__(lib).__version__
        except Exception:
            versions[lib] = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        **versions,
        "device": device,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": sys.platform,
    }


def _measure(
    cfg: PerfConfig,
    say: Progress,
    figures: dict[str, Any],
    notes: list[str],
    host: dict[str, dict[str, float]],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run the sections of ``cfg`` into ``figures`` (host-side times into ``host``);
    return the descriptions of the models."""
    with _quiet():
        described: dict[str, Any] = {}
        llama_sections = {
            "train": _train_section,
            "inference": _inference_section,
            "mixed": _mixed_section,
            "apply": _apply_section,
            "cuda_graphs": _graph_section,
        }
        if set(llama_sections) & set(cfg.sections):
            say(f"building the Llama ({cfg.profile} configuration, {cfg.device})")
            llama = _llama_workload(cfg)
            for name, section in llama_sections.items():
                if name in cfg.sections:
                    figures.update(section(llama, cfg, say, host))
            described = llama.describe
            del llama
            _free(cfg.device)
        minilm_info: dict[str, Any] | None = None
        if cfg.minilm and "train" in cfg.sections:
            try:
                minilm = _minilm_workload(cfg)
            except Exception as exc:
                notes.append(f"MiniLM figures skipped: {type(exc).__name__}: {exc}")
            else:
                minilm_info = minilm.describe
                figures.update(_train_section(minilm, cfg, say, host))
                del minilm
                _free(cfg.device)
        if "open_clip" in cfg.sections:
            figures.update(_clip_section(cfg, say, host))
    return described, minilm_info


def run_perf(cfg: PerfConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every section of ``cfg``; return the JSON-ready result."""
    require_peft()
    say = progress or (lambda _msg: None)
    figures: dict[str, Any] = {}
    notes: list[str] = []
    host: dict[str, dict[str, float]] = {}
    previous_threads = torch.get_num_threads()
    threads = cfg.threads or (1 if cfg.device == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    torch_threads = torch.get_num_threads()
    if cfg.device == "cpu" and cfg.threads is None:
        notes.append(
            "CPU timings use one intra-op thread: on a CPU shared with other work, several "
            "threads wait on each other and single runs swing by 10x or more"
        )
    try:
        models = _measure(cfg, say, figures, notes, host)
    finally:
        torch.set_num_threads(previous_threads)
    described, minilm_info = models
    config = asdict(cfg)
    config.pop("llama")
    config.update(
        model=described,
        minilm=minilm_info,
        dtype=str(cfg.dtype).removeprefix("torch."),
        sections=list(cfg.sections),
        threads=torch_threads,
        lora={"r": cfg.rank, "alpha": cfg.alpha, "dropout": 0.0, "B": "randomised, N(0, 0.05²)"},
        peft_defaults="PEFT runs with its defaults: autocast_adapter_dtype=True keeps adapter "
        "weights in fp32 on a bf16 model (the all-linear training step is also measured with "
        "autocast_adapter_dtype=False)",
        timer="torch.cuda.Event + synchronize" if cfg.device == "cuda" else "time.perf_counter",
        host_ms="on CUDA, per section and variant: median ms until a call returned to Python, "
        "before the synchronize; close to the device time when the host's kernel launches set "
        "the pace or the call waits on the device inside",
        statistic=f"median of {cfg.repeats} interleaved rounds after {cfg.warmup} warm-up "
        + ("round" if cfg.warmup == 1 else "rounds"),
    )
    return {
        "environment": environment(cfg.device),
        "config": config,
        "figures": figures,
        "targets": _check_targets(cfg.profile, figures),
        "notes": notes,
        # on the CPU a call's time is all host time: only CUDA runs report it apart
        "host_ms": host if cfg.device == "cuda" else None,
    }


# ================================================================================ report


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _gb(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} GiB"


def _both(a: float | None, b: float | None) -> str:
    return "—" if a is None and b is None else f"{_x(a)} / {_x(b)}"


@dataclass
class Row:
    """One line of a report table; every cell already formatted."""

    figure: str
    unipeft: str = "—"
    peft: str = "—"
    ratio: str = "—"  # unipeft / peft
    to_ref: str = "—"  # each library's figure / the section's reference: "unipeft / peft"
    target: str = ""
    met: str = ""


@dataclass
class Section:
    title: str
    ref: str  # what the to_ref column divides by: floor, base, single ("" for none)
    rows: list[Row]


_TARGET_UNITS = {
    "unipeft_to_floor": "× floor",
    "unipeft_peak_to_floor": "× floor",
    "unipeft_to_peft": "× peft",
    "unipeft_to_base": "× base",
    "unipeft_mixed_to_single": "× single",
    "unipeft_to_unipeft_lora": "× LoRA",
    "unipeft_s": " s",
}


def report_sections(result: dict[str, Any]) -> list[Section]:
    """The human-readable tables of a result from :func:`run_perf`."""
    figs = result["figures"]
    targets = {(t["figure"], t["quantity"]): t for t in result["targets"]}

    def row(figure: str, *quantities: str, **cells: str) -> Row:
        out = Row(figure=cells.pop("label"), **cells)
        for q in quantities:
            t = targets.get((figure, q))
            if t is not None:
                out.target = f"≤ {t['limit']:g}{_TARGET_UNITS.get(q, '')}"
                out.met = "n/a" if t["met"] is None else "met" if t["met"] else "missed"
        return out

    def pair(name: str, label: str, ref: str, *quantities: str) -> Row:
        f = figs[name]
        return row(
            name,
            *quantities,
            label=label,
            unipeft=_ms(f["unipeft_ms"]),
            peft=_ms(f["peft_ms"]),
            ratio=_x(f["unipeft_to_peft"]),
            to_ref=_both(f[f"unipeft_to_{ref}"], f[f"peft_to_{ref}"]),
        )

    def agreement(diff: float) -> Row:
        return Row("  max |Δ output|", f"{diff:.1e}")

    sections: list[Section] = []
    for pre, model in (("", "Llama"), ("minilm_", "MiniLM")):
        floor = figs.get(f"{pre}train_step_floor")
        if floor is None:
            continue
        memory = floor["peak_gib"] is not None
        full = figs[f"{pre}train_step_full"]
        rows = [
            Row("frozen-base floor", _ms(floor["ms"]), to_ref="1.00×"),
            Row("full fine-tuning", _ms(full["ms"]), to_ref=_x(full["to_floor"])),
        ]
        if memory:
            rows[1:1] = [Row("  peak memory", _gb(floor["peak_gib"]), to_ref="1.00×")]
            rows.append(
                Row("  peak memory", _gb(full["peak_gib"]), to_ref=_x(full["peak_to_floor"]))
            )
        for key, label in (("lora_qv", "LoRA q,v"), ("lora_all_linear", "LoRA all linear")):
            name = f"{pre}train_step_{key}"
            f = figs[name]
            rows.append(pair(name, label, "floor", "unipeft_to_floor", "unipeft_to_peft"))
            if memory:
                rows.append(
                    row(
                        name,
                        "unipeft_peak_to_floor",
                        label="  peak memory",
                        unipeft=_gb(f["unipeft_peak_gib"]),
                        peft=_gb(f["peft_peak_gib"]),
                        ratio=_x(_ratio(f["unipeft_peak_gib"], f["peft_peak_gib"])),
                        to_ref=_both(f["unipeft_peak_to_floor"], f["peft_peak_to_floor"]),
                    )
                )
            if "peft_native_dtype_ms" in f:
                rows.append(
                    Row(
                        "  peft, autocast off",
                        _ms(f["unipeft_ms"]),
                        _ms(f["peft_native_dtype_ms"]),
                        _x(f["unipeft_to_peft_native_dtype"]),
                        _both(f["unipeft_to_floor"], f["peft_native_dtype_to_floor"]),
                    )
                )
            rows.append(agreement(f["agreement"]["max_abs_diff"]))
        name = f"{pre}train_step_dora_all_linear"
        d = figs[name]
        rows.append(pair(name, "DoRA all linear", "floor"))
        rows.append(
            row(
                name,
                "unipeft_to_unipeft_lora",
                label="  DoRA step / own LoRA step",
                unipeft=_x(d["unipeft_to_unipeft_lora"]),
                peft=_x(d["peft_to_peft_lora"]),
            )
        )
        sections.append(Section(f"training step, {model}", "floor", rows))

    if "inference_base" in figs:
        m = figs["merge_time"]
        rows = [
            Row("base", _ms(figs["inference_base"]["ms"]), to_ref="1.00×"),
            pair("inference_unmerged", "LoRA all linear, unmerged", "base", "unipeft_to_base"),
            pair("inference_merged", "LoRA all linear, merged", "base", "unipeft_to_base"),
            Row("time to merge", _ms(m["unipeft_ms"]), _ms(m["peft_ms"]), _x(m["unipeft_to_peft"])),
            agreement(figs["inference_unmerged"]["agreement"]["max_abs_diff"]),
        ]
        sections.append(Section("inference, Llama", "base", rows))

    if "mixed_batch" in figs:
        f = figs["mixed_batch"]
        rows = [
            Row(
                "one adapter active",
                _ms(f["unipeft_single_ms"]),
                _ms(f["peft_single_ms"]),
                _x(_ratio(f["unipeft_single_ms"], f["peft_single_ms"])),
                "1.00× / 1.00×",
            ),
            row(
                "mixed_batch",
                "unipeft_mixed_to_single",
                label=f"sample i → adapter i, {f['adapters']} adapters",
                unipeft=_ms(f["unipeft_mixed_ms"]),
                peft=_ms(f["peft_mixed_ms"]),
                ratio=_x(f["unipeft_to_peft"]),
                to_ref=_both(f["unipeft_mixed_to_single"], f["peft_mixed_to_single"]),
            ),
            agreement(f["agreement"]["max_abs_diff"]),
        ]
        sections.append(Section("mixed batch, Llama", "single", rows))

    if "open_clip_mha_lora" in figs:
        f = figs["open_clip_mha_lora"]
        rows = [
            Row("base image tower", _ms(f["base_ms"]), to_ref="1.00×"),
            row(
                "open_clip_mha_lora",
                "unipeft_to_base",
                label="LoRA on attention q,k,v,out",
                unipeft=_ms(f["unipeft_ms"]),
                peft=_ms(f["peft_ms"]) if f["peft_ms"] is not None else "failed (see note)",
                ratio=_x(f["unipeft_to_peft"]),
                to_ref=_both(f["unipeft_to_base"], f["peft_to_base"]),
            ),
        ]
        sections.append(Section(f"open_clip, {f['model']}, batch {f['batch']}", "base", rows))

    if "train_step_cuda_graph" in figs:
        f, g = figs["train_step_cuda_graph"], figs["inference_unmerged_cuda_graph"]
        rows = [
            Row("training step: frozen-base floor", _ms(f["floor_ms"]), to_ref="1.00×"),
            Row(
                "  LoRA all linear",
                _ms(f["unipeft_ms"]),
                _ms(f["peft_ms"]),
                _x(f["unipeft_to_peft"]),
                _both(f["unipeft_to_floor"], f["peft_to_floor"]),
            ),
            Row(
                "  DoRA all linear (÷ own LoRA)",
                _ms(f["unipeft_dora_ms"]),
                to_ref=_x(f["unipeft_dora_to_unipeft_lora"]),
            ),
            Row("inference: base", _ms(g["base_ms"]), to_ref="1.00×"),
            Row(
                "  LoRA all linear, unmerged",
                _ms(g["unipeft_ms"]),
                _ms(g["peft_ms"]),
                _x(g["unipeft_to_peft"]),
                _both(g["unipeft_to_base"], g["peft_to_base"]),
            ),
        ]
        sections.append(Section("CUDA graphs (device time), Llama", "floor / base", rows))

    if "apply_time" in figs:
        f = figs["apply_time"]
        rows = [
            row(
                "apply_time",
                "unipeft_s",
                label="apply LoRA all linear",
                unipeft=f"{f['unipeft_s']:.3f} s",
                peft=f"{f['peft_s']:.3f} s",
                ratio=_x(f["unipeft_to_peft"]),
            )
        ]
        sections.append(Section("apply, Llama", "", rows))
    return sections
