"""TrainerConfig.step_mode: the trainer's steps eagerly, as CUDA graph replays, or compiled.

On the CPU: what ``auto`` and the forced modes mean where, batch-shape classification,
the bookkeeping of the graphed runner (with a stand-in capture that replays by running the
step again), the optimizer's flags across checkpoints, the version counters. On a GPU
(``-m gpu``): graphed and compiled training against eager training, and an evaluation after
graph replays against a fresh copy of the trained weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from safetensors.torch import load_file
from torch import Tensor, nn
from typer.testing import CliRunner

import unipeft
from unipeft.cli.train import register
from unipeft.testing.backbones import BACKBONES
from unipeft.training import (
    RunConfigError,
    Trainer,
    TrainerConfig,
    TrainingError,
    load_run_config,
    read_checkpoint,
)
from unipeft.training import step_modes as sm
from unipeft.training import trainer as trainer_module
from unipeft.training.task import TextClassifier, classification_loss

QKV = ["attn.q", "attn.k", "attn.v"]


def _model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    backbone = BACKBONES["bert"].make()
    torch.manual_seed(seed)
    return TextClassifier(unipeft.apply(backbone, "lora", r=2, dropout=dropout, targets=QKV), 32, 2)


def _data(n: int, width: int = 6, seed: int = 0) -> list[dict[str, Tensor]]:
    ids = torch.randint(1, 100, (n, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(width, dtype=torch.long)
    return [{"input_ids": i, "attention_mask": mask, "label": (i[0] > 50).long()} for i in ids]


# ------------------------------------------------------------------ what each mode means where
def test_auto_is_eager_off_cuda_and_under_ddp_and_graphs_on_one_gpu() -> None:
    mode, why = sm.choose_mode("auto", "cpu", 1, None)
    assert mode == "eager" and "cpu" in why
    mode, why = sm.choose_mode("auto", "cuda", 2, "ddp")
    assert mode == "eager" and "2 processes (ddp)" in why
    assert sm.choose_mode("auto", "cuda:0", 1, None)[0] == "graphs"
    assert sm.choose_mode("compile", "cuda", 1, None)[0] == "compile"
    assert sm.choose_mode("graphs", "cuda", 1, None)[0] == "graphs"
    assert sm.choose_mode("eager", "cuda", 1, None)[0] == "eager"


@pytest.mark.parametrize("mode", ["graphs", "compile"])
def test_a_forced_mode_that_cannot_apply_is_refused_with_the_fix(mode: str) -> None:
    with pytest.raises(TrainingError, match=f"step_mode '{mode}' needs a CUDA device.*eager"):
        sm.choose_mode(mode, "cpu", 1, None)
    with pytest.raises(TrainingError, match=r"not supported when launched as 2 processes.*fsdp2"):
        sm.choose_mode(mode, "cuda", 2, "fsdp2")


def test_forced_graphs_on_the_cpu_fails_before_anything_is_written(tmp_path: Path) -> None:
    cfg = TrainerConfig(steps=2, batch_size=4, device="cpu", step_mode="graphs")
    out = tmp_path / "run"
    trainer = Trainer(_model(), classification_loss, _data(8), cfg, output_dir=out, progress=False)
    with pytest.raises(TrainingError, match="needs a CUDA device"):
        trainer.train()
    assert not out.exists()


def test_the_field_is_validated_and_documented() -> None:
    assert TrainerConfig().step_mode == "auto"
    with pytest.raises(ValueError, match="step_mode"):
        TrainerConfig(step_mode="fast")  # type: ignore[arg-type]
    assert "opt-out" in TrainerConfig.model_fields["step_mode"].description


YAML = """model: tiny:bert
data:
  path: train.csv
method: lora
config: {r: 2}
trainer:
  steps: 3
  batch_size: 4
  device: cpu
  step_mode: MODE
output_dir: out
"""


def _files(tmp_path: Path, mode: str) -> Path:
    rows = [f"{w} film,{'pos' if w == 'good' else 'neg'}" for w in ["good", "bad"] * 5]
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "run.yaml").write_text(YAML.replace("MODE", mode))
    return tmp_path / "run.yaml"


def test_the_yaml_field_is_parsed_and_a_bad_value_names_its_line(tmp_path: Path) -> None:
    assert load_run_config(_files(tmp_path, "graphs")).trainer.step_mode == "graphs"
    with pytest.raises(RunConfigError, match=r"run.yaml:10: trainer.step_mode: Input should be"):
        load_run_config(_files(tmp_path, "fast"))


def _cli(config: Path, *args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    result = CliRunner().invoke(app, ["train", str(config), "--no-progress", *args])
    return result.exit_code, result.output


def test_the_cli_flag_overrides_the_yaml_and_the_summary_names_the_mode(tmp_path: Path) -> None:
    config = _files(tmp_path, "eager")
    code, out = _cli(config, "--step-mode", "graphs")  # no CUDA here: refused, nothing written
    assert code == 2 and "step_mode 'graphs' needs a CUDA device" in out, out
    assert not (tmp_path / "out").exists()
    code, out = _cli(config, "--step-mode", "fast")
    assert code == 2 and "--step-mode" in out
    code, out = _cli(config, "--step-mode", "auto")
    assert code == 0 and "step mode: eager (auto: training on cpu" in out, out
    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["step_mode"] == "eager"
    assert last["step_mode_reason"].startswith("auto: training on cpu")


# ------------------------------------------------------------------ batch shapes
def test_batch_signatures_separate_shapes_dtypes_structure_and_values() -> None:
    a = {"x": torch.zeros(4, 6), "y": torch.zeros(4, dtype=torch.long)}
    assert sm.batch_signature(a) == sm.batch_signature({k: v + 1 for k, v in a.items()})
    assert sm.batch_signature(a) != sm.batch_signature({**a, "x": torch.zeros(4, 7)})
    assert sm.batch_signature(a) != sm.batch_signature({**a, "y": torch.zeros(4)})
    assert sm.batch_signature(a) != sm.batch_signature({"y": a["y"], "x": a["x"]})
    assert sm.batch_signature((a["x"], 1)) != sm.batch_signature((a["x"], 2))
    assert sm.batch_signature([{"k": 1}]) == sm.batch_signature([{"k": 1}])
    assert sm.batch_signature([{1, 2}]) != sm.batch_signature([{1, 2}])  # unhashable


def test_the_tracker_tells_the_last_smaller_batch_from_varying_shapes() -> None:
    tracker = sm.ShapeTracker()
    full, small, wide = torch.zeros(8, 6), torch.zeros(3, 6), torch.zeros(8, 9)
    assert tracker.classify(small, last=True) == "remainder"  # a resume at an epoch's end
    assert tracker.classify(full, last=False) == "fixed"  # the reference
    assert tracker.classify(full, last=True) == "fixed"  # a last batch of full size
    assert tracker.classify(small, last=True) == "remainder"
    assert tracker.classify(wide, last=False) == "varies"
    assert tracker.example == "(8, 6) float32"


# ------------------------------------------------------------------ the graphed runner, simulated
class _Replay:
    """A stand-in CUDA graph: replaying runs the captured step again on the static inputs."""

    def __init__(self, fn: Any, out: Tensor) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Graphs on the CPU: ``choose_mode`` picks graphs for auto and graphs, the capture
    returns a :class:`_Replay`, the side stream is the caller's. Yields the captures made."""
    captures: list[int] = []

    def capture(fn: Any, warmup: int) -> tuple[_Replay, Tensor]:
        assert warmup == 0
        captures.append(1)
        out = torch.zeros(())  # a capture records the step without running it
        return _Replay(fn, out), out

    def choose(requested: str, *args: Any) -> tuple[str, str]:
        return ("eager", "asked") if requested == "eager" else ("graphs", "simulated")

    monkeypatch.setattr(sm, "capture", capture)
    monkeypatch.setattr(sm, "on_side_stream", lambda fn: fn())
    monkeypatch.setattr(trainer_module, "choose_mode", choose)
    return captures


def _run(out: Path | None, mode: str, steps: int = 8, n: int = 20, resume: bool = False,
         data: list | None = None, **kw: Any) -> Trainer:  # fmt: skip
    cfg = TrainerConfig(steps=steps, batch_size=8, lr=1e-2, device="cpu", step_mode=mode,
                        log_every=1, checkpoint_every=4, **kw)  # fmt: skip
    trainer = Trainer(_model(), classification_loss, data or _data(n), cfg, output_dir=out,
                      progress=False)  # fmt: skip
    trainer.result = trainer.train(resume=resume)  # type: ignore[attr-defined]
    return trainer


def _close(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_graphed_steps_warm_up_replay_and_train_the_last_batch_eagerly(simulated, tmp_path):
    # 20 examples in batches of 8: 8, 8, 4 per epoch; 8 steps = epochs 0, 1 and 2 steps of 2
    eager = _run(None, "eager", schedule="linear", warmup=0.2, grad_clip=0.5)
    graphed = _run(tmp_path, "graphs", schedule="linear", warmup=0.2, grad_clip=0.5)
    report = graphed.result.step_mode  # type: ignore[attr-defined]
    # steps 1, 2, 4 warm up (3 is a last batch); 5 is captured; 6 is a last batch
    assert (report.mode, report.eager_steps, report.fast_steps) == ("graphs", 5, 3)
    assert simulated == [1]
    losses = [h["loss"] for h in graphed.result.history]  # type: ignore[attr-defined]
    expected = [h["loss"] for h in eager.result.history]  # type: ignore[attr-defined]
    assert losses == pytest.approx(expected, rel=1e-4)
    _close(graphed.model, eager.model)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["step"], last["step_mode"], last["step_mode_reason"]) == (8, "graphs", "simulated")
    assert "step_mode" not in graphed.result.history[-1]  # type: ignore[attr-defined]
    assert eager.result.step_mode.eager_steps == 8  # type: ignore[attr-defined]


def test_forced_graphs_refuse_varying_shapes_and_auto_falls_back(simulated, tmp_path):
    data = _data(16, width=6) + _data(16, width=9, seed=1)  # batches of width 6 and 9
    order = lambda seed, epoch: [list(range(i, i + 8)) for i in range(0, 32, 8)]  # noqa: E731
    cfg = TrainerConfig(steps=4, batch_size=8, device="cpu", step_mode="graphs")
    trainer = Trainer(_model(), classification_loss, data, cfg, output_dir=None,
                      batch_order=order, progress=False)  # fmt: skip
    with pytest.raises(TrainingError, match=r"batch 2 of epoch 0 \(step 3\) is \{input_ids: "
                       r"\(8, 9\).*first batches \{input_ids: \(8, 6\).*padding="):  # fmt: skip
        trainer.train()
    auto_cfg = cfg.model_copy(update={"step_mode": "auto"})
    auto = Trainer(_model(), classification_loss, data, auto_cfg, output_dir=None,
                   batch_order=order, progress=False)  # fmt: skip
    report = auto.train().step_mode
    assert report is not None and report.mode == "eager" and report.eager_steps == 4
    assert report.reason.startswith("auto chose CUDA graphs, then fell back to eager: batch 2")


def test_a_failed_capture_is_an_error_when_forced_and_a_fall_back_under_auto(
    simulated, monkeypatch
):
    def broken(fn: Any, warmup: int) -> Any:
        try:  # the error inside the capture, then the one from ending the broken capture
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904

    monkeypatch.setattr(sm, "capture", broken)
    with pytest.raises(TrainingError, match=r"capturing the step at batch 1 of epoch 1.*not "
                       r"permitted.*synchronise with the host"):  # fmt: skip
        _run(None, "graphs")
    report = _run(None, "auto").result.step_mode  # type: ignore[attr-defined]
    assert (report.mode, report.eager_steps, report.fast_steps) == ("eager", 8, 0)
    assert "capturing the step" in report.reason


def test_checkpoints_move_between_graphs_and_eager(simulated, tmp_path):
    """A run checkpointed at step 4 in one mode resumes in the other; the optimizer gets
    that mode's flags back, and the checkpoint keeps the learning rate as a number."""
    _run(tmp_path / "g", "graphs", steps=4)
    doc = read_checkpoint(tmp_path / "g").optimizer_doc  # type: ignore[union-attr]
    assert isinstance(doc["param_groups"][0]["lr"], float) and doc["param_groups"][0]["fused"]
    resumed = _run(tmp_path / "g", "eager", steps=12, resume=True)
    _run(tmp_path / "e", "eager", steps=4)
    back = _run(tmp_path / "e", "graphs", steps=12, resume=True)
    assert back.result.step_mode.fast_steps > 0  # type: ignore[attr-defined]
    a = load_file(str(tmp_path / "g" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "e" / "checkpoint" / "trainable.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert resumed.result.step == 12  # type: ignore[attr-defined]


def test_the_optimizer_conforms_to_each_mode() -> None:
    p = nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=1e-2, **sm.optimizer_options("graphs"))
    sm.conform_optimizer(opt, "graphs")
    group = opt.param_groups[0]
    assert isinstance(group["lr"], Tensor) and group["fused"] and group["capturable"]
    sm.set_lr(group, 0.5)
    assert float(group["lr"]) == 0.5
    p.sum().backward()
    opt.step()
    sm.conform_optimizer(opt, "eager")
    assert group["lr"] == 0.5 and not group["fused"] and not group["capturable"]
    assert opt.state[p]["step"].device.type == "cpu" and float(opt.state[p]["step"]) == 1.0
    opt.step()  # the eager optimizer steps with what the graphed one left


def test_bumped_versions_rebuild_what_lora_caches_without_gradients() -> None:
    """What a graph replay does to the factors (written in place, no version bump) and why
    the runner bumps them before anything eager reads them."""
    model = _model().eval()
    batch = _data(4)
    ids = torch.stack([b["input_ids"] for b in batch])
    mask = torch.stack([b["attention_mask"] for b in batch])
    factors = [p for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
    downs = [p for n, p in model.named_parameters() if n.endswith(".A")]  # the cached ones
    with torch.no_grad():
        for p in factors:
            p.normal_()
        before = model(ids, mask)
        for p in downs:
            p.data.add_(torch.randn_like(p))  # in place, behind autograd's back, like a replay
        stale = model(ids, mask)
        sm.bump_versions(factors)
        fresh = model(ids, mask)
        reference = _model().eval()
        reference.load_state_dict(model.state_dict())
        expected = reference(ids, mask)
    assert torch.equal(stale, before)  # the cache served the old factors
    torch.testing.assert_close(fresh, expected)
    assert not torch.allclose(fresh, before)


def test_compiled_steps_run_the_last_smaller_batch_eagerly() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def update(loss: Tensor) -> Tensor:
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    report = sm.StepModeReport("compile", "compile", "asked")
    runner = sm.CompiledSteps(lambda x: model(x).square().mean(), update, report, backend="eager")
    for n, last in [(8, False), (8, False), (3, True)]:
        runner(torch.randn(n, 4), last=last, where="here")
    assert (report.fast_steps, report.eager_steps) == (2, 1)


@pytest.mark.slow
def test_compile_mode_in_the_trainer_trains_as_eager_does(monkeypatch) -> None:
    """The trainer's compile wiring on the CPU, with the ``aot_eager`` backend (no C++
    compiler needed): compiled forward and backward, eager last batches, same result."""
    init = sm.CompiledSteps.__init__

    def aot_eager(self: sm.CompiledSteps, *args: Any, **kw: Any) -> None:
        init(self, *args, **{**kw, "backend": "aot_eager"})

    monkeypatch.setattr(sm.CompiledSteps, "__init__", aot_eager)
    eager = _run(None, "eager", steps=9, schedule="linear", warmup=0.2, grad_clip=0.5)
    monkeypatch.setattr(trainer_module, "choose_mode", lambda *a: ("compile", "test"))
    compiled = _run(None, "auto", steps=9, schedule="linear", warmup=0.2, grad_clip=0.5)
    report = compiled.result.step_mode  # type: ignore[attr-defined]
    assert (report.mode, report.fast_steps, report.eager_steps) == ("compile", 6, 3)
    losses = [h["loss"] for h in compiled.result.history]  # type: ignore[attr-defined]
    assert losses == pytest.approx([h["loss"] for h in eager.result.history], rel=1e-5)  # type: ignore[attr-defined]
    _close(compiled.model, eager.model)


# ------------------------------------------------------------------ on a GPU
def _gpu_run(mode: str, **kw: Any) -> tuple[Trainer, Any]:
    # 20 examples in batches of 8 (8, 8, 4 per epoch): warm-up, capture, replays, and last
    # batches run eagerly in between
    cfg = TrainerConfig(steps=12, batch_size=8, lr=1e-3, device="cuda", step_mode=mode,
                        log_every=1, schedule="linear", warmup=0.2, grad_clip=1.0,
                        **kw)  # fmt: skip
    trainer = Trainer(_model(), classification_loss, _data(20), cfg, output_dir=None,
                      progress=False)  # fmt: skip
    return trainer, trainer.train()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["graphs", "compile"])
def test_gpu_graphed_and_compiled_training_match_eager(mode: str) -> None:
    eager, eager_result = _gpu_run("eager")
    fast, result = _gpu_run(mode)
    report = result.step_mode
    assert report.mode == mode and report.fast_steps >= 5, report  # graphs 5, compile 8
    losses = [h["loss"] for h in result.history]
    assert losses == pytest.approx([h["loss"] for h in eager_result.history], rel=1e-3)
    for (name, a), b in zip(fast.model.named_parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4, msg=name)


def _eval_fn(batch: dict[str, Tensor]) -> Any:
    def evaluate(model: nn.Module) -> dict[str, float]:
        b = {k: v.cuda() for k, v in batch.items()}
        return {"eval_loss": float(classification_loss(model, b))}

    return evaluate


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_evaluation_after_graph_replays_sees_the_new_weights() -> None:
    """64 examples in batches of 8: no smaller batch, so steps 4 to 9 are all replays; the
    evaluation at step 6 fills LoRA's no-grad caches, and the one at step 9 must not use
    them stale."""
    held = {k: torch.stack([d[k] for d in _data(16, seed=5)]) for k in ("input_ids",
            "attention_mask", "label")}  # fmt: skip
    cfg = TrainerConfig(steps=9, batch_size=8, lr=1e-2, device="cuda", step_mode="graphs",
                        eval_every=3)  # fmt: skip
    trainer = Trainer(_model(), classification_loss, _data(64), cfg, output_dir=None,
                      eval_fn=_eval_fn(held), progress=False)  # fmt: skip
    result = trainer.train()
    assert result.step_mode is not None and result.step_mode.fast_steps == 6
    fresh = _model().cuda().eval()
    fresh.load_state_dict(trainer.model.state_dict())
    with torch.no_grad():
        expected = _eval_fn(held)(fresh)["eval_loss"]
    assert result.metrics["eval_loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert result.history[-1]["eval_loss"] != result.history[-2]["eval_loss"]  # it trained


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_run_checkpoints_and_resumes(tmp_path: Path) -> None:
    """A graphed run cut at step 6 and resumed (capturing again) ends where an
    uninterrupted graphed run ends, up to float rounding; its optimizer state is the
    optimizer's own (a checkpoint reads what the replays wrote)."""

    def run(out: Path, steps: int, resume: bool = False) -> dict[str, Tensor]:
        cfg = TrainerConfig(steps=steps, batch_size=8, lr=1e-2, device="cuda",
                            step_mode="graphs", checkpoint_every=3)  # fmt: skip
        Trainer(_model(), classification_loss, _data(64), cfg, output_dir=out,
                progress=False).train(resume=resume)  # fmt: skip
        ckpt = read_checkpoint(out)
        assert ckpt is not None and float(ckpt.optimizer["state/0/step"]) == steps
        return ckpt.trainable

    full = run(tmp_path / "full", 12)
    run(tmp_path / "cut", 6)
    resumed = run(tmp_path / "cut", 12, resume=True)
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_a_step_that_synchronises_falls_back_under_auto_and_is_refused_when_forced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A loss that reads a value on the host (``float(loss)``) cannot be captured: ``auto``
    trains on eagerly (and trains as eager mode does), ``graphs`` says why it cannot."""

    def syncing(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        loss = classification_loss(model, batch)
        assert float(loss) >= 0  # a host synchronisation
        return loss

    def run(mode: str) -> tuple[Trainer, Any]:
        cfg = TrainerConfig(steps=6, batch_size=8, lr=1e-3, device="cuda", step_mode=mode)
        trainer = Trainer(_model(), syncing, _data(64), cfg, output_dir=None, progress=False)
        return trainer, trainer.train()

    with caplog.at_level("WARNING", logger="unipeft.training"):
        auto, result = run("auto")
    report = result.step_mode
    assert (report.mode, report.eager_steps, report.fast_steps) == ("eager", 6, 0)
    assert "capturing the step at batch 3" in report.reason and "fell back" in caplog.text
    eager, _ = run("eager")
    for (name, a), b in zip(auto.model.named_parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4, msg=name)
    with pytest.raises(TrainingError, match=r"capturing the step at batch 3.*synchronise"):
        run("graphs")
