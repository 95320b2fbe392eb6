"""`dpkd report` from tiny runs: the table's rows and values, valid PNG charts, clear errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpkd.cli import main
from dpkd.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, model_dir: Path, method: str | None, teacher: Path | None, log_history: list | None) -> Path:
    run = root / (method or "teacher")
    shutil.copytree(model_dir, run)
    if method is not None:
        info = {"method": method, **({"teacher": str(teacher)} if teacher else {})}
        (run / "dpkd_run.json").write_text(json.dumps(info))
    if log_history is not None:
        (run / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": log_history}))
    return run


def sft_logs():
    return [{"step": s, "loss": 3.0 - 0.5 * s, "learning_rate": 1e-4} for s in (1, 2, 3, 4)]


def dpkd_logs():
    return [{"step": s, "loss": 0.7 - 0.1 * s, "rewards/margins": 0.05 * s, "rewards/accuracies": 0.5 + 0.1 * s,
             "rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s} for s in (1, 2, 3, 4)]


@pytest.fixture(scope="module")
def evaluated_runs(tmp_path_factory, model_pairs, eval_data_dir) -> dict[str, Path]:
    """A teacher and two student runs (different weights), each evaluated with `dpkd eval`."""
    root = tmp_path_factory.mktemp("runs")
    teacher = make_run(root, model_pairs["llama"][0], None, None, None)
    runs = {"teacher": teacher,
            "sft": make_run(root, model_pairs["llama"][1], "sft", teacher, sft_logs()),
            "dpkd": make_run(root, model_pairs["gpt2"][1], "dpkd", teacher, dpkd_logs())}
    for run in runs.values():
        assert main(["eval", "--model", str(run), "--data", "vicuna,dolly", "--data-dir", str(eval_data_dir),
                     "--seeds", "1,2", "--limit", "3", "--max-new-tokens", "3", "--max-prompt-length", "32"]) == 0
    return runs


def table_rows(report: str, heading: str) -> list[list[str]]:
    section = report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows]


def test_report_cli_writes_paper_layout_table_and_valid_pngs(evaluated_runs, tmp_path):
    out = tmp_path / "report"
    runs = [evaluated_runs[k] for k in ("dpkd", "sft", "teacher")]  # the teacher row must still come first
    done = subprocess.run([sys.executable, "-m", "dpkd", "report", *map(str, runs), "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "report.md").read_text()

    rouge = table_rows(report, "ROUGE-L")
    assert rouge[0] == ["Method", "DollyEval", "Vicuna"]
    assert [row[0] for row in rouge[1:]] == ["Teacher (teacher)", "SFT", "DPKD"]
    for row, key in zip(rouge[1:], ("teacher", "sft", "dpkd")):
        metrics = json.loads((evaluated_runs[key] / "eval" / "metrics.json").read_text())
        for cell, name in zip(row[1:], ("dolly", "vicuna")):
            summary = metrics["sets"][name]["summary"]["rougeL"]
            assert cell == f"{summary['mean']:.2f} ± {summary['std']:.2f}"
    exact = table_rows(report, "Exact match")
    assert [row[0] for row in exact[1:]] == ["Teacher (teacher)", "SFT", "DPKD"]

    training = table_rows(report, "Training (last logged values)")
    assert [row[0] for row in training[1:]] == ["SFT", "DPKD"]  # the teacher has no training log
    assert training[2][1:] == ["4", "0.3000", "0.2000", "0.9000"]
    assert training[1][3] == "–"  # SFT logged no reward margin

    for png in ("rougeL.png", "training_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, png
        assert f"]({png})" in report


def test_runs_without_training_logs_get_no_curves_chart(evaluated_runs, tmp_path):
    report = write_report([evaluated_runs["teacher"]], tmp_path)
    assert (tmp_path / "rougeL.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "training_curves.png").exists()
    assert "No run logged training curves." in report.read_text()


def test_report_refuses_a_run_without_eval_results_before_writing(evaluated_runs, model_pairs, tmp_path, capsys):
    bare = make_run(tmp_path, model_pairs["llama"][1], "kd", None, sft_logs())
    out = tmp_path / "report"
    assert main(["report", str(evaluated_runs["sft"]), str(bare), "--out", str(out)]) == 2
    assert f"run directory '{bare}' has no eval/metrics.json" in capsys.readouterr().err
    assert not out.exists()
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_runs_of_one_method_under_several_training_seeds_make_one_bar_with_the_spread_over_them():
    from dpkd.report import Run, _order_runs, rouge_bars

    def run(name: str, label: str, mean: float, std: float) -> Run:
        summary = {"rougeL": {"mean": mean, "std": std}}
        return Run(path=Path(name), method="dpkd" if "dpkd" in name else "sft", label=label,
                   metrics={"sets": {"dolly": {"summary": summary}}})

    runs = _order_runs([run("sft_s0", "SFT continued", 30.0, 1.0), run("sft_s1", "SFT continued", 32.0, 0.5),
                        run("dpkd_s0", "DPKD", 26.0, 2.0), run("teacher", "Teacher", 50.0, 0.25)])
    assert len({r.label for r in runs}) == 4  # the tables keep one row per run
    bars = {label: (means, stds) for label, means, stds in rouge_bars(runs, ["dolly"])}
    assert bars["SFT continued (2 runs)"] == ([31.0], [1.0])  # std over the two runs, not over sampling seeds
    assert bars["DPKD"] == ([26.0], [2.0]) and len(bars) == 3
