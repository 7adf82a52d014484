"""``unipeft train CONFIG.yaml``: fine-tune a text classifier from a YAML run configuration."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

EXAMPLE = """\
model: tiny:bert            # tiny:gpt2, tiny:llama, or minilm (all-MiniLM-L6-v2)
data: {path: train.csv, text_column: text, label_column: label}
method: lora
budget: 0.5%                # or config: {r: 8}
trainer: {steps: 200, lr: 0.001, batch_size: 16, checkpoint_every: 50}
                            # step_mode: auto | eager | graphs | compile (default auto)
output_dir: runs/lora       # the schema: docs/training.md
distributed: {engine: ddp}  # optional: under torchrun / accelerate launch (ddp or fsdp2)
"""

STEP_MODES = ("auto", "eager", "graphs", "compile")


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""

    @app.command(
        "train",
        help="Fine-tune a text classifier (on several processes: torchrun --nproc_per_node N "
        f"-m unipeft train CONFIG.yaml). CONFIG looks like:\n\n{EXAMPLE}",
    )
    def train(
        config: Annotated[Path, typer.Argument(help="the run configuration (YAML)")],
        resume: Annotated[
            bool,
            typer.Option("--resume", help="continue from output_dir/checkpoint (bit-exact on CPU)"),
        ] = False,
        progress: Annotated[
            bool, typer.Option("--progress/--no-progress", help="show a progress bar on a TTY")
        ] = True,
        step_mode: Annotated[
            str | None,
            typer.Option(
                "--step-mode",
                help="override trainer.step_mode: auto (CUDA graphs on one GPU, else eager), "
                "eager (the opt-out), graphs or compile",
            ),
        ] = None,
    ) -> None:
        from ..training.run import run
        from ..training.spec import load_run_config
        from ._common import CliError, cli_errors

        with cli_errors():  # bad input: one line, exit 2; the run leaves no output_dir behind
            if step_mode is not None and step_mode not in STEP_MODES:
                raise CliError(
                    f"--step-mode {step_mode!r} is not one of {', '.join(STEP_MODES)}",
                    hint="see 'unipeft train --help'",
                )
            cfg = load_run_config(config)
            if step_mode is not None:
                trainer = cfg.trainer.model_copy(update={"step_mode": step_mode})
                cfg = cfg.model_copy(update={"trainer": trainer})
            result = run(cfg, resume=resume, progress=progress)
        if os.environ.get("RANK", "0") != "0":
            return  # launched as several processes: rank 0 reports
        out = Console()
        tr = result.train
        share = 100 * result.trainable / result.backbone_parameters
        out.print(
            Text(
                f"trained steps {tr.start_step}..{tr.step}; {result.trainable} trainable "
                f"parameters ({share:.3g}% of the backbone's {result.backbone_parameters}); "
                f"method config {result.method_config}"
            ),
            soft_wrap=True,
        )
        if tr.history:
            out.print(Text(f"last record: {tr.history[-1]}"), soft_wrap=True)
        if tr.step_mode is not None:
            out.print(Text(f"step mode: {tr.step_mode.mode} ({tr.step_mode.reason})"),
                      soft_wrap=True)  # fmt: skip
        out.print(
            Text(f"adapter: {tr.adapter_dir}\nclassifier head: {result.classifier_dir}"),
            soft_wrap=True,
        )
