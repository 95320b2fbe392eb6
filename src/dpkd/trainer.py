"""The distillation trainer: one training step at a time, which tensors go into which loss.

`DistillationTrainer` extends `transformers.Trainer` with a frozen teacher and overrides only `compute_loss`
(the step), `training_step` (to time generation), `prediction_step`, `log` and the saving hooks. The training
loss is always

    L = kd_ratio · L_distill + (1 − kd_ratio) · CE(sft_target) + lm_coef · L_pt,
    L_pt = (1 − pretrain_kd_ratio) · CE(pretraining chunks) + pretrain_kd_ratio · KD(teacher, same chunks)

where CE(sft_target) is on the dataset responses or on the teacher's cached samples y_t, and the method's
family (`dpkd.families`, one per row of `dpkd.config.METHODS`) samples what L_distill reads and computes it.
The configuration is `dpkd.config.DistillationConfig`; recipes and the command line are `dpkd.recipe` and
`dpkd.cli`; staged saving (`StagedSaves`, mixed in here) and `last_complete_checkpoint` are `dpkd.checkpoints`.

Finite or stop: a loss term or gradient norm that is not finite stops training with a `NonFiniteError`
naming the step, the term and what to try (or, with `skip_nonfinite`, drops that optimizer step and counts
it as `nonfinite_skipped` in the logs), and no checkpoint or model with a non-finite weight is written.
Checkpoints and the final model are written to a staging folder and renamed into place, so a kill or a full
disk during a save leaves the previous complete checkpoint (`last_complete_checkpoint`) intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer

from dpkd.checkpoints import StagedSaves, last_complete_checkpoint, unstaged
from dpkd.config import METHODS, DistillationConfig
from dpkd.data import prepare_training_dataset
from dpkd.durable import write_atomically
from dpkd.families import Step, Term, pretrain_term
from dpkd.generation import (
    build_scoring_batch,
    check_prompt_fits,
    position_limit,
    sample_completions,
    score_sequences,
    unwrap_for_generation,
)
from dpkd.modeling import (
    check_plain_lm_head,
    check_vocabularies_match,
    disable_dropout_in_model,
    prepare_teacher,
    run_in_wrapper,
)
from dpkd.teacher_cache import TeacherOutputCache, model_fingerprint, teacher_outputs

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "DistillationConfig",
    "DistillationTrainer",
    "NonFiniteError",
    "disable_dropout_in_model",
    "last_complete_checkpoint",
]

class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; raised before anything non-finite is saved."""


class DistillationTrainer(StagedSaves, Trainer):
    """`transformers.Trainer` that distils `teacher_model` into `model` with the method in `args.method`.

    Mirrors TRL's trainers: `DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
    train_dataset=ds, eval_dataset=..., processing_class=tokenizer)`. `ds` is a `datasets.Dataset` in any
    format `dpkd.data` reads (`prompt`/`completion`, `instruction`/`input`/`output`, ...) or already
    tokenized (`prompt_input_ids`/`completion_input_ids`). `pretrain_dataset` (fixed-length `input_ids`, from
    `dpkd.data.load_pretrain_chunks`) adds `lm_coef · L_pt`. `model` and `teacher_model` may be paths.
    `peft_config` (a `peft.LoraConfig`, as in TRL) trains the student as adapters (`peft.get_peft_model`);
    `save_model` then saves the adapter (`adapter_model.safetensors`, `adapter_config.json`).
    """

    # compute_loss scales every term for gradient accumulation and data parallelism itself.
    loss_is_scaled_for_ga = True
    # What the model card names as the training data (`dpkd train` sets the recipe's `train_data`).
    data_name: str | None = None

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
        peft_config=None,
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
        if peft_config is not None:  # as TRL's trainers: the student trains as adapters; save_model saves those
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if processing_class is None:
            raise ValueError("processing_class: a tokenizer is required to tokenize the dataset")
        # KD_pt compares the teacher's and the student's distributions on the pre-training chunks.
        compares = spec.family.compares_vocabularies or (pretrain_dataset is not None and args.pretrain_kd_ratio > 0)
        if teacher_model is not None and compares:
            check_vocabularies_match(teacher_model, model)
        check_plain_lm_head(model, "model")
        if teacher_model is not None and compares:
            check_plain_lm_head(teacher_model, "teacher_model")
        if args.disable_dropout:
            for m in (model, teacher_model):
                if m is not None:
                    disable_dropout_in_model(m)
        if spec.family.samples(args):  # both models read every sample: each must have room after the prompt
            for sampler in (model, teacher_model):
                if sampler is not None:
                    check_prompt_fits(sampler, args.max_prompt_length)

        self.eos_token_id = processing_class.eos_token_id
        self.pad_token_id = processing_class.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        train_dataset = prepare_training_dataset(train_dataset, processing_class, args, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: prepare_training_dataset(v, processing_class, args, f"eval_dataset[{k!r}]")
                            for k, v in eval_dataset.items()}
        else:
            eval_dataset = prepare_training_dataset(eval_dataset, processing_class, args, "eval_dataset")
        if data_collator is None:
            data_collator = DistillationCollator(self.pad_token_id, max_length=args.max_length)

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, **kwargs)

        self.kd_ratio = args.effective_kd_ratio
        self.teacher_cache = None
        if spec.family.reads_teacher_cache:
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
        # Finite or stop: this optimizer step's non-finite loss terms {name: value}, its summed loss, and the
        # number of steps skipped so far (read back from the logs on the first log after a resume).
        self._step_nonfinite: dict[str, float] = {}
        self._step_loss = 0.0
        # Whether a gradient of exactly 0 is this step's true gradient (every micro-batch said so), not an overflow.
        self._step_zero_gradient_expected: bool | None = None
        self._nonfinite_skipped: int | None = None
        self._steps_kept_since_log = 0
        self._staging_dir: str | None = None
        # log_completions: this micro-batch's samples, {"student" | "teacher": (prompts, prompt_mask, ids, mask)}.
        self._last_samples: dict[str, tuple[torch.Tensor, ...]] = {}

    # --- setup -------------------------------------------------------------------------------------

    def _prepare_teacher(self, teacher: PreTrainedModel) -> torch.nn.Module:
        """Freeze the teacher and place it for inference under the accelerator's distribution scheme
        (`dpkd.modeling.prepare_teacher`), or on `teacher_device` when one is given."""
        if self.args.teacher_device is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            return teacher.to(self.args.teacher_device)
        return prepare_teacher(teacher, self.accelerator)

    def _build_teacher_cache(self, teacher: PreTrainedModel):
        cache_dir = self.args.teacher_cache_dir or os.path.join(self.args.output_dir, "teacher_cache")
        # Entries are checked against the teacher's vocabulary when read (a bad one is generated again).
        head = teacher.get_output_embeddings()
        vocab_size = head.weight.shape[0] if head is not None else teacher.config.vocab_size
        return TeacherOutputCache(cache_dir, teacher_id=model_fingerprint(teacher), sampling=self.args.sampling(),
                                  vocab_size=vocab_size)

    def _set_signature_columns_if_needed(self) -> None:
        # The collator reads these; with remove_unused_columns=True everything else is dropped.
        if self._signature_columns is None:
            self._signature_columns = ["prompt_input_ids", "completion_input_ids"]

    # --- the step ----------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        started = time.perf_counter()
        self._generation_seconds = 0.0
        self._last_samples = {}  # a step that samples nothing leaves nothing to log
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = self._step_loss + loss
        elapsed = time.perf_counter() - started
        self._metrics["train"]["generation_time_share"].append(self._generation_seconds / max(elapsed, 1e-9))
        self._micro_step += 1
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """L = kd_ratio·L_distill + (1 − kd_ratio)·CE + lm_coef·L_pt, each term scaled so that micro-batches,
        gradient accumulation and data-parallel ranks add up to one mean over the optimizer step.

        The method's family samples what it needs outside the DDP/FSDP wrapper, then computes its terms inside
        it, with the pre-training term, so the wrapper sees every student-side forward."""
        training = model.training
        step = Step(self, self.accelerator.unwrap_model(model), inputs,
                    num_items_in_batch if training else None, training)
        family = self.args.spec.family
        prepared = family.prepare(step)

        def student_side() -> dict[str, Term]:
            terms = family.terms(step, prepared, with_ce=self.kd_ratio < 1.0)
            if self.pretrain_dataset is not None and self.args.lm_coef > 0 and training:
                terms["pt"] = pretrain_term(step, self._pretrain_batch(), self.args.pretrain_kd_ratio)
            return terms

        terms = run_in_wrapper(model, step.student, student_side)
        nonfinite = self._nonfinite_terms(terms) if training else {}
        if nonfinite and not self.args.skip_nonfinite:
            raise NonFiniteError(self._fault_message(f"loss {_describe_terms(nonfinite)}"))
        self._step_nonfinite.update(nonfinite)
        weights = {"distill": self.kd_ratio, "ce": 1.0 - self.kd_ratio, "pt": self.args.lm_coef}
        if training and any(weights[name] > 0 for name in terms if name != "distill"):
            self.expect_zero_gradient(False)  # a CE or pre-training term always has a gradient
        loss = sum(weight * terms[name][0] for name, weight in weights.items() if name in terms)
        step.metrics.update({f"loss/{name}": logged for name, (_, logged) in terms.items()})
        if not nonfinite:  # a skipped batch's NaNs would poison the logged means
            self._record("train" if training else "eval", step.metrics)
        return (loss, None) if return_outputs else loss

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """The accelerator's autocast (bf16/fp16 under mixed precision, else nothing), around `compute_loss`.

        transformers leaves autocast to accelerate, which wraps only the student's own `forward`; the families
        call the backbones directly (through `run_in_wrapper`, which stands in for that forward) and run the
        teacher and the sampling outside it. Entering autocast for the whole step puts every forward of both
        models under it; log-softmax and the losses upcast to float32 themselves."""
        return self.accelerator.autocast()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # --- finite or stop ------------------------------------------------------------------------------

    def _nonfinite_terms(self, terms: dict[str, Term]) -> dict[str, float]:
        """{name: logged value} of the loss terms that are not finite on any rank (every rank gets the same answer)."""
        names = sorted(terms)
        values = torch.stack([terms[n][1].detach().float().sum() for n in names])
        flags = torch.stack([~torch.isfinite(terms[n][0].detach().float().sum() + terms[n][1].detach().float().sum())
                             for n in names]).float()
        if self.accelerator.num_processes > 1:
            gathered = self.accelerator.gather(torch.stack([values, flags])[None])
            values, flags = gathered[:, 0].mean(0), gathered[:, 1].amax(0)
        return {name: value for name, value, flag in zip(names, values.tolist(), flags.tolist()) if flag}

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm, checked before the optimizer step: a non-finite loss term (seen by
        `compute_loss` under `skip_nonfinite`), a non-finite norm, or a norm of exactly 0 while the loss is
        positive (activations overflowed, so nothing learns) stops training or, with `skip_nonfinite`, drops the
        step's gradients so that the optimizer leaves every parameter as it is."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        terms, self._step_nonfinite = self._step_nonfinite, {}
        loss, self._step_loss = self._step_loss, 0.0
        norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        norm = float(norm) if norm is not None else 0.0
        fault = None
        if terms:
            fault = f"loss {_describe_terms(terms)}"
        elif not math.isfinite(norm) and self.accelerator.scaler is None:  # a GradScaler skips such steps itself
            fault = f"gradient norm is {norm} while every loss term is finite"
        expected_zero, self._step_zero_gradient_expected = self._step_zero_gradient_expected, None
        if fault is None and norm == 0.0:  # the same on every rank, so the collective below is reached by all
            summed = self.accelerator.reduce(torch.tensor([loss, float(not expected_zero)], dtype=torch.float32,
                                                          device=self.args.device), "sum")
            total, unexplained = float(summed[0]), float(summed[1])
            if total > 0 and unexplained > 0:
                local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # FSDP2 shards
                largest = max((float(p.detach().abs().max()) for p in local if p.numel()), default=0.0)
                fault = (f"gradient is exactly 0 in every parameter while the loss is {total:.4g}: activations "
                         f"overflowed (the largest weight is {largest:.3g})")
        if fault is None:
            self._steps_kept_since_log += 1
            return grad_norm
        if not self.args.skip_nonfinite:
            raise NonFiniteError(self._fault_message(fault))
        if self.accelerator.scaler is not None:
            # GradScaler insists on seeing gradients; non-finite ones make it skip the step as on an overflow.
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)
        else:
            for p in model.parameters():
                p.grad = None  # optimizers leave a parameter without a gradient untouched
        self._nonfinite_skipped = self._skipped_so_far() + 1
        return grad_norm

    def _skipped_so_far(self) -> int:
        if self._nonfinite_skipped is None:
            self._nonfinite_skipped = max((int(e.get("nonfinite_skipped", 0)) for e in self.state.log_history),
                                          default=0)
        return self._nonfinite_skipped

    def _fault_message(self, fault: str, saving: str | None = None) -> str:
        """The whole story of a numerical fault: where, what, what was kept and what to try."""
        a = self.args
        step = self.state.global_step if saving else self.state.global_step + 1
        where = f"not saving {saving}: after step {step}" if saving else f"training stopped at step {step}:"
        kept = last_complete_checkpoint(a.output_dir)
        kept = (f"the newest complete checkpoint is {kept}" if kept is not None
                else "no complete checkpoint was written before it")
        student = self.accelerator.unwrap_model(self.model)
        hints = [f"a lower learning_rate (now {a.learning_rate:g})"]
        if next(student.parameters()).dtype == torch.float16:
            hints.append("float32 weights (the student's are float16, where AdamW's updates overflow) with "
                         "bf16: true mixed precision")
        else:
            hints.append("bf16 instead of fp16" + (" (fp16 is on)" if a.fp16 else ""))
        hints.append(f"gradient clipping with a smaller max_grad_norm (now {a.max_grad_norm:g})" if a.max_grad_norm > 0
                     else "gradient clipping (max_grad_norm: 1.0; it is off)")
        hints.append("checking the training data for empty or extreme examples")
        if not a.skip_nonfinite:
            hints.append("skip_nonfinite: true to skip such batches")
        return (f"{where} the {fault}. Nothing non-finite was saved; {kept}. Try {'; '.join(hints[:-1])}; "
                f"or {hints[-1]}.")

    # --- what the families call: scaling, sampling, the teacher --------------------------------------

    def token_scale(self, n_tokens: int, num_items_in_batch) -> float:
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
        return max(n_tokens, 1) * self.accumulation_steps()

    def expect_zero_gradient(self, expected: bool) -> None:
        """A family's word on this micro-batch: whether its terms have a gradient of exactly 0 (dpkd when every
        pair has y_s = y_t: the two log-ratios cancel), so that a zero gradient norm is not taken for an overflow.
        The step's zero gradient is expected only if every micro-batch said so."""
        previous = self._step_zero_gradient_expected
        self._step_zero_gradient_expected = expected if previous is None else previous and expected

    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step, by which a per-micro-batch mean is divided."""
        if not self.model.training:  # evaluation reports plain per-batch means
            return 1
        return int(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps))

    def chunked(self, lm_head: torch.nn.Module) -> bool:
        """Whether losses through this head run in token chunks (vocabulary above the threshold)."""
        return lm_head.weight.shape[0] > self.args.chunked_loss_vocab_threshold

    def sample_student(self, student, prompts, prompt_mask):
        """Completions (ids, mask) sampled from the unwrapped student; timed as generation."""
        started = time.perf_counter()
        # The teacher scores these samples too: they must fit its positions as well as the student's.
        teacher = self.teacher_model
        teacher_positions = position_limit(unwrap_for_generation(teacher)) if teacher is not None else None
        ids, mask = sample_completions(student, prompts, prompt_mask, self.args.sampling(),
                                       eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                                       synced_gpus=self._synced_gpus(), max_positions=teacher_positions)
        self._generation_seconds += time.perf_counter() - started
        self._keep_samples("student", prompts, prompt_mask, ids, mask)
        return ids, mask

    def teacher_samples(self, prompts, prompt_mask):
        """y_t with log p(y_t) from the cache, generating (and storing) the missing ones.

        The global RNG is forked so that whether an output was cached does not change the student's
        later samples: a resumed run and an uninterrupted one draw the same y_s.
        """
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
        self._keep_samples("teacher", prompts, prompt_mask, ids, mask)
        target = prompts.device
        return ids.to(target), mask.to(target), logps.to(target)

    def teacher_scores(self, prompts, prompt_mask, ids, mask):
        """The teacher's log p(completion) per sequence, and the completions' token counts."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        device = next(teacher.parameters()).device
        batch = build_scoring_batch(prompts.to(device), prompt_mask.to(device), ids.to(device), mask.to(device))
        logps, n_tokens = score_sequences(self.teacher_model, batch)
        return logps.to(prompts.device), n_tokens.to(prompts.device)

    def on_policy_this_step(self) -> bool:
        """GKD's coin: with probability lmbda this optimizer step trains on student samples. Drawn from the
        seed and the step, so every rank and a resumed run make the same choice."""
        if self.args.lmbda <= 0.0:
            return False
        return random.Random(self.args.seed * 7919 + self.state.global_step).random() < self.args.lmbda

    def _synced_gpus(self) -> bool:
        deepspeed_zero3 = (self.is_deepspeed_enabled
                           and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        return bool(self.is_fsdp_enabled or deepspeed_zero3)

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
        elif self.args.skip_nonfinite and "loss" in logs:
            averaged["nonfinite_skipped"] = self._skipped_so_far()
            if self._steps_kept_since_log == 0:
                del logs["loss"]  # every step since the last log was skipped: there is no loss to report
            self._steps_kept_since_log = 0
        logs.update(averaged)
        super().log(logs, start_time)
        self._metrics[mode].clear()
        if mode == "train" and self._last_samples:
            self._log_completions()

    def _keep_samples(self, kind: str, prompts, prompt_mask, ids, mask) -> None:
        """log_completions: remember what this training micro-batch sampled, to decode at the next log."""
        if self.args.log_completions and self.model.training:
            self._last_samples[kind] = tuple(t.detach() for t in (prompts, prompt_mask, ids, mask))

    def _log_completions(self) -> None:
        """The last batch's samples as rows (prompt, student completion, teacher completion), one per student
        sample (the teacher's y_t repeated for each of its prompt's k samples): a line of completions.jsonl,
        a wandb table, INFO lines. Only what the step sampled is decoded; nothing is generated."""
        samples, self._last_samples = self._last_samples, {}
        if not self.is_world_process_zero():
            return
        decode = self.processing_class.decode

        def texts(ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
            return [decode(row[keep.bool()].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask)]

        rows_from = samples.get("student", samples.get("teacher"))
        prompts = texts(rows_from[0], rows_from[1])
        student = texts(*samples["student"][2:]) if "student" in samples else None
        teacher = None
        if "teacher" in samples:
            teacher = texts(*samples["teacher"][2:])
            k = len(prompts) // max(len(teacher), 1)  # dpkd: k student samples per prompt
            teacher = [text for text in teacher for _ in range(k)]
        n = self.args.num_completions_to_print or len(prompts)
        step = self.state.global_step
        record = {"step": step, "prompts": prompts[:n],
                  "student_completions": student[:n] if student is not None else None,
                  "teacher_completions": teacher[:n] if teacher is not None else None}
        path = Path(self.args.output_dir) / "completions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        rows = [[step, prompt, student[i] if student else None, teacher[i] if teacher else None]
                for i, prompt in enumerate(record["prompts"])]
        for row in rows:
            logger.info("step %d completion | prompt: %r | student: %r | teacher: %r", *row)
        if "wandb" in (self.args.report_to or []):
            import wandb

            if wandb.run is not None:
                columns = ["step", "prompt", "student_completion", "teacher_completion"]
                wandb.log({"completions": wandb.Table(columns=columns, data=rows)})

    def _refuse_nonfinite_weights(self, tensors: dict, folder: str | os.PathLike) -> None:
        for name, tensor in tensors.items():
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                kind = "nan" if bool(torch.isnan(tensor).any()) else "inf"
                raise NonFiniteError(self._fault_message(f"weight {name} holds {kind} values",
                                                         saving=str(unstaged(folder))))

    def write_model_card(self, folder: str | os.PathLike, *, adapter: bool | None = None) -> Path | None:
        """`README.md` in `folder` (`dpkd.model_card`): method, models, data, settings, and the results of the
        folder's `eval/metrics.json` (read where a staged save will end up). `adapter`: whether the folder holds a
        peft adapter (default: whether the model is a peft model)."""
        if not self.args.should_save:
            return None
        from dpkd.model_card import CARD_SETTINGS, write_model_card

        a = self.args
        settings = {key: getattr(a, key, None) for key in CARD_SETTINGS}
        settings = {key: getattr(value, "value", value) for key, value in settings.items()}
        settings["kd_ratio"] = self.kd_ratio
        model = self.accelerator.unwrap_model(self.model)
        return write_model_card(folder, eval_folder=unstaged(folder), method=a.method, student=_model_name(model),
                                teacher=_model_name(self.teacher_model) if self.teacher_model is not None else None,
                                data=self.data_name, settings=settings,
                                adapter=hasattr(model, "peft_config") if adapter is None else adapter)

    def create_model_card(self, *args, **kwargs) -> None:
        """What `push_to_hub` uploads as the card: dpkd's (the Trainer's generic one would replace it)."""
        self.write_model_card(self.args.output_dir)

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
            "disable_dropout": a.disable_dropout, "num_student_samples": a.num_student_samples,
            "sft_target": a.sft_target,
            "pretrain_kd_ratio": a.pretrain_kd_ratio if self.pretrain_dataset is not None else 0.0,
            "skew_alpha": a.skew_alpha, "temperature": a.temperature, "lmbda": a.lmbda,
            "sampling": dataclasses.asdict(a.sampling()), "max_prompt_length": a.max_prompt_length,
            "max_length": a.max_length, "learning_rate": a.learning_rate,
            "per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps, "num_train_epochs": a.num_train_epochs,
            "max_steps": a.max_steps, "global_step": self.state.global_step, "seed": a.seed,
            "teacher_generations": self.teacher_generations,
        }
        path = Path(a.output_dir) / "dpkd_run.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(record, indent=2) + "\n")
        return path


def _describe_terms(terms: dict[str, float]) -> str:
    listed = ", ".join(f"{name} = {value:g}" for name, value in sorted(terms.items()))
    return f"term {listed} is not finite" if len(terms) == 1 else f"terms {listed} are not finite"


def _model_name(model) -> str | None:
    model = getattr(model, "module", model)
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
