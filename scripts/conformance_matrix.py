"""The conformance matrix: every registered method against every tiny backbone.

For each pair it applies the method with its default config and default targets to a fresh
tiny backbone and records whether it attaches, or the refusal's first line. Given the JUnit XML
of a test run that included the conformance suite (``pytest --junitxml=FILE``), it also counts
the suite's passed, failed and skipped cases for each pair.

    python scripts/conformance_matrix.py                       # applicability only
    python scripts/conformance_matrix.py --junit report.xml    # with the suite's outcomes
    python scripts/conformance_matrix.py --json matrix.json    # machine-readable as well

Prints a Markdown table: ``pass 17/17`` (every conformance case of the pair passed),
``FAIL 2/17``, ``applies`` (no JUnit given), ``refused: <reason>``, or ``default too large``
(only the default size does not fit the tiny widths; the suite runs smaller configs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import unipeft
from unipeft.contract.errors import ConfigError, UnipeftError
from unipeft.testing.backbones import BACKBONES

_CASE = re.compile(r"test_(conformance|lifecycle)\[(?P<id>.+)\]$")


def applicability(method: str, backbone: str) -> tuple[str, str | None]:
    """Whether ``method`` attaches to the tiny ``backbone`` with its defaults: ``("applies",
    None)``, ``("size", reason)`` when only the default size is too large for the tiny
    widths (a smaller config attaches; the suite draws such configs), or ``("refused",
    reason)``."""
    model = BACKBONES[backbone].make()
    try:
        unipeft.apply(model, method)
    except ConfigError as exc:
        return "size", str(exc).splitlines()[0]
    except UnipeftError as exc:
        return "refused", str(exc).splitlines()[0]
    return "applies", None


def outcomes(junit: Path, methods: list[str], backbones: list[str]) -> dict[tuple, Counter]:
    """``(method, backbone) -> Counter(passed=, failed=, skipped=)`` from a JUnit XML file."""
    counts: dict[tuple, Counter] = {}
    pairs = sorted(
        ((m, b) for m in methods for b in backbones), key=lambda p: -len(p[0]) - len(p[1])
    )
    for case in ET.parse(junit).getroot().iter("testcase"):
        match = _CASE.search(case.get("name", ""))
        if match is None:
            continue
        node = match.group("id")
        for m, b in pairs:  # longest names first: "lora_fa" before "lora"
            if node == f"{m}-{b}" or node.startswith(f"{m}-{b}-"):
                state = "passed"
                if case.find("failure") is not None or case.find("error") is not None:
                    state = "failed"
                elif case.find("skipped") is not None:
                    state = "skipped"
                counts.setdefault((m, b), Counter())[state] += 1
                break
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, help="JUnit XML of a run with the suite")
    parser.add_argument("--json", type=Path, help="also write the matrix here")
    args = parser.parse_args(argv)
    methods = [m.id for m in unipeft.list_methods()]
    backbones = list(BACKBONES)
    counts = outcomes(args.junit, methods, backbones) if args.junit else {}
    matrix: dict[str, dict[str, str]] = {}
    bad = 0
    for m in methods:
        row = matrix[m] = {}
        for b in backbones:
            kind, reason = applicability(m, b)
            c = counts.get((m, b))
            if kind == "size" and not (c and c["passed"]):
                row[b] = f"default too large: {reason}"
            elif kind == "refused":
                row[b] = f"refused: {reason}"
                if c and c["failed"]:
                    row[b] += f" (FAIL {c['failed']})"
                    bad += 1
            elif c is None:
                row[b] = "applies" if not args.junit else "applies (not in the run)"
            else:
                ran = c["passed"] + c["failed"]
                failed = c["failed"]
                row[b] = f"FAIL {failed}/{ran}" if failed else f"pass {c['passed']}/{ran}"
                bad += bool(c["failed"])
    print("| method | " + " | ".join(backbones) + " |")
    print("|---|" + "---|" * len(backbones))
    for m, row in matrix.items():
        cells = [row[b].replace("|", "/") for b in backbones]
        print(f"| {m} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(matrix, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
