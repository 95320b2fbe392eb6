"""Sampling with the KV cache, scoring completions, and the on-disk teacher-output cache.

Sampling: `sample_completions` (and `generate_responses` / `generate_texts` for evaluation). Scoring:
`build_scoring_batch` lays out prompt + completion, `completion_logps` / `score_sequences` sum the
completion tokens' log-probs without a batch x length x vocabulary log-softmax. Teacher outputs: `TeacherOutputCache` stores the
teacher's completion and its sequence log-prob per prompt, `teacher_outputs` fills it lazily during
training, `fill_teacher_cache` ahead of time (`dpkd teacher-generate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from transformers import GenerationConfig, PreTrainedModel

from dpkd.data import encode_prompt, special_prefix
from dpkd.losses import chunked_sequence_logps, sequence_logps

IGNORE_INDEX = -100


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
    (FSDP, ZeRO-3) stepping together when they finish at different lengths: a rank that has finished
    keeps running forward passes until every rank has. A DDP or DeepSpeed wrapper is looked through
    (`generate` lives on the wrapped model; DDP's forward hooks are for training only).
    """
    model = unwrap_for_generation(model)
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
    differently (byte-level BPE merges what was sampled as separate tokens) and loses the EOS.
    """
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
    """The texts of `generate_responses`: one response per prompt, decoded and cut at EOS."""
    return [r.text for r in generate_responses(model, tokenizer, prompts, sampling, batch_size=batch_size,
                                               max_prompt_length=max_prompt_length, seed=seed,
                                               start_index=start_index)]


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


# Config fields of models whose logits are not simply `lm_head(hidden)`; those are scored through their
# own forward (keeping only the completion window's logits) so the transformation is applied.
_LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


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
    return all(getattr(config, field, None) in (None, 1, 1.0) for field in _LOGIT_TRANSFORM_FIELDS)


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


# ---------------------------------------------------------------------------------------------------------
# The teacher-output cache
# ---------------------------------------------------------------------------------------------------------

# Config entries that name where a model came from or which library saved it, not what it computes.
_CONFIG_FIELDS_NOT_FINGERPRINTED = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")


def model_fingerprint(model, *, sample_bytes_per_tensor: int | None = None) -> str:
    """A 20-hex-digit identity of a model's computation: its config and its weights, hashed with SHA-256.

    Trade-off: hashing every weight reads each parameter once (measured 0.34 GB/s on one busy CPU core
    here; about 10 s for GPT-2 XL in bf16, a minute or more for a 13B model) but cannot be fooled by a
    checkpoint retrained in place, copied to another path, or loaded in another dtype (other bytes,
    other outputs). A path or file-date key would be free and wrong in exactly those cases.
    `sample_bytes_per_tensor` hashes only that many evenly strided bytes of each tensor (plus every
    name, shape and dtype): still different for any fine-tuned or other model, where every weight moves,
    but blind to an edit confined to the unsampled elements. The result is memoised on the model object,
    so a frozen teacher is hashed once per process. Call it on the unwrapped, unsharded model (before
    `accelerator.prepare`): a sharded rank holds only part of the weights.
    """
    cached = getattr(model, "_dpkd_fingerprint", None)
    if cached is not None and cached[0] == sample_bytes_per_tensor:
        return cached[1]
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        DTensor = ()  # noqa: N806
    # FSDP2 holds DTensor shards; DeepSpeed ZeRO-3 leaves empty placeholders that carry `ds_numel`.
    if any(isinstance(p, DTensor) or hasattr(p, "ds_numel") for p in model.parameters()):
        raise ValueError("model_fingerprint: the model is sharded (FSDP or ZeRO-3); compute the fingerprint on "
                         "the whole model, before preparing it")
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for field in _CONFIG_FIELDS_NOT_FINGERPRINTED:
        config.pop(field, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8)
            if sample_bytes_per_tensor is not None and raw.numel() > sample_bytes_per_tensor:
                raw = raw[:: -(-raw.numel() // sample_bytes_per_tensor)].contiguous()
            digest.update(raw.cpu().numpy())
    fingerprint = digest.hexdigest()[:20]
    model._dpkd_fingerprint = (sample_bytes_per_tensor, fingerprint)
    return fingerprint


@dataclass(frozen=True)
class CachedTeacherOutput:
    """One cached teacher response: its token ids (EOS included when the teacher stopped) and `log p(y|x)`."""

    completion_ids: tuple[int, ...]
    teacher_logp: float


def _sampling_settings(sampling) -> dict:
    if dataclasses.is_dataclass(sampling):
        return dataclasses.asdict(sampling)
    return dict(sampling)


class TeacherOutputCache:
    """Teacher responses and their sequence log-probs on disk, keyed by teacher, sampling, prompt and epoch.

    Layout: `cache_dir/<namespace>/` where the namespace hashes `teacher_id` (use `model_fingerprint`)
    and the sampling settings, so another teacher or other settings never see these entries;
    `meta.json` there records both in clear. Entries are JSON lines
    `{"key", "completion_ids", "teacher_logp"}`, `key` hashing the prompt's token ids (padding removed)
    and the optional epoch. They are written in segment files `part-r<rank>-<time>-<id>.jsonl`: each
    rank writes its own segments and never touches another's, and every segment is written to a
    temporary name, synced and renamed, so a killed process leaves complete segments and at most a stray
    `.tmp` file, which readers ignore. Opening the cache reads every segment (all ranks', all runs'):
    a run on any number of ranks reuses what earlier runs generated. Entries are buffered and written
    once `flush_every` are pending, and by `flush()`; `compact()` merges this rank's segments.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        teacher_id: str,
        sampling,
        rank: int | None = None,
        flush_every: int = 1024,
    ) -> None:
        if not teacher_id:
            raise ValueError("TeacherOutputCache: teacher_id must be a non-empty string (see model_fingerprint)")
        if flush_every < 1:
            raise ValueError(f"TeacherOutputCache: flush_every must be >= 1, got {flush_every}")
        self.teacher_id = teacher_id
        self.sampling = _sampling_settings(sampling)
        identity = {"format": 1, "teacher_id": teacher_id, "sampling": self.sampling}
        namespace = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.directory = Path(cache_dir) / namespace
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = _current_rank() if rank is None else rank
        self.flush_every = flush_every
        self._entries: dict[str, CachedTeacherOutput] = {}
        self._pending: list[tuple[str, CachedTeacherOutput]] = []
        self._segments_read: set[str] = set()
        meta = self.directory / "meta.json"
        if not meta.exists():
            _write_atomically(meta, json.dumps(identity, indent=2, sort_keys=True) + "\n")
        self.refresh()

    @staticmethod
    def key(prompt_ids: Sequence[int], epoch: int | None = None) -> str:
        """The entry key of a prompt's token ids (no padding) and optional epoch."""
        return hashlib.sha256(json.dumps([list(map(int, prompt_ids)), epoch]).encode()).hexdigest()[:32]

    def refresh(self) -> int:
        """Read segments written since the last read (for instance by other ranks); returns how many entries were added."""
        added = 0
        for path in sorted(self.directory.glob("part-*.jsonl")):
            if path.name in self._segments_read:
                continue
            with open(path, encoding="utf-8") as handle:
                for line_number, line in enumerate(handle, start=1):
                    try:
                        record = json.loads(line)
                        entry = CachedTeacherOutput(tuple(record["completion_ids"]), float(record["teacher_logp"]))
                        key = record["key"]
                    except (ValueError, KeyError, TypeError) as error:
                        raise ValueError(f"{path}:{line_number}: not a teacher-cache entry ({error})") from error
                    # The first segment in name order wins, so every reader resolves duplicates alike.
                    if key not in self._entries:
                        self._entries[key] = entry
                        added += 1
            self._segments_read.add(path.name)
        return added

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt_ids: Sequence[int], epoch: int | None = None) -> CachedTeacherOutput | None:
        return self._entries.get(self.key(prompt_ids, epoch))

    def put(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], teacher_logp: float,
            epoch: int | None = None) -> None:
        """Record one response; it is written to disk with the next flush."""
        if len(completion_ids) == 0:
            raise ValueError("TeacherOutputCache.put: completion_ids is empty")
        key = self.key(prompt_ids, epoch)
        entry = CachedTeacherOutput(tuple(int(t) for t in completion_ids), float(teacher_logp))
        self._entries[key] = entry
        self._pending.append((key, entry))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> Path | None:
        """Write pending entries as a new segment (write, fsync, rename); returns its path, or None if nothing was pending."""
        if not self._pending:
            return None
        name = f"part-r{self.rank:04d}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        path = self.directory / name
        _write_atomically(path, "".join(_entry_line(key, entry) for key, entry in self._pending))
        self._segments_read.add(name)
        self._pending.clear()
        return path

    def compact(self) -> Path | None:
        """Merge this rank's segments into one (new segment first, then delete the old ones).

        A kill between the two steps leaves duplicates, which are identical and harmless.
        """
        self.flush()
        own = sorted(self.directory.glob(f"part-r{self.rank:04d}-*.jsonl"))
        if len(own) < 2:
            return own[0] if own else None
        lines = []
        for path in own:
            lines.append(path.read_text(encoding="utf-8"))
        name = f"part-r{self.rank:04d}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        merged = self.directory / name
        _write_atomically(merged, "".join(lines))
        self._segments_read.add(name)
        for path in own:
            path.unlink()
        return merged

    def __enter__(self) -> TeacherOutputCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()


def _entry_line(key: str, entry: CachedTeacherOutput) -> str:
    return json.dumps({"key": key, "completion_ids": list(entry.completion_ids), "teacher_logp": entry.teacher_logp}) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    """Write to `path` so that it either does not exist or is complete: temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true on any rank (a collective: every rank must call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _drop_padding_columns(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove leading columns that are padding in every row (left-padded batches whose rows were subset)."""
    attended = mask.bool().any(dim=0).nonzero()
    start = int(attended[0]) if len(attended) else mask.shape[1] - 1
    return ids[:, start:], mask[:, start:]


def _generate_and_score(teacher, prompt_ids, prompt_mask, sampling, *, eos_token_id, pad_token_id, synced_gpus):
    completion_ids, mask = sample_completions(teacher, prompt_ids, prompt_mask, sampling, eos_token_id=eos_token_id,
                                              pad_token_id=pad_token_id, synced_gpus=synced_gpus)
    logps, _ = score_sequences(teacher, build_scoring_batch(prompt_ids, prompt_mask, completion_ids, mask))
    return completion_ids, mask, logps


def _check_cache_sampling(cache: TeacherOutputCache, sampling) -> None:
    if _sampling_settings(sampling) != cache.sampling:
        raise ValueError(
            f"sampling {_sampling_settings(sampling)} differs from the settings the teacher cache was opened with "
            f"{cache.sampling}; open the cache with the same SamplingConfig"
        )


def teacher_outputs(
    teacher,
    cache: TeacherOutputCache,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    sampling: SamplingConfig,
    *,
    eos_token_id: int,
    pad_token_id: int,
    epoch: int | None = None,
    synced_gpus: bool = False,
    flush: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The teacher's responses `y_t` to left-padded prompts and `log p(y_t|x)`, from the cache where possible.

    Prompts not in the cache are sampled with the teacher (KV cache), scored by it in one forward pass
    (`score_sequences`) and stored, so the teacher never re-reads a cached `y_t`. Returns
    `(completion_ids (B, T), completion_mask (B, T), teacher_logps (B,) float32, n_generated)`, right-padded
    with `pad_token_id`, on the prompts' device. With `synced_gpus=True` (a sharded teacher: FSDP, ZeRO-3)
    every rank runs generation whenever any rank has a miss, a rank without misses on one discarded
    prompt, so the shards' collectives line up; every rank must then call this the same number of times.
    `flush=True` writes the new entries to disk before returning (one segment per batch with misses), so
    an interrupted run keeps all it generated; pass False to leave that to the cache's `flush_every`.
    """
    _check_cache_sampling(cache, sampling)
    device = prompt_input_ids.device
    prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_input_ids.cpu(), prompt_attention_mask.cpu())]
    found = [cache.get(prompt, epoch) for prompt in prompts]
    missing = [row for row, entry in enumerate(found) if entry is None]
    must_generate = _any_rank(bool(missing), device) if synced_gpus else bool(missing)
    if must_generate:
        rows = missing or [0]
        ids, mask = _drop_padding_columns(prompt_input_ids[rows], prompt_attention_mask[rows])
        completion_ids, completion_mask_, logps = _generate_and_score(
            teacher, ids, mask, sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id, synced_gpus=synced_gpus
        )
        for row, ids_row, mask_row, logp in zip(missing, completion_ids.tolist(), completion_mask_.tolist(), logps.tolist()):
            kept = [t for t, m in zip(ids_row, mask_row) if m]
            cache.put(prompts[row], kept, logp, epoch)
            found[row] = cache.get(prompts[row], epoch)
        if flush:
            cache.flush()
    width = max(len(entry.completion_ids) for entry in found)
    completion_ids = torch.full((len(found), width), pad_token_id, dtype=torch.long)
    completion_mask_ = torch.zeros((len(found), width), dtype=torch.long)
    for row, entry in enumerate(found):
        completion_ids[row, : len(entry.completion_ids)] = torch.tensor(entry.completion_ids)
        completion_mask_[row, : len(entry.completion_ids)] = 1
    teacher_logps = torch.tensor([entry.teacher_logp for entry in found], dtype=torch.float32)
    return completion_ids.to(device), completion_mask_.to(device), teacher_logps.to(device), len(missing)


def fill_teacher_cache(
    teacher,
    tokenizer,
    tokenized_dataset: Iterable[Mapping] | Mapping,
    cache: TeacherOutputCache,
    sampling: SamplingConfig,
    *,
    batch_size: int,
    epoch: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    synced_gpus: bool = False,
    show_progress: bool = True,
) -> int:
    """Generate and store the teacher's response to every prompt of the dataset not yet cached; returns how many.

    `tokenized_dataset` has a `prompt_input_ids` column (`dpkd.data.tokenize_dataset`). Identical
    prompts are generated once; prompts are batched by length to limit padding. Under several processes
    rank r takes the missing prompts r, r + world_size, ... and writes its own segments (see
    `TeacherOutputCache`); with `synced_gpus=True` ranks with fewer batches step through generation on a
    discarded prompt until all are done. Segments are compacted at the end.
    """
    _check_cache_sampling(cache, sampling)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    column_names = getattr(tokenized_dataset, "column_names", None)
    if column_names is not None and "prompt_input_ids" not in column_names:
        raise ValueError(f"the dataset has no 'prompt_input_ids' column (columns: {column_names}); tokenize it first")
    prompt_column = tokenized_dataset["prompt_input_ids"]
    rank = _current_rank() if rank is None else rank
    world_size = (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1) if world_size is None else world_size
    unique: dict[str, list[int]] = {}
    for prompt in prompt_column:
        if len(prompt) == 0:
            raise ValueError("fill_teacher_cache: a prompt has no tokens")
        if cache.get(prompt, epoch) is None:
            unique.setdefault(cache.key(prompt, epoch), list(prompt))
    mine = list(unique.values())[rank::world_size]
    mine.sort(key=len, reverse=True)  # longest first: an out-of-memory batch fails at once, not at the end
    batches = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
    device = next(teacher.parameters()).device
    n_batches = len(batches)
    if synced_gpus and dist.is_available() and dist.is_initialized():
        count = torch.tensor([n_batches], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        n_batches = int(count.item())
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    from tqdm.auto import tqdm

    generated = 0
    with tqdm(total=len(mine), desc="teacher outputs", unit="prompt", disable=not show_progress or rank != 0) as bar:
        for index in range(n_batches):
            # A rank out of work generates for one throwaway prompt so that sharded collectives line up.
            batch = batches[index] if index < len(batches) else [[eos]]
            ids, mask = left_pad(batch, pad)
            ids, mask = ids.to(device), mask.to(device)
            if index < len(batches):
                *_, n_new = teacher_outputs(teacher, cache, ids, mask, sampling, eos_token_id=eos, pad_token_id=pad,
                                            epoch=epoch, synced_gpus=synced_gpus, flush=False)
                generated += n_new
                bar.update(len(batch))
            elif _any_rank(False, device):  # pairs with the all-reduce inside teacher_outputs on busy ranks
                _generate_and_score(teacher, ids, mask, sampling, eos_token_id=eos, pad_token_id=pad,
                                    synced_gpus=synced_gpus)
    cache.compact()
    return generated
