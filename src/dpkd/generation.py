"""Sampling with the KV cache and scoring completions.

Sampling: `sample_completions` (and `generate_responses` / `generate_texts` for evaluation). Scoring:
`build_scoring_batch` lays out prompt + completion, `completion_logps` / `score_sequences` sum the
completion tokens' log-probs without a batch x length x vocabulary log-softmax. The teacher-output cache
built on them is `dpkd.teacher_cache`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import GenerationConfig, PreTrainedModel

from dpkd.data import encode_prompt, special_prefix
from dpkd.logprobs import IGNORE_INDEX, chunked_sequence_logps, sequence_logps
from dpkd.modeling import LOGIT_TRANSFORM_FIELDS

logger = logging.getLogger(__name__)


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
    max_positions: int | None = None,
    cache_implementation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate continuations of left-padded prompts with the KV cache.

    Returns `(completion_ids, completion_mask)`, both (B, T): the new tokens only, EOS kept, anything
    after the first EOS replaced by `pad_token_id` and masked out. Generation stops once every sequence
    has sampled its EOS. The model is put in eval mode for sampling (no dropout) and restored afterwards.
    `synced_gpus=True` keeps ranks of a sharded model (FSDP, ZeRO-3) stepping together when they finish at
    different lengths: a rank that has finished keeps running forward passes until every rank has. A DDP or
    DeepSpeed wrapper is looked through (`generate` lives on the wrapped model; DDP's forward hooks are for
    training only).

    Positions: T is at most the model's position limit (`position_limit`, and `max_positions` when given,
    e.g. that of a second model that will score the samples) minus the padded prompt width, with one warning
    per model when that cuts `sampling.max_new_tokens`; prompts that leave no room raise a ValueError.
    `cache_implementation`: "static" or "dynamic"; None chooses (`decode_cache_implementation`).
    """
    model = unwrap_for_generation(model)
    limit = _limit(model, max_positions)
    max_new_tokens = new_token_budget(model, prompt_input_ids.shape[1], sampling.max_new_tokens, limit)
    config = sampling.to_generation_config(eos_token_id, pad_token_id)
    config.max_new_tokens = max_new_tokens
    if cache_implementation is None:
        cache_implementation = decode_cache_implementation(model, prompt_input_ids.device, synced_gpus=synced_gpus)
    if cache_implementation == "static":
        config.cache_implementation = "static"
        # Cache lengths in steps of 256 positions: a compiled decode step is reused across batches whose
        # prompts differ in width instead of being recompiled for each new length.
        width = prompt_input_ids.shape[1] + max_new_tokens
        config.max_cache_len = -(-width // 256) * 256 if limit is None else min(-(-width // 256) * 256, limit)
    elif cache_implementation != "dynamic":
        raise ValueError(f"cache_implementation must be 'static', 'dynamic' or None; got {cache_implementation!r}")
    was_training = model.training
    model.eval()
    try:
        out = _generate(model, prompt_input_ids, prompt_attention_mask, config, synced_gpus)
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_input_ids.shape[1]:]
    del out
    mask = completion_mask(completion_ids, eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
    return completion_ids, mask


# Models whose static-cache generation failed once (a compile error, an architecture transformers cannot give a
# static cache): they sample with the dynamic cache from then on.
_STATIC_CACHE_FAILED: weakref.WeakSet = weakref.WeakSet()
_WARNED_POSITIONS: weakref.WeakSet = weakref.WeakSet()


def _generate(model, input_ids, attention_mask, config: GenerationConfig, synced_gpus: bool) -> torch.Tensor:
    """`model.generate`; a static cache that fails falls back, once per model, to the dynamic cache."""
    def generate(generation_config: GenerationConfig) -> torch.Tensor:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                              generation_config=generation_config, synced_gpus=synced_gpus)

    if config.cache_implementation != "static":
        return generate(config)
    device = input_ids.device
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    try:
        return generate(config)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # any failure of the fast path has the plain one to fall back on
        _STATIC_CACHE_FAILED.add(model)
        logger.warning("sampling with a static KV cache failed for %s (%s: %s); using the dynamic cache for it "
                       "from now on", _model_name(model), type(error).__name__, error)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        config.cache_implementation = None
        config.max_cache_len = None
        return generate(config)


def decode_cache_implementation(model, device: torch.device, *, synced_gpus: bool = False) -> str:
    """The KV cache `sample_completions` uses by default: "static" on CUDA, "dynamic" elsewhere.

    On CUDA a static cache lets `generate` compile the decode step (transformers does so for a static cache
    on a GPU), which removes the per-token launch overhead. On the CPU the dynamic cache is kept: the static
    one measured no faster there (docs/benchmarks.md, `bench/sampling.py`), and nothing is compiled. Also dynamic: sharded
    or synced models (FSDP, ZeRO-3, `device_map` over several devices), models transformers does not mark
    compilable, and any model whose static-cache generation failed before.
    """
    if device.type != "cuda" or synced_gpus or model in _STATIC_CACHE_FAILED:
        return "dynamic"
    if not isinstance(model, PreTrainedModel) or not getattr(model, "_can_compile_fullgraph", False):
        return "dynamic"
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1 or _is_sharded(model):
        return "dynamic"
    return "static"


def _is_sharded(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def position_limit(model) -> int | None:
    """How many positions the model has (`n_positions`, `max_position_embeddings`), or None when its config sets none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    for field in ("n_positions", "max_position_embeddings"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _limit(model, max_positions: int | None) -> int | None:
    limits = [limit for limit in (position_limit(model), max_positions) if limit is not None]
    return min(limits) if limits else None


def check_prompt_fits(model, max_prompt_length: int, *, max_positions: int | None = None) -> None:
    """Raise a ValueError unless prompts of `max_prompt_length` tokens leave room for a sampled token."""
    limit = _limit(model, max_positions)
    if limit is not None and max_prompt_length >= limit:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} leaves no room to sample: {_model_name(model)} has {limit} "
            f"positions for prompt and response together; set max_prompt_length below {limit}"
        )


def new_token_budget(model, prompt_width: int, max_new_tokens: int, limit: int | None) -> int:
    """`max_new_tokens`, cut to `limit − prompt_width` (one warning per model); a ValueError when that is < 1."""
    if limit is None or prompt_width + max_new_tokens <= limit:
        return max_new_tokens
    room = limit - prompt_width
    if room < 1:
        raise ValueError(
            f"prompts of {prompt_width} tokens (padded) leave no room to sample: {_model_name(model)} has {limit} "
            f"positions for prompt and response together; set max_prompt_length below {limit}"
        )
    if model not in _WARNED_POSITIONS:
        _WARNED_POSITIONS.add(model)
        logger.warning(
            "%s has %d positions: sampling at most %d new tokens after prompts of %d (max_new_tokens is %d); "
            "lower max_prompt_length or max_new_tokens to silence this", _model_name(model), limit, room,
            prompt_width, max_new_tokens)
    return room


def _model_name(model) -> str:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return f"the model at {name!r}" if name else f"the {type(model).__name__}"


def unwrap_for_generation(model):
    """The module whose `generate` to call: DDP and DeepSpeed engines wrap it in `.module`.

    FSDP2 (`fully_shard`) keeps the model's own class, so `generate` is called on it directly and its
    hooks gather the shards; ZeRO-3's hooks live on the inner module's submodules and work the same way.
    """
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


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


class GeneratedResponse(NamedTuple):
    """One sampled response: its decoded text and the token ids exactly as sampled."""

    text: str  # decoded without special tokens, stripped: what the metrics compare
    token_ids: list[int]  # up to and including the first EOS (if generation stopped on it), no padding


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    seed: int = 0,
    start_index: int = 0,
) -> list[GeneratedResponse]:
    """Generate one response per prompt: its text and its sampled token ids.

    Prompts are encoded as training encodes them (`dpkd.data.encode_prompt`: the tokenizer's special
    prefix once, then the text); longer than `max_prompt_length` tokens, they keep their last tokens
    (the template's "### Response:" marker is at the end). Each batch is seeded from `seed` and the index
    of its first prompt (offset by `start_index`), so a run resumed at a batch boundary draws the same
    samples. The token ids are the ones to score: decoding and re-encoding the text can tokenise it
    differently (byte-level BPE merges what was sampled as separate tokens) and loses the EOS. Responses
    are cut to the model's positions (see `sample_completions`); a `max_prompt_length` that leaves no room for
    them is refused before anything is generated.
    """
    if max_prompt_length is not None:
        check_prompt_fits(unwrap_for_generation(model), max_prompt_length)
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    prefix = special_prefix(tokenizer)
    responses: list[GeneratedResponse] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p, prefix, max_prompt_length) for p in prompts[start:start + batch_size]]
        ids, mask = left_pad(encoded, pad)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + start_index + start)
            completion_ids, completion_mask_ = sample_completions(
                model, ids.to(device), mask.to(device), sampling, eos_token_id=eos, pad_token_id=pad
            )
        for row, row_mask in zip(completion_ids.tolist(), completion_mask_.tolist()):
            kept = [t for t, m in zip(row, row_mask) if m]
            text = tokenizer.decode([t for t in kept if t != eos], skip_special_tokens=True).strip()
            responses.append(GeneratedResponse(text, kept))
    return responses


def generate_texts(model, tokenizer, prompts: Sequence[str], sampling: SamplingConfig, **options) -> list[str]:
    """The texts alone of `generate_responses(model, tokenizer, prompts, sampling, **options)`."""
    return [response.text for response in generate_responses(model, tokenizer, prompts, sampling, **options)]


# ---------------------------------------------------------------------------------------------------------
# Scoring completions
# ---------------------------------------------------------------------------------------------------------


def build_scoring_batch(
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Lay out left-padded prompts (B, P) followed by right-padded completions (B, T) for one forward pass.

    Returns `input_ids`, `attention_mask`, `position_ids` and `labels`, each (B, P + T). Positions count
    attended tokens only (0 at each prompt's first real token), as `generate` numbers them: transformers
    does not infer them from the attention mask in a plain forward. `labels` are unshifted, equal to the
    completion tokens where `completion_mask` is 1 and -100 on prompts and padding.
    """
    if prompt_input_ids.shape != prompt_attention_mask.shape or completion_ids.shape != completion_mask.shape:
        raise ValueError(
            f"ids and masks must have the same shape: prompt {tuple(prompt_input_ids.shape)} vs "
            f"{tuple(prompt_attention_mask.shape)}, completion {tuple(completion_ids.shape)} vs "
            f"{tuple(completion_mask.shape)}"
        )
    if prompt_input_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"batch sizes differ: {prompt_input_ids.shape[0]} prompts, {completion_ids.shape[0]} completions")
    completion_mask = completion_mask.to(prompt_attention_mask.dtype)
    input_ids = torch.cat([prompt_input_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_attention_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    labels = torch.cat(
        [torch.full_like(prompt_input_ids, IGNORE_INDEX), completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)],
        dim=1,
    )
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def _projects_hidden_states_directly(model) -> bool:
    """True for an unwrapped, unsharded transformers causal LM whose logits are `lm_head(last hidden state)`."""
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        FSDPModule = ()  # noqa: N806
    if isinstance(model, FSDPModule):
        return False  # root-level parameters (embeddings, head) are only gathered by the root's forward
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # Models that transform their logits are scored through their own forward (keeping only the completion
    # window's logits) so the transformation is applied.
    return all(getattr(config, field, None) in (None, 1, 1.0) for field in LOGIT_TRANSFORM_FIELDS)


def completion_logps(
    model, batch: Mapping[str, torch.Tensor], *, chunk_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the label tokens of each sequence, and their count: (B,), (B,) float32.

    `log q(y|x) = sum_i log softmax(z_{i-1})[y_i]` over the positions where `batch["labels"]` is not -100,
    `z` the logits. Only those positions are projected to the vocabulary: the last hidden states are
    selected there and multiplied by the LM head `chunk_size` rows at a time (float32 log-softmax), so no
    (B, L, V) tensor is built. Models that are wrapped (DDP, FSDP, DeepSpeed, peft) or transform their
    logits (soft-capping, scaling) go through their own forward with `logits_to_keep` set to the
    completion window instead. Gradients flow when called outside inference mode.
    """
    labels = batch["labels"]
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if _projects_hidden_states_directly(model):
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]
        head = model.get_output_embeddings()
        hidden = hidden.to(head.weight.device)  # a model split over devices (device_map) ends elsewhere
        return chunked_sequence_logps(hidden, head.weight, target, bias=head.bias, chunk_size=chunk_size)
    if not valid.any():
        return torch.zeros(labels.shape[0], device=labels.device), valid.sum(dim=1)
    # Logits at position j score token j + 1; keep them from the first scored token's predecessor on.
    first_scored = int(valid.any(dim=0).nonzero()[0])
    logits = model(**inputs, use_cache=False, logits_to_keep=target.shape[1] - first_scored + 1).logits
    return sequence_logps(logits[:, :-1], target[:, first_scored:])


def score_sequences(model, batch: Mapping[str, torch.Tensor], *, chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logps` under `torch.inference_mode()` in eval mode: a frozen model's (the teacher's) scores."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return completion_logps(model, batch, chunk_size=chunk_size)
    finally:
        model.train(was_training)
