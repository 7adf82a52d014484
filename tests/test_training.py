"""unipeft.training: seeded, bit-exact resumable training that survives SIGKILL at any moment,
and ``unipeft train CONFIG.yaml``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

import unipeft
from unipeft.cli.train import register
from unipeft.testing.backbones import BACKBONES
from unipeft.training import CheckpointError, Trainer, TrainerConfig, read_checkpoint, recover
from unipeft.training.checkpoint import PAUSE_ENV
from unipeft.training.task import TextClassifier, classification_loss

# A real training process: tiny BERT + LoRA (with dropout, so the generator state matters) +
# a linear head on a seeded synthetic task; ~60 steps, a checkpoint every 5. It always
# passes resume=True, so a second start continues where the first one died.
SCRIPT = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
import unipeft
from unipeft.testing.backbones import BACKBONES
from unipeft.training import Trainer, TrainerConfig
from unipeft.training.task import TextClassifier, classification_loss

backbone = BACKBONES["bert"].make()
torch.manual_seed(0)
model = TextClassifier(unipeft.apply(backbone, "lora", r=4, dropout=0.1), 32, 2)
ids = torch.randint(1, 100, (44, 8), generator=torch.Generator().manual_seed(1))
mask = torch.ones(8, dtype=torch.long)
data = [{"input_ids": x, "attention_mask": mask, "label": (x[0] >= 50).long()} for x in ids]

def loss_fn(m, batch):
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))  # so that a kill lands mid-run
    return classification_loss(m, batch)

cfg = TrainerConfig(steps=60, batch_size=8, lr=1e-2, checkpoint_every=5, log_every=1,
                    seed=3, device="cpu", grad_clip=1.0, weight_decay=0.01)
Trainer(model, loss_fn, data, cfg, output_dir=sys.argv[1], progress=False).train(resume=True)
"""
Run = dict[str, object]
Ref = Callable[[], Run]  # the uninterrupted run's results
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _start(out: Path, **env: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", SCRIPT, str(out)]
    return subprocess.Popen(cmd, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _collect(proc: subprocess.Popen[bytes], out: Path) -> Run:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    return {
        "adapter": load_file(str(out / "adapter" / "unipeft_adapters.safetensors")),
        "trainable": load_file(str(out / "checkpoint" / "trainable.safetensors")),
        "metrics": (out / "metrics.jsonl").read_text().splitlines(),
    }


def _kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 90
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()[-2000:]}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the run never reached the point to kill it"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _same(resumed: Run, reference: Run) -> None:
    for part in ("adapter", "trainable"):
        ref, got = reference[part], resumed[part]
        assert isinstance(ref, dict) and isinstance(got, dict) and ref.keys() == got.keys()
        for key in ref:
            assert torch.equal(ref[key], got[key]), f"{part} tensor {key} differs"
    # every logged loss matches bit for bit, each step once
    assert resumed["metrics"] == reference["metrics"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ref]:
    """The uninterrupted run, started at once (it runs beside the first test's) and
    collected when first needed."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc, done = _start(out), []

    def get() -> Run:
        if not done:
            done.append(_collect(proc, out))
        return done[0]

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _last_step(out: Path) -> int:
    try:
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    except (OSError, ValueError, IndexError):
        return 0


def test_sigkill_mid_run_then_resume_is_bit_exact(tmp_path: Path, reference: Ref) -> None:
    proc = _start(tmp_path, STEP_SLEEP="0.04")
    _kill_when(proc, lambda: (tmp_path / "checkpoint").is_dir() and _last_step(tmp_path) >= 22)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt is not None and 20 <= ckpt.step < 60 and ckpt.step % 5 == 0
    _same(_collect(_start(tmp_path), tmp_path), reference())


@pytest.mark.parametrize("phase", ["written", "swapped"])
def test_sigkill_during_checkpoint_write(tmp_path: Path, reference: Ref, phase: str) -> None:
    """Killed after the new checkpoint is written but before it replaces the old one
    (``written``), or between the two renames (``swapped``): the step-5 checkpoint stays.
    (Resuming from it is the same path as above; it runs once here, for ``swapped``.)"""
    proc = _start(tmp_path, **{PAUSE_ENV: f"{phase}:1"})
    tmp, old, final = (tmp_path / n for n in (".checkpoint.tmp", ".checkpoint.old", "checkpoint"))
    if phase == "written":
        _kill_when(proc, lambda: (tmp / "state.json").exists() and final.is_dir())
        assert final.is_dir() and tmp.is_dir()
    else:
        _kill_when(proc, lambda: old.is_dir() and not final.exists())
        assert old.is_dir() and not final.exists()
    ckpt = read_checkpoint(tmp_path)  # read-only: finds the previous complete checkpoint
    assert ckpt is not None and ckpt.step == 5
    assert recover(tmp_path) == final  # puts it back at checkpoint/, deletes the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]
    assert read_checkpoint(tmp_path).step == 5  # type: ignore[union-attr]
    if phase == "swapped":
        _same(_collect(_start(tmp_path), tmp_path), reference())


# ---------------------------------------------------------------- in-process
def _setup(seed: int = 0, n: int = 24) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    backbone = BACKBONES["bert"].make()
    torch.manual_seed(seed)
    model = TextClassifier(unipeft.apply(backbone, "lora", r=2, dropout=0.1), 32, 2)
    ids = torch.randint(1, 100, (n, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(6, dtype=torch.long)
    data = [{"input_ids": i, "attention_mask": mask, "label": (i[0] > 50).long()} for i in ids]
    return model, data


def _train(out: Path, steps: int = 8, resume: bool = False, **cfg: object) -> dict:
    model, data = _setup()
    config = TrainerConfig(steps=steps, batch_size=5, checkpoint_every=3, device="cpu", **cfg)
    trainer = Trainer(model, classification_loss, data, config, output_dir=out, progress=False)
    trainer.train(resume=resume)
    return load_file(str(out / "checkpoint" / "trainable.safetensors"))


def test_config_is_frozen_strict_and_described() -> None:
    for bad in ({"stepz": 3}, {"device": "tpu"}, {"steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainerConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TrainerConfig().steps = 3  # type: ignore[misc]
    assert all(f.description for f in TrainerConfig.model_fields.values())


def test_same_seed_same_adapter_in_process(tmp_path: Path) -> None:
    a, b = _train(tmp_path / "a", seed=1), _train(tmp_path / "b", seed=1)
    c = _train(tmp_path / "c", seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_in_process_and_never_unpickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _train(tmp_path / "full", steps=11)
    _train(tmp_path / "part", steps=6)

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("a checkpoint must never be unpickled")

    for name in ("torch.load", "pickle.load", "pickle.loads"):
        monkeypatch.setattr(name, refuse)
    resumed = _train(tmp_path / "part", steps=11, resume=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    kinds = {p.suffix for p in (tmp_path / "part" / "checkpoint").iterdir()}
    assert kinds == {".safetensors", ".json"}


def test_resume_refusals(tmp_path: Path) -> None:
    _train(tmp_path, steps=3)
    with pytest.raises(CheckpointError, match="resume=True"):
        _train(tmp_path, steps=6)
    with pytest.raises(CheckpointError, match=r"seed: 0 -> 7"):
        _train(tmp_path, steps=6, resume=True, seed=7)
    with pytest.raises(CheckpointError, match="beyond steps=2"):
        _train(tmp_path, steps=2, resume=True)


def test_aux_loss_is_added_and_eval_is_recorded(tmp_path: Path) -> None:
    model, data = _setup()
    model.aux_loss = lambda: torch.tensor(2.0)  # type: ignore[method-assign]
    seen: list[bool] = []

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        seen.append(m.training or torch.is_grad_enabled())
        return {"acc": 0.25}

    cfg = TrainerConfig(steps=4, batch_size=4, eval_every=2, log_every=2, device="cpu")
    zero_loss = lambda m, batch: 0.0 * classification_loss(m, batch)  # noqa: E731
    result = Trainer(model, zero_loss, data, cfg, output_dir=tmp_path, eval_fn=eval_fn).train()
    assert result.history == [
        {"step": 2, "epoch": 0, "loss": 2.0, "acc": 0.25},
        {"step": 4, "epoch": 0, "loss": 2.0, "acc": 0.25},
    ]
    assert seen == [False, False] and result.adapter_dir == tmp_path / "adapter"
    assert unipeft.load(BACKBONES["bert"].make(), str(result.adapter_dir)).adapters


# ------------------------------------------------- schedules, groups, batch orders, no output
def _reference_loop(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], head_lr: float
) -> None:
    """AdamW with a head group, a linear warm-up and decay through LambdaLR, by hand."""
    head = list(model.head.parameters())  # type: ignore[union-attr]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head")]
    opt = torch.optim.AdamW([{"params": body}, {"params": head, "lr": head_lr}], lr=1e-2,
                            weight_decay=0.01)  # fmt: skip
    total, warm = len(batches), 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    model.train()
    for batch in batches:
        loss = classification_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def test_schedule_groups_and_batch_order_match_a_hand_written_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _setup()[1]
    order = [[3, 1, 4, 0, 5], [9, 2, 6], [7, 8, 10, 11]]  # one epoch, three uneven batches
    seen: list[tuple[int, int]] = []

    def batch_order(seed: int, epoch: int) -> list[list[int]]:
        seen.append((seed, epoch))
        return order[epoch % 2 :] + order[: epoch % 2]  # epochs differ, same batch count

    cfg = TrainerConfig(
        steps=6, lr=1e-2, group_lr={"head": 3e-2}, schedule="linear", warmup=0.34,
        weight_decay=0.01, seed=4, seed_generators=False, device="cpu", measure_memory=True,
    )  # fmt: skip
    assert [round(cfg.lr_factor(s), 4) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    model, _ = _setup()
    torch.manual_seed(11)  # seed_generators=False: dropout continues this stream
    result = Trainer(
        model, classification_loss, data, cfg, output_dir=None, batch_order=batch_order,
        progress=False,
    ).train()  # fmt: skip
    assert result.output_dir is None and result.adapter_dir is None and result.step == 6
    assert result.seconds > 0 and isinstance(result.peak_memory_bytes, int)
    assert {e for _, e in seen} == {0, 1} and {s for s, _ in seen} == {4}
    assert not list(tmp_path.iterdir())  # nothing written, not even here

    expected, _ = _setup()
    epochs = [order, order[1:] + order[:1]]
    batches = [
        {k: torch.stack([data[i][k] for i in b]) for k in data[0]} for e in epochs for b in e
    ]
    torch.manual_seed(11)
    _reference_loop(expected, batches, head_lr=3e-2)
    for (name, got), want in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(got, want), name


def test_group_lr_and_output_dir_errors(tmp_path: Path) -> None:
    model, data = _setup()
    cfg = TrainerConfig(steps=2, batch_size=4, device="cpu", group_lr={"classifier": 1e-3})
    with pytest.raises(ValueError, match="classifier"):
        Trainer(model, classification_loss, data, cfg, output_dir=None).train()
    with pytest.raises(ValueError, match="greater than 0"):
        TrainerConfig(group_lr={"head": 0.0})
    cfg = TrainerConfig(steps=2, batch_size=4, device="cpu")
    with pytest.raises(ValueError, match="output_dir"):
        Trainer(model, classification_loss, data, cfg, output_dir=None).train(resume=True)


def test_resume_with_a_schedule_and_a_batch_order_is_bit_exact(tmp_path: Path) -> None:
    def batch_order(seed: int, epoch: int) -> list[list[int]]:
        perm = torch.randperm(24, generator=torch.Generator().manual_seed(seed * 100 + epoch))
        return [b.tolist() for b in perm.split(7)]  # 4 batches: 7, 7, 7, 3

    cfg = TrainerConfig(steps=10, schedule="linear", warmup=0.3, checkpoint_every=3,
                        group_lr={"head": 5e-3}, device="cpu")  # fmt: skip

    def run(out: Path, cfg: TrainerConfig, resume: bool = False, crash_at: int = 0) -> dict:
        model, data = _setup()
        calls = []

        def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            calls.append(1)
            if len(calls) == crash_at:
                raise KeyboardInterrupt  # a crash in the middle of step crash_at
            return classification_loss(m, batch)

        trainer = Trainer(model, loss_fn, data, cfg, output_dir=out, batch_order=batch_order,
                          progress=False)  # fmt: skip
        trainer.train(resume=resume)
        return load_file(str(out / "checkpoint" / "trainable.safetensors"))

    full = run(tmp_path / "full", cfg)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", cfg, crash_at=8)  # the last checkpoint is step 6's
    assert read_checkpoint(tmp_path / "cut").step == 6  # type: ignore[union-attr]
    with pytest.raises(CheckpointError, match="steps: 10 -> 12"):
        run(tmp_path / "cut", cfg.model_copy(update={"steps": 12}), resume=True)
    resumed = run(tmp_path / "cut", cfg, resume=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


# ---------------------------------------------------------------- unipeft train CONFIG.yaml
YAML = """model: tiny:bert
data:
  path: train.csv
method: lora
budget: 2%
trainer:
  steps: 6
  batch_size: 4
  device: cpu
output_dir: out
"""


def _cli(tmp_path: Path, text: str, *args: str) -> tuple[int, str]:
    words = "good bad fine sad".split() * 4
    rows = [f"{w} {w} film,{'pos' if w in ('good', 'fine') else 'neg'}" for w in words]
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "run.yaml").write_text(text)
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so that "train" is a subcommand
    register(app)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "run.yaml"), "--no-progress", *args])
    return result.exit_code, result.output


def test_cli_trains_resumes_and_refuses_to_overwrite(tmp_path: Path) -> None:
    code, out = _cli(tmp_path, YAML)
    assert code == 0 and "trained steps 0..6" in out, out
    assert unipeft.load(BACKBONES["bert"].make(), str(tmp_path / "out" / "adapter")).adapters
    assert (tmp_path / "out" / "classifier" / "head.safetensors").is_file()
    code, out = _cli(tmp_path, YAML, "--resume")  # already complete: re-exports, trains nothing
    assert code == 0 and "trained steps 6..6" in out, out
    code, out = _cli(tmp_path, YAML)
    assert code == 2 and "--resume" in out


ERRORS = [  # (YAML text replaced, by, the error that must appear)
    ("  device: cpu", "  device: cpu\n  lrr: 0.1", "run.yaml:10: unknown key 'trainer.lrr'. "
     "Did you mean 'lr'?"),
    ("steps: 6", "steps: six", "run.yaml:7: trainer.steps: Input should be a valid integer"),
    ("method: lora", "method: lorra", "run.yaml:4: unknown method 'lorra'. Did you mean 'lora'"),
    ("budget: 2%", "config: {r: 0}", "run.yaml:5: config.r: Input should be greater than"),
    ("tiny:bert", "tiny:bret", "run.yaml:1: model: Value error, unknown model 'tiny:bret'. Did "
     "you mean 'tiny:bert'"),
    ("path: train.csv", "path: train.csv\n  text_column: body", "column 'body' not found; the "
     "columns are: 'text', 'label'"),
    ("output_dir: out", "output_dir: train.csv/out", "train.csv' is a file, not a folder"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new", "expected"), ERRORS)
def test_cli_errors_name_the_line_and_write_nothing(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    code, out = _cli(tmp_path, YAML.replace(old, new))
    assert code == 2 and expected in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "train.csv"]


def test_cli_minilm(tmp_path: Path) -> None:
    text = YAML.replace("tiny:bert", "minilm").replace("budget: 2%", "config: {r: 2}")
    code, out = _cli(tmp_path, text.replace("steps: 6", "steps: 2"))
    assert code == 0, out
