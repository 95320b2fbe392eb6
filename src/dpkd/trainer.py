"""The distillation trainer: which tensors go into which loss, one training step at a time.

`DistillationConfig` extends `transformers.TrainingArguments` with the distillation knobs;
`DistillationTrainer` extends `transformers.Trainer` with a frozen teacher and overrides only
`compute_loss` (the step), `training_step` (to time generation), `prediction_step` and `log`.

Every method is one row of `METHODS`: which completions it learns from, which loss it applies and how
the terms are weighted. The training loss is always

    L = kd_ratio · L_distill + (1 − kd_ratio) · CE(dataset responses) + lm_coef · CE(pretraining chunks)

where L_distill is, per family:
- `teacher_forced` (kd, rkl, jsd, skl, srkl, tvd, dpkd_token): a per-token loss from `dpkd.losses` between
  student and teacher on the dataset responses (or, on a share `lmbda` of the batches, on student samples,
  as in GKD);
- `teacher_samples` (seqkd): cross-entropy on the teacher's sampled responses y_t;
- `preference` (dpkd, the paper's Eq. 9): the student samples y_s, y_t comes from the teacher-output cache,
  and `dpkd_sequence_loss(log q(y_t), log q(y_s), log p(y_t), log p(y_s), β, |y_t|, |y_s|)`;
- none (sft): kd_ratio is 0, the loss is plain cross-entropy on the dataset responses.

Full-vocabulary logits are never built for the whole sequence: the model returns its final hidden states,
the loss-bearing positions are selected, and only they go through the `lm_head`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import random
import sys
import time
import typing
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer, TrainingArguments

from dpkd import losses
from dpkd.generation import SamplingConfig, build_scoring_batch, sample_completions, score_sequences

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------------
# Methods: one row each


@dataclass(frozen=True)
class MethodSpec:
    """What one distillation method trains on and with which loss.

    `family`: `supervised` (no teacher), `teacher_forced`, `teacher_samples` or `preference` (see module doc).
    `token_loss`: key of `dpkd.losses.TOKEN_LOSSES` for `teacher_forced` methods.
    `kd_ratio`: default weight of the distillation term (1 − kd_ratio weights CE on the dataset responses).
    `loss_options`: the config fields the token loss reads, as keyword arguments.
    """

    family: str
    token_loss: str | None = None
    kd_ratio: float = 1.0
    loss_options: Callable[[DistillationConfig], dict[str, Any]] = lambda args: {}

    @property
    def needs_teacher(self) -> bool:
        return self.family != "supervised"


def _temperature(args: DistillationConfig) -> dict[str, Any]:
    return {"temperature": args.temperature}


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec("supervised", kd_ratio=0.0),
    # The paper's word-level KD baseline: 0.5·CE + 0.5·(−Σ p log q).
    "kd": MethodSpec("teacher_forced", "kd", 0.5, _temperature),
    "seqkd": MethodSpec("teacher_samples"),
    "rkl": MethodSpec("teacher_forced", "rkl", 1.0, _temperature),
    "jsd": MethodSpec("teacher_forced", "jsd", 1.0, lambda a: {"beta": a.jsd_beta, "temperature": a.temperature}),
    "skl": MethodSpec("teacher_forced", "skl", 1.0, lambda a: {"alpha": a.skew_alpha, "temperature": a.temperature}),
    "srkl": MethodSpec("teacher_forced", "srkl", 1.0,
                       lambda a: {"alpha": a.skew_alpha, "temperature": a.temperature}),
    "tvd": MethodSpec("teacher_forced", "tvd", 1.0, _temperature),
    "dpkd_token": MethodSpec("teacher_forced", "dpkd_token", 1.0,
                             lambda a: {"beta": a.beta, "label_smoothing": a.label_smoothing,
                                        "loss_type": a.dpkd_loss_type, "dpop_lambda": a.dpop_lambda}),
    "dpkd": MethodSpec("preference"),
}

DPKD_LOSS_TYPES = ("sigmoid", "ipo", "simpo", "cpo", "dpop")

# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DistillationConfig(TrainingArguments):
    """`TrainingArguments` plus the knobs of distillation. Defaults follow the DPKD paper.

    Fields that transformers defaults badly for distillation are re-declared: `remove_unused_columns`
    (the collator needs the token-id columns), `logging_steps` and `ddp_find_unused_parameters`.
    """

    method: str = field(default="dpkd", metadata={
        "help": f"Distillation method, one of: {', '.join(METHODS)}. `dpkd` is the paper's sequence-level "
                "form (Eq. 9); `dpkd_token` the released code's token-level form."})
    beta: float = field(default=0.1, metadata={
        "help": "β of DPKD: the implicit reward is β·log q/p (dpkd and dpkd_token). Must be > 0."})
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
                "responses. Default per method: 0 for sft, 0.5 for kd (the paper's KD baseline), 1 otherwise. "
                "In [0, 1]."})
    lm_coef: float = field(default=0.5, metadata={
        "help": "Weight λ of the pre-training cross-entropy L_pt (Algorithm 1); used when a pre-training "
                "dataset is given. Must be >= 0."})
    jsd_beta: float = field(default=0.5, metadata={
        "help": "β of the generalized JSD (jsd): 0 is forward KL, 1 reverse KL, as in GKD. In [0, 1]."})
    skew_alpha: float = field(default=0.1, metadata={
        "help": "α of skew KL / skew reverse KL (skl, srkl), as in DistiLLM. In [0, 1]."})
    temperature: float = field(default=1.0, metadata={
        "help": "Softmax temperature of the teacher-forced divergences. Must be > 0."})
    lmbda: float = field(default=0.0, metadata={
        "help": "Teacher-forced methods: share of batches trained on student samples instead of the dataset "
                "responses (GKD's on-policy λ). In [0, 1]."})
    max_new_tokens: int = field(default=256, metadata={
        "help": "Longest response sampled from the student or the teacher, in tokens. Must be >= 1."})
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
                "(about as fast as dense, 7% of its memory at V=150k; see docs/benchmarks.md)."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Kept False: the collator reads the token-id columns, not the model's forward arguments."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "Every trainable parameter takes part in each step's loss, so DDP need not search for unused ones."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            close = difflib.get_close_matches(str(self.method), METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}{hint}")
        if self.dpkd_loss_type not in DPKD_LOSS_TYPES:
            raise ValueError(f"dpkd_loss_type: expected one of {', '.join(DPKD_LOSS_TYPES)}, "
                             f"got {self.dpkd_loss_type!r}")
        if self.prompt_truncation not in ("drop", "left"):
            raise ValueError(f"prompt_truncation: expected 'drop' or 'left', got {self.prompt_truncation!r}")
        _check_range("beta", self.beta, low=0.0, low_open=True)
        _check_range("label_smoothing", self.label_smoothing, low=0.0, high=0.5, high_open=True)
        _check_range("dpop_lambda", self.dpop_lambda, low=0.0)
        if self.kd_ratio is not None:
            _check_range("kd_ratio", self.kd_ratio, low=0.0, high=1.0)
        _check_range("lm_coef", self.lm_coef, low=0.0)
        _check_range("jsd_beta", self.jsd_beta, low=0.0, high=1.0)
        _check_range("skew_alpha", self.skew_alpha, low=0.0, high=1.0)
        _check_range("temperature", self.temperature, low=0.0, low_open=True)
        _check_range("lmbda", self.lmbda, low=0.0, high=1.0)
        _check_range("max_new_tokens", self.max_new_tokens, low=1)
        _check_range("sampling_temperature", self.sampling_temperature, low=0.0, low_open=True)
        _check_range("top_k", self.top_k, low=0)
        _check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_range("max_prompt_length", self.max_prompt_length, low=1)
        _check_range("chunked_loss_vocab_threshold", self.chunked_loss_vocab_threshold, low=1)
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

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def effective_kd_ratio(self) -> float:
        return self.spec.kd_ratio if self.kd_ratio is None or self.method == "sft" else self.kd_ratio

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
                 low_open: bool = False, high_open: bool = False) -> None:
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or (isinstance(value, float) and math.isnan(value)):
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name}: must be in {lo}, {hi}, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# Model helpers: hidden states at loss-bearing positions, and running a function inside a DDP/FSDP wrapper


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the `lm_head` (looking through a peft wrapper, whose adapters live inside it)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model.base_model


def _final_hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last-layer hidden states (B, L, H), after the final norm; no logits are computed.

    The backbone is called rather than the model so that no position goes through the `lm_head`: the
    caller projects only the loss-bearing positions.
    """
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    return _backbone(model)(**kwargs).last_hidden_state


# Config fields of models whose logits are not `lm_head(hidden)`; the hidden-state path would ignore them.
_LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _check_plain_lm_head(model: torch.nn.Module, name: str) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field_name in _LOGIT_TRANSFORM_FIELDS:
        if getattr(config, field_name, None) not in (None, 1, 1.0):
            raise ValueError(f"{name}: its config sets {field_name}={getattr(config, field_name)!r}; the trainer "
                             "projects hidden states with the lm_head alone and does not apply that transform")


@dataclass
class _Positions:
    """The loss-bearing positions of a batch: hidden states at position i predict labels[i + 1]."""

    hidden: torch.Tensor   # (N, H)
    targets: torch.Tensor  # (N,)
    rows: torch.Tensor     # (N,) which sequence of the batch each token belongs to


def _select_positions(hidden: torch.Tensor, labels: torch.Tensor) -> _Positions:
    """Hidden states (B, L, H) and unshifted labels (B, L) → the N positions that predict a label."""
    return _select_positions_shifted(hidden[:, :-1], labels[:, 1:])


def _select_positions_shifted(hidden: torch.Tensor, labels: torch.Tensor) -> _Positions:
    valid = labels != IGNORE_INDEX
    return _Positions(hidden[valid], labels[valid], valid.nonzero()[:, 0])


def _is_fsdp2(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _run_in_wrapper(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Callable, *args):
    """Call `fn(*args)` as the forward of `wrapper` (DDP, FSDP), so the wrapper does its forward-time work
    (gradient-sync bookkeeping, gathering sharded parameters) around everything `fn` touches, including
    the `lm_head` applied outside the model's own forward. `fn` must call the backbone, not `module`
    itself (a nested root call would reshard FSDP parameters on its way out)."""
    if wrapper is module and not _is_fsdp2(module):
        return fn(*args)
    original_forward = module.forward

    def redirected(*_args, **_kwargs):
        module.forward = original_forward
        return fn(*args)

    module.forward = redirected
    try:
        return wrapper()
    finally:
        module.forward = original_forward


def _sequence_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *,
                    chunked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log q(labels[i + 1] | ...) per sequence over labelled tokens, and their counts: (B,), (B,).

    Only the labelled positions are projected; log-softmax in float32. `chunked` projects them a chunk at a
    time under activation checkpointing (`dpkd.losses.chunked_sequence_logps`), for large vocabularies.
    """
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    if chunked:
        return losses.chunked_sequence_logps(hidden, lm_head.weight, labels, bias=lm_head.bias)
    positions = _select_positions_shifted(hidden, labels)
    logits = lm_head(positions.hidden).float()
    token_logps = logits.gather(-1, positions.targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    sums = token_logps.new_zeros(labels.shape[0]).index_add(0, positions.rows, token_logps)
    return sums, (labels != IGNORE_INDEX).sum(1)


def _concat_completions(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor],
                        pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack two (ids, mask) completion batches along the batch axis, right-padding to one width."""
    width = max(first[0].shape[1], second[0].shape[1])
    ids = [F.pad(t, (0, width - t.shape[1]), value=pad_token_id) for t in (first[0], second[0])]
    masks = [F.pad(m, (0, width - m.shape[1]), value=0) for m in (first[1], second[1])]
    return torch.cat(ids), torch.cat(masks)


# ----------------------------------------------------------------------------------------------------
# The trainer


class DistillationTrainer(Trainer):
    """`transformers.Trainer` that distils `teacher_model` into `model` with the method in `args.method`.

    Mirrors TRL's trainers: `DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
    train_dataset=ds, eval_dataset=..., processing_class=tokenizer)`. `ds` is a `datasets.Dataset` in any
    format `dpkd.data` reads (`prompt`/`completion`, `instruction`/`input`/`output`, ...) or already
    tokenized (`prompt_input_ids`/`completion_input_ids`). `pretrain_dataset` (fixed-length `input_ids`, from
    `dpkd.data.load_pretrain_chunks`) adds `lm_coef · L_pt`. `model` and `teacher_model` may be paths.
    """

    # compute_loss scales every term for gradient accumulation and data parallelism itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | str | None = None,
        teacher_model: PreTrainedModel | str | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        pretrain_dataset=None,
        callbacks=None,
        optimizers=(None, None),
        **kwargs,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from dpkd.data import DistillationCollator

        if args is None:
            raise ValueError("args: a DistillationConfig is required (it names the output_dir and the method)")
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args: expected a DistillationConfig, got {type(args).__name__}")
        spec = args.spec
        if spec.needs_teacher and teacher_model is None:
            raise ValueError(f"teacher_model: method {args.method!r} needs a teacher")
        if not spec.needs_teacher:
            teacher_model = None  # sft: a teacher would only take memory
        if isinstance(model, str):
            processing_class = processing_class or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model)
        if isinstance(teacher_model, str):
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model)
        if processing_class is None:
            raise ValueError("processing_class: a tokenizer is required to tokenize the dataset")
        if teacher_model is not None and spec.family == "teacher_forced":
            _check_vocabularies_match(teacher_model, model)
        _check_plain_lm_head(model, "model")
        if teacher_model is not None and spec.family == "teacher_forced":
            _check_plain_lm_head(teacher_model, "teacher_model")

        self.eos_token_id = processing_class.eos_token_id
        self.pad_token_id = processing_class.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        train_dataset = _prepare_dataset(train_dataset, processing_class, args, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: _prepare_dataset(v, processing_class, args, f"eval_dataset[{k!r}]")
                            for k, v in eval_dataset.items()}
        else:
            eval_dataset = _prepare_dataset(eval_dataset, processing_class, args, "eval_dataset")
        if data_collator is None:
            data_collator = DistillationCollator(self.pad_token_id, max_length=args.max_length)

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, **kwargs)

        self.kd_ratio = args.effective_kd_ratio
        self.teacher_cache = None
        if spec.family in ("teacher_samples", "preference"):
            # The cache is keyed by the teacher's fingerprint, taken on the whole model before any sharding.
            self.teacher_cache = self._build_teacher_cache(teacher_model)
        self.teacher_model = self._prepare_teacher(teacher_model) if teacher_model is not None else None
        self.teacher_generations = 0  # teacher outputs generated (not read from the cache) by this trainer
        self.pretrain_dataset = pretrain_dataset
        self._pretrain_order = None
        if pretrain_dataset is not None:
            if "input_ids" not in pretrain_dataset.column_names:
                raise ValueError("pretrain_dataset: needs an `input_ids` column (see dpkd.data.load_pretrain_chunks)")
            order = torch.randperm(len(pretrain_dataset), generator=torch.Generator().manual_seed(args.seed))
            self._pretrain_order = order.tolist()
        self._metrics: dict[str, defaultdict[str, list[float]]] = {"train": defaultdict(list),
                                                                  "eval": defaultdict(list)}
        self._generation_seconds = 0.0
        self._micro_step = 0

    # --- setup -------------------------------------------------------------------------------------

    def _prepare_teacher(self, teacher: PreTrainedModel) -> torch.nn.Module:
        """Freeze the teacher and place it for inference under the accelerator's distribution scheme
        (`dpkd.modeling.prepare_teacher`), or on `teacher_device` when one is given."""
        from dpkd.modeling import prepare_teacher

        if self.args.teacher_device is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            return teacher.to(self.args.teacher_device)
        return prepare_teacher(teacher, self.accelerator)

    def _build_teacher_cache(self, teacher: PreTrainedModel):
        from dpkd.generation import TeacherOutputCache, model_fingerprint

        cache_dir = self.args.teacher_cache_dir or os.path.join(self.args.output_dir, "teacher_cache")
        return TeacherOutputCache(cache_dir, teacher_id=model_fingerprint(teacher), sampling=self.args.sampling())

    def _set_signature_columns_if_needed(self) -> None:
        # The collator reads these; with remove_unused_columns=True everything else is dropped.
        if self._signature_columns is None:
            self._signature_columns = ["prompt_input_ids", "completion_input_ids"]

    # --- the step ----------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        started = time.perf_counter()
        self._generation_seconds = 0.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        elapsed = time.perf_counter() - started
        self._metrics["train"]["generation_time_share"].append(self._generation_seconds / max(elapsed, 1e-9))
        self._micro_step += 1
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """L = kd_ratio·L_distill + (1 − kd_ratio)·CE + lm_coef·L_pt, each term scaled so that micro-batches,
        gradient accumulation and data-parallel ranks add up to one mean over the optimizer step."""
        mode = "train" if model.training else "eval"
        if mode == "eval":
            num_items_in_batch = None
        student = self.accelerator.unwrap_model(model)
        spec = self.args.spec
        terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (scaled term, logged mean)
        metrics: dict[str, torch.Tensor] = {}

        distill_batch = None  # sequences the distillation loss reads, when not the dataset's
        if spec.family == "teacher_forced" and mode == "train" and self._on_policy_this_step():
            distill_batch = self._student_sample_batch(student, inputs, metrics)
        elif spec.family == "teacher_samples":
            distill_batch = self._teacher_sample_batch(inputs, metrics)
        elif spec.family == "preference":
            preference = self._preference_inputs(student, inputs, metrics)

        def student_side():
            out = {}
            needs_ce = self.kd_ratio < 1.0
            if spec.family == "teacher_forced" and distill_batch is None:
                out.update(self._teacher_forced_terms(student, inputs, num_items_in_batch, with_ce=needs_ce))
            else:
                if needs_ce:
                    out["ce"] = self._cross_entropy_term(student, inputs, num_items_in_batch)
                if spec.family == "teacher_forced":
                    out["distill"] = self._teacher_forced_terms(student, distill_batch, None, with_ce=False)["distill"]
                elif spec.family == "teacher_samples":
                    out["distill"] = self._cross_entropy_term(student, distill_batch, None)
                elif spec.family == "preference":
                    out["distill"] = self._preference_term(student, preference, metrics)
            if self.pretrain_dataset is not None and self.args.lm_coef > 0 and mode == "train":
                out["pt"] = self._cross_entropy_term(student, self._pretrain_batch(), None)
            return out

        terms = _run_in_wrapper(model, student, student_side)
        loss = sum(
            weight * terms[name][0]
            for name, weight in (("distill", self.kd_ratio), ("ce", 1.0 - self.kd_ratio), ("pt", self.args.lm_coef))
            if name in terms
        )
        for name, (_, logged) in terms.items():
            metrics[f"loss/{name}"] = logged
        self._record(mode, metrics)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # --- loss terms ---------------------------------------------------------------------------------

    def _token_scale(self, n_tokens: int, num_items_in_batch) -> float:
        """Divisor for a token-summed loss so that the optimizer step sees one token mean.

        With `num_items_in_batch` (the Trainer's count over the accumulated micro-batches, gathered over
        ranks when `average_tokens_across_devices`), the divisor makes DDP's gradient average equal the
        global token mean; without it, each micro-batch is a token mean divided by the accumulation steps.
        """
        if num_items_in_batch is not None:
            count = float(num_items_in_batch)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                count /= self.accelerator.num_processes
            return max(count, 1.0)
        return max(n_tokens, 1) * self._accumulation_steps()

    def _accumulation_steps(self) -> int:
        if not self.model.training:  # evaluation reports plain per-batch means
            return 1
        return int(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps))

    def _chunked(self, lm_head: torch.nn.Module) -> bool:
        return lm_head.weight.shape[0] > self.args.chunked_loss_vocab_threshold

    def _cross_entropy_term(self, student, batch, num_items_in_batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy on the labelled tokens of `batch`: (scaled term, token mean)."""
        head = student.get_output_embeddings()
        sums, counts = _sequence_logps(head, _final_hidden_states(student, batch), batch["labels"],
                                       chunked=self._chunked(head))
        n = int(counts.sum())
        token_sum = -sums.sum()
        return token_sum / self._token_scale(n, num_items_in_batch), token_sum.detach() / max(n, 1)

    def _teacher_forced_terms(self, student, batch, num_items_in_batch, *, with_ce: bool):
        """The method's token loss between student and teacher on `batch`'s labelled tokens, and CE there.

        Both models' final hidden states are taken at the labelled positions only; the `lm_head`s project
        just those (in chunks above `chunked_loss_vocab_threshold`).
        """
        spec = self.args.spec
        token_loss = losses.TOKEN_LOSSES[spec.token_loss]
        options = spec.loss_options(self.args)
        positions = _select_positions(_final_hidden_states(student, batch), batch["labels"])
        n = positions.targets.numel()
        scale = self._token_scale(n, num_items_in_batch)
        student_head = student.get_output_embeddings()
        targets = positions.targets[None]
        ce_sum = None
        chunked = self._chunked(student_head)
        teacher_out = self._teacher_at_positions(batch, logits=not chunked).to(positions.hidden.device)
        if chunked:
            from dpkd.generation import unwrap_for_generation

            teacher_head = unwrap_for_generation(self.teacher_model).get_output_embeddings()
            teacher_hidden = teacher_out
            device = positions.hidden.device
            teacher_bias = None if teacher_head.bias is None else teacher_head.bias.to(device)
            token_sum = losses.chunked_token_loss(
                token_loss, positions.hidden[None], student_head.weight, teacher_hidden[None],
                teacher_head.weight.to(device), targets, student_bias=student_head.bias, teacher_bias=teacher_bias,
                num_items_in_batch=1, recompute=self.args.chunked_loss_recompute, **options,
            )
            if with_ce:
                ce_sum = -losses.chunked_sequence_logps(positions.hidden[None], student_head.weight, targets,
                                                        bias=student_head.bias)[0].sum()
        else:
            student_logits = student_head(positions.hidden)
            teacher_logits = teacher_out
            token_sum = token_loss(student_logits[None], teacher_logits[None], targets, reduction="sum", **options)
            if with_ce:
                ce_sum = F.cross_entropy(student_logits.float(), positions.targets, reduction="sum")
        out = {"distill": (token_sum / scale, token_sum.detach() / max(n, 1))}
        if ce_sum is not None:
            out["ce"] = (ce_sum / scale, ce_sum.detach() / max(n, 1))
        return out

    def _teacher_at_positions(self, batch, *, logits: bool) -> torch.Tensor:
        """The frozen teacher at the batch's labelled positions: its logits (N, V), or its final hidden
        states (N, H_t) for the chunked losses. Run inside the teacher's wrapper, under inference mode."""
        from dpkd.generation import unwrap_for_generation

        wrapper = self.teacher_model
        teacher = unwrap_for_generation(wrapper)
        device = teacher.get_input_embeddings().weight.device
        teacher_batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

        def teacher_side() -> torch.Tensor:
            with torch.inference_mode():
                hidden = _select_positions(_final_hidden_states(teacher, teacher_batch), teacher_batch["labels"]).hidden
                return teacher.get_output_embeddings()(hidden) if logits else hidden

        # A clone outside inference mode is an ordinary tensor that autograd may save for the student's backward.
        return _run_in_wrapper(wrapper, teacher, teacher_side).clone()

    def _preference_inputs(self, student, inputs, metrics) -> dict[str, torch.Tensor]:
        """dpkd: sample y_s from the student, fetch y_t and log p(y_t) from the cache, score y_s with the teacher."""
        prompts, prompt_mask = inputs["prompt_input_ids"], inputs["prompt_attention_mask"]
        student_ids, student_mask = self._sample_student(student, prompts, prompt_mask)
        teacher_ids, teacher_mask, teacher_logps_t = self._teacher_samples(prompts, prompt_mask)
        teacher_logps_s, _ = self._teacher_scores(prompts, prompt_mask, student_ids, student_mask)
        return {"prompt_input_ids": prompts, "prompt_attention_mask": prompt_mask,
                "teacher_ids": teacher_ids, "teacher_mask": teacher_mask, "teacher_logps_t": teacher_logps_t,
                "student_ids": student_ids, "student_mask": student_mask, "teacher_logps_s": teacher_logps_s}

    def _preference_term(self, student, pref, metrics) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 9: the student scores y_t and y_s in one forward pass over the 2B sequences."""
        args = self.args
        ids, mask = _concat_completions((pref["teacher_ids"], pref["teacher_mask"]),
                                        (pref["student_ids"], pref["student_mask"]), self.pad_token_id)
        prompts = pref["prompt_input_ids"].repeat(2, 1)
        prompt_mask = pref["prompt_attention_mask"].repeat(2, 1)
        batch = build_scoring_batch(prompts, prompt_mask, ids, mask)
        head = student.get_output_embeddings()
        logps, lengths = _sequence_logps(head, _final_hidden_states(student, batch), batch["labels"],
                                         chunked=self._chunked(head))
        lengths = lengths.to(logps.dtype)
        b = pref["teacher_ids"].shape[0]
        student_t, student_s = logps[:b], logps[b:]
        length_t, length_s = lengths[:b], lengths[b:]
        teacher_t = pref["teacher_logps_t"].to(logps.device, torch.float32)
        teacher_s = pref["teacher_logps_s"].to(logps.device, torch.float32)
        per_example, chosen, rejected = losses.dpkd_sequence_loss(
            student_t, student_s, teacher_t, teacher_s, args.beta,
            chosen_lengths=length_t if args.length_normalize else None,
            rejected_lengths=length_s if args.length_normalize else None,
            label_smoothing=args.label_smoothing, loss_type=args.dpkd_loss_type,
        )
        mean = per_example.mean()
        metrics.update({
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
            "rewards/margins": (chosen - rejected).detach().mean(),
            "rewards/accuracies": (chosen > rejected).float().detach().mean(),
            # Per-token reverse-KL estimate on the student's own samples: E_{y~q}[(log q − log p)/|y|].
            "rkl_estimate": ((student_s - teacher_s) / length_s.clamp(min=1)).detach().mean(),
            "length/teacher": length_t.mean(),
            "length/student": length_s.mean(),
        })
        return mean / self._accumulation_steps(), mean.detach()

    # --- samples -----------------------------------------------------------------------------------

    def _synced_gpus(self) -> bool:
        deepspeed_zero3 = (self.is_deepspeed_enabled
                           and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        return bool(self.is_fsdp_enabled or deepspeed_zero3)

    def _sample_student(self, student, prompts, prompt_mask):
        started = time.perf_counter()
        ids, mask = sample_completions(student, prompts, prompt_mask, self.args.sampling(),
                                       eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                                       synced_gpus=self._synced_gpus())
        self._generation_seconds += time.perf_counter() - started
        return ids, mask

    def _teacher_samples(self, prompts, prompt_mask):
        """y_t with log p(y_t) from the cache, generating (and storing) the missing ones.

        The global RNG is forked so that whether an output was cached does not change the student's
        later samples: a resumed run and an uninterrupted one draw the same y_s.
        """
        from dpkd.generation import teacher_outputs

        started = time.perf_counter()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        device = next(teacher.parameters()).device
        epoch = int(self.state.epoch or 0) if self.args.resample_teacher_each_epoch else None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.args.seed * 1_000_003 + self._micro_batch_index())
            ids, mask, logps, n_generated = teacher_outputs(
                teacher, self.teacher_cache, prompts.to(device), prompt_mask.to(device), self.args.sampling(),
                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, epoch=epoch,
                synced_gpus=self._synced_gpus(),
            )
        self.teacher_generations += int(n_generated)
        self._generation_seconds += time.perf_counter() - started
        target = prompts.device
        return ids.to(target), mask.to(target), logps.to(target)

    def _teacher_scores(self, prompts, prompt_mask, ids, mask):
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        device = next(teacher.parameters()).device
        batch = build_scoring_batch(prompts.to(device), prompt_mask.to(device), ids.to(device), mask.to(device))
        logps, n_tokens = score_sequences(self.teacher_model, batch)
        return logps.to(prompts.device), n_tokens.to(prompts.device)

    def _teacher_sample_batch(self, inputs, metrics) -> dict[str, torch.Tensor]:
        """seqkd: the teacher's responses to the batch's prompts, as a scoring batch for cross-entropy."""
        ids, mask, _ = self._teacher_samples(inputs["prompt_input_ids"], inputs["prompt_attention_mask"])
        metrics["length/teacher"] = mask.sum(1).float().mean()
        return build_scoring_batch(inputs["prompt_input_ids"], inputs["prompt_attention_mask"], ids, mask)

    def _student_sample_batch(self, student, inputs, metrics) -> dict[str, torch.Tensor]:
        ids, mask = self._sample_student(student, inputs["prompt_input_ids"], inputs["prompt_attention_mask"])
        metrics["length/student"] = mask.sum(1).float().mean()
        return build_scoring_batch(inputs["prompt_input_ids"], inputs["prompt_attention_mask"], ids, mask)

    def _on_policy_this_step(self) -> bool:
        """GKD's coin: with probability lmbda this optimizer step trains on student samples. Drawn from the
        seed and the step, so every rank and a resumed run make the same choice."""
        if self.args.lmbda <= 0.0:
            return False
        return random.Random(self.args.seed * 7919 + self.state.global_step).random() < self.args.lmbda

    def _pretrain_batch(self) -> dict[str, torch.Tensor]:
        """The next pre-training chunks, indexed by the micro-step so that resuming continues the stream."""
        size = self.args.per_device_train_batch_size
        start = (self._micro_batch_index() * self.accelerator.num_processes + self.accelerator.process_index) * size
        order = self._pretrain_order
        rows = [order[(start + i) % len(order)] for i in range(size)]
        input_ids = torch.tensor(self.pretrain_dataset[rows]["input_ids"], dtype=torch.long, device=self.args.device)
        labels = input_ids.clone()
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    def _micro_batch_index(self) -> int:
        # Micro-batches since the start of training, recomputed from the optimizer step so it survives a resume.
        return self.state.global_step * self.args.gradient_accumulation_steps + (
            self._micro_step % self.args.gradient_accumulation_steps)

    # --- logging and saving --------------------------------------------------------------------------

    def _record(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        if not metrics:
            return
        names = sorted(metrics)
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).to(self.args.device).reshape(())
                              for k in names])
        # `gather`, not `gather_for_metrics`: these are per-rank summaries, not samples to de-duplicate.
        values = self.accelerator.gather(values[None]).mean(0)
        for name, value in zip(names, values.tolist()):
            self._metrics[mode][name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each distillation metric over the logging interval, as TRL does."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        averaged = {name: sum(vals) / len(vals) for name, vals in self._metrics[mode].items() if vals}
        if mode == "eval":
            averaged = {f"eval_{name}": value for name, value in averaged.items()}
        logs.update(averaged)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.teacher_cache is not None:
            self.teacher_cache.compact()  # one file per rank instead of one per batch with misses
        self.save_state()
        self.write_run_record()
        return output

    def write_run_record(self) -> Path | None:
        """`dpkd_run.json` in output_dir: method, models and the settings `dpkd report` shows."""
        if not self.is_world_process_zero():
            return None
        a = self.args
        record = {
            "method": a.method,
            "student": _model_name(self.model),
            "teacher": _model_name(self.teacher_model) if self.teacher_model is not None else None,
            "beta": a.beta, "dpkd_loss_type": a.dpkd_loss_type, "length_normalize": a.length_normalize,
            "kd_ratio": self.kd_ratio, "lm_coef": a.lm_coef if self.pretrain_dataset is not None else 0.0,
            "jsd_beta": a.jsd_beta, "skew_alpha": a.skew_alpha, "temperature": a.temperature, "lmbda": a.lmbda,
            "sampling": dataclasses.asdict(a.sampling()), "max_prompt_length": a.max_prompt_length,
            "max_length": a.max_length, "learning_rate": a.learning_rate,
            "per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps, "num_train_epochs": a.num_train_epochs,
            "max_steps": a.max_steps, "global_step": self.state.global_step, "seed": a.seed,
            "teacher_generations": self.teacher_generations,
        }
        path = Path(a.output_dir) / "dpkd_run.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path


def _model_name(model) -> str | None:
    model = getattr(model, "module", model)
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)


def _check_vocabularies_match(teacher, student) -> None:
    t = teacher.get_output_embeddings().weight.shape[0]
    s = student.get_output_embeddings().weight.shape[0]
    if t != s:
        raise ValueError(f"teacher_model: its output vocabulary has {t} entries but the student's has {s}; "
                         "teacher-forced distillation compares distributions over one shared vocabulary")


def _prepare_dataset(dataset, tokenizer, args: DistillationConfig, name: str):
    """Any format `dpkd.data` reads → a dataset with `prompt_input_ids` and `completion_input_ids`."""
    if dataset is None:
        return None
    from dpkd import data

    columns = set(dataset.column_names)
    if not {"prompt_input_ids", "completion_input_ids"} <= columns:
        dataset = data.load_instruction_data(dataset, template=args.template, tokenizer=tokenizer)
        dataset, _ = data.tokenize_dataset(dataset, tokenizer, max_prompt_length=args.max_prompt_length,
                                           max_length=args.max_length, prompt_truncation=args.prompt_truncation)
        if len(dataset) == 0:
            raise ValueError(f"{name}: no example left after tokenization (prompts over max_prompt_length="
                             f"{args.max_prompt_length} are dropped with prompt_truncation='drop')")
    if (getattr(args, "train_sampling_strategy", "random") != "random"
            and args.length_column_name not in dataset.column_names):
        # The length-aware samplers (group_by_length, batch_rebalance) read each example's length from this
        # column; without it they look for an `input_ids` column, which this dataset does not have.
        def length(example: dict) -> dict:
            total = len(example["prompt_input_ids"]) + len(example["completion_input_ids"])
            return {args.length_column_name: min(total, args.max_length)}

        dataset = dataset.map(length, desc="lengths")
    return dataset


# ----------------------------------------------------------------------------------------------------
# Command line

# Recipe keys that are not DistillationConfig fields: what to load, and how.
RUN_KEYS = {
    "student": "path (or hub id) of the student model",
    "teacher": "path (or hub id) of the teacher model; not needed for sft",
    "train_data": "training data: a file, folder or bundled set name (see dpkd.data.load_instruction_data)",
    "eval_data": "evaluation data, same forms as train_data",
    "pretrain_data": "text corpus for the L_pt term (see dpkd.data.load_pretrain_chunks)",
    "data_dir": "folder holding the bundled data sets",
    "min_response_words": "keep only training responses with at least this many words (the paper: 11)",
    "limit": "use only the first N training examples",
    "student_dtype": "dtype to load the student in (float32, bfloat16, float16)",
    "teacher_dtype": "dtype to load the teacher in",
    "teacher_gguf_file": "GGUF file of the teacher inside its folder (transformers' gguf_file)",
    "trust_remote_code": "allow models' own code from their folders (off by default)",
    "lora": "mapping of LoRA options for the student (see dpkd.modeling.apply_lora); absent: full fine-tuning",
}


@dataclass
class Recipe:
    """A parsed `dpkd train` recipe: what to load (`run`) and the training configuration (`config`)."""

    path: Path
    run: dict[str, Any]
    config: DistillationConfig


def load_recipe(config_path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `--key value` overrides and validate everything before any model loads.

    Unknown keys raise a ValueError naming the file, the line and close matches; values are checked by
    `DistillationConfig.__post_init__`.
    """
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such recipe file")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a mapping of `key: value` lines, got {type(values).__name__}")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value} if node is not None else {}
    fields = _config_fields()
    known = set(fields) | set(RUN_KEYS)
    for key in values:
        if key not in known:
            raise ValueError(f"{path}, line {lines.get(key, '?')}: unknown key {key!r}{_suggest(key, known)}")
    for key, raw in _parse_overrides(overrides or []):
        if key not in known:
            raise ValueError(f"override --{key}: unknown key{_suggest(key, known)}")
        values[key] = _coerce(key, raw, fields.get(key))
    run = {k: v for k, v in values.items() if k in RUN_KEYS}
    config_values = {k: v for k, v in values.items() if k in fields}
    if "output_dir" not in config_values:
        raise ValueError(f"{path}: output_dir is required (in the recipe or as --output_dir DIR)")
    try:
        config = DistillationConfig(**config_values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err
    for key in ("student", "train_data"):
        if not run.get(key):
            raise ValueError(f"{path}: `{key}` is required ({RUN_KEYS[key]})")
    if config.spec.needs_teacher and not run.get("teacher"):
        raise ValueError(f"{path}: method {config.method!r} needs `teacher` ({RUN_KEYS['teacher']})")
    if run.get("lora") is not None and not isinstance(run["lora"], dict):
        raise ValueError(f"{path}: `lora` must be a mapping of LoRA options, e.g. {{r: 16, alpha: 32}}")
    return Recipe(path, run, config)


def _config_fields() -> dict[str, Any]:
    """DistillationConfig's init fields and their resolved types."""
    hints = typing.get_type_hints(DistillationConfig)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(DistillationConfig) if f.init}


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """`--key value` or `--key=value` pairs; dashes in keys read as underscores. A flag alone means true."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"override {token!r}: expected --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            else:
                value = "true"
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def _coerce(key: str, raw: str, annotation: Any) -> Any:
    """Parse an override's text with the type of the field it sets (YAML syntax for run keys)."""
    import yaml

    if annotation is None:
        return yaml.safe_load(raw)
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, UnionType) else (
        annotation,)
    if raw.lower() in ("none", "null") and type(None) in options:
        return None
    for option in options:
        if option is bool:
            lowered = raw.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
        elif option is int:
            try:
                return int(raw)
            except ValueError:
                pass
        elif option is float:
            try:
                return float(raw)
            except ValueError:
                pass
        elif typing.get_origin(option) in (list, dict):
            return yaml.safe_load(raw)
        elif option is not type(None):
            return raw
    names = ", ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"override --{key}: cannot read {raw!r} as {names}")


def _load_models_and_data(recipe: Recipe, *, need_student: bool = True):
    """Data first (cheap, and its errors name files and lines), then tokenizers, then models."""
    from dpkd import data, modeling

    run, args = recipe.run, recipe.config
    remote = bool(run.get("trust_remote_code", False))
    train = data.load_instruction_data(run["train_data"], template=args.template, data_dir=run.get("data_dir"),
                                       limit=run.get("limit"), min_response_words=run.get("min_response_words"))
    evaluation = None
    if run.get("eval_data"):
        evaluation = data.load_instruction_data(run["eval_data"], template=args.template,
                                                data_dir=run.get("data_dir"))
    if need_student:
        tokenizer = modeling.load_tokenizer(run["student"], trust_remote_code=remote)
    else:
        tokenizer = modeling.load_tokenizer(run["teacher"], gguf_file=run.get("teacher_gguf_file"),
                                            trust_remote_code=remote)
    if run.get("teacher") and need_student:
        teacher_tokenizer = modeling.load_tokenizer(run["teacher"], gguf_file=run.get("teacher_gguf_file"),
                                                    trust_remote_code=remote)
        modeling.check_tokenizers_match(teacher_tokenizer, tokenizer)
    teacher = None
    if run.get("teacher") and (args.spec.needs_teacher or not need_student):
        teacher = modeling.load_causal_lm(run["teacher"], dtype=run.get("teacher_dtype"),
                                          device=args.teacher_device, gguf_file=run.get("teacher_gguf_file"),
                                          trust_remote_code=remote)
    student = None
    if need_student:
        student = modeling.load_causal_lm(run["student"], dtype=run.get("student_dtype"), trust_remote_code=remote)
        if run.get("lora"):
            student = modeling.apply_lora(student, **run["lora"])
    pretrain = None
    if run.get("pretrain_data") and need_student:
        pretrain = data.load_pretrain_chunks(run["pretrain_data"], tokenizer, args.max_length)
    return tokenizer, student, teacher, train, evaluation, pretrain


def train_from_cli(config_path: str, overrides: list[str] | None = None) -> int:
    """`dpkd train CONFIG.yaml [--key value ...]`: train, save the model, print one summary line."""
    from transformers.trainer_utils import get_last_checkpoint

    started = time.perf_counter()
    try:
        recipe = load_recipe(config_path, overrides)
        tokenizer, student, teacher, train, evaluation, pretrain = _load_models_and_data(recipe)
    except (ValueError, OSError) as err:  # bad recipe, data, paths or tokenizers: before any training
        print(f"dpkd train: error: {err}", file=sys.stderr)
        return 2
    args = recipe.config
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  eval_dataset=evaluation, processing_class=tokenizer, pretrain_dataset=pretrain)
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = get_last_checkpoint(args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    if recipe.run.get("lora"):
        # The run's output is a plain model that `from_pretrained` and `dpkd eval` load; the checkpoints keep
        # the adapters alone.
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(args.output_dir)
            tokenizer.save_pretrained(args.output_dir)
    else:
        trainer.save_model()
    losses_logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    final = f"{losses_logged[-1]:.4f}" if losses_logged else f"{result.training_loss:.4f}"
    if trainer.is_world_process_zero():
        print(f"dpkd train: {args.method} finished {trainer.state.global_step} steps in "
              f"{time.perf_counter() - started:.0f}s, final loss {final}, teacher generations "
              f"{trainer.teacher_generations}; model saved to {args.output_dir}")
    return 0


def teacher_generate_from_cli(config_path: str, overrides: list[str] | None = None) -> int:
    """`dpkd teacher-generate CONFIG.yaml`: fill the teacher-output cache for the recipe's training prompts."""
    from dpkd import data
    from dpkd.generation import TeacherOutputCache, fill_teacher_cache, model_fingerprint

    started = time.perf_counter()
    try:
        recipe = load_recipe(config_path, overrides)
        if not recipe.run.get("teacher"):
            raise ValueError(f"{recipe.path}: `teacher` is required to generate teacher outputs")
        tokenizer, _, teacher, train, _, _ = _load_models_and_data(recipe, need_student=False)
    except (ValueError, OSError) as err:
        print(f"dpkd teacher-generate: error: {err}", file=sys.stderr)
        return 2
    args = recipe.config
    tokenized, _ = data.tokenize_dataset(train, tokenizer, max_prompt_length=args.max_prompt_length,
                                         max_length=args.max_length, prompt_truncation=args.prompt_truncation)
    if args.teacher_device is None:
        teacher.to(args.device)
    teacher.eval()
    cache_dir = args.teacher_cache_dir or os.path.join(args.output_dir, "teacher_cache")
    cache = TeacherOutputCache(cache_dir, teacher_id=model_fingerprint(teacher), sampling=args.sampling())
    torch.manual_seed(args.seed)
    generated = fill_teacher_cache(teacher, tokenizer, tokenized, cache, args.sampling(),
                                   batch_size=args.per_device_train_batch_size)
    if args.process_index == 0:  # under `accelerate launch` each rank fills its share; rank 0 reports its own
        print(f"dpkd teacher-generate: {generated} new teacher outputs for {len(tokenized)} prompts "
              f"({len(tokenized) - generated} already cached) in {time.perf_counter() - started:.0f}s; "
              f"cache {cache_dir}")
    return 0
