"""Small helpers the benchmark scripts share: a printed table, a JSON record, machine facts."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python benchmarks/x.py` from a checkout
SHARED = ROOT.parent / "shared" / "datasets"


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def table(rows: list[dict], columns: list[str], title: str) -> str:
    """Rows of dicts as an aligned text table; floats with 3 decimals."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))  # noqa: E731
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([title, line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_json(path: Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}", flush=True)


def median_round(rounds: list[dict], key: str) -> dict:
    """The round whose `key` is the median (the upper one of an even count): a real round, not a blend of two."""
    return sorted(rounds, key=lambda r: r[key])[len(rounds) // 2]
