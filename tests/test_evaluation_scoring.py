"""Teacher diagnostics (the paper's Table 3) against unpadded, one-example-at-a-time float64 references."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpkd.data import encode_prompt
from dpkd.evaluation import evaluate_model, first_token_reverse_kl, implicit_rewards, response_logps
from dpkd.generation import SamplingConfig
from dpkd.modeling import save_model_and_tokenizer, tiny_config

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
    response_ids = [tokenizer(r)["input_ids"] + [tokenizer.eos_token_id] for r in RESPONSES]
    response_ids[1] = response_ids[1][:-1]  # stopped at the token limit: no EOS
    got = implicit_rewards(student, teacher, tokenizer, PROMPTS, response_ids, beta=beta, max_prompt_length=4,
                           batch_size=2)
    rewards, per_token = [], []
    for prompt, r_ids in zip(PROMPTS, response_ids):
        p_ids = tokenizer(prompt)["input_ids"][-4:]  # prompts keep their last tokens, as in generation
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


def bigram_model(tokenizer, next_token: dict[int, int], default: int):
    """A tiny Llama whose most likely next token depends only on the current one: `next_token[t]`, else
    `default` (logit 8 against 0 for every other token).

    Its blocks add nothing (output projections zeroed), so the last hidden state is the current token's
    embedding, a one-hot direction per target that the LM head maps to that target.
    """
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", len(tokenizer), n_layer=1, d_model=16, n_head=2, eos_token_id=tokenizer.eos_token_id))
    targets = sorted({default, *next_token.values()})
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding = model.model.embed_tokens.weight
        embedding.zero_()
        embedding[:, targets.index(default)] = 1.0
        for token, target in next_token.items():
            embedding[token].zero_()
            embedding[token, targets.index(target)] = 1.0
        model.lm_head.weight.zero_()
        for direction, target in enumerate(targets):
            model.lm_head.weight[target, direction] = 2.0  # RMSNorm scales a one-hot by sqrt(16): logit 8
    return model


def test_implicit_reward_scores_the_sampled_token_ids_not_the_text_re_encoded(
        teacher_dir, tokenizer, tmp_path):
    t, h, eos = (tokenizer.convert_tokens_to_ids(tok) for tok in ("t", "h", tokenizer.eos_token))
    prompts = ["Say it", "Reverse the word house"]
    last = [encode_prompt(tokenizer, p)[-1] for p in prompts]
    assert len({t, h, eos, *last}) == 5
    # Prompt 0 gets "t", "h", EOS; prompt 1 gets "h", EOS and then padding while prompt 0 finishes.
    student = bigram_model(tokenizer, {last[1]: h, t: h, h: eos}, default=t)
    student_dir = save_model_and_tokenizer(student, tokenizer, tmp_path / "student")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "th"}) + "\n" for p in prompts))
    beta = 0.5
    metrics = evaluate_model(student_dir, teacher_dir=teacher_dir, data=[str(data)], seeds=[1], batch_size=2,
                             sampling=SamplingConfig(max_new_tokens=4, do_sample=False), max_prompt_length=None,
                             beta=beta, out_dir=tmp_path / "eval")

    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions" / "pairs" / "seed1.jsonl").open()]
    assert [r["response_ids"] for r in records] == [[t, h, eos], [h, eos]]
    assert [r["prediction"] for r in records] == ["th", "h"]
    # What the old scoring used: byte-level BPE merges "t" "h" into "th".
    assert tokenizer("th", add_special_tokens=False)["input_ids"] + [eos] != [t, h, eos]

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    scores = metrics["sets"]["pairs"]["per_seed"]["1"]["implicit_reward"]
    for outputs, folder in (("student_outputs", "predictions"), ("teacher_outputs", "teacher_predictions")):
        records = [json.loads(line) for line in (tmp_path / "eval" / folder / "pairs" / "seed1.jsonl").open()]
        rewards = [beta * (reference_logp(student, encode_prompt(tokenizer, p), r["response_ids"])
                           - reference_logp(teacher, encode_prompt(tokenizer, p), r["response_ids"]))
                   for p, r in zip(prompts, records)]
        assert scores[outputs]["reward"] == pytest.approx(sum(rewards) / 2, rel=1e-4, abs=1e-5)
        per_token = [reward / len(r["response_ids"]) for reward, r in zip(rewards, records)]
        assert scores[outputs]["reward_per_token"] == pytest.approx(sum(per_token) / 2, rel=1e-4, abs=1e-5)
