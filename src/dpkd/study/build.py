"""What the stages make: the data, the tokenizer, initial models, trained models and their evaluations.

Plain functions of paths and settings, usable outside the study (`bench/demo_parallel.py` times `train`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


class Layout:
    """Where each stage writes under the output folder."""

    def __init__(self, out: Path):
        self.out = out
        self.data = out / "data"
        self.split = {split: self.data / f"{split}.jsonl" for split in ("train", "dev", "test")}
        self.tokenizer = out / "tokenizer"
        self.teacher = out / "teacher"
        self.student_init = out / "student_init"
        self.warm_start = out / "warm_start"

    def model(self, name: str) -> Path:
        """The folder of `teacher`, of `warm_start`, or of a run (a method, or `<method>_s<seed>`)."""
        if name in ("teacher", "warm_start"):
            return self.out / name
        return self.out / "runs" / name


def fresh(path: Path) -> Path:
    """An empty folder for a stage that is (re)done: leftovers of an interrupted attempt go."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def build_data(values: dict, folder: Path) -> dict[str, Path]:
    from dpkd.tasks import write_splits

    data = values["data"]
    sizes = {split: data[split] for split in ("train", "dev", "test")}
    return write_splits(folder, sizes, seed=values["seed"], tasks=data.get("tasks"), template=data.get("template"))


def _read_prompts_and_answers(path: Path) -> list[str]:
    from dpkd.data import load_instruction_data

    rows = load_instruction_data(str(path))
    return [p + c for p, c in zip(rows["prompt"], rows["completion"])]


def build_tokenizer(values: dict, train_path: Path, folder: Path) -> None:
    from dpkd.modeling import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(_read_prompts_and_answers(train_path), vocab_size=values["tokenizer"]["vocab_size"])
    tokenizer.save_pretrained(folder)


def build_initial_model(sizes: dict, tokenizer_dir: Path, folder: Path, seed: int, max_positions: int) -> int:
    """Save a randomly initialised Llama-style model of `sizes` with the tokenizer; return its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpkd.modeling import load_tokenizer, save_model_and_tokenizer, tiny_config

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    config = tiny_config("llama", len(tokenizer), n_layer=sizes["n_layer"], d_model=sizes["d_model"],
                         n_head=sizes["n_head"], max_positions=max_positions, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    save_model_and_tokenizer(model, tokenizer, folder)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class DevSelection:
    """`select_on_dev`: score the run greedily on `dev_path` after each of `steps`, keep the best (ROUGE-L)."""

    dev_path: Path
    steps: tuple[int, ...]
    max_new_tokens: int
    batch_size: int


def train(args, init_dir: Path, train_path: Path, save_to: Path, teacher_dir: Path | None = None,
          progress=None, select: DevSelection | None = None) -> dict:
    """Train `init_dir` with `args` (a DistillationConfig) and save the model to `save_to`; return the
    last logged values. `progress`: a `TrainerCallback` that replaces the trainer's own progress bar.
    `select`: save the weights of the step that scored best on dev instead of the last ones (the scores
    and the kept step in `save_to/dev_selection.json`)."""
    from dpkd.data import load_instruction_data
    from dpkd.modeling import load_causal_lm, load_tokenizer
    from dpkd.trainer import DistillationTrainer

    tokenizer = load_tokenizer(init_dir)
    student = load_causal_lm(init_dir)
    teacher = load_causal_lm(teacher_dir.resolve()) if teacher_dir is not None and args.spec.needs_teacher else None
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=load_instruction_data(str(train_path)), processing_class=tokenizer)
    if select is not None:
        from dpkd.selection import SELECTION_FILE, SelectOnDev, greedy_dev_scorer

        scorer = greedy_dev_scorer(tokenizer, select.dev_path, max_new_tokens=select.max_new_tokens,
                                   batch_size=select.batch_size)
        trainer.add_callback(SelectOnDev(scorer, select.steps, Path(save_to) / SELECTION_FILE))
    if progress is not None:
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress)
    trainer.train()
    trainer.save_model(str(save_to))
    if Path(save_to) != Path(args.output_dir) and trainer.is_world_process_zero():
        tokenizer.save_pretrained(save_to)
    return last_logged(trainer.state.log_history)


def last_logged(log_history: list[dict]) -> dict:
    """The latest value of every name a training run logged."""
    logged: dict = {}
    for entry in log_history:
        logged.update(entry)
    return logged


def fill_teacher_samples(args, teacher_dir: Path, train_path: Path, batch_size: int) -> int:
    """Sample the teacher's responses to every training prompt into the cache that `args` (the config of a
    method that reads the teacher-output cache) reads, in large batches: much faster on a CPU than the
    trainer's per-step batches."""
    import torch

    from dpkd.data import load_instruction_data, tokenize_dataset
    from dpkd.modeling import load_causal_lm, load_tokenizer
    from dpkd.teacher_cache import TeacherOutputCache, fill_teacher_cache, model_fingerprint

    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_causal_lm(teacher_dir, device="cuda" if torch.cuda.is_available() else None).eval()
    rows = load_instruction_data(str(train_path), template=args.template)
    tokenized, _ = tokenize_dataset(rows, tokenizer, max_prompt_length=args.max_prompt_length,
                                    max_length=args.max_length, prompt_truncation=args.prompt_truncation)
    cache = TeacherOutputCache(args.teacher_cache_dir, teacher_id=model_fingerprint(teacher),
                               sampling=args.sampling())
    return fill_teacher_cache(teacher, tokenizer, tokenized, cache, args.sampling(), batch_size=batch_size)


def evaluate(model_dir: Path, test_path: Path, eval_values: dict, out_dir: Path, *, greedy: bool = False,
             seeds: list[int] | None = None) -> dict:
    from dpkd.evaluation import evaluate_model
    from dpkd.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=eval_values["max_new_tokens"], do_sample=not greedy)
    return evaluate_model(model_dir, data=[str(test_path)], seeds=seeds or eval_values["seeds"], out_dir=out_dir,
                          batch_size=eval_values["batch_size"], sampling=sampling, max_prompt_length=None)


def summary(metrics: dict) -> dict:
    """The mean/std summary of the one evaluation set in a study's `metrics.json`."""
    (result,) = metrics["sets"].values()
    return result["summary"]


def results_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown: one row per model, exact match and ROUGE-L as mean ± std over the seeds."""
    lines = ["| model | exact match | ROUGE-L |", "|---|---|---|"]
    for label, values in rows:
        em, rl = values["exact_match"], values["rougeL"]
        lines.append(f"| {label} | {em['mean']:.1f} ± {em['std']:.1f} | {rl['mean']:.1f} ± {rl['std']:.1f} |")
    return "\n".join(lines)


def sampling_spread_table(per_method: dict[str, list[dict]]) -> str:
    """Markdown: for each method, the std over sampling seeds of its runs (`summary` of each), averaged over
    its runs: how much one evaluation's sampling moves a result, beside the spread over training seeds."""
    lines = ["| method | exact match | ROUGE-L |", "|---|---|---|"]
    for method, summaries in per_method.items():
        cells = [sum(s[metric]["std"] for s in summaries) / len(summaries) for metric in ("exact_match", "rougeL")]
        lines.append(f"| {method} | {cells[0]:.1f} | {cells[1]:.1f} |")
    return "\n".join(lines)


def seed_means(metrics: dict) -> dict[str, float]:
    """Exact match and ROUGE-L of one evaluated run, averaged over its sampling seeds."""
    result = summary(metrics)
    return {metric: result[metric]["mean"] for metric in ("exact_match", "rougeL")}


def over_training_seeds(per_seed: dict[int, dict[str, float]]) -> dict:
    """Mean and population std (as over sampling seeds) over training seeds of `{seed: {metric: value}}`,
    in the shape of `summary` (so `results_table` prints it)."""
    from dpkd.evaluation import summarize_seeds

    return summarize_seeds([per_seed[seed] for seed in sorted(per_seed)])


def paired_differences(method: dict[int, float], control: dict[int, float]) -> dict:
    """The paired difference of a method to its control over training seeds.

    d_s = method[s] − control[s] for each training seed s (both trained with seed s); returns
    `{"per_seed": {s: d_s}, "mean": mean of d_s, "std": population std of d_s, "n": number of seeds}`.
    """
    if set(method) != set(control) or not method:
        raise ValueError(f"paired differences need the same training seeds on both sides, got "
                         f"{sorted(method)} and {sorted(control)}")
    from dpkd.evaluation import summarize_seeds

    diffs = {seed: method[seed] - control[seed] for seed in sorted(method)}
    return {"per_seed": diffs, **summarize_seeds(list(diffs.values())), "n": len(diffs)}


def paired_table(per_method: dict[str, dict[int, dict[str, float]]], control: str = "sft") -> str:
    """Markdown: for each method but `control`, (method − control) per training seed on exact match and
    ROUGE-L, as mean ± std over training seeds (the difference alone for one seed). `per_method`: method →
    training seed → metric → value. A method trained with fewer seeds than the control (`seeds_by_method`)
    is paired on the seeds both have."""
    lines = [f"| method − {control} | exact match | ROUGE-L | training seeds |", "|---|---|---|---|"]
    for method, per_seed in per_method.items():
        if method == control:
            continue
        shared = sorted(set(per_seed) & set(per_method[control]))
        cells = []
        for metric in ("exact_match", "rougeL"):
            d = paired_differences({s: per_seed[s][metric] for s in shared},
                                   {s: per_method[control][s][metric] for s in shared})
            cells.append(f"{d['mean']:+.1f}" + (f" ± {d['std']:.1f}" if d["n"] > 1 else ""))  # one seed: no spread
        lines.append(f"| {method} | {' | '.join(cells)} | {len(shared)} |")
    return "\n".join(lines)
