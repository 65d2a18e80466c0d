"""Start-up time of the ``itd`` command: ``itd --help`` and ``itd COMMAND --help`` in fresh processes.

The goal is under one second for ``itd --help``: the package and the command line import nothing heavy
(torch, numpy, matplotlib, diffusers) until a command runs (``itdiffusion/__init__.py`` resolves its names on
first use, every ``cli/<command>.py`` imports inside ``run``).  Each figure is the median wall time of fresh
``python -m itdiffusion.cli ...`` processes (the console script ``itd`` does the same import), and the heavy
modules that got imported are listed, which should be none.

Run:  PYTHONPATH=src python benchmarks/cli_startup.py [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL_S = 1.0
HEAVY = ("torch", "numpy", "matplotlib", "diffusers", "scipy", "sklearn", "PIL", "safetensors", "tqdm")
PROBE = ("import sys, runpy; sys.argv = ['itd', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('itdiffusion.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('HEAVY', ' '.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)")


def _env() -> dict:
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def time_command(args: list[str], repeats: int) -> tuple[float, float, list[str]]:
    """Median and minimum wall seconds of ``itd ARGS`` in fresh processes, and the heavy modules it imported."""
    env, times, heavy = _env(), [], []
    for _ in range(repeats):
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "itdiffusion.cli", *args], env=env, capture_output=True)
        times.append(time.perf_counter() - began)
        if done.returncode not in (0, 2):
            raise SystemExit(f"itd {' '.join(args)} failed: {done.stderr.decode()[-500:]}")
    probe = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], env=env, capture_output=True,
                           text=True)
    for line in probe.stderr.splitlines():
        if line.startswith("HEAVY"):
            heavy = line.split()[1:]
    return statistics.median(times), min(times), heavy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per command (default: 7)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as a flat JSON object")
    args = parser.parse_args()
    with open("/proc/loadavg") if Path("/proc/loadavg").exists() else open(os.devnull) as fh:
        load = fh.read().split()[:1] or ["?"]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, 1-minute load average {load[0]}")
    figures = {}
    for command in (["--help"], ["eval", "--help"], ["demo", "--help"]):
        median, fastest, heavy = time_command(command, args.repeats)
        key = "_".join(c.strip("-") for c in command)
        figures[f"{key}_median_s"], figures[f"{key}_min_s"] = round(median, 3), round(fastest, 3)
        print(f"itd {' '.join(command):14s} median {median:.3f} s, fastest {fastest:.3f} s over {args.repeats} runs; "
              f"heavy modules imported: {', '.join(heavy) or 'none'}")
    ok = figures["help_median_s"] < GOAL_S
    print(f"itd --help: {figures['help_median_s']:.3f} s, goal under {GOAL_S:.0f} s: {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({**figures, "goal_s": GOAL_S, "met": ok}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
