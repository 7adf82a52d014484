"""``unipeft bench distributed``: LoRA training under one process, DDP and FSDP2, unipeft
beside Hugging Face PEFT, with tokens per second and peak memory per GPU.

Each run is a ``torchrun`` launch of :mod:`unipeft.bench.distributed_worker`; on the GPU
every (library, engine, GPUs, model) gets its own launch, so that its peak memory is its
own. On the CPU (gloo), where no memory is measured, the runs of one process count share a
launch, and the one-process runs run in the calling process, which saves the imports.
Rank 0 of each launch appends one JSON line per run; this module collects them, pairs
unipeft's and PEFT's rows and adds the memory that full fine-tuning would need (computed,
not run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..contract.errors import ConfigError
from .distributed_worker import ENGINES, LIBRARIES, MODELS

GIB = 2**30
Progress = Callable[[str], None]

FULL_FT_RECIPES = {  # bytes per parameter that full fine-tuning keeps, besides activations
    "fp32 weights, fp32 gradients, fp32 AdamW moments (mixed precision)": 4 + 4 + 8,
    "bf16 weights, bf16 gradients, fp32 AdamW moments": 2 + 2 + 8,
}


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...] = ("llama", "8b")
    engines: tuple[str, ...] = ENGINES
    gpus: tuple[int, ...] = (1, 2)
    libraries: tuple[str, ...] = LIBRARIES
    device: str = "cuda"
    steps: int = 10
    warmup: int = 3
    batch: int = 8  # sequences per GPU (per process)
    length: int = 512
    layers: int | None = None
    lr: float = 1e-3
    seed: int = 0
    timeout: float = 600.0  # seconds per launch
    quick: bool = False

    def configs(self) -> list[tuple[str, str, int]]:
        """(model, engine, processes) to run: ``single`` on one process, ``ddp`` on two or
        more, ``fsdp2`` on any number."""
        out = []
        for model in self.models:
            for engine in self.engines:
                for n in self.gpus:
                    if (engine == "single") == (n == 1) or engine == "fsdp2":
                        out.append((model, engine, n))
        return out


def _split(text: str, allowed: tuple[str, ...] | None, option: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise ConfigError(f"{option} {text!r} names nothing; give a comma-separated list")
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise ConfigError(f"{option}: unknown {bad}; choose from {', '.join(allowed)}")
    return items


def make_config(
    *,
    models: str | None = None,
    engines: str = "single,ddp,fsdp2",
    gpus: str = "1,2",
    libraries: str = "unipeft,peft",
    device: str | None = None,
    quick: bool = False,
    steps: int | None = None,
    warmup: int | None = None,
    batch: int | None = None,
    length: int | None = None,
    layers: int | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    timeout: float = 600.0,
) -> BenchConfig:
    """Check the options and fill in the defaults: the GPU figures (both models, batch 8 x
    512 per GPU, 3 + 10 steps), or with ``quick`` a tiny Llama on the CPU (batch 2 x 32,
    1 + 3 steps): what CI runs."""
    import torch

    if device is None:
        device = "cpu" if quick or not torch.cuda.is_available() else "cuda"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: use cpu or cuda")
    try:
        counts = tuple(int(s) for s in _split(gpus, None, "--gpus"))
    except ValueError:
        raise ConfigError(f"--gpus {gpus!r} must be process counts such as 1,2") from None
    if min(counts) < 1:
        raise ConfigError(f"--gpus {gpus!r}: every count must be at least 1")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but CUDA is not available here; use --device cpu")
        have = torch.cuda.device_count()
        if max(counts) > have:
            raise ConfigError(f"--gpus {gpus!r} asks for {max(counts)} GPUs; this host has {have}")
    for name, value in (("steps", steps), ("batch", batch), ("length", length), ("layers", layers)):
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    if warmup is not None and warmup < 0:
        raise ConfigError(f"--warmup must be at least 0, got {warmup}")
    cfg = BenchConfig(
        models=_split(models or ("tiny" if quick else "llama,8b"), tuple(MODELS), "--models"),
        engines=_split(engines, ENGINES, "--engines"),
        gpus=counts,
        libraries=_split(libraries, LIBRARIES, "--libraries"),
        device=device,
        steps=steps or (3 if quick else 10),
        warmup=(1 if quick else 3) if warmup is None else warmup,
        batch=batch or (2 if quick else 8),
        length=length or (32 if quick else 512),
        layers=layers,
        lr=lr,
        seed=seed,
        timeout=timeout,
        quick=quick,
    )
    if not cfg.configs():
        raise ConfigError(
            f"--engines {engines} with --gpus {gpus} runs nothing: single runs on 1 GPU, ddp "
            "on 2 or more, fsdp2 on any number"
        )
    return cfg


# ================================================================================ launches


@dataclass(frozen=True)
class Launch:
    model: str
    processes: int
    runs: tuple[tuple[str, str], ...]  # (library, engine), run one after another


def plan(cfg: BenchConfig) -> list[Launch]:
    """One launch per run on the GPU; on the CPU one per (model, process count)."""
    launches: list[Launch] = []
    for model, engine, n in cfg.configs():
        for library in cfg.libraries:
            if cfg.device == "cpu":
                same = [
                    i for i, la in enumerate(launches) if (la.model, la.processes) == (model, n)
                ]
                if same:
                    la = launches[same[0]]
                    launches[same[0]] = Launch(model, n, (*la.runs, (library, engine)))
                    continue
            launches.append(Launch(model, n, ((library, engine),)))
    return launches


def _command(cfg: BenchConfig, launch: Launch, out: Path) -> list[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(launch.processes),
        "-m", "unipeft.bench.distributed_worker",
        "--runs", ",".join(f"{lib}:{eng}" for lib, eng in launch.runs),
        "--model", launch.model, "--device", cfg.device, "--out", str(out),
        "--batch", str(cfg.batch), "--length", str(cfg.length),
        "--steps", str(cfg.steps), "--warmup", str(cfg.warmup),
        "--lr", str(cfg.lr), "--seed", str(cfg.seed),
    ]  # fmt: skip
    if cfg.layers is not None:
        cmd += ["--layers", str(cfg.layers)]
    return cmd


def _run_launch(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run one torchrun launch in its own process group (a timeout ends every worker);
    returns the exit code (None on a timeout) and the tail of its output."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=15)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    lines = [ln for ln in text.splitlines() if "Warning" not in ln and "warn(" not in ln]
    return code, "\n".join(lines[-40:])


def _in_process(cfg: BenchConfig, launch: Launch, rows: list[dict[str, Any]]) -> tuple[int, str]:
    """The one-process CPU runs, here rather than in a launch (no memory is measured on the
    CPU, so nothing is lost, and the imports are paid once)."""
    import traceback

    from .distributed_worker import RunSpec, run_in_process

    common = {
        "model": launch.model, "layers": cfg.layers, "device": cfg.device, "batch": cfg.batch,
        "length": cfg.length, "steps": cfg.steps, "warmup": cfg.warmup, "lr": cfg.lr,
        "seed": cfg.seed,
    }  # fmt: skip
    specs = [RunSpec(adapted_with=lib, engine=eng, **common) for lib, eng in launch.runs]
    try:
        rows.extend(run_in_process(specs))
    except Exception:
        return 1, traceback.format_exc(limit=-8)
    return 0, ""


def _stamp(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(f"[{time.strftime('%H:%M:%S')}] {msg}")


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Every launch of :func:`plan`, then the rows, the pairs and the full fine-tuning
    estimate (:func:`summarise`)."""
    launches = plan(cfg)
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    _stamp(
        progress,
        f"{len(launches)} launches: models {', '.join(cfg.models)}; "
        f"{', '.join(f'{e} x{n}' for e, n in dict.fromkeys((e, n) for _, e, n in cfg.configs()))}"
        f"; {', '.join(cfg.libraries)}; batch {cfg.batch} x {cfg.length} per process, "
        f"{cfg.warmup} + {cfg.steps} steps, on {cfg.device}",
    )
    with tempfile.TemporaryDirectory(prefix="unipeft-bench-dist-") as tmp:
        for i, launch in enumerate(launches, 1):
            out = Path(tmp) / f"launch{i}.jsonl"
            what = ", ".join(f"{lib} {eng}" for lib, eng in launch.runs)
            _stamp(
                progress,
                f"launch {i}/{len(launches)}: {launch.model}, {launch.processes} "
                f"{'GPU' if cfg.device == 'cuda' else 'process'}(es): {what}",
            )
            t0 = time.perf_counter()
            got: list[dict[str, Any]] = []
            if cfg.device == "cpu" and launch.processes == 1:
                code, tail = _in_process(cfg, launch, got)
            else:
                code, tail = _run_launch(_command(cfg, launch, out), cfg.timeout)
                if out.exists():
                    got = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]
            rows.extend(got)
            done = {(r["library"], r["engine"]) for r in got}
            for lib, eng in launch.runs:
                if (lib, eng) not in done:
                    reason = "timed out" if code is None else f"exit code {code}"
                    failures.append(
                        {
                            "model": launch.model,
                            "engine": eng,
                            "processes": launch.processes,
                            "library": lib,
                            "error": f"{reason} after {time.perf_counter() - t0:.0f} s",
                            "output_tail": tail,
                        }
                    )
            status = "ok" if len(done) == len(launch.runs) else "FAILED"
            figures = "; ".join(f"{r['library']} {r['tokens_per_s']:.0f} tokens/s" for r in got)
            _stamp(progress, f"  {status} in {time.perf_counter() - t0:.0f} s  {figures}")
    result = summarise(cfg, rows, failures)
    result["seconds"] = time.perf_counter() - t_all
    return result


# ================================================================================ summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (model, engine, processes): unipeft's and PEFT's figures side by side."""
    keyed: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["model"], r["engine"], r["world_size"]), {})[r["library"]] = r
    out = []
    for (model, engine, n), libs in keyed.items():
        u, p = libs.get("unipeft"), libs.get("peft")

        def get(row: dict[str, Any] | None, key: str) -> Any:
            return None if row is None else row.get(key)

        out.append(
            {
                "model": model,
                "engine": engine,
                "processes": n,
                "unipeft_tokens_per_s": get(u, "tokens_per_s"),
                "peft_tokens_per_s": get(p, "tokens_per_s"),
                "tokens_per_s_ratio": _ratio(get(u, "tokens_per_s"), get(p, "tokens_per_s")),
                "unipeft_peak_gib": _gib(get(u, "peak_bytes")),
                "peft_peak_gib": _gib(get(p, "peak_bytes")),
                "peak_ratio": _ratio(get(u, "peak_bytes"), get(p, "peak_bytes")),
                "unipeft_trainable": get(u, "trainable"),
                "peft_trainable": get(p, "trainable"),
                "unipeft_losses": get(u, "losses"),
                "peft_losses": get(p, "losses"),
            }
        )
    return out


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


def full_finetune(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model, what full fine-tuning would keep in memory on one GPU (computed): weights,
    gradients and AdamW moments under two recipes, plus at least the activations of the
    one-process LoRA run at the same batch (its peak above its resident memory)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["world_size"] != 1 or r["model"] in out:
            continue
        act = None
        if r.get("peak_bytes") is not None and r.get("resident_bytes") is not None:
            act = r["peak_bytes"] - r["resident_bytes"]
        total = r.get("device_total_bytes")
        recipes = {}
        for name, per in FULL_FT_RECIPES.items():
            states = r["parameters"] * per
            need = None if act is None else states + act
            recipes[name] = {
                "bytes_per_parameter": per,
                "state_bytes": states,
                "with_activations_bytes": need,
                "fits_one_gpu": None if need is None or total is None else need <= total,
            }
        out[r["model"]] = {
            "parameters": r["parameters"],
            "activation_bytes_lower_bound": act,
            "batch": r["batch"],
            "length": r["length"],
            "gpu_total_bytes": total,
            "recipes": recipes,
        }
    return out


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def full_finetune_lines(estimate: dict[str, dict[str, Any]]) -> list[str]:
    """The estimate in words, one line per model and recipe."""
    lines = []
    for model, e in estimate.items():
        gpu = e["gpu_total_bytes"]
        for name, rec in e["recipes"].items():
            text = (
                f"{model} ({e['parameters']:,} parameters), full fine-tuning with {name}: "
                f"{rec['bytes_per_parameter']} B/parameter = {_size(rec['state_bytes'])}"
            )
            if rec["with_activations_bytes"] is not None:
                text += (
                    f", {_size(rec['with_activations_bytes'])} with the activations of batch "
                    f"{e['batch']} x {e['length']}"
                )
            if gpu is not None:
                fits = "fits" if rec["fits_one_gpu"] else "does not fit"
                text += f": {fits} in one GPU's {_size(gpu)}"
            lines.append(text)
    return lines


def environment(device: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Versions, and the device as the workers saw it (this process never touches CUDA, so
    it holds no memory on the GPUs it measures)."""
    import platform

    import peft
    import torch
    import transformers

    import unipeft

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "unipeft": unipeft.__version__,
        "device": device,
        "device_name": rows[0]["device_name"] if rows else device,
        "host": platform.machine(),
        "gpus_on_host": torch.cuda.device_count() if device == "cuda" else 0,
    }


def summarise(
    cfg: BenchConfig, rows: list[dict[str, Any]], failures: list[dict[str, Any]]
) -> dict[str, Any]:
    estimate = full_finetune(rows)
    return {
        "environment": environment(cfg.device, rows),
        "config": asdict(cfg),
        "settings": {
            "model": "LlamaForCausalLM with random weights (seeded), sdpa attention, "
            + ("bf16" if cfg.device == "cuda" else "fp32 (CPU)"),
            "lora": "r=16, alpha=32, no dropout, on q,k,v,o,gate,up,down of every layer; "
            "adapters in the base's dtype (PEFT: autocast_adapter_dtype=False); A seeded "
            "identically per layer in both libraries, B zero",
            "optimizer": "AdamW, fused on CUDA, lr " + str(cfg.lr),
            "batch": f"{cfg.batch} sequences of {cfg.length} tokens per GPU (process)",
            "data": "random token ids; step s's global batch comes from seed and s, and "
            "rank k takes its k-th slice",
            "loss": "causal LM cross-entropy (labels = input_ids), no gradient checkpointing",
            "timing": f"median over {cfg.steps} steps after {cfg.warmup} warmup steps, each "
            "synchronised (torch.cuda.synchronize); the slowest rank's median; tokens/s over "
            "the global batch",
            "memory": "torch.cuda.max_memory_allocated over warmup and timed steps, the "
            "largest over the ranks (none on the CPU)",
            "engines": "single: no wrapper; ddp: DistributedDataParallel(model, "
            "device_ids=[local_rank]); fsdp2: fully_shard on each decoder layer then the "
            "root (unipeft: unipeft.distributed.shard)",
        },
        "rows": rows,
        "pairs": pairs(rows),
        "full_finetune": estimate,
        "full_finetune_lines": full_finetune_lines(estimate),
        "failures": failures,
    }


def _cells(p: dict[str, Any]) -> list[str]:
    """engine, processes, tokens/s (unipeft, PEFT, ratio), peak GiB (unipeft, PEFT, ratio)."""
    return [
        p["engine"],
        str(p["processes"]),
        _num(p["unipeft_tokens_per_s"], ",.0f"),
        _num(p["peft_tokens_per_s"], ",.0f"),
        _num(p["tokens_per_s_ratio"], ".3f"),
        _num(p["unipeft_peak_gib"], ".2f"),
        _num(p["peft_peak_gib"], ".2f"),
        _num(p["peak_ratio"], ".3f"),
    ]


def render(result: dict[str, Any]) -> list[Any]:
    """Rich tables, one per model: unipeft | PEFT | ratio for tokens/s and peak memory."""
    from rich.table import Table

    unit = "GPUs" if result["config"]["device"] == "cuda" else "procs"
    cfg = result["config"]
    tables = []
    for model in dict.fromkeys(p["model"] for p in result["pairs"]):
        rows = [p for p in result["pairs"] if p["model"] == model]
        trainable = sorted(
            {
                t
                for p in rows
                for t in (p["unipeft_trainable"], p["peft_trainable"])
                if t is not None
            }
        )
        table = Table(
            title=f"{model}: LoRA r=16 on all linear layers, batch {cfg['batch']} x "
            f"{cfg['length']} per {unit[:-1]}, {result['environment']['device_name']}",
            caption="trainable parameters: "
            + " / ".join(f"{t:,}" for t in trainable)
            + "; tokens/s over the global batch; peak: max over GPUs",
            title_justify="left",
            caption_justify="left",
        )
        table.add_column("engine")
        for col in (unit, "tok/s unipeft", "tok/s PEFT", "÷", "GiB unipeft", "GiB PEFT", "÷"):
            table.add_column(col, justify="right")
        for p in rows:
            table.add_row(*_cells(p))
        tables.append(table)
    return tables


def markdown(result: dict[str, Any]) -> str:
    """The figures as Markdown tables (one per model), for docs/distributed.md."""
    unit = "GPUs" if result["config"]["device"] == "cuda" else "processes"
    out = []
    for model in dict.fromkeys(p["model"] for p in result["pairs"]):
        out += [
            f"**{model}**",
            "",
            f"| engine | {unit} | tokens/s unipeft | tokens/s PEFT | ÷ PEFT "
            "| peak GiB/GPU unipeft | peak GiB/GPU PEFT | ÷ PEFT |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in (p for p in result["pairs"] if p["model"] == model):
            out.append("| " + " | ".join(_cells(p)) + " |")
        out.append("")
    out += [f"- {line}" for line in result["full_finetune_lines"]]
    return "\n".join(out) + "\n"
