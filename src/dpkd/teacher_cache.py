"""The on-disk teacher-output cache: the teacher's completion and its sequence log-prob per prompt.

`TeacherOutputCache` stores them, keyed by teacher (`model_fingerprint`), sampling settings, prompt and
epoch; `teacher_outputs` fills it lazily during training, `fill_teacher_cache` ahead of time
(`dpkd teacher-generate`). Sampling and scoring themselves are `dpkd.generation`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dpkd.durable import write_atomically  # noqa: F401  (also imported from here by older code)
from dpkd.generation import SamplingConfig, build_scoring_batch, left_pad, sample_completions, score_sequences

logger = logging.getLogger(__name__)

# Config entries that name where a model came from or which library saved it, not what it computes.
_CONFIG_FIELDS_NOT_FINGERPRINTED = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")


def model_fingerprint(model, *, sample_bytes_per_tensor: int | None = None) -> str:
    """A 20-hex-digit identity of a model's computation: its config and its weights, hashed with SHA-256.

    Trade-off: hashing every weight reads each parameter once (how long that takes: docs/benchmarks.md)
    but cannot be fooled by a checkpoint retrained in place, copied to another path, or loaded in another dtype (other bytes,
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

    Every entry is checked when read: token ids are integers in `[0, vocab_size)` (when `vocab_size` is
    given: pass the teacher's), there are 1 to `max_new_tokens` of them and the log-prob is finite. An
    entry that fails is dropped with a warning naming its file and line, so it is generated again; `put`
    refuses such an entry outright. A line that is not an entry at all is a ValueError with file and line.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        teacher_id: str,
        sampling,
        rank: int | None = None,
        flush_every: int = 1024,
        vocab_size: int | None = None,
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
        self.vocab_size = vocab_size
        self.dropped = 0  # entries refused when read (and so generated again)
        self._entries: dict[str, CachedTeacherOutput] = {}
        self._pending: list[tuple[str, CachedTeacherOutput]] = []
        self._segments_read: set[str] = set()
        meta = self.directory / "meta.json"
        if not meta.exists():
            write_atomically(meta, json.dumps(identity, indent=2, sort_keys=True) + "\n")
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
            for key, entry in self._read_segment(path):
                # The first segment in name order wins, so every reader resolves duplicates alike.
                if key not in self._entries:
                    self._entries[key] = entry
                    added += 1
            self._segments_read.add(path.name)
        return added

    def _read_segment(self, path: Path, *, warn: bool = True):
        """(key, entry) of each valid entry of a segment; invalid entries are dropped (and counted
        in `dropped`, with a warning, when `warn`)."""
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not a teacher-cache segment (not UTF-8 text: {error}); delete the file "
                             "and its entries will be generated again") from error
        for line_number, line in enumerate(text.splitlines(), start=1):
            try:
                record = json.loads(line)
                key, ids, logp = record["key"], record["completion_ids"], record["teacher_logp"]
                if not isinstance(key, str):
                    raise TypeError("key is not a string")
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{line_number}: not a teacher-cache entry ({error}); delete the "
                                 "file and its entries will be generated again") from error
            problem = self._entry_problem(ids, logp)
            if problem is not None:
                if not warn:
                    continue
                self.dropped += 1
                logger.warning("%s:%d: dropping a bad teacher-cache entry (%s); it will be generated again",
                               path, line_number, problem)
                continue
            yield key, CachedTeacherOutput(tuple(ids), float(logp))

    def _entry_problem(self, completion_ids, teacher_logp) -> str | None:
        """Why an entry cannot be used, or None: ids in the vocabulary, a length sampling can produce, a finite log-prob."""
        if not isinstance(completion_ids, list | tuple) or not completion_ids:
            return "completion_ids is not a non-empty list"
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in completion_ids):
            return "completion_ids holds a value that is not an integer"
        outside = [t for t in completion_ids if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
        if outside:
            vocabulary = f"[0, {self.vocab_size})" if self.vocab_size is not None else "non-negative ids"
            return f"token id {outside[0]} is outside the vocabulary {vocabulary}"
        max_new_tokens = self.sampling.get("max_new_tokens")
        if max_new_tokens is not None and len(completion_ids) > max_new_tokens:
            return f"{len(completion_ids)} completion tokens, more than max_new_tokens={max_new_tokens}"
        if isinstance(teacher_logp, bool) or not isinstance(teacher_logp, int | float):
            return "teacher_logp is not a number"
        if not math.isfinite(teacher_logp):
            return f"teacher_logp is {teacher_logp}, not finite"
        return None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt_ids: Sequence[int], epoch: int | None = None) -> CachedTeacherOutput | None:
        return self._entries.get(self.key(prompt_ids, epoch))

    def put(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], teacher_logp: float,
            epoch: int | None = None) -> None:
        """Record one response; it is written to disk with the next flush."""
        ids = [int(t) for t in completion_ids]
        problem = self._entry_problem(ids, float(teacher_logp))
        if problem is not None:
            raise ValueError(f"TeacherOutputCache.put: {problem}")
        key = self.key(prompt_ids, epoch)
        entry = CachedTeacherOutput(tuple(ids), float(teacher_logp))
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
        write_atomically(path, "".join(_entry_line(key, entry) for key, entry in self._pending))
        self._segments_read.add(name)
        self._pending.clear()
        return path

    def compact(self) -> Path | None:
        """Merge this rank's segments into one (new segment first, then delete the old ones), leaving out
        entries that fail the checks.

        A kill between the two steps leaves duplicates, which are identical and harmless.
        """
        self.flush()
        own = sorted(self.directory.glob(f"part-r{self.rank:04d}-*.jsonl"))
        if len(own) < 2:
            return own[0] if own else None
        lines = [_entry_line(key, entry) for path in own for key, entry in self._read_segment(path, warn=False)]
        name = f"part-r{self.rank:04d}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        merged = self.directory / name
        write_atomically(merged, "".join(lines))
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
    flush_interval_s: float = 30.0,
    seed: int | None = None,
) -> int:
    """Generate and store the teacher's response to every prompt of the dataset not yet cached; returns how many.

    `tokenized_dataset` has a `prompt_input_ids` column (`dpkd.data.tokenize_dataset`). Identical
    prompts are generated once; prompts are batched by length to limit padding. Under several processes
    rank r takes the distinct prompts r, r + world_size, ... and writes its own segments (see
    `TeacherOutputCache`); with `synced_gpus=True` ranks with fewer batches step through generation on a
    discarded prompt until all are done. Segments are compacted at the end.

    What is generated is kept: new entries are written (atomically) once `flush_interval_s` seconds have
    passed since the last write, and whatever is pending when the loop stops, however it stops (an error,
    Ctrl-C). A rerun generates only the prompts still missing. The batches are laid out over all the
    dataset's prompts, cached or not, and with `seed` each batch samples from its own seed (seed, rank and
    batch index), so a run interrupted and rerun stores the same outputs as one that was not.
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
        unique.setdefault(cache.key(prompt, epoch), list(prompt))
    mine = list(unique.values())[rank::world_size]
    mine.sort(key=len, reverse=True)  # longest first: an out-of-memory batch fails at once, not at the end
    layout = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
    # (index in the layout, batch) of the batches with a prompt still missing
    work = [(index, batch) for index, batch in enumerate(layout) if any(cache.get(p, epoch) is None for p in batch)]
    batches = [batch for _, batch in work]
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
    last_flush = time.monotonic()
    n_missing = sum(cache.get(p, epoch) is None for batch in batches for p in batch)
    with (tqdm(total=n_missing, desc="teacher outputs", unit="prompt", disable=not show_progress or rank != 0) as bar,
          cache):  # the cache flushes what is pending on the way out, on an error or Ctrl-C too
        for index in range(n_batches):
            # A rank out of work generates for one throwaway prompt so that sharded collectives line up.
            batch = batches[index] if index < len(batches) else [[eos]]
            ids, mask = left_pad(batch, pad)
            ids, mask = ids.to(device), mask.to(device)
            if index < len(batches):
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                           enabled=seed is not None):
                    if seed is not None:
                        torch.manual_seed(seed * 1_000_003 + work[index][0] * world_size + rank)
                    *_, n_new = teacher_outputs(teacher, cache, ids, mask, sampling, eos_token_id=eos,
                                                pad_token_id=pad, epoch=epoch, synced_gpus=synced_gpus, flush=False)
                generated += n_new
                bar.update(n_new)
                if time.monotonic() - last_flush >= flush_interval_s:
                    cache.flush()
                    last_flush = time.monotonic()
            elif _any_rank(False, device):  # pairs with the all-reduce inside teacher_outputs on busy ranks
                _generate_and_score(teacher, ids, mask, sampling, eos_token_id=eos, pad_token_id=pad,
                                    synced_gpus=synced_gpus)
    cache.compact()
    return generated
