"""Small real data sets for the demo, read from files installed with its dependencies.

* The VADER sentiment lexicon (Hutto & Gilbert, 2014), shipped by ``vaderSentiment`` as
  ``vader_lexicon.txt``: one entry per line, ``token<TAB>mean<TAB>std<TAB>[ten ratings]``,
  each rating by a human from -4 (extremely negative) to +4 (extremely positive).
  :func:`vader_polarity_split` turns it into a binary polarity task.
* scikit-learn's handwritten digits (8x8 grey images of 0-9), shipped with scikit-learn.
  :func:`digits_transfer_split` splits it by class into a pretraining task and a held-out
  transfer task.

Nothing is downloaded; both loaders are deterministic given their seed.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DigitsSplit",
    "DigitsTransfer",
    "PolaritySplit",
    "VaderEntry",
    "digits_transfer_split",
    "load_vader_lexicon",
    "unique_polar_entries",
    "vader_lexicon_path",
    "vader_polarity_split",
]


@dataclass(frozen=True)
class VaderEntry:
    """One lexicon line: the token, its mean and std rating, and the raw human ratings."""

    token: str
    mean: float
    std: float
    ratings: tuple[int, ...]


@dataclass(frozen=True)
class PolaritySplit:
    """A seeded train/test split of the VADER polarity task (label 1: positive)."""

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]


def vader_lexicon_path() -> Path:
    """The ``vader_lexicon.txt`` installed with ``vaderSentiment``."""
    try:
        import vaderSentiment
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the demo needs vaderSentiment (pip install 'unipeft[demo]') for its lexicon"
        ) from exc
    path = Path(vaderSentiment.__file__).resolve().parent / "vader_lexicon.txt"
    if not path.is_file():  # pragma: no cover - a broken installation
        raise RuntimeError(f"vaderSentiment is installed but {path} is missing")
    return path


def load_vader_lexicon(path: str | Path | None = None) -> list[VaderEntry]:
    """Every entry of the lexicon at ``path`` (default: the installed one), in file order."""
    file = Path(path) if path is not None else vader_lexicon_path()
    entries: list[VaderEntry] = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4:
            raise ValueError(f"{file}:{number}: expected 4 tab-separated fields, got {len(parts)}")
        token, mean, std, ratings = parts
        entries.append(VaderEntry(token, float(mean), float(std), tuple(ast.literal_eval(ratings))))
    return entries


def unique_polar_entries(entries: Sequence[VaderEntry], threshold: float) -> list[VaderEntry]:
    """The entries with ``|mean| >= threshold``, one per token, in file order.

    The lexicon lists a few tokens twice (``lol``, ``xd``..., and ``d:`` / ``d=``, once sad
    and once playful). A token whose entries agree in sign keeps its first entry; a token
    whose entries disagree is dropped, so no text has two labels or sits in both splits.
    """
    polar = [e for e in entries if abs(e.mean) >= threshold]
    signs: dict[str, set[bool]] = {}
    for e in polar:
        signs.setdefault(e.token, set()).add(e.mean > 0)
    seen: set[str] = set()
    out = []
    for e in polar:
        if len(signs[e.token]) == 1 and e.token not in seen:
            seen.add(e.token)
            out.append(e)
    return out


def vader_polarity_split(
    seed: int = 0,
    *,
    threshold: float = 0.5,
    test_fraction: float = 0.2,
    entries: Sequence[VaderEntry] | None = None,
) -> PolaritySplit:
    """Binary polarity of the entries with ``|mean| >= threshold``, split train/test.

    Tokens are unique (see :func:`unique_polar_entries`). The label is 1 for a positive
    mean, 0 for a negative one. The entries are shuffled with
    ``numpy.random.default_rng(seed)``; the first ``round(test_fraction * n)`` form the test
    set. Sizes depend only on ``threshold`` and ``test_fraction``; which entries land where
    depends only on ``seed``.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    pool = list(entries) if entries is not None else load_vader_lexicon()
    kept = unique_polar_entries(pool, threshold)
    order = np.random.default_rng(seed).permutation(len(kept))
    n_test = round(test_fraction * len(kept))
    test = [kept[i] for i in order[:n_test]]
    train = [kept[i] for i in order[n_test:]]
    return PolaritySplit(
        train_texts=[e.token for e in train],
        train_labels=[int(e.mean > 0) for e in train],
        test_texts=[e.token for e in test],
        test_labels=[int(e.mean > 0) for e in test],
    )


@dataclass(frozen=True)
class DigitsSplit:
    """Images ``(N, 3, size, size)`` normalised to about [-1, 1], labels ``0..k-1``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[int, ...]
    """The original digit of each label: ``classes[label]``."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class DigitsTransfer:
    """Pretrain on some digits, adapt to the held-out ones."""

    pretrain: DigitsSplit
    adapt: DigitsSplit


def _digit_images(size: int) -> tuple[Tensor, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the demo needs scikit-learn (pip install 'unipeft[demo]') for its digits"
        ) from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
    x = (x - 0.5) / 0.5
    return x.expand(-1, 3, -1, -1).contiguous(), np.asarray(digits.target)


def _split(
    x: Tensor,
    y: np.ndarray,
    classes: Sequence[int],
    rng: np.random.Generator,
    test_fraction: float,
    max_train: int | None,
) -> DigitsSplit:
    index = np.flatnonzero(np.isin(y, classes))
    index = index[rng.permutation(len(index))]
    n_test = round(test_fraction * len(index))
    test, train = index[:n_test], index[n_test:]
    if max_train is not None:
        train = train[:max_train]
    relabel = {int(c): i for i, c in enumerate(classes)}
    labels = torch.tensor([relabel.get(int(c), -1) for c in y], dtype=torch.long)
    return DigitsSplit(
        train_x=x[torch.from_numpy(train)],
        train_y=labels[torch.from_numpy(train)],
        test_x=x[torch.from_numpy(test)],
        test_y=labels[torch.from_numpy(test)],
        classes=tuple(int(c) for c in classes),
    )


def digits_transfer_split(
    seed: int = 0,
    *,
    size: int = 32,
    pretrain_classes: Sequence[int] = (0, 1, 2, 3, 4),
    adapt_classes: Sequence[int] = (5, 6, 7, 8, 9),
    test_fraction: float = 0.3,
    max_adapt_train: int | None = None,
) -> DigitsTransfer:
    """scikit-learn's digits upsampled to ``size`` x ``size`` with 3 channels, split by class.

    Each group is shuffled with ``numpy.random.default_rng(seed)`` and split train/test;
    ``max_adapt_train`` caps the adaptation training set (a low-data transfer task).
    """
    if set(pretrain_classes) & set(adapt_classes):
        raise ValueError("pretrain_classes and adapt_classes must not overlap")
    x, y = _digit_images(size)
    rng = np.random.default_rng(seed)
    return DigitsTransfer(
        pretrain=_split(x, y, pretrain_classes, rng, test_fraction, None),
        adapt=_split(x, y, adapt_classes, rng, test_fraction, max_adapt_train),
    )


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""The class names that the CLIP task's captions and prompts use, digit ``i`` at index ``i``."""


SHIFT_DEGREES = 30.0
SHIFT_TINT = (1.0, 0.6, 0.3)


def shift_domain(x: Tensor) -> Tensor:
    """The CLIP task's shifted domain: images ``(N, 3, H, W)`` in [-1, 1] rotated by
    :data:`SHIFT_DEGREES` counter-clockwise about their centre (bilinear; the corners
    filled with the background, -1) and tinted (each channel times :data:`SHIFT_TINT`).
    The same shift for every class, so what an adaptation learns about it on some classes
    can carry over to others."""
    angle = torch.tensor(SHIFT_DEGREES * np.pi / 180.0)
    cos, sin = float(torch.cos(angle)), float(torch.sin(angle))
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype)
    grid = torch.nn.functional.affine_grid(
        theta.expand(len(x), 2, 3), list(x.shape), align_corners=False
    )
    rotated = torch.nn.functional.grid_sample(x + 1, grid, align_corners=False) - 1
    tint = torch.tensor(SHIFT_TINT, dtype=x.dtype).view(1, 3, 1, 1)
    return rotated * tint


@dataclass(frozen=True)
class BaseToNovelSplit:
    """The CLIP task's data. ``pretrain_*``: clean images of every digit (labels are the
    digits), for contrastive pretraining with captions. The rest are shifted images
    (:func:`shift_domain`) of other images: ``train_*`` and ``val_*`` are shots of the base
    classes, ``base_test_*`` the base classes' test images and ``novel_test_*`` the novel
    classes' (labels ``0..4`` within each group, in the order of ``base`` / ``novel``)."""

    pretrain_x: Tensor
    pretrain_y: Tensor
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    base_test_x: Tensor
    base_test_y: Tensor
    novel_test_x: Tensor
    novel_test_y: Tensor
    base: tuple[int, ...]
    novel: tuple[int, ...]


def digits_base_to_novel_split(
    seed: int = 0,
    *,
    size: int = 32,
    shots: int = 16,
    val_shots: int = 8,
    adapt_fraction: float = 0.4,
    base: Sequence[int] = (0, 1, 2, 3, 4),
    novel: Sequence[int] = (5, 6, 7, 8, 9),
) -> BaseToNovelSplit:
    """scikit-learn's digits for a CLIP base-to-novel task, seeded.

    Each digit's images are shuffled with ``numpy.random.default_rng(seed)``; the first
    ``adapt_fraction`` of them go to the shifted domain, the rest pretrain (clean). In the
    shifted domain a base class gives ``shots`` training and ``val_shots`` validation
    images and the rest to its test set; a novel class gives all of them to its test set.
    No image is in two sets.
    """
    if set(base) & set(novel):
        raise ValueError("base and novel classes must not overlap")
    x, y = _digit_images(size)
    rng = np.random.default_rng(seed)
    pre: list[np.ndarray] = []
    parts: dict[str, list[tuple[np.ndarray, int]]] = {
        "train": [],
        "val": [],
        "base": [],
        "novel": [],
    }
    for digit in range(10):
        index = np.flatnonzero(y == digit)
        index = index[rng.permutation(len(index))]
        n_adapt = round(adapt_fraction * len(index))
        adapt, rest = index[:n_adapt], index[n_adapt:]
        pre.append(rest)
        if digit in base:
            label = list(base).index(digit)
            if n_adapt <= shots + val_shots:
                raise ValueError(f"digit {digit} has too few images for {shots}+{val_shots} shots")
            parts["train"].append((adapt[:shots], label))
            parts["val"].append((adapt[shots : shots + val_shots], label))
            parts["base"].append((adapt[shots + val_shots :], label))
        elif digit in novel:
            parts["novel"].append((adapt, list(novel).index(digit)))

    def gather(groups: list[tuple[np.ndarray, int]]) -> tuple[Tensor, Tensor]:
        index = np.concatenate([g for g, _ in groups])
        labels = torch.cat([torch.full((len(g),), c, dtype=torch.long) for g, c in groups])
        return shift_domain(x[torch.from_numpy(index)]), labels

    pre_index = np.concatenate(pre)
    pre_index = pre_index[rng.permutation(len(pre_index))]
    train_x, train_y = gather(parts["train"])
    val_x, val_y = gather(parts["val"])
    base_x, base_y = gather(parts["base"])
    novel_x, novel_y = gather(parts["novel"])
    return BaseToNovelSplit(
        pretrain_x=x[torch.from_numpy(pre_index)],
        pretrain_y=torch.from_numpy(y[pre_index]).long(),
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        base_test_x=base_x,
        base_test_y=base_y,
        novel_test_x=novel_x,
        novel_test_y=novel_y,
        base=tuple(int(c) for c in base),
        novel=tuple(int(c) for c in novel),
    )
