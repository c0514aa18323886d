"""The benchmarks still run (tiny sizes) and their baselines agree with our results."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_eval_runs_and_all_methods_find_the_same_neighbours(tmp_path):
    output = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_eval.py"), "--gallery", "600",
         "--queries", "60", "--dim", "16", "--classes", "10", "--json", str(output)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    data = json.loads(output.read_text())
    assert data["same_neighbours"] is True
    assert [r["method"] for r in data["results"]] == ["ascension", "numpy", "sklearn"]
    recalls = {r["recall_at_1"] for r in data["results"]}
    assert len(recalls) == 1
