"""``unipeft bench``: the survey's experiments, each writing JSON + PNG into ``--output``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ._common import cli_errors, fail, warn

bench_app = typer.Typer(
    no_args_is_help=True,
    help="The survey's experiments (JSON + PNG), and unipeft against Hugging Face PEFT.",
)
_console = Console()


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


def _check_device(device: str) -> None:
    """Refuse a ``--device`` other than cpu, cuda or cuda:N (before anything is written)."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise fail(f"--device {device!r}: use cpu, cuda or cuda:N")


def _device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        _console.print("[yellow]CUDA is not available here: measuring on the CPU instead[/]")
        return "cpu"
    return device


@bench_app.command("latency")
def latency_cmd(
    output: Annotated[
        Path, typer.Option("--output", help="folder for latency.json and latency.png")
    ],
    model: Annotated[
        str, typer.Option(help="model spec (see `unipeft inspect --help`)")
    ] = "minilm",
    batch: Annotated[int, typer.Option(min=1)] = 32,
    length: Annotated[int, typer.Option(min=1)] = 64,
    repeats: Annotated[int, typer.Option(min=1)] = 15,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Inference throughput: base, LoRA unmerged / merged, serial / parallel adapters."""
    from ..bench import check_writable, write_json
    from ..bench.plots import bar_chart
    from ..bench.survey import latency
    from ._backbones import load_backbone

    with cli_errors():  # every check before check_writable creates the folder
        _check_device(device)
        load_backbone(model)  # fail early on a bad spec
        out = check_writable(output)
    dev = _device(device)
    rows = latency(
        lambda: load_backbone(model).model, batch=batch, length=length, repeats=repeats, device=dev
    )
    write_json(out / "latency.json", {"model": model, "rows": rows})
    bar_chart(
        rows,
        "ratio_to_base",
        "time per batch / base",
        f"Inference latency ({model})",
        out / "latency.png",
    )
    table = Table(title=f"inference latency, {model}, batch {batch}x{length}, {dev}")
    for col in ("variant", "ms / batch", "samples / s", "x base"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for r in rows:
        table.add_row(
            r["variant"],
            f"{1000 * r['seconds_per_batch']:.1f}",
            f"{r['samples_per_second']:.0f}",
            f"{r['ratio_to_base']:.2f}",
        )
    _console.print(table)


@bench_app.command("memory")
def memory_cmd(
    output: Annotated[Path, typer.Option("--output", help="folder for memory.json and memory.png")],
    model: Annotated[
        str, typer.Option(help="model spec (see `unipeft inspect --help`)")
    ] = "minilm",
    batch: Annotated[int, typer.Option(min=1)] = 16,
    length: Annotated[int, typer.Option(min=1)] = 64,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Peak memory of a training step: full fine-tuning vs LoRA vs a lower-precision base."""
    from ..bench import check_writable, write_json
    from ..bench.plots import bar_chart
    from ..bench.survey import memory
    from ._backbones import load_backbone

    with cli_errors():
        _check_device(device)
        load_backbone(model)
        out = check_writable(output)
    dev = _device(device)
    rows = memory(model, batch=batch, length=length, device=dev)
    for r in rows:
        r["peak_mib"] = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20
    write_json(out / "memory.json", {"model": model, "rows": rows})
    bar_chart(
        rows,
        "peak_mib",
        "peak memory of a training step (MiB)",
        f"Training memory ({model})",
        out / "memory.png",
    )
    table = Table(title=f"training-step peak memory, {model}, batch {batch}x{length}, {dev}")
    for col in ("variant", "peak MiB", "trainable", "note"):
        table.add_column(col)
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        table.add_row(r["variant"], peak, str(r.get("trainable", "-")), r.get("note", ""))
    _console.print(table)


@bench_app.command("rank-sweep")
def rank_sweep_cmd(
    output: Annotated[Path, typer.Option("--output", help="folder for rank_sweep.json/.png")],
    ranks: Annotated[str, typer.Option(help="comma-separated LoRA ranks")] = "1,2,4,8,16,32,64",
    seed: Annotated[int, typer.Option()] = 0,
    quick: Annotated[bool, typer.Option(help="a CI-sized run: fewer samples and epochs")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """LoRA ranks on the demo's text task (MiniLM on VADER): accuracy vs parameters."""
    from ..bench import check_writable, write_json
    from ..bench.plots import line_chart
    from ..bench.rank_sweep import rank_sweep

    with cli_errors():
        _check_device(device)
        try:
            values = [int(r) for r in ranks.split(",") if r.strip()]
        except ValueError:
            raise fail(f"--ranks {ranks!r} must be comma-separated integers like 1,4,16") from None
        if not values or min(values) < 1:
            raise fail(f"--ranks {ranks!r} needs at least one rank, each at least 1")
        out = check_writable(output)
    rows = rank_sweep(
        values,
        seed=seed,
        quick=quick,
        device=_device(device),
        progress=lambda msg: _console.print(f"[dim]{msg}[/]"),
    )
    write_json(out / "rank_sweep.json", {"task": rows[0]["task"], "rows": rows})
    line_chart(
        rows,
        "trainable_fraction",
        "accuracy",
        "trainable fraction (log)",
        "accuracy",
        "LoRA rank sweep",
        out / "rank_sweep.png",
    )
    table = Table(title=rows[0]["task"])
    for col in ("rank", "trainable %", "accuracy", "train s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["rank"]),
            f"{100 * r['trainable_fraction']:.3f}",
            f"{r['accuracy']:.4f}",
            f"{r['train_seconds']:.1f}",
        )
    _console.print(table)


@bench_app.command("perf")
def perf_cmd(
    quick: Annotated[
        bool | None,
        typer.Option(
            "--quick/--full",
            help="CPU-sized models (--quick) or the 0.85B Llama and ViT-B-16 (--full); "
            "default: --full with CUDA, --quick without",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda if available, else cpu)")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="write every figure to this JSON file")
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(min=1, help="timed rounds per figure (default: 10 full, 7 quick)"),
    ] = None,
    layers: Annotated[
        int | None,
        typer.Option(min=1, help="--full only: fewer Llama layers, for a smoke test"),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU intra-op threads (default on the CPU: 1)"),
    ] = None,
    sections: Annotated[
        str | None,
        typer.Option(
            help="comma-separated sections to run (default: all; --quick leaves compile out): "
            "train, steady, compile, inference, mixed, open_clip, apply, cuda_graphs, catalogue"
        ),
    ] = None,
    steady_steps: Annotated[
        int | None,
        typer.Option(min=1, help="steady and compile: timed steps per variant (20 full)"),
    ] = None,
    compile_backend: Annotated[
        str | None,
        typer.Option(help="compile: torch.compile's backend (default inductor)"),
    ] = None,
    compile_scope: Annotated[
        str | None,
        typer.Option(
            help="compile: model (one torch.compile of the whole model, the default) or "
            "blocks (each decoder block compiled: identical blocks compile once)"
        ),
    ] = None,
) -> None:
    """unipeft and Hugging Face PEFT side by side: training step (interleaved, steady state,
    compiled), memory, inference, merges, mixed batches, open_clip attention, apply time;
    ratios and targets."""
    import dataclasses

    import torch

    from ..bench import perf, write_json
    from ..bench.perf_setup import SECTIONS

    with cli_errors():
        perf.require_peft()
        if device not in (None, "cpu", "cuda"):
            raise fail(f"--device {device!r}: use cpu or cuda")
        chosen = None if sections is None else [s.strip() for s in sections.split(",")]
        if chosen is not None and (not all(chosen) or not set(chosen) <= set(SECTIONS)):
            raise fail(f"--sections {sections!r}: choose from {', '.join(SECTIONS)}")
        if compile_scope not in (None, "model", "blocks"):
            raise fail(f"--compile-scope {compile_scope!r}: use model or blocks")
        _check_out(output, "--output")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        warn(
            "CUDA is not available on this machine, so the GPU figures cannot be measured "
            "here; measuring the quick CPU figures instead"
        )
        dev, quick = "cpu", True
    if quick is None:
        quick = dev == "cpu"
    if quick:
        cfg = perf.quick_config(dev, repeats=repeats)
    else:
        cfg = perf.full_config(dev, layers=layers, repeats=repeats)
    changes: dict = {"threads": threads}
    if chosen is not None:
        changes["sections"] = tuple(chosen)
    if steady_steps is not None:
        changes["steady_steps"] = steady_steps
    if compile_backend is not None:
        changes["compile_backend"] = compile_backend
    if compile_scope is not None:
        changes["compile_scope"] = compile_scope
    cfg = dataclasses.replace(cfg, **changes)
    result = perf.run_perf(cfg, progress=lambda msg: _console.print(f"[dim]{msg}[/]"))
    if output is not None:
        write_json(output, result)
    _print_perf(result)
    if output is not None:
        _console.print(f"figures written to {output}")


def _print_perf(result: dict) -> None:
    from ..bench.perf import report_sections

    env, cfg = result["environment"], result["config"]
    _console.print(
        f"[bold]unipeft {env['unipeft']} vs peft {env['peft']}[/] on {env['device_name']} "
        f"({cfg['profile']} configuration, {cfg['dtype']}, torch {env['torch']}, "
        f"CPU threads: {cfg['threads']}); {cfg['statistic']}"
    )
    styles = {"met": "[green]met[/]", "missed": "[red]missed[/]", "n/a": "[yellow]n/a[/]"}
    for section in report_sections(result):
        table = Table(title=section.title, title_justify="left", title_style="bold")
        table.add_column("figure")
        ref = f"÷ {section.ref} (ours / peft)" if section.ref else ""
        for col in ("unipeft", "peft", "÷ peft", ref, "target"):
            table.add_column(col, justify="right")
        table.add_column("")
        for r in section.rows:
            table.add_row(
                r.figure, r.unipeft, r.peft, r.ratio, r.to_ref, r.target, styles.get(r.met, r.met)
            )
        _console.print(table)
    for note in result["notes"]:
        _console.print(f"[dim]note: {note}[/]")
    for fig in result["figures"].values():
        if "note" in fig:
            _console.print(f"[yellow]note: {fig['note']}[/]")
    counts = {
        k: sum(1 for t in result["targets"] if t["met"] is v)
        for k, v in (("met", True), ("missed", False), ("n/a", None))
    }
    _console.print(
        f"targets: [green]{counts['met']} met[/], [red]{counts['missed']} missed[/]"
        + (f", [yellow]{counts['n/a']} not measured[/]" if counts["n/a"] else "")
    )


def _ints(text: str | None, option: str) -> list[int] | None:
    """A comma-separated list of positive integers, or ``None`` for the default."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise fail(f"{option} {text!r} must be comma-separated integers like 8,32,128") from None
    if not values or min(values) < 1:
        raise fail(f"{option} {text!r} needs at least one value, each at least 1")
    return values


@bench_app.command("sweep")
def sweep_cmd(
    output: Annotated[
        Path, typer.Option("--output", help="folder for sweep.json, sweep.md and sweep.png")
    ],
    quick: Annotated[
        bool | None,
        typer.Option(
            "--quick/--full",
            help="tiny layers on the CPU (--quick) or the 2048 and 4096 Llama layers (--full); "
            "default: --full with CUDA, --quick without",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda if available, else cpu)")
    ] = None,
    hidden: Annotated[
        str | None, typer.Option(help="hidden sizes to run (full: 2048,4096; quick: 64,96)")
    ] = None,
    lengths: Annotated[
        str | None, typer.Option(help="sequence lengths (full: 512,1024,2048,4096)")
    ] = None,
    ranks: Annotated[str | None, typer.Option(help="LoRA ranks (full: 8,16,32,64,128)")] = None,
    layers: Annotated[int | None, typer.Option(min=1, help="decoder layers (full: 2)")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="sequences per step (full: 1)")] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="timed steps per variant (full: 20)")
    ] = None,
    warmup: Annotated[int | None, typer.Option(min=0, help="untimed steps first (full: 3)")] = None,
    peft_default: Annotated[
        bool | None,
        typer.Option(
            "--peft-default/--no-peft-default",
            help="also time PEFT with its default fp32 adapters (default: yes)",
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU intra-op threads (default on the CPU: 1)")
    ] = None,
) -> None:
    """How LoRA's cost grows with the work: hidden size × sequence length × rank, the
    training step of unipeft and of PEFT over the frozen floor (JSON, markdown, PNG)."""
    import dataclasses

    import torch

    from ..bench import check_writable, perf_sweep, write_json
    from ..bench.plots import sweep_chart

    with cli_errors():
        perf_sweep.require_peft()
        if device not in (None, "cpu", "cuda"):
            raise fail(f"--device {device!r}: use cpu or cuda")
        grid = {
            "hidden": _ints(hidden, "--hidden"),
            "lengths": _ints(lengths, "--lengths"),
            "ranks": _ints(ranks, "--ranks"),
        }
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda" and not torch.cuda.is_available():
            warn("CUDA is not available on this machine: running the quick CPU sweep instead")
            dev, quick = "cpu", True
        if quick is None:
            quick = dev == "cpu"
        cfg = perf_sweep.quick_sweep(dev) if quick else perf_sweep.full_sweep(dev)
        known = {s["hidden_size"]: s for s in cfg.shapes}
        if grid["hidden"] is not None and not set(grid["hidden"]) <= set(known):
            raise fail(
                f"--hidden {hidden!r}: this configuration has hidden sizes "
                f"{', '.join(map(str, known))}"
            )
        out = check_writable(output)
    changes: dict = {"threads": threads}
    if grid["hidden"] is not None:
        changes["shapes"] = tuple(known[h] for h in grid["hidden"])
    for key in ("lengths", "ranks"):
        if grid[key] is not None:
            changes[key] = tuple(grid[key])
    given = {"layers": layers, "batch": batch, "steps": steps, "warmup": warmup}
    given["peft_default"] = peft_default
    changes.update({k: v for k, v in given.items() if v is not None})
    cfg = dataclasses.replace(cfg, **changes)
    result = perf_sweep.run_sweep(cfg, progress=lambda msg: _console.print(f"[dim]{msg}[/]"))
    write_json(out / "sweep.json", result)
    table = perf_sweep.sweep_markdown(result)
    (out / "sweep.md").write_text(table, encoding="utf-8")
    env = result["environment"]
    title = f"LoRA on every linear layer, training step ÷ frozen floor ({env['device_name']})"
    sweep_chart(result["rows"], out / "sweep.png", title)
    _console.print(table, markup=False, highlight=False, soft_wrap=True)
    for err in result["errors"]:
        _console.print(f"[yellow]not measured: {err}[/]")
    _console.print(f"written to {out}: sweep.json, sweep.md, sweep.png")


@bench_app.command("distributed")
def distributed_cmd(
    models: Annotated[
        str | None, typer.Option(help="llama (0.85B), 8b (Llama-3-8B shape), tiny")
    ] = None,
    engines: Annotated[str, typer.Option(help="single, ddp, fsdp2")] = "single,ddp,fsdp2",
    gpus: Annotated[str, typer.Option(help="GPU (process) counts to run each engine on")] = "1,2",
    libraries: Annotated[str, typer.Option(help="unipeft, peft")] = "unipeft,peft",
    device: Annotated[
        str | None, typer.Option(help="cpu (gloo) or cuda (default: cuda if available)")
    ] = None,
    quick: Annotated[
        bool, typer.Option(help="a tiny Llama on the CPU, few steps: what CI runs")
    ] = False,
    steps: Annotated[int | None, typer.Option(help="timed steps (default 10; quick 3)")] = None,
    warmup: Annotated[int | None, typer.Option(help="untimed steps first (3; quick 1)")] = None,
    batch: Annotated[int | None, typer.Option(help="sequences per GPU (8; quick 2)")] = None,
    length: Annotated[int | None, typer.Option(help="tokens per sequence (512; quick 32)")] = None,
    layers: Annotated[int | None, typer.Option(help="fewer decoder layers in every model")] = None,
    timeout: Annotated[float, typer.Option(help="seconds allowed to each launch")] = 600.0,
    out: Annotated[
        Path | None, typer.Option("--out", help="write the figures to this JSON")
    ] = None,
) -> None:
    """LoRA training under one process, DDP and FSDP2 (torchrun launches), unipeft beside
    Hugging Face PEFT: tokens/s and peak memory per GPU, and full fine-tuning's memory."""
    from ..bench import distributed, perf, write_json

    with cli_errors():
        perf.require_peft()
        cfg = distributed.make_config(
            models=models, engines=engines, gpus=gpus, libraries=libraries, device=device,
            quick=quick, steps=steps, warmup=warmup, batch=batch, length=length, layers=layers,
            timeout=timeout,
        )  # fmt: skip
        _check_out(out)
    result = distributed.run_bench(cfg, progress=lambda msg: _console.print(f"[dim]{msg}[/]"))
    if out is not None:
        write_json(out, result)
    for table in distributed.render(result):
        _console.print(table)
    for line in result["full_finetune_lines"]:
        _console.print(f"[dim]{line}[/]")
    for f in result["failures"]:
        warn(f"{f['library']} {f['engine']} x{f['processes']} {f['model']}: {f['error']}")
        _console.print(f"[dim]{f['output_tail']}[/]")
    _console.print(f"{len(result['rows'])} runs in {result['seconds']:.0f} s")
    if out is not None:
        _console.print(f"figures written to {out}")
    if result["failures"]:
        raise typer.Exit(1)


@bench_app.command("qlora")
def qlora_cmd(
    model: Annotated[
        str | None, typer.Option(help="llama (0.85B), 8b (Llama-3-8B shape), quick, tiny")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda if available)")
    ] = None,
    quick: Annotated[
        bool, typer.Option(help="a tiny Llama on the CPU, two timed steps: what CI runs")
    ] = False,
    layers: Annotated[int | None, typer.Option(min=1, help="fewer decoder layers")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="timed steps (10; quick 2)")] = None,
    warmup: Annotated[int | None, typer.Option(min=0, help="untimed steps first (3)")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="sequences per step (8)")] = None,
    length: Annotated[int | None, typer.Option(min=1, help="tokens per sequence (512)")] = None,
    rank: Annotated[int | None, typer.Option(min=1, help="LoRA rank (16)")] = None,
    libraries: Annotated[str | None, typer.Option(help="unipeft, peft")] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option(help="checkpoint every decoder layer (both libraries)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="write the figures to this JSON")
    ] = None,
) -> None:
    """QLoRA (NF4, double quantization, bf16 compute; LoRA r=16 on q,k,v,o,gate,up,down):
    step time and peak memory, unipeft beside Hugging Face PEFT."""
    from ..bench import perf, write_json

    with cli_errors():
        perf.require_peft()
        if device is not None:
            _check_device(device)
        from ..bench import qlora

        cfg = qlora.make_config(
            quick=quick, model=model, device=_device(device) if device else None, layers=layers,
            steps=steps, warmup=warmup, batch=batch, length=length, rank=rank,
            libraries=libraries, gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        _check_out(out)
        result = qlora.run(cfg, progress=lambda msg: _console.print(f"[dim]{msg}[/]"))
    if out is not None:
        write_json(out, result)
    _console.print(qlora.render(result))
    if out is not None:
        _console.print(f"figures written to {out}")


def _check_out(out: Path | None, option: str = "--out") -> None:
    """``option`` names a JSON file whose folder can be written (checked before any run)."""
    from ..bench import check_writable

    if out is None:
        return
    if out.is_dir():
        raise fail(f"{option} {out} is a folder; give the JSON file's name")
    check_writable(out.parent if str(out.parent) else Path("."))


from .bench_robustness import register as _register_robustness  # noqa: E402

_register_robustness(bench_app)  # `unipeft bench robustness`
