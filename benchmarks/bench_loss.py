"""SupCon forward + backward: ours vs pytorch-metric-learning vs the paper's formula, one run.

    python benchmarks/bench_loss.py --quick     # 256 and 1024 views, CPU
    python benchmarks/bench_loss.py             # 256, 1024 and 4096 views (GPU if present)
"""

from __future__ import annotations

import torch
from _common import benchmark_parser, best_of_rounds, measure, print_table, write_json

from ascension_cli.losses import supcon_loss


def paper_formula(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al. (2020), eq. 2 (L_out), transcribed literally: no stabilisation."""
    n = z.shape[0]
    others = ~torch.eye(n, dtype=torch.bool, device=z.device)
    similarity = z @ z.T / temperature
    denominator = (torch.exp(similarity) * others).sum(dim=1, keepdim=True)
    log_prob = similarity - torch.log(denominator)
    positives = (labels[:, None] == labels[None, :]) & others
    counts = positives.sum(dim=1)
    per_anchor = -(log_prob * positives).sum(dim=1) / counts.clamp_min(1)
    return per_anchor[counts > 0].mean()


def main() -> None:
    parser = benchmark_parser(__doc__, __file__)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--views", type=int, nargs="+", help="batch sizes to time (rows)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    sizes = args.views or ((256, 1024) if args.quick else (256, 1024, 4096))

    methods = {"ascension": lambda z, y: supcon_loss(z, y, 0.1),
               "paper formula": lambda z, y: paper_formula(z, y, 0.1)}
    try:
        from pytorch_metric_learning.losses import SupConLoss

        pml = SupConLoss(temperature=0.1)
        methods["pytorch-metric-learning"] = lambda z, y: pml(z, y)
    except ImportError:
        print("pytorch-metric-learning not installed: skipped")

    rows, results = [], []
    for n in sizes:
        generator = torch.Generator().manual_seed(n)
        raw = torch.randn(n, args.dim, generator=generator).to(args.device)
        labels = (torch.arange(n) // 8).to(args.device)  # 4 images x 2 views per class
        values, steps = {}, {}
        for name, loss_fn in methods.items():
            def step(loss_fn=loss_fn, raw=raw, labels=labels):
                z = torch.nn.functional.normalize(raw, dim=1).requires_grad_(True)
                loss = loss_fn(z, labels)
                loss.backward()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                return float(loss.detach())

            values[name], steps[name] = step(), step
        # Peak memory of one call each; time: best of interleaved rounds (more when short).
        timings = {name: measure(step, repeats=1, device=args.device)
                   for name, step in steps.items()}
        rounds = max(5, min(200, int(2e5 / n**1.5)))
        for name, seconds in best_of_rounds(steps, rounds).items():
            timings[name]["seconds"] = seconds
        fastest_other = min(t["seconds"] for k, t in timings.items() if k != "ascension")
        for name, timing in timings.items():
            agrees = abs(values[name] - values["ascension"]) <= 1e-4 * abs(values["ascension"])
            results.append({"views": n, "method": name, **timing, "loss": values[name],
                            "equal_to_ours": agrees})
            rows.append([str(n), name, f"{timing['seconds'] * 1000:.2f}",
                         f"{timing['peak_mib']:.1f}", f"{values[name]:.5f}",
                         "yes" if agrees else "NO"])
        ours = timings["ascension"]["seconds"]
        results.append({"views": n, "ours_vs_fastest_other": fastest_other / ours})
        rows.append([str(n), "ours vs fastest other", f"x{fastest_other / ours:.2f}", "", "",
                     ""])
    print_table(f"SupCon forward+backward, d={args.dim}, {args.device}",
                ["views", "method", "ms", "peak MiB", "loss", "equal"], rows)
    write_json("bench_loss", {"quick": args.quick, "device": args.device, "dim": args.dim,
                              "results": results}, path=args.json)


if __name__ == "__main__":
    main()
