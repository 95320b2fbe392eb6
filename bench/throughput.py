"""dpkd against TRL, side by side: time per optimizer step and peak memory, as ratios (TRL ÷ dpkd).

Both sides train the same randomly initialised GPT-2 student against the same teacher (built from configs
with one seed, dropout off), on the same random-token prompts and completions, with the same optimizer
(AdamW, constant learning rate, gradient clipping at 1, no gradient checkpointing), precision, batch size and
sampling settings (temperature 1, top-k off, top-p 1). The pairs:

- teacher-forced (lmbda = 0): dpkd `kd`, `jsd` and `dpkd_token` against TRL's `GKDTrainer` with λ = 0 (its
  β = 0, forward KL, against `kd`; β = 0.5, JSD, against the other two). dpkd's `kd` keeps its default
  0.5·CE on the dataset responses (the paper's KD baseline), a term GKD does not have;
- on-policy: dpkd `jsd` with lmbda = 1 against `GKDTrainer` with λ = 1 (β = 0.5 on both);
- dpkd `dpkd` with a cold teacher cache (every y_t generated in the step) and a warm one (the cold run's
  cache, so every y_t is read) against TRL's `DistillationTrainer` and against `GKDTrainer` with λ = 1.
  TRL's `DistillationTrainer` is on-policy generalized-JSD distillation: its `beta` chooses the divergence
  (0.5 here, as for GKD) and is unrelated to DPKD's β (0.1, the paper's); neither changes a step's cost.

Every sample is exactly `--new-tokens` long on both sides: the benchmark wraps `generate` on both models and
sets `min_new_tokens = max_new_tokens` on the generation config each trainer passes, so no EOS ends a sample
early (the trainers themselves are unchanged); the `sampled` column shows the lengths that came out.

Each configuration runs in a fresh subprocess (`--child`), so that its peak memory is its own and one crash
leaves the rest of the table. Peak memory is the child's `ru_maxrss` at the end (CPU; children run with
`THP_MEM_ALLOC_ENABLE=1`, as the Makefile sets) or `torch.cuda.max_memory_allocated` (CUDA), weights and
optimizer state included. Time per step is the median over `--steps` optimizer steps after `--warmup` steps,
from the Trainer's `on_step_begin` to its `on_step_end`: the step's generation, forward and backward passes,
clipping and optimizer step, not the collation of the batch, which the Trainer does before.

Where a step goes, for every configuration: the benchmark times the models' `generate` calls (sampling), the
backbones' forward passes outside `generate` (teacher forward, student forward), `accelerator.backward` and
the optimizer step. Everything else is `rest`: the `lm_head` projections (the losses apply them outside the
backbone), the loss itself, building batches from samples, the teacher cache's reads and writes, clipping.
On CUDA each timed region synchronises the device at its ends, on both sides alike.

    .venv/bin/python bench/throughput.py                          # CPU sizes, every pair
    .venv/bin/python bench/throughput.py --size tiny --steps 2 --warmup 1
    python bench/throughput.py --size gpt2 --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

from measure import cpu_seconds, max_rss_bytes  # bench/ is the script's folder, so first on sys.path

GIB = 1024**3
RESULT_PREFIX = "THROUGHPUT_RESULT "


@dataclass(frozen=True)
class Size:
    teacher: tuple[int, int, int]  # layers, hidden, heads
    student: tuple[int, int, int]
    vocab: int
    batch: int
    prompt_length: int
    new_tokens: int  # the dataset completions' length, and the tokens sampled per prompt
    dtype: str  # of the weights; bfloat16 also turns on the Trainer's bf16 autocast
    steps: int
    warmup: int


SIZES = {
    "tiny": Size((2, 64, 2), (1, 32, 2), 1024, 2, 16, 8, "float32", 2, 1),
    "cpu": Size((6, 384, 6), (2, 256, 4), 50257, 8, 128, 128, "float32", 3, 1),
    # GPT-2 medium (355M) teaching GPT-2 small (124M).
    "gpt2": Size((24, 1024, 16), (12, 768, 12), 50257, 16, 128, 128, "bfloat16", 4, 1),
}
OVERRIDABLE = ("vocab", "batch", "prompt_length", "new_tokens", "dtype")


@dataclass(frozen=True)
class Config:
    """One measured configuration: which trainer, with which settings."""

    side: str  # "dpkd" or "trl"
    trainer: str  # dpkd: a method; trl: "gkd" or "distillation"
    label: str
    lmbda: float = 0.0
    beta: float = 0.5  # TRL's generalized-JSD β (0: forward KL, 0.5: JSD)
    cache: str = ""  # dpkd's `dpkd`: a "cold" or "warm" teacher cache
    options: tuple[tuple[str, object], ...] = ()  # dpkd: further DistillationConfig fields


CONFIGS = {
    "dpkd_kd": Config("dpkd", "kd", "dpkd kd"),
    "dpkd_jsd": Config("dpkd", "jsd", "dpkd jsd"),
    "dpkd_dpkd_token": Config("dpkd", "dpkd_token", "dpkd dpkd_token"),
    "dpkd_jsd_lmbda1": Config("dpkd", "jsd", "dpkd jsd, lmbda=1", lmbda=1.0),
    "dpkd_dpkd_cold": Config("dpkd", "dpkd", "dpkd dpkd, cold cache", cache="cold"),
    "dpkd_dpkd_warm": Config("dpkd", "dpkd", "dpkd dpkd, warm cache", cache="warm"),
    # The same two methods with their vocabulary-sized work in token chunks whatever the vocabulary
    # (`chunked_loss_vocab_threshold: 1`; GPT-2's 50257 is below the default 65536).
    "dpkd_jsd_chunked": Config("dpkd", "jsd", "dpkd jsd, chunked", options=(("chunked_loss_vocab_threshold", 1),)),
    # dpkd scores y_t and y_s in groups of the per-device batch by default, each group recomputed in the
    # backward pass (`preference_micro_batch_size`); 0 scores all 2B sequences in one forward.
    "dpkd_dpkd_warm_onepass": Config("dpkd", "dpkd", "dpkd dpkd, warm cache, one scoring pass", cache="warm",
                                     options=(("preference_micro_batch_size", 0),)),
    "dpkd_dpkd_warm_chunked": Config("dpkd", "dpkd", "dpkd dpkd, warm cache, chunked", cache="warm",
                                     options=(("chunked_loss_vocab_threshold", 1),)),
    "trl_gkd_fkl_lmbda0": Config("trl", "gkd", "TRL GKD λ=0 β=0", beta=0.0),
    "trl_gkd_jsd_lmbda0": Config("trl", "gkd", "TRL GKD λ=0 β=0.5"),
    "trl_gkd_jsd_lmbda1": Config("trl", "gkd", "TRL GKD λ=1 β=0.5", lmbda=1.0),
    "trl_distillation": Config("trl", "distillation", "TRL DistillationTrainer β=0.5"),
}

# pair -> its rows, each (dpkd configuration, TRL configuration)
PAIRS = {
    "kd": [("dpkd_kd", "trl_gkd_fkl_lmbda0")],
    "jsd": [("dpkd_jsd", "trl_gkd_jsd_lmbda0"), ("dpkd_jsd_chunked", "trl_gkd_jsd_lmbda0")],
    "dpkd_token": [("dpkd_dpkd_token", "trl_gkd_jsd_lmbda0")],
    "jsd_onpolicy": [("dpkd_jsd_lmbda1", "trl_gkd_jsd_lmbda1")],
    "dpkd_vs_distillation": [("dpkd_dpkd_cold", "trl_distillation"), ("dpkd_dpkd_warm", "trl_distillation"),
                             ("dpkd_dpkd_warm_onepass", "trl_distillation"),
                             ("dpkd_dpkd_warm_chunked", "trl_distillation")],
    "dpkd_memory": [("dpkd_dpkd_warm", "trl_distillation"), ("dpkd_dpkd_warm_onepass", "trl_distillation")],
    "dpkd_vs_gkd": [("dpkd_dpkd_cold", "trl_gkd_jsd_lmbda1"), ("dpkd_dpkd_warm", "trl_gkd_jsd_lmbda1")],
}

REGIONS = ["student sampling", "teacher sampling", "teacher forward", "student forward", "backward",
           "optimizer"]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The child: one configuration


class Regions:
    """Wall time spent in named regions of a step, and on CUDA the peak memory allocated in each. A region
    entered inside another counts toward the outer one: the backbone's forward passes inside `generate` are
    sampling. Memory outside every region (the lm_head projections and the loss, mostly) is `rest`."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = defaultdict(float)
        self.peaks: dict[str, int] = defaultdict(int)  # bytes; the maximum over every step
        self.overall_peak = 0
        self._open: str | None = None

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def take_peak(self, name: str) -> None:
        """Charge the CUDA peak since the last call to `name`, then start a new peak."""
        if self.cuda:
            import torch

            peak = torch.cuda.max_memory_allocated()
            self.peaks[name] = max(self.peaks[name], peak)
            self.overall_peak = max(self.overall_peak, peak)
            torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def region(self, name: str):
        if self._open is not None:
            yield
            return
        self.sync()
        self.take_peak("rest")
        self._open, start = name, time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start
            self.take_peak(name)
            self._open = None

    def wrap(self, name: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            with self.region(name):
                return function(*args, **kwargs)

        return timed


def _instrument_model(model, role: str, regions: Regions, samples: list[dict], eos_token_id: int) -> None:
    """Time `model.generate` (forcing full-length samples) and its backbone's forward, on this instance."""
    generate = model.generate

    def full_length_generate(*args, generation_config=None, **kwargs):
        if generation_config is not None:
            generation_config = copy.copy(generation_config)
            generation_config.min_new_tokens = generation_config.max_new_tokens
        with regions.region(f"{role} sampling"):
            out = generate(*args, generation_config=generation_config, **kwargs)
        prompts = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        new = getattr(out, "sequences", out)[:, prompts.shape[1]:]
        eos = int((new == eos_token_id).sum())
        samples.append({"role": role, "new_tokens": int(new.shape[1]), "eos": eos})
        return out

    model.generate = full_length_generate
    backbone = model.base_model
    backbone.forward = regions.wrap(f"{role} forward", backbone.forward)


def _word_tokenizer(vocab: int):
    """A tokenizer whose token i is the word `t{i}`, so that text and ids map one to one: TRL's
    DistillationTrainer reads text prompts, dpkd and GKD get the same ids already tokenized."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = f"t{vocab - 1}"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos, unk_token="t0")


def _build_model(layers_hidden_heads: tuple[int, int, int], vocab: int, positions: int, dtype, device: str):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    layers, hidden, heads = layers_hidden_heads
    config = GPT2Config(
        vocab_size=vocab, n_positions=max(1024, positions), n_embd=hidden, n_layer=layers, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
    )  # fmt: skip
    torch.manual_seed(1234 + 1000 * layers + hidden)
    with torch.device(device):  # initialised where it runs: seconds, not a minute, for GPT-2 medium
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _random_rows(size: Size, n_rows: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and completions of uniformly random tokens, never the EOS (the last id)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, size.vocab - 1, (n_rows, size.prompt_length), generator=generator)
    completions = torch.randint(0, size.vocab - 1, (n_rows, size.new_tokens), generator=generator)
    return prompts.tolist(), completions.tolist()


def _common_arguments(args: argparse.Namespace, size: Size, total_steps: int, output_dir: str) -> dict:
    """The `TrainingArguments` every side gets (TRL's configs default to gradient checkpointing and bf16)."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=size.batch, gradient_accumulation_steps=1,
        max_steps=total_steps, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0, logging_strategy="no", save_strategy="no",
        report_to=[], disable_tqdm=True, seed=0, data_seed=0, bf16=size.dtype == "bfloat16",
        gradient_checkpointing=False, use_cpu=args.device == "cpu", dataloader_num_workers=0,
        remove_unused_columns=False,
    )  # fmt: skip


def _build_trainer(config: Config, args, size: Size, tokenizer, student, teacher, output_dir: str):
    from datasets import Dataset

    total = args.warmup + args.steps
    prompts, completions = _random_rows(size, total * size.batch)  # one epoch: every step has new prompts
    common = _common_arguments(args, size, total, output_dir)
    if config.side == "dpkd":
        from dpkd.trainer import DistillationConfig, DistillationTrainer

        data = Dataset.from_dict({"prompt_input_ids": prompts, "completion_input_ids": completions})
        training_args = DistillationConfig(
            **common, method=config.trainer, lmbda=config.lmbda, temperature=1.0,  # beta: the method's default
            sampling_temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=size.new_tokens,
            max_prompt_length=size.prompt_length, max_length=size.prompt_length + size.new_tokens,
            teacher_cache_dir=args.cache_dir or os.path.join(output_dir, "teacher_cache"), **dict(config.options),
        )  # fmt: skip
        return DistillationTrainer(model=student, teacher_model=teacher, args=training_args,
                                   train_dataset=data, processing_class=tokenizer)  # fmt: skip
    text = [" ".join(f"t{i}" for i in prompt) for prompt in prompts]
    if config.trainer == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        # Tokenized rows: the collator takes the prompt/completion boundary from `completion_mask`; it reads
        # `prompt` but does not use it when `input_ids` are given.
        data = Dataset.from_dict({
            "prompt": text,
            "input_ids": [p + c for p, c in zip(prompts, completions)],
            "attention_mask": [[1] * (len(p) + len(c)) for p, c in zip(prompts, completions)],
            "completion_mask": [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)],
        })  # fmt: skip
        training_args = GKDConfig(
            **common, lmbda=config.lmbda, beta=config.beta, temperature=1.0, max_new_tokens=size.new_tokens,
            max_length=size.prompt_length + size.new_tokens,
        )  # fmt: skip
        return GKDTrainer(model=student, teacher_model=teacher, args=training_args, train_dataset=data,
                          processing_class=tokenizer)  # fmt: skip
    from trl import DistillationConfig, DistillationTrainer

    if tokenizer(text=text[:1])["input_ids"][0] != prompts[0]:
        raise RuntimeError("the word tokenizer does not give back the prompt's ids")
    training_args = DistillationConfig(
        **common, beta=config.beta, temperature=1.0, top_k=0, top_p=1.0, disable_dropout=True,
        max_completion_length=size.new_tokens,
    )  # fmt: skip
    return DistillationTrainer(model=student, teacher_model=teacher, args=training_args,
                               train_dataset=Dataset.from_dict({"prompt": text}), processing_class=tokenizer)


def run_config(args: argparse.Namespace) -> dict:
    """One configuration, inside the child process: build, train `warmup + steps` steps, measure."""
    import torch
    from transformers import TrainerCallback

    if args.threads:
        torch.set_num_threads(args.threads)
    config, size = CONFIGS[args.config], _size(args)
    cuda = args.device == "cuda"
    dtype = getattr(torch, size.dtype)
    positions = size.prompt_length + size.new_tokens
    tokenizer = _word_tokenizer(size.vocab)
    teacher = _build_model(size.teacher, size.vocab, positions, dtype, args.device)
    student = _build_model(size.student, size.vocab, positions, dtype, args.device)
    regions, samples = Regions(cuda), []
    _instrument_model(student, "student", regions, samples, size.vocab - 1)
    _instrument_model(teacher, "teacher", regions, samples, size.vocab - 1)
    output_dir = tempfile.mkdtemp(prefix="throughput-")
    trainer = _build_trainer(config, args, size, tokenizer, student, teacher, output_dir)
    trainer.accelerator.backward = regions.wrap("backward", trainer.accelerator.backward)
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, training_args, state, control, **kwargs):
            regions.sync()
            regions.seconds.clear()
            self.cpu, self.start = cpu_seconds(), time.perf_counter()

        def on_pre_optimizer_step(self, training_args, state, control, **kwargs):
            regions.sync()
            regions.take_peak("rest")
            self.optimizer_start = time.perf_counter()

        def on_optimizer_step(self, training_args, state, control, **kwargs):
            regions.sync()
            regions.seconds["optimizer"] += time.perf_counter() - self.optimizer_start
            regions.take_peak("optimizer")

        def on_step_end(self, training_args, state, control, **kwargs):
            regions.sync()
            regions.take_peak("rest")
            step = {"seconds": time.perf_counter() - self.start, "cpu_seconds": cpu_seconds() - self.cpu,
                    "regions": dict(regions.seconds)}  # fmt: skip
            # dpkd's own measure of the same thing, as a cross-check of "student/teacher sampling"
            shares = getattr(trainer, "_metrics", {}).get("train", {}).get("generation_time_share")
            if config.side == "dpkd" and shares:
                step["generation_time_share"] = shares[-1]
            steps.append(step)

    trainer.add_callback(StepTimer())
    base = torch.cuda.max_memory_allocated() if cuda else max_rss_bytes()
    trainer.train()
    if cuda:  # the peaks charged to regions were reset as they were taken
        regions.take_peak("rest")
        peak = max(regions.overall_peak, base)
    else:
        peak = max_rss_bytes()
    measured = steps[args.warmup:]
    if not measured:
        raise RuntimeError(f"only {len(steps)} steps ran, none after the {args.warmup} warm-up steps")
    # Shares are of the mean step: a sum of per-region medians need not add up to the median step.
    mean = statistics.fmean(s["seconds"] for s in measured)
    result = {
        "config": args.config, "label": config.label,
        "seconds": statistics.median(s["seconds"] for s in measured), "mean_seconds": mean,
        "all_seconds": [s["seconds"] for s in steps],
        "cpu_seconds": statistics.median(s["cpu_seconds"] for s in measured),
        "regions": {name: statistics.fmean(s["regions"].get(name, 0.0) for s in measured)
                    for name in REGIONS},
        "peak_bytes": peak, "base_bytes": base, "region_peak_bytes": dict(regions.peaks),
        "sampled": sorted({f"{s['role']} {s['new_tokens']}" for s in samples}),
        "eos_sampled": sum(s["eos"] for s in samples), "generate_calls": len(samples),
        "threads": torch.get_num_threads(), "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "gradient_checkpointing": bool(getattr(student, "is_gradient_checkpointing", False)),
    }  # fmt: skip
    if config.cache:
        result["teacher_generations"] = trainer.teacher_generations
    shares = [s["generation_time_share"] for s in measured if "generation_time_share" in s]
    if shares:
        result["generation_time_share"] = statistics.fmean(shares)
    shutil.rmtree(output_dir, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------------
# The parent: one child per configuration, then the tables


def _size(args: argparse.Namespace) -> Size:
    overrides = {name: getattr(args, name) for name in OVERRIDABLE if getattr(args, name) is not None}
    return Size(**{**SIZES[args.size].__dict__, **overrides})


def _run_child(args: argparse.Namespace, name: str, cache_dir: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--config", name, "--size", args.size,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
               "--threads", str(args.threads)]  # fmt: skip
    for flag in OVERRIDABLE:
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if CONFIGS[name].cache:
        command += ["--cache-dir", cache_dir]
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    load_before, started = os.getloadavg()[0], time.perf_counter()
    try:
        finished = subprocess.run(command, capture_output=True, text=True, env=env,
                                  timeout=args.child_timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"config": name, "error": f"timed out after {args.child_timeout:.0f} s"}
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if finished.returncode != 0 or not lines:
        stderr = finished.stderr.strip()
        error = stderr.splitlines()[-1] if stderr else f"exit {finished.returncode}"
        return {"config": name, "error": error[:300]}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["load"] = max(load_before, os.getloadavg()[0])
    result["child_seconds"] = time.perf_counter() - started
    return result


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f}"


def _pair_row(pair: str, ours: dict, theirs: dict, cpu: bool) -> str:
    label = f"{CONFIGS[ours['config']].label} vs {CONFIGS[theirs['config']].label}"
    failed = [f"{r['config']}: {r['error']}" for r in (ours, theirs) if "error" in r]
    if failed:
        return f"| {pair} | {label} | failed: {'; '.join(failed)} |"
    cells = [pair, label, f"{ours['seconds']:.3f}", f"{theirs['seconds']:.3f}",
             f"**{theirs['seconds'] / ours['seconds']:.2f}**"]  # fmt: skip
    if cpu:
        cells.append(f"{theirs['cpu_seconds'] / ours['cpu_seconds']:.2f}")
    cells += [_gib(ours["peak_bytes"]), _gib(theirs["peak_bytes"]),
              f"**{theirs['peak_bytes'] / ours['peak_bytes']:.2f}**",
              f"{max(ours['load'], theirs['load']):.1f}"]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _breakdown_row(result: dict) -> str:
    label = CONFIGS[result["config"]].label
    if "error" in result:
        return f"| {label} | failed: {result['error']} |"
    mean = result["mean_seconds"]
    shares = [f"{100 * result['regions'][name] / mean:.0f}" for name in REGIONS]
    rest = 100 * (mean - sum(result["regions"].values())) / mean
    notes = []
    if "teacher_generations" in result:
        notes.append(f"teacher outputs generated in the run: {result['teacher_generations']}")
    if "generation_time_share" in result:
        notes.append(f"dpkd's generation_time_share: {100 * result['generation_time_share']:.0f} %")
    sampled = ", ".join(result["sampled"]) or "—"
    return (f"| {label} | {result['seconds']:.3f} | " + " | ".join(shares) + f" | {rest:.0f} | {sampled} | "
            f"{result['eos_sampled']} | {'; '.join(notes)} |")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=list(SIZES), default="cpu",
        help="cpu: 6x384 teacher, 2x256 student, batch 8 x 256 tokens; gpt2 (for a GPU): GPT-2 medium "
        "teaching GPT-2 small, batch 16 x 256 tokens, bf16; tiny: a smoke test",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, help="measured optimizer steps (default: tiny 2, cpu 3, gpt2 4)")
    parser.add_argument("--warmup", type=int, help="steps run before measuring (default: 1)")
    parser.add_argument("--only", help=f"comma-separated pairs, of: {', '.join(PAIRS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: GPT-2's 50257; tiny: 1024)")
    parser.add_argument("--batch", type=int, help="prompts per step")
    parser.add_argument("--prompt-length", type=int, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, help="completion tokens: the dataset's and those sampled")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights (bfloat16 also sets bf16)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per child (0: torch's default); 1 is steadier on a loaded "
                        "machine, where two threads made each decoding step several times slower")
    parser.add_argument("--child-timeout", type=float, default=1800.0, help="seconds before killing a child")
    parser.add_argument("--json", help="also write the measurements to this file (after each configuration)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = _size(args)
    args.steps = size.steps if args.steps is None else args.steps
    args.warmup = size.warmup if args.warmup is None else args.warmup
    args.pairs = list(PAIRS) if args.only is None else [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in args.pairs if p not in PAIRS]
    if unknown:
        parser.error(f"--only: unknown pair(s) {', '.join(unknown)}; choose from {', '.join(PAIRS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.child:
        try:
            result = run_config(args)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    needed = list(dict.fromkeys(name for pair in args.pairs for row in PAIRS[pair] for name in row))
    # The warm run reads the teacher outputs the cold run wrote (same teacher, prompts and sampling settings).
    warm = [name for name in needed if CONFIGS[name].cache == "warm"]
    if warm and "dpkd_dpkd_cold" not in needed:
        needed.insert(needed.index(warm[0]), "dpkd_dpkd_cold")
    elif warm and needed.index("dpkd_dpkd_cold") > needed.index(warm[0]):
        needed.remove("dpkd_dpkd_cold")
        needed.insert(needed.index(warm[0]), "dpkd_dpkd_cold")

    import torch
    import transformers
    import trl

    size, cpu = _size(args), args.device == "cpu"
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; device {args.device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}; load average at start "
          f"{os.getloadavg()[0]:.1f}")
    (tl, th, _), (sl, sh, _) = size.teacher, size.student
    autocast = ", bf16 autocast" if size.dtype == "bfloat16" else ""
    print(f"# size {args.size}: GPT-2 teacher {tl} layers x {th}, student {sl} x {sh}, vocabulary "
          f"{size.vocab}, batch {size.batch} x ({size.prompt_length} prompt + {size.new_tokens} completion) "
          f"tokens, {size.dtype} weights{autocast}; median of {args.steps} steps after {args.warmup} warm-up")
    print(f"# sampling: temperature 1, top-k off, top-p 1; exactly {size.new_tokens} new tokens per sample "
          "on every side (min_new_tokens = max_new_tokens on the generation config each trainer passes to "
          "generate)")
    print("# time ratio = TRL s/step ÷ dpkd s/step, memory ratio = TRL peak ÷ dpkd peak: above 1, dpkd is "
          f"faster / smaller; peak: {'RSS high-water' if cpu else 'CUDA max_memory_allocated'} of each "
          "configuration's own process, weights and optimizer state included\n", flush=True)

    started = time.perf_counter()
    cache_dir = tempfile.mkdtemp(prefix="throughput-teacher-cache-")
    results: dict[str, dict] = {}
    try:
        for name in needed:
            results[name] = _run_child(args, name, cache_dir)
            status = results[name].get("error") or f"{results[name]['seconds']:.3f} s/step"
            print(f"# ran {name}: {status}", flush=True)
            if args.json:  # as it goes, so that a run stopped half-way keeps what it measured
                with open(args.json, "w") as handle:
                    record = {"size": size.__dict__, "steps": args.steps, "warmup": args.warmup,
                              "device": args.device, "results": results}  # fmt: skip
                    json.dump(record, handle, indent=1)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    header = ["pair", "dpkd vs TRL", "dpkd s/step", "TRL s/step", "time ratio",
              *(["CPU-time ratio"] if cpu else []), "dpkd peak GiB", "TRL peak GiB", "memory ratio",
              "load"]  # fmt: skip
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for pair in args.pairs:
        for ours, theirs in PAIRS[pair]:
            print(_pair_row(pair, results[ours], results[theirs], cpu))
    print("\nWhere each step goes, % of the mean measured step (`rest`: lm_head projections, loss, batch "
          "building, teacher cache, clipping):\n")
    header = ["configuration", "s/step", *REGIONS, "rest", "sampled (role, tokens)", "EOS sampled", "notes"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in needed:
        print(_breakdown_row(results[name]))
    if not cpu:
        print("\nWhere the CUDA peak is reached: the peak allocated (GiB, weights and optimizer state included) "
              "inside each part of the step, the maximum over all steps; `rest` is outside every timed part "
              "(lm_head projections and loss, mostly):\n")
        parts = [*REGIONS, "rest"]
        print("| configuration | peak GiB | " + " | ".join(parts) + " |\n|" + "---|" * (len(parts) + 2))
        for name in needed:
            result = results[name]
            if "error" not in result:
                peaks = result["region_peak_bytes"]
                print(f"| {CONFIGS[name].label} | {_gib(result['peak_bytes'])} | "
                      + " | ".join(_gib(peaks[p]) if p in peaks else "—" for p in parts) + " |")
    devices = sorted({r["device_name"] for r in results.values() if "device_name" in r})
    elapsed = time.perf_counter() - started
    print(f"\n# {len(needed)} configurations in {elapsed:.0f} s on {', '.join(devices) or args.device}")


if __name__ == "__main__":
    main()
