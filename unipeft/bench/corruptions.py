"""Test-time corruptions for ``unipeft bench robustness``: images, words and CLIP prompts.

Every corruption is a function of the clean input, a severity (0: the input unchanged;
1, 2, 3: increasingly strong) and a ``torch.Generator``; the same generator state gives the
same output. Random draws do not depend on the severity (a seed draws the same noise, patch
positions, rotation directions and letter positions at every severity), so a higher
severity moves each input further from the clean one.

* Images ``(N, C, H, W)`` scaled to about [-1, 1] with a dark background, as the demo's
  digits (:data:`IMAGE_CORRUPTIONS`, parameters in :data:`IMAGE_LEVELS`).
* Words (:data:`TEXT_CORRUPTIONS`, :data:`TEXT_LEVELS`): edits touch letters only; every
  other character keeps its place among the others.
* CLIP prompt templates (:data:`PROMPT_TEMPLATES`): at severity ``s`` the templates are
  ``s`` word edits away from the nearest template the model was trained with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGE_CORRUPTIONS",
    "IMAGE_LEVELS",
    "PROMPT_TEMPLATES",
    "SEVERITIES",
    "TEXT_CORRUPTIONS",
    "TEXT_LEVELS",
    "corrupt_images",
    "corrupt_words",
    "edit_distance",
    "generator",
    "prompt_templates",
    "template_distance",
]

SEVERITIES = (1, 2, 3)

IMAGE_LEVELS: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (0.2, 0.4, 0.8),
    "gaussian_blur": (0.75, 1.5, 2.5),
    "contrast": (0.5, 0.3, 0.15),
    "rotation": (15.0, 30.0, 60.0),
    "occlusion": (8.0, 12.0, 16.0),
}
"""Per image corruption, its parameter at severities 1, 2, 3: the noise's standard deviation
(the images span 2), the blur's standard deviation in pixels, the contrast factor (the
deviation from each image's mean is multiplied by it), the rotation in degrees (clockwise
or counter-clockwise, drawn per image), the side of the square grey patch in pixels (of
32, at a position drawn per image)."""
IMAGE_CORRUPTIONS = tuple(IMAGE_LEVELS)

TEXT_LEVELS: dict[str, tuple[float, float, float]] = {
    "char_swap": (1, 2, 3),
    "casing": (0.25, 0.5, 1.0),
    "repeat_letters": (1, 2, 3),
}
"""Per word corruption, its parameter at severities 1, 2, 3: the number of adjacent-letter
swaps, the fraction of letters whose case flips (at least one), the number of letters
written three times (``good`` -> ``gooood`` at severity 1)."""
TEXT_CORRUPTIONS = tuple(TEXT_LEVELS)

PROMPT_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("a photo of the number {}.", "the digit {}.", "a handwritten digit {}."),
    2: ("a photo of a {}.", "the handwritten {}", "a drawing of {}."),
    3: ("{}", "photo {}", "a number of {}"),
}
"""CLIP prompt templates by severity, from the words of the demo's captions only (its
word-level tokenizer knows no others): each is ``s`` word edits (insert, delete, replace;
the full stop is a word) from the nearest of the templates the demo's CLIP was pretrained
and adapted with."""


def generator(seed: int, *names: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``names`` (stable across runs and machines:
    no Python ``hash``), so each corruption draws its own stream."""
    key = seed
    for name in names:
        for ch in name:
            key = (key * 1_000_003 + ord(ch)) % (2**61 - 1)
    return torch.Generator().manual_seed(key)


def _check(kind: str, severity: int, known: Sequence[str]) -> None:
    if kind not in known:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(known)}")
    if severity not in (0, *SEVERITIES):
        raise ValueError(f"severity must be 0, 1, 2 or 3, got {severity!r}")


# ------------------------------------------------------------------ images
def corrupt_images(x: Tensor, kind: str, severity: int, gen: torch.Generator) -> Tensor:
    """``x`` ``(N, C, H, W)`` under corruption ``kind`` at ``severity`` (a new tensor of the
    same shape and dtype; severity 0 returns a copy of ``x``)."""
    _check(kind, severity, IMAGE_CORRUPTIONS)
    if x.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if severity == 0:
        return x.clone()
    level = IMAGE_LEVELS[kind][severity - 1]
    out = _IMAGE[kind](x.float(), level, gen)
    return out.to(x.dtype)


def _noise(x: Tensor, sigma: float, gen: torch.Generator) -> Tensor:
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(-1.0, 1.0)


def _blur(x: Tensor, sigma: float, gen: torch.Generator) -> Tensor:
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(rows, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _contrast(x: Tensor, factor: float, gen: torch.Generator) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + factor * (x - mean)


def _background(x: Tensor) -> Tensor:
    """Each image's background, per channel: its top-left pixel."""
    return x[:, :, :1, :1]


def _rotation(x: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    sign = torch.randint(0, 2, (len(x),), generator=gen).to(x.dtype) * 2 - 1
    angle = sign * degrees * math.pi / 180.0
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    bg = _background(x)  # grid_sample fills with zeros: rotate the offset from the background
    return F.grid_sample(x - bg, grid, align_corners=False) + bg


def _occlusion(x: Tensor, side: float, gen: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    s = min(int(side), h, w)
    # centres drawn once in [0, 1) and scaled, so the patch grows around the same point
    cy = torch.rand(n, generator=gen) * h
    cx = torch.rand(n, generator=gen) * w
    top = (cy - s / 2).round().long().clamp(0, h - s)
    left = (cx - s / 2).round().long().clamp(0, w - s)
    out = x.clone()
    for i in range(n):
        out[i, :, top[i] : top[i] + s, left[i] : left[i] + s] = 0.0
    return out


_IMAGE: dict[str, Callable[[Tensor, float, torch.Generator], Tensor]] = {
    "gaussian_noise": _noise,
    "gaussian_blur": _blur,
    "contrast": _contrast,
    "rotation": _rotation,
    "occlusion": _occlusion,
}


# ------------------------------------------------------------------ words
def corrupt_words(
    words: Sequence[str], kind: str, severity: int, gen: torch.Generator
) -> list[str]:
    """Each of ``words`` under corruption ``kind`` at ``severity`` (0: unchanged). Only
    letters are edited; a word without the letters an edit needs stays as it is."""
    _check(kind, severity, TEXT_CORRUPTIONS)
    if isinstance(words, str):
        raise TypeError("words must be a sequence of strings, not one string")
    if severity == 0:
        return list(words)
    level = TEXT_LEVELS[kind][severity - 1]
    # one uniform draw per word and letter slot, shared by every severity
    return [_WORD_EDITS[kind](w, level, torch.rand(64, generator=gen).tolist()) for w in words]


def _swap(word: str, count: float, draws: list[float]) -> str:
    chars, moved = list(word), set()
    for k in range(int(count)):
        # disjoint pairs of differing letters, so no swap undoes an earlier one
        pairs = [
            i
            for i in range(len(chars) - 1)
            if chars[i].isalpha()
            and chars[i + 1].isalpha()
            and chars[i] != chars[i + 1]
            and not moved & {i, i + 1}
        ]
        if not pairs:
            break
        i = pairs[int(draws[k] * len(pairs))]
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
        moved |= {i, i + 1}
    return "".join(chars)


def _casing(word: str, fraction: float, draws: list[float]) -> str:
    letters = [i for i, c in enumerate(word) if c.isalpha() and c.swapcase() != c]
    if not letters:
        return word
    # the letters with the smallest draws flip: a larger fraction flips a superset
    ranked = sorted(letters, key=lambda i: draws[i % len(draws)])
    flip = set(ranked[: max(1, round(fraction * len(letters)))])
    return "".join(c.swapcase() if i in flip else c for i, c in enumerate(word))


def _repeat(word: str, count: float, draws: list[float]) -> str:
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    if not letters:
        return word
    ranked = sorted(letters, key=lambda i: draws[i % len(draws)])
    chosen = set(ranked[: int(count)])
    return "".join(c * 3 if i in chosen else c for i, c in enumerate(word))


_WORD_EDITS: dict[str, Callable[[str, float, list[float]], str]] = {
    "char_swap": _swap,
    "casing": _casing,
    "repeat_letters": _repeat,
}


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two sequences (of characters or of words)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


# ------------------------------------------------------------------ prompts
_PROMPT_WORD = re.compile(r"\{\}|[a-z0-9]+|[^\sa-z0-9{}]")


def template_distance(template: str, trained: Sequence[str]) -> int:
    """Word edits from ``template`` to the nearest of ``trained`` (``{}`` is one word)."""
    words = _PROMPT_WORD.findall(template.lower())
    return min(edit_distance(words, _PROMPT_WORD.findall(t.lower())) for t in trained)


def prompt_templates(severity: int) -> tuple[str, ...]:
    """The CLIP prompt templates at ``severity`` (see :data:`PROMPT_TEMPLATES`)."""
    if severity not in SEVERITIES:
        raise ValueError(f"prompt severity must be 1, 2 or 3, got {severity!r}")
    return PROMPT_TEMPLATES[severity]
