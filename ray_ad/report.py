"""Plain-text metric tables, as the CLI, the jobs and the benchmarks print them."""

from __future__ import annotations

from typing import Any

METRIC_KEYS = (
    "image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
    "seconds_per_image",
)


def format_table(rows: dict[str, dict[str, Any]], keys: tuple[str, ...] = METRIC_KEYS) -> str:
    """A plain-text table: one row per run, one column per metric."""
    name_width = max(8, *(len(name) for name in rows))
    header = f"{'':<{name_width}}  " + "  ".join(f"{k:>12}" for k in keys)
    lines = [header]
    for name, values in rows.items():
        cells = []
        for key in keys:
            value = values.get(key)
            cells.append(f"{'-':>12}" if value is None else f"{value:>12.4f}")
        lines.append(f"{name:<{name_width}}  " + "  ".join(cells))
    return "\n".join(lines)
