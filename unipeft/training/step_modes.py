"""How :class:`~unipeft.training.Trainer` runs a step: eagerly, replayed from a CUDA graph,
or through ``torch.compile`` (``TrainerConfig.step_mode``).

- :func:`choose_mode`: what ``auto`` (or a forced mode) means on this device and launch.
- :func:`batch_signature` and :class:`ShapeTracker`: whether a batch has the shape the
  graph was captured with, is an epoch's last (smaller) batch, or shows that shapes vary.
- :class:`EagerSteps`, :class:`GraphedSteps`, :class:`CompiledSteps`: the step runners.
- :func:`optimizer_options` and :func:`conform_optimizer`: AdamW as each mode needs it
  (fused and capturable, the learning rate a tensor on the GPU, for graphs).

A CUDA graph replay writes the parameters in place from the optimizer's kernels without
Python seeing it, so autograd's version counters do not move. Caches that methods key on
those counters (LoRA's stacked factors, used in passes without gradients) would then serve
stale weights: :class:`GraphedSteps` bumps the counters of the trained parameters before
anything eager reads them again (an eager step, an evaluation, the end of training), the
same remedy :func:`unipeft.distributed.refresh_versions` applies for engines that write
parameters behind autograd's back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from .graphs import capture
from .state import TrainingError

StepMode = Literal["auto", "eager", "graphs", "compile"]
LOG = logging.getLogger("unipeft.training")

WARMUP = 3
"""Eager steps on batches of the captured shape before the capture: they create AdamW's
state and the libraries' lazy workspaces, which cannot happen inside a capture. They are
real training steps (each on its own batch)."""

BatchKind = Literal["fixed", "remainder", "varies"]


@dataclass
class StepModeReport:
    """Which step mode a :meth:`Trainer.train` call used, and why."""

    requested: str
    """``TrainerConfig.step_mode`` as given."""
    mode: str
    """What ran: ``eager``, ``graphs`` or ``compile`` (``eager`` after an ``auto`` fall-back)."""
    reason: str
    """One sentence: why this mode (and, after a fall-back, at which step and why)."""
    fast_steps: int = 0
    """Steps replayed from the CUDA graph or run through the compiled function."""
    eager_steps: int = 0
    """Steps run eagerly: all of them in eager mode; otherwise the warm-up before a capture,
    epochs' last smaller batches, and every step after a fall-back."""

    def record(self) -> dict[str, str]:
        """What the last line of ``metrics.jsonl`` carries about the step mode."""
        return {"step_mode": self.mode, "step_mode_reason": self.reason}


def choose_mode(requested: str, device: str, world: int, engine: str | None) -> tuple[str, str]:
    """``(mode, reason)`` for ``step_mode=requested`` on ``device`` with ``world`` ranks.

    ``auto`` is ``graphs`` on CUDA in one process, ``eager`` anywhere else; a forced
    ``graphs`` or ``compile`` that cannot apply raises :class:`TrainingError` naming the fix.
    """
    if requested == "eager":
        return "eager", "step_mode: eager was asked for"
    if world > 1:
        why = f"launched as {world} processes ({engine or 'distributed'})"
        if requested == "auto":
            return "eager", (
                f"auto: {why}; CUDA graphs and torch.compile are not used under DDP or FSDP2, "
                "whose hooks communicate during the step"
            )
        raise TrainingError(
            f"step_mode {requested!r} is not supported when {why}: the engines' hooks "
            "communicate during the step. Set step_mode: auto or eager"
        )
    if not device.startswith("cuda"):
        if requested == "auto":
            return "eager", (
                f"auto: training on {device}; CUDA graphs and torch.compile are used on CUDA only"
            )
        raise TrainingError(
            f"step_mode {requested!r} needs a CUDA device, and this run trains on {device}; "
            "set step_mode: auto or eager (or device: cuda on a machine with a GPU)"
        )
    if requested == "compile":
        return "compile", (
            "step_mode: compile was asked for: torch.compile(dynamic=False) of the forward "
            "and the loss, backward and a fused AdamW step"
        )
    source = "auto on CUDA in one process" if requested == "auto" else "step_mode: graphs"
    return "graphs", (
        f"{source}: forward, backward, clipping and a fused, capturable AdamW step replayed "
        "as one CUDA graph for every batch of the captured shape"
    )


# --------------------------------------------------------------------------- batch shapes
def batch_signature(batch: Any) -> Hashable:
    """The batch's structure (dicts, lists, tuples), each tensor's shape, dtype and device,
    and every other leaf's value. Two batches with equal signatures replay one graph; a leaf
    that cannot be hashed makes the signature equal to no other."""
    if isinstance(batch, Tensor):
        return ("tensor", tuple(batch.shape), batch.dtype, batch.device)
    if isinstance(batch, dict):
        return ("dict", tuple((k, batch_signature(v)) for k, v in batch.items()))
    if isinstance(batch, list | tuple):
        return (type(batch).__name__, tuple(batch_signature(v) for v in batch))
    try:
        hash(batch)
    except TypeError:
        return ("unhashable", type(batch).__name__, object())
    return ("value", type(batch).__name__, batch)


def describe(batch: Any) -> str:
    """The batch's tensor shapes in a few words, for messages."""
    if isinstance(batch, Tensor):
        return f"{tuple(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, list | tuple):
        return "[" + ", ".join(describe(v) for v in batch) + "]"
    return type(batch).__name__


class ShapeTracker:
    """Classifies each batch against the first one not at an epoch's end (the reference):
    ``fixed`` (the reference's signature), ``remainder`` (another signature, but the last
    batch of an epoch, which may be smaller), or ``varies`` (another signature elsewhere:
    the data's shapes change from batch to batch)."""

    def __init__(self) -> None:
        self.reference: Hashable | None = None
        self.example: Any = None

    def classify(self, batch: Any, *, last: bool) -> BatchKind:
        signature = batch_signature(batch)
        if self.reference is None:
            if last:
                return "remainder"
            self.reference, self.example = signature, describe(batch)
            return "fixed"
        if signature == self.reference:
            return "fixed"
        return "remainder" if last else "varies"


# --------------------------------------------------------------------------- runners
StepFn = Callable[[Any], Tensor]
"""``step(batch) -> loss``: forward, backward, clipping and the optimizer step."""


class StepRunner(Protocol):
    report: StepModeReport

    def __call__(self, batch: Any, *, last: bool, where: str) -> Tensor:
        """Train on ``batch`` (on the device already); ``last``: the epoch's last batch;
        ``where``: the batch's place, for messages. Returns the loss (no host sync)."""
        ...

    def sync(self) -> None:
        """Make eager code see what the fast path wrote (before evaluations, at the end)."""
        ...


class EagerSteps:
    """Every step as plain PyTorch: today's behaviour, and ``auto``'s off CUDA."""

    def __init__(self, step: StepFn, report: StepModeReport) -> None:
        self.step, self.report = step, report

    def __call__(self, batch: Any, *, last: bool, where: str) -> Tensor:
        self.report.eager_steps += 1
        return self.step(batch)

    def sync(self) -> None:
        pass


class GraphedSteps:
    """The step captured once as a CUDA graph and replayed for every batch of its shape.

    The first :data:`WARMUP` batches of the reference shape train eagerly (on a side
    stream, as capture requires); the next one is captured and replayed, and so is every
    later batch of that shape. An epoch's last, smaller batch trains eagerly. A batch of
    another shape elsewhere, or a capture that fails (a model that synchronises with the
    host), raises :class:`TrainingError` when ``strict`` (``step_mode: graphs``); under
    ``auto`` the run continues eagerly and the report says from which step and why."""

    def __init__(
        self,
        step: StepFn,
        params: Sequence[Tensor],
        report: StepModeReport,
        *,
        strict: bool,
        warmup: int = WARMUP,
    ) -> None:
        self.step, self.params, self.report = step, list(params), report
        self.strict, self.warmup = strict, warmup
        self.shapes = ShapeTracker()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: Any = None
        self.loss: Tensor | None = None
        self.warmed = 0
        self.fell_back = False
        self.stale = False  # a replay wrote parameters whose version counters did not move

    def __call__(self, batch: Any, *, last: bool, where: str) -> Tensor:
        if self.fell_back:
            return self._eager(batch)
        kind = self.shapes.classify(batch, last=last)
        if kind == "remainder":
            return self._eager(batch)
        if kind == "varies":
            self._give_up(
                f"{where} is {describe(batch)}, the first batches {self.shapes.example}",
                "pad every batch to one length (e.g. a tokenizer's padding='max_length') or "
                "set step_mode: compile",
            )
            return self._eager(batch)
        if self.graph is None and self.warmed < self.warmup:
            self.warmed += 1
            return self._eager(batch, side_stream=True)
        if self.graph is None and not self._capture(batch, where):
            return self._eager(batch)
        assert self.loss is not None
        _copy_into(self.inputs, batch)
        assert self.graph is not None
        self.graph.replay()
        self.stale = True
        self.report.fast_steps += 1
        return self.loss.clone()

    def _capture(self, batch: Any, where: str) -> bool:
        self.inputs = _clone(batch)
        try:
            self.graph, self.loss = capture(lambda: self.step(self.inputs), 0)
        except Exception as exc:  # any failure of the capture is reported
            self.graph = self.loss = self.inputs = None
            first: BaseException = exc  # ending a broken capture raises again: the first
            while first.__context__ is not None:
                first = first.__context__
            self._give_up(
                f"capturing the step at {where} failed ({type(first).__name__}: "
                f"{' '.join(str(first).split())[:300]})",
                "the model or loss_fn may synchronise with the host (.item(), data-dependent "
                "shapes); set step_mode: eager or compile",
                exc,
            )
            return False
        return True

    def _give_up(self, why: str, fix: str, cause: BaseException | None = None) -> None:
        if self.strict:
            raise TrainingError(f"step_mode 'graphs': {why}. To train: {fix}") from cause
        self.fell_back = True
        self.graph = self.inputs = self.loss = None  # the graph's memory pool is freed
        self.report.mode = "eager"
        self.report.reason = f"auto chose CUDA graphs, then fell back to eager: {why}"
        LOG.warning("unipeft.training: %s", self.report.reason)

    def _eager(self, batch: Any, *, side_stream: bool = False) -> Tensor:
        self.sync()
        self.report.eager_steps += 1
        if not side_stream:
            return self.step(batch)
        return on_side_stream(lambda: self.step(batch))

    def sync(self) -> None:
        if self.stale:
            bump_versions(self.params)
            self.stale = False


class CompiledSteps:
    """``torch.compile(dynamic=False)`` of the forward and the loss (with the model's
    ``aux_loss``); the backward runs the compiled backward, then clipping and AdamW eagerly.
    A new shape compiles again (at most torch's recompile limit, after which the compiler
    runs that shape eagerly); an epoch's last, smaller batch runs eagerly instead."""

    def __init__(
        self,
        loss_of: StepFn,
        update: Callable[[Tensor], Tensor],
        report: StepModeReport,
        *,
        backend: str = "inductor",
    ) -> None:
        self.loss_of, self.update, self.report = loss_of, update, report
        self.compiled = torch.compile(loss_of, dynamic=False, backend=backend)
        self.shapes = ShapeTracker()

    def __call__(self, batch: Any, *, last: bool, where: str) -> Tensor:
        if self.shapes.classify(batch, last=last) == "remainder":
            self.report.eager_steps += 1
            return self.update(self.loss_of(batch))
        self.report.fast_steps += 1
        return self.update(self.compiled(batch))

    def sync(self) -> None:
        pass


def on_side_stream(fn: Callable[[], Tensor]) -> Tensor:
    """``fn()`` on a side stream, ordered after and before the current stream's work (the
    warm-up before a capture must not run on the stream it captures from)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def make_runner(
    mode: str,
    report: StepModeReport,
    *,
    loss_of: StepFn,
    update: Callable[[Tensor], Tensor],
    params: Sequence[Tensor],
    strict: bool,
) -> StepRunner:
    """The runner of ``mode`` (from :func:`choose_mode`)."""

    def step(batch: Any) -> Tensor:
        return update(loss_of(batch))

    if mode == "graphs":
        return GraphedSteps(step, params, report, strict=strict)
    if mode == "compile":
        return CompiledSteps(loss_of, update, report)
    return EagerSteps(step, report)


# --------------------------------------------------------------------------- the optimizer
_FLAGS = ("foreach", "fused", "capturable")


def optimizer_options(mode: str) -> dict[str, Any]:
    """AdamW's implementation flags for ``mode``: none for eager (PyTorch's default),
    ``fused`` for compile, ``fused`` and ``capturable`` for graphs."""
    if mode == "graphs":
        return {"foreach": None, "fused": True, "capturable": True}
    if mode == "compile":
        return {"foreach": None, "fused": True, "capturable": False}
    return {"foreach": None, "fused": None, "capturable": False}


def conform_optimizer(opt: torch.optim.Optimizer, mode: str) -> None:
    """Give ``opt`` the flags ``mode`` needs, after a checkpoint (perhaps written in another
    mode) replaced its param groups: the flags, the learning rate (a tensor on the
    parameters' device for graphs, so a schedule can change it between replays, a float
    otherwise) and where AdamW keeps its step counts (on the device when fused or
    capturable, on the CPU otherwise)."""
    flags = optimizer_options(mode)
    on_device = bool(flags["fused"] or flags["capturable"])
    for group in opt.param_groups:
        group.update(flags)
        device = group["params"][0].device
        lr = group["lr"]
        if mode == "graphs":
            if not isinstance(lr, Tensor) or lr.device != device:
                group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        elif isinstance(lr, Tensor):
            group["lr"] = float(lr)
        for p in group["params"]:
            state = opt.state.get(p, {})
            step = state.get("step")
            if isinstance(step, Tensor):
                where = p.device if on_device else torch.device("cpu")
                state["step"] = step.to(where, torch.float32)


def set_lr(group: dict[str, Any], value: float) -> None:
    """Set a param group's learning rate: in place when it is a tensor a graph reads."""
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def plain_groups(doc: dict[str, Any]) -> dict[str, Any]:
    """``optimizer_to_parts``'s JSON document with tensor learning rates as floats."""
    for group in doc["param_groups"]:
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
    return doc


def bump_versions(tensors: Sequence[Tensor]) -> None:
    """Move the version counters of ``tensors``, written in place where autograd did not see
    it, so that caches keyed on them are built again."""
    with torch.no_grad():
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _clone(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {k: _clone(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_clone(v) for v in batch)
    return batch


def _copy_into(static: Any, batch: Any) -> None:
    if isinstance(static, Tensor):
        static.copy_(batch, non_blocking=True)
    elif isinstance(static, dict):
        for k, v in static.items():
            _copy_into(v, batch[k])
    elif isinstance(static, list | tuple):
        for s, b in zip(static, batch, strict=True):
            _copy_into(s, b)
