"""The model card (`README.md`) written into every saved model folder: what was distilled from what, how, and
how well (when `dpkd eval` has written `eval/metrics.json` there), with the paper's citation and hub tags."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CITATION = """@article{li2024dpkd,
  title   = {Direct Preference Knowledge Distillation for Large Language Models},
  author  = {Li, Yixing and Gu, Yuxian and Dong, Li and Wang, Dequan and Cheng, Yu and Wei, Furu},
  journal = {arXiv preprint arXiv:2406.19774},
  year    = {2024},
  url     = {https://arxiv.org/abs/2406.19774}
}"""

# The settings a reader needs to reproduce the run, in the order shown.
CARD_SETTINGS = ("method", "beta", "dpkd_loss_type", "length_normalize", "kd_ratio", "temperature", "skew_alpha",
                 "lmbda", "max_new_tokens", "sampling_temperature", "max_prompt_length", "max_length", "template",
                 "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                 "max_steps", "seed")


def model_card(*, method: str, student: str | None, teacher: str | None, data: str | None,
               settings: dict[str, Any], metrics: dict | None = None, adapter: bool = False) -> str:
    """The card's text: YAML front matter (tags, base model, data) and a Markdown body."""
    tags = ["dpkd", "distillation", method] + (["peft", "lora"] if adapter else [])
    front = ["---", "library_name: " + ("peft" if adapter else "transformers"), "tags:"]
    front += [f"- {tag}" for tag in dict.fromkeys(tags)]
    if student and not os.path.isabs(student):
        front.append(f"base_model: {student}")
    if data and "/" in data and not os.path.exists(data):
        front += ["datasets:", f"- {data}"]
    front.append("---")
    body = [f"# {method} student distilled with dpkd", "",
            f"A student language model distilled from a teacher with **{method}** "
            "([dpkd](https://arxiv.org/abs/2406.19774): Direct Preference Knowledge Distillation and its baselines).",
            "", "| | |", "|---|---|",
            f"| method | `{method}` |", f"| teacher | {_code(teacher)} |", f"| student (initial) | {_code(student)} |",
            f"| training data | {_code(data)} |", "", "## Settings", "", "| setting | value |", "|---|---|"]
    body += [f"| {key} | `{settings[key]}` |" for key in CARD_SETTINGS if settings.get(key) is not None]
    body += ["", "## Evaluation", ""]
    if metrics and metrics.get("sets"):
        body += ["ROUGE-L and exact match (mean ± std over seeds), from `eval/metrics.json`:", "",
                 "| set | n | ROUGE-L | exact match |", "|---|---|---|---|"]
        for name, result in metrics["sets"].items():
            summary = result.get("summary", {})
            rouge, em = summary.get("rougeL", {}), summary.get("exact_match", {})
            body.append(f"| {name} | {result.get('n_examples', '')} | {_mean_std(rouge)} | {_mean_std(em)} |")
    else:
        body.append("Not evaluated yet: `dpkd eval --model <this folder>` writes `eval/metrics.json`, and the next "
                    "save lists its results here.")
    body += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(front + [""] + body)


def write_model_card(folder: str | os.PathLike, *, eval_folder: str | os.PathLike | None = None, **fields) -> Path:
    """Write `model_card(**fields)` to `folder/README.md`, with the results of `<eval_folder or folder>/eval/
    metrics.json` when that file exists and reads."""
    folder = Path(folder)
    metrics = None
    metrics_path = Path(eval_folder if eval_folder is not None else folder) / "eval" / "metrics.json"
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metrics = None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    path.write_text(model_card(metrics=metrics, **fields), encoding="utf-8")
    return path


def _code(value: Any) -> str:
    return "—" if value in (None, "") else f"`{value}`"


def _mean_std(summary: dict) -> str:
    if "mean" not in summary:
        return "—"
    return f"{summary['mean']:.2f} ± {summary.get('std', 0.0):.2f}"
