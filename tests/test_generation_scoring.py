"""Sampling and scoring completions: the sampler's caches, early stop and position limits; layout of the
scoring batch and log-probs against a float64 full-forward reference."""

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM

from dpkd.data import encode_prompt
from dpkd.generation import (
    SamplingConfig,
    build_scoring_batch,
    completion_logps,
    completion_mask,
    generate_responses,
    left_pad,
    sample_completions,
    score_sequences,
)
from dpkd.modeling import tiny_config

PROMPTS = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33]]


def _completions(eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completions, the second stopping at an EOS with padding after it."""
    ids = torch.tensor([[40, 41, 42, 43, 44], [50, eos, eos, eos, eos], [60, 61, 62, 63, eos]])
    return ids, completion_mask(ids, eos)


def _reference_logps(model, prompts, completion_ids, completion_mask_) -> list[float]:
    """Each sequence alone (no padding) through a float64 copy; sum of log softmax at the completion tokens."""
    model64 = AutoModelForCausalLM.from_config(model.config).double().eval()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    totals = []
    for prompt, ids, mask in zip(prompts, completion_ids.tolist(), completion_mask_.tolist()):
        completion = [t for t, m in zip(ids, mask) if m]
        sequence = torch.tensor([prompt + completion])
        with torch.no_grad():
            logps = torch.log_softmax(model64(sequence).logits[0], dim=-1)
        totals.append(sum(logps[len(prompt) - 1 + i, token].item() for i, token in enumerate(completion)))
    return totals


def test_scoring_batch_lays_out_prompt_then_completion_with_positions_from_the_mask():
    prompt_ids, prompt_mask = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    completion_ids = torch.tensor([[5, 6], [7, 0]])
    batch = build_scoring_batch(prompt_ids, prompt_mask, completion_ids, torch.tensor([[1, 1], [1, 0]]))
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6], [0, 0, 4, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4]
    assert batch["position_ids"][1, 2:4].tolist() == [0, 1]  # the real tokens count from 0
    assert batch["labels"].tolist() == [[-100, -100, -100, 5, 6], [-100, -100, -100, 7, -100]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_score_sequences_equals_float64_full_forward_reference(model_pairs, tokenizer, arch):
    teacher = AutoModelForCausalLM.from_pretrained(model_pairs[arch][0])
    prompt_ids, prompt_mask = left_pad(PROMPTS, tokenizer.pad_token_id)
    completion_ids, mask = _completions(tokenizer.eos_token_id)
    logps, n_tokens = score_sequences(teacher, build_scoring_batch(prompt_ids, prompt_mask, completion_ids, mask))
    reference = _reference_logps(teacher, PROMPTS, completion_ids, mask)
    assert logps.dtype == torch.float32
    assert n_tokens.tolist() == [5, 2, 5]
    torch.testing.assert_close(logps.double(), torch.tensor(reference, dtype=torch.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padding_does_not_change_log_probs(model_pairs, tokenizer, arch):
    teacher = AutoModelForCausalLM.from_pretrained(model_pairs[arch][0])
    completion_ids, mask = _completions(tokenizer.eos_token_id)
    batched = score_sequences(teacher, build_scoring_batch(*left_pad(PROMPTS, tokenizer.pad_token_id), completion_ids, mask))[0]
    for row, prompt in enumerate(PROMPTS):
        alone = score_sequences(teacher, build_scoring_batch(
            torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
            completion_ids[row:row + 1, : int(mask[row].sum())], mask[row:row + 1, : int(mask[row].sum())],
        ))[0]
        torch.testing.assert_close(batched[row], alone[0], rtol=0, atol=1e-5)


class _Wrapper(torch.nn.Module):
    """Stands for a DDP/DeepSpeed-style wrapper: not a PreTrainedModel, forwards keyword arguments."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_wrapped_and_lora_models_score_like_the_plain_model(model_pairs, tokenizer):
    from dpkd.modeling import apply_lora

    teacher = AutoModelForCausalLM.from_pretrained(model_pairs["llama"][0]).eval()
    completion_ids, mask = _completions(tokenizer.eos_token_id)
    batch = build_scoring_batch(*left_pad(PROMPTS, tokenizer.pad_token_id), completion_ids, mask)
    plain = score_sequences(teacher, batch)[0]
    wrapped = score_sequences(_Wrapper(teacher).eval(), batch)[0]
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=1e-5)
    lora = apply_lora(AutoModelForCausalLM.from_pretrained(model_pairs["llama"][0]))  # LoRA B starts at zero
    torch.testing.assert_close(score_sequences(lora, batch)[0], plain, rtol=0, atol=1e-5)


class _VocabSizedTensors(TorchDispatchMode):
    """Records the number of rows of every tensor an op produces whose last dimension is the vocabulary."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.rows = vocab_size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.shape[-1] == self.vocab_size:
                self.rows.append(tensor.numel() // self.vocab_size)
        return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_no_vocabulary_sized_tensor_beyond_one_chunk_of_completion_tokens(model_pairs, tokenizer, arch):
    teacher = AutoModelForCausalLM.from_pretrained(model_pairs[arch][0])
    completion_ids, mask = _completions(tokenizer.eos_token_id)
    batch = build_scoring_batch(*left_pad(PROMPTS, tokenizer.pad_token_id), completion_ids, mask)
    recorder = _VocabSizedTensors(teacher.config.vocab_size)
    with recorder:
        score_sequences(teacher, batch, chunk_size=4)
    assert recorder.rows, "the LM head was never applied"
    assert max(recorder.rows) <= 4  # a full forward would build 3 x 10 rows


def test_score_sequences_is_inference_mode_and_restores_training_mode(model_pairs, tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(model_pairs["llama"][0]).train()
    completion_ids, mask = _completions(tokenizer.eos_token_id)
    logps, _ = score_sequences(teacher, build_scoring_batch(*left_pad(PROMPTS, tokenizer.pad_token_id), completion_ids, mask))
    assert logps.is_inference() and teacher.training


def test_completion_logps_gradient_matches_dense_autograd(model_pairs, tokenizer):
    student = AutoModelForCausalLM.from_pretrained(model_pairs["gpt2"][1]).eval()
    completion_ids, mask = _completions(tokenizer.eos_token_id)
    batch = build_scoring_batch(*left_pad(PROMPTS, tokenizer.pad_token_id), completion_ids, mask)
    weights = torch.tensor([1.0, -2.0, 0.5])

    (completion_logps(student, batch, chunk_size=3)[0] * weights).sum().backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    logits = student(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    token_logps = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ((token_logps * valid).sum(1) * weights).sum().backward()
    for name, param in student.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sampled_completions_score_consistently_with_generation(model_pairs, tokenizer):
    """Scoring what `generate` sampled uses the same positions: greedy tokens are each position's argmax."""
    teacher = AutoModelForCausalLM.from_pretrained(model_pairs["llama"][0])
    prompt_ids, prompt_mask = left_pad(PROMPTS, tokenizer.pad_token_id)
    completion_ids, mask = sample_completions(teacher, prompt_ids, prompt_mask, SamplingConfig(max_new_tokens=6, do_sample=False),
                                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    batch = build_scoring_batch(prompt_ids, prompt_mask, completion_ids, mask)
    with torch.no_grad():
        logits = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    width = prompt_ids.shape[1]
    argmax = logits[:, width - 1:-1].argmax(-1)
    assert torch.equal(argmax[mask.bool()], completion_ids[mask.bool()])


# ----------------------------------------------------------------------------------------------------
# The sampler: static and dynamic KV caches, stopping at EOS, the model's positions


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_and_dynamic_kv_caches_sample_the_same_tokens(model_pairs, tokenizer, arch):
    """The static cache (the default on CUDA) decodes exactly what the dynamic one (the CPU default) does."""
    teacher = AutoModelForCausalLM.from_pretrained(model_pairs[arch][0])
    prompt_ids, prompt_mask = left_pad(PROMPTS, tokenizer.pad_token_id)
    outputs = {}
    for cache in ("static", "dynamic"):
        torch.manual_seed(0)
        outputs[cache] = sample_completions(teacher, prompt_ids, prompt_mask, SamplingConfig(max_new_tokens=12),
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                            cache_implementation=cache)
    for static, dynamic in zip(outputs["static"], outputs["dynamic"]):
        assert torch.equal(static, dynamic)


def test_sampling_stops_once_every_sequence_has_its_eos(model_pairs, tokenizer):
    """A model whose every next token is EOS: one forward pass (the prompt's), one token per row."""
    model = AutoModelForCausalLM.from_pretrained(model_pairs["llama"][0])
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform logits: greedy picks token 0, which this test calls EOS
    calls = []
    model.model.register_forward_hook(lambda module, inputs, output: calls.append(1))
    prompt_ids, prompt_mask = left_pad(PROMPTS, tokenizer.pad_token_id)
    ids, mask = sample_completions(model, prompt_ids, prompt_mask, SamplingConfig(max_new_tokens=32, do_sample=False),
                                   eos_token_id=0, pad_token_id=tokenizer.pad_token_id)
    assert ids.tolist() == [[0]] * len(PROMPTS) and mask.tolist() == [[1]] * len(PROMPTS)
    assert len(calls) == 1


def _gpt2_with_positions(tokenizer, n_positions: int):
    torch.manual_seed(0)
    config = tiny_config("gpt2", len(tokenizer), n_layer=1, d_model=32, n_head=2, max_positions=n_positions,
                         eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config)


def test_generation_caps_new_tokens_at_the_models_positions_with_one_warning(tokenizer, caplog):
    """A GPT-2 with 128 positions and the default 256 new tokens: responses end at 128 − prompt width."""
    model = _gpt2_with_positions(tokenizer, 128)
    prompts = ["Repeat: the water of people\nAnswer:", "Sort: world house sound\nAnswer:"]
    width = max(len(encode_prompt(tokenizer, p, max_prompt_length=48)) for p in prompts)
    with caplog.at_level(logging.WARNING, logger="dpkd.generation"):
        for seed in (0, 1):  # two calls, one warning
            responses = generate_responses(model, tokenizer, prompts, SamplingConfig(), max_prompt_length=48, seed=seed)
            assert max(len(r.token_ids) for r in responses) == 128 - width
    warnings = [r for r in caplog.records if r.name == "dpkd.generation" and "positions" in r.getMessage()]
    assert len(warnings) == 1 and "128 positions" in warnings[0].getMessage()


def test_prompts_that_leave_no_room_to_sample_are_refused_up_front(tokenizer):
    model = _gpt2_with_positions(tokenizer, 16)
    with pytest.raises(ValueError, match=r"max_prompt_length=16 .* 16 positions"):
        generate_responses(model, tokenizer, ["Repeat: the water\nAnswer:"], SamplingConfig(), max_prompt_length=16)
    prompt_ids, prompt_mask = left_pad([list(range(1, 17))], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"prompts of 16 tokens .* 16 positions.*max_prompt_length below 16"):
        sample_completions(model, prompt_ids, prompt_mask, SamplingConfig(), eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
