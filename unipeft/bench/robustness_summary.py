"""Several seeds of the robustness benchmark, summarised: for every task and recipe, the
mean and spread over seeds of clean accuracy, mean corruption accuracy (mCA), mCA / clean
and mCA / full fine-tuning.

Each seed is one run of ``unipeft bench robustness --seed N`` (a single process, so seeds
run side by side on separate cores); :func:`summarise` takes their results. A seed may be
given as several results that cover different tasks or towers (a run on one tower alone);
a recipe given twice for the same seed is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..contract.errors import ConfigError

METRICS = ("clean", "mca", "relative", "vs_full")
"""The per-recipe figures summarised (the keys of a robustness row)."""


def read_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The results in ``paths``: ``robustness.json`` files, or folders holding one."""
    out = []
    for path in paths:
        file = path / "robustness.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(
                f"{path}: no robustness.json there; give the --output folder of a run"
            )
        try:
            result = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file}: not a robustness result ({exc})") from exc
        if not isinstance(result, dict) or not {"seed", "quick", "rows"} <= set(result):
            raise ConfigError(f"{file}: not a robustness result (no seed, quick and rows)")
        out.append(result)
    return out


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    if not values:
        return {"mean": None, "sd": None, "values": []}
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": math.sqrt(var), "values": values}


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row per task and recipe (in the order first seen) with :data:`METRICS` over the
    seeds that ran it. Quick and full runs are not mixed."""
    if not results:
        raise ConfigError("no robustness results to summarise")
    modes = {bool(r["quick"]) for r in results}
    if len(modes) > 1:
        raise ConfigError("the results mix quick and full runs; summarise one kind at a time")
    by_recipe: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for result in results:
        for row in result["rows"]:
            seeds = by_recipe.setdefault((row["task"], row["method"]), {})
            if result["seed"] in seeds:
                raise ConfigError(
                    f"{row['task']} | {row['method']} appears twice for seed {result['seed']}; "
                    "give each run once"
                )
            seeds[result["seed"]] = row
    rows = []
    for (task, method), seeds in by_recipe.items():
        order = sorted(seeds)
        first = seeds[order[0]]
        entry: dict[str, Any] = {
            "task": task,
            "method": method,
            "family": first.get("family"),
            "trainable_fraction": first.get("trainable_fraction"),
            "seeds": order,
        }
        for key in METRICS:
            entry[key] = _spread([seeds[s][key] for s in order if seeds[s].get(key) is not None])
        rows.append(entry)
    return {
        "seeds": sorted({r["seed"] for r in results}),
        "quick": modes.pop(),
        "seconds": sum(float(r.get("seconds", 0.0)) for r in results),
        "rows": rows,
    }


def _cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "n/a"
    if len(stat["values"]) < 2:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """One table per task: each recipe's figures as mean ± standard deviation over seeds."""
    mode = "quick" if summary["quick"] else "full"
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [f"Robustness over seeds {seeds} ({mode} runs; mean ± sd over seeds)", ""]
    tasks: dict[str, list[dict[str, Any]]] = {}
    for row in summary["rows"]:
        tasks.setdefault(row["task"], []).append(row)
    for task, rows in tasks.items():
        lines += [f"**{task}**", ""]
        lines.append("| recipe | seeds | clean | mCA | mCA / clean | mCA / full FT |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            cells = [r["method"], str(len(r["seeds"])), *(_cell(r[k]) for k in METRICS)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], directory: Path) -> list[Path]:
    """``robustness-seeds.json`` and ``robustness-seeds.md`` in ``directory``."""
    from . import write_json

    write_json(directory / "robustness-seeds.json", summary)
    (directory / "robustness-seeds.md").write_text(summary_markdown(summary), encoding="utf-8")
    return [directory / "robustness-seeds.json", directory / "robustness-seeds.md"]
