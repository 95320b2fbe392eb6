"""Method families: which batch each kind of distillation needs and which term it computes.

Every method of `dpkd.config.METHODS` belongs to one family, an object of a class below:

- `Supervised` (sft): no teacher and no distillation term;
- `TeacherForced` (kd, rkl, jsd, skl, srkl, tvd, dpkd_token): a per-token loss from `dpkd.losses` between
  student and teacher on the dataset responses (or, on a share `lmbda` of the steps, on student samples, as in
  GKD);
- `TeacherSamples` (seqkd): cross-entropy on the teacher's sampled responses y_t;
- `Preference` (dpkd, the paper's Eq. 9): the student samples k = num_student_samples y_s per prompt, y_t comes
  from the teacher-output cache, and the mean over the k pairs of
  `dpkd_sequence_loss(log q(y_t), log q(y_s), log p(y_t), log p(y_s), β, |y_t|, |y_s|)`.

A family takes part in a training step twice. `prepare(step)` runs outside the student's DDP/FSDP wrapper and
builds the batch the distillation term reads (sampling from the student, teacher outputs from the cache); None
means the dataset batch. `terms(step, prepared, with_ce=...)` runs inside the wrapper and returns the student-side
terms, each a (scaled term, logged mean) pair: `distill`, and `ce` when asked: on the dataset responses, or with
`sft_target: teacher` on the y_t the family already read (families that read none refuse it in the config). The
trainer (`step.trainer`) supplies the sampling, the frozen teacher and the scaling of token sums; it mixes the
terms as L = kd_ratio·distill + (1 − kd_ratio)·ce + lm_coef·pt.

Full-vocabulary logits are never built for the whole sequence: the model returns its final hidden states,
the loss-bearing positions are selected, and only they go through the `lm_head`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dpkd import losses
from dpkd.chunked_losses import chunked_token_loss
from dpkd.generation import build_scoring_batch, unwrap_for_generation
from dpkd.logprobs import select_positions, sequence_logps_from_hidden
from dpkd.modeling import final_hidden_states, run_in_wrapper

Term = tuple[torch.Tensor, torch.Tensor]  # (term scaled for the optimizer step, its mean for the logs)


@dataclass
class Step:
    """What a family reads in one micro-batch, and where it leaves its metrics."""

    trainer: Any                   # the DistillationTrainer: sampling, the teacher, scaling of token sums
    student: torch.nn.Module       # unwrapped from DDP/FSDP
    inputs: dict[str, torch.Tensor]
    num_items_in_batch: Any        # the Trainer's token count over the optimizer step; None in evaluation
    training: bool
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Family:
    """One kind of distillation. Subclasses set the attributes and override `prepare` and `distill`."""

    name: str = ""
    needs_teacher: bool = True            # without a teacher there is no distillation term to weigh
    reads_teacher_cache: bool = False     # reads y_t from the teacher-output cache (and may add to it)
    compares_vocabularies: bool = False   # compares teacher and student distributions token by token
    samples_student: bool = False         # samples completions from the student at every step

    def samples(self, args) -> bool:
        """Whether training with `args` samples completions (from the student, or the teacher's y_t)."""
        return self.samples_student or self.reads_teacher_cache

    def prepare(self, step: Step) -> Any:
        """Outside the student's wrapper: the batch `distill` reads, or None for the dataset batch."""
        return None

    def distill(self, step: Step, prepared: Any) -> Term | None:
        """Inside the wrapper: the distillation term, or None for a family without one."""
        return None

    def terms(self, step: Step, prepared: Any, *, with_ce: bool) -> dict[str, Term]:
        """CE on the dataset responses (when `with_ce`), then the distillation term, in this order. The families
        that read y_t override this for `sft_target: teacher`."""
        out = {"ce": cross_entropy_term(step, step.inputs, step.num_items_in_batch)} if with_ce else {}
        distill = self.distill(step, prepared)
        if distill is not None:
            out["distill"] = distill
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Supervised(Family):
    name = "supervised"
    needs_teacher = False


class TeacherForced(Family):
    """A token loss between student and teacher on the dataset responses, or on student samples (GKD)."""

    name = "teacher_forced"
    compares_vocabularies = True

    def samples(self, args) -> bool:
        return args.lmbda > 0.0  # GKD's on-policy share

    def prepare(self, step: Step) -> dict[str, torch.Tensor] | None:
        if step.training and step.trainer.on_policy_this_step():
            return _student_sample_batch(step)
        return None

    def terms(self, step: Step, prepared: Any, *, with_ce: bool) -> dict[str, Term]:
        if prepared is None:  # one projection of the dataset responses serves both terms
            return _token_loss_terms(step, step.inputs, step.num_items_in_batch, with_ce=with_ce)
        return super().terms(step, prepared, with_ce=with_ce)

    def distill(self, step: Step, prepared: dict[str, torch.Tensor]) -> Term:
        return _token_loss_terms(step, prepared, None, with_ce=False)["distill"]


class TeacherSamples(Family):
    """Cross-entropy on the teacher's responses to the batch's prompts (SeqKD)."""

    name = "teacher_samples"
    reads_teacher_cache = True

    def prepare(self, step: Step) -> dict[str, torch.Tensor]:
        prompts, prompt_mask = step.inputs["prompt_input_ids"], step.inputs["prompt_attention_mask"]
        ids, mask, _ = step.trainer.teacher_samples(prompts, prompt_mask)
        step.metrics["length/teacher"] = mask.sum(1).float().mean()
        return build_scoring_batch(prompts, prompt_mask, ids, mask)

    def distill(self, step: Step, prepared: dict[str, torch.Tensor]) -> Term:
        return cross_entropy_term(step, prepared, None)

    def terms(self, step: Step, prepared: Any, *, with_ce: bool) -> dict[str, Term]:
        if not (with_ce and step.trainer.args.sft_target == "teacher"):
            return super().terms(step, prepared, with_ce=with_ce)
        distill = self.distill(step, prepared)  # CE on y_t is the distillation term itself
        return {"ce": distill, "distill": distill}


class Preference(Family):
    """DPKD (Eq. 9): the teacher's y_t preferred over the student's y_s, rewards β·log q/p."""

    name = "preference"
    reads_teacher_cache = True
    samples_student = True

    def prepare(self, step: Step) -> dict[str, torch.Tensor]:
        """k·B samples y_s from the student (each prompt repeated k = num_student_samples times, one batched
        call; rows j·k … j·k + k − 1 answer prompt j), y_t and log p(y_t) from the cache, log p(y_s) from the
        teacher in one pass."""
        trainer = step.trainer
        prompts, prompt_mask = step.inputs["prompt_input_ids"], step.inputs["prompt_attention_mask"]
        k = trainer.args.num_student_samples
        repeated, repeated_mask = prompts.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
        student_ids, student_mask = trainer.sample_student(step.student, repeated, repeated_mask)
        teacher_ids, teacher_mask, teacher_logps_t = trainer.teacher_samples(prompts, prompt_mask)
        teacher_logps_s, _ = trainer.teacher_scores(repeated, repeated_mask, student_ids, student_mask)
        return {"prompt_input_ids": prompts, "prompt_attention_mask": prompt_mask,
                "teacher_ids": teacher_ids, "teacher_mask": teacher_mask, "teacher_logps_t": teacher_logps_t,
                "student_ids": student_ids, "student_mask": student_mask, "teacher_logps_s": teacher_logps_s}

    def terms(self, step: Step, prepared: Any, *, with_ce: bool) -> dict[str, Term]:
        if not (with_ce and step.trainer.args.sft_target == "teacher"):
            return super().terms(step, prepared, with_ce=with_ce)
        distill, teacher_ce = self._distill_and_teacher_ce(step, prepared, with_teacher_ce=True)
        return {"ce": teacher_ce, "distill": distill}

    def distill(self, step: Step, pref: dict[str, torch.Tensor]) -> Term:
        return self._distill_and_teacher_ce(step, pref, with_teacher_ce=False)[0]

    def _distill_and_teacher_ce(self, step: Step, pref: dict[str, torch.Tensor], *,
                                with_teacher_ce: bool) -> tuple[Term, Term | None]:
        """The student scores y_t (B) and y_s (k·B) in one forward pass over the (1 + k)·B sequences; the loss
        is the mean over the k·B pairs (y_t, y_s_j), each y_t's log-ratio reused for its k pairs. Also the
        cross-entropy on y_t from the same forward (`sft_target: teacher`)."""
        trainer, args = step.trainer, step.trainer.args
        k = args.num_student_samples
        ids, mask = _concat_completions((pref["teacher_ids"], pref["teacher_mask"]),
                                        (pref["student_ids"], pref["student_mask"]), trainer.pad_token_id)
        prompts = torch.cat([pref["prompt_input_ids"], pref["prompt_input_ids"].repeat_interleave(k, 0)])
        prompt_mask = torch.cat([pref["prompt_attention_mask"], pref["prompt_attention_mask"].repeat_interleave(k, 0)])
        b = pref["teacher_ids"].shape[0]
        if step.training:  # identical pairs give a gradient of exactly 0: not an overflow
            paired_ids, paired_mask = ids[:b].repeat_interleave(k, 0), mask[:b].repeat_interleave(k, 0)
            trainer.expect_zero_gradient(bool(torch.equal(paired_mask, mask[b:])
                                              and torch.equal(paired_ids * paired_mask, ids[b:] * mask[b:])))
        size = args.preference_micro_batch_size
        logps, lengths = _student_sequence_logps_in_groups(
            step, build_scoring_batch(prompts, prompt_mask, ids, mask), b if size is None else size)
        teacher_ce = None
        if with_teacher_ce:
            n_teacher_tokens = int(lengths[:b].sum())
            teacher_ce_sum = -logps[:b].sum()
            teacher_ce = (teacher_ce_sum / trainer.token_scale(n_teacher_tokens, None),
                          teacher_ce_sum.detach() / max(n_teacher_tokens, 1))
        lengths = lengths.to(logps.dtype)
        student_t, student_s = logps[:b].repeat_interleave(k, 0), logps[b:]
        length_t, length_s = lengths[:b].repeat_interleave(k, 0), lengths[b:]
        teacher_t = pref["teacher_logps_t"].to(logps.device, torch.float32).repeat_interleave(k, 0)
        teacher_s = pref["teacher_logps_s"].to(logps.device, torch.float32)
        per_example, chosen, rejected = losses.dpkd_sequence_loss(
            student_t, student_s, teacher_t, teacher_s, args.beta,
            chosen_lengths=length_t if args.length_normalize else None,
            rejected_lengths=length_s if args.length_normalize else None,
            label_smoothing=args.label_smoothing, loss_type=args.dpkd_loss_type,
        )
        mean = per_example.mean()
        step.metrics.update({
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
            "rewards/margins": (chosen - rejected).detach().mean(),
            "rewards/accuracies": (chosen > rejected).float().detach().mean(),
            # Per-token reverse-KL estimate on the student's own samples: E_{y~q}[(log q − log p)/|y|].
            "rkl_estimate": ((student_s - teacher_s) / length_s.clamp(min=1)).detach().mean(),
            "length/teacher": length_t.mean(),
            "length/student": length_s.mean(),
        })
        return (mean / trainer.accumulation_steps(), mean.detach()), teacher_ce


SUPERVISED = Supervised()
TEACHER_FORCED = TeacherForced()
TEACHER_SAMPLES = TeacherSamples()
PREFERENCE = Preference()

# ----------------------------------------------------------------------------------------------------
# Terms on the student's hidden states


def cross_entropy_term(step: Step, batch: dict[str, torch.Tensor], num_items_in_batch) -> Term:
    """Next-token cross-entropy on the labelled tokens of `batch`."""
    sums, counts = _student_sequence_logps(step, batch)
    n = int(counts.sum())
    token_sum = -sums.sum()
    return token_sum / step.trainer.token_scale(n, num_items_in_batch), token_sum.detach() / max(n, 1)


def _student_sequence_logps(step: Step, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's Σ log q(label) per sequence of `batch`, and the labelled-token counts: (B,), (B,)."""
    head = step.student.get_output_embeddings()
    hidden = final_hidden_states(step.student, batch)
    return sequence_logps_from_hidden(hidden[:, :-1], head.weight, batch["labels"][:, 1:], bias=head.bias,
                                      chunked=step.trainer.chunked(head))


def _student_sequence_logps_in_groups(step: Step, batch: dict[str, torch.Tensor],
                                      group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_student_sequence_logps` over the rows of `batch` `group_size` at a time, each group under activation
    checkpointing: its forward keeps no activations and is run again, group by group, in the backward pass.
    The same values and gradients as one pass over all rows, at the peak memory of one group's forward and one
    extra forward. `group_size` 0, or one group, is the plain pass."""
    n_rows = batch["input_ids"].shape[0]
    if group_size <= 0 or group_size >= n_rows or not torch.is_grad_enabled():
        return _student_sequence_logps(step, batch)
    keys = [key for key in ("input_ids", "attention_mask", "position_ids", "labels") if key in batch]

    def score(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _student_sequence_logps(step, dict(zip(keys, tensors)))

    sums, counts = zip(*(
        checkpoint(score, *(batch[key][start:start + group_size] for key in keys), use_reentrant=False)
        for start in range(0, n_rows, group_size)))
    return torch.cat(sums), torch.cat(counts)


def pretrain_term(step: Step, batch: dict[str, torch.Tensor], kd_ratio: float) -> Term:
    """L_pt = (1 − r)·CE_pt + r·KD_pt on the pre-training chunks, r = `kd_ratio`; KD_pt = −Σ_v p(v) log q(v)
    (`losses.soft_cross_entropy`, TOKEN_LOSSES["kd"], T = 1), the released code's forward-KL soft
    cross-entropy against the teacher. Both share one projection of the student's hidden states."""
    if kd_ratio <= 0.0:
        return cross_entropy_term(step, batch, None)
    terms = _token_loss_terms(step, batch, None, with_ce=True, token_loss="kd", options={"temperature": 1.0})
    (ce, ce_logged), (kd, kd_logged) = terms["ce"], terms["distill"]
    step.metrics.update({"loss/pt_ce": ce_logged, "loss/pt_kd": kd_logged})
    return (1.0 - kd_ratio) * ce + kd_ratio * kd, (1.0 - kd_ratio) * ce_logged + kd_ratio * kd_logged


def _token_loss_terms(step: Step, batch: dict[str, torch.Tensor], num_items_in_batch, *,
                      with_ce: bool, token_loss: str | None = None,
                      options: dict[str, Any] | None = None) -> dict[str, Term]:
    """A token loss between student and teacher on `batch`'s labelled tokens, and CE there: the method's
    (`spec.token_loss` with its options) unless `token_loss` (a key of `losses.TOKEN_LOSSES`) is given.

    Both models' final hidden states are taken at the labelled positions only; the `lm_head`s project
    just those (in chunks above `chunked_loss_vocab_threshold`).
    """
    trainer, student = step.trainer, step.student
    spec = trainer.args.spec
    if token_loss is None:
        token_loss, options = spec.token_loss, spec.loss_options(trainer.args)
    token_loss = losses.TOKEN_LOSSES[token_loss]
    options = options or {}
    positions = select_positions(final_hidden_states(student, batch), batch["labels"])
    n = positions.targets.numel()
    scale = trainer.token_scale(n, num_items_in_batch)
    student_head = student.get_output_embeddings()
    targets = positions.targets[None]
    ce_sum = None
    chunked = trainer.chunked(student_head)
    teacher_out = _teacher_at_positions(trainer.teacher_model, batch, logits=not chunked).to(positions.hidden.device)
    if chunked:
        teacher_head = unwrap_for_generation(trainer.teacher_model).get_output_embeddings()
        device = positions.hidden.device
        teacher_bias = None if teacher_head.bias is None else teacher_head.bias.to(device)
        token_sum = chunked_token_loss(
            token_loss, positions.hidden[None], student_head.weight, teacher_out[None],
            teacher_head.weight.to(device), targets, student_bias=student_head.bias, teacher_bias=teacher_bias,
            num_items_in_batch=1, recompute=trainer.args.chunked_loss_recompute, **options,
        )
        if with_ce:
            ce_sum = -sequence_logps_from_hidden(positions.hidden[None], student_head.weight, targets,
                                                 bias=student_head.bias, chunked=True)[0].sum()
    else:
        student_logits = student_head(positions.hidden)
        token_sum = token_loss(student_logits[None], teacher_out[None], targets, reduction="sum", **options)
        if with_ce:
            ce_sum = F.cross_entropy(student_logits.float(), positions.targets, reduction="sum")
    out = {"distill": (token_sum / scale, token_sum.detach() / max(n, 1))}
    if ce_sum is not None:
        out["ce"] = (ce_sum / scale, ce_sum.detach() / max(n, 1))
    return out


def _teacher_at_positions(wrapper: torch.nn.Module, batch: dict[str, torch.Tensor], *, logits: bool) -> torch.Tensor:
    """The frozen teacher at the batch's labelled positions: its logits (N, V), or its final hidden
    states (N, H_t) for the chunked losses. Run inside the teacher's wrapper, under inference mode."""
    teacher = unwrap_for_generation(wrapper)
    device = teacher.get_input_embeddings().weight.device
    teacher_batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def teacher_side() -> torch.Tensor:
        with torch.inference_mode():
            hidden = select_positions(final_hidden_states(teacher, teacher_batch), teacher_batch["labels"]).hidden
            return teacher.get_output_embeddings()(hidden) if logits else hidden

    # A clone outside inference mode is an ordinary tensor that autograd may save for the student's backward.
    return run_in_wrapper(wrapper, teacher, teacher_side).clone()


def _student_sample_batch(step: Step) -> dict[str, torch.Tensor]:
    """The student's own completions of the batch's prompts, as a scoring batch (GKD's on-policy data)."""
    prompts, prompt_mask = step.inputs["prompt_input_ids"], step.inputs["prompt_attention_mask"]
    ids, mask = step.trainer.sample_student(step.student, prompts, prompt_mask)
    step.metrics["length/student"] = mask.sum(1).float().mean()
    return build_scoring_batch(prompts, prompt_mask, ids, mask)


def _concat_completions(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor],
                        pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack two (ids, mask) completion batches along the batch axis, right-padding to one width."""
    width = max(first[0].shape[1], second[0].shape[1])
    ids = [F.pad(t, (0, width - t.shape[1]), value=pad_token_id) for t in (first[0], second[0])]
    masks = [F.pad(m, (0, width - m.shape[1]), value=0) for m in (first[1], second[1])]
    return torch.cat(ids), torch.cat(masks)
