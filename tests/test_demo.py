"""The demo: its quick run's outputs, determinism, data loaders and order, bad output folders."""

from __future__ import annotations

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
from unipeft.demo import ROW_KEYS, OutputError, run_demo
from unipeft.demo.data import digits_transfer_split, load_vader_lexicon, vader_polarity_split
from unipeft.demo.report import PLOT, RESULTS, read_results
from unipeft.demo.train import DrawnInSequence, shuffled

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
        assert 0 < row["trainable_fraction"] <= 1
        assert 0 <= row["accuracy"] <= 1
        assert row["train_seconds"] >= 0
        assert isinstance(row["peak_memory_bytes"], int) and row["peak_memory_bytes"] >= 0
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    assert len(tasks) == 3 and tasks[0].startswith("text")
    assert {r["family"] for r in rows if r["task"] == tasks[0]} == FAMILIES
    full = [r for r in rows if r["family"] == "full"]
    assert full and all(r["trainable_fraction"] == 1.0 for r in full)
    text_peft = [r for r in rows if r["task"] == tasks[0] and r["family"] not in ("full", "probe")]
    assert all(r["trainable_fraction"] <= 0.0101 for r in text_peft)  # the 1% budget (+ head)


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


def test_module_entry_point_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "unipeft.demo", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--output" in result.stdout and "--quick" in result.stdout


def test_unknown_device_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import unipeft.demo as demo

    monkeypatch.setattr(demo, "_run_parts", _no_training)
    with pytest.raises(demo.DemoError, match="device"):
        run_demo(tmp_path / "out", quick=True, device="tpu")
    assert not (tmp_path / "out").exists()
