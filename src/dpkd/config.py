"""The distillation configuration: one row per method (`METHODS`) and one dataclass of knobs.

`DistillationConfig` extends `transformers.TrainingArguments` with the distillation knobs, each with its help
text and its range checked in `__post_init__`. A method is a `MethodSpec`: its family (`dpkd.families`: which
samples it learns from and which term it computes), its token loss and the default weight of its term.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from dpkd.families import PREFERENCE, SUPERVISED, TEACHER_FORCED, TEACHER_SAMPLES, Family
from dpkd.generation import SamplingConfig
from dpkd.suggest import did_you_mean

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# Methods: one row each


@dataclass(frozen=True)
class MethodSpec:
    """What one distillation method trains on and with which loss.

    `family`: a `dpkd.families.Family` (supervised, teacher-forced, teacher samples or preference).
    `token_loss`: key of `dpkd.losses.TOKEN_LOSSES` for teacher-forced methods.
    `kd_ratio`: default weight of the distillation term (1 − kd_ratio weights CE on the dataset responses).
    `loss_options`: the config fields the token loss reads, as keyword arguments.
    """

    family: Family
    token_loss: str | None = None
    kd_ratio: float = 1.0
    loss_options: Callable[[DistillationConfig], dict[str, Any]] = lambda args: {}

    @property
    def needs_teacher(self) -> bool:
        return self.family.needs_teacher


def _temperature(args: DistillationConfig) -> dict[str, Any]:
    return {"temperature": args.temperature}


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec(SUPERVISED, kd_ratio=0.0),
    # The paper's word-level KD baseline: 0.5·CE + 0.5·(−Σ p log q).
    "kd": MethodSpec(TEACHER_FORCED, "kd", 0.5, _temperature),
    "seqkd": MethodSpec(TEACHER_SAMPLES),
    "rkl": MethodSpec(TEACHER_FORCED, "rkl", 1.0, _temperature),
    "jsd": MethodSpec(TEACHER_FORCED, "jsd", 1.0, lambda a: {"beta": a.beta, "temperature": a.temperature}),
    "skl": MethodSpec(TEACHER_FORCED, "skl", 1.0, lambda a: {"alpha": a.skew_alpha, "temperature": a.temperature}),
    "srkl": MethodSpec(TEACHER_FORCED, "srkl", 1.0,
                       lambda a: {"alpha": a.skew_alpha, "temperature": a.temperature}),
    "tvd": MethodSpec(TEACHER_FORCED, "tvd", 1.0, _temperature),
    "dpkd_token": MethodSpec(TEACHER_FORCED, "dpkd_token", 1.0,
                             lambda a: {"beta": a.beta, "label_smoothing": a.label_smoothing,
                                        "loss_type": a.dpkd_loss_type, "dpop_lambda": a.dpop_lambda}),
    "dpkd": MethodSpec(PREFERENCE),
}

DPKD_LOSS_TYPES = ("sigmoid", "ipo", "simpo", "cpo", "dpop")
SFT_TARGETS = ("dataset", "teacher")

# `beta` means what TRL means by it for the same method: GKD's JSD interpolation for jsd, DPO's β otherwise.
DEFAULT_BETA = {"jsd": 0.5}
DEFAULT_PREFERENCE_BETA = 0.1

# ----------------------------------------------------------------------------------------------------
# Configuration

# Ranges of TrainingArguments' own numeric fields, checked (when set) before transformers reads them:
# transformers checks few of them, and some only at the first step. max_steps (-1 or >= 1) and the
# step-or-fraction fields (logging/save/eval/warmup steps) have their own checks in __post_init__.
_NON_NEGATIVE = ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm", "eval_delay",
                 "neftune_noise_alpha")
_COUNTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
           "eval_accumulation_steps", "save_total_limit", "dataloader_prefetch_factor", "torch_empty_cache_steps",
           "ddp_timeout")
TRAINING_RANGES: dict[str, dict[str, Any]] = {
    **dict.fromkeys(_NON_NEGATIVE, {"low": 0.0}),
    **dict.fromkeys(("adam_beta1", "adam_beta2", "label_smoothing_factor"),
                    {"low": 0.0, "high": 1.0, "high_open": True}),
    "num_train_epochs": {"low": 0.0, "low_open": True},
    **dict.fromkeys(_COUNTS, {"low": 1}),
    **dict.fromkeys(("seed", "data_seed", "dataloader_num_workers"), {"low": 0}),
}


@dataclass
class DistillationConfig(TrainingArguments):
    """`TrainingArguments` plus the knobs of distillation. Defaults follow the DPKD paper.

    Fields that transformers defaults badly for distillation are re-declared: `remove_unused_columns`
    (the collator needs the token-id columns), `logging_steps` and `ddp_find_unused_parameters`.
    """

    method: str = field(default="dpkd", metadata={
        "help": f"Distillation method, one of: {', '.join(METHODS)}. `dpkd` is the paper's sequence-level "
                "form (Eq. 9); `dpkd_token` the released code's token-level form."})
    beta: float | None = field(default=None, metadata={
        "help": "β, with TRL's meaning for the method: for jsd the generalized JSD interpolation (0 forward KL, "
                "1 reverse KL; default 0.5, as GKDConfig), in [0, 1]; for dpkd and dpkd_token the preference β of "
                "the implicit reward β·log q/p (default 0.1, as DPOConfig), > 0."})
    dpkd_loss_type: str = field(default="sigmoid", metadata={
        "help": f"Preference loss of dpkd/dpkd_token, one of {', '.join(DPKD_LOSS_TYPES)} (the paper's Table 2)."})
    length_normalize: bool = field(default=True, metadata={
        "help": "dpkd: divide each log-ratio by its response length (the paper's Eq. 9); false gives Eq. 8."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "Label smoothing ε of the preference loss (conservative DPO), in [0, 0.5)."})
    dpop_lambda: float = field(default=50.0, metadata={
        "help": "λ of the DPO-Positive penalty when dpkd_loss_type is `dpop`. Must be >= 0."})
    kd_ratio: float | None = field(default=None, metadata={
        "help": "Weight of the distillation term; 1 − kd_ratio weights cross-entropy on the dataset "
                "responses (or on the teacher's samples: sft_target). Default per method: 0 for sft, 0.5 for "
                "kd (the paper's KD baseline), 1 otherwise. In [0, 1]."})
    lm_coef: float = field(default=0.5, metadata={
        "help": "Weight λ of the pre-training term L_pt (Algorithm 1: cross-entropy; mixed with KD by "
                "pretrain_kd_ratio); used when a pre-training dataset is given. Must be >= 0."})
    # --- DPKD as the paper and its released code train it (issue 11) ---
    disable_dropout: bool = field(default=True, metadata={
        "help": "Turn dropout off in the student and the teacher (every torch.nn.Dropout and every float "
                "`*dropout` attribute of a module set to 0 at trainer init; the saved config is left as it was), "
                "as TRL's preference trainers do: with dropout on, a student identical to its teacher gets "
                "non-zero DPKD rewards."})
    num_student_samples: int = field(default=1, metadata={
        "help": "dpkd: samples y_s drawn from the student per prompt, k; the loss is the mean of the k pairwise "
                "losses (y_t, y_s_j), so the noisy y_s half of the gradient averages down. The k·B draws are one "
                "batched sampling call. Must be >= 1."})
    preference_micro_batch_size: int | None = field(default=None, metadata={
        "help": "dpkd: sequences per student forward when it scores y_t and y_s. The (1 + k)·B sequences are "
                "scored this many at a time, each group recomputed in the backward pass (activation "
                "checkpointing): the step holds one group's activations instead of all of them, for one extra "
                "student forward. Default (None): per_device_train_batch_size, so the peak is about that of a "
                "forward over the batch's B prompts. 0: all at once, no recomputation (fastest, most memory)."})
    sft_target: str = field(default="dataset", metadata={
        "help": "What the CE term of the kd_ratio mixture trains on: `dataset` (the dataset responses) or "
                "`teacher` (the teacher's cached samples y_t, the released code's choice; the y_t the method "
                "already reads, no extra generation). `teacher` needs a method that reads the teacher's samples "
                "(dpkd, seqkd); sft and the teacher-forced methods are refused (for SFT on teacher samples, train "
                "seqkd)."})
    pretrain_kd_ratio: float = field(default=0.0, metadata={
        "help": "r in L_pt = (1 − r)·CE_pt + r·KD_pt on the pre-training chunks, KD_pt the forward-KL soft "
                "cross-entropy −Σ_v p(v) log q(v) against the teacher (the released code's form; it uses r = 0.5). "
                "In [0, 1]; r > 0 needs a method with a teacher and a teacher sharing the student's vocabulary."})
    jsd_beta: float | None = field(default=None, metadata={
        "help": "Deprecated: use `beta` (for method jsd it is the JSD β). Still read for jsd. In [0, 1]."})
    skew_alpha: float = field(default=0.1, metadata={
        "help": "α of skew KL / skew reverse KL (skl, srkl), as in DistiLLM. In [0, 1]."})
    temperature: float = field(default=1.0, metadata={
        "help": "Softmax temperature of the teacher-forced divergences. Must be > 0."})
    lmbda: float = field(default=0.0, metadata={
        "help": "Teacher-forced methods: share of batches trained on student samples instead of the dataset "
                "responses (GKD's on-policy λ). In [0, 1]."})
    max_new_tokens: int = field(default=256, metadata={
        "help": "Longest response sampled from the student or the teacher, in tokens. Must be >= 1."})
    max_completion_length: int | None = field(default=None, metadata={
        "help": "TRL's name for max_new_tokens (GKDConfig); when given, max_new_tokens takes its value."})
    sampling_temperature: float = field(default=1.0, metadata={
        "help": "Temperature for sampling y_s and y_t (the paper samples at 1). Must be > 0."})
    top_k: int = field(default=0, metadata={"help": "Top-k for sampling; 0 turns it off. Must be >= 0."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus top-p for sampling, in (0, 1]."})
    max_prompt_length: int = field(default=256, metadata={
        "help": "Prompts longer than this many tokens are handled by `prompt_truncation`. Must be >= 1."})
    max_length: int = field(default=512, metadata={
        "help": "Longest prompt + response, in tokens; responses are cut to fit. Also the length of "
                "pre-training chunks. Must be > max_prompt_length."})
    prompt_truncation: str = field(default="drop", metadata={
        "help": "What to do with prompts over max_prompt_length: `drop` the example or `left` (keep "
                "their last tokens), as `dpkd.data.tokenize_dataset` does."})
    template: str = field(default="auto", metadata={
        "help": "Prompt template for instruction data: `auto` (per format), `alpaca`, `chat`, `none`, or a "
                "string with {instruction} and {input} (see `dpkd.data.load_instruction_data`)."})
    teacher_cache_dir: str | None = field(default=None, metadata={
        "help": "Folder of the teacher-output cache (y_t with log p(y_t)); default <output_dir>/teacher_cache. "
                "Point several runs at one folder to generate the teacher's outputs once."})
    resample_teacher_each_epoch: bool = field(default=False, metadata={
        "help": "Draw fresh teacher outputs every epoch instead of reusing the first epoch's."})
    teacher_device: str | None = field(default=None, metadata={
        "help": "Device of the teacher (e.g. `cuda:1`, `cpu`); default: the student's device."})
    chunked_loss_vocab_threshold: int = field(default=65536, metadata={
        "help": "Above this vocabulary size the losses run in token chunks from hidden states "
                "(`dpkd.losses` chunked forms) instead of building all loss-bearing logits at once. >= 1."})
    chunked_loss_recompute: bool = field(default=False, metadata={
        "help": "Chunked token losses: recompute each chunk's logits in the backward pass (activation "
                "checkpointing, least memory) instead of keeping each chunk's gradient from the forward pass "
                "(about as fast as dense, in a fraction of its memory; see docs/benchmarks.md)."})
    skip_nonfinite: bool = field(default=False, metadata={
        "help": "Skip an optimizer step whose loss or gradient norm is not finite (no update; counted as "
                "`nonfinite_skipped` in the logs) instead of stopping training with an error."})
    log_completions: bool = field(default=False, metadata={
        "help": "At every logging step, log a few of the last batch's prompts with the completions the step sampled "
                "(the student's y_s; the teacher's y_t for methods that read them), as TRL's log_completions: a "
                "line per step in <output_dir>/completions.jsonl, a table for wandb, and INFO lines through the "
                "`dpkd.trainer` logger. Nothing is generated for it: a step that sampled nothing logs nothing."})
    num_completions_to_print: int | None = field(default=None, metadata={
        "help": "log_completions: how many (prompt, completion) rows to log per logging step, one row per student "
                "sample; None logs every row of the last batch (TRL's name and default). Must be >= 1."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "`dpkd train` into an output_dir that holds a different run (another method, models, data or "
                "settings than its `dpkd_settings.json` records): remove that run's checkpoints and train anew. "
                "Off: such a folder is refused, so two runs never mix."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Kept False: the collator reads the token-id columns, not the model's forward arguments."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "Every trainable parameter takes part in each step's loss, so DDP need not search for unused ones."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}"
                             f"{did_you_mean(self.method, METHODS, n=1)}")
        if self.dpkd_loss_type not in DPKD_LOSS_TYPES:
            raise ValueError(f"dpkd_loss_type: expected one of {', '.join(DPKD_LOSS_TYPES)}, "
                             f"got {self.dpkd_loss_type!r}")
        if self.prompt_truncation not in ("drop", "left"):
            raise ValueError(f"prompt_truncation: expected 'drop' or 'left', got {self.prompt_truncation!r}")
        self._resolve_aliases()
        if self.method == "jsd":
            _check_range("beta", self.beta, low=0.0, high=1.0, note="(method jsd: the JSD interpolation)")
        else:
            _check_range("beta", self.beta, low=0.0, low_open=True)
        _check_range("label_smoothing", self.label_smoothing, low=0.0, high=0.5, high_open=True)
        _check_range("dpop_lambda", self.dpop_lambda, low=0.0)
        if self.kd_ratio is not None:
            _check_range("kd_ratio", self.kd_ratio, low=0.0, high=1.0)
        _check_range("lm_coef", self.lm_coef, low=0.0)
        self._check_protocol_fields()
        _check_range("skew_alpha", self.skew_alpha, low=0.0, high=1.0)
        _check_range("temperature", self.temperature, low=0.0, low_open=True)
        _check_range("lmbda", self.lmbda, low=0.0, high=1.0)
        _check_range("max_new_tokens", self.max_new_tokens, low=1)
        _check_range("sampling_temperature", self.sampling_temperature, low=0.0, low_open=True)
        _check_range("top_k", self.top_k, low=0)
        _check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_range("max_prompt_length", self.max_prompt_length, low=1)
        _check_range("chunked_loss_vocab_threshold", self.chunked_loss_vocab_threshold, low=1)
        if self.num_completions_to_print is not None:
            _check_range("num_completions_to_print", self.num_completions_to_print, low=1)
        for name, limits in TRAINING_RANGES.items():
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), **limits)
        for name in ("logging_steps", "save_steps", "eval_steps", "warmup_steps"):
            _check_steps(name, getattr(self, name), zero_ok=name == "warmup_steps")
        if self.max_steps != -1:
            _check_range("max_steps", self.max_steps, low=1, note="or -1 to train for num_train_epochs")
        if self.max_length <= self.max_prompt_length:
            raise ValueError(f"max_length: must be greater than max_prompt_length ({self.max_prompt_length}), "
                             f"got {self.max_length}")
        if not self.use_cpu and _several_processes_launched() and not _accelerator_available():
            # accelerate counts CPU processes as one distributed run only when asked for the CPU; without
            # this, each process of `torchrun`/`accelerate launch` would train alone on the whole data.
            logger.info("%d processes launched and no accelerator: use_cpu=True, so they train as one DDP run",
                        int(os.environ["WORLD_SIZE"]))
            self.use_cpu = True
        super().__post_init__()

    def _check_protocol_fields(self) -> None:
        """disable_dropout, num_student_samples, preference_micro_batch_size, sft_target and pretrain_kd_ratio:
        types, ranges, and the methods they make sense for."""
        if not isinstance(self.disable_dropout, bool):
            raise ValueError(f"disable_dropout: expected true or false, got {self.disable_dropout!r}")
        if isinstance(self.num_student_samples, float) and self.num_student_samples.is_integer():
            self.num_student_samples = int(self.num_student_samples)
        if not isinstance(self.num_student_samples, int):
            raise ValueError(f"num_student_samples: expected a whole number >= 1, got {self.num_student_samples!r}")
        _check_range("num_student_samples", self.num_student_samples, low=1)
        size = self.preference_micro_batch_size
        if isinstance(size, float) and size.is_integer():
            size = self.preference_micro_batch_size = int(size)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"preference_micro_batch_size: expected a whole number >= 0 (0: score every sequence in "
                             f"one forward) or null (the per-device batch size), got {size!r}")
        if self.sft_target not in SFT_TARGETS:
            raise ValueError(f"sft_target: expected one of {', '.join(SFT_TARGETS)}, got {self.sft_target!r}"
                             f"{did_you_mean(str(self.sft_target), SFT_TARGETS, n=1)}")
        family = METHODS[self.method].family
        if self.sft_target == "teacher" and not family.reads_teacher_cache:
            readers = ", ".join(name for name, spec in METHODS.items() if spec.family.reads_teacher_cache)
            raise ValueError(f"sft_target: 'teacher' trains the CE term on the teacher's cached samples, which only "
                             f"methods that read them have ({readers}); method {self.method!r} does not (for SFT "
                             "on the teacher's samples train seqkd), so use sft_target 'dataset'")
        _check_range("pretrain_kd_ratio", self.pretrain_kd_ratio, low=0.0, high=1.0)
        if self.pretrain_kd_ratio > 0 and not family.needs_teacher:
            raise ValueError(f"pretrain_kd_ratio: must be 0 for method {self.method!r}, which has no teacher to "
                             f"distil from on the pre-training chunks, got {self.pretrain_kd_ratio!r}")

    def _resolve_aliases(self) -> None:
        """`beta`'s per-method default, and the old or TRL names of fields (`jsd_beta`, `max_completion_length`)."""
        if self.jsd_beta is not None:
            _check_range("jsd_beta", self.jsd_beta, low=0.0, high=1.0)
            warnings.warn("jsd_beta is deprecated: for method jsd, `beta` is the JSD β (as in TRL's GKDConfig); "
                          "write beta instead", FutureWarning, stacklevel=3)
            if self.method == "jsd":
                if self.beta is not None and self.beta != self.jsd_beta:
                    raise ValueError(f"beta: {self.beta!r} and its deprecated alias jsd_beta {self.jsd_beta!r} "
                                     "differ; give beta alone")
                self.beta = self.jsd_beta
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.method, DEFAULT_PREFERENCE_BETA)
        if self.max_completion_length is not None:
            _check_range("max_completion_length", self.max_completion_length, low=1)
            default = type(self).__dataclass_fields__["max_new_tokens"].default
            if self.max_new_tokens not in (default, self.max_completion_length):
                raise ValueError(f"max_completion_length: {self.max_completion_length!r} and max_new_tokens "
                                 f"{self.max_new_tokens!r} name the same length and differ; give one")
            self.max_new_tokens = self.max_completion_length

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def effective_kd_ratio(self) -> float:
        # A family without a teacher has no distillation term: its ratio stays the method's (0, all CE).
        return self.spec.kd_ratio if self.kd_ratio is None or not self.spec.family.needs_teacher else self.kd_ratio

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, do_sample=True,
                              temperature=self.sampling_temperature, top_k=self.top_k, top_p=self.top_p)


def _several_processes_launched() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def _check_range(name: str, value: float, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or (isinstance(value, float) and math.isnan(value)):
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name}: must be in {lo}, {hi}{' ' + note if note else ''}, got {value!r}")


def _check_steps(name: str, value: float | None, *, zero_ok: bool = False) -> None:
    """A count of optimizer steps (a whole number >= 1) or, below 1, a fraction of the run (transformers' rule)."""
    if value is None or (zero_ok and value == 0):
        return
    _check_range(name, value, low=0.0, low_open=True)
    if value > 1 and value != int(value):
        raise ValueError(f"{name}: must be a whole number of steps, or a fraction of the run in (0, 1), got {value!r}")
