"""One result row format for every benchmark, so `make bench` can print them as one table.

A row: what was measured, our figure, the baseline measured in the same run (None where there is
no fair one, e.g. a latency with nothing to compare against), what the baseline is, the unit,
and the target the issue sets.
"""

from __future__ import annotations

import json
from pathlib import Path


def row(
    what: str, value: float, unit: str, target: str, baseline: float | None = None, baseline_is: str = ""
) -> dict:
    return {
        "what": what,
        "value": value,
        "unit": unit,
        "target": target,
        "baseline": baseline,
        "baseline_is": baseline_is,
    }


def write_rows(rows: list[dict], path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(rows, indent=1))


def table(rows: list[dict]) -> str:
    lines = [f"{'measure':52} {'ours':>12}  {'baseline (same run)':>34}  target"]
    for r in rows:
        ours = f"{r['value']:.3g} {r['unit']}"
        base = f"{r['baseline']:.3g} {r['unit']} {r['baseline_is']}" if r.get("baseline") is not None else "-"
        lines.append(f"{r['what'][:52]:52} {ours:>12}  {base:>34}  {r['target']}")
    return "\n".join(lines)


# A child's peak RSS, printed by the child itself as its last line. wait4's ru_maxrss will not do:
# Linux carries the parent's high-water mark across fork and exec, so a child of a process that
# loaded torch reports at least the parent's size.
PEAK_RSS_SNIPPET = (
    "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
)
