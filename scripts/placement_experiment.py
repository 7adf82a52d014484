"""Automatic placement against LoRA's default placement at the same budget, on the demo's
text task (pretrained all-MiniLM-L6-v2 on VADER word polarity), over several seeds.

For each seed: the default row is LoRA on its default targets (q and v) at the rank
``unipeft.plan_budget`` gives for the budget; the automatic row scores every projection
on calibration batches from the seed's *training* words (the fit part of the training
split; the test words are never read before the final accuracy) and places LoRA of the
same rank by the ``taylor`` score under the same budget. Both train with the demo's LoRA
recipe (learning rate, epochs) and are scored on the seed's test words.

    python scripts/placement_experiment.py --seeds 0 1 2 --output docs/results/placement-text.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.functional import cross_entropy

import unipeft
from unipeft.analysis import SCORES, place, score_sites
from unipeft.demo import TEXT_BUDGET
from unipeft.demo.runner import run_recipes
from unipeft.demo.text import build_task, recipes
from unipeft.demo.train import set_determinism


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=float, default=TEXT_BUDGET)
    ap.add_argument("--calibration", type=int, default=8, help="calibration batches")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda")
    ap.add_argument("--score", default="taylor", choices=SCORES)
    ap.add_argument("--by", default="site", choices=("site", "role"), help="choose sites or roles")
    ap.add_argument("--probe-steps", type=int, default=32, help="with --score probe")
    ap.add_argument("--probe-lr", type=float, default=1e-3, help="with --score probe")
    ap.add_argument(
        "--select",
        action="store_true",
        help="choose each placement's learning rate on the validation split carved from the "
        "training words (the demo's grid), instead of the rate chosen for q, v",
    )
    ap.add_argument(
        "--auto-only", action="store_true", help="skip the default rows (same seeds: same rows)"
    )
    args = ap.parse_args()
    lora = next(r for r in recipes(args.quick) if r.name == "lora")
    device = torch.device(args.device)
    rows = []
    for seed in args.seeds:
        set_determinism(seed, threads=torch.get_num_threads())
        task = build_task(seed, args.quick)
        clf = task.make()
        default = unipeft.plan_budget(clf.encoder, "lora", args.budget)  # q and v
        r = int(default.config["r"])
        gen = torch.Generator().manual_seed(seed)
        batches = task.draw(gen)[: args.calibration]  # training words only
        calib = [task.collate([task.train_data[i] for i in idx]) for idx in batches]
        began = time.perf_counter()
        scores = score_sites(
            clf.encoder, calib, lambda _e, b, clf=clf: cross_entropy(clf(**b[0]), b[1]), rank=r,
            targets=["attn.q", "attn.k", "attn.v", "attn.out", "mlp.up", "mlp.down"],
            probe_steps=args.probe_steps if args.score == "probe" else 0, probe_lr=args.probe_lr,
        )  # fmt: skip
        placement = place(
            clf.encoder, scores, "lora", args.budget, score=args.score, by=args.by, r=r
        )
        scoring_s = time.perf_counter() - began
        runs = [
            ("default (q, v)", replace(lora, name="lora default", targets=None, config={"r": r})),
            (
                "automatic",
                replace(lora, name="lora auto", targets=placement.targets, config={"r": r}),
            ),
        ]
        for name, recipe in runs[1:] if args.auto_only else runs:
            row = run_recipes(task, [recipe], seed, device, args.budget, print, args.select)[0]
            rows.append(
                {
                    "seed": seed,
                    "placement": name,
                    "targets": recipe.targets or list(default.targets),
                    "r": r,
                    "trainable_fraction": row.trainable_fraction,
                    "accuracy": row.accuracy,
                    "lr": row.hyperparameters.get("lr"),
                    "validation": row.validation,
                    "train_seconds": row.train_seconds,
                }
            )
            print(seed, name, recipe.targets, f"acc {row.accuracy:.4f}", flush=True)
        rows[-1]["scoring_seconds"] = scoring_s
    summary = {}
    for name in ("default (q, v)", "automatic"):
        acc = [r["accuracy"] for r in rows if r["placement"] == name]
        if not acc:
            continue
        summary[name] = {
            "mean": statistics.mean(acc),
            "stdev": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "min": min(acc),
            "max": max(acc),
        }
    out = {
        "task": "demo text: all-MiniLM-L6-v2 on VADER word polarity",
        "budget": args.budget,
        "quick": args.quick,
        "calibration_batches": args.calibration,
        "score": args.score,
        "by": args.by,
        "probe": (
            {"steps": args.probe_steps, "lr": args.probe_lr} if args.score == "probe" else None
        ),
        "select": args.select,
        "recipe": {"lr": lora.lr, "epochs": lora.epochs},
        "threads": torch.get_num_threads(),
        "rows": rows,
        "summary": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
