"""Checkpoint selection on a dev split (`select_on_dev` in a study recipe): score the model at a few steps
of training, keep the weights that scored best, and hand those to `save_model`.

The released DPKD code keeps the epoch with the best dev ROUGE-L; this does the same at step granularity,
for every method alike. Candidates are the weights after each listed step (the starting point is not one:
a run always keeps weights it trained). Ties keep the earliest. The weights are kept in memory (the
models this is for are small), so no checkpoint folder is written, and scoring draws nothing from the
training's random streams (`generate_responses` forks them), so a run with selection trains exactly as
one without it, and its last candidate is that run's final model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

SELECTION_FILE = "dev_selection.json"
SELECTION_METRIC = "rougeL"


def greedy_dev_scorer(tokenizer, dev_path: str | Path, *, max_new_tokens: int, batch_size: int,
                      template: str = "auto") -> Callable[[torch.nn.Module], dict[str, float]]:
    """`score(model)` → `{"exact_match", "rougeL"}` (percent) of the model's greedy answers to the dev prompts:
    one deterministic pass, the cheapest evaluation that ranks checkpoints."""
    from dpkd.data import load_instruction_data
    from dpkd.evaluation import compute_metrics
    from dpkd.generation import SamplingConfig, generate_texts

    rows = load_instruction_data(str(dev_path), template=template)
    prompts, references = list(rows["prompt"]), list(rows["references"])
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False)

    def score(model) -> dict[str, float]:
        return compute_metrics(generate_texts(model, tokenizer, prompts, sampling, batch_size=batch_size), references)

    return score


class SelectOnDev(TrainerCallback):
    """Score the model with `score(model)` after each step in `steps`; at the end of training, load the
    weights of the best-scoring step (by `metric`, ties to the earliest) back into the model, and write
    every score and the kept step to `record_path` (JSON: `{"metric", "evaluated": [{"step", <metrics>}],
    "kept_step"}`)."""

    def __init__(self, score: Callable[[torch.nn.Module], dict[str, float]], steps: Sequence[int],
                 record_path: str | Path | None = None, metric: str = SELECTION_METRIC):
        if not steps:
            raise ValueError("steps: at least one step to score on dev is needed")
        self.score, self.steps, self.metric = score, sorted(set(steps)), metric
        self.record_path = Path(record_path) if record_path is not None else None
        self.evaluated: list[dict] = []
        self.kept_step: int | None = None
        self._kept_weights: dict[str, torch.Tensor] | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.steps:
            return
        was_training = model.training
        model.eval()
        with torch.no_grad():
            scores = self.score(model)
        model.train(was_training)
        self.evaluated.append({"step": state.global_step, **scores})
        best = max((e[self.metric] for e in self.evaluated[:-1]), default=None)
        if best is None or scores[self.metric] > best:
            self.kept_step = state.global_step
            self._kept_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._kept_weights is None:
            raise RuntimeError(f"select_on_dev: training ended at step {state.global_step} before any of the "
                               f"steps to score ({self.steps}) was reached")
        model.load_state_dict(self._kept_weights)
        self._kept_weights = None
        if self.record_path is not None and state.is_world_process_zero:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            self.record_path.write_text(json.dumps(
                {"metric": self.metric, "evaluated": self.evaluated, "kept_step": self.kept_step}, indent=2) + "\n")
