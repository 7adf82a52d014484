"""Visual prompting: a learned frame of pixels around every input image (Bahng et al., 2022).

The prompt is a perturbation ``p`` of the input image, zero inside and learned on a border
``padding`` pixels wide (the paper's padding prompt), so the network sees ``x + p``. It
attaches at the network's first convolution (the ConvNet ``stem``, or a ViT's patch
embedding by the target ``embed``): a convolution is linear, so

    stem(x + p) = stem(x) + conv(p; W_stem, no bias)

and the delta adds ``conv(p)``, one map shared by every image of the batch, to the stem's
output, leaving the input itself untouched (and the other sites of the network seeing
exactly what they would see for ``x + p``).

The border is stored at a fixed resolution (``resolution`` pixels along each side, the
paper's 224) and resized bilinearly to the input's height and width at each call; the
border's width in pixels is ``padding / resolution`` of the input's side (at least one
pixel). At the stored resolution the prompt is the paper's exactly. It starts at zero, so
the adapter starts as the identity.

Paper: Bahng, Jahanian, Sankaranarayanan, Isola, *Exploring Visual Prompts for Adapting
Large-Scale Models*, arXiv:2203.17274 (2022). PEFT equivalent: none.

Sites: 2-D convolutions (zero padding, any stride) whose input is the image. Refused: other
sites (linear projections, 1-D and 3-D convolutions, modules without a kernel), with the
site kind named.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta, ProjectionShape
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site


class VisualPromptConfig(DeltaConfig):
    """The size of the learned frame."""

    padding: int = Field(
        30, ge=1, le=256, description="width of the frame, in pixels at the stored resolution"
    )
    resolution: int = Field(
        224,
        ge=4,
        le=1024,
        description="side of the image the frame is stored for; other sizes are resized to",
    )


class VisualPromptDelta(AdditiveDelta):
    """``y + conv(p)`` with ``p`` the frame resized to the input, through the site's own
    kernel (read at each call, so it follows a merged update of the stem too)."""

    def __init__(self, site: ModuleSite, cfg: VisualPromptConfig) -> None:
        super().__init__(placement="parallel", scaling=1.0, channel_dim=1)
        assert site.weight is not None
        c, size, pad = site.weight.in_features, cfg.resolution, cfg.padding
        self.shape = ProjectionShape.of(site)
        self.fraction = pad / size
        self.top = nn.Parameter(torch.zeros(c, pad, size))
        self.bottom = nn.Parameter(torch.zeros(c, pad, size))
        self.left = nn.Parameter(torch.zeros(c, size - 2 * pad, pad))
        self.right = nn.Parameter(torch.zeros(c, size - 2 * pad, pad))
        self.__dict__["_stem"] = site.module  # not a submodule: the backbone's, not saved

    def prompt(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        """The frame as a ``(1, C, height, width)`` image, zero inside."""
        ph = max(1, round(self.fraction * height))
        pw = max(1, round(self.fraction * width))
        if 2 * ph >= height or 2 * pw >= width:
            raise ValueError(
                f"visual_prompt: a {height}x{width} input leaves no inside for a frame of "
                f"{ph}x{pw} pixels (padding/resolution = {self.fraction:.3f}); lower padding"
            )

        def fit(t: Tensor, h: int, w: int) -> Tensor:
            t = t.to(dtype).unsqueeze(0)
            if t.shape[-2:] == (h, w):
                return t
            return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)

        middle = torch.cat(
            [
                fit(self.left, height - 2 * ph, pw),
                torch.zeros(
                    1, self.left.shape[0], height - 2 * ph, width - 2 * pw, dtype=dtype,
                    device=self.left.device,
                ),
                fit(self.right, height - 2 * ph, pw),
            ],
            dim=-1,
        )  # fmt: skip
        return torch.cat([fit(self.top, ph, width), middle, fit(self.bottom, ph, width)], dim=-2)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        if x is None or x.dim() != 4:
            raise ValueError(
                "visual_prompt needs the site's input images (N, C, H, W); got "
                f"{None if x is None else tuple(x.shape)}"
            )
        weight = self.__dict__["_stem"].weight
        p = self.prompt(x.shape[-2], x.shape[-1], y.dtype)
        return y + self.shape.project(p, weight.to(y.dtype))


def _accepts(cfg: VisualPromptConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite):
        return f"{site.name!r} is a token sequence; visual_prompt frames the input image"
    w = site.weight
    if w is None or w.layout != "conv" or len(w.kernel_size) != 2 or site.out_slice is not None:
        kind = "a module without a kernel" if w is None else f"a {w.layout} projection"
        if w is not None and w.layout == "conv":
            kind = f"a {len(w.kernel_size)}-D convolution"
        return (
            f"{site.name!r} is {kind}; visual_prompt adds its frame through a 2-D convolution "
            "that reads the image: target the ConvNet's 'stem' (or a ViT's patch embedding, "
            "'embed')"
        )
    return None


def _fits(cfg: VisualPromptConfig, site: Site) -> str | None:
    if 2 * cfg.padding >= cfg.resolution:
        return (
            f"padding={cfg.padding} leaves no inside in a {cfg.resolution}-pixel image; "
            f"choose padding < {(cfg.resolution + 1) // 2}"
        )
    return None


def _build(cfg: VisualPromptConfig, site: Site) -> VisualPromptDelta:
    assert isinstance(site, ModuleSite)
    return VisualPromptDelta(site, cfg)


def _count(cfg: VisualPromptConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite) and site.weight is not None
    c, size, pad = site.weight.in_features, cfg.resolution, cfg.padding
    return c * (2 * pad * size + 2 * (size - 2 * pad) * pad)


METHOD = Method(
    id="visual_prompt",
    family="additive",
    config=VisualPromptConfig,
    build=_build,
    num_parameters=_count,
    formula="C · (2·p·s + 2·(s − 2p)·p) at the stem: a frame p pixels wide around an s×s "
    "image of C channels",
    site_kinds=("module",),
    accepts=_accepts,
    size_check=_fits,
    refuses="every site but a 2-D convolution that reads the image (linear projections, "
    "1-D and 3-D convolutions, sublayers, blocks, token sequences)",
    default_targets=("stem",),
    mergeable=False,
    identity_at_init=True,
    paper="Bahng, Jahanian, Sankaranarayanan, Isola, Exploring Visual Prompts for Adapting "
    "Large-Scale Models, arXiv:2203.17274 (2022)",
    summary="a learned frame of pixels around the input image (the padding prompt), added "
    "through the network's first convolution",
)

__all__ = ["METHOD", "VisualPromptConfig", "VisualPromptDelta"]
