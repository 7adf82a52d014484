"""``unipeft bench sweep``: how the cost of LoRA grows with the work, for unipeft and PEFT.

At every point of a grid (hidden size × sequence length × LoRA rank) the training step of a
few Llama decoder layers is timed three ways, each variant alone and at steady state
(:func:`.perf_timing.time_steady`): the frozen-base floor, unipeft's LoRA on every linear
layer and PEFT's, both holding their adapters in the model's dtype
(``autocast_adapter_dtype=False`` for PEFT) and, optionally, PEFT with its default fp32
adapters. The figure is each library's step over the floor.

:func:`run_sweep` measures, :func:`sweep_markdown` renders the table, :func:`sweep_chart`
(in :mod:`.plots`) draws the ratio against the sequence length.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import unipeft

from .perf_report import _ratio
from .perf_setup import FULL_LLAMA, LLAMA_ALL, Progress, _frozen_floor, _quiet, require_peft
from .perf_steady import train_step
from .perf_timing import adamw, optimizer_record, release, time_steady
from .shapes import LLAMA3_8B

_KEEP = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
FULL_SHAPES = (  # the 0.85B model's layers and Llama-3-8B's
    {k: FULL_LLAMA[k] for k in _KEEP},
    {**{k: LLAMA3_8B[k] for k in _KEEP}, "rope_theta": LLAMA3_8B["rope_theta"]},
)
QUICK_SHAPES = (
    {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    {
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
)
VOCAB = 1024  # only the embedding sees it: the sweep's model has no LM head


@dataclass(frozen=True)
class SweepConfig:
    """The grid and how long each variant runs; :func:`full_sweep` or :func:`quick_sweep`,
    adjusted with :func:`dataclasses.replace`."""

    profile: str  # "full" or "quick"
    device: str  # "cpu" or "cuda"
    shapes: tuple[dict[str, Any], ...]  # LlamaConfig fields of the layers, one per panel
    lengths: tuple[int, ...]
    ranks: tuple[int, ...]
    layers: int = 2
    batch: int = 1  # sequences per step: the tokens grow with the sequence length
    warmup: int = 3
    steps: int = 20
    peft_default: bool = True  # also time PEFT with its default fp32 adapters
    seed: int = 0
    threads: int | None = None  # CPU intra-op threads; None: 1 on the CPU

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32


def full_sweep(device: str = "cuda") -> SweepConfig:
    """Hidden 2048 and 4096, sequence 512 to 4096 at batch 1, ranks 8 to 128, 2 layers."""
    return SweepConfig(
        profile="full",
        device=device,
        shapes=FULL_SHAPES,
        lengths=(512, 1024, 2048, 4096),
        ranks=(8, 16, 32, 64, 128),
    )


def quick_sweep(device: str = "cpu") -> SweepConfig:
    """A CPU-sized grid that runs in seconds: tiny layers, short sequences, two ranks."""
    return SweepConfig(
        profile="quick",
        device=device,
        shapes=QUICK_SHAPES,
        lengths=(16, 32),
        ranks=(2, 8),
        layers=1,
        batch=2,
        warmup=1,
        steps=3,
    )


def _hidden_loss(out: Any) -> torch.Tensor:
    return out.last_hidden_state.float().square().mean()


class _Work:
    """What :func:`.perf_steady.train_step` needs: the inputs and the loss."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.train_inputs = {"input_ids": ids}
        self.loss = _hidden_loss


def _layers(cfg: SweepConfig, shape: dict[str, Any]) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(**shape, num_hidden_layers=cfg.layers, vocab_size=VOCAB)
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):
        model = LlamaModel(config)
    return model.to(cfg.dtype).train()


def _variants(base: nn.Module, rank: int, peft_default: bool) -> dict[str, Callable[[], Any]]:
    peft = require_peft()

    def lib_peft(autocast: bool) -> Callable[[], Any]:
        def build() -> Any:
            config = peft.LoraConfig(
                r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LLAMA_ALL.peft
            )
            return peft.get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=autocast)

        return build

    def lib_unipeft() -> Any:
        model = unipeft.apply(
            copy.deepcopy(base), "lora", r=rank, alpha=2 * rank, targets=LLAMA_ALL.unipeft
        )
        with torch.no_grad():  # B starts at zero; give it values, as the perf bench does
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        return model

    out = {"unipeft": lib_unipeft, "peft": lib_peft(False)}
    if peft_default:
        out["peft_default"] = lib_peft(True)
    return out


def _time(build: Callable[[], nn.Module], work: _Work, cfg: SweepConfig) -> float:
    model = build()
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        step = train_step(model, adamw(params) if params else None, work)  # type: ignore[arg-type]
        return time_steady(step, device=cfg.device, warmup=cfg.warmup, steps=cfg.steps)["median_ms"]
    finally:
        del model
        release(cfg.device)


def _point(
    cfg: SweepConfig, base: nn.Module, length: int, errors: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The rows of one (shape, length): the floor timed before and after the adapters."""
    hidden = base.config.hidden_size
    gen = torch.Generator().manual_seed(cfg.seed + length)
    ids = torch.randint(0, VOCAB, (cfg.batch, length), generator=gen).to(cfg.device)
    work = _Work(ids)
    where = {"hidden": hidden, "length": length}

    def floor() -> nn.Module:
        return _frozen_floor(copy.deepcopy(base))

    def timed(build: Callable[[], nn.Module], **key: Any) -> float | None:
        try:
            return _time(build, work, cfg)
        except Exception as exc:  # an out-of-memory point is a gap in the table
            errors.append({**where, **key, "error": f"{type(exc).__name__}: {exc}"[:500]})
            release(cfg.device)
            return None

    before = timed(floor, variant="floor")
    per_rank = {
        r: {
            lib: timed(b, rank=r, variant=lib)
            for lib, b in _variants(base, r, cfg.peft_default).items()
        }
        for r in cfg.ranks
    }
    after = timed(floor, variant="floor")
    runs = [t for t in (before, after) if t is not None]
    floor_ms = sum(runs) / len(runs) if runs else None
    rows = []
    for rank, ms in per_rank.items():
        row = {
            **where,
            "batch": cfg.batch,
            "tokens": cfg.batch * length,
            "rank": rank,
            "floor_ms": floor_ms,
            "floor_ms_before_after": [before, after],
            "unipeft_ms": ms["unipeft"],
            "peft_ms": ms["peft"],
            "unipeft_to_floor": _ratio(ms["unipeft"], floor_ms),
            "peft_to_floor": _ratio(ms["peft"], floor_ms),
            "unipeft_to_peft": _ratio(ms["unipeft"], ms["peft"]),
        }
        if "peft_default" in ms:
            row["peft_default_ms"] = ms["peft_default"]
            row["peft_default_to_floor"] = _ratio(ms["peft_default"], floor_ms)
        rows.append(row)
    return rows


def run_sweep(cfg: SweepConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every point of ``cfg``; return the JSON-ready result."""
    from .perf import environment

    require_peft()
    say = progress or (lambda _msg: None)
    previous = torch.get_num_threads()
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads or 1)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    try:
        with _quiet():
            for shape in cfg.shapes:
                base = _layers(cfg, shape)
                for length in cfg.lengths:
                    say(f"hidden {shape['hidden_size']}, sequence {length}: {len(cfg.ranks)} ranks")
                    rows += _point(cfg, base, length, errors)
                del base
                release(cfg.device)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    config = asdict(cfg)
    config.update(
        model=f"LlamaModel (decoder layers and final norm, no LM head), {cfg.layers} layers, "
        f"vocabulary {VOCAB}, random init (seeded), sdpa attention",
        dtype=str(cfg.dtype).removeprefix("torch."),
        threads=threads,
        loss="mean of the squared last hidden state (fp32)",
        lora={
            "targets": {"unipeft": LLAMA_ALL.unipeft, "peft": LLAMA_ALL.peft},
            "alpha": "2 × r",
            "dropout": 0.0,
        },
        floor="every weight frozen, the embedding output made to require grad; timed before "
        "and after the adapters of each point, floor_ms is the mean of the two",
        peft="peft_*: autocast_adapter_dtype=False, adapters in the model's dtype as "
        "unipeft's; peft_default_*: PEFT's default autocast_adapter_dtype=True (fp32 adapters "
        "on a bf16 model)",
        optimizer=optimizer_record(cfg.device),
        statistic=f"per variant, alone: median ms per step of {cfg.steps} consecutive steps "
        f"after {cfg.warmup} warm-up steps",
    )
    return {
        "environment": environment(cfg.device),
        "config": config,
        "rows": rows,
        "errors": errors,
    }


def _cell(v: float | None, spec: str, unit: str = "") -> str:
    return "—" if v is None else format(v, spec) + unit


def sweep_markdown(result: dict[str, Any]) -> str:
    """The sweep as a markdown table: one row per hidden size × sequence length × rank."""
    rows = result["rows"]
    default = any("peft_default_ms" in r for r in rows)
    head = ["hidden", "seq", "tokens", "floor ms", "r", "unipeft ms", "PEFT ms"]
    head += ["unipeft ÷ floor", "PEFT ÷ floor"]
    head += ["PEFT fp32 adapters ÷ floor"] if default else []
    head += ["unipeft ÷ PEFT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [str(r["hidden"]), str(r["length"]), str(r["tokens"])]
        cells += [_cell(r["floor_ms"], ".2f"), str(r["rank"])]
        cells += [_cell(r["unipeft_ms"], ".2f"), _cell(r["peft_ms"], ".2f")]
        cells += [_cell(r["unipeft_to_floor"], ".2f", "×"), _cell(r["peft_to_floor"], ".2f", "×")]
        if default:
            cells.append(_cell(r.get("peft_default_to_floor"), ".2f", "×"))
        cells.append(_cell(r["unipeft_to_peft"], ".2f", "×"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
