"""The module host: runs the deltas attached to one backbone module on its output.

One host per module holds every attachment on it, from every adapter, and installs its hook
only while it has attachments. The backbone's classes, parameters and state dict are never
replaced, so ``unload`` only removes hooks. A delta that implements the optional
:class:`~unipeft.contract.fastpath.FastPath` protocol is offered the fused kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..contract.sites import ModuleSite
from .compose import run_composed
from .state import AdapterState, Attachment, first_tensor


def _split_output(output: Any) -> tuple[Tensor | None, Callable[[Tensor], Any]]:
    """The main tensor of a module's output and a function that puts a new one back."""
    if isinstance(output, Tensor):
        return output, lambda t: t
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        rest = output[1:]
        return output[0], lambda t: (t, *rest)
    if hasattr(output, "keys") and hasattr(output, "__getitem__"):  # transformers ModelOutput
        keys = list(output.keys())
        if keys and isinstance(output[keys[0]], Tensor):
            key = keys[0]

            def put(t: Tensor) -> Any:
                output[key] = t
                return output

            return output[key], put
    return None, lambda t: output


class ModuleHost:
    """Runs the active deltas attached to one module on its output."""

    def __init__(self, module: nn.Module, state: AdapterState, *, hook: bool = True) -> None:
        self.module = module
        self.state = state
        self.hook = hook
        self.attachments: list[Attachment] = []
        self._handles: list[RemovableHandle] = []
        self._entry_handles: dict[int, RemovableHandle] = {}
        self._captured: dict[int, Tensor | None] = {}
        self._stack_cache: dict[str, Any] = {}  # batched deltas keep stacked weights here
        self._transposed = _fusable_layout(module)
        self._overriding = False  # the module's forward is self._forward (no output hook)

    # --------------------------------------------------------------- kind (see hosts.py)
    @staticmethod
    def claims(site: Any) -> bool:
        return isinstance(site, ModuleSite)

    @staticmethod
    def anchor(site: ModuleSite) -> nn.Module:
        return site.module

    @classmethod
    def create(cls, site: ModuleSite, state: AdapterState) -> ModuleHost:
        return cls(site.module, state)

    # --------------------------------------------------------------- bookkeeping
    def add(self, att: Attachment, table: Any = None) -> None:
        self.attachments.append(att)
        if self.hook and not self._handles and not self._overriding:
            if self._transposed is not None and "forward" not in self.module.__dict__:
                # an instance attribute, deleted with the last attachment; with no hook the
                # module keeps PyTorch's fast call path
                self.module.forward = self._forward
                self._overriding = True
            else:
                hook = self.module.register_forward_hook(self._hook, with_kwargs=True)
                self._handles.append(hook)
        entry = getattr(att.site, "entry", None)
        if entry is not None and id(entry) not in self._entry_handles:
            key = id(entry)

            def capture(mod: nn.Module, args: tuple, kwargs: dict, _key: int = key) -> None:
                self._captured[_key] = first_tensor(args, kwargs)

            self._entry_handles[key] = entry.register_forward_pre_hook(capture, with_kwargs=True)

    def remove(self, att: Attachment, table: Any = None) -> None:
        self.attachments.remove(att)
        live_entries = {id(a.site.entry) for a in self.attachments if a.site.entry is not None}
        for key in list(self._entry_handles):
            if key not in live_entries:
                self._entry_handles.pop(key).remove()
                self._captured.pop(key, None)
        if not self.attachments:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            if self._overriding:
                if self.module.__dict__.get("forward") == self._forward:
                    del self.module.forward
                self._overriding = False

    @property
    def empty(self) -> bool:
        return not self.attachments

    def running(self) -> list[Attachment]:
        return [a for a in self.state.running(self.attachments) if not a.merged]

    # --------------------------------------------------------------- forward
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward while it has attachments (Linear and GPT-2 Conv1D only),
        in place of an output hook: when exactly one delta runs here and it can compute
        the whole output in one step (:meth:`FastPath.fused_linear`), it does;
        otherwise the module's own forward runs and the deltas act on its output."""
        m = self.module
        att = self._single_running()
        if att is not None and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            assert self._transposed is not None
            out = att.fast.fused_linear(args[0], m.weight, m.bias, self._transposed)
            if out is not None:
                return out
        output = type(m).forward(m, *args, **kwargs)
        new = self._hook(m, args, kwargs, output)
        return output if new is None else new

    def _single_running(self) -> Attachment | None:
        """The one running attachment, when there is exactly one, outside a mixed batch, on
        the whole output (no slice, no entry)."""
        if self.state.routing is not None or self.state.composed is not None:
            return None
        running = self.running()
        if len(running) != 1:
            return None
        att = running[0]
        whole = att.site.out_slice is None and att.site.entry is None
        return att if whole and att.fast is not None else None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        running = self.running()
        if not running:
            return None
        y, put = _split_output(output)
        if y is None:
            raise RuntimeError(
                f"unipeft cannot adapt the output of {type(module).__name__}: it is not a "
                "tensor, a tuple starting with one, or a ModelOutput"
            )
        x = first_tensor(args, kwargs)
        return put(self.apply(running, x, y))

    def apply(self, running: list[Attachment], x: Tensor | None, y: Tensor) -> Tensor:
        """Apply ``running`` deltas to ``y`` (slices first, then whole-output deltas)."""
        sliced: dict[tuple[int, int], list[Attachment]] = {}
        whole: list[Attachment] = []
        for att in running:
            s = att.site.out_slice
            (sliced.setdefault(s, []) if s is not None else whole).append(att)
        if sliced:
            dim = running[0].site.channel_dim
            done = self.try_update_slices(running, x, y) if not whole else None
            y = done if done is not None else self._apply_slices(sliced, x, y, dim)
        if whole:
            y = self.run_group(whole, x, y)
        return y

    def try_update_slices(
        self, running: list[Attachment], x: Tensor | None, y: Tensor
    ) -> Tensor | None:
        """One call for every slice of a fused output when a single delta class runs one
        delta per slice and can batch them (:meth:`FastPath.update_slices`)."""
        if x is None or self.state.routing is not None or len(running) < 2:
            return None
        if self.state.composed is not None:  # Average / Fuse: evaluated per slice
            return None
        fast = running[0].fast
        if fast is None:
            return None
        cls = type(fast)
        slices = [a.site.out_slice for a in running]
        if None in slices or len(set(slices)) != len(slices) or running[0].site.channel_dim != -1:
            return None
        if any(type(a.delta) is not cls or a.site.entry is not None for a in running):
            return None
        return fast.update_slices([a.delta for a in running], slices, x, y)  # type: ignore[arg-type]

    def run_group(self, atts: list[Attachment], x: Tensor | None, y: Tensor) -> Tensor:
        """Apply ``atts`` (all on the same output slice) in turn, or per sample group in a
        mixed batch: deltas that can batch (one kernel sequence for every adapter) do so,
        the others run on their samples only."""
        routing = self.state.routing
        if routing is None and self.state.composed is not None:
            return run_composed(
                self.state.composed, atts, x, y, self._input_for, self.state.fusions
            )
        if routing is None:
            for att in atts:  # y is ours: the module's fresh output or a delta's result
                xin = self._input_for(att, x)
                y = att.delta(xin, y) if att.fast is None else att.fast.update_(xin, y)
            return y
        if y.shape[0] != len(routing.names):
            raise ValueError(
                f"adapter_names has {len(routing.names)} entries but the batch at "
                f"{atts[0].site.name!r} has {y.shape[0]} samples; give one name per sample"
            )
        batchable: dict[type, list[Attachment]] = {}
        for att in atts:
            if att.fast is not None:  # the class may batch every adapter at once
                batchable.setdefault(type(att.delta), []).append(att)
        done: set[int] = set()
        for group in batchable.values():
            xin = self._input_for(group[0], x)
            slots = routing.slots(tuple(a.adapter for a in group), y.device)
            out = group[0].fast.mixed(  # type: ignore[union-attr]
                [a.delta for a in group], xin, y, slots, self._stack_cache
            )
            if out is not None:
                y = out
                done.update(id(a) for a in group)
        for att in atts:
            if id(att) in done:
                continue
            idx = routing.indices(att.adapter, y.device)
            xin = self._input_for(att, x)
            xs = None if xin is None else xin.index_select(0, idx)
            y = y.index_copy(0, idx, att.delta(xs, y.index_select(0, idx)))
        return y

    def _apply_slices(
        self, sliced: dict[tuple[int, int], list[Attachment]], x: Tensor | None, y: Tensor, dim: int
    ) -> Tensor:
        pieces: list[Tensor] = []
        pos = 0
        total = y.shape[dim]
        in_place = True  # every slice was updated inside y itself: no concatenation needed
        for start, stop in sorted(sliced):
            if start > pos:
                pieces.append(y.narrow(dim, pos, start - pos))
            part = y.narrow(dim, start, stop - start)
            new = self.run_group(sliced[(start, stop)], x, part)
            in_place = in_place and new is part
            pieces.append(new)
            pos = stop
        if in_place:
            return y
        if pos < total:
            pieces.append(y.narrow(dim, pos, total - pos))
        return torch.cat(pieces, dim=dim)

    def _input_for(self, att: Attachment, x: Tensor | None) -> Tensor | None:
        entry = att.site.entry
        return x if entry is None else self._captured.get(id(entry))


def _fusable_layout(module: nn.Module) -> bool | None:
    """``False`` for an ``nn.Linear`` (weight ``(out, in)``), ``True`` for a GPT-2
    ``Conv1D`` (weight ``(in, out)``), ``None`` for modules whose forward is not replaced."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2:
        return True
    return None
