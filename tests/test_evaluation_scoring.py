"""Teacher diagnostics (the paper's Table 3) against unpadded, one-example-at-a-time float64 references."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpkd.evaluation import first_token_reverse_kl, implicit_rewards, response_logps

PROMPTS = ["Sort the list: 3, 1, 2.", "one", "Reverse the word house and then tell me why it matters"]
RESPONSES = ["1, 2, 3", "two three four five six seven", ""]


def reference_logp(model, prompt_ids, response_ids) -> float:
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(logps[len(prompt_ids) + j - 1, t].item() for j, t in enumerate(response_ids))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batches_score_like_single_unpadded_sequences(arch, model_pairs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_pairs[arch][1])
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    response_ids = [tokenizer(r)["input_ids"] + [tokenizer.eos_token_id] for r in RESPONSES]
    sums, lengths = response_logps(model, prompt_ids, response_ids, pad_token_id=tokenizer.pad_token_id,
                                   batch_size=3)
    expected = [reference_logp(model, p, r) for p, r in zip(prompt_ids, response_ids)]
    assert sums.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert lengths.tolist() == [len(r) for r in response_ids]


def test_implicit_reward_is_beta_times_log_ratio_and_per_token_divides_by_length(
        teacher_dir, student_dir, tokenizer):
    student, teacher = AutoModelForCausalLM.from_pretrained(student_dir), AutoModelForCausalLM.from_pretrained(teacher_dir)
    beta = 0.5
    got = implicit_rewards(student, teacher, tokenizer, PROMPTS, RESPONSES, beta=beta, max_prompt_length=4,
                           batch_size=2)
    rewards, per_token = [], []
    for prompt, response in zip(PROMPTS, RESPONSES):
        p_ids = tokenizer(prompt)["input_ids"][-4:]  # prompts keep their last tokens, as in generation
        r_ids = tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
        reward = beta * (reference_logp(student, p_ids, r_ids) - reference_logp(teacher, p_ids, r_ids))
        rewards.append(reward)
        per_token.append(reward / len(r_ids))
    assert got["reward"] == pytest.approx(sum(rewards) / 3, rel=1e-4, abs=1e-5)
    assert got["reward_per_token"] == pytest.approx(sum(per_token) / 3, rel=1e-4, abs=1e-5)


def test_first_token_reverse_kl_matches_float64_formula_and_vanishes_for_one_model(
        teacher_dir, student_dir, tokenizer):
    student, teacher = AutoModelForCausalLM.from_pretrained(student_dir), AutoModelForCausalLM.from_pretrained(teacher_dir)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = 0.0
    with torch.no_grad():
        for ids in prompt_ids:
            log_q = student(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
            log_p = teacher(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
            expected += (log_q.exp() * (log_q - log_p)).sum().item() / len(prompt_ids)
    got = first_token_reverse_kl(student, teacher, prompt_ids, pad_token_id=tokenizer.pad_token_id,
                                 batch_size=2)
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-4)
    assert first_token_reverse_kl(student, student, prompt_ids, pad_token_id=0) == pytest.approx(0.0, abs=1e-6)
