"""Log-probabilities of label tokens: the one home of IGNORE_INDEX, loss-position selection and the chunk loop.

Every module that scores tokens (generation's scoring, the losses, the trainer's terms) selects the positions
whose label is not `IGNORE_INDEX` and reads log-softmax values there in float32, through the functions below.
`map_chunks` is the one loop that walks those positions a chunk of rows at a time; the chunked forms here
and in `dpkd.chunked_losses` run through it, so that no (tokens × vocabulary) tensor outlives its chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32, or as is when it is already float32 or float64."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


# ---------------------------------------------------------------------------------------------------------
# Selecting the loss-bearing positions
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Positions:
    """The loss-bearing positions of a batch: `hidden[n]` predicts `targets[n]` of sequence `rows[n]`."""

    hidden: torch.Tensor   # (N, H)
    targets: torch.Tensor  # (N,)
    rows: torch.Tensor     # (N,) which sequence of the batch each token belongs to


def valid_rows(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (N, ...) rows of `tensor` (B, L, ...) where `mask` (B, L) holds; a view, not a copy, when all do."""
    if bool(mask.all()):
        return tensor.reshape(-1, *tensor.shape[2:])
    return tensor[mask]


def select_positions_shifted(hidden: torch.Tensor, labels: torch.Tensor) -> Positions:
    """Hidden states (B, L, H) and labels (B, L) already aligned (hidden[:, i] scores labels[:, i])."""
    valid = labels != IGNORE_INDEX
    return Positions(valid_rows(hidden, valid), labels[valid], valid.nonzero()[:, 0])


def select_positions(hidden: torch.Tensor, labels: torch.Tensor) -> Positions:
    """Hidden states (B, L, H) and unshifted labels (B, L) → the N positions that predict a label."""
    return select_positions_shifted(hidden[:, :-1], labels[:, 1:])


def divide_by_tokens(
    total: torch.Tensor, n_tokens: int | torch.Tensor, num_items_in_batch: int | torch.Tensor | None
) -> torch.Tensor:
    """A summed loss per token: `total / num_items_in_batch`, or `total / max(n_tokens, 1)` when it is None.

    `num_items_in_batch` is the gradient-accumulation-correct count transformers' `Trainer` passes. The
    floor of 1 makes a batch without labelled tokens give 0 (with a gradient path), not 0/0.
    """
    if num_items_in_batch is None:
        if isinstance(n_tokens, torch.Tensor):
            return total / n_tokens.clamp(min=1)
        return total / max(n_tokens, 1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# ---------------------------------------------------------------------------------------------------------
# The chunk loop
# ---------------------------------------------------------------------------------------------------------


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """lm_head projection of (N, H) hidden states to (N, V) logits, in the weight's dtype."""
    return F.linear(hidden.to(weight.dtype), weight, bias)


def upcast_head(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An lm_head's weight and bias in float32 (see `upcast`), for the chunked forms.

    Cast once, before the chunk loop: a bf16 lm_head would otherwise be copied to float32 per chunk.
    """
    return upcast(weight), None if bias is None else upcast(bias)


def map_chunks(
    function: Callable[..., object],
    chunked: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor | None] = (),
    *,
    chunk_size: int,
    recompute: bool = True,
) -> Iterator:
    """`function(*chunks, *shared)` for consecutive chunks of `chunk_size` rows of the `chunked` tensors.

    Every tensor of `chunked` has the same number of rows (dim 0); `shared` ones (an lm_head's weight and
    bias) are passed whole to every call. The results come one at a time, so a caller can reduce them as they
    come. With `recompute` and gradient enabled each call runs under activation checkpointing: its
    intermediate tensors (a chunk's logits) are freed and recomputed in the backward pass. Under `no_grad`
    or `inference_mode` there is nothing to recompute and the function runs as is.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    n_rows = chunked[0].size(0)

    def call(start: int):
        args = (*(tensor[start : start + chunk_size] for tensor in chunked), *shared)
        if recompute and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    return (call(start) for start in range(0, n_rows, chunk_size))


# ---------------------------------------------------------------------------------------------------------
# Sequence log-probabilities
# ---------------------------------------------------------------------------------------------------------


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row of (N, V) logits, in float32, without a (N, V) log-softmax."""
    logits = upcast(logits)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _sum_per_sequence(
    token_logps: torch.Tensor, positions: Positions, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N,) values at `positions` summed per sequence, and each sequence's number of labelled tokens."""
    sums = token_logps.new_zeros(labels.size(0)).index_add(0, positions.rows, token_logps)
    return sums, (labels != IGNORE_INDEX).sum(dim=1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of label log-probabilities and number of scored tokens.

    ``sum_logps[b] = Σ_{i: labels[b, i] ≠ −100} log softmax(logits[b, i])[labels[b, i]]`` (float32), and
    ``n_tokens[b]`` counts those positions. Shapes: logits (B, L, V), labels (B, L); returns (B,), (B,).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, L, V) and labels (B, L); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    positions = select_positions_shifted(logits, labels)  # its `hidden` rows are logits rows here
    return _sum_per_sequence(_token_logps(positions.hidden, positions.targets), positions, labels)


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
    if hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must agree on (B, L)"
        )
    positions = select_positions_shifted(hidden, labels)

    def chunk_logps(
        hidden_chunk: torch.Tensor, target_chunk: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:
        return _token_logps(project(hidden_chunk, w, b), target_chunk)

    chunks = list(
        map_chunks(
            chunk_logps, (positions.hidden, positions.targets), upcast_head(weight, bias), chunk_size=chunk_size
        )
    )
    token_logps = torch.cat(chunks) if chunks else upcast(positions.hidden).sum(-1)
    return _sum_per_sequence(token_logps, positions, labels)


def sequence_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunked: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log softmax(hidden @ weight.T + bias)[label] per sequence over labelled tokens, and their counts.

    Shapes: hidden (B, L, H), weight (V, H), labels (B, L), already aligned (`hidden[:, i]` predicts
    `labels[:, i]`). Only the labelled positions are projected; log-softmax in float32. `chunked` projects
    them a chunk at a time under activation checkpointing, for large vocabularies. Returns (B,), (B,).
    """
    if chunked:
        return chunked_sequence_logps(hidden, weight, labels, bias=bias)
    positions = select_positions_shifted(hidden, labels)
    token_logps = _token_logps(F.linear(positions.hidden, weight, bias), positions.targets)
    return _sum_per_sequence(token_logps, positions, labels)
