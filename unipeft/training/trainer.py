"""A small plain-PyTorch trainer for unipeft models: seeded, checkpointed, resumable."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..features.optim import lr_scales
from . import data as _data
from . import distributed as _dist
from ._util import append_metrics, find_delta_model, progress_bar, to_device, truncate_metrics
from .checkpoint import (
    Checkpoint,
    check_writable,
    find_checkpoint,
    publish,
    read_checkpoint,
    recover,
    write_checkpoint,
)
from .config import RESUME_FIELDS, TrainerConfig
from .memory import PeakMemory
from .state import (
    CheckpointError,
    TrainingError,
    load_trainable_state,
    optimizer_from_parts,
    optimizer_to_parts,
    rng_from_parts,
    rng_to_parts,
    trainable_state,
    trainable_state_keys,
)
from .step_modes import (
    LOG,
    StepModeReport,
    choose_mode,
    conform_optimizer,
    make_runner,
    optimizer_options,
    plain_groups,
    set_lr,
)

LossFn = Callable[[nn.Module, Any], Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
_DEFAULTS = TrainerConfig().model_dump(mode="json")


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` did: the final step, where it started, what it logged."""

    step: int
    start_step: int
    output_dir: Path | None
    adapter_dir: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    """The last evaluation's results (empty without ``eval_fn``)."""
    seconds: float = 0.0
    """Wall-clock time of the training loop (checkpoints and evaluations included)."""
    peak_memory_bytes: int | None = None
    """The loop's peak memory (:class:`~unipeft.training.PeakMemory`) when
    ``config.measure_memory``; None otherwise."""
    step_mode: StepModeReport | None = None
    """Which step mode ran (``config.step_mode`` resolved), why, and how many steps each
    way; the last line of ``metrics.jsonl`` carries the mode and the reason too."""


class Trainer:
    """Train the trainable parameters of ``model`` with AdamW.

    ``loss_fn(model, batch)`` returns a scalar loss; the trainer adds ``model.aux_loss()``
    when the model has one that returns a tensor. ``train_data`` is a map-style dataset,
    batched by a DataLoader whose order is a function of (seed, epoch): a seeded permutation
    per epoch, or the batches ``batch_order(seed, epoch)`` lists; ``collate_fn`` is passed to
    it. ``eval_fn(model)`` returns metrics, run under ``torch.no_grad()`` in eval mode.
    Checkpoints go to ``output_dir/checkpoint/``, the loss and metrics to
    ``output_dir/metrics.jsonl`` and, at the end, the adapters to ``output_dir/adapter/``
    (via :meth:`DeltaModel.save`); with ``output_dir=None`` nothing is written and the run
    cannot be resumed.

    ``config.step_mode`` picks how each step runs: by default (``auto``) on CUDA in one
    process it is captured once as a CUDA graph and replayed for every batch of that shape
    (an epoch's last, smaller batch trains eagerly), and elsewhere it runs eagerly;
    ``eager`` opts out (:mod:`unipeft.training.step_modes`, docs/training.md).

    Launched as several processes (``torchrun``, ``accelerate launch``), every rank runs
    the same script: the trainer joins the process group (starting it from the launcher's
    environment if need be), wraps the model with DDP or FSDP2 (``config.distributed``),
    trains each rank on its slice of every global batch of ``config.batch_size``, logs the
    loss averaged over the ranks, and writes files from rank 0 only; the adapters and
    checkpoints hold whole tensors, as in one process. ``loss_fn`` gets the wrapped model,
    ``eval_fn`` and ``aux_loss`` the model itself; ``eval_fn`` runs on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_data: Any,
        config: TrainerConfig | None = None,
        *,
        output_dir: str | os.PathLike | None,
        eval_fn: EvalFn | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_order: _data.BatchOrder | None = None,
        progress: bool = True,
    ) -> None:
        self.model, self.loss_fn, self.train_data = model, loss_fn, train_data
        self.config = config if config is not None else TrainerConfig()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.eval_fn, self.collate_fn, self.progress = eval_fn, collate_fn, progress
        self.batch_order = batch_order
        self._per_epoch = 0
        self._mode = ("eager", "")
        self.ranks = _dist.Ranks()
        """This process's rank, the world size and the engine, once :meth:`train` starts."""

    # ------------------------------------------------------------------ setup
    def _prepare(self, resume: bool) -> tuple[str, int, Checkpoint | None]:
        cfg = self.config
        device = cfg.resolved_device()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TrainingError(
                f"device {device!r} was asked for but CUDA is not available; "
                "set device: cpu (or auto)"
            )
        size = _data.check_dataset(self.train_data)
        self._per_epoch = self._batches_per_epoch(size)
        self.ranks, device = _dist.setup(cfg.distributed, device)
        # a forced step mode that cannot apply is refused before anything is written
        self._mode = choose_mode(cfg.step_mode, device, self.ranks.world, self.ranks.engine)
        if self.batch_order is None:
            _dist.check_batches(size, cfg.batch_size, self.ranks.world)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise TrainingError(
                "the model has no trainable parameter; unipeft.apply() a method first"
            )
        self._param_groups(self.model)  # the group names must match before anything starts
        if self.output_dir is None:
            if resume:
                raise TrainingError("resume=True needs an output_dir to resume from")
            return device, size, None
        check_writable(self.output_dir)
        existing = find_checkpoint(self.output_dir)
        if existing is not None and not resume:
            raise CheckpointError(
                f"{self.output_dir} already holds a checkpoint; pass resume=True (unipeft "
                "train --resume) to continue it, or choose another output_dir (or delete that "
                "one) to start over"
            )
        ckpt = read_checkpoint(self.output_dir) if existing is not None else None
        if ckpt is not None:
            self._check_resumable(ckpt, size)
        return device, size, ckpt

    def _batches_per_epoch(self, size: int) -> int:
        if self.batch_order is None:
            return _data.batches_per_epoch(size, self.config.batch_size)
        count = len(self.batch_order(self.config.seed, 0))
        if count == 0:
            raise TrainingError("batch_order(seed, 0) gave no batch; an epoch needs one")
        return count

    def _epoch_batches(self, epoch: int, skip: int) -> Any:
        cfg = self.config
        if self.ranks.world > 1:
            return self._rank_loader(epoch, skip)
        if self.batch_order is None:
            return _data.epoch_loader(
                self.train_data, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                skip_batches=skip, collate_fn=self.collate_fn,
            )  # fmt: skip
        count = len(self.batch_order(cfg.seed, epoch))
        if count != self._per_epoch:
            raise TrainingError(
                f"batch_order gave {count} batches for epoch {epoch} and {self._per_epoch} for "
                "epoch 0; every epoch needs as many (the step fixes the position in the data)"
            )
        return _data.order_loader(
            self.train_data, self.batch_order, seed=cfg.seed, epoch=epoch,
            skip_batches=skip, collate_fn=self.collate_fn,
        )  # fmt: skip

    def _rank_loader(self, epoch: int, skip: int) -> Any:
        """This rank's slices of the global batches of epoch ``epoch``, after ``skip``."""
        cfg = self.config
        if self.batch_order is None:
            size = len(self.train_data)
            order = _data.EpochOrder(size, _data.epoch_seed(cfg.seed, epoch)).order()
            batches = [order[i : i + cfg.batch_size] for i in range(0, size, cfg.batch_size)]
        else:
            batches = [[int(i) for i in b] for b in self.batch_order(cfg.seed, epoch)]
            if len(batches) != self._per_epoch:
                raise TrainingError(
                    f"batch_order gave {len(batches)} batches for epoch {epoch} and "
                    f"{self._per_epoch} for epoch 0; every epoch needs as many"
                )
        mine = _dist.rank_batches(batches[skip:], self.ranks)
        return _data.order_loader(
            self.train_data, lambda _s, _e: mine, seed=cfg.seed, epoch=epoch,
            collate_fn=self.collate_fn,
        )  # fmt: skip

    def _param_groups(self, model: nn.Module) -> list[tuple[float, list[Tensor]]]:
        """(learning rate, parameters) of each optimizer group: ``lr`` for the parameters
        that no name of ``group_lr`` covers (times the multipliers deltas ask for with
        ``lr_scale``, :func:`unipeft.param_groups`), then one group per name."""
        group_lr = self.config.group_lr
        groups: dict[str | None, list[Tensor]] = {None: [], **{n: [] for n in group_lr}}
        for name, p in model.named_parameters():
            if p.requires_grad:
                under = [n for n in group_lr if name == n or name.startswith(f"{n}.")]
                groups[max(under, key=len) if under else None].append(p)
        empty = [n for n in group_lr if not groups[n]]
        if empty:
            raise TrainingError(
                f"group_lr names {empty}, under which the model has no trainable parameter; "
                "use module names from model.named_parameters()"
            )
        rates = {None: self.config.lr, **group_lr}
        out = [(rates[n], ps) for n, ps in groups.items() if ps and n is not None]
        scales = lr_scales(model)  # what deltas ask for (LoRA+'s B): on the base rate only
        by_scale: dict[float, list[Tensor]] = {}
        for p in groups[None]:
            by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
        base = [(self.config.lr * s, ps) for s, ps in sorted(by_scale.items())]
        return base + out

    def _optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, list[float]]:
        """AdamW over the trainable parameters (fused and capturable when the step mode
        needs it), and each group's peak learning rate."""
        cfg = self.config
        groups = self._param_groups(model)
        if len(groups) == 1:
            params: Any = groups[0][1]
        else:
            params = [{"params": ps, "lr": lr} for lr, ps in groups]
        opt = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, **optimizer_options(self._mode[0])
        )
        return opt, [lr for lr, _ in groups]

    def _check_resumable(self, ckpt: Checkpoint, size: int) -> None:
        assert self.output_dir is not None
        where = self.output_dir / "checkpoint"
        now = self.config.model_dump(mode="json")
        then = {**_DEFAULTS, **ckpt.config}  # fields added since the checkpoint: defaults
        changed = [f for f in RESUME_FIELDS if then[f] != now[f]]
        if self._scheduled() and then["steps"] != now["steps"]:
            changed.append("steps")  # the schedule is a function of steps
        if changed:
            diff = ", ".join(f"{f}: {then[f]!r} -> {now[f]!r}" for f in changed)
            raise CheckpointError(
                f"cannot resume {where}: {diff}. These fields fix the data order and the "
                "updates; keep the checkpoint's values, or start over in another output_dir"
            )
        if ckpt.step > self.config.steps:
            raise CheckpointError(
                f"cannot resume {where}: it is at step {ckpt.step}, beyond steps="
                f"{self.config.steps}. Set steps to at least {ckpt.step}"
            )
        if ckpt.state["dataset_len"] != size:
            raise CheckpointError(
                f"cannot resume {where}: it was trained on {ckpt.state['dataset_len']} "
                f"examples, this dataset has {size}. Resume with the same data"
            )
        epoch = ckpt.step // self._per_epoch
        if ckpt.state.get("epoch_seed") != _data.epoch_seed(self.config.seed, epoch):
            raise CheckpointError(
                f"cannot resume {where}: its data order (epoch seed) differs from this "
                "unipeft's; finish the run with the unipeft version that started it"
            )
        if ckpt.state.get("trainable_keys") != trainable_state_keys(self.model):
            raise CheckpointError(
                f"cannot resume {where}: it was written for a model with other trainable "
                "tensors; resume with the same model, method and config"
            )

    # ------------------------------------------------------------------ training
    def train(self, *, resume: bool = False) -> TrainResult:
        """Train to ``config.steps``. With ``resume=True`` continue from the checkpoint in
        ``output_dir`` if there is one (bit-exactly on CPU), else start from step 0."""
        cfg = self.config
        device, size, ckpt = self._prepare(resume)
        ranks, out = self.ranks, self.output_dir
        ranks.barrier()  # every rank has read the checkpoint before rank 0 tidies the folder
        if out is not None and ranks.main:
            out.mkdir(parents=True, exist_ok=True)
            recover(out)
            recover(out, ADAPTER)
        model = self.model.to(device)
        model.train()
        memory = PeakMemory(device) if cfg.measure_memory else None
        with memory if memory is not None else contextlib.nullcontext():
            began = time.perf_counter()
            # wrapped before the optimizer exists: FSDP2 turns the parameters into shards
            wrapped = _dist.wrap(model, ranks, cfg.distributed, device)
            optimizer, peaks = self._optimizer(model)
            start = 0
            if ckpt is None:
                if cfg.seed_generators:
                    torch.manual_seed(cfg.seed)
                    random.seed(cfg.seed)
                    np.random.seed(cfg.seed % (1 << 32))
            else:
                assert out is not None
                # the optimizer first: it is the trainer's own, so a checkpoint refused
                # there leaves the user's model as it was (the weights check all, then load)
                optimizer_from_parts(optimizer, ckpt.optimizer, ckpt.optimizer_doc)
                load_trainable_state(model, ckpt.trainable, str(out / "checkpoint"))
                rng_from_parts(ckpt.rng, ckpt.state["rng"])
                start = ckpt.step
            # after a checkpoint's param groups (of any step mode) replaced the optimizer's
            conform_optimizer(optimizer, self._mode[0])
            if out is not None and ranks.main:
                truncate_metrics(out / METRICS, start)
            ranks.barrier()
            result = TrainResult(step=start, start_step=start, output_dir=out, adapter_dir=None)
            result.step = self._loop(wrapped, optimizer, peaks, result, device, size)
            result.seconds = time.perf_counter() - began
        if memory is not None:
            result.peak_memory_bytes = memory.bytes
        result.adapter_dir = self._export(model)
        return result

    def _loop(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        peaks: Sequence[float],
        result: TrainResult,
        device: str,
        size: int,
    ) -> int:
        """Steps from ``result.start_step`` to ``config.steps``; the last step."""
        cfg = self.config
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scheduled = self._scheduled()
        shown = self.progress and self.ranks.main
        mode, reason = self._mode
        report = result.step_mode = StepModeReport(cfg.step_mode, mode, reason)
        LOG.info("unipeft.training: step mode %s (%s)", mode, reason)
        runner = make_runner(
            mode,
            report,
            loss_of=lambda batch: self._loss(model, batch),
            update=lambda loss: self._update(optimizer, params, loss),
            params=params,
            strict=cfg.step_mode != "auto",
        )
        last = self._per_epoch - 1 if self._per_epoch > 1 else -1  # a one-batch epoch: fixed
        with progress_bar(cfg.steps, result.start_step, shown) as advance:
            step = result.start_step
            while step < cfg.steps:
                epoch, skip = divmod(step, self._per_epoch)
                for index, batch in enumerate(self._epoch_batches(epoch, skip), skip):
                    if scheduled:
                        factor = cfg.lr_factor(step)
                        for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                            set_lr(group, peak * factor)
                    loss = runner(
                        to_device(batch, device),
                        last=index == last,
                        where=f"batch {index} of epoch {epoch} (step {step + 1})",
                    )
                    step += 1
                    self._after_step(
                        self.model, optimizer, result, step, epoch, size, loss, runner.sync
                    )
                    advance(loss)
                    if step >= cfg.steps:
                        break
        runner.sync()  # the caller's eager passes see the trained weights
        return step

    def _scheduled(self) -> bool:
        """Whether the learning rate changes from step to step."""
        return self.config.schedule != "constant" or self.config.warmup > 0

    def _loss(self, model: nn.Module, batch: Any) -> Tensor:
        """``loss_fn`` plus the model's ``aux_loss``: what ``step_mode: compile`` compiles."""
        loss = self.loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError("loss_fn(model, batch) must return a scalar tensor")
        aux = getattr(self.model, "aux_loss", None)  # the model's own, not a wrapper's
        extra = aux() if callable(aux) else None
        if isinstance(extra, Tensor):
            loss = loss + extra
        return loss

    def _update(self, opt: torch.optim.Optimizer, params: list[Tensor], loss: Tensor) -> Tensor:
        """Backward, clipping and the optimizer step (with the forward: one CUDA graph)."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        opt.step()
        return loss.detach()

    def _after_step(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        result: TrainResult,
        step: int,
        epoch: int,
        size: int,
        loss: Tensor,
        sync: Callable[[], None],
    ) -> None:
        cfg, last = self.config, step == self.config.steps
        record: dict[str, float] = {}
        if step % cfg.log_every == 0 or last:
            record["loss"] = float(self.ranks.mean(loss))
        if self.eval_fn is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
            sync()  # eval's caches key on version counters, which graph replays leave alone
            result.metrics = self._evaluate(model)
            record.update(result.metrics)
        if record:
            record = {"step": step, "epoch": epoch, **record}
            result.history.append(record)
            if self.output_dir is not None and self.ranks.main:
                mode = result.step_mode.record() if last and result.step_mode else {}
                append_metrics(self.output_dir / METRICS, {**record, **mode})
        checkpoint = last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if checkpoint and self.output_dir is not None:
            self._checkpoint(model, opt, step, size)

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        assert self.eval_fn is not None
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # eval draws no randomness
            model.eval()
            try:
                metrics = self.eval_fn(model)
            finally:
                model.train()
        return {str(k): float(v) for k, v in metrics.items()}

    def _checkpoint(
        self, model: nn.Module, opt: torch.optim.Optimizer, step: int, size: int
    ) -> None:
        assert self.output_dir is not None
        cfg = self.config
        epoch, batch = divmod(step, self._per_epoch)
        opt_tensors, opt_doc = optimizer_to_parts(opt)
        opt_doc = plain_groups(opt_doc)  # graphs keep the learning rate in a tensor
        rng_tensors, rng_doc = rng_to_parts()
        state = {
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "epoch_seed": _data.epoch_seed(cfg.seed, epoch),
            "dataset_len": size,
            "trainable_keys": trainable_state_keys(model),
            "rng": rng_doc,
        }
        ckpt = Checkpoint(
            trainable=trainable_state(model),
            optimizer=opt_tensors,
            rng=rng_tensors,
            optimizer_doc=opt_doc,
            config=cfg.model_dump(mode="json"),
            state=state,
        )
        if self.ranks.main:
            write_checkpoint(self.output_dir, ckpt)
        self.ranks.barrier()

    def _export(self, model: nn.Module) -> Path | None:
        delta_model = find_delta_model(model)
        if delta_model is None or self.output_dir is None:
            return None
        if self.ranks.main:
            where = publish(self.output_dir, ADAPTER, lambda tmp: delta_model.save(str(tmp)))
        else:  # a collective when sharded: every rank gathers, rank 0 writes
            where = self.output_dir / ADAPTER
            delta_model.save(str(where))
        self.ranks.barrier()
        return where
