"""Test matrices drawn from the registries, so that a new method or tiny backbone is tested
without anyone editing a list.

:func:`backbones` selects from :data:`unipeft.testing.backbones.BACKBONES` and
:func:`methods` from :func:`unipeft.list_methods`, by capability. What a test leaves out
is passed as ``exclude``: a dict, kept next to the test, from a name to the reason it is
left out (a reason is required). Names in ``exclude`` that are not registered (a plugin
that is not installed, say) are ignored.

The site helpers (:func:`sites`, :func:`projection_roles`, :func:`has_fused_qkv`) read a
backbone's structure map once per process; the tiny prototypes they build are the ones the
tests deep-copy anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from functools import cache
from typing import Any

import unipeft
from unipeft.maps import ROLES
from unipeft.testing.backbones import BACKBONES, TinyBackbone

NO_EXCLUSIONS: Mapping[str, str] = {}

TRANSFORMERS = ("text", "vit", "clip", "video")
"""The families of transformer backbones, whose blocks have attention and MLP projections
(``attn.q`` ... ``mlp.down``); the others (``convnet``, ``recurrent``, ``ssm``, ``graph``)
have roles of their own (docs/backbones.md)."""

ENCODERS: Mapping[str, str] = {
    "bert": "an encoder: no causal language-model head, nothing to generate with",
}
"""Text backbones that are encoders, which tests of decoding (generation, PEFT's CAUSAL_LM
task) leave out."""


def _check_reasons(exclude: Mapping[str, str]) -> None:
    for name, reason in exclude.items():
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"the exclusion of {name!r} needs a reason")


def _wanted(value: str, allowed: str | Collection[str] | None) -> bool:
    if allowed is None:
        return True
    return value == allowed if isinstance(allowed, str) else value in allowed


def backbones(
    *,
    family: str | Collection[str] | None = TRANSFORMERS,
    where: Callable[[TinyBackbone], bool] | None = None,
    exclude: Mapping[str, str] = NO_EXCLUSIONS,
) -> list[str]:
    """Names of the tiny backbones of ``family`` ("text", "vit", "clip"; one or several;
    the transformer families unless told, ``None`` for every family) for which ``where``
    holds, less ``exclude``, in registry order."""
    _check_reasons(exclude)
    return [
        name
        for name, bb in BACKBONES.items()
        if _wanted(bb.family, family) and name not in exclude and (where is None or where(bb))
    ]


def methods(
    *,
    site_kind: str | None = None,
    mergeable: bool | None = None,
    budget: bool | None = None,
    family: str | Collection[str] | None = None,
    where: Callable[[unipeft.Method], bool] | None = None,
    exclude: Mapping[str, str] = NO_EXCLUSIONS,
) -> list[str]:
    """Ids of the registered methods that attach at ``site_kind`` sites ("projection",
    "module", "sequence"), are (not) ``mergeable``, have (no) ``budget_field``, belong to
    ``family``, and for which ``where`` holds, less ``exclude``."""
    _check_reasons(exclude)
    out = []
    for m in unipeft.list_methods():
        if site_kind is not None and site_kind not in m.site_kinds:
            continue
        if mergeable is not None and m.mergeable is not mergeable:
            continue
        if budget is not None and (m.budget_field is not None) is not budget:
            continue
        if not _wanted(m.family, family) or m.id in exclude:
            continue
        if where is None or where(m):
            out.append(m.id)
    return out


# ------------------------------------------------------------------------------ sites


@cache
def sites(name: str) -> tuple:
    """Every site of the tiny backbone ``name`` (:func:`unipeft.inspect_sites`)."""
    return tuple(unipeft.inspect_sites(BACKBONES[name].make()))


def role_sites(model: Any) -> dict[str, list[str]]:
    """The names of ``model``'s sites by role, in the map's order (any model, not only a
    registered tiny backbone)."""
    out: dict[str, list[str]] = {}
    for site in unipeft.inspect_sites(model):
        if site.role:
            out.setdefault(site.role, []).append(site.name)
    return out


def roles(name: str) -> set[str]:
    return {s.role for s in sites(name) if s.role}


def projection_roles(name: str) -> list[str]:
    """The roles of every projection inside the blocks (``attn.*``, ``mlp.*``) of the
    backbone, in :data:`unipeft.maps.ROLES` order: LoRA's "all linear" targets."""
    have = {
        s.role
        for s in sites(name)
        if s.role and s.role.startswith(("attn.", "mlp.")) and getattr(s, "is_projection", False)
    }
    return [r for r in ROLES if r in have]


def has_fused_qkv(name: str) -> bool:
    """Whether q, k and v are slices of one fused projection (timm ``qkv``, GPT-2
    ``c_attn``, ``nn.MultiheadAttention``'s ``in_proj``)."""
    return any(
        s.role in ("attn.q", "attn.k", "attn.v") and getattr(s, "out_slice", None) is not None
        for s in sites(name)
    )
