"""Evaluation at data-set scale: peak memory, wall time and time spent saving progress.

``itd.evaluate(model, batches, n_points, checkpoint=folder, checkpoint_every=0.0,
per_sample_curves=True)`` on a cheap exact denoiser (a 16-dimensional Gaussian mixture), for
(1k, 10k, 50k) examples x (100, 1000) points, and 2k and 20k x 1000 (the linear-cost check).  Each configuration runs in a fresh process, so
its peak resident memory (``ru_maxrss``, which includes the ~220 MB of importing torch) is
its own; saving time is measured around every write of a chunk of rows, once saving after every
batch of 500 examples (``checkpoint_every=0``: the worst case, each save an fsync'd file) and once
every 10 s.

    python benchmarks/scale.py --json benchmarks/scale.json   # the full table (about 25 minutes on 2 CPU cores)
    python benchmarks/scale.py --quick    # 1k and 10k examples x 100 points
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, tempfile
from pathlib import Path
import torch
import itdiffusion as itd
from itdiffusion import evalstate

torch.set_num_threads(1)
n, points, every = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
gen = torch.Generator().manual_seed(0)
means = torch.randn(5, 16, generator=gen, dtype=torch.float64) * 1.5
mix = itd.GaussianMixture(means, torch.rand(5, generator=gen, dtype=torch.float64) + 0.3)
model = itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(5000, gen)))
saving = [0.0]
write = evalstate.ProgressStore.write
def timed_write(self, chunk):
    began = time.perf_counter()
    write(self, chunk)
    saving[0] += time.perf_counter() - began
evalstate.ProgressStore.write = timed_write

def batches():
    g = torch.Generator().manual_seed(1)
    for i in range(0, n, 500):
        yield mix.sample(min(500, n - i), g).float()

with tempfile.TemporaryDirectory() as tmp:
    began, cpu_began = time.perf_counter(), time.process_time()
    res = itd.evaluate(model, batches(), n_points=points, checkpoint=tmp + "/progress", checkpoint_every=every,
                       per_sample_curves=True)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    size = sum(p.stat().st_size for p in Path(tmp, "progress").iterdir())
print(json.dumps({"examples": n, "points": points, "seconds": seconds, "cpu_seconds": cpu_seconds, "saving_s": saving[0],
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "progress_mib": size / 2**20, "nats": res["continuous"].nats}))
"""


INTERVAL = 10.0  # seconds between saves in the second run of each size (the CLI default is 300)


def run(n: int, points: int, every: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(points), str(every)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k examples x 100 points only")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--linear", action="store_true", help="only 2k and 20k x 1000 (the linear-cost check), "
                        "saving after every batch only")
    args = parser.parse_args()
    if args.quick:
        grid = [(1_000, 100), (10_000, 100)]
    elif args.linear:
        grid = [(2_000, 1000), (20_000, 1000)]
    else:  # 2k and 20k x 1000: the test of linear cost (at most 12x the time for 10x the examples)
        grid = [(n, 100) for n in (1_000, 10_000, 50_000)] + [(n, 1000) for n in (1_000, 2_000, 10_000, 20_000, 50_000)]
    rows = []
    print("| examples x points | peak memory (MB) | wall time (s) | saving, every batch (% of time) | "
          f"saving, every {INTERVAL:g} s (% of time) | progress folder (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, points in grid:
        row = run(n, points, 0.0)
        timed = row if args.linear else run(n, points, INTERVAL)
        row["saving_interval_fraction"] = timed["saving_s"] / timed["seconds"]
        rows.append(row)
        print(f"| {n:,} x {points:,} | {row['peak_mb']:.0f} | {row['seconds']:.1f} | "
              f"{100 * row['saving_s'] / row['seconds']:.2f} | {100 * row['saving_interval_fraction']:.2f} | "
              f"{row['progress_mib']:.1f} |", flush=True)
    by = {(r["examples"], r["points"]): r for r in rows}
    if (2_000, 1000) in by and (20_000, 1000) in by:
        small, large = by[(2_000, 1000)], by[(20_000, 1000)]
        print(f"\n20,000 vs 2,000 examples x 1,000 points: wall time {large['seconds'] / small['seconds']:.2f}x, "
              f"CPU time {large['cpu_seconds'] / small['cpu_seconds']:.2f}x (goal at most 12x; the CPU time is the "
              f"fair ratio on a shared machine), peak memory {large['peak_mb']:.0f} MB (goal under 600 MB)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
