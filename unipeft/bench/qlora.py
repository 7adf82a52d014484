"""``unipeft bench qlora``: QLoRA training steps, unipeft beside Hugging Face PEFT.

One Llama-shaped model with random weights (the shape of ``unipeft bench perf``'s Llama, or
Llama-3-8B's) has its decoder Linear layers quantized to 4-bit NF4 with double quantization
and bf16 compute (bitsandbytes ``Linear4bit``), the rest upcast to float32 as PEFT's
``prepare_model_for_kbit_training`` does, and LoRA r=16 on all seven projections (q, k, v,
o, gate, up, down) in float32, trained with AdamW under bf16 autocast. The same model is
built twice in the same process, once per library, one after the other: unipeft
(:func:`unipeft.quantization.prepare_quantized` + :func:`unipeft.apply`) and PEFT
(``prepare_model_for_kbit_training`` + ``get_peft_model``). Per library: the median step
time over the timed steps (each ended by ``torch.cuda.synchronize``), tokens per second,
and ``torch.cuda.max_memory_allocated`` over the steps (reset after building) and the
memory allocated after building, both above what was allocated before the build (nothing of
the other library's run is counted). ``quick``: a tiny model on the CPU with float32
compute, for the test suite.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from statistics import median
from typing import Any

import torch
from torch import nn

from .perf_setup import FULL_LLAMA, QUICK_LLAMA
from .shapes import LLAMA3_8B, TINY_LLAMA

GIB = 2**30
ROLES = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.gate", "mlp.up", "mlp.down")
PEFT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = TINY_LLAMA
MODELS = {"llama": FULL_LLAMA, "8b": LLAMA3_8B, "quick": QUICK_LLAMA, "tiny": TINY}
LIBRARIES = ("unipeft", "peft")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class QloraConfig:
    model: str = "llama"  # a key of MODELS
    layers: int | None = None  # fewer decoder layers than the shape has
    device: str = "cuda"
    batch: int = 8
    length: int = 512
    steps: int = 10  # timed
    warmup: int = 3  # untimed, first
    rank: int = 16
    alpha: float = 32.0
    lr: float = 1e-4
    quant_type: str = "nf4"
    double_quant: bool = True
    gradient_checkpointing: bool = False
    libraries: tuple[str, ...] = LIBRARIES
    seed: int = 0
    llama: dict[str, int] = field(default_factory=dict)  # filled by make_config

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32


def make_config(
    *,
    quick: bool = False,
    model: str | None = None,
    device: str | None = None,
    **overrides: Any,
) -> QloraConfig:
    """The configuration: ``quick`` is a tiny Llama on the CPU, two timed steps."""
    from ..contract.errors import ConfigError

    name = model or ("tiny" if quick else "llama")
    if name not in MODELS:
        raise ConfigError(f"model {name!r}: choose one of {', '.join(MODELS)}")
    dev = device or ("cpu" if quick or not torch.cuda.is_available() else "cuda")
    base = QloraConfig(model=name, device=dev)
    if quick:
        base = replace(base, batch=2, length=16, steps=2, warmup=1, rank=4, alpha=8.0)
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in ("libraries",):
        if isinstance(given.get(key), str):
            given[key] = tuple(s.strip() for s in given[key].split(",") if s.strip())
    bad = [lib for lib in given.get("libraries", ()) if lib not in LIBRARIES]
    if bad:
        raise ConfigError(f"libraries: unknown {bad}; choose from {', '.join(LIBRARIES)}")
    cfg = replace(base, **given)
    llama = dict(MODELS[cfg.model])
    if cfg.layers is not None:
        llama["num_hidden_layers"] = cfg.layers
    return replace(cfg, llama=llama)


def build_quantized(cfg: QloraConfig) -> nn.Module:
    """The Llama with random weights, its decoder Linear layers quantized (bitsandbytes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..quantization import quantize_linears

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        **cfg.llama, max_position_embeddings=max(cfg.length, 64), pad_token_id=0,
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )  # fmt: skip
    with torch.device(cfg.device):
        model = LlamaForCausalLM(config).to(cfg.compute_dtype)
    quantize_linears(
        model,
        bits=4,
        quant_type=cfg.quant_type,
        double_quant=cfg.double_quant,
        compute_dtype=cfg.compute_dtype,
        device=cfg.device,
    )
    if cfg.device == "cpu":  # keep bitsandbytes' standard layout (no in-place CPU re-pack)
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model


def _unipeft(cfg: QloraConfig, model: nn.Module) -> nn.Module:
    import unipeft
    from unipeft.quantization import prepare_quantized

    prepare_quantized(model, upcast="all", gradient_checkpointing=cfg.gradient_checkpointing)
    dm = unipeft.apply(model, "lora", r=cfg.rank, alpha=cfg.alpha, targets=list(ROLES))
    dm.deltas.float()  # LoRA in float32 beside the bf16 compute, as PEFT keeps it
    return dm


def _peft(cfg: QloraConfig, model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=cfg.gradient_checkpointing
    )
    config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(PEFT_MODULES),
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(cfg: QloraConfig, library: str) -> dict[str, Any]:
    """Build, wrap and train one library's model; its figures."""
    cuda = cfg.device.startswith("cuda")
    start = 0
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()  # whatever else is resident is not counted
        torch.cuda.reset_peak_memory_stats()
    model = build_quantized(cfg)
    model = _unipeft(cfg, model) if library == "unipeft" else _peft(cfg, model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    vocab = cfg.llama["vocab_size"]
    ids = torch.randint(1, vocab, (cfg.batch, cfg.length), generator=g).to(cfg.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else _null()
    _sync(cfg.device)
    built = (torch.cuda.memory_allocated() - start) / GIB if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(cfg.warmup + cfg.steps):
        _sync(cfg.device)
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(cfg.device)
        if step >= cfg.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    step_s = median(times)
    result = {
        "library": library,
        "step_s": step_s,
        "tokens_per_s": cfg.batch * cfg.length / step_s,
        "peak_gib": (torch.cuda.max_memory_allocated() - start) / GIB if cuda else None,
        "model_gib": built,
        "trainable": trainable,
        "trainable_dtypes": dtypes,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "step_times_s": times,
    }
    del model, opt, params, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run(cfg: QloraConfig | None = None, *, progress: Progress | None = None, **kw: Any) -> dict:
    """Measure every library of ``cfg`` (or ``make_config(**kw)``); the result as a dict
    (``config``, ``environment``, ``rows``, and ``ratios`` unipeft / PEFT)."""
    import bitsandbytes

    from .perf import environment

    cfg = cfg or make_config(**kw)
    say = progress or (lambda msg: None)
    rows = {}
    for library in cfg.libraries:
        say(f"{library}: {cfg.model} ({cfg.llama['num_hidden_layers']} layers), "
            f"{cfg.quant_type}, {cfg.steps} timed steps")  # fmt: skip
        rows[library] = measure(cfg, library)
    ratios: dict[str, float | None] = {}
    if {"unipeft", "peft"} <= rows.keys():
        ours, theirs = rows["unipeft"], rows["peft"]
        ratios["step_s"] = ours["step_s"] / theirs["step_s"]
        if ours["peak_gib"] is not None and theirs["peak_gib"]:
            ratios["peak_gib"] = ours["peak_gib"] / theirs["peak_gib"]
    config = asdict(cfg)
    config["compute_dtype"] = str(cfg.compute_dtype).removeprefix("torch.")
    env = environment("cuda" if cfg.device.startswith("cuda") else "cpu")
    env["bitsandbytes"] = bitsandbytes.__version__
    return {"config": config, "environment": env, "rows": rows, "ratios": ratios}


def render(result: dict) -> Any:
    """A rich table: one column per library, and unipeft / PEFT."""
    from rich.table import Table

    cfg, rows = result["config"], result["rows"]
    title = (
        f"QLoRA ({cfg['quant_type']}{', double quant' if cfg['double_quant'] else ''}, "
        f"{cfg['compute_dtype']} compute, LoRA r={cfg['rank']} on q,k,v,o,gate,up,down): "
        f"{cfg['model']} with {cfg['llama']['num_hidden_layers']} layers, batch "
        f"{cfg['batch']} x {cfg['length']} on {result['environment']['device_name']}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    libs = list(rows)
    for lib in libs:
        table.add_column(lib, justify="right")
    both = {"unipeft", "peft"} <= rows.keys()
    if both:
        table.add_column("unipeft / peft", justify="right")

    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    for key, label, spec in (
        ("step_s", "step (s, median)", ".4f"),
        ("tokens_per_s", "tokens / s", ",.0f"),
        ("peak_gib", "peak memory (GiB)", ".2f"),
        ("model_gib", "memory after building (GiB)", ".2f"),
        ("trainable", "trainable parameters", ",d"),
        ("first_loss", "loss, first step", ".4f"),
        ("last_loss", "loss, last step", ".4f"),
    ):
        cells = [fmt(rows[lib][key], spec) for lib in libs]
        if both:
            ours, theirs = rows["unipeft"][key], rows["peft"][key]
            ratio = ours / theirs if ours is not None and theirs else None
            cells.append(fmt(ratio, ".3f") if key in ("step_s", "peak_gib", "tokens_per_s") else "")
        table.add_row(label, *cells)
    return table
