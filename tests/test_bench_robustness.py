"""The robustness benchmark: corruption properties, its metrics, its outputs and its CLI."""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

import unipeft.cli
from unipeft.bench.corruptions import (
    IMAGE_CORRUPTIONS,
    PROMPT_TEMPLATES,
    SEVERITIES,
    TEXT_CORRUPTIONS,
    corrupt_images,
    corrupt_words,
    edit_distance,
    generator,
    prompt_templates,
    template_distance,
)
from unipeft.bench.robustness import (
    FULL,
    PROMPTS,
    RobustnessError,
    RobustnessRow,
    _classifier_rows,
    _KeptCopies,
    _same,
    check_request,
    markdown,
    recipe_names,
    with_metrics,
    write_outputs,
)
from unipeft.demo.data import digits_transfer_split, vader_polarity_split

LEVELS = (0, *SEVERITIES)


@pytest.fixture(scope="module")
def digits() -> Tensor:
    return digits_transfer_split(0).adapt.test_x[:48]


@pytest.fixture(scope="module")
def words() -> list[str]:
    return vader_polarity_split(0).test_texts[:400]


# ------------------------------------------------------------------ images
@pytest.mark.parametrize("kind", IMAGE_CORRUPTIONS)
def test_image_corruption_is_seeded_and_keeps_shape_and_dtype(kind: str, digits: Tensor) -> None:
    for dtype in (torch.float32, torch.float64):
        x = digits.to(dtype)
        a = corrupt_images(x, kind, 2, generator(3, kind))
        b = corrupt_images(x, kind, 2, generator(3, kind))
        assert a.shape == x.shape and a.dtype == dtype
        assert torch.equal(a, b)
        assert not torch.equal(a, x)
    assert torch.equal(corrupt_images(digits, kind, 0, generator(0, kind)), digits)


@pytest.mark.parametrize("kind", IMAGE_CORRUPTIONS)
def test_image_severity_moves_further_from_clean(kind: str, digits: Tensor) -> None:
    dist = [
        float(((corrupt_images(digits, kind, s, generator(0, kind)) - digits) ** 2).mean())
        for s in LEVELS
    ]
    assert dist[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(dist)), dist


def test_random_image_corruptions_depend_on_the_seed(digits: Tensor) -> None:
    for kind in ("gaussian_noise", "rotation", "occlusion"):
        a = corrupt_images(digits, kind, 1, generator(0, kind))
        b = corrupt_images(digits, kind, 1, generator(1, kind))
        assert not torch.equal(a, b), kind


def test_occlusion_is_one_grey_square_and_rotation_keeps_the_background(digits: Tensor) -> None:
    occluded = corrupt_images(digits, "occlusion", 1, generator(0, "occlusion"))
    grey = (occluded == 0).all(dim=1, keepdim=True).float()
    full = torch.nn.functional.avg_pool2d(grey, 8, stride=1)[:, 0] == 1  # all-grey 8x8 windows
    for i in range(len(digits)):
        found = False
        for top, left in full[i].nonzero().tolist():  # an 8-pixel square at severity 1
            outside = torch.ones(32, 32, dtype=torch.bool)
            outside[top : top + 8, left : left + 8] = False
            found |= bool((occluded[i][:, outside] == digits[i][:, outside]).all())
        assert found, i
    rotated = corrupt_images(digits, "rotation", 3, generator(0, "rotation"))
    assert torch.allclose(rotated[:, :, 0, 0], digits[:, :, 0, 0])  # corners: the background


def test_bad_image_input_is_refused(digits: Tensor) -> None:
    with pytest.raises(ValueError, match=r"unknown corruption 'fog'.*gaussian_noise"):
        corrupt_images(digits, "fog", 1, generator(0))
    with pytest.raises(ValueError, match="severity must be 0, 1, 2 or 3, got 4"):
        corrupt_images(digits, "contrast", 4, generator(0))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        corrupt_images(digits[0], "contrast", 1, generator(0))


# ------------------------------------------------------------------ words
def _non_letters(word: str) -> list[str]:
    return [c for c in word if not c.isalpha()]


def _is_subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(c in it for c in short)


@pytest.mark.parametrize("kind", TEXT_CORRUPTIONS)
def test_word_edits_touch_letters_only(kind: str, words: list[str]) -> None:
    for s in SEVERITIES:
        for clean, bad in zip(
            words, corrupt_words(words, kind, s, generator(0, kind)), strict=True
        ):
            assert _non_letters(bad) == _non_letters(clean), (clean, bad)
            if kind == "char_swap":
                assert sorted(bad) == sorted(clean) and len(bad) == len(clean)
            elif kind == "casing":
                assert bad.lower() == clean.lower()
                assert [i for i, c in enumerate(bad) if not c.isalpha()] == [
                    i for i, c in enumerate(clean) if not c.isalpha()
                ]
            else:
                added = Counter(bad) - Counter(clean)
                assert _is_subsequence(clean, bad) and all(c.isalpha() for c in added)


@pytest.mark.parametrize("kind", TEXT_CORRUPTIONS)
def test_word_severity_moves_further_from_clean(kind: str, words: list[str]) -> None:
    mean = []
    for s in LEVELS:
        bad = corrupt_words(words, kind, s, generator(0, kind))
        mean.append(sum(edit_distance(a, b) for a, b in zip(words, bad, strict=True)) / len(words))
    assert mean[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(mean)), mean
    again = corrupt_words(words, kind, 3, generator(0, kind))
    assert again == corrupt_words(words, kind, 3, generator(0, kind))
    assert corrupt_words(words, kind, 0, generator(0, kind)) == words


def test_word_edits_leave_letterless_tokens_alone() -> None:
    for kind in TEXT_CORRUPTIONS:
        assert corrupt_words([":)", "<3", ":-("], kind, 3, generator(0, kind)) == [
            ":)",
            "<3",
            ":-(",
        ]
    with pytest.raises(TypeError, match="not one string"):
        corrupt_words("good", "casing", 1, generator(0))


# ------------------------------------------------------------------ prompts
def test_prompt_templates_are_severity_word_edits_from_the_trained_ones() -> None:
    from unipeft.demo.clipmodel import TEMPLATES, default_tokenizer
    from unipeft.demo.data import DIGIT_NAMES

    tokenizer = default_tokenizer()
    for s in SEVERITIES:
        assert prompt_templates(s) == PROMPT_TEMPLATES[s]
        for template in prompt_templates(s):
            assert template_distance(template, TEMPLATES) == s, template
            tokenizer([template.format(n) for n in DIGIT_NAMES])  # only words it knows
    assert all(template_distance(t, TEMPLATES) == 0 for t in TEMPLATES)
    with pytest.raises(ValueError, match="1, 2 or 3"):
        prompt_templates(0)


# ------------------------------------------------------------------ metrics and outputs
def _row(method: str, clean: float, values: list[float | None], task: str = "t") -> RobustnessRow:
    corrupted = {"a": {"1": values[0], "2": values[1]}, PROMPTS: {"1": values[2]}}
    return RobustnessRow(task, method, "x", 0.5, clean, corrupted)


def test_metrics_follow_their_definitions() -> None:
    rows = with_metrics(
        [
            _row(FULL, 0.8, [0.6, 0.4, 0.5]),
            _row("lora", 0.9, [0.9, 0.3, None]),
            _row("lora", 0.9, [0.9, 0.3, None], task="other"),
        ]
    )
    full, lora, alone = rows
    assert full.mca == pytest.approx(0.5) and full.relative == pytest.approx(0.5 / 0.8)
    assert full.vs_full == pytest.approx(1.0)
    assert lora.mca == pytest.approx(0.6)  # the prompt entry does not apply: left out
    assert lora.relative == pytest.approx(0.6 / 0.9) and lora.vs_full == pytest.approx(1.2)
    assert alone.vs_full is None  # no full fine-tuning on its task


def _result(rows: list[RobustnessRow]) -> dict:
    return {"quick": True, "seed": 0, "seconds": 1.0, "rows": [r.as_dict() for r in rows]}


def test_markdown_and_heat_map(tmp_path: Path) -> None:
    result = _result(
        with_metrics([_row(FULL, 0.8, [0.6, 0.4, 0.5]), _row("coop", 0.7, [0.7, 0.5, None])])
    )
    text = markdown(result)
    assert "| full fine-tuning | 50 | 0.800 | 0.600 / 0.400 / n/a | 0.500 / n/a / n/a |" in text
    assert re.search(r"\| coop \|.*\| n/a \| 0\.600 \|", text)
    written = write_outputs(result, tmp_path)
    assert [p.name for p in written] == ["robustness.json", "robustness.md", "robustness.png"]
    assert json.loads(written[0].read_text())["rows"][1]["method"] == "coop"
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_requests_are_checked_before_training() -> None:
    check_request(["text"], ["lora", "linear probe"])
    with pytest.raises(RobustnessError, match="tasks must be some of text, vision, clip"):
        check_request(["audio"], None)
    with pytest.raises(RobustnessError, match=r"unknown recipe\(s\) \['lorra'\].*lora"):
        check_request(["text"], ["lorra"])
    with pytest.raises(RobustnessError, match=r"none of the recipes.*runs on task.*text.*bitfit"):
        check_request(["text", "clip"], ["coop"])


# ------------------------------------------------------------------ the pipeline, tiny
class _Tiny(nn.Module):
    """A classifier as the demo's: ``features`` and a ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh())
        self.head = nn.Linear(16, 2)

    def features(self, pixels: Tensor) -> Tensor:
        return self.encoder(pixels)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.features(pixels))


def _tiny_task() -> tuple[object, list, dict]:
    from unipeft.demo.runner import Task
    from unipeft.demo.train import TensorExamples, fetched, shuffled
    from unipeft.demo.vision import image_batches

    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (192,), generator=gen)
    x = torch.full((192, 3, 8, 8), -1.0)
    x[y == 0, :, :, :4] = 1.0  # class 0: the left half lit; class 1: the right half
    x[y == 1, :, :, 4:] = 1.0
    tx, ty, x, y = x[:64], y[:64], x[64:], y[64:]
    task = Task(
        name="tiny",
        make=_Tiny,
        train_data=TensorExamples("pixels", x, y),
        collate=fetched,
        draw=shuffled(len(y), 32),
        test_batches=image_batches(tx, ty),
        probe_batches=image_batches(x, y),
    )
    corrupted = {
        kind: {
            s: image_batches(corrupt_images(tx, kind, s, generator(0, kind)), ty)
            for s in SEVERITIES
        }
        for kind in ("gaussian_noise", "occlusion")
    }
    return task, image_batches(tx, ty), corrupted


def test_rows_score_the_classifier_the_demo_trained() -> None:
    from unipeft.demo.train import Recipe

    task, clean, corrupted = _tiny_task()
    recipes = [
        Recipe(FULL, "full", lr=1e-2, epochs=3),
        Recipe("linear probe", "probe", lr=5e-2, epochs=5),
    ]
    lines: list[str] = []
    rows = _classifier_rows(
        task, recipes, 0.02, clean, corrupted, 0, torch.device("cpu"), lines.append
    )
    assert [r.method for r in rows] == [FULL, "linear probe"]
    for row in rows:
        assert row.clean > 0.9  # trained: the untrained head is near chance
        assert set(row.corrupted) == {"gaussian_noise", "occlusion"}
        values = [v for sev in row.corrupted.values() for v in sev.values()]
        assert all(0.0 <= v <= 1.0 for v in values) and row.mca == pytest.approx(sum(values) / 6)
    assert len(lines) == 2 and "mCA" in lines[0]
    # the same seed gives the same rows
    again = _classifier_rows(
        task, recipes[:1], 0.02, clean, corrupted, 0, torch.device("cpu"), print
    )
    assert again[0].corrupted == rows[0].corrupted


def test_a_desynchronised_clean_set_is_an_error() -> None:
    _same("ok", 0.5, 0.5)
    with pytest.raises(RobustnessError, match="no longer matches the demo's data"):
        _same("tiny | lora", 0.5, 0.75)


def test_kept_copies_are_real_copies() -> None:
    proto = nn.Linear(2, 2)
    kept = _KeptCopies(proto)
    twin = copy.deepcopy(kept)
    assert isinstance(twin, nn.Linear) and twin is not proto and kept.copies == [twin]
    assert torch.equal(twin.weight, proto.weight)


# ------------------------------------------------------------------ the command
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "audio"], "tasks must be some of text, vision, clip"),
        (["--methods", "lorra"], "unknown recipe"),
        (["--tasks", "text", "--methods", "coop"], "none of the recipes"),
        (["--methods", " , "], "names nothing"),
    ],
)
def test_cli_refuses_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        unipeft.cli.app, ["bench", "robustness", "--output", str(out), *args]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()  # refused before anything was written


def test_cli_refuses_a_file_as_output(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(
        unipeft.cli.app, ["bench", "robustness", "--output", str(blocker), "--tasks", "clip"]
    )
    assert result.exit_code == 2 and "is a file" in result.output


@pytest.mark.slow
def test_cli_quick_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        unipeft.cli.app,
        ["bench", "robustness", "--quick", "--output", str(tmp_path), "--tasks", "vision,clip",
         "--methods", "full fine-tuning,linear probe"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "robustness.json").read_text())
    assert {r["method"] for r in data["rows"]} == {FULL, "linear probe"}
    assert len(data["rows"]) == 6  # two vision towers and CLIP
    clip_rows = [r for r in data["rows"] if r["task"].startswith("clip")]
    assert all(PROMPTS in r["corrupted"] for r in clip_rows)
    assert all(r["vs_full"] is not None for r in data["rows"])
    assert (tmp_path / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mCA" in (tmp_path / "robustness.md").read_text()


@pytest.mark.slow
def test_clip_zero_shot_row_under_every_corruption() -> None:
    from unipeft.bench.robustness import _clip_rows
    from unipeft.demo.train import set_determinism

    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        set_determinism(0, threads=1)
        (row,) = _clip_rows(0, True, torch.device("cpu"), ["zero-shot"], lambda line: None)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)
    assert row.method == "zero-shot" and set(row.corrupted) == {*IMAGE_CORRUPTIONS, PROMPTS}
    base, novel = row.details["clean_base"], row.details["clean_novel"]
    assert row.clean == pytest.approx(2 * base * novel / (base + novel))
    for key, (b, n) in row.details["base_novel"].items():
        kind, s = key.split("/")
        assert row.corrupted[kind][s] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    assert all(v is not None for v in row.corrupted[PROMPTS].values())


def test_every_vision_tower_and_its_budget_are_the_demos() -> None:
    from unipeft.demo import VISION_BUDGET, vision

    names = recipe_names()["vision"]
    for kind in vision.BACKBONES:  # the ConvNet tower's own rows are requestable too
        assert {r.name for r in vision.recipes(False, kind)} <= set(names)
    assert {"dora", "ssf", "visual_prompt"} <= set(names)
    assert vision.budget_for("convnet", VISION_BUDGET) == vision.CONVNET_BUDGET
    assert vision.budget_for("timm", VISION_BUDGET) == VISION_BUDGET
