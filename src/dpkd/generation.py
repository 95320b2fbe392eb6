"""Sampling from student and teacher with the KV cache, and (later) the teacher-output cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig


@dataclass
class SamplingConfig:
    """How responses are drawn. Defaults follow the paper's pipeline: sampling at T=1, top-k off, top-p 1."""

    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def to_generation_config(self, eos_token_id: int, pad_token_id: int) -> GenerationConfig:
        # Every field is set explicitly: transformers' defaults (top_k=50) and a model's own
        # generation_config.json must not leak into distillation or evaluation.
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, use_cache=True)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return GenerationConfig(**kwargs)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on generated tokens up to and including the first EOS, 0 after it (padding)."""
    is_eos = completion_ids == eos_token_id
    # Number of EOS seen strictly before each position; a token is kept while none has been seen.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()


@torch.no_grad()
def sample_completions(
    model,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    sampling: SamplingConfig,
    *,
    eos_token_id: int,
    pad_token_id: int,
    synced_gpus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate continuations of left-padded prompts with the KV cache.

    Returns `(completion_ids, completion_mask)`, both (B, T): the new tokens only, EOS kept, anything
    after the first EOS replaced by `pad_token_id` and masked out. The model is put in eval mode for
    sampling (no dropout) and restored afterwards. `synced_gpus=True` keeps ranks of a sharded model
    (FSDP, ZeRO-3) stepping together when they finish at different lengths.
    """
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompt_input_ids,
            attention_mask=prompt_attention_mask,
            generation_config=sampling.to_generation_config(eos_token_id, pad_token_id),
            synced_gpus=synced_gpus,
        )
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_input_ids.shape[1]:]
    mask = completion_mask(completion_ids, eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
    return completion_ids, mask


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `(input_ids, attention_mask)` for generation."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    seed: int = 0,
    start_index: int = 0,
) -> list[str]:
    """Generate one response per prompt and decode it, cut at EOS.

    Prompts longer than `max_prompt_length` tokens keep their last tokens (the template's
    "### Response:" marker is at the end). Each batch is seeded from `seed` and the index of its first
    prompt (offset by `start_index`), so a run resumed at a batch boundary draws the same samples.
    """
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        if max_prompt_length is not None:
            encoded = [ids[-max_prompt_length:] for ids in encoded]
        ids, mask = left_pad(encoded, pad)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + start_index + start)
            completion_ids, completion_mask_ = sample_completions(
                model, ids.to(device), mask.to(device), sampling, eos_token_id=eos, pad_token_id=pad
            )
        for row, row_mask in zip(completion_ids.tolist(), completion_mask_.tolist()):
            kept = [t for t, m in zip(row, row_mask) if m and t != eos]
            texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts
