"""The GPU check: training, embedding and serving measured on a lent accelerator, in one call.

Run by ``benchmarks/gpu/run.sh`` (which installs the carried wheels first). Each step runs in its
own process with its own time budget, so one that fails or runs long costs only itself; all of
them fit in eight minutes. Every step writes its JSON under ``--out``; the last thing printed is
one table of every step. ``--mode cpu`` is the rehearsal: the same steps at tiny sizes on the
CPU, which the test suite runs so that this script cannot rot between sessions with a device.

Steps: the default ``tf_efficientnetv2_m`` trained from scratch at its pretrained size on
generated images (--batch-size 16 --target-batch 128, bf16, channels-last, a few dozen steps),
then ``embed``, ``eval`` and ``index`` on its checkpoint; ``bench_step.py``: the gradient-cached
step at target 1024 against the plain step at the micro-batch, for lite0 (eager and compiled)
and v2_m (eager: its compile would not fit the budget), with peak GPU memory; ``bench_embed.py``;
``bench_loss.py``; ``bench_serve.py``; and the out-of-memory path (a micro-batch too large for
the GPU must end in the one-line message, exit 4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-m", "ascension_cli"]
BENCH = ROOT / "benchmarks"


@dataclass
class Step:
    name: str
    budget: float  # seconds
    commands: list[list[str]]
    expect: int = 0  # the exit code that means it worked
    figure: str = ""  # filled in from the step's JSON
    status: str = "not run"
    seconds: float = 0.0
    tail: list[str] = field(default_factory=list)


def sizes(mode: str) -> dict:
    """Everything that differs between the GPU run and its CPU rehearsal."""
    if mode == "gpu":
        return {"model": "tf_efficientnetv2_m", "train": [], "classes": 16, "per_class": 24,
                "image": 256, "micro": 16, "target": 128, "epochs": 12, "steps": 24,
                # step_models: (model, size, budget in s, also compiled)
                "precision": "bf16", "workers": 8, "step_models": [
                    ("tf_efficientnet_lite0", 224, 70, True),
                    ("tf_efficientnetv2_m", 384, 95, False)],
                "step_target": (16, 64), "oom_batch": 4096, "oom_per_class": 260,
                "embed": ["--batch-size", "256"], "loss": [], "serve": ["--seconds", "15"],
                "quick": [], "budget": 1.0}
    return {"model": "test_efficientnet", "train": ["--image-size", "32",
                                                    "--samples-per-class", "2"],
            "classes": 4, "per_class": 8, "image": 32, "micro": 4, "target": 8, "epochs": 2,
            "steps": 3, "precision": "auto", "workers": 0,
            "step_models": [("test_efficientnet", 32, 240, False)], "step_target": (4, 2),
            "oom_batch": 8, "oom_per_class": 4, "embed": ["--model", "test_efficientnet",
                                                          "--rounds", "1"],
            "loss": ["--views", "32", "--dim", "16"], "serve": ["--seconds", "3"],
            "quick": ["--quick"], "budget": 3.0}


def make_images(root: Path, classes: int, per_class: int, size: int) -> Path:
    """``classes`` folders of generated shapes (the tests' shapes, each flipped and shifted
    per class past the sixth), PNG."""
    import cv2
    import numpy as np

    from tests.conftest import SHAPES, draw_shape

    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class-{label:02d}"
        if folder.is_dir():
            continue
        folder.mkdir(parents=True)
        variant = label // len(SHAPES)
        for index in range(per_class):
            image = draw_shape(SHAPES[label % len(SHAPES)], size, rng)
            if variant:
                image = np.roll(image[:, ::-1] if variant % 2 else image,
                                variant * size // 7, axis=0)
            cv2.imwrite(str(folder / f"{index:03d}.png"),
                        cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    return root


def steps(mode: str, out: Path, work: Path) -> list[Step]:
    s = sizes(mode)
    data = make_images(work / "data", s["classes"], s["per_class"], s["image"])
    run, ckpt = work / "run", work / "run" / "last.pt"
    device = ["--device", "cuda" if mode == "gpu" else "cpu"]
    train = [*CLI, "train", str(data), "--model", s["model"], "--no-pretrained", *s["train"],
             "--batch-size", str(s["micro"]), "--target-batch", str(s["target"]),
             "--precision", s["precision"], "--channels-last", "--epochs", str(s["epochs"]),
             "--max-steps", str(s["steps"]), "--warmup-epochs", "0", "--workers",
             str(s["workers"]), "--val-fraction", "0.1", "--save-dir", str(run), *device]
    after = [[*CLI, "embed", str(ckpt), str(data), "-o", str(work / "vectors.npz"), *device,
              "--workers", str(s["workers"])],
             [*CLI, "eval", str(work / "vectors.npz"), "--json", str(out / "eval.json")],
             [*CLI, "index", str(ckpt), str(data), "-o", str(work / "catalog"), *device,
              "--workers", str(s["workers"])]]
    micro, count = s["step_target"]
    scale = s["budget"]  # the GPU budgets sum to 7.5 minutes; the rehearsal's are looser
    result = [Step("train (default model, from scratch)", 100 * scale, [train]),
              Step("embed, eval, index on its checkpoint", 35 * scale, after)]
    for model, size, budget, compiled in s["step_models"]:
        result.append(Step(f"bench_step {model}", budget, [[
            sys.executable, str(BENCH / "bench_step.py"), *s["quick"], "--model", model,
            "--image-size", str(size), "--micro", str(micro), "--steps-of", str(count),
            "--only", "cache,plain", *(["--compile"] if compiled else []), "--repeats", "1",
            *device,
            "--json", str(out / f"step_{model}.json")]]))
    embed_root = make_images(work / "embed-images", 8, 128 if mode == "gpu" else 4, s["image"])
    result += [
        Step("bench_embed", 35 * scale, [[
            sys.executable, str(BENCH / "bench_embed.py"), *s["quick"], "--root",
            str(embed_root), *s["embed"], *device, "--json", str(out / "embed.json")]]),
        Step("bench_loss", 20 * scale, [[
            sys.executable, str(BENCH / "bench_loss.py"), *s["quick"], *s["loss"],
            "--json", str(out / "loss.json")]]),
        Step("bench_serve", 60 * scale, [[
            sys.executable, str(BENCH / "bench_serve.py"), *s["quick"], *s["serve"],
            "--json", str(out / "serve.json")]]),
    ]
    oom_data = make_images(work / "oom-data", 16, s["oom_per_class"], 32)
    oom = [*CLI, "train", str(oom_data), "--model", s["model"], "--no-pretrained", *s["train"],
           "--batch-size", str(s["oom_batch"]), "--target-batch", str(s["oom_batch"]),
           "--precision", s["precision"], "--epochs", "1", "--max-steps", "1", "--workers", "0",
           "--val-fraction", "0", "--save-dir", str(work / "oom-run"), *device]
    # On a GPU the micro-batch cannot fit: the one-line message, exit 4. The rehearsal's tiny
    # batch fits, so there the same command (its flags) must simply succeed.
    result.append(Step("out of memory is one line", 40 * scale, [oom],
                       expect=4 if mode == "gpu" else 0))
    return result


def run_step(step: Step, log: Path) -> None:
    started = time.perf_counter()
    step.status = "ok"
    for command in step.commands:
        left = step.budget - (time.perf_counter() - started)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get(
            "PYTHONPATH", "")}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=max(1, left),
                                  env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            step.status = f"over its {step.budget:.0f} s budget"
            break
        with log.open("a", encoding="utf-8") as handle:
            handle.write(f"$ {' '.join(command)}\n{done.stdout}\n{done.stderr}\n")
        step.tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        if done.returncode != step.expect:
            step.status = f"exit {done.returncode}"
            break
        if step.expect == 4 and len(done.stderr.strip().splitlines()) != 1:
            step.status = "more than one line"
            break
    step.seconds = time.perf_counter() - started


def figure(step: Step, out: Path) -> str:
    """The step's headline figure, read from the JSON it wrote."""
    def read(name: str) -> dict:
        path = out / name
        return json.loads(path.read_text()) if path.is_file() else {}

    if step.name.startswith("bench_step"):
        data = read(f"step_{step.name.split()[1]}.json")
        if data:
            results = data["results"]
            cache = next(v for k, v in results.items() if k.startswith("cache") and "," not in k)
            compiled = [v for k, v in results.items() if k.endswith("compiled")]
            return (f"plain/cache img/s {1 / data['cache_speed_vs_plain']:.2f}x, cache "
                    f"{cache['images_per_second']:.0f} img/s, {cache['peak_mib']:.0f} MiB"
                    + (f", compiled {compiled[0]['images_per_second']:.0f} img/s"
                       if compiled else ""))
    if step.name == "bench_embed" and read("embed.json"):
        data = read("embed.json")
        best = max(r["images_per_second"] for r in data["results"].values())
        return f"{best:.0f} img/s at {data['image_size']} px"
    if step.name == "bench_serve" and read("serve.json"):
        results = read("serve.json")["results"]
        one = results.get("serve/1", {})
        many = next((v for k, v in results.items() if k.startswith("serve/") and k != "serve/1"),
                    {})
        if "p95_ms" in one and "p95_ms" in many:
            return (f"p95 {one['p95_ms']:.0f} ms alone, {many['p95_ms']:.0f} ms under load "
                    f"({many['p95_ms'] / one['p95_ms']:.2f}x)")
    if step.name.startswith("train"):
        metrics = out / "work" / "run" / "metrics.jsonl"
        if metrics.is_file():
            last = json.loads(metrics.read_text().splitlines()[-1])
            return (f"{last['step']} steps, {last['images_per_second']:.0f} img/s in its last "
                    f"epoch, loss {last['loss']:.3f}")
    if step.name == "bench_loss" and read("loss.json"):
        rows = [r for r in read("loss.json")["results"] if r.get("method") == "ascension"]
        if rows:
            return (f"ours at {rows[-1]['views']} views: {rows[-1]['seconds'] * 1000:.2f} ms, "
                    f"all equal to the references: "
                    f"{all(r.get('equal_to_ours', True) for r in read('loss.json')['results'])}")
    if step.name.startswith("out of memory") and step.status == "ok":
        return ("exit 4 with the one-line message" if step.expect == 4
                else "the batch fits on the CPU: the command's flags checked")
    if step.name.startswith("embed, eval") and read("eval.json"):
        return f"R@1 {read('eval.json')['recall_at_k']['1']:.3f} (untrained-ish, generated)"
    return step.tail[-1][:70] if step.tail else ""


def describe_machine(mode: str) -> dict:
    info = {"mode": mode, "python": platform.python_version(), "platform": platform.platform()}
    import torch

    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            info["driver"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "nvidia-smi not found"
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = describe_machine(args.mode)
    print(json.dumps(machine, indent=2), flush=True)
    if args.mode == "gpu" and "gpu" not in machine:
        print("no CUDA device here: run with --cpu-rehearsal on a machine without one")
        return 2
    work = args.out / "work"
    log = args.out / "steps.log"
    started = time.perf_counter()
    plan = steps(args.mode, args.out, work)
    for step in plan:
        print(f"-- {step.name} (budget {step.budget:.0f} s)", flush=True)
        run_step(step, log)
        step.figure = figure(step, args.out)
        print(f"   {step.status} in {step.seconds:.0f} s  {step.figure}", flush=True)
    total = time.perf_counter() - started
    summary = {"machine": machine, "seconds": total, "steps": [
        {"name": s.name, "status": s.status, "seconds": s.seconds, "figure": s.figure,
         "budget": s.budget} for s in plan]}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(s.name) for s in plan)
    print(f"\n{'step':<{width}}  {'status':<24} {'s':>5}  figure")
    for s in plan:
        print(f"{s.name:<{width}}  {s.status:<24} {s.seconds:5.0f}  {s.figure}")
    print(f"{'all':<{width}}  {'':<24} {total:5.0f}  (see {log} for each command's output)")
    return 0 if all(s.status == "ok" for s in plan) else 1


if __name__ == "__main__":
    sys.exit(main())
