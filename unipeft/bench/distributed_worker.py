"""One launch of ``unipeft bench distributed``: LoRA training steps of a Llama-shaped model
under one engine (a plain process, DDP or FSDP2), for unipeft and/or Hugging Face PEFT.

Started by :mod:`unipeft.bench.distributed` through ``torchrun``, one launch per
(library, engine, world size, model) on the GPU so that peak memory is each run's own::

    torchrun --standalone --nproc_per_node 2 -m unipeft.bench.distributed_worker \\
        --runs unipeft:fsdp2 --model llama --device cuda --out rows.jsonl

Rank 0 appends one JSON object per run to ``--out``. :func:`train_run` is the whole
measurement and also runs in a single process without ``torchrun`` (world size 1).

The data: step ``s`` draws a global batch of ``batch * world_size`` sequences from a
generator seeded with ``seed`` and ``s``; rank ``k`` trains on rows ``k * batch`` to
``(k + 1) * batch``. A one-process run with ``batch * world_size`` sequences therefore
sees the same global batch at every step as a run over ``world_size`` processes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from statistics import median
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .perf_setup import FULL_LLAMA, LLAMA_ALL, _quiet
from .shapes import LLAMA3_8B, TINY_LLAMA

LIBRARIES = ("unipeft", "peft")  # this library first, the one it is measured against second
ENGINES = ("single", "ddp", "fsdp2")
ADAPTER = "default"

LLAMA_085B = FULL_LLAMA  # the `llama` model of `unipeft bench perf --full`
TINY = TINY_LLAMA
MODELS = {"llama": LLAMA_085B, "8b": LLAMA3_8B, "tiny": TINY}


@dataclass(frozen=True)
class RunSpec:
    """One measured run; every rank of a launch gets the same spec."""

    @property
    def adapts_with_unipeft(self) -> bool:
        """Whether this run adapts the model with unipeft (else with PEFT)."""
        return self.adapted_with == LIBRARIES[0]

    adapted_with: str  # the library that adds the LoRA: unipeft | peft (rows: 'library')
    engine: str  # single | ddp | fsdp2
    model: str  # a key of MODELS
    layers: int | None = None  # fewer decoder layers than the shape has
    device: str = "cpu"  # cpu | cuda
    batch: int = 8  # sequences per process and step
    length: int = 512
    steps: int = 10  # timed steps
    warmup: int = 3  # untimed steps before them
    rank: int = 16
    alpha: float = 32.0
    lr: float = 1e-3
    seed: int = 0

    def llama(self) -> dict[str, Any]:
        shape = dict(MODELS[self.model])
        if self.layers is not None:
            shape["num_hidden_layers"] = self.layers
        return shape


@dataclass
class Context:
    """Where this process stands: its rank, the world, its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


# ============================================================================== building


def build_base(spec: RunSpec, device: torch.device) -> nn.Module:
    """A randomly initialised LlamaForCausalLM (seeded), built directly on ``device`` in
    bf16 on CUDA (fp32 on the CPU), so that even the 8B shape builds in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec.llama())
    config._attn_implementation = "sdpa"
    config.use_cache = False  # training: no key/value cache
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(spec.seed)
    with _quiet(), torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.train()


def _seed_factor(path: str, weight: Tensor, seed: int) -> None:
    """Give a LoRA ``A`` (``r x in``) the same values in both libraries: uniform in
    ``±1/sqrt(in)`` (the bound of their Kaiming init), from a generator seeded by the
    layer's path."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))
    bound = weight.shape[-1] ** -0.5
    values = (torch.rand(weight.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    with torch.no_grad():
        weight.copy_(values.to(weight.dtype))


def add_lora(spec: RunSpec, base: nn.Module) -> nn.Module:
    """LoRA (r, alpha, no dropout) on every linear projection of the decoder layers, adapters
    in the base's dtype, ``A`` seeded per layer and ``B`` at zero in both libraries."""
    if spec.adapts_with_unipeft:
        import unipeft

        model = unipeft.apply(
            base, "lora", r=spec.rank, alpha=spec.alpha, targets=LLAMA_ALL.unipeft
        )
        for att in model.adapters[ADAPTER].attachments:
            _seed_factor(att.site.path, att.delta.A, spec.seed)
        return model
    import peft
    from peft.tuners.lora import LoraLayer

    config = peft.LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=LLAMA_ALL.peft
    )
    with _quiet():
        model = peft.get_peft_model(base, config, autocast_adapter_dtype=False)
    for path, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer):
            _seed_factor(path, layer.lora_A[ADAPTER].weight, spec.seed)
    return model


def decoder_layers(spec: RunSpec, model: nn.Module) -> nn.ModuleList:
    """The repeated blocks (``model.layers`` of the LlamaForCausalLM) under either wrapper."""
    inner = model.base_model if spec.adapts_with_unipeft else model.base_model.model
    return inner.model.layers


def wrap(spec: RunSpec, model: nn.Module, ctx: Context) -> tuple[nn.Module, str]:
    """Hand the model to the engine as the engine documents it; returns the wrapped model
    and a line saying how it was wrapped."""
    if spec.engine == "single":
        return model, "no wrapper"
    if spec.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if ctx.device.type == "cuda":
            ddp = DDP(model, device_ids=[ctx.local_rank])
            return ddp, "DistributedDataParallel(model, device_ids=[local_rank])"
        return DDP(model), "DistributedDataParallel(model)"
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    if spec.adapts_with_unipeft:
        from unipeft.distributed import shard

        shard(model, mesh=mesh)  # fully_shard on each block, then on the DeltaModel
        return model, "unipeft.distributed.shard(model, mesh=mesh)"
    for layer in decoder_layers(spec, model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, "fully_shard on each decoder layer, then on the whole model"


# ============================================================================== training


def global_batches(spec: RunSpec, world: int, count: int) -> list[Tensor]:
    """``count`` global batches of token ids, ``(batch * world, length)`` each."""
    vocab = spec.llama()["vocab_size"]
    out = []
    for step in range(count):
        gen = torch.Generator().manual_seed(spec.seed * 7919 + step)
        out.append(torch.randint(0, vocab, (spec.batch * world, spec.length), generator=gen))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_over_ranks(values: Tensor, ctx: Context) -> Tensor:
    if ctx.distributed and ctx.world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= ctx.world
    return values


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_run(spec: RunSpec, ctx: Context | None = None) -> dict[str, Any]:
    """Build, wrap and train; return this rank's figures (every rank's, combined on rank 0,
    by :func:`gather`). Losses are the means over the global batch."""
    ctx = ctx or Context()
    if spec.engine != "single" and not ctx.distributed:
        raise RuntimeError(f"the {spec.engine} engine needs torch.distributed: run under torchrun")
    dev = ctx.device
    t_build = time.perf_counter()
    base = build_base(spec, dev)
    parameters = sum(p.numel() for p in base.parameters())
    model = add_lora(spec, base)
    trainable = _trainable(model)
    adapter_dtype = str(next(p for p in model.parameters() if p.requires_grad).dtype)
    model, wrapping = wrap(spec, model, ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(params, lr=spec.lr, fused=fused or None)
    build_s = time.perf_counter() - t_build

    total = spec.warmup + spec.steps
    lo, hi = ctx.rank * spec.batch, (ctx.rank + 1) * spec.batch
    batches = [b[lo:hi].to(dev) for b in global_batches(spec, ctx.world, total)]
    if ctx.distributed:
        dist.barrier()
    _sync(dev)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    resident = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None

    losses: list[Tensor] = []
    times: list[float] = []
    for ids in batches:
        _sync(dev)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach().float())
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    with torch.no_grad():  # the loss on the first global batch after every update
        after = model(input_ids=batches[0], labels=batches[0]).loss.detach().float()
    mean_losses = _mean_over_ranks(torch.stack([*losses, after]), ctx).tolist()
    step_s = median(times[spec.warmup :])
    fields = asdict(spec)
    row: dict[str, Any] = {
        "library": fields.pop("adapted_with"),
        **fields,
        "world_size": ctx.world,
        "llama": spec.llama(),
        "parameters": parameters,
        "trainable": trainable,
        "adapter_dtype": adapter_dtype.removeprefix("torch."),
        "wrapping": wrapping,
        "optimizer": f"AdamW(lr={spec.lr}, fused={fused})",
        "build_s": build_s,
        "step_s": step_s,
        "step_times_s": times,
        "losses": mean_losses[:-1],
        "loss_after": mean_losses[-1],
        "resident_bytes": resident,
        "peak_bytes": peak,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "device_total_bytes": (
            torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
        ),
    }
    del model, opt, params, base, batches, losses
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def gather(row: dict[str, Any], ctx: Context) -> dict[str, Any] | None:
    """Rank 0's row with every rank's step time and memory combined: the slowest rank's
    median step, the largest peak; ``tokens_per_s`` over the global batch. None elsewhere."""
    rows = [row]
    if ctx.distributed and ctx.world > 1:
        rows = [None] * ctx.world
        dist.all_gather_object(rows, row)
    if ctx.rank != 0:
        return None
    out = dict(rows[0])
    out["step_s"] = max(r["step_s"] for r in rows)
    out["tokens_per_s"] = out["batch"] * ctx.world * out["length"] / out["step_s"]
    for key in ("peak_bytes", "resident_bytes", "peak_rss_bytes"):
        values = [r[key] for r in rows]
        out[f"{key}_per_rank"] = values
        out[key] = None if None in values else max(values)
    return out


# ================================================================================ launch


def _context(device: str) -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but CUDA is not available here")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **kwargs)
    return Context(rank=rank, world=world, local_rank=local, device=dev)


def run_in_process(specs: list[RunSpec]) -> list[dict[str, Any]]:
    """One-process CPU runs in this process, without a launch: a one-rank gloo group
    (FSDP2 needs one) for their duration, the caller's random state left as it was."""
    if any(s.device != "cpu" for s in specs):
        raise ValueError("only CPU runs run in the calling process; launch GPU runs")
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rows = []
        with torch.random.fork_rng():
            for spec in specs:
                row = gather(train_run(spec, Context()), Context())
                assert row is not None
                rows.append({**row, "runs_in_launch": len(specs)})
        return rows
    finally:
        if own:
            dist.destroy_process_group()


def parse_runs(text: str) -> list[tuple[str, str]]:
    """``unipeft:ddp,peft:ddp`` -> [("unipeft", "ddp"), ("peft", "ddp")]."""
    runs = []
    for item in text.split(","):
        library, _, engine = item.strip().partition(":")
        if library not in LIBRARIES or engine not in ENGINES:
            raise ValueError(f"--runs: {item!r} is not LIBRARY:ENGINE ({LIBRARIES}, {ENGINES})")
        runs.append((library, engine))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unipeft.bench.distributed_worker")
    p.add_argument("--runs", required=True, help="LIBRARY:ENGINE,... run one after another")
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", required=True, help="rank 0 appends one JSON line per run here")
    for name, default in (("batch", 8), ("length", 512), ("steps", 10), ("warmup", 3)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ctx = _context(args.device)
    runs = parse_runs(args.runs)
    try:
        for library, engine in runs:
            spec = RunSpec(
                adapted_with=library, engine=engine, model=args.model, layers=args.layers,
                device=args.device, batch=args.batch, length=args.length, steps=args.steps,
                warmup=args.warmup, lr=args.lr, seed=args.seed,
            )  # fmt: skip
            row = gather(train_run(spec, ctx), ctx)
            if row is not None:
                row["runs_in_launch"] = len(runs)
                with open(args.out, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(
                    f"{library} {engine} x{ctx.world} {args.model}: "
                    f"{row['tokens_per_s']:.0f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if ctx.distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
