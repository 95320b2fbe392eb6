"""dpkd.logprobs: position selection, the chunk loop, and sequence log-probs from hidden states.

The chunked forms' values and gradients against the dense ones are held in tests/test_losses.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpkd.logprobs import (
    IGNORE_INDEX,
    divide_by_tokens,
    map_chunks,
    select_positions,
    sequence_logps,
    sequence_logps_from_hidden,
)


def test_select_positions_pairs_each_hidden_state_with_the_next_label():
    hidden = torch.arange(2 * 4, dtype=torch.float64).reshape(2, 4, 1)
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]])
    positions = select_positions(hidden, labels)
    # hidden[b, i] predicts labels[b, i + 1]
    assert positions.hidden.squeeze(-1).tolist() == [0.0, 1.0, 5.0, 6.0]
    assert positions.targets.tolist() == [5, 6, 7, 8]
    assert positions.rows.tolist() == [0, 0, 1, 1]


def test_map_chunks_visits_every_row_once_in_order_and_passes_shared_tensors_whole():
    rows, shared = torch.arange(7.0), torch.tensor(10.0)
    chunks = list(map_chunks(lambda chunk, extra: chunk + extra, (rows,), (shared,), chunk_size=3))
    assert [chunk.tolist() for chunk in chunks] == [[10.0, 11.0, 12.0], [13.0, 14.0, 15.0], [16.0]]
    assert list(map_chunks(lambda chunk: chunk, (rows[:0],), chunk_size=3)) == []
    with pytest.raises(ValueError, match="chunk_size"):
        map_chunks(lambda chunk: chunk, (rows,), chunk_size=0)


def test_map_chunks_recomputes_each_chunk_in_the_backward_pass_only_when_asked():
    calls = []

    def square(chunk):
        calls.append(len(chunk))
        return (chunk**2).sum()

    rows = torch.arange(5.0, requires_grad=True)
    for recompute, expected_calls in ((True, [2, 2, 1, 2, 2, 1]), (False, [2, 2, 1])):
        calls.clear()
        total = sum(map_chunks(square, (rows,), chunk_size=2, recompute=recompute))
        (grad,) = torch.autograd.grad(total, rows)
        torch.testing.assert_close(grad, 2 * rows.detach())
        assert sorted(calls) == sorted(expected_calls)


def test_divide_by_tokens_floors_the_count_at_one_and_prefers_num_items():
    total = torch.tensor(6.0)
    assert divide_by_tokens(total, 3, None).item() == 2.0
    assert divide_by_tokens(total, torch.tensor(0), None).item() == 6.0  # no labelled token: over 1, not 0/0
    assert divide_by_tokens(total, 3, torch.tensor(4)).item() == 1.5


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_sequence_logps_from_hidden_equals_the_logits_form_in_value_and_gradient(chunked, bias):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    head_bias = torch.randn(11, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[0, :2] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a sequence without labelled tokens sums to 0
    sums, counts = sequence_logps_from_hidden(hidden, weight, labels, bias=head_bias, chunked=chunked)
    dense_sums, dense_counts = sequence_logps(F.linear(hidden, weight, head_bias), labels)
    torch.testing.assert_close(sums, dense_sums)
    assert counts.tolist() == dense_counts.tolist() == [4, 6, 0] and sums[2].item() == 0.0
    leaves = [x for x in (hidden, weight, head_bias) if x is not None]
    scale = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    for grad, dense_grad in zip(
        torch.autograd.grad((sums * scale).sum(), leaves), torch.autograd.grad((dense_sums * scale).sum(), leaves)
    ):
        torch.testing.assert_close(grad, dense_grad)
