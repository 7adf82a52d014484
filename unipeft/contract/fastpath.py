"""The optional protocol of deltas with fused kernels.

The root :class:`~unipeft.DeltaModule` asks only for ``forward`` (and ``tokens``,
``merged``, ``aux_loss`` where they apply). A delta class that can do better on hot paths
implements :class:`FastPath` as a whole; the module host checks it once per site, when the
delta is attached, and from then on offers it the fused calls below. Each method may return
``None`` (or, for ``update_``, just call the delta) to decline, and the host falls back to
the plain path, so the outputs never depend on whether a fast path ran.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class FastPath(Protocol):
    """Fused forms of a delta's work, used by the module host when it can."""

    def update_(self, x: Tensor | None, y: Tensor) -> Tensor:
        """Like ``self(x, y)``, but may write the result into ``y`` and return it.

        The host calls it with an output it owns (nothing else holds it), so a delta that
        can accumulate in place (LoRA's ``addmm_`` when no gradient is needed) skips an
        allocation and a copy."""
        ...

    def fused_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool
    ) -> Tensor | None:
        """The whole output of a Linear (or GPT-2 ``Conv1D`` when ``transposed``: ``weight``
        is ``(in, out)``) with this delta, in one step; ``None`` lets the module run and the
        delta act on its output. Offered only when this delta is the only one running on
        the module, outside a mixed batch, on the whole output."""
        ...

    @staticmethod
    def update_slices(
        deltas: list[Any], slices: list[tuple[int, int]], x: Tensor, y: Tensor
    ) -> Tensor | None:
        """Apply ``deltas`` (one per slice of a fused output ``y``, channels last, all of
        this class) at once, possibly into ``y``; ``None`` applies them slice by slice."""
        ...

    @staticmethod
    def link(attachments: list[Any]) -> None:
        """Called once with one adapter's attachments of this class (``.site``,
        ``.delta``), after they are attached, so the class can share work between sites
        (LoRA computes one ``x @ A`` for projections that read the same input)."""
        ...

    @staticmethod
    def mixed(
        deltas: list[Any], x: Tensor | None, y: Tensor, slots: Tensor, cache: dict
    ) -> Tensor | None:
        """Apply several deltas of this class at one site to a mixed batch at once.

        ``deltas[j]`` acts on the samples whose ``slots`` entry is ``j`` (``slots`` is
        ``(N,)``; ``len(deltas)`` marks samples none of them touches). ``cache`` is a dict
        the site keeps across calls (e.g. for stacked weights). ``None`` runs each delta on
        its own samples instead."""
        ...


class FastPathParts:
    """A mixin implementing :class:`FastPath` as a whole with every member declining (or,
    for ``update_``, just calling the delta). A delta class with one or two fused calls
    inherits it and overrides only those: ``class MyDelta(ReparameterizedDelta,
    FastPathParts)`` with its own ``fused_linear``."""

    def update_(self, x: Tensor | None, y: Tensor) -> Tensor:
        return self(x, y)  # type: ignore[operator]

    def fused_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool
    ) -> Tensor | None:
        return None

    @staticmethod
    def update_slices(
        deltas: list[Any], slices: list[tuple[int, int]], x: Tensor, y: Tensor
    ) -> Tensor | None:
        return None

    @staticmethod
    def link(attachments: list[Any]) -> None:
        return None

    @staticmethod
    def mixed(
        deltas: list[Any], x: Tensor | None, y: Tensor, slots: Tensor, cache: dict
    ) -> Tensor | None:
        return None
