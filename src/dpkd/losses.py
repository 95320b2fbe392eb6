"""Every loss DPKD and its baselines train with, as pure functions on tensors.

Conventions shared by every function here:

- Token-level losses take ``student_logits`` and ``teacher_logits`` of shape (B, L, V) and ``labels`` of
  shape (B, L). ``logits[:, i]`` scores ``labels[:, i]`` (the caller has already shifted, as in TRL's
  ``generalized_jsd_loss``); positions whose label is -100 are ignored.
- q is the student distribution, p the teacher's: ``q = softmax(student_logits / T)``,
  ``p = softmax(teacher_logits / T)``. The temperature divides the logits before the softmax; the loss is
  not rescaled by T² (TRL's convention).
- Reduction (keyword ``reduction``): ``"mean"`` (default) sums the per-token values over the valid tokens
  of the whole batch and divides by their count, or by ``num_items_in_batch`` when it is given (the
  gradient-accumulation-correct form transformers' ``Trainer`` passes); ``"sum"`` returns the plain sum
  (what :func:`chunked_token_loss` adds up over chunks); ``"none"`` returns the (B, L) per-token values,
  zero at ignored positions.
- All maths runs in float32 whatever the input dtype (half and bfloat16 inputs are upcast; float64 inputs
  stay float64, which is what lets ``torch.autograd.gradcheck`` hold the gradients to account).

The chunked forms (:func:`chunked_token_loss`, :func:`chunked_sequence_logps`) take final hidden states and
``lm_head`` weights instead of logits, project only the valid positions, a chunk at a time, and recompute each
chunk's logits in the backward pass (activation checkpointing; ``chunked_token_loss(..., recompute=False)``
takes each chunk's gradient during the forward pass instead, at about the dense form's time), so no
(tokens × vocab) tensor outlives its chunk. They give the values and gradients of the dense forms.

:data:`TOKEN_LOSSES` maps the short names the trainer's configuration uses to the token-level losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "TOKEN_LOSSES",
    "chunked_sequence_logps",
    "chunked_token_loss",
    "dpkd_sequence_loss",
    "dpkd_token_loss",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "sequence_logps",
    "skew_forward_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "total_variation",
]

_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------------------------
# Shared plumbing: input checks, selecting the valid positions, reducing per-token values.
# ---------------------------------------------------------------------------------------------------------


def _check_token_inputs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, reduction: str
) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must have shape (B, L, V); got {tuple(student_logits.shape)}")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} and student_logits {tuple(student_logits.shape)} "
            "must have the same shape (teacher and student must share the vocabulary)"
        )
    if labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"labels must have shape (B, L) = {tuple(student_logits.shape[:2])}; got {tuple(labels.shape)}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {value}")


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32, or as is when it is already float32 or float64."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _valid_rows(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (N, V) rows of ``logits`` at the valid positions; a view, without a copy, when all are valid."""
    if bool(mask.all()):
        return logits.reshape(-1, logits.size(-1))
    return logits[mask]


def _scaled_float_rows(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    rows = _upcast(_valid_rows(logits, mask))
    return rows if temperature == 1.0 else rows / temperature


def _reduce(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
) -> torch.Tensor:
    """Reduce the (N,) values at the valid positions of ``mask`` (B, L) as the module docstring describes."""
    if reduction == "none":
        out = per_token.new_zeros(mask.shape)
        out[mask] = per_token
        return out
    total = per_token.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        # clamp: a batch without valid tokens gives 0 (with a gradient path), not 0/0.
        return total / mask.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _token_divergence(
    per_row: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
) -> torch.Tensor:
    """Apply ``per_row(student_rows, teacher_rows) -> (N,)`` to the valid positions and reduce."""
    _check_token_inputs(student_logits, teacher_logits, labels, reduction)
    _check_temperature(temperature)
    mask = labels != IGNORE_INDEX
    student_rows = _scaled_float_rows(student_logits, mask, temperature)
    teacher_rows = _scaled_float_rows(teacher_logits, mask, temperature)
    return _reduce(per_row(student_rows, teacher_rows), mask, reduction, num_items_in_batch)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = Σ_v a(v)·(log a(v) − log b(v)) per row, from log-probabilities."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1 − w)·b), computed stably from log a and log b (w = 0 or 1 allowed)."""
    log_w = math.log(weight_a) if weight_a > 0 else -math.inf
    log_1mw = math.log1p(-weight_a) if weight_a < 1 else -math.inf
    return torch.logaddexp(log_a + log_w, log_b + log_1mw)


# ---------------------------------------------------------------------------------------------------------
# Token-level divergences (the baselines)
# ---------------------------------------------------------------------------------------------------------


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The word-level KD loss: soft cross-entropy ``−Σ_v p(v)·log q(v)`` per token.

    It is forward KL plus the teacher's entropy H(p), which does not depend on the student (same gradient
    as :func:`forward_kl`, but not 0 for identical inputs). What torchtune calls ``ForwardKLLoss``.
    """

    def per_row(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return -(F.softmax(teacher, dim=-1) * F.log_softmax(student, dim=-1)).sum(-1)

    return _token_divergence(
        per_row, student_logits, teacher_logits, labels, temperature, reduction, num_items_in_batch
    )


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL per token: ``KL(p || q) = Σ_v p(v)·(log p(v) − log q(v))``.

    Includes the teacher's entropy term, so it is 0 when student and teacher logits are equal.
    """

    def per_row(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return _kl_rows(F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1))

    return _token_divergence(
        per_row, student_logits, teacher_logits, labels, temperature, reduction, num_items_in_batch
    )


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse KL per token: ``KL(q || p) = Σ_v q(v)·(log q(v) − log p(v))``."""

    def per_row(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return _kl_rows(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1))

    return _token_divergence(
        per_row, student_logits, teacher_logits, labels, temperature, reduction, num_items_in_batch
    )


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    beta: float = 0.5,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized Jensen–Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1), TRL's convention.

    For 0 < β < 1, with the mixture ``m = β·p + (1 − β)·q``:
    ``JSD_β = β·KL(p || m) + (1 − β)·KL(q || m)``.
    The end points are special-cased exactly as TRL's ``generalized_jsd_loss`` does: β = 0 gives forward KL
    ``KL(p || q)`` and β = 1 reverse KL ``KL(q || p)`` (the formula above tends to 0 at both ends, so β is
    discontinuous there). Temperature divides both logits; no T² factor.
    """
    _check_unit_interval("beta", beta)

    def per_row(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(student, dim=-1)
        log_p = F.log_softmax(teacher, dim=-1)
        if beta == 0.0:
            return _kl_rows(log_p, log_q)
        if beta == 1.0:
            return _kl_rows(log_q, log_p)
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)

    return _token_divergence(
        per_row, student_logits, teacher_logits, labels, temperature, reduction, num_items_in_batch
    )


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    alpha: float = 0.1,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """DistiLLM's skew KL per token: ``KL(p || α·p + (1 − α)·q)``.

    The mixture ``m = α·p + (1 − α)·q`` puts weight α on the teacher. DistiLLM's code returns the cross
    entropy ``−Σ p·log m``; this adds the teacher entropy (constant in the student, same gradient) so that
    the value is a true divergence, 0 for identical inputs. α = 0 is forward KL.
    """
    _check_unit_interval("alpha", alpha)

    def per_row(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(teacher, dim=-1)
        log_m = _log_mixture(log_p, F.log_softmax(student, dim=-1), alpha)
        return _kl_rows(log_p, log_m)

    return _token_divergence(
        per_row, student_logits, teacher_logits, labels, temperature, reduction, num_items_in_batch
    )


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    alpha: float = 0.1,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """DistiLLM's skew reverse KL per token: ``KL(q || α·q + (1 − α)·p)``.

    The mixture ``m = α·q + (1 − α)·p`` puts weight α on the student, as DistiLLM's ``skewed_reverse_kl``.
    α = 0 is reverse KL.
    """
    _check_unit_interval("alpha", alpha)

    def per_row(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(student, dim=-1)
        log_m = _log_mixture(log_q, F.log_softmax(teacher, dim=-1), alpha)
        return _kl_rows(log_q, log_m)

    return _token_divergence(
        per_row, student_logits, teacher_logits, labels, temperature, reduction, num_items_in_batch
    )


def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Total variation distance per token: ``TVD(p, q) = ½·Σ_v |p(v) − q(v)|``."""

    def per_row(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return 0.5 * (F.softmax(teacher, dim=-1) - F.softmax(student, dim=-1)).abs().sum(-1)

    return _token_divergence(
        per_row, student_logits, teacher_logits, labels, temperature, reduction, num_items_in_batch
    )


# ---------------------------------------------------------------------------------------------------------
# DPKD, token level (the released code's form)
# ---------------------------------------------------------------------------------------------------------

_TOKEN_DPKD_TYPES = ("sigmoid", "ipo", "dpop")


def _preference_nll(margin: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``−(1 − ε)·log σ(x) − ε·log σ(−x)``: the (label-smoothed) Bradley–Terry loss of margin x."""
    loss = -F.logsigmoid(margin)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margin)
    return loss


def dpkd_token_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    loss_type: str = "sigmoid",
    dpop_lambda: float = 50.0,
    *,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level DPKD, as the authors' released training code computes it (dpkd-method.md §3).

    At each valid position, with ℓ_s = log q and ℓ_t = log p over the vocabulary, the chosen token is the
    teacher's argmax ``a = argmax ℓ_t`` and the rejected token the student's ``c = argmax ℓ_s``;
    ``h = [ℓ_s(a) − ℓ_s(c)] − [ℓ_t(a) − ℓ_t(c)]`` (the teacher bracket is dropped when
    ``reference_free``). Per-token loss by ``loss_type``:

    - ``"sigmoid"``: ``d = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)`` (ε = ``label_smoothing``);
    - ``"ipo"``: ``d = (h − 1/(2β))²``;
    - ``"dpop"``: the sigmoid loss plus ``λ·max(0, ℓ_t(a) − ℓ_s(a))`` outside the sigmoid
      (λ = ``dpop_lambda``).

    Since h ≤ 0, the sigmoid loss is ≥ log 2 when ε = 0, exactly log 2 with zero gradient where a = c. The
    log-normalisers cancel inside h, so h is computed from the raw logits and, for ``sigmoid`` and ``ipo``,
    only the logits of a and c receive gradient. No temperature (the released code has none).
    """
    _check_token_inputs(student_logits, teacher_logits, labels, reduction)
    if loss_type not in _TOKEN_DPKD_TYPES:
        raise ValueError(
            f"loss_type must be one of {_TOKEN_DPKD_TYPES} for dpkd_token_loss; got {loss_type!r}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    _check_unit_interval("label_smoothing", label_smoothing)
    if loss_type == "ipo" and label_smoothing:
        raise ValueError(
            "label_smoothing applies to the sigmoid forms only; it must be 0 with loss_type='ipo'"
        )
    mask = labels != IGNORE_INDEX
    student_rows = _valid_rows(student_logits, mask)
    teacher_rows = _valid_rows(teacher_logits, mask)
    with torch.no_grad():
        chosen = teacher_rows.argmax(dim=-1, keepdim=True)
        rejected = student_rows.argmax(dim=-1, keepdim=True)
    student_chosen = _upcast(student_rows.gather(-1, chosen).squeeze(-1))
    margin = student_chosen - _upcast(student_rows.gather(-1, rejected).squeeze(-1))
    if not reference_free:
        teacher_chosen = _upcast(teacher_rows.gather(-1, chosen).squeeze(-1))
        margin = margin - (teacher_chosen - _upcast(teacher_rows.gather(-1, rejected).squeeze(-1)))

    if loss_type == "ipo":
        per_token = (margin - 1.0 / (2.0 * beta)) ** 2
    else:
        per_token = _preference_nll(beta * margin, label_smoothing)
    if loss_type == "dpop":
        teacher_logp_chosen = _upcast(teacher_rows.gather(-1, chosen).squeeze(-1)) - torch.logsumexp(
            _upcast(teacher_rows), dim=-1
        )
        student_logp_chosen = student_chosen - torch.logsumexp(_upcast(student_rows), dim=-1)
        per_token = per_token + dpop_lambda * torch.clamp(teacher_logp_chosen - student_logp_chosen, min=0.0)
    return _reduce(per_token, mask, reduction, num_items_in_batch)


#: Token-level losses by the short name a training configuration uses. Every entry has the signature
#: ``fn(student_logits, teacher_logits, labels, *, reduction=..., num_items_in_batch=..., **options)`` and
#: can be handed to :func:`chunked_token_loss`.
TOKEN_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "kd": soft_cross_entropy,
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "skl": skew_forward_kl,
    "srkl": skew_reverse_kl,
    "tvd": total_variation,
    "dpkd_token": dpkd_token_loss,
}


# ---------------------------------------------------------------------------------------------------------
# Sequence level: log-probabilities and the paper's DPKD objective
# ---------------------------------------------------------------------------------------------------------


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row of (N, V) logits, in float32, without a (N, V) log-softmax."""
    logits = _upcast(logits)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of label log-probabilities and number of scored tokens.

    ``sum_logps[b] = Σ_{i: labels[b, i] ≠ −100} log softmax(logits[b, i])[labels[b, i]]`` (float32), and
    ``n_tokens[b]`` counts those positions. Shapes: logits (B, L, V), labels (B, L); returns (B,), (B,).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, L, V) and labels (B, L); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    mask = labels != IGNORE_INDEX
    token_logps = _token_logps(_valid_rows(logits, mask), labels[mask])
    return _sum_per_sequence(token_logps, mask), mask.sum(dim=1)


def _sum_per_sequence(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter the values at the valid positions of ``mask`` (B, L) back to per-sequence sums (B,)."""
    sequence_index = mask.nonzero()[:, 0]
    return token_values.new_zeros(mask.size(0)).index_add(0, sequence_index, token_values)


_SEQUENCE_DPKD_TYPES = ("sigmoid", "ipo", "simpo", "cpo", "dpop")


def _normalise_by_length(logps: torch.Tensor, lengths: torch.Tensor | None, name: str) -> torch.Tensor:
    if lengths is None:
        return logps
    if lengths.shape != logps.shape:
        raise ValueError(f"{name} must have shape {tuple(logps.shape)}; got {tuple(lengths.shape)}")
    if bool((lengths <= 0).any()):
        raise ValueError(
            f"{name} must be positive (a response with no tokens has no per-token log-probability); "
            f"got {lengths.tolist()}"
        )
    return logps / lengths.to(logps.dtype)


def dpkd_sequence_loss(
    student_chosen_logps: torch.Tensor,
    student_rejected_logps: torch.Tensor,
    teacher_chosen_logps: torch.Tensor,
    teacher_rejected_logps: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    *,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    dpop_lambda: float = 50.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's sequence-level DPKD loss (Eq. 8; Eq. 9 with lengths) and its Table 2 variants.

    Chosen = the teacher's output y_t, rejected = the student's y_s; inputs are the summed log-probs
    ``log q(y_t), log q(y_s)`` (student) and ``log p(y_t), log p(y_s)`` (teacher), each (B,). When
    ``chosen_lengths``/``rejected_lengths`` are given, every log-prob below is divided by its response's
    length (Eq. 9); lengths must then be positive. Write ``π(y) = log q(y)`` (normalised if lengths),
    ``ρ(y) = log q(y) − log p(y)`` (normalised if lengths), ε = ``label_smoothing`` and
    ``ℓ_ε(x) = −(1 − ε)·log σ(x) − ε·log σ(−x)``. Per sequence, by ``loss_type``:

    - ``"sigmoid"`` (DPKD, Eq. 8/9): ``ℓ_ε(β·[ρ(y_t) − ρ(y_s)])``; without lengths this is TRL's DPO
      sigmoid loss with the teacher as the reference model.
    - ``"ipo"``: ``(ρ(y_t) − ρ(y_s) − 1/(2β))²`` (ε must be 0).
    - ``"simpo"`` (reference-free, lengths required): ``ℓ_ε(β·π(y_t) − β·π(y_s) − γ)``,
      γ = ``simpo_gamma``.
    - ``"cpo"`` (reference-free): ``ℓ_ε(β·[π(y_t) − π(y_s)]) − α·π(y_t)``, the preference term plus the
      NLL of the chosen output (per token when lengths are given), α = ``cpo_alpha``.
    - ``"dpop"`` (DPO-Positive, Pal et al. 2024): ``ℓ_ε(β·[ρ(y_t) − ρ(y_s) − λ·max(0, −ρ(y_t))])``: the
      penalty ``λ·max(0, log p(y_t) − log q(y_t))`` is taken off the chosen log-ratio, λ = ``dpop_lambda``.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,). Rewards are detached implicit rewards:
    ``β·ρ(y)`` for the reference-based types, ``β·π(y)`` for the reference-free ones (simpo, cpo).
    """
    if loss_type not in _SEQUENCE_DPKD_TYPES:
        raise ValueError(f"loss_type must be one of {_SEQUENCE_DPKD_TYPES}; got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    _check_unit_interval("label_smoothing", label_smoothing)
    if loss_type == "ipo" and label_smoothing:
        raise ValueError(
            "label_smoothing applies to the sigmoid forms only; it must be 0 with loss_type='ipo'"
        )
    if loss_type == "simpo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("loss_type='simpo' is length-normalised: pass chosen_lengths and rejected_lengths")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    shapes = {t.shape for t in (student_rejected_logps, teacher_chosen_logps, teacher_rejected_logps)}
    if shapes != {student_chosen_logps.shape}:
        raise ValueError("the four log-prob tensors must have the same shape (B,)")

    student_chosen = _normalise_by_length(_upcast(student_chosen_logps), chosen_lengths, "chosen_lengths")
    student_rejected = _normalise_by_length(
        _upcast(student_rejected_logps), rejected_lengths, "rejected_lengths"
    )
    if loss_type in ("simpo", "cpo"):
        chosen_score, rejected_score = student_chosen, student_rejected
    else:
        teacher_chosen = _normalise_by_length(_upcast(teacher_chosen_logps), chosen_lengths, "chosen_lengths")
        teacher_rejected = _normalise_by_length(
            _upcast(teacher_rejected_logps), rejected_lengths, "rejected_lengths"
        )
        chosen_score = student_chosen - teacher_chosen
        rejected_score = student_rejected - teacher_rejected

    difference = chosen_score - rejected_score
    if loss_type == "sigmoid":
        losses = _preference_nll(beta * difference, label_smoothing)
    elif loss_type == "ipo":
        losses = (difference - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "simpo":
        losses = _preference_nll(beta * difference - simpo_gamma, label_smoothing)
    elif loss_type == "cpo":
        losses = _preference_nll(beta * difference, label_smoothing) - cpo_alpha * student_chosen
    else:  # dpop
        penalty = dpop_lambda * torch.clamp(-chosen_score, min=0.0)
        losses = _preference_nll(beta * (difference - penalty), label_smoothing)
    return losses, beta * chosen_score.detach(), beta * rejected_score.detach()


# ---------------------------------------------------------------------------------------------------------
# Chunked forms: hidden states + lm_head weights in, no (tokens × vocab) tensor kept for the backward
# ---------------------------------------------------------------------------------------------------------


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """lm_head projection of (N, H) hidden states to (N, V) logits, in the weight's (upcast) dtype."""
    return F.linear(hidden.to(weight.dtype), weight, bias)


def _upcast_optional(tensor: torch.Tensor | None) -> torch.Tensor | None:
    # Cast once, outside the chunk loop: a bf16 lm_head would otherwise be copied to float32 per chunk.
    return None if tensor is None else _upcast(tensor)


def _checkpointed(function: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``function(*args)`` under activation checkpointing when a backward pass may follow."""
    if not torch.is_grad_enabled():  # scoring under no_grad / inference_mode: nothing to recompute
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")


def chunked_token_loss(
    loss_fn: Callable[..., torch.Tensor],
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 256,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    recompute: bool = True,
    **loss_kwargs,
) -> torch.Tensor:
    """Any token-level loss of this module, from final hidden states and ``lm_head`` weights.

    Equals ``loss_fn(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T +
    teacher_bias, labels, num_items_in_batch=num_items_in_batch, **loss_kwargs)`` in value and gradients,
    without materialising the (B, L, V) logits: the valid positions (label ≠ −100) are gathered, then
    processed ``chunk_size`` at a time; each chunk's summed loss (``reduction="sum"``) is computed under
    ``torch.utils.checkpoint`` so that its logits are recomputed in the backward pass instead of stored.
    The teacher's projection runs without gradient. The total is divided by the number of valid tokens, or
    by ``num_items_in_batch`` when given.

    ``recompute=False`` trades the recomputation for storage of hidden-size tensors: each chunk's gradient
    with respect to the student's hidden states, weight and bias is taken during the forward pass and kept
    ((N, H_s) and (V, H_s), never vocabulary-per-token), so the backward pass only scales it. Same values
    and gradients, about the dense form's time instead of one extra forward pass (docs/benchmarks.md);
    the loss cannot then be differentiated twice.

    Shapes: hidden states (B, L, H_s) and (B, L, H_t) (the widths may differ), weights (V, H_s) and
    (V, H_t), labels (B, L); ``hidden[:, i]`` predicts ``labels[:, i]`` (already shifted).
    """
    _check_chunk_size(chunk_size)
    if student_hidden.shape[:2] != labels.shape or teacher_hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)}, teacher_hidden {tuple(teacher_hidden.shape)} and "
            f"labels {tuple(labels.shape)} must agree on (B, L)"
        )
    if student_weight.size(0) != teacher_weight.size(0):
        raise ValueError(
            f"student and teacher lm_head weights must share the vocabulary; got {student_weight.size(0)} "
            f"and {teacher_weight.size(0)} rows"
        )
    mask = labels != IGNORE_INDEX
    student_rows = student_hidden[mask]
    teacher_rows = teacher_hidden[mask]
    row_labels = labels[mask]
    student_weight, student_bias = _upcast_optional(student_weight), _upcast_optional(student_bias)
    teacher_weight, teacher_bias = _upcast_optional(teacher_weight), _upcast_optional(teacher_bias)

    def chunk_loss(
        student_chunk: torch.Tensor,
        teacher_chunk: torch.Tensor,
        label_chunk: torch.Tensor,
        student_w: torch.Tensor,
        student_b: torch.Tensor | None,
    ) -> torch.Tensor:
        student_logits = _project(student_chunk, student_w, student_b)
        with torch.no_grad():
            teacher_logits = _project(teacher_chunk, teacher_weight, teacher_bias)
        return loss_fn(
            student_logits.unsqueeze(0),
            teacher_logits.unsqueeze(0),
            label_chunk.unsqueeze(0),
            reduction="sum",
            **loss_kwargs,
        )

    student_leaves = (student_rows, student_weight, student_bias)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in student_leaves)
    if not recompute and needs_grad:
        total = _GradientInForward.apply(chunk_loss, chunk_size, teacher_rows, row_labels, *student_leaves)
        return _divide_total(total, row_labels.numel(), num_items_in_batch)

    # Starts from a zero tied to the student's inputs so that an all-ignored batch still back-propagates.
    total = _upcast(student_rows).sum() * 0.0
    for start in range(0, row_labels.numel(), chunk_size):
        end = start + chunk_size
        total = total + _checkpointed(
            chunk_loss,
            student_rows[start:end],
            teacher_rows[start:end],
            row_labels[start:end],
            student_weight,
            student_bias,
        )
    return _divide_total(total, row_labels.numel(), num_items_in_batch)


def _divide_total(
    total: torch.Tensor, n_valid: int, num_items_in_batch: int | torch.Tensor | None
) -> torch.Tensor:
    if num_items_in_batch is None:
        return total / max(n_valid, 1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _GradientInForward(torch.autograd.Function):
    """Sum of ``chunk_loss`` over chunks, whose gradients w.r.t. the student's rows, weight and bias are
    computed chunk by chunk during the forward pass; the backward pass scales them by the output's grad."""

    @staticmethod
    def forward(ctx, chunk_loss, chunk_size, teacher_rows, row_labels, student_rows, weight, bias):
        wants = [x is not None and x.requires_grad for x in (student_rows, weight, bias)]
        grad_rows = torch.zeros_like(student_rows) if wants[0] else None
        grad_weight = torch.zeros_like(weight) if wants[1] else None
        grad_bias = torch.zeros_like(bias) if wants[2] else None
        total = weight.new_zeros(())
        for start in range(0, row_labels.numel(), chunk_size):
            end = start + chunk_size
            with torch.enable_grad():
                rows = student_rows[start:end].detach().requires_grad_(wants[0])
                chunk_weight = weight.detach().requires_grad_(wants[1])
                chunk_bias = None if bias is None else bias.detach().requires_grad_(wants[2])
                loss = chunk_loss(
                    rows, teacher_rows[start:end], row_labels[start:end], chunk_weight, chunk_bias
                )
                leaves = [x for x, want in zip((rows, chunk_weight, chunk_bias), wants) if want]
                chunk_grads = iter(torch.autograd.grad(loss, leaves))
            if wants[0]:
                grad_rows[start:end] = next(chunk_grads)
            if wants[1]:
                grad_weight += next(chunk_grads)
            if wants[2]:
                grad_bias += next(chunk_grads)
            total += loss.detach()
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if grad is None else grad * grad_total for grad in ctx.saved_tensors]
        return None, None, None, None, *grads


def chunked_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` of the logits ``hidden @ weight.T + bias``, without materialising them.

    Valid positions are projected ``chunk_size`` at a time under activation checkpointing (logits are
    recomputed in the backward pass). Shapes: hidden (B, L, H), weight (V, H), labels (B, L). Returns
    ``(sum_logps[B], n_tokens[B])`` with gradient to ``hidden``, ``weight`` and ``bias``.
    """
    _check_chunk_size(chunk_size)
    if hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must agree on (B, L)"
        )
    mask = labels != IGNORE_INDEX
    rows = hidden[mask]
    row_labels = labels[mask]
    weight, bias = _upcast_optional(weight), _upcast_optional(bias)

    def chunk_logps(
        hidden_chunk: torch.Tensor, label_chunk: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:
        return _token_logps(_project(hidden_chunk, w, b), label_chunk)

    chunks = [
        _checkpointed(
            chunk_logps,
            rows[start : start + chunk_size],
            row_labels[start : start + chunk_size],
            weight,
            bias,
        )
        for start in range(0, row_labels.numel(), chunk_size)
    ]
    token_logps = torch.cat(chunks) if chunks else _upcast(rows).sum(-1)
    return _sum_per_sequence(token_logps, mask), mask.sum(dim=1)
