"""Every refusal of the ``unipeft`` command: one ``error:`` line (and at most one ``hint:``
line) on stderr, exit code 2, no traceback, the culprit named, and nothing written: the
input files are byte-identical afterwards and no output folder is left behind.

The cases run :func:`unipeft.cli.main` in-process; two run the real command in a child
process, to prove that no traceback reaches a terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _state import files

from unipeft.cli import main

YAML = """model: tiny:bert
data:
  path: train.csv
method: lora
budget: 2%
trainer:
  steps: 2
  batch_size: 4
  device: cpu
output_dir: out
"""
CSV = "text,label\ngood film,pos\nbad film,neg\nfine film,pos\nsad film,neg\n"
JSONL = '{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'
LATIN1 = "text,label\ngood film,pos\ncafé film,neg\n".encode("latin-1")


@dataclass
class Case:
    """``argv`` (``{d}`` is the case's folder) run on ``given`` files (a name ending in ``/``
    is a folder); every fragment must appear in the error line."""

    id: str
    argv: list[str]
    fragments: tuple[str, ...]
    given: dict[str, str | bytes] = field(default_factory=dict)


def train(yaml: str | bytes, *fragments: str, id: str, **given: str | bytes) -> Case:
    """A ``unipeft train`` case: ``yaml`` as ``run.yaml`` next to ``train.csv`` (``CSV``
    unless ``given`` replaces it); keyword names use ``_`` for ``.``."""
    files_ = {"run.yaml": yaml, "train.csv": CSV}
    files_.update({name.replace("_", "."): text for name, text in given.items()})
    return Case(id, ["train", "{d}/run.yaml", "--no-progress"], fragments, files_)


def edit(old: str, new: str) -> str:
    assert old in YAML, old
    return YAML.replace(old, new)


def cmd(id: str, argv: str, *fragments: str, **given: str | bytes) -> Case:
    files_ = {name.replace("__", "/").replace("_", "."): text for name, text in given.items()}
    return Case(id, argv.split(), fragments, files_)


CASES = [
    # ------------------------------------------------------------ the YAML file itself
    train("model: [tiny:bert\n", "run.yaml:2", "not valid YAML", id="yaml-unclosed-list"),
    train("model: tiny:bert\n  data: x: y\n", "run.yaml:2", "not valid YAML", id="yaml-bad-map"),
    train("model: tiny:bert\n\tdata: 1\n", "run.yaml:2", "not valid YAML", id="yaml-tab"),
    train('model: "tiny:bert\n', "run.yaml", "not valid YAML", id="yaml-unclosed-quote"),
    train(YAML + "method: bitfit\n", "run.yaml:11", "'method' appears twice", id="yaml-dup-key"),
    train("- model\n- data\n", "run.yaml:1", "must be a mapping", "output_dir", id="yaml-list"),
    train("", "run.yaml", "is empty", "model, data, method", id="yaml-empty"),
    train("# nothing yet\n", "run.yaml", "is empty", id="yaml-only-comments"),
    train("? [a, b]\n: 1\n", "run.yaml:1", "unhashable key", id="yaml-list-key"),
    train(
        YAML.encode() + "# café\n".encode("latin-1"),
        "run.yaml:11",
        "not UTF-8",
        "0xe9",
        id="yaml-latin1",
    ),
    train(b"\xff\xfe" + YAML.encode("utf-16-le"), "run.yaml:1", "not UTF-8", id="yaml-utf16"),
    Case("yaml-missing", ["train", "{d}/nope.yaml"], ("nope.yaml", "does not exist")),
    Case("yaml-is-folder", ["train", "{d}/conf"], ("conf", "is a folder"), {"conf/": ""}),
    # ------------------------------------------------------------ keys and their types
    train(YAML + "epochs: 3\n", "run.yaml:11", "unknown key 'epochs'", "Known keys", id="key-top"),
    train(
        edit("  device: cpu", "  device: cpu\n  lrr: 0.1"),
        "run.yaml:10",
        "'trainer.lrr'",
        "Did you mean 'lr'?",
        id="key-trainer",
    ),
    train(
        edit("  path: train.csv", "  path: train.csv\n  text_col: t"),
        "run.yaml:4",
        "'data.text_col'",
        "text_column",
        id="key-data",
    ),
    train(edit("method: lora\n", ""), "missing required key 'method'", id="key-missing"),
    train(edit("steps: 2", "steps: two"), "run.yaml:7", "trainer.steps", "integer", id="type-int"),
    train(
        edit("  steps: 2", "  steps: 2\n  lr: -1"),
        "run.yaml:8",
        "trainer.lr",
        "greater than 0",
        id="type-negative-lr",
    ),
    train(
        edit("device: cpu", "device: tpu"),
        "run.yaml:9",
        "trainer.device",
        "'cuda'",
        id="type-device",
    ),
    train(
        edit("data:\n  path: train.csv", "data: train.csv"),
        "run.yaml:2",
        "data",
        "dictionary",
        id="type-data-string",
    ),
    train(
        edit("trainer:\n  steps: 2\n  batch_size: 4\n  device: cpu\n", "trainer: 3\n"),
        "run.yaml:6",
        "trainer",
        id="type-trainer",
    ),
    train(edit("budget: 2%", "budget: lots"), "run.yaml:5", "budget", "'lots'", id="budget-text"),
    train(
        edit("tiny:bert", "tiny:bret"),
        "run.yaml:1",
        "'tiny:bret'",
        "'tiny:bert'",
        id="unknown-model",
    ),
    train(
        edit("method: lora", "method: lorra"),
        "run.yaml:4",
        "'lorra'",
        "'lora'",
        id="unknown-method",
    ),
    # ------------------------------------------------------------ the method's config
    train(
        edit("budget: 2%", "config: {r: 0}"),
        "run.yaml:5",
        "config.r",
        "greater than",
        id="config-range",
    ),
    train(
        edit("budget: 2%", "config: {rank: 4}"),
        "run.yaml:5",
        "'config.rank'",
        "alpha",
        id="config-unknown-key",
    ),
    train(
        edit("budget: 2%", "config: {r: four}"),
        "run.yaml:5",
        "config.r",
        "'four'",
        id="config-type",
    ),
    train(edit("budget: 2%", "config: [4]"), "run.yaml:5", "config", id="config-not-mapping"),
    train(edit("budget: 2%", "budget: 0.001%"), "'lora'", "budget", id="budget-too-small"),
    train(edit("budget: 2%", "targets: [attn.x]"), "'attn.x'", id="target-unknown"),
    # ------------------------------------------------------------ the data files
    train(YAML, "train.csv:3", "not UTF-8", id="csv-latin1", train_csv=LATIN1),
    train(
        YAML,
        "train.csv:3",
        "no value for column 'label'",
        id="csv-row-without-label",
        train_csv="text,label\ngood,pos\nbad\nfine,pos\n",
    ),
    train(
        YAML,
        "train.csv:3",
        "no 'label'",
        id="csv-empty-label",
        train_csv="text,label\ngood,pos\nbad,\n",
    ),
    train(
        YAML,
        "train.csv:2",
        "3 values",
        "quote",
        id="csv-extra-value",
        train_csv="text,label\ngood, fine film,pos\n",
    ),
    train(YAML, "train.csv", "is empty", "text,label", id="csv-empty", train_csv=""),
    train(YAML, "train.csv", "no examples", id="csv-header-only", train_csv="text,label\n"),
    train(
        edit("path: train.csv", "path: train.csv\n  text_column: body"),
        "train.csv:1",
        "'body'",
        "'text', 'label'",
        id="csv-missing-column",
    ),
    train(
        YAML,
        "train.csv",
        "single label 'pos'",
        id="csv-single-label",
        train_csv="text,label\ngood,pos\nfine,pos\n",
    ),
    train(
        edit("train.csv", "nope.csv"), "nope.csv", "does not exist", "data.path", id="csv-missing"
    ),
    train(
        edit("train.csv", "rows.csv"),
        "rows.csv",
        "is a folder",
        id="csv-is-folder",
        **{"rows.csv/": ""},
    ),
    train(
        edit("train.csv", "train.txt"),
        "train.txt",
        "'.txt'",
        ".jsonl",
        id="data-suffix",
        train_txt=CSV,
    ),
    train(
        edit("path: train.csv", "path: train.csv\n  eval_path: eval.csv"),
        "eval.csv:3",
        "label 'meh'",
        "'neg', 'pos'",
        id="eval-unknown-label",
        eval_csv="text,label\ngood,pos\nso so,meh\n",
    ),
    train(
        edit("path: train.csv", "path: train.csv\n  eval_path: eval.csv"),
        "eval.csv:3",
        "not UTF-8",
        id="eval-latin1",
        eval_csv=LATIN1,
    ),
    train(
        edit("train.csv", "train.jsonl"),
        "train.jsonl:3",
        "not valid JSON",
        id="jsonl-bad-json",
        train_jsonl=JSONL + "{oops}\n",
    ),
    train(
        edit("train.csv", "train.jsonl"),
        "train.jsonl:1",
        "JSON object",
        id="jsonl-list",
        train_jsonl='["good", "pos"]\n',
    ),
    train(
        edit("train.csv", "train.jsonl"),
        "train.jsonl:3",
        "'label'",
        id="jsonl-null-label",
        train_jsonl=JSONL + '{"text": "meh", "label": null}\n',
    ),
    train(
        edit("train.csv", "train.jsonl"),
        "train.jsonl:3",
        "'label' not found",
        id="jsonl-missing-key",
        train_jsonl=JSONL + '{"text": "meh"}\n',
    ),
    # ------------------------------------------------------------ the output folder
    train(
        edit("output_dir: out", "output_dir: train.csv/out"),
        "train.csv",
        "is a file",
        id="output-under-a-file",
    ),
    train(
        YAML,
        "already holds a checkpoint",
        "--resume",
        id="output-has-checkpoint",
        **{"out/checkpoint/": ""},
    ),
    Case(
        "resume-damaged-checkpoint",
        ["train", "{d}/run.yaml", "--resume", "--no-progress"],
        ("out/checkpoint",),
        {"run.yaml": YAML, "train.csv": CSV, "out/checkpoint/": ""},
    ),
    Case(
        "resume-checkpoint-not-object",
        ["train", "{d}/run.yaml", "--resume", "--no-progress"],
        ("state.json",),
        {"run.yaml": YAML, "train.csv": CSV, "out/checkpoint/state.json": "[]"},
    ),
    # ------------------------------------------------------------ options and arguments
    cmd("train-no-config", "train", "Missing argument", "config"),
    cmd("train-unknown-option", "train {d}/run.yaml --fast", "--fast", run_yaml=YAML),
    cmd("unknown-command", "trian", "'trian'"),
    cmd("unknown-root-option", "--verbose list", "--verbose"),
    cmd("list-unknown-family", "list --family nope", "'nope'", "reparameterized"),
    cmd("list-unknown-option", "list --bogus", "--bogus"),
    cmd("plugins-extra-argument", "plugins extra", "extra argument", "extra"),
    cmd("inspect-unknown-method", "inspect tiny:bert --method lorra", "'lorra'", "'lora'"),
    cmd("inspect-unknown-backbone", "inspect tiny:bertt", "'bertt'", "bert"),
    cmd("inspect-unknown-spec", "inspect gguf:model", "'gguf:model'", "tiny:<name>"),
    cmd("inspect-bad-set", "inspect tiny:bert -m lora --set r=abc", "'r'"),
    cmd("inspect-set-no-value", "inspect tiny:bert -m lora --set r", "key=value"),
    cmd("inspect-bad-budget", "inspect tiny:bert -m lora --budget lots", "'lots'"),
    cmd("inspect-hf-bad-json", "inspect hf:{d}/config.json", "config.json", config_json="{oops"),
    cmd(
        "inspect-hf-latin1",
        "inspect hf:{d}/config.json",
        "config.json",
        config_json='{"model_type": "bért"}'.encode("latin-1"),
    ),
    cmd("demo-no-output", "demo", "--output"),
    cmd("demo-bad-seed", "demo --output {d}/res --seed x", "--seed", "'x'"),
    cmd("demo-bad-device", "demo --output {d}/res --device tpu", "'tpu'"),
    cmd(
        "demo-output-under-file",
        "demo --output {d}/f.txt/res --quick",
        "cannot be created",
        f_txt="x",
    ),
    cmd("bench-latency-bad-number", "bench latency --output {d}/res --batch 0", "--batch"),
    cmd(
        "bench-latency-not-a-number",
        "bench latency --output {d}/res --length=ten",
        "--length",
        "'ten'",
    ),
    cmd("bench-latency-bad-model", "bench latency --output {d}/res --model foo", "'foo'"),
    cmd("bench-latency-bad-device", "bench latency --output {d}/res --device tpu", "'tpu'"),
    cmd("bench-memory-bad-model", "bench memory --output {d}/res --model tiny:nope", "'nope'"),
    cmd("bench-rank-sweep-bad-ranks", "bench rank-sweep --output {d}/res --ranks 1,x", "--ranks"),
    cmd("bench-rank-sweep-zero-rank", "bench rank-sweep --output {d}/res --ranks 0", "--ranks"),
    cmd("bench-perf-bad-repeats", "bench perf --repeats 0", "--repeats"),
    cmd("bench-perf-bad-device", "bench perf --device tpu", "'tpu'"),
    cmd("bench-perf-output-folder", "bench perf --output {d}/dir", "is a folder", dir__=""),
    cmd("bench-unknown-command", "bench speed", "'speed'"),
]


def _setup(root: Path, given: dict[str, str | bytes]) -> None:
    for name, content in given.items():
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def check_refusal(stderr: str, fragments: tuple[str, ...]) -> str:
    """The one-line contract; returns the error line."""
    lines = stderr.rstrip("\n").split("\n")
    assert "Traceback" not in stderr, stderr
    assert 1 <= len(lines) <= 2, stderr
    assert lines[0].startswith("error: "), stderr
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refusal_is_one_line_and_changes_nothing(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _setup(tmp_path, case.given)
    before, tree = files(tmp_path), _tree(tmp_path)
    code = main([arg.replace("{d}", str(tmp_path)) for arg in case.argv])
    captured = capsys.readouterr()
    check_refusal(captured.err, tuple(f.replace("{d}", str(tmp_path)) for f in case.fragments))
    assert code == 2, captured.err
    assert files(tmp_path) == before  # the input files, byte for byte
    assert _tree(tmp_path) == tree  # and no output folder (or anything else) left behind


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 45
    assert len({c.id for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--debug", "train", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert "RunConfigError" in err
    assert err.rstrip("\n").split("\n")[-1].startswith("error: ")
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2  # --debug does not stick
    assert "Traceback" not in capsys.readouterr().err


def _boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("boom")


def test_internal_error_is_one_line_with_a_hint_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules["unipeft.training.run"], "run", _boom)
    (tmp_path / "run.yaml").write_text(YAML)
    assert main(["train", str(tmp_path / "run.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.split("\n")[:2] == [
        "error: internal error: RuntimeError: boom",
        "hint: rerun with --debug for the traceback, and report it if it looks like a bug",
    ]
    assert "Traceback" not in err
    assert main(["--debug", "train", str(tmp_path / "run.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise RuntimeError("boom")' in err
    assert err.rstrip("\n").split("\n")[-1] == "error: internal error: RuntimeError: boom"


def test_success_is_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    assert main(["--version"]) == 0
    assert "unipeft" in capsys.readouterr().out


CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80", "NO_COLOR": "1"}


@pytest.mark.parametrize(
    ("given", "argv", "fragments"),
    [
        (
            {"run.yaml": YAML.encode() + b"# caf\xe9\n"},
            ["-m", "unipeft", "train", "run.yaml"],
            ("run.yaml:11", "not UTF-8"),
        ),
        (
            {"run.yaml": YAML, "train.csv": LATIN1},
            ["-m", "unipeft", "train", "run.yaml"],
            ("train.csv:3", "not UTF-8"),
        ),
    ],
    ids=["yaml-latin1", "csv-latin1"],
)
def test_a_real_process_shows_no_traceback(
    tmp_path: Path, given: dict[str, str | bytes], argv: list[str], fragments: tuple[str, ...]
) -> None:
    _setup(tmp_path, given)
    before, tree = files(tmp_path), _tree(tmp_path)
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=tmp_path,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    check_refusal(done.stderr, fragments)
    assert done.stdout == ""
    assert files(tmp_path) == before and _tree(tmp_path) == tree
