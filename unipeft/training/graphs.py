"""A training step captured once as a CUDA graph and replayed for every batch.

An adapted model issues a few small kernels around each of its projections; on a host that
launches kernels slowly the GPU then waits for Python. Capturing the whole step (forward,
backward, optimizer) as one CUDA graph removes those launches: a replay costs one launch.
``docs/benchmarks.md`` measures the difference.

The usual rules of CUDA graphs apply, and :class:`GraphedStep` checks what it can:

- every batch has the keys, shapes, dtypes and device of the example batch it was built with
  (drop or pad the last, smaller batch);
- the optimizer keeps its state on the GPU (``capturable=True`` for Adam and AdamW);
- the step may not synchronise with the host (no ``.item()`` inside the model or the loss),
  and the set of trainable parameters may not change after capture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..contract.errors import UnipeftError

__all__ = ["GraphedStep", "capture"]


class GraphedStep:
    """``step(batch) -> loss``: forward, backward and ``optimizer.step()`` as one CUDA graph.

    ``loss_fn(model, batch)`` returns the scalar loss. The graph is captured from
    ``example`` after ``warmup`` eager steps on a side stream (which train the model like any
    other step). Each call copies ``batch`` into the captured input tensors, replays the
    graph, and returns the loss as a new tensor (no host synchronisation)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        example: Mapping[str, Tensor],
        loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor],
        *,
        warmup: int = 3,
    ) -> None:
        if warmup < 1:
            raise UnipeftError(f"warmup={warmup}: capture needs at least one eager step first")
        _check_capturable(optimizer)
        if not torch.cuda.is_available():
            raise UnipeftError(
                "GraphedStep needs a CUDA device, and none is available; train with plain "
                "steps (unipeft.training.Trainer) on this machine"
            )
        _check_on_gpu(optimizer)
        self._inputs = {k: _check_input(k, v).clone() for k, v in example.items()}
        self._spec = {k: (v.shape, v.dtype, v.device) for k, v in self._inputs.items()}
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn

        def step() -> Tensor:
            # no gradient is left from before: backward creates them (inside the graph, so
            # each replay writes them afresh rather than adding to the last step's)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, self._inputs)
            loss.backward()
            optimizer.step()
            return loss.detach()

        self.graph, self._loss = capture(step, warmup)

    def __call__(self, batch: Mapping[str, Tensor]) -> Tensor:
        if set(batch) != set(self._spec):
            raise UnipeftError(
                f"this batch has keys {sorted(batch)} but the step was captured with "
                f"{sorted(self._spec)}; give every batch the same keys"
            )
        for key, value in batch.items():
            shape, dtype, device = self._spec[key]
            if not isinstance(value, Tensor) or (value.shape, value.dtype) != (shape, dtype):
                got = (
                    f"{tuple(value.shape)} {value.dtype}"
                    if isinstance(value, Tensor)
                    else type(value).__name__
                )
                raise UnipeftError(
                    f"batch[{key!r}] is {got} but the step was captured with "
                    f"{tuple(shape)} {dtype}; a graph replays fixed shapes: drop or pad the "
                    "last, smaller batch (DataLoader(drop_last=True))"
                )
            self._inputs[key].copy_(value.to(device, non_blocking=True))
        self.graph.replay()
        return self._loss.clone()


def capture(fn: Callable[[], Any], warmup: int) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` ``warmup`` times on a side stream (as capture requires), then capture one
    call as a CUDA graph. Returns the graph and what the captured call returned (tensors
    that each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _check_input(key: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise UnipeftError(
            f"example[{key!r}] is a {type(value).__name__}; a captured step takes tensors only"
        )
    if value.device.type != "cuda":
        raise UnipeftError(
            f"example[{key!r}] is on {value.device}; put the example batch on the GPU"
        )
    return value


def _check_capturable(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if "capturable" in group and not group["capturable"]:
            name = type(optimizer).__name__
            raise UnipeftError(
                f"{name} keeps its step counts on the CPU, which a CUDA graph cannot update; "
                f"create it with capturable=True, e.g. "
                f"torch.optim.{name}(params, lr=..., capturable=True)"
            )


def _check_on_gpu(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.device.type != "cuda":
                raise UnipeftError(
                    "the optimizer holds parameters that are not on the GPU; move the model "
                    "to CUDA before creating the optimizer"
                )
