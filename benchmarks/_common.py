"""Shared helpers for the benchmarks: timing, peak memory, tables and JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python benchmarks/x.py` from a checkout

from ascension_cli.atomic import atomic_write_text  # noqa: E402  (this checkout's)

RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"
# The command line, started by this interpreter: `ascension` is on PATH only in an activated
# environment, and a benchmark must run from `.venv/bin/python benchmarks/x.py` as well.
CLI = (sys.executable, "-m", "ascension_cli")


def benchmark_parser(doc: str, script: str,
                     quick: str = "small sizes: under two minutes on a 2-core CPU"
                     ) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--quick`` (``quick`` says what it does) and ``--json``
    (where the results go)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--json", type=Path, help="where to write the results "
                        f"(default: benchmarks/results/{Path(script).stem}.json)")
    return parser


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def measure(fn: Callable[[], object], repeats: int = 3, device: str = "cpu") -> dict:
    """Best wall time of ``repeats`` calls (after one warm-up) and the peak memory of one call.

    CPU: growth of the kernel's peak resident set (reset before the call) over the RSS at the
    start. CUDA: ``torch.cuda.max_memory_allocated`` over the allocation at the start.
    """
    import torch

    fn()  # warm-up: lazy initialisation, allocator caches
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        start = _status_mib("VmRSS")
        fn()
        peak = max(0.0, _status_mib("VmHWM") - start)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"seconds": float(np.min(times)), "peak_mib": peak}


def best_of_rounds(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall time of each function over ``rounds`` rounds that call every one once in turn.

    Interleaving puts every method under the same drift of machine speed (other processes,
    clock changes), which matters for sub-millisecond calls; each is warmed up first.
    """
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def machine() -> dict:
    import torch

    info = {"cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def write_json(name: str, data: dict, path: Path | None = None) -> Path:
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine(), **data}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")  # whole or not at all
    print(f"wrote {path}")
    return path
