"""`dpkd report`: a markdown table of methods × evaluation sets and PNG charts, from run directories.

A run directory is a training `output_dir`: `dpkd_run.json` ({"method": ...}; the directory name stands in
when it is absent), `trainer_state.json` (transformers' `log_history`) and `eval/metrics.json` (written by
`dpkd eval`). A teacher directory evaluated with `dpkd eval` is a run too: it becomes the teacher row when a
student run names it as its teacher, or when its `dpkd_run.json` says `"method": "teacher"`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# Only the standard library and matplotlib: a report needs no torch.
SET_TITLES = {"dolly": "DollyEval", "selfinst": "SelfInst", "vicuna": "Vicuna", "sinst": "S-NI",
              "dolly-dev": "Dolly dev"}
METHOD_TITLES = {"sft": "SFT", "kd": "KD", "seqkd": "SeqKD", "minillm": "MiniLLM", "dpkd": "DPKD"}
# The paper's row order; other methods follow in the order given.
METHOD_ORDER = ("teacher", "sft", "kd", "seqkd", "minillm", "dpkd")
CURVES = (("loss", "training loss"), ("rewards/margins", "reward margin"),
          ("rewards/accuracies", "preference accuracy"))


class ReportError(ValueError):
    """A run directory that cannot be reported on: the message names it and what is missing."""


@dataclass
class Run:
    path: Path
    method: str
    label: str
    metrics: dict
    log_history: list[dict] = field(default_factory=list)
    teacher_path: Path | None = None
    group: str = ""  # the label before it was made unique: runs of one method under several training seeds


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from err


def load_run(run_dir: str | Path) -> Run:
    """Read one run directory; a clear error when it or its evaluation results are missing."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run directory {str(path)!r} does not exist")
    metrics_path = path / "eval" / "metrics.json"
    if not metrics_path.is_file():
        raise ReportError(f"run directory {str(path)!r} has no eval/metrics.json: "
                              f"run `dpkd eval --model {path}` first")
    metrics = _read_json(metrics_path)
    if not isinstance(metrics.get("sets"), dict):
        raise ReportError(f"{metrics_path}: no 'sets' field; was it written by `dpkd eval`?")
    run_info = _read_json(path / "dpkd_run.json") if (path / "dpkd_run.json").is_file() else {}
    method = str(run_info.get("method") or path.name)
    state_path = path / "trainer_state.json"
    log_history = _read_json(state_path).get("log_history", []) if state_path.is_file() else []
    teacher = run_info.get("teacher")
    return Run(path=path, method=method, label=METHOD_TITLES.get(method.lower(), method), metrics=metrics,
               log_history=log_history, teacher_path=Path(teacher).resolve() if teacher else None)


def _order_runs(runs: list[Run]) -> list[Run]:
    """Teachers first, then the paper's method order, then the rest as given; labels made unique."""
    named_teachers = {r.teacher_path for r in runs if r.teacher_path is not None}
    for r in runs:
        if r.path.resolve() in named_teachers or r.method.lower() == "teacher":
            r.method, r.label = "teacher", f"Teacher ({r.path.name})"

    def rank(r: Run) -> int:
        m = r.method.lower()
        return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)

    ordered = sorted(runs, key=rank)
    for r in ordered:
        r.group = r.label
    labels = [r.label for r in ordered]
    for r in ordered:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"
    return ordered


def _set_names(runs: list[Run]) -> list[str]:
    seen = [name for r in runs for name in r.metrics["sets"]]
    return [s for s in SET_TITLES if s in seen] + sorted({s for s in seen if s not in SET_TITLES})


def _mean_std(summary: dict | None, spec: str = ".2f") -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    return f"{summary['mean']:{spec}} ± {summary['std']:{spec}}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _metric_table(runs: list[Run], sets: list[str], metric: str) -> list[str]:
    rows = []
    for r in runs:
        summaries = [r.metrics["sets"].get(s, {}).get("summary", {}) for s in sets]
        rows.append([r.label, *(_mean_std(s.get(metric)) for s in summaries)])
    return _table(["Method", *(SET_TITLES.get(s, s) for s in sets)], rows)


def _length_tables(runs: list[Run], sets: list[str]) -> list[str]:
    lines = []
    for s in sets:
        rows, buckets = [], []
        for r in runs:
            by_length = r.metrics["sets"].get(s, {}).get("summary", {}).get("by_reference_length")
            if by_length:
                buckets = list(by_length)
                rows.append([r.label, *(_mean_std(by_length[b]["exact_match"]) for b in buckets),
                             *(_mean_std(by_length[b]["rougeL"]) for b in buckets)])
        if rows:
            counts = next(r.metrics["sets"][s]["summary"]["by_reference_length"] for r in runs
                          if s in r.metrics["sets"])
            n = ", ".join(f"{b}: {int(counts[b]['n']['mean'])}" for b in buckets)
            lines += [f"**{SET_TITLES.get(s, s)}** (examples per bucket: {n})", ""]
            lines += _table(["Method", *(f"EM {b}" for b in buckets), *(f"ROUGE-L {b}" for b in buckets)], rows)
    return lines


def _teacher_table(runs: list[Run], sets: list[str]) -> list[str]:
    rows = []
    for r in runs:
        for s in sets:
            result = r.metrics["sets"].get(s, {})
            reward = result.get("summary", {}).get("implicit_reward")
            if reward:
                rows.append([r.label, SET_TITLES.get(s, s),
                             *(_mean_std(reward[outputs][key], ".4f") for key in ("reward", "reward_per_token")
                               for outputs in ("student_outputs", "teacher_outputs")),
                             f"{result['reverse_kl_first_token']:.4f}"])
    if not rows:
        return []
    return ["## Implicit reward and reverse KL (the paper's Table 3)", "",
            "r̂ = β·log q(y|x)/p(y|x) summed over the response tokens, mean over examples (per token: divided "
            "by the response length); q the student, p the teacher. KL(q‖p) on the first response token.",
            "", *_table(["Method", "Set", "r̂ student outputs", "r̂ teacher outputs", "r̂ per token, student",
                         "r̂ per token, teacher", "KL(q‖p)"], rows)]


def _training_table(runs: list[Run]) -> list[str]:
    rows = []
    for r in runs:
        if not r.log_history:
            continue
        last = {}
        for entry in r.log_history:
            last.update({k: entry[k] for k, _ in CURVES if k in entry})
        step = max((e.get("step", 0) for e in r.log_history), default=0)
        rows.append([r.label, str(step), *(f"{last[k]:.4f}" if k in last else "–" for k, _ in CURVES)])
    if not rows:
        return []
    return ["## Training (last logged values)", "",
            *_table(["Method", "steps", *(title for _, title in CURVES)], rows)]


def rouge_bars(runs: list[Run], sets: list[str]) -> list[tuple[str, list[float], list[float]]]:
    """One bar per method for each set: `(label, means, stds)`. Runs that share a label (one method under
    several training seeds) make one bar, the mean over the runs of each run's mean over its sampling seeds,
    with the std over the runs; a run alone keeps its std over sampling seeds."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group or r.label, []).append(r)
    bars = []
    for label, members in groups.items():
        means, stds = [], []
        for s in sets:
            summaries = [m.metrics["sets"].get(s, {}).get("summary", {}).get("rougeL") or {} for m in members]
            values = [summary.get("mean") or 0.0 for summary in summaries]
            means.append(statistics.fmean(values))
            stds.append(statistics.pstdev(values) if len(values) > 1 else summaries[0].get("std") or 0.0)
        bars.append((label if len(members) == 1 else f"{label} ({len(members)} runs)", means, stds))
    return bars


def plot_rouge(runs: list[Run], sets: list[str], path: Path) -> Path:
    """Grouped bars: ROUGE-L per evaluation set, one bar per method (`rouge_bars`): error bars are the std
    over sampling seeds, or over training seeds for a method trained under several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = rouge_bars(runs, sets)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(sets) + 0.4 * len(bars)), 4.5))
    width = 0.8 / len(bars)
    for i, (label, means, stds) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(sets))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label, color=f"C{i}")
    ax.set_xticks(range(len(sets)), [SET_TITLES.get(s, s) for s in sets])
    ax.set_ylabel("ROUGE-L (mean ± std)")
    ax.set_title("ROUGE-L by method and evaluation set")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_curves(runs: list[Run], path: Path) -> Path | None:
    """One panel per logged quantity (loss, reward margin, preference accuracy) against the step.

    A quantity no run logged gets no panel; with none at all, no file is written and None returned.
    """
    panels = [(key, title) for key, title in CURVES if any(key in e for r in runs for e in r.log_history)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for i, r in enumerate(runs):
            points = [(e["step"], e[key]) for e in r.log_history if key in e and "step" in e]
            if points:
                ax.plot(*zip(*points), marker=".", label=r.label, color=f"C{i % 10}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dirs: list[str | Path], out_dir: str | Path, labels: dict | None = None) -> Path:
    """Write `report.md`, `rougeL.png` and (when runs logged training) `training_curves.png`; return report.md.

    Every run directory is read and checked before anything is written. `labels`: run directory → the
    label to show instead of its method's title.
    """
    if not run_dirs:
        raise ReportError("report: no run directory given")
    loaded = [load_run(d) for d in run_dirs]
    for run in loaded:
        run.label = {Path(k): label for k, label in (labels or {}).items()}.get(run.path, run.label)
    runs = _order_runs(loaded)
    sets = _set_names(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rouge_png = plot_rouge(runs, sets, out_dir / "rougeL.png")
    curves_png = plot_training_curves(runs, out_dir / "training_curves.png")

    seeds = sorted({len(r.metrics.get("settings", {}).get("seeds", [])) for r in runs})
    lines = ["# Evaluation report", "",
             f"Mean ± standard deviation over {'/'.join(map(str, seeds))} sampling seeds; "
             "metrics as in MiniLLM (ROUGE-L F1 with stemming, exact match after normalisation), × 100.", "",
             "| Method | run directory | examples per set |", "|---|---|---|",
             *(f"| {r.label} | `{r.path}` | "
               + ", ".join(f"{SET_TITLES.get(s, s)}: {v['n_examples']}" for s, v in r.metrics["sets"].items())
               + " |" for r in runs), "",
             "## ROUGE-L", "", *_metric_table(runs, sets, "rougeL"),
             "## Exact match", "", *_metric_table(runs, sets, "exact_match"),
             "## By reference length (words), as the paper's Tables 4–5", "", *_length_tables(runs, sets),
             *_teacher_table(runs, sets), *_training_table(runs),
             "## Charts", "", f"![ROUGE-L per method and set]({rouge_png.name})", ""]
    if curves_png is not None:
        lines += [f"![Training curves]({curves_png.name})", ""]
    else:
        lines += ["No run logged training curves.", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report

