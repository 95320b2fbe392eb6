"""How to use the cores for the demo's models: threads in one process, or several processes.

Trains the bundled demo's teacher (`configs/demo.yaml`: d=128, 4 layers, batch 32) for `--steps` steps on
the demo's generated data, side by side in one run, in four ways, and prints seconds per step and ratios:

    one process, 1 thread            the reference
    one process, N threads           intra-op parallelism (N = the cores)
    N processes at once, 1 thread    independent runs side by side: the throughput of the demo's workers
    DDP over N processes             the teacher as `teacher.processes: N` trains it (gloo, batch 32/N each)

Each way is timed by the trainer's own `train_runtime` (model loading excluded), best of `--repeats`.

    .venv/bin/python bench/demo_parallel.py                 # 60 steps, 2 repeats, N = the cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _recipe(steps: int):
    from dpkd.study import load_demo_recipe

    recipe = load_demo_recipe(None)
    recipe.values["teacher"]["training"].update(max_steps=steps, disable_tqdm=True, logging_steps=steps)
    return recipe


def child(args: argparse.Namespace) -> None:
    """One training run; prints its seconds per step as JSON."""
    import torch

    from dpkd.study import training_configs
    from dpkd.study.build import train

    torch.set_num_threads(args.threads)
    recipe = _recipe(args.steps)
    work = Path(args.work)
    out = work / f"run-{os.getpid()}"
    config = training_configs(recipe, out)["teacher"]
    logged = train(config, work / "teacher" / "init", work / "data" / "train.jsonl", out / "model")
    print(json.dumps({"seconds_per_step": logged["train_runtime"] / args.steps}))


def _spawn(work: Path, steps: int, threads: int) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", "--work", str(work), "--steps", str(steps),
               "--threads", str(threads)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _result(process: subprocess.Popen) -> float:
    stdout, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"a benchmark run failed (exit {process.returncode})")
    return json.loads(stdout.strip().splitlines()[-1])["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from dpkd.study import train_data_parallel
    from dpkd.study.build import build_data, build_initial_model, build_tokenizer

    n = args.cores
    recipe = _recipe(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_data(recipe.values, work / "data")
        build_tokenizer(recipe.values, work / "data" / "train.jsonl", work / "tokenizer")
        # The demo's own layout under `work`, so that DDP runs through `dpkd.study.train_data_parallel` itself.
        build_initial_model(recipe.values["teacher"], work / "tokenizer", work / "teacher" / "init", 0, 160)
        best: dict[str, float] = {}

        def record(name: str, value: float) -> None:
            best[name] = min(best.get(name, float("inf")), value)

        for _ in range(args.repeats):
            record("1 process, 1 thread", _result(_spawn(work, args.steps, 1)))
            record(f"1 process, {n} threads", _result(_spawn(work, args.steps, n)))
            side_by_side = [_spawn(work, args.steps, 1) for _ in range(n)]
            record(f"{n} processes side by side (each)", max(_result(p) for p in side_by_side))
            logged = train_data_parallel(n, recipe.source, recipe.values, work)
            record(f"DDP over {n} processes", logged["train_runtime"] / args.steps)

    base = best["1 process, 1 thread"]
    print(f"# demo teacher, {args.steps} steps of 32 examples, best of {args.repeats}; {platform.processor() or platform.machine()}, "
          f"{n} cores, torch {__import__('torch').__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| way | s / step | examples / s vs 1 process, 1 thread |")
    print("|---|---|---|")
    for name, value in best.items():
        throughput = base / value * (n if "side by side" in name else 1)
        print(f"| {name} | {value:.3f} | {throughput:.2f}x |")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"# {time.perf_counter() - started:.0f} s", file=sys.stderr)
