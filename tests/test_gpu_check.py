"""The GPU check's CPU rehearsal: the script a lent accelerator runs in one call, run here end to
end at tiny sizes, so that it cannot rot between the sessions that have a device."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "gpu" / "run.sh"


def test_the_rehearsal_runs_every_step_and_ends_with_one_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(RUN), "--cpu-rehearsal"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu-check" / "gpu_check.json").read_text())
    names = [step["name"] for step in summary["steps"]]
    assert names[0].startswith("train") and names[-1] == "out of memory is one line"
    assert {step["status"] for step in summary["steps"]} == {"ok"}
    assert all(step["seconds"] <= step["budget"] for step in summary["steps"])
    for name in ("eval.json", "embed.json", "loss.json", "serve.json"):
        assert (tmp_path / "gpu-check" / name).is_file(), name
    assert any(path.name.startswith("step_") for path in (tmp_path / "gpu-check").iterdir())
    table = done.stdout.strip().splitlines()
    assert table[-1].startswith("all") and any(line.startswith("step ") for line in table)


def test_run_sh_refuses_an_unknown_option():
    done = subprocess.run(["bash", str(RUN), "--gpu-please"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "unknown option --gpu-please" in done.stderr
