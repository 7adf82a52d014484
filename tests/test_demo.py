"""The demo: its quick run's outputs, determinism, data loaders and order, bad output folders,
seeds, validation-chosen learning rates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from unipeft.cli.demo import register
from unipeft.demo import ROW_KEYS, DemoError, OutputError, run_demo
from unipeft.demo.chosen import CHOSEN, FACTORS, chosen
from unipeft.demo.clip import TASK as CLIP_TASK
from unipeft.demo.clip import harmonic_mean
from unipeft.demo.data import digits_transfer_split, load_vader_lexicon, vader_polarity_split
from unipeft.demo.report import PLOT, RESULTS, SUMMARY, read_results, summarise
from unipeft.demo.runner import select_lr
from unipeft.demo.train import DrawnInSequence, Recipe, Row, shuffled

FAMILIES = {"full", "probe", "reparameterized", "additive", "selective", "hybrid", "moe"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, seed=0, quick=True, show=False)
    return out, read_results(out)


def test_results_schema(quick_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, rows = quick_run
    assert rows
    for row in rows:
        assert set(row) == set(ROW_KEYS)
        zero_shot = row["family"] == "zero-shot"
        assert (row["trainable_fraction"] == 0) if zero_shot else 0 < row["trainable_fraction"] <= 1
        assert 0 <= row["accuracy"] <= 1
        assert row["train_seconds"] >= 0
        assert isinstance(row["peak_memory_bytes"], int) and row["peak_memory_bytes"] >= 0
        assert row["seed"] == 0 and row["validation"] == {}  # one seed, stored choices
        assert zero_shot or row["hyperparameters"]["lr"] > 0
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    assert len(tasks) == 5 and tasks[0].startswith("text") and tasks[4] == CLIP_TASK
    convnet = {r["method"] for r in rows if r["task"] == "vision: digits 0-4 -> 5-9 / timm ResNet"}
    assert {"full fine-tuning", "linear probe", "lora", "dora", "ssf", "bitfit"} <= convnet
    assert {r["family"] for r in rows if r["task"] == tasks[0]} == FAMILIES
    full = [r for r in rows if r["family"] == "full"]
    assert full and all(r["trainable_fraction"] == 1.0 for r in full)
    text_peft = [r for r in rows if r["task"] == tasks[0] and r["family"] not in ("full", "probe")]
    assert all(r["trainable_fraction"] <= 0.0101 for r in text_peft)  # the 1% budget (+ head)
    for row in rows:
        if row["task"] == CLIP_TASK:  # base-to-novel: accuracy is the harmonic mean
            base, novel = row["base_accuracy"], row["novel_accuracy"]
            assert row["accuracy"] == pytest.approx(harmonic_mean(base, novel))
        else:
            assert row["base_accuracy"] is None and row["novel_accuracy"] is None
    clip_methods = {r["method"] for r in rows if r["task"] == CLIP_TASK}
    assert {"zero-shot", "linear probe", "full fine-tuning", "lora"} <= clip_methods


def test_summary_is_written(quick_run: tuple[Path, list[dict[str, Any]]]) -> None:
    out, rows = quick_run
    summary = json.loads((out / SUMMARY).read_text())
    assert [(e["task"], e["method"]) for e in summary] == [(r["task"], r["method"]) for r in rows]
    for entry, row in zip(summary, rows):
        assert entry["seeds"] == [0]
        assert entry["accuracy"] == {
            "mean": row["accuracy"],
            "std": None,
            "min": row["accuracy"],
            "max": row["accuracy"],
        }


def _row(seed: int, accuracy: float, method: str = "lora") -> Row:
    return Row("t", method, "reparameterized", 0.01, accuracy, 1.0, 10, seed=seed)


def test_summary_gives_mean_and_sample_std_over_seeds() -> None:
    rows = [_row(0, 0.90), _row(1, 0.94), _row(2, 0.95), _row(0, 0.5, "bitfit")]
    lora, bitfit = summarise(rows)
    assert lora["seeds"] == [0, 1, 2] and bitfit["seeds"] == [0]
    assert lora["accuracy"]["mean"] == pytest.approx(0.93)
    assert lora["accuracy"]["std"] == pytest.approx(0.026457513, rel=1e-6)  # n - 1
    assert (lora["accuracy"]["min"], lora["accuracy"]["max"]) == (0.90, 0.95)
    assert bitfit["accuracy"]["std"] is None and lora["base_accuracy"] is None


def test_select_lr_takes_the_best_validation_score_first_of_equals() -> None:
    recipe = Recipe("r", "full", lr=1.0, head_lr=4.0, grid=(0.5, 1.0, 2.0))
    scores = {0.5: 0.7, 1.0: 0.9, 2.0: 0.9}
    best, seen = select_lr(recipe, lambda r: scores[r.lr])
    assert (best.lr, best.head_lr) == (1.0, 4.0)  # 1.0 and 2.0 tie: the first wins
    assert seen == {"lr=0.5": 0.7, "lr=1": 0.9, "lr=2": 0.9}
    best, _ = select_lr(recipe, lambda r: {0.5: 1.0, 1.0: 0.0, 2.0: 0.0}[r.lr])
    assert (best.lr, best.head_lr) == (0.5, 2.0)  # the head's rate scales with it
    assert select_lr(Recipe("n", "full"), lambda r: 1 / 0) == (Recipe("n", "full"), {})


def test_stored_choices_come_from_the_grids() -> None:
    from unipeft.demo import clip, text, vision

    lists = {text.TASK: text.recipes(False), clip.TASK: clip.recipes(False)}
    for kind, (name, _) in vision.BACKBONES.items():
        lists[name] = vision.recipes(False, kind)
    assert set(CHOSEN) == set(lists)
    for task, recipes in lists.items():
        for recipe in recipes:
            assert recipe.grid == tuple(recipe.grid[1] * f for f in FACTORS)
            if recipe.name in CHOSEN[task]:
                assert recipe.lr == CHOSEN[task][recipe.name]
                assert any(recipe.lr == pytest.approx(g) for g in recipe.grid)
    quick = chosen(text.TASK, [Recipe("lora", "reparameterized", lr=5e-3)], quick=True)
    assert quick[0].lr == 5e-3  # a quick run keeps the starting rates


def test_validation_splits_are_carved_from_the_training_data() -> None:
    from unipeft.demo.vision import _task

    x, y = torch.arange(50.0).view(50, 1), torch.arange(50) % 5
    tx, ty = torch.arange(100.0, 110.0).view(10, 1), torch.arange(10) % 5
    task = _task("t", lambda: None, (x, y), (tx, ty), 40)  # type: ignore[arg-type,return-value]
    assert task.validation is not None
    val = task.validation()
    fit = torch.cat([b[0]["pixels"] for b in val.probe_batches])
    held = torch.cat([b[0]["pixels"] for b in val.test_batches])
    assert fit.flatten().tolist() == list(range(40)) and held.flatten().tolist() == list(
        range(40, 50)
    )  # never the test images
    assert val.validation is None


def test_seeds_must_be_distinct(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="distinct"):
        run_demo(tmp_path, seeds=[0, 0], quick=True)
    with pytest.raises(DemoError, match="tasks"):
        run_demo(tmp_path, tasks=["audio"], quick=True)


def test_plot_is_a_png(quick_run: tuple[Path, list[dict[str, Any]]]) -> None:
    out, _ = quick_run
    assert (out / PLOT).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_same_seed_same_accuracies(
    quick_run: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, first = quick_run
    run_demo(tmp_path, seed=0, quick=True, show=False)
    second = read_results(tmp_path)

    def key(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(r["task"], r["method"], r["trainable_fraction"], r["accuracy"]) for r in rows]

    assert key(first) == key(second)


def test_vader_split_sizes_are_fixed_by_the_seed() -> None:
    entries = load_vader_lexicon()
    assert len(entries) == 7520
    kept = {e.token for e in entries if abs(e.mean) >= 0.5} - {"d:", "d="}  # 2 conflicts
    a, b = vader_polarity_split(0), vader_polarity_split(0)
    other = vader_polarity_split(1)
    assert a == b
    for split in (a, other):
        assert len(split.test_texts) == round(0.2 * len(kept)) == 1360
        assert len(split.train_texts) == len(kept) - 1360 == 5441
        assert len(split.train_labels) == len(split.train_texts)
        assert len(split.test_labels) == len(split.test_texts)
        assert sorted(split.train_texts + split.test_texts) == sorted(kept)  # each token once
    assert a.test_texts != other.test_texts


def test_vader_labels_are_the_sign_of_the_mean_rating() -> None:
    means: dict[str, list[float]] = {}
    for e in load_vader_lexicon():
        means.setdefault(e.token, []).append(e.mean)
    split = vader_polarity_split(0)
    pairs = [*zip(split.train_texts, split.train_labels), *zip(split.test_texts, split.test_labels)]
    for token, label in pairs:
        for mean in means[token]:  # a token listed twice has agreeing entries
            assert abs(mean) >= 0.5
            assert label == int(mean > 0)
    assert {label for _, label in pairs} == {0, 1}
    dropped = [t for t, m in means.items() if all(abs(x) < 0.5 for x in m)]
    assert dropped and not set(dropped) & {t for t, _ in pairs}


def test_vader_lexicon_rows() -> None:
    entry = load_vader_lexicon()[0]
    assert len(entry.ratings) == 10
    assert entry.mean == pytest.approx(sum(entry.ratings) / 10)


def test_digits_split_by_class() -> None:
    data = digits_transfer_split(0)
    assert data.pretrain.classes == (0, 1, 2, 3, 4)
    assert data.adapt.classes == (5, 6, 7, 8, 9)
    for split in (data.pretrain, data.adapt):
        assert split.train_x.shape[1:] == (3, 32, 32)
        assert set(split.train_y.tolist()) == set(range(5))
        assert set(split.test_y.tolist()) == set(range(5))
    assert digits_transfer_split(0).adapt.test_y.tolist() == data.adapt.test_y.tolist()


def test_data_order_is_one_generator_drawing_epoch_after_epoch() -> None:
    draw = shuffled(10, 4)
    gen = torch.Generator().manual_seed(3)
    expected = [draw(gen) for _ in range(3)]  # the order of one generator, seeded once
    order = DrawnInSequence(draw)
    assert [len(b) for b in expected[0]] == [4, 4, 2]
    assert [order(3, e) for e in (0, 0, 1, 2)] == [expected[i] for i in (0, 0, 1, 2)]
    assert order(3, 1) == expected[1]  # an earlier epoch again (a resume): replayed
    assert order(4, 0) != expected[0] and order(3, 2) == expected[2]


def _no_training(*args: object, **kwargs: object) -> None:
    raise AssertionError("training started although the output folder is unusable")


def test_output_under_a_file_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import unipeft.demo as demo

    monkeypatch.setattr(demo, "_run_parts", _no_training)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot be created"):
        run_demo(blocker / "out", quick=True, jobs=1)
    with pytest.raises(OutputError, match="cannot be created"):
        run_demo(blocker, quick=True, jobs=1)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere"
)
def test_read_only_output_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import unipeft.demo as demo

    monkeypatch.setattr(demo, "_run_parts", _no_training)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            run_demo(locked, quick=True, jobs=1)
    finally:
        locked.chmod(0o700)
    assert not list(locked.iterdir())


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
def test_unwritable_folder_fails_before_training_even_for_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import unipeft.demo as demo

    monkeypatch.setattr(demo, "_run_parts", _no_training)
    with pytest.raises(OutputError, match="not writable"):
        run_demo("/sys/kernel", quick=True, jobs=1)  # sysfs refuses new files, even to root


def test_cli_registers_demo_and_reports_a_bad_output(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    assert [c.name for c in app.registered_commands] == ["demo"]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = CliRunner().invoke(app, ["--output", str(blocker / "out"), "--quick"])
    assert result.exit_code == 2
    assert "cannot be created" in result.output
    assert not (tmp_path / RESULTS).exists()
    result = CliRunner().invoke(app, ["--output", str(tmp_path / "x"), "--seeds", "0,a"])
    assert result.exit_code == 2 and "--seeds" in result.output


def test_module_entry_point_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "unipeft.demo", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for option in ("--output", "--quick", "--seeds", "--select", "--jobs", "--tasks"):
        assert option in result.stdout


def test_unknown_device_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import unipeft.demo as demo

    monkeypatch.setattr(demo, "_run_parts", _no_training)
    with pytest.raises(demo.DemoError, match="device"):
        run_demo(tmp_path / "out", quick=True, device="tpu")
    assert not (tmp_path / "out").exists()


def test_select_trains_the_grid_on_the_validation_task_then_tests_once() -> None:
    from torch import nn

    from unipeft.demo.models import ImageClassifier
    from unipeft.demo.runner import Task, run_recipes
    from unipeft.demo.train import TensorExamples, fetched
    from unipeft.demo.vision import image_batches

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=gen), torch.arange(40) % 2
    seen: list[int] = []

    def make() -> ImageClassifier:
        return ImageClassifier(nn.Linear(4, 3), 3, 2)

    def task(n_fit: int | None, test_x: torch.Tensor, test_y: torch.Tensor) -> Task:
        fit_x, fit_y = x[: n_fit or 40], y[: n_fit or 40]
        seen.append(len(test_y))
        return Task(
            name="t",
            make=make,
            train_data=TensorExamples("pixels", fit_x, fit_y),
            collate=fetched,
            draw=shuffled(len(fit_y), 8),
            test_batches=image_batches(test_x, test_y),
            probe_batches=image_batches(fit_x, fit_y),
            validation=None if n_fit is None else lambda: task(None, x[n_fit:], y[n_fit:]),
        )

    test_x, test_y = torch.randn(6, 4, generator=gen), torch.tensor([0, 1] * 3)
    lines: list[str] = []
    recipe = Recipe("full fine-tuning", "full", lr=1e-2, epochs=1, grid=(1e-3, 1e-2))
    (row,) = run_recipes(
        task(30, test_x, test_y), [recipe], 0, torch.device("cpu"), 1.0, lines.append, select=True
    )
    assert seen == [6, 10]  # the test task, then one validation task: the last 10 images
    assert set(row.validation) == {"lr=0.001", "lr=0.01"}
    assert row.hyperparameters["lr"] in (1e-3, 1e-2)
    assert any("validation" in line for line in lines)
    best = max(row.validation, key=lambda k: row.validation[k])  # first of equals, as max
    assert f"lr={row.hyperparameters['lr']:g}" == best
