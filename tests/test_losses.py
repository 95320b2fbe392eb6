"""dpkd.losses against float64 references written from the formulas, against TRL, and against its invariants.

The references below are deliberately naive: explicit exponentials and sums over one position at a time, in
float64, straight from each docstring's formula. Random logits are drawn fresh for every case (the generator
is seeded from the test's id), with -100 holes in the labels.
"""

from __future__ import annotations

import math
import weakref
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpkd.chunked_losses import chunked_token_loss
from dpkd.logprobs import chunked_sequence_logps, sequence_logps
from dpkd.losses import (
    TOKEN_LOSSES,
    dpkd_sequence_loss,
    dpkd_token_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    total_variation,
)

LOG2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id: fresh draws per case, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_logits(gen, batch, length, vocab, dtype=torch.float32, scale=3.0):
    return (scale * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)).to(dtype)


def random_labels(gen, batch, length, vocab, hole_fraction=0.3):
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    holes = torch.rand(batch, length, generator=gen) < hole_fraction
    labels[holes] = -100
    labels[0, 0] = -100  # at least one hole
    labels[-1, -1] = int(torch.randint(0, vocab, (1,), generator=gen))  # and at least one valid token
    return labels


# ---------------------------------------------------------------------------------------------------------
# float64 references, one position at a time
# ---------------------------------------------------------------------------------------------------------


def ref_probs(logits_row: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    z = logits_row.double() / temperature
    e = torch.exp(z - z.max())
    return e / e.sum()


def ref_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (torch.log(a) - torch.log(b))).sum()


def ref_soft_ce(p, q, **_):
    return -(p * torch.log(q)).sum()


def ref_forward_kl(p, q, **_):
    return ref_kl(p, q)


def ref_reverse_kl(p, q, **_):
    return ref_kl(q, p)


def ref_generalized_jsd(p, q, beta=0.5):
    if beta == 0:
        return ref_kl(p, q)
    if beta == 1:
        return ref_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def ref_skew_forward_kl(p, q, alpha=0.1):
    return ref_kl(p, alpha * p + (1 - alpha) * q)


def ref_skew_reverse_kl(p, q, alpha=0.1):
    return ref_kl(q, alpha * q + (1 - alpha) * p)


def ref_total_variation(p, q, **_):
    return 0.5 * (p - q).abs().sum()


DIVERGENCES = {
    "soft_cross_entropy": (soft_cross_entropy, ref_soft_ce),
    "forward_kl": (forward_kl, ref_forward_kl),
    "reverse_kl": (reverse_kl, ref_reverse_kl),
    "generalized_jsd": (generalized_jsd, ref_generalized_jsd),
    "skew_forward_kl": (skew_forward_kl, ref_skew_forward_kl),
    "skew_reverse_kl": (skew_reverse_kl, ref_skew_reverse_kl),
    "total_variation": (total_variation, ref_total_variation),
}
# Options exercised beyond the defaults.
DIVERGENCE_OPTIONS = {
    "generalized_jsd": [{}, {"beta": 0.0}, {"beta": 0.3}, {"beta": 1.0}],
    "skew_forward_kl": [{}, {"alpha": 0.4}],
    "skew_reverse_kl": [{}, {"alpha": 0.4}],
}
DIVERGENCE_CASES = [(name, options) for name in DIVERGENCES for options in DIVERGENCE_OPTIONS.get(name, [{}])]


def ref_token_mean(per_position, student, teacher, labels, num_items_in_batch=None):
    """Σ over valid positions of per_position(b, i), divided by their count or by num_items_in_batch."""
    total, count = 0.0, 0
    for b in range(labels.size(0)):
        for i in range(labels.size(1)):
            if labels[b, i] != -100:
                total = total + per_position(student[b, i], teacher[b, i])
                count += 1
    denominator = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
    return torch.as_tensor(total, dtype=torch.float64) / denominator


def ref_divergence(name, student, teacher, labels, temperature=1.0, num_items_in_batch=None, **options):
    ref = DIVERGENCES[name][1]
    return ref_token_mean(
        lambda s, t: ref(ref_probs(t, temperature), ref_probs(s, temperature), **options),
        student,
        teacher,
        labels,
        num_items_in_batch,
    )


def ref_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log σ(x) = −log(1 + e^(−x)), written as −logaddexp(0, −x) so that large |x| does not overflow."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return -torch.logaddexp(torch.zeros_like(x), -x)


def ref_dpkd_token_position(
    s, t, beta=0.1, label_smoothing=0.0, reference_free=False, loss_type="sigmoid", dpop_lambda=50.0
):
    log_q, log_p = torch.log(ref_probs(s)), torch.log(ref_probs(t))
    a, c = int(torch.argmax(log_p)), int(torch.argmax(log_q))
    h = log_q[a] - log_q[c]
    if not reference_free:
        h = h - (log_p[a] - log_p[c])
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    loss = -(1 - label_smoothing) * ref_log_sigmoid(beta * h) - label_smoothing * ref_log_sigmoid(-beta * h)
    if loss_type == "dpop":
        loss = loss + dpop_lambda * torch.clamp(log_p[a] - log_q[a], min=0.0)
    return loss


def ref_dpkd_token(student, teacher, labels, num_items_in_batch=None, **options):
    return ref_token_mean(
        lambda s, t: ref_dpkd_token_position(s, t, **options), student, teacher, labels, num_items_in_batch
    )


# ---------------------------------------------------------------------------------------------------------
# Token-level divergences
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("name", "options"), DIVERGENCE_CASES)
def test_divergence_matches_float64_formula(gen, name, options, batch, temperature):
    student, teacher = random_logits(gen, batch, 5, 13), random_logits(gen, batch, 5, 13)
    labels = random_labels(gen, batch, 5, 13)
    value = DIVERGENCES[name][0](student, teacher, labels, temperature, **options)
    assert value.dtype == torch.float32
    expected = ref_divergence(name, student, teacher, labels, temperature, **options)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    vocab=st.integers(2, 24),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    hole_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    use_num_items=st.booleans(),
)
def test_every_divergence_matches_formula_for_any_shape_and_mask(
    batch, length, vocab, temperature, hole_fraction, seed, use_num_items
):
    gen = torch.Generator().manual_seed(seed)
    student, teacher = random_logits(gen, batch, length, vocab), random_logits(gen, batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < hole_fraction] = -100
    num_items = 7 if use_num_items else None
    for name, options in DIVERGENCE_CASES:
        value = DIVERGENCES[name][0](
            student, teacher, labels, temperature, num_items_in_batch=num_items, **options
        )
        expected = ref_divergence(name, student, teacher, labels, temperature, num_items, **options)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("name", "options"), DIVERGENCE_CASES)
def test_divergence_gradients_pass_gradcheck(gen, name, options):
    student = random_logits(gen, 2, 3, 5, dtype=torch.float64).requires_grad_()
    teacher = random_logits(gen, 2, 3, 5, dtype=torch.float64).requires_grad_()
    labels = random_labels(gen, 2, 3, 5)
    fn = DIVERGENCES[name][0]
    assert torch.autograd.gradcheck(
        lambda s, t: fn(s, t, labels, 1.5, **options), (student, teacher), fast_mode=True
    )


@pytest.mark.parametrize(("name", "options"), [c for c in DIVERGENCE_CASES if c[0] != "soft_cross_entropy"])
def test_divergence_is_zero_for_identical_inputs(gen, name, options):
    logits = random_logits(gen, 2, 4, 11)
    labels = random_labels(gen, 2, 4, 11)
    value = DIVERGENCES[name][0](logits, logits.clone(), labels, 1.0, **options)
    torch.testing.assert_close(value, torch.tensor(0.0), atol=1e-6, rtol=0)


def test_soft_cross_entropy_is_forward_kl_plus_teacher_entropy(gen):
    student, teacher = random_logits(gen, 2, 4, 11), random_logits(gen, 2, 4, 11)
    labels = random_labels(gen, 2, 4, 11)
    entropy = soft_cross_entropy(teacher, teacher, labels)  # −Σ p log p
    torch.testing.assert_close(
        soft_cross_entropy(student, teacher, labels), forward_kl(student, teacher, labels) + entropy
    )


def test_jsd_and_skew_end_points_are_the_plain_kls(gen):
    student, teacher = random_logits(gen, 2, 4, 11), random_logits(gen, 2, 4, 11)
    labels = random_labels(gen, 2, 4, 11)
    fkl, rkl = forward_kl(student, teacher, labels), reverse_kl(student, teacher, labels)
    torch.testing.assert_close(generalized_jsd(student, teacher, labels, beta=0.0), fkl)
    torch.testing.assert_close(generalized_jsd(student, teacher, labels, beta=1.0), rkl)
    torch.testing.assert_close(skew_forward_kl(student, teacher, labels, alpha=0.0), fkl)
    torch.testing.assert_close(skew_reverse_kl(student, teacher, labels, alpha=0.0), rkl)


@pytest.fixture(scope="module")
def trl_generalized_jsd_loss():
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_trl(gen, trl_generalized_jsd_loss, beta, temperature):
    student = random_logits(gen, 3, 6, 17).requires_grad_()
    teacher = random_logits(gen, 3, 6, 17)
    labels = random_labels(gen, 3, 6, 17)
    ours = generalized_jsd(student, teacher, labels, temperature, beta=beta)
    theirs = trl_generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (ours_grad,) = torch.autograd.grad(ours, student)
    (theirs_grad,) = torch.autograd.grad(theirs, student)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-7)
    with_num_items = generalized_jsd(student, teacher, labels, temperature, beta=beta, num_items_in_batch=40)
    theirs_num_items = trl_generalized_jsd_loss(
        student, teacher, labels=labels, beta=beta, temperature=temperature, num_items_in_batch=40
    )
    torch.testing.assert_close(with_num_items, theirs_num_items, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "total_variation"])
def test_reductions_agree_with_each_other(gen, name):
    fn = DIVERGENCES[name][0]
    student, teacher = random_logits(gen, 2, 5, 9), random_logits(gen, 2, 5, 9)
    labels = random_labels(gen, 2, 5, 9)
    n_valid = int((labels != -100).sum())
    per_token = fn(student, teacher, labels, reduction="none")
    assert per_token.shape == labels.shape
    assert bool((per_token[labels == -100] == 0).all())
    total = fn(student, teacher, labels, reduction="sum")
    torch.testing.assert_close(per_token.sum(), total)
    torch.testing.assert_close(fn(student, teacher, labels), total / n_valid)
    torch.testing.assert_close(fn(student, teacher, labels, num_items_in_batch=torch.tensor(25)), total / 25)


def test_batch_without_valid_tokens_gives_zero_loss_with_a_gradient(gen):
    student = random_logits(gen, 2, 3, 7).requires_grad_()
    labels = torch.full((2, 3), -100)
    for fn in TOKEN_LOSSES.values():
        loss = fn(student, random_logits(gen, 2, 3, 7), labels)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, student)
        assert bool((grad == 0).all())


@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_token_losses_compute_in_float32_for_bfloat16_inputs(gen, name):
    student = random_logits(gen, 2, 4, 33, dtype=torch.bfloat16)
    teacher = random_logits(gen, 2, 4, 33, dtype=torch.bfloat16)
    labels = random_labels(gen, 2, 4, 33)
    value = TOKEN_LOSSES[name](student, teacher, labels)
    assert value.dtype == torch.float32
    # the same bf16 numbers, upcast by the caller: identical float32 maths
    torch.testing.assert_close(value, TOKEN_LOSSES[name](student.float(), teacher.float(), labels))


def test_teacher_logits_from_inference_mode_give_the_students_ordinary_gradient(gen):
    student = random_logits(gen, 2, 4, 9).requires_grad_()
    with torch.inference_mode():
        teacher = random_logits(gen, 2, 4, 9) * 1.0
    labels = random_labels(gen, 2, 4, 9)
    ordinary_teacher = teacher.clone()  # outside inference mode: an ordinary tensor, same values
    for fn in TOKEN_LOSSES.values():
        (grad,) = torch.autograd.grad(fn(student, teacher, labels), student)
        (expected,) = torch.autograd.grad(fn(student, ordinary_teacher, labels), student)
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_token_losses_reject_bad_inputs_with_clear_errors(gen):
    student, teacher = random_logits(gen, 2, 4, 9), random_logits(gen, 2, 4, 9)
    labels = random_labels(gen, 2, 4, 9)
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(student, teacher[..., :8], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        forward_kl(student, teacher, labels[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl(student, teacher, labels, 0.0)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student, teacher, labels, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        skew_forward_kl(student, teacher, labels, alpha=-0.1)
    with pytest.raises(ValueError, match="reduction"):
        total_variation(student, teacher, labels, reduction="batchmean")
    with pytest.raises(ValueError, match="loss_type"):
        dpkd_token_loss(student, teacher, labels, loss_type="simpo")


# ---------------------------------------------------------------------------------------------------------
# Token-level DPKD
# ---------------------------------------------------------------------------------------------------------

DPKD_TOKEN_CASES = [
    {},
    {"beta": 0.5},
    {"label_smoothing": 0.2},
    {"reference_free": True},
    {"loss_type": "ipo"},
    {"loss_type": "ipo", "reference_free": True, "beta": 0.3},
    {"loss_type": "dpop"},
    {"loss_type": "dpop", "dpop_lambda": 2.0, "label_smoothing": 0.1},
]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("options", DPKD_TOKEN_CASES)
def test_dpkd_token_loss_matches_float64_formula(gen, options, batch):
    student, teacher = random_logits(gen, batch, 6, 15), random_logits(gen, batch, 6, 15)
    labels = random_labels(gen, batch, 6, 15)
    value = dpkd_token_loss(student, teacher, labels, **options)
    assert value.dtype == torch.float32
    torch.testing.assert_close(
        value.double(), ref_dpkd_token(student, teacher, labels, **options), rtol=1e-5, atol=1e-6
    )
    with_num_items = dpkd_token_loss(student, teacher, labels, num_items_in_batch=50, **options)
    torch.testing.assert_close(
        with_num_items.double(), ref_dpkd_token(student, teacher, labels, 50, **options), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("options", DPKD_TOKEN_CASES)
def test_dpkd_token_loss_gradients_pass_gradcheck(gen, options):
    student = random_logits(gen, 2, 3, 6, dtype=torch.float64).requires_grad_()
    teacher = random_logits(gen, 2, 3, 6, dtype=torch.float64).requires_grad_()
    labels = random_labels(gen, 2, 3, 6)
    assert torch.autograd.gradcheck(
        lambda s, t: dpkd_token_loss(s, t, labels, **options), (student, teacher), fast_mode=True
    )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    vocab=st.integers(2, 40),
    beta=st.floats(0.01, 5.0),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
)
def test_dpkd_token_loss_is_at_least_log2_without_label_smoothing(batch, length, vocab, beta, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    student = random_logits(gen, batch, length, vocab, scale=scale)
    teacher = random_logits(gen, batch, length, vocab, scale=scale)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < 0.3] = -100
    valid = labels != -100
    for reference_free in (False, True):
        per_token = dpkd_token_loss(
            student, teacher, labels, beta, reference_free=reference_free, reduction="none"
        )
        assert bool((per_token[valid] >= torch.tensor(LOG2, dtype=torch.float32)).all())
        expected = ref_dpkd_token(student, teacher, labels, beta=beta, reference_free=reference_free)
        torch.testing.assert_close(
            per_token.sum().double() / valid.sum().clamp(min=1), expected, rtol=1e-5, atol=1e-6
        )


def _logits_with_planted_argmaxes(gen, batch, length, vocab, agree):
    """Logits whose teacher and student argmaxes coincide exactly where ``agree`` is True."""
    student, teacher = random_logits(gen, batch, length, vocab), random_logits(gen, batch, length, vocab)
    teacher_top = torch.randint(0, vocab, (batch, length), generator=gen)
    student_top = torch.where(agree, teacher_top, (teacher_top + 1) % vocab)
    teacher.scatter_add_(-1, teacher_top.unsqueeze(-1), torch.full((batch, length, 1), 50.0))
    student.scatter_add_(-1, student_top.unsqueeze(-1), torch.full((batch, length, 1), 50.0))
    return student, teacher, teacher_top, student_top


def test_dpkd_token_loss_is_exactly_log2_with_zero_gradient_where_argmaxes_agree(gen):
    agree = torch.rand(3, 8, generator=gen) < 0.5
    agree[0, 0], agree[0, 1] = True, False
    student, teacher, _, _ = _logits_with_planted_argmaxes(gen, 3, 8, 21, agree)
    student.requires_grad_()
    teacher.requires_grad_()
    labels = torch.zeros(3, 8, dtype=torch.long)
    per_token = dpkd_token_loss(student, teacher, labels, reduction="none")
    assert bool((per_token[agree] == -F.logsigmoid(torch.tensor(0.0))).all())
    assert bool((per_token[~agree] > LOG2).all())
    student_grad, teacher_grad = torch.autograd.grad(per_token.sum(), (student, teacher))
    assert bool((student_grad[agree] == 0).all()) and bool((teacher_grad[agree] == 0).all())
    assert bool((student_grad[~agree] != 0).any())


def test_dpkd_token_loss_gives_gradient_only_to_the_two_selected_logits(gen):
    agree = torch.rand(2, 7, generator=gen) < 0.3
    student, teacher, teacher_top, student_top = _logits_with_planted_argmaxes(gen, 2, 7, 19, agree)
    student.requires_grad_()
    labels = random_labels(gen, 2, 7, 19)
    for options in ({}, {"loss_type": "ipo"}, {"reference_free": True}, {"label_smoothing": 0.1}):
        (grad,) = torch.autograd.grad(dpkd_token_loss(student, teacher, labels, **options), student)
        selected = torch.zeros_like(grad, dtype=torch.bool)
        selected.scatter_(-1, teacher_top.unsqueeze(-1), True)
        selected.scatter_(-1, student_top.unsqueeze(-1), True)
        selected &= ((labels != -100) & ~agree).unsqueeze(-1)
        assert bool((grad[~selected] == 0).all()), options
        assert bool((grad[selected] != 0).all()), options


# ---------------------------------------------------------------------------------------------------------
# Sequence log-probabilities and sequence-level DPKD
# ---------------------------------------------------------------------------------------------------------


def ref_sequence_logps(logits, labels):
    sums, counts = [], []
    for b in range(labels.size(0)):
        total, count = torch.tensor(0.0, dtype=torch.float64), 0
        for i in range(labels.size(1)):
            if labels[b, i] != -100:
                total = total + torch.log(ref_probs(logits[b, i])[labels[b, i]])
                count += 1
        sums.append(total)
        counts.append(count)
    return torch.stack(sums), torch.tensor(counts)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 7),
    vocab=st.integers(2, 30),
    hole_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_sequence_logps_matches_float64_formula(batch, length, vocab, hole_fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = random_logits(gen, batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < hole_fraction] = -100
    sums, counts = sequence_logps(logits, labels)
    expected_sums, expected_counts = ref_sequence_logps(logits, labels)
    assert sums.dtype == torch.float32 and sums.shape == (batch,)
    torch.testing.assert_close(sums.double(), expected_sums, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == expected_counts.tolist()


def test_sequence_logps_gradients_pass_gradcheck(gen):
    logits = random_logits(gen, 3, 4, 6, dtype=torch.float64).requires_grad_()
    labels = random_labels(gen, 3, 4, 6)
    assert torch.autograd.gradcheck(lambda x: sequence_logps(x, labels)[0], (logits,), fast_mode=True)


def random_sequence_inputs(gen, batch, dtype=torch.float32):
    """Four summed log-probs (B,) and response lengths, shaped like real ones (about −2 nats a token)."""
    chosen_lengths = torch.randint(1, 30, (batch,), generator=gen)
    rejected_lengths = torch.randint(1, 30, (batch,), generator=gen)
    logps = [
        -(2.0 * lengths * torch.rand(batch, generator=gen, dtype=torch.float64)).to(dtype)
        for lengths in (chosen_lengths, rejected_lengths, chosen_lengths, rejected_lengths)
    ]
    return logps, chosen_lengths, rejected_lengths


def ref_sequence_loss(
    student_chosen,
    student_rejected,
    teacher_chosen,
    teacher_rejected,
    beta,
    chosen_lengths,
    rejected_lengths,
    label_smoothing,
    loss_type,
    simpo_gamma=0.5,
    cpo_alpha=1.0,
    dpop_lambda=50.0,
):
    """Per sequence, one at a time, from the docstring's formulas."""
    losses = []
    for b in range(student_chosen.size(0)):
        n_chosen = float(chosen_lengths[b]) if chosen_lengths is not None else 1.0
        n_rejected = float(rejected_lengths[b]) if rejected_lengths is not None else 1.0
        q_t, q_s = student_chosen[b].double() / n_chosen, student_rejected[b].double() / n_rejected
        p_t, p_s = teacher_chosen[b].double() / n_chosen, teacher_rejected[b].double() / n_rejected
        rho_t, rho_s = q_t - p_t, q_s - p_s

        def smoothed(x):
            return -(1 - label_smoothing) * ref_log_sigmoid(x) - label_smoothing * ref_log_sigmoid(-x)

        if loss_type == "sigmoid":
            loss = smoothed(beta * (rho_t - rho_s))
        elif loss_type == "ipo":
            loss = (rho_t - rho_s - 1 / (2 * beta)) ** 2
        elif loss_type == "simpo":
            loss = smoothed(beta * q_t - beta * q_s - simpo_gamma)
        elif loss_type == "cpo":
            loss = smoothed(beta * (q_t - q_s)) - cpo_alpha * q_t
        else:
            loss = smoothed(beta * (rho_t - rho_s - dpop_lambda * max(0.0, float(p_t - q_t))))
        losses.append(loss)
    return torch.stack(losses)


SEQUENCE_TYPES = [
    ("sigmoid", 0.0, {}),
    ("sigmoid", 0.1, {}),
    ("ipo", 0.0, {}),
    ("simpo", 0.0, {}),
    ("simpo", 0.1, {"simpo_gamma": 1.2}),
    ("cpo", 0.0, {}),
    ("cpo", 0.0, {"cpo_alpha": 0.3}),
    ("dpop", 0.0, {}),
    ("dpop", 0.0, {"dpop_lambda": 5.0}),
]
# simpo is length-normalised by definition: it runs with lengths only (its missing-length error is tested).
SEQUENCE_CASES = [
    (*case, with_lengths)
    for case in SEQUENCE_TYPES
    for with_lengths in (False, True)
    if with_lengths or case[0] != "simpo"
]


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize(("loss_type", "label_smoothing", "options", "with_lengths"), SEQUENCE_CASES)
def test_dpkd_sequence_loss_matches_float64_formula(
    gen, loss_type, label_smoothing, options, with_lengths, batch
):
    logps, chosen_lengths, rejected_lengths = random_sequence_inputs(gen, batch)
    if not with_lengths:
        chosen_lengths = rejected_lengths = None
    # a chosen response the student finds likelier than the teacher does, so dpop's hinge is seen at 0 too
    logps[0][0] = logps[2][0] + 0.5
    beta = float(torch.empty(()).uniform_(0.05, 2.0, generator=gen))
    losses, chosen_rewards, rejected_rewards = dpkd_sequence_loss(
        *logps, beta, chosen_lengths, rejected_lengths, label_smoothing, loss_type, **options
    )
    expected = ref_sequence_loss(
        *logps, beta, chosen_lengths, rejected_lengths, label_smoothing, loss_type, **options
    )
    assert losses.shape == (batch,) and losses.dtype == torch.float32
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-5)
    n_chosen = chosen_lengths if with_lengths else torch.ones(batch)
    n_rejected = rejected_lengths if with_lengths else torch.ones(batch)
    reference_free = loss_type in ("simpo", "cpo")
    chosen_score = logps[0] - (0 if reference_free else logps[2])
    rejected_score = logps[1] - (0 if reference_free else logps[3])
    torch.testing.assert_close(chosen_rewards, beta * chosen_score / n_chosen)
    torch.testing.assert_close(rejected_rewards, beta * rejected_score / n_rejected)
    assert not chosen_rewards.requires_grad


@pytest.mark.parametrize(("loss_type", "label_smoothing", "options", "with_lengths"), SEQUENCE_CASES)
def test_dpkd_sequence_loss_gradients_pass_gradcheck(gen, loss_type, label_smoothing, options, with_lengths):
    logps, chosen_lengths, rejected_lengths = random_sequence_inputs(gen, 3, dtype=torch.float64)
    # keep dpop's hinge away from its kink, where the derivative does not exist
    logps[0] = torch.where((logps[0] - logps[2]).abs() < 1e-3, logps[0] - 0.1, logps[0])
    if not with_lengths:
        chosen_lengths = rejected_lengths = None
    inputs = tuple(x.requires_grad_() for x in logps)

    def loss(*four):
        return dpkd_sequence_loss(
            *four, 0.3, chosen_lengths, rejected_lengths, label_smoothing, loss_type, **options
        )[0]

    assert torch.autograd.gradcheck(loss, inputs)


def trl_dpo_sigmoid_loss(
    chosen_token_logps, rejected_token_logps, ref_chosen_logps, ref_rejected_logps, beta
):
    """TRL 1.16's DPO sigmoid loss, run through ``DPOTrainer._compute_loss`` itself.

    TRL computes the loss only inside that method, which reads the policy's per-token log-probs from the
    model's output (its fused LM head) and the reference's summed log-probs from the batch when they are
    precomputed. A stand-in trainer and a stand-in policy feed it exactly those tensors, so the loss
    arithmetic that runs is TRL's own. Returns the batch-mean loss and TRL's logged mean rewards.
    """
    from trl import DPOTrainer

    per_token = torch.cat([chosen_token_logps, rejected_token_logps])  # TRL's batch is [chosen; rejected]
    rows, length = per_token.shape

    def policy(**_):
        zeros = torch.zeros(rows, length)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    policy.training = True
    trainer = SimpleNamespace(
        model=policy,
        accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, length + 1, dtype=torch.long),
        "completion_mask": torch.ones(rows, length + 1, dtype=torch.long),
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss, metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("batch", [1, 4])
def test_dpkd_sequence_loss_without_lengths_equals_trl_dpo_sigmoid_with_teacher_as_reference(
    gen, batch, beta
):
    chosen_tokens = (-2 * torch.rand(batch, 9, generator=gen)).requires_grad_()
    rejected_tokens = (-2 * torch.rand(batch, 9, generator=gen)).requires_grad_()
    teacher_chosen = -18 * torch.rand(batch, generator=gen)
    teacher_rejected = -18 * torch.rand(batch, generator=gen)
    trl_loss, trl_chosen_reward, trl_rejected_reward = trl_dpo_sigmoid_loss(
        chosen_tokens, rejected_tokens, teacher_chosen, teacher_rejected, beta
    )
    losses, chosen_rewards, rejected_rewards = dpkd_sequence_loss(
        chosen_tokens.sum(1), rejected_tokens.sum(1), teacher_chosen, teacher_rejected, beta
    )
    torch.testing.assert_close(losses.mean(), trl_loss)
    assert chosen_rewards.mean().item() == pytest.approx(trl_chosen_reward, rel=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(trl_rejected_reward, rel=1e-6)
    ours_grads = torch.autograd.grad(losses.mean(), (chosen_tokens, rejected_tokens))
    trl_grads = torch.autograd.grad(trl_loss, (chosen_tokens, rejected_tokens))
    for ours, theirs in zip(ours_grads, trl_grads):
        torch.testing.assert_close(ours, theirs)


def test_dpkd_sequence_loss_rejects_bad_lengths_and_options(gen):
    logps, chosen_lengths, rejected_lengths = random_sequence_inputs(gen, 3)
    zero = chosen_lengths.clone()
    zero[1] = 0
    with pytest.raises(ValueError, match="chosen_lengths must be positive"):
        dpkd_sequence_loss(*logps, 0.1, zero, rejected_lengths, loss_type="simpo")
    with pytest.raises(ValueError, match="simpo"):
        dpkd_sequence_loss(*logps, 0.1, loss_type="simpo")
    with pytest.raises(ValueError, match="both"):
        dpkd_sequence_loss(*logps, 0.1, chosen_lengths)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpkd_sequence_loss(*logps, 0.1, label_smoothing=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type"):
        dpkd_sequence_loss(*logps, 0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpkd_sequence_loss(*logps, 0.0)


def test_length_normalisation_is_what_eq9_adds_to_eq8(gen):
    logps, chosen_lengths, rejected_lengths = random_sequence_inputs(gen, 4)
    normalised = [
        logps[0] / chosen_lengths,
        logps[1] / rejected_lengths,
        logps[2] / chosen_lengths,
        logps[3] / rejected_lengths,
    ]
    eq9 = dpkd_sequence_loss(*logps, 0.5, chosen_lengths, rejected_lengths)[0]
    torch.testing.assert_close(eq9, dpkd_sequence_loss(*normalised, 0.5)[0])
    assert not torch.allclose(eq9, dpkd_sequence_loss(*logps, 0.5)[0])


# ---------------------------------------------------------------------------------------------------------
# Chunked forms against the dense ones
# ---------------------------------------------------------------------------------------------------------

CHUNKED_CASES = [
    ("kd", {}),
    ("fkl", {"temperature": 2.0}),
    ("rkl", {}),
    ("jsd", {"beta": 0.3, "temperature": 1.5}),
    ("skl", {}),
    ("srkl", {"alpha": 0.2}),
    ("tvd", {}),
    ("dpkd_token", {}),
    ("dpkd_token", {"loss_type": "ipo"}),
    ("dpkd_token", {"loss_type": "dpop", "label_smoothing": 0.1}),
]


def random_heads(gen, batch, length, vocab, student_width=8, teacher_width=12, bias=False):
    student_hidden = torch.randn(batch, length, student_width, generator=gen).requires_grad_()
    student_weight = (torch.randn(vocab, student_width, generator=gen) / 2).requires_grad_()
    teacher_hidden = torch.randn(batch, length, teacher_width, generator=gen)
    teacher_weight = torch.randn(vocab, teacher_width, generator=gen) / 2
    student_bias = torch.randn(vocab, generator=gen).requires_grad_() if bias else None
    teacher_bias = torch.randn(vocab, generator=gen) if bias else None
    return student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize(("batch", "chunk_size", "bias"), [(1, 4, False), (3, 5, True), (2, 256, False)])
@pytest.mark.parametrize(("name", "options"), CHUNKED_CASES)
def test_chunked_token_loss_equals_dense_in_value_and_gradients(
    gen, name, options, batch, chunk_size, bias, recompute
):
    hs, ws, ht, wt, bs, bt = random_heads(gen, batch, 9, 37, bias=bias)
    labels = random_labels(gen, batch, 9, 37)
    loss_fn = TOKEN_LOSSES[name]
    student_logits = F.linear(hs, ws, bs)
    teacher_logits = F.linear(ht, wt, bt)
    dense = loss_fn(student_logits, teacher_logits, labels, **options)
    chunked = chunked_token_loss(
        loss_fn,
        hs,
        ws,
        ht,
        wt,
        labels,
        chunk_size=chunk_size,
        student_bias=bs,
        teacher_bias=bt,
        recompute=recompute,
        **options,
    )
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-5)
    leaves = (hs, ws) if bs is None else (hs, ws, bs)
    for dense_grad, chunked_grad in zip(
        torch.autograd.grad(dense, leaves), torch.autograd.grad(chunked, leaves)
    ):
        torch.testing.assert_close(chunked_grad, dense_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_token_loss_divides_by_num_items_and_leaves_the_teacher_without_gradient(gen, recompute):
    hs, ws, ht, wt, _, _ = random_heads(gen, 2, 6, 23)
    wt.requires_grad_()
    labels = random_labels(gen, 2, 6, 23)
    options = {"chunk_size": 3, "recompute": recompute}
    total = chunked_token_loss(reverse_kl, hs, ws, ht, wt, labels, num_items_in_batch=1, **options)
    mean = chunked_token_loss(reverse_kl, hs, ws, ht, wt, labels, **options)
    torch.testing.assert_close(mean * (labels != -100).sum(), total)
    total.backward()
    assert wt.grad is None and ws.grad is not None


@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_token_loss_of_an_all_ignored_batch_is_zero_and_back_propagates(gen, recompute):
    hs, ws, ht, wt, _, _ = random_heads(gen, 2, 3, 11)
    loss = chunked_token_loss(forward_kl, hs, ws, ht, wt, torch.full((2, 3), -100), recompute=recompute)
    loss.backward()
    assert loss.item() == 0.0 and bool((hs.grad == 0).all())


def test_chunked_forms_keep_no_per_token_vocabulary_tensor_for_the_backward(gen):
    vocab, width = 97, 8
    hs, ws, ht, wt, _, _ = random_heads(gen, 2, 40, vocab, student_width=width, teacher_width=width)
    labels = random_labels(gen, 2, 40, vocab)
    saved_shapes: list[torch.Size] = []

    def pack(tensor):
        saved_shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunked_token_loss(generalized_jsd, hs, ws, ht, wt, labels, chunk_size=8)
        chunked_sequence_logps(hs, ws, labels, chunk_size=8)
    assert saved_shapes and not [shape for shape in saved_shapes if shape and shape[-1] == vocab]
    # recompute=False builds each chunk's graph inside its forward pass; none of it may outlive the chunk
    saved_refs: list[weakref.ref] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved_refs.append(weakref.ref(t)) or t, lambda t: t
    ):
        loss = chunked_token_loss(generalized_jsd, hs, ws, ht, wt, labels, chunk_size=8, recompute=False)
    assert saved_refs  # the chunk graphs did save tensors (among them (8, V) ones) ...
    alive = [ref() for ref in saved_refs if ref() is not None]  # ... which are gone now
    assert loss.requires_grad and not [t.shape for t in alive if t.dim() and t.shape[-1] == vocab]
    saved_shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        generalized_jsd(hs @ ws.T, ht @ wt.T, labels)
    assert [shape for shape in saved_shapes if shape and shape[-1] == vocab]  # the dense form does keep them


@pytest.mark.parametrize(("batch", "chunk_size", "bias"), [(1, 3, False), (4, 7, True)])
def test_chunked_sequence_logps_equals_dense_in_value_and_gradients(gen, batch, chunk_size, bias):
    hidden, weight, _, _, head_bias, _ = random_heads(gen, batch, 10, 29, bias=bias)
    labels = random_labels(gen, batch, 10, 29)
    dense_sums, dense_counts = sequence_logps(F.linear(hidden, weight, head_bias), labels)
    sums, counts = chunked_sequence_logps(hidden, weight, labels, bias=head_bias, chunk_size=chunk_size)
    torch.testing.assert_close(sums, dense_sums, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == dense_counts.tolist()
    leaves = (hidden, weight) if head_bias is None else (hidden, weight, head_bias)
    weights = torch.randn(batch, generator=gen)  # a generic downstream use of the per-sequence sums
    dense_grads = torch.autograd.grad((dense_sums * weights).sum(), leaves)
    chunked_grads = torch.autograd.grad((sums * weights).sum(), leaves)
    for dense_grad, chunked_grad in zip(dense_grads, chunked_grads):
        torch.testing.assert_close(chunked_grad, dense_grad, rtol=1e-5, atol=1e-5)


def test_chunked_forms_compute_in_float32_for_bfloat16_models(gen):
    hs, ws, ht, wt, _, _ = random_heads(gen, 2, 5, 31)
    hs, ws, ht, wt = (x.detach().bfloat16() for x in (hs, ws, ht, wt))
    labels = random_labels(gen, 2, 5, 31)
    loss = chunked_token_loss(forward_kl, hs, ws, ht, wt, labels, chunk_size=4)
    sums, _ = chunked_sequence_logps(hs, ws, labels, chunk_size=4)
    assert loss.dtype == sums.dtype == torch.float32
    upcast = [x.float() for x in (hs, ws, ht, wt)]
    torch.testing.assert_close(loss, forward_kl(upcast[0] @ upcast[1].T, upcast[2] @ upcast[3].T, labels))
    torch.testing.assert_close(sums, sequence_logps(upcast[0] @ upcast[1].T, labels)[0])


def test_chunked_forms_reject_mismatched_shapes(gen):
    hs, ws, ht, wt, _, _ = random_heads(gen, 2, 5, 31)
    labels = random_labels(gen, 2, 5, 31)
    with pytest.raises(ValueError, match="share the vocabulary"):
        chunked_token_loss(forward_kl, hs, ws, ht, wt[:30], labels)
    with pytest.raises(ValueError, match="must agree on"):
        chunked_token_loss(forward_kl, hs, ws, ht, wt, labels[:, :4])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_sequence_logps(hs, ws, labels, chunk_size=0)


def test_chunked_token_loss_accepts_a_teacher_run_under_inference_mode(gen):
    hs, ws, _, _, _, _ = random_heads(gen, 2, 5, 11)
    labels = random_labels(gen, 2, 5, 11)
    with torch.inference_mode():  # how the trainer runs the teacher
        teacher_hidden = torch.randn(2, 5, 6, generator=gen)
        teacher_weight = torch.randn(11, 6, generator=gen)
    for loss_fn in (forward_kl, dpkd_token_loss):
        loss = chunked_token_loss(loss_fn, hs, ws, teacher_hidden, teacher_weight, labels, chunk_size=3)
        dense = loss_fn(hs @ ws.T, teacher_hidden @ teacher_weight.T, labels)
        torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-5)
        for grad, dense_grad in zip(torch.autograd.grad(loss, (hs, ws)), torch.autograd.grad(dense, (hs, ws))):
            torch.testing.assert_close(grad, dense_grad, rtol=1e-5, atol=1e-5)
