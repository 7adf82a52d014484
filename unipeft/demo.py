"""A small end-to-end run on the three backbone families: ``python -m unipeft.demo``.

For a tiny BERT, timm ViT and open_clip CLIP built from configs (nothing is downloaded), it
applies LoRA r=4 on ``attn.q`` / ``attn.v``, checks the output equals the base at
initialisation, trains a few steps towards a random target, merges and compares, unmerges,
saves and loads into a fresh backbone, and unloads back to the original state dict.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import unipeft
from unipeft.testing.backbones import BACKBONES


def run_one(name: str, steps: int, seed: int) -> dict[str, object]:
    bb = BACKBONES[name]
    torch.manual_seed(seed)
    backbone = bb.make()
    original = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.requires_grad_(False)
    with torch.no_grad():
        base = bb.run(backbone, bb.sample(0))
    backbone.requires_grad_(True)

    model = unipeft.apply(backbone, "lora", r=4, targets=["attn.q", "attn.v"])
    with torch.no_grad():
        at_init = bb.run(model, bb.sample(0))
    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    start = time.perf_counter()
    losses = []
    for _step in range(steps):
        loss = torch.nn.functional.mse_loss(bb.run(model, bb.sample(0)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    with torch.no_grad():
        trained = bb.run(model, bb.sample(0))
        model.merge()
        merged = bb.run(model, bb.sample(0))
        model.unmerge()
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        fresh = bb.make()
        fresh.load_state_dict(original)
        with torch.no_grad():
            reloaded = bb.run(unipeft.load(fresh, tmp), bb.sample(0))
    trainable = model.num_trainable_parameters()
    back = model.unload()
    restored = all(torch.equal(back.state_dict()[k], v) for k, v in original.items())
    total = sum(p.numel() for p in back.parameters())
    return {
        "backbone": name,
        "trainable": f"{trainable} ({100 * trainable / total:.1f}%)",
        "init_diff": (at_init - base).abs().max().item(),
        "loss": f"{losses[0]:.4f} -> {losses[-1]:.4f}",
        "merge_diff": (merged - trained).abs().max().item(),
        "reload_diff": (reloaded - trained).abs().max().item(),
        "unload_exact": restored,
        "train_s": train_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    for name in ("bert", "timm_vit", "open_clip"):
        row = run_one(name, args.steps, args.seed)
        rows.append(row)
    header = (
        f"{'backbone':10} {'trainable':14} {'loss (first -> last)':22} {'|init-base|':>11} "
        f"{'|merged-unmerged|':>17} {'|reloaded-saved|':>16} {'unload exact':>12}"
    )
    print("unipeft demo: LoRA r=4 on attn.q, attn.v")
    print(header)
    print("-" * len(header))
    ok = True
    for r in rows:
        print(
            f"{r['backbone']:10} {r['trainable']:14} {r['loss']:22} {r['init_diff']:11.2e} "
            f"{r['merge_diff']:17.2e} {r['reload_diff']:16.2e} {r['unload_exact']!s:>12}"
        )
        ok &= r["init_diff"] < 1e-5 and r["merge_diff"] < 1e-4 and r["unload_exact"]
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
