"""Token-level losses from final hidden states and `lm_head` weights, a chunk of positions at a time.

:func:`chunked_token_loss` gives any token-level loss of `dpkd.losses` (and its gradients) without the
(B, L, V) logits: only the positions whose label is not -100 are projected, `chunk_size` at a time, through
the one chunk loop `dpkd.logprobs.map_chunks`. Its sequence-level counterpart is
`dpkd.logprobs.chunked_sequence_logps`. Time and memory against the dense forms: docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpkd.logprobs import divide_by_tokens, map_chunks, project, select_positions_shifted, upcast, upcast_head


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
    """Any token-level loss of `dpkd.losses`, from final hidden states and ``lm_head`` weights.

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
    and gradients without the extra forward pass per chunk (timings in docs/benchmarks.md); the loss
    cannot then be differentiated twice.

    Shapes: hidden states (B, L, H_s) and (B, L, H_t) (the widths may differ), weights (V, H_s) and
    (V, H_t), labels (B, L); ``hidden[:, i]`` predicts ``labels[:, i]`` (already shifted).
    """
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
    student = select_positions_shifted(student_hidden, labels)
    teacher_rows = select_positions_shifted(teacher_hidden, labels).hidden
    student_weight, student_bias = upcast_head(student_weight, student_bias)
    teacher_weight, teacher_bias = upcast_head(teacher_weight, teacher_bias)

    def chunk_loss(
        student_chunk: torch.Tensor,
        teacher_chunk: torch.Tensor,
        label_chunk: torch.Tensor,
        student_w: torch.Tensor,
        student_b: torch.Tensor | None,
    ) -> torch.Tensor:
        student_logits = project(student_chunk, student_w, student_b)
        with torch.no_grad():
            teacher_logits = project(teacher_chunk, teacher_weight, teacher_bias)
        return loss_fn(
            student_logits.unsqueeze(0),
            teacher_logits.unsqueeze(0),
            label_chunk.unsqueeze(0),
            reduction="sum",
            **loss_kwargs,
        )

    chunked = (student.hidden, teacher_rows, student.targets)
    head = (student_weight, student_bias)
    n_tokens = student.targets.numel()
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (student.hidden, *head))
    if not recompute and needs_grad:
        total = _GradientInForward.apply(chunk_loss, chunk_size, *chunked, *head)
        return divide_by_tokens(total, n_tokens, num_items_in_batch)

    # Starts from a zero tied to the student's inputs so that an all-ignored batch still back-propagates.
    total = upcast(student.hidden).sum() * 0.0
    for chunk_total in map_chunks(chunk_loss, chunked, head, chunk_size=chunk_size):
        total = total + chunk_total
    return divide_by_tokens(total, n_tokens, num_items_in_batch)


class _GradientInForward(torch.autograd.Function):
    """Sum of ``chunk_loss`` over chunks, whose gradients w.r.t. the student's rows, weight and bias are
    computed chunk by chunk during the forward pass; the backward pass scales them by the output's grad."""

    @staticmethod
    def forward(ctx, chunk_loss, chunk_size, student_rows, teacher_rows, row_labels, weight, bias):
        wants = [x is not None and x.requires_grad for x in (student_rows, weight, bias)]

        def loss_and_grads(rows, teacher_chunk, label_chunk, chunk_weight, chunk_bias):
            with torch.enable_grad():
                leaves = [
                    None if x is None else x.detach().requires_grad_(want)
                    for x, want in zip((rows, chunk_weight, chunk_bias), wants)
                ]
                loss = chunk_loss(leaves[0], teacher_chunk, label_chunk, leaves[1], leaves[2])
                grads = iter(torch.autograd.grad(loss, [x for x, want in zip(leaves, wants) if want]))
            return loss.detach(), [next(grads) if want else None for want in wants]

        grad_rows = torch.zeros_like(student_rows) if wants[0] else None
        grad_weight = torch.zeros_like(weight) if wants[1] else None
        grad_bias = torch.zeros_like(bias) if wants[2] else None
        total = weight.new_zeros(())
        chunks = map_chunks(
            loss_and_grads, (student_rows, teacher_rows, row_labels), (weight, bias), chunk_size=chunk_size,
            recompute=False,
        )
        for index, (loss, (rows_grad, weight_grad, bias_grad)) in enumerate(chunks):
            total += loss
            if wants[0]:
                grad_rows[index * chunk_size : index * chunk_size + rows_grad.size(0)] = rows_grad
            if wants[1]:
                grad_weight += weight_grad
            if wants[2]:
                grad_bias += bias_grad
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_rows, grad_weight, grad_bias = (None if g is None else g * grad_total for g in ctx.saved_tensors)
        return None, None, grad_rows, None, None, grad_weight, grad_bias
