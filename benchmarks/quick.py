"""``make bench``: the quick versions of all four benchmarks, then ``results/SUMMARY.md``.

Runs memory, throughput, convergence and projectors in their ``--quick`` configurations (meant for 2 CPU
cores, well under 10 minutes in all), writes each JSON + PNG and one markdown table per benchmark into
``benchmarks/results/SUMMARY.md``, and prints the tables.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import common, convergence, memory, projectors, throughput


def plot_name(name: str, device: str) -> str:
    """File name of a benchmark's plot inside the results folder (projectors always run on the CPU)."""
    return common.result_path(Path("."), name, "cpu" if name == "projectors" else device, "png").name


def main(argv: list[str] | None = None) -> Path:
    ap = common.parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    common.setup(args)
    passthrough = ["--quick", "--device", args.device, "--out", str(args.out)]
    if args.only:
        passthrough += ["--only", args.only]
    if args.no_references:
        passthrough.append("--no-references")
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    if args.dynamic_malloc:
        passthrough.append("--dynamic-malloc")
    sections: list[tuple[str, str, float]] = []
    t_all = time.perf_counter()
    steps: list[tuple[str, Any, Any]] = [("memory", memory.main, memory.summary),
                                         ("throughput", throughput.main, throughput.summary),
                                         ("convergence", convergence.main, convergence.summary),
                                         ("projectors", projectors.main, projectors.summary)]
    for name, run, summarise in steps:
        t0 = time.perf_counter()
        print(f"\n## {name}\n", flush=True)
        result = run(list(passthrough))
        sections.append((name, summarise(result), time.perf_counter() - t0))
    total = time.perf_counter() - t_all
    env = common.environment(args.device)
    lines = ["# Benchmark summary (quick run)", "",
             f"Measured {env['timestamp']} on {env['platform']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
             f"device {args.device}; total {total:.0f} s. Full runs: `python -m benchmarks.<name>` "
             "(add `--device cuda` on a GPU). Raw records: `benchmarks/results/<name>.json`.", ""]
    notes = {
        "memory": "Optimizer-state bytes, closed form from shapes (meta device), LLaMA shapes with GaLore's ranks "
                  "(60M: 128, 130M/350M: 256, 1B: 512, 7B: 1024; quick mode: 60M-1L is LLaMA-60M cut to one layer, "
                  "60M and 1B); `measured == closed`: one real step gives exactly the closed-form bytes (measured "
                  "at 60M-1L in quick mode, at 60M and 130M in the full run).",
        "throughput": "First table: optimizer step only (synthetic seeded gradients, LLaMA-60M shapes on CPU, "
                      f"rank 128). Amortized = (median x {throughput.T_REFRESH - 1} + refresh) / "
                      f"{throughput.T_REFRESH}; quick mode times the first step (initial subspace) as the refresh. "
                      "On the CPU each step is paired with a step of one torch AdamW, and `/AdamW` divides by those "
                      "paired steps (`paired AdamW ms`). Second table: end-to-end training steps (forward, backward, "
                      "optimizer) of the benchmark decoder (quick: 2 layers, width 256, vocabulary 4096, 2 x 64 "
                      "tokens), tokens/s against paired AdamW steps. Each column group is one allocator regime, "
                      "each run in its own process: `warm` (GLIBC_TUNABLES warm heap, the headline) and `pinned` "
                      "(glibc thresholds pinned at 128 KiB); `faults/step` are minor page faults per steady step.",
        "convergence": "Byte-level LLaMA-style decoder on the stdlib corpus; same seed, batches, steps and schedule "
                       "for every optimizer; `- AdamW` is the validation-loss difference to torch AdamW.",
        "projectors": "Refresh (update) time and captured energy of the refreshed subspace, as a fraction of "
                      "||G||^2 and of the optimal top-r energy.",
    }
    for name, table, secs in sections:
        lines += [f"## {name}", "", notes[name] + f" ({secs:.0f} s)", "",
                  f"![{name}]({plot_name(name, args.device)})",
                  "", table, ""]
    path = Path(args.out) / "SUMMARY.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
