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

The chunked forms take final hidden states and ``lm_head`` weights instead of logits, project only the valid
positions, a chunk at a time, and recompute each chunk's logits in the backward pass, so no
(tokens × vocab) tensor outlives its chunk; they give the values and gradients of the dense forms.
:func:`chunked_token_loss` lives in `dpkd.chunked_losses`; :func:`sequence_logps` and
:func:`chunked_sequence_logps` live in `dpkd.logprobs`, with ``IGNORE_INDEX`` and the one chunk loop. All
are importable from here too. Their time and memory against the dense forms: docs/benchmarks.md.

:data:`TOKEN_LOSSES` maps the short names the trainer's configuration uses to the token-level losses.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dpkd.chunked_losses import chunked_token_loss
from dpkd.logprobs import (
    IGNORE_INDEX,
    chunked_sequence_logps,
    divide_by_tokens,
    sequence_logps,
    upcast,
    valid_rows,
)

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


def _scaled_float_rows(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    rows = upcast(valid_rows(logits, mask))
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
    return divide_by_tokens(total, mask.sum(), num_items_in_batch)


def _token_divergence(per_row: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The token-level loss whose value at each valid position is ``per_row(student, teacher, **options)``.

    ``per_row`` receives the valid positions' logits as (N, V) rows, divided by the temperature, in float32
    (float64 stays float64), and returns the (N,) per-token values; its keyword-only parameters are the
    loss's options. The loss is called as ``fn(student_logits, teacher_logits, labels, temperature=1.0, *,
    reduction="mean", num_items_in_batch=None, **options)``, checks its inputs and reduces as the module
    docstring describes. It keeps ``per_row``'s name and docstring (the formula).
    """

    def loss(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        temperature: float = 1.0,
        *,
        reduction: str = "mean",
        num_items_in_batch: int | torch.Tensor | None = None,
        **options,
    ) -> torch.Tensor:
        _check_token_inputs(student_logits, teacher_logits, labels, reduction)
        _check_temperature(temperature)
        mask = labels != IGNORE_INDEX
        student_rows = _scaled_float_rows(student_logits, mask, temperature)
        teacher_rows = _scaled_float_rows(teacher_logits, mask, temperature)
        return _reduce(per_row(student_rows, teacher_rows, **options), mask, reduction, num_items_in_batch)

    loss.__name__ = loss.__qualname__ = per_row.__name__
    loss.__doc__ = per_row.__doc__
    # What help() shows: the loss's parameters, then per_row's options (beta, alpha) in place of **options.
    signature = inspect.signature(loss)
    option_parameters = [
        p for p in inspect.signature(per_row).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    loss.__signature__ = signature.replace(
        parameters=[*list(signature.parameters.values())[:-1], *option_parameters]
    )
    return loss


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = Σ_v a(v)·(log a(v) − log b(v)) per row, from log-probabilities."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1 − w)·b), computed stably from log a and log b (w = 0 or 1 allowed)."""
    log_w = math.log(weight_a) if weight_a > 0 else -math.inf
    log_1mw = math.log1p(-weight_a) if weight_a < 1 else -math.inf
    return torch.logaddexp(log_a + log_w, log_b + log_1mw)


# ---------------------------------------------------------------------------------------------------------
# Token-level divergences (the baselines). Each is written per row of valid-position logits, already
# divided by T; `_token_divergence` makes it a loss on (B, L, V) logits and (B, L) labels.
# ---------------------------------------------------------------------------------------------------------


@_token_divergence
def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The word-level KD loss: soft cross-entropy ``−Σ_v p(v)·log q(v)`` per token.

    It is forward KL plus the teacher's entropy H(p), which does not depend on the student (same gradient
    as :func:`forward_kl`, but not 0 for identical inputs). What torchtune calls ``ForwardKLLoss``.
    """
    return -(F.softmax(teacher, dim=-1) * F.log_softmax(student, dim=-1)).sum(-1)


@_token_divergence
def forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Forward KL per token: ``KL(p || q) = Σ_v p(v)·(log p(v) − log q(v))``.

    Includes the teacher's entropy term, so it is 0 when student and teacher logits are equal.
    """
    return _kl_rows(F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1))


@_token_divergence
def reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Reverse KL per token: ``KL(q || p) = Σ_v q(v)·(log q(v) − log p(v))``."""
    return _kl_rows(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1))


@_token_divergence
def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen–Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1), TRL's convention.

    For 0 < β < 1, with the mixture ``m = β·p + (1 − β)·q``:
    ``JSD_β = β·KL(p || m) + (1 − β)·KL(q || m)``.
    The end points are special-cased exactly as TRL's ``generalized_jsd_loss`` does: β = 0 gives forward KL
    ``KL(p || q)`` and β = 1 reverse KL ``KL(q || p)`` (the formula above tends to 0 at both ends, so β is
    discontinuous there). Temperature divides both logits; no T² factor.
    """
    _check_unit_interval("beta", beta)
    log_q = F.log_softmax(student, dim=-1)
    log_p = F.log_softmax(teacher, dim=-1)
    if beta == 0.0:
        return _kl_rows(log_p, log_q)
    if beta == 1.0:
        return _kl_rows(log_q, log_p)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


@_token_divergence
def skew_forward_kl(student: torch.Tensor, teacher: torch.Tensor, *, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew KL per token: ``KL(p || α·p + (1 − α)·q)``.

    The mixture ``m = α·p + (1 − α)·q`` puts weight α on the teacher. DistiLLM's code returns the cross
    entropy ``−Σ p·log m``; this adds the teacher entropy (constant in the student, same gradient) so that
    the value is a true divergence, 0 for identical inputs. α = 0 is forward KL.
    """
    _check_unit_interval("alpha", alpha)
    log_p = F.log_softmax(teacher, dim=-1)
    log_m = _log_mixture(log_p, F.log_softmax(student, dim=-1), alpha)
    return _kl_rows(log_p, log_m)


@_token_divergence
def skew_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, *, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew reverse KL per token: ``KL(q || α·q + (1 − α)·p)``.

    The mixture ``m = α·q + (1 − α)·p`` puts weight α on the student, as DistiLLM's ``skewed_reverse_kl``.
    α = 0 is reverse KL.
    """
    _check_unit_interval("alpha", alpha)
    log_q = F.log_softmax(student, dim=-1)
    log_m = _log_mixture(log_q, F.log_softmax(teacher, dim=-1), alpha)
    return _kl_rows(log_q, log_m)


@_token_divergence
def total_variation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Total variation distance per token: ``TVD(p, q) = ½·Σ_v |p(v) − q(v)|``."""
    return 0.5 * (F.softmax(teacher, dim=-1) - F.softmax(student, dim=-1)).abs().sum(-1)


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


def _check_preference_options(
    function: str, loss_types: tuple[str, ...], loss_type: str, beta: float, label_smoothing: float
) -> None:
    """The option checks both DPKD losses share: a known ``loss_type``, β > 0, ε in [0, 1], ε = 0 for ipo."""
    if loss_type not in loss_types:
        raise ValueError(f"loss_type must be one of {loss_types} for {function}; got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    _check_unit_interval("label_smoothing", label_smoothing)
    if loss_type == "ipo" and label_smoothing:
        raise ValueError(
            "label_smoothing applies to the sigmoid forms only; it must be 0 with loss_type='ipo'"
        )


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
    _check_preference_options("dpkd_token_loss", _TOKEN_DPKD_TYPES, loss_type, beta, label_smoothing)
    mask = labels != IGNORE_INDEX
    student_rows = valid_rows(student_logits, mask)
    teacher_rows = valid_rows(teacher_logits, mask)
    with torch.no_grad():
        chosen = teacher_rows.argmax(dim=-1, keepdim=True)
        rejected = student_rows.argmax(dim=-1, keepdim=True)
    student_chosen = upcast(student_rows.gather(-1, chosen).squeeze(-1))
    margin = student_chosen - upcast(student_rows.gather(-1, rejected).squeeze(-1))
    if not reference_free:
        teacher_chosen = upcast(teacher_rows.gather(-1, chosen).squeeze(-1))
        margin = margin - (teacher_chosen - upcast(teacher_rows.gather(-1, rejected).squeeze(-1)))

    if loss_type == "ipo":
        per_token = (margin - 1.0 / (2.0 * beta)) ** 2
    else:
        per_token = _preference_nll(beta * margin, label_smoothing)
    if loss_type == "dpop":
        teacher_logp_chosen = upcast(teacher_rows.gather(-1, chosen).squeeze(-1)) - torch.logsumexp(
            upcast(teacher_rows), dim=-1
        )
        student_logp_chosen = student_chosen - torch.logsumexp(upcast(student_rows), dim=-1)
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
# Sequence level: the paper's DPKD objective (the summed log-probs come from `dpkd.logprobs`)
# ---------------------------------------------------------------------------------------------------------


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
    _check_preference_options("dpkd_sequence_loss", _SEQUENCE_DPKD_TYPES, loss_type, beta, label_smoothing)
    if loss_type == "simpo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("loss_type='simpo' is length-normalised: pass chosen_lengths and rejected_lengths")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    shapes = {t.shape for t in (student_rejected_logps, teacher_chosen_logps, teacher_rejected_logps)}
    if shapes != {student_chosen_logps.shape}:
        raise ValueError("the four log-prob tensors must have the same shape (B,)")

    student_chosen = _normalise_by_length(upcast(student_chosen_logps), chosen_lengths, "chosen_lengths")
    student_rejected = _normalise_by_length(
        upcast(student_rejected_logps), rejected_lengths, "rejected_lengths"
    )
    if loss_type in ("simpo", "cpo"):
        chosen_score, rejected_score = student_chosen, student_rejected
    else:
        teacher_chosen = _normalise_by_length(upcast(teacher_chosen_logps), chosen_lengths, "chosen_lengths")
        teacher_rejected = _normalise_by_length(
            upcast(teacher_rejected_logps), rejected_lengths, "rejected_lengths"
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

