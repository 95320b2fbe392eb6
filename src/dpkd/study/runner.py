"""Running a study: the stages not done yet, each in a worker process as soon as what it needs is done,
then the report."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from dpkd.study.stages import Stage, StageMarkers


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _on_sigterm(handler):
    """Install `handler` for SIGTERM (from the main thread only); return the one it replaces."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def run_stages(stages: list[Stage], markers: StageMarkers, *, source: str, values: dict, out: Path,
               workers: int, threads: int, log: TextIO | None = None, bars: TextIO | None = None,
               run: Callable | None = None) -> None:
    """Run the stages not marked done, each in a worker process as soon as what it needs is done.

    `run(name, source, values, out, context)` does one stage (default: `dpkd.study.stages.run_stage`; a
    module-level function, as the workers import it). A stage's marker is written by this process after
    the stage returns, so a stage cut short by Ctrl-C or an error is redone by the next run. On Ctrl-C,
    SIGTERM or a failed stage the other workers are stopped. Log lines go to `log`, bars to `bars`.
    """
    from dpkd.study.progress import ProgressBoard
    from dpkd.study.stages import run_stage
    from dpkd.study.workers import WorkerPool

    board = ProgressBoard(stages, log if log is not None else io.StringIO(), bars)
    done = set()
    for s in stages:
        if markers.is_done(s.name, s.key):
            board.write(f"{board.number[s.name]} {s.title}: done before, reused")
            done.add(s.name)
    todo = [s for s in stages if s.name not in done]
    if not todo:
        return
    by_name = {s.name: s for s in stages}
    pool = None
    failed = True
    # `kill` (SIGTERM) stops the study as Ctrl-C does: workers stopped, finished stages kept.
    previous_handler = _on_sigterm(_raise_keyboard_interrupt)
    try:
        pool = WorkerPool(min(workers, len(todo)), threads, run or run_stage, (source, values, str(out)))
        while todo or pool.running:
            held = {by_name[name].uses for name in pool.running.values()} - {None}
            for s in sorted(todo, key=lambda s: s.order):
                if not pool.idle():
                    break
                if all(n in done for n in s.needs) and (s.uses is None or s.uses not in held):
                    todo.remove(s)
                    board.start(s.name)
                    pool.start(s.name)
                    if s.uses:
                        held.add(s.uses)
            if not pool.running:
                raise RuntimeError(f"stages that can never start: {', '.join(s.name for s in todo)}")
            for kind, name, value in pool.messages(timeout=0.2):  # a stage's error is raised here
                if kind == "done":
                    seconds = board.finish(name)
                    markers.mark(name, by_name[name].key, seconds=round(seconds, 1))
                    done.add(name)
                else:
                    board.receive(kind, name, value)
            board.tick()
        failed = False
    finally:
        _on_sigterm(previous_handler)
        board.close()
        if pool is not None:
            if failed:
                pool.stop()
            else:
                pool.close()


def run_study(recipe: str | Path | None = None, out: str | Path | None = None, profile: str | None = None,
              seeds: list[int] | None = None, log: TextIO | None = None, bars: TextIO | None = None,
              command: str = "study") -> Path:
    """Run (or resume) the study that the recipe at `recipe` (default: the bundled demo recipe) describes
    under `out` (default: `runs/<recipe's name>`); return the path of the report.

    `seeds` replaces the recipe's `training_seeds`. The study's log lines go to `log`, the running stages'
    progress bars to `bars` (None: not written); `command` names the command in the log.
    """
    from dpkd.report import write_report
    from dpkd.study.build import (
        Layout,
        over_training_seeds,
        paired_table,
        results_table,
        sampling_spread_table,
        seed_means,
        summary,
    )
    from dpkd.study.pretrained import is_pretrained
    from dpkd.study.recipe import (
        check_device,
        entry_init,
        load_demo_recipe,
        needs_warm_start,
        study_runs,
        training_configs,
    )
    from dpkd.study.stages import study_stages
    from dpkd.study.workers import resolve_parallelism

    log = log if log is not None else io.StringIO()
    started = time.perf_counter()
    recipe_obj = load_demo_recipe(recipe, profile, seeds)  # every setting is checked before any work starts
    check_device(recipe_obj)
    out = Path(out if out is not None else Path("runs") / (Path(recipe).stem if recipe else "demo")).resolve()
    v = recipe_obj.values
    workers, threads = resolve_parallelism(v.get("workers", "auto"), v.get("threads", "auto"))
    configs = training_configs(recipe_obj, out)
    stages = study_stages(v, configs)
    log.write(f"dpkd {command}: recipe {recipe_obj.source}; output {out}; {workers} worker process(es) × "
              f"{threads} CPU thread(s)\n")
    run_stages(stages, StageMarkers(out), source=recipe_obj.source, values=v, out=out, workers=workers,
               threads=threads, log=log, bars=bars)

    log.write(f"[{len(stages) + 1}/{len(stages) + 1}] writing the report ...\n")
    at = Layout(out)
    warm_started = needs_warm_start(v)
    control_warm = "sft" in v["distill"]["methods"] and entry_init(v, "sft") == "sft"
    runs = study_runs(v)
    names = ["teacher", *(["warm_start"] if warm_started else []), *(run for run, _, _ in runs)]
    # From a warm start, `sft` is the compute-matched control: the warm start trained for as many steps more.
    labels = {at.warm_start: "SFT warm start"} if warm_started else {}
    labels.update({at.model(run): "SFT continued" for run, method, _ in runs if control_warm and method == "sft"})
    report = write_report([at.model(name) for name in names], out / "report", labels=labels)
    metrics = {name: json.loads((at.model(name) / "eval" / "metrics.json").read_text()) for name in names}

    def label(method: str) -> str:
        return f"{method} continued" if control_warm and method == "sft" else method

    if is_pretrained(v):  # several test sets: a column group per set
        from dpkd.study import pretrained

        seed_means, summary = pretrained.set_means, pretrained.set_summaries
        results_table, paired_table = pretrained.sets_tables(list(v["eval"]["sets"]))

    eval_seeds = f"sampling seeds {v['eval']['seeds']}"
    if "training_seeds" in v:
        per_method: dict[str, dict[int, dict]] = {}
        for run, method, seed in runs:
            per_method.setdefault(method, {})[seed] = seed_means(metrics[run])
        rows = [(name.replace("_", " "), summary(metrics[name])) for name in names[:1 + warm_started]]
        rows += [(label(m), over_training_seeds(per_seed)) for m, per_seed in per_method.items()]
        spread = (f"mean ± std over {eval_seeds} for {', '.join(names[:1 + warm_started])}; for each method, "
                  f"over training seeds {v['training_seeds']}{_other_seeds(v)} of its mean over the {eval_seeds}")
    else:
        per_method = {method: {v["seed"]: seed_means(metrics[run])} for run, method, _ in runs}
        rows = [(label(name) if name in v["distill"]["methods"] else name, summary(metrics[name])) for name in names]
        spread = f"mean ± std over {eval_seeds}"
    table = results_table(rows)
    if is_pretrained(v):
        sizes = ", ".join(f"{name} {result['n_examples']}" for name, result in metrics["teacher"]["sets"].items())
        text = f"Evaluation sets (examples: {sizes}), {spread}:\n\n{table}\n"
    else:
        text = f"Test split ({v['data']['test']} examples), {spread}:\n\n{table}\n"
        if "training_seeds" in v:
            within: dict[str, list[dict]] = {}
            for run, method, _ in runs:
                within.setdefault(label(method), []).append(summary(metrics[run]))
            text += (f"\nWithin one run, the std over the {eval_seeds} (mean over the training seeds):\n\n"
                     f"{sampling_spread_table(within)}\n")
    if len(per_method) >= 2 and "sft" in per_method:
        paired = paired_table(per_method, control="sft")
        text += (f"\nPaired with the {label('sft')} control trained with the same training seed: (method − "
                 f"{label('sft')}) per training seed, mean ± std over training seeds:\n\n{paired}\n")
    if v.get("select_on_dev", False):
        text += f"\n{_selection_note(at, runs)}\n"
    (out / "report" / "summary.md").write_text(text)
    log.write(f"\n{text}\n")
    log.write(f"dpkd {command}: finished in {time.perf_counter() - started:.0f}s; report {report}\n")
    return report


def _selection_note(at, runs: list[tuple[str, str, int | None]]) -> str:
    """With select_on_dev: which step each run kept, from its `dev_selection.json`; the steps scored are
    named once, and again for an entry with another budget."""
    from collections import Counter

    from dpkd.selection import SELECTION_FILE

    kept: dict[str, list[str]] = {}
    scored: dict[str, tuple[int, ...]] = {}
    for run, entry, _ in runs:
        record = json.loads((at.model(run) / SELECTION_FILE).read_text())
        scored[entry] = tuple(e["step"] for e in record["evaluated"])
        kept.setdefault(entry, []).append(str(record["kept_step"]))
    usual = Counter(scored.values()).most_common(1)[0][0]
    listed = "; ".join(f"{entry} {', '.join(steps)}"
                       + ("" if scored[entry] == usual else f" (scored after {', '.join(map(str, scored[entry]))})")
                       for entry, steps in kept.items())
    return (f"Checkpoints selected on dev (greedy decoding, ROUGE-L; scored after steps {', '.join(map(str, usual))}; "
            f"the step kept, per training seed): {listed}.")


def _other_seeds(values: dict) -> str:
    by_method = values.get("seeds_by_method") or {}
    return f" ({'; '.join(f'{m}: {seeds}' for m, seeds in by_method.items())})" if by_method else ""


def run_demo(out: str | Path = "runs/demo", config: str | Path | None = None, profile: str | None = None,
             log: TextIO | None = None, bars: TextIO | None = None, seeds: list[int] | None = None) -> Path:
    """`dpkd demo`: `run_study` on `config` (default: the bundled recipe) under `out` (default: runs/demo)."""
    return run_study(config, out, profile, seeds, log=log, bars=bars, command="demo")
