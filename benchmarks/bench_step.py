"""One optimizer step for a contrastive batch of 128 images: gradient cache vs the alternatives.

(a) gradient cache, micro-batch 16; (b) naive accumulation, 16 x 8; (c) one true batch of 128;
and, for the memory goal, (d) a plain step on 16 images: a target batch of one micro-batch takes
the ordinary step, and (d') times it through the cache's two passes, which it would otherwise
cost (the one-micro-batch speed-up). All run channels-last (NHWC), the
trainer's default; (e) repeats (a) channels-first (NCHW, ``--no-channels-last``) to measure that
fast path, and (f), with ``--compile`` or in full mode, repeats (a) under torch.compile (its
compile time reported apart); (g) repeats (a) in fp32, against the precision ``--precision``
resolves to (bf16 on a bf16 CPU: whether autocast pays on this machine, for this model), unless
(a) ran in fp32 already. Each
configuration runs in its own process, so peak memory is its own. Goals: (a) peak memory within
1.3x of (d), time within 1.4x of (b).

    python benchmarks/bench_step.py --quick    # test_efficientnet at 64 px on the CPU
    python benchmarks/bench_step.py            # resnet50 at 224 px (a GPU if present)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial

import torch
from _common import benchmark_parser, measure, print_table, write_json


def configs(micro: int = 16, count: int = 8) -> dict[str, tuple]:
    """name: (accumulation, micro-batch, micro-batches per step, channels-last, compile,
    precision or None for --precision), for a target batch of ``micro x count`` images."""
    target = micro * count
    return {
        f"cache {micro}x{count}": ("cache", micro, count, True, False, None),
        f"naive {micro}x{count}": ("naive", micro, count, True, False, None),
        f"true batch {target}": ("cache", target, 1, True, False, None),
        f"plain {micro}": ("cache", micro, 1, True, False, None),  # one micro-batch: plain step
        f"plain {micro}, two passes": ("two-pass", micro, 1, True, False, None),  # cache's passes
        f"cache {micro}x{count}, NCHW": ("cache", micro, count, False, False, None),
        f"cache {micro}x{count}, compiled": ("cache", micro, count, True, True, None),
        f"cache {micro}x{count}, fp32": ("cache", micro, count, True, False, "fp32"),
    }


CONFIGS = configs()


def run_config(name: str, args) -> dict:
    from ascension_cli.losses import supcon_loss
    from ascension_cli.model.backbone import build_model
    from ascension_cli.runtime import (
        autocast_factory,
        compile_model,
        resolve_device,
        resolve_precision,
        to_input,
        use_channels_last,
    )
    from ascension_cli.train.gradcache import (
        _two_pass_backward,
        accumulated_backward,
        cached_backward,
    )

    mode, micro, count, channels_last, compiled, fixed = configs(args.micro, args.steps_of)[name]
    device = resolve_device(args.device)
    precision = resolve_precision(fixed or args.precision, device)
    autocast = autocast_factory(precision, device)
    torch.manual_seed(0)
    model, _ = build_model(args.model, pretrained=False, image_size=args.image_size)
    use_channels_last(model.to(device), channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = to_input(torch.randn(micro * count, args.views, 3, args.image_size, args.image_size),
                      device, channels_last)
    labels = (torch.arange(micro * count) // 4).to(device)
    batches = [(images[i : i + micro], labels[i : i + micro])
               for i in range(0, micro * count, micro)]
    backward = {"cache": cached_backward, "naive": accumulated_backward,
                "two-pass": _two_pass_backward}[mode]
    loss_fn = partial(supcon_loss, temperature=0.1)

    runner = compile_model(model) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        backward(runner, batches, loss_fn, autocast)
        optimizer.step()

    started = time.perf_counter()
    step()  # the first call compiles, when compiling
    first_call = time.perf_counter() - started
    timing = measure(step, repeats=args.repeats, device=device.type)
    return {"config": name, "precision": precision, **timing, "first_call_seconds": first_call,
            "images_per_second": micro * count / timing["seconds"]}


def main() -> None:
    parser = benchmark_parser(__doc__, __file__)
    parser.add_argument("--model")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="also time (a) under torch.compile (default in full mode)")
    parser.add_argument("--micro", type=int, default=16, help="images per micro-batch")
    parser.add_argument("--steps-of", type=int, default=8,
                        help="micro-batches per optimizer step (target batch = micro x this)")
    parser.add_argument("--only", help="comma-separated rows to run, by their first word: "
                        "cache, naive, true, plain (default: all; the cache rows, fp32 among "
                        "them, and the plain rows are always run)")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("test_efficientnet" if args.quick else "resnet50")
    args.image_size = args.image_size or (64 if args.quick else 224)

    if args.config:
        print(json.dumps(run_config(args.config, args)))
        return
    results = {}
    table = configs(args.micro, args.steps_of)
    kinds = None if not args.only else {"cache", "plain", *args.only.split(",")}
    names = [n for n in table if (not table[n][4] or args.compile or not args.quick)
             and (kinds is None or n.split()[0] in kinds)]
    first = f"cache {args.micro}x{args.steps_of}"  # (a): always run, and first
    for name in names:
        fixed = table[name][5]
        if fixed is not None and results[first]["precision"] == fixed:
            continue  # (a) already ran at this precision: the row would repeat it
        command = [sys.executable, __file__, "--config", name, "--model", args.model,
                   "--image-size", str(args.image_size), "--views", str(args.views),
                   "--precision", args.precision, "--device", args.device,
                   "--repeats", str(args.repeats), "--micro", str(args.micro),
                   "--steps-of", str(args.steps_of)]
        # A fixed mmap threshold makes glibc return every large tensor to the system when it is
        # freed, so the kernel's peak-RSS counter sees each step's own activation peak.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        output = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        results[name] = json.loads(output.stdout.strip().splitlines()[-1])
    m, c = args.micro, args.steps_of
    cache, plain = results[f"cache {m}x{c}"], results[f"plain {m}"]

    def ratio(name: str, of: str = "seconds") -> float | None:
        return results[name][of] / cache[of] if name in results else None

    memory_ratio = cache["peak_mib"] / plain["peak_mib"] if plain["peak_mib"] else None
    naive = ratio(f"naive {m}x{c}")
    time_ratio = None if naive is None else 1 / naive
    rows = [[name, r["precision"], f"{r['seconds']:.3f}", f"{r['images_per_second']:.1f}",
             f"{r['peak_mib']:.0f}"] for name, r in results.items()]
    print_table(f"{args.model} at {args.image_size} px, {args.views} views, target batch {m * c}",
                ["configuration", "precision", "s/step", "img/s", "peak MiB"], rows)
    memory_text = "-" if memory_ratio is None else f"{memory_ratio:.2f}x"
    print(f"cache peak memory vs plain {m}-image step: {memory_text} (goal <= 1.3x)")
    if time_ratio is not None:
        print(f"cache time vs naive accumulation: {time_ratio:.2f}x (goal <= 1.4x)")
    print(f"plain {m}-image step vs cache, images/s: "
          f"{plain['images_per_second'] / cache['images_per_second']:.2f}x (goal <= 1.3x)")
    two_pass = results.get(f"plain {m}, two passes")
    one_micro_speedup = None if two_pass is None else two_pass["seconds"] / plain["seconds"]
    if one_micro_speedup is not None:
        print(f"target batch of one micro-batch, plain step vs the cache's two passes: "
              f"{one_micro_speedup:.2f}x faster")
    layout_speedup = ratio(f"cache {m}x{c}, NCHW")
    if layout_speedup is not None:
        print(f"channels-last vs NCHW, gradient cache: {layout_speedup:.2f}x faster")
    fp32 = results.get(f"cache {m}x{c}, fp32")
    precision_speedup = None if fp32 is None else fp32["seconds"] / cache["seconds"]
    if precision_speedup is not None:
        print(f"{cache['precision']} vs fp32, gradient cache: {precision_speedup:.2f}x faster")
    compile_speedup = None
    if f"cache {m}x{c}, compiled" in results:
        compiled = results[f"cache {m}x{c}, compiled"]
        compile_speedup = cache["seconds"] / compiled["seconds"]
        print(f"torch.compile vs eager, gradient cache: {compile_speedup:.2f}x faster per step, "
              f"after {compiled['first_call_seconds']:.0f} s compiling")
    write_json("bench_step", {"quick": args.quick, "model": args.model,
                              "image_size": args.image_size, "views": args.views,
                              "micro_batch": m, "target_batch": m * c,
                              "cache_speed_vs_plain": cache["images_per_second"]
                              / plain["images_per_second"],
                              "results": results, "cache_memory_vs_plain16": memory_ratio,
                              "cache_time_vs_naive": time_ratio,
                              "channels_last_speedup": layout_speedup,
                              "one_micro_batch_speedup": one_micro_speedup,
                              "compile_speedup": compile_speedup,
                              "precision": cache["precision"],
                              "precision_speedup_vs_fp32": precision_speedup}, path=args.json)


if __name__ == "__main__":
    main()
