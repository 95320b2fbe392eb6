"""The teacher-output cache: fingerprints, round trip, reuse, invalidation, interruption, several ranks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from dpkd.generation import SamplingConfig, build_scoring_batch, left_pad
from dpkd.teacher_cache import TeacherOutputCache, fill_teacher_cache, model_fingerprint, teacher_outputs

SAMPLING = SamplingConfig(max_new_tokens=6)
PROMPTS = [[11, 12, 13, 14], [21, 22], [31, 32, 33]]


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return AutoModelForCausalLM.from_pretrained(teacher_dir)


def _count_forwards(model) -> list[int]:
    calls = [0]

    def hook(module, args, kwargs):
        calls[0] += 1

    model.register_forward_pre_hook(hook, with_kwargs=True)
    model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _outputs(teacher, cache, tokenizer, prompts=PROMPTS, sampling=SAMPLING, **kwargs):
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    return teacher_outputs(teacher, cache, ids, mask, sampling, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, **kwargs)


def test_fingerprint_is_stable_across_reloads_and_changes_with_any_weight(teacher_dir, tmp_path):
    first = AutoModelForCausalLM.from_pretrained(teacher_dir)
    fingerprint = model_fingerprint(first)
    first.save_pretrained(tmp_path / "copy")
    assert model_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "copy")) == fingerprint  # path ignored
    edited = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        next(iter(edited.model.layers[1].parameters())).view(-1)[7] += 1e-3
    assert model_fingerprint(edited) != fingerprint
    assert model_fingerprint(AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16)) != fingerprint


def test_sampled_fingerprint_still_tells_fine_tuned_weights_apart(teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    sampled = model_fingerprint(model, sample_bytes_per_tensor=64)
    assert sampled != model_fingerprint(model)
    assert sampled == model_fingerprint(AutoModelForCausalLM.from_pretrained(teacher_dir), sample_bytes_per_tensor=64)
    tuned = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(1e-4 * torch.randn_like(param))
    assert model_fingerprint(tuned, sample_bytes_per_tensor=64) != sampled


def test_cache_round_trips_entries_through_disk(tmp_path):
    with TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING) as cache:
        cache.put([1, 2, 3], [7, 8, 0], -3.25)
        cache.put([1, 2, 3], [9, 0], -1.5, epoch=1)
    reopened = TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING)
    assert len(reopened) == 2
    assert reopened.get([1, 2, 3]).completion_ids == (7, 8, 0)
    assert reopened.get([1, 2, 3]).teacher_logp == -3.25
    assert reopened.get([1, 2, 3], epoch=1).completion_ids == (9, 0)
    assert reopened.get([1, 2, 3], epoch=2) is None and reopened.get([1, 2]) is None
    meta = json.loads((reopened.directory / "meta.json").read_text())
    assert meta["teacher_id"] == "t" and meta["sampling"]["max_new_tokens"] == 6


def test_teacher_outputs_generate_once_and_the_teacher_never_rereads_them(teacher, tokenizer, tmp_path):
    cache = TeacherOutputCache(tmp_path, teacher_id=model_fingerprint(teacher), sampling=SAMPLING)
    ids, mask, logps, n_generated = _outputs(teacher, cache, tokenizer)
    assert n_generated == 3 and ids.shape[0] == 3 and logps.dtype == torch.float32
    lengths = mask.sum(1)
    assert ((lengths >= 1) & (lengths <= SAMPLING.max_new_tokens)).all()
    for row in range(3):  # EOS kept and nothing attended after it
        row_ids = ids[row, : lengths[row]].tolist()
        assert tokenizer.eos_token_id not in row_ids[:-1]
    # The stored log-probs are the teacher's own score of its completions, from an independent full forward.
    prompt_ids, prompt_mask = left_pad(PROMPTS, tokenizer.pad_token_id)
    batch = build_scoring_batch(prompt_ids, prompt_mask, ids, mask)
    with torch.no_grad():
        logits = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits.double()
    labels = batch["labels"][:, 1:]
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps.double(), (token_logps * (labels != -100)).sum(1), rtol=1e-5, atol=1e-4)

    forwards = _count_forwards(teacher)
    # Same prompts in another order and padding, in a new cache object over the same directory.
    reopened = TeacherOutputCache(tmp_path, teacher_id=model_fingerprint(teacher), sampling=SAMPLING)
    again = _outputs(teacher, reopened, tokenizer, prompts=PROMPTS[::-1])
    assert again[3] == 0 and forwards[0] == 0
    order = [2, 1, 0]
    assert torch.equal(again[2], logps[order])
    assert torch.equal(again[0][:, : ids.shape[1]], ids[order])


def test_a_second_run_with_a_reloaded_teacher_generates_nothing(teacher_dir, tokenizer, tmp_path):
    first = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert _outputs(first, TeacherOutputCache(tmp_path, teacher_id=model_fingerprint(first), sampling=SAMPLING),
                    tokenizer)[3] == 3
    second = AutoModelForCausalLM.from_pretrained(teacher_dir)
    cache = TeacherOutputCache(tmp_path, teacher_id=model_fingerprint(second), sampling=SAMPLING)
    assert _outputs(second, cache, tokenizer)[3] == 0


def test_cache_is_invalidated_by_teacher_prompts_sampling_and_epoch(teacher, teacher_dir, tokenizer, tmp_path):
    fingerprint = model_fingerprint(teacher)
    assert _outputs(teacher, TeacherOutputCache(tmp_path, teacher_id=fingerprint, sampling=SAMPLING), tokenizer)[3] == 3

    other_teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        other_teacher.lm_head.weight.mul_(1.01)
    other = TeacherOutputCache(tmp_path, teacher_id=model_fingerprint(other_teacher), sampling=SAMPLING)
    assert _outputs(other_teacher, other, tokenizer)[3] == 3

    hotter = SamplingConfig(max_new_tokens=6, temperature=0.7)
    cache = TeacherOutputCache(tmp_path, teacher_id=fingerprint, sampling=hotter)
    assert _outputs(teacher, cache, tokenizer, sampling=hotter)[3] == 3

    cache = TeacherOutputCache(tmp_path, teacher_id=fingerprint, sampling=SAMPLING)
    assert _outputs(teacher, cache, tokenizer, prompts=PROMPTS[:2] + [[31, 32, 34]])[3] == 1
    assert _outputs(teacher, cache, tokenizer, epoch=1)[3] == 3
    assert _outputs(teacher, cache, tokenizer, epoch=1)[3] == 0


def test_sampling_settings_other_than_the_caches_are_refused(teacher, tokenizer, tmp_path):
    cache = TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING)
    with pytest.raises(ValueError, match="differs from the settings"):
        _outputs(teacher, cache, tokenizer, sampling=SamplingConfig(max_new_tokens=7))


def test_a_crash_before_the_rename_leaves_no_visible_segment(tmp_path, monkeypatch):
    cache = TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING)
    cache.put([1], [2, 0], -1.0)
    cache.flush()

    def crash(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", crash)
    cache.put([3], [4, 0], -2.0)
    with pytest.raises(KeyboardInterrupt):
        cache.flush()
    monkeypatch.undo()
    assert list(cache.directory.glob(".*.tmp")), "the half-written file should be left as a temporary"
    reopened = TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING)
    assert len(reopened) == 1 and reopened.get([1]).completion_ids == (2, 0)


_WRITER = """
import sys
from dpkd.generation import SamplingConfig
from dpkd.teacher_cache import TeacherOutputCache
cache = TeacherOutputCache(sys.argv[1], teacher_id="t", sampling=SamplingConfig(max_new_tokens=6), flush_every=500)
print("ready", flush=True)
for i in range(10**9):
    cache.put([i, i + 1], [1, 2, 3, 4, 5, 0], -float(i))  # max_new_tokens tokens, the most an entry may have
"""


@pytest.mark.slow
def test_killed_writer_leaves_only_complete_segments(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        deadline = time.time() + 30
        cache_dir = None
        while time.time() < deadline:
            segments = list(tmp_path.glob("*/part-*.jsonl"))
            if len(segments) >= 2:
                cache_dir = segments[0].parent
                break
            time.sleep(0.05)
        assert cache_dir is not None, "the writer wrote no segments"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    cache = TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING)
    assert len(cache) >= 1000 and len(cache) % 500 == 0  # whole segments only
    for i in range(len(cache)):
        entry = cache.get([i, i + 1])
        assert entry.teacher_logp == -float(i) and entry.completion_ids[-1] == 0 and len(entry.completion_ids) == 6


def test_corrupt_segment_is_reported_with_file_and_line(tmp_path):
    cache = TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING)
    (cache.directory / "part-r0000-1-x.jsonl").write_text('{"key": "a", "completion_ids": [1], "teacher_logp": -1}\n{oops\n')
    with pytest.raises(ValueError, match=r"part-r0000-1-x\.jsonl:2"):
        TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING)


def test_each_rank_writes_its_own_segments_and_all_are_read(tmp_path):
    rank0 = TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING, rank=0)
    rank1 = TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING, rank=1)
    for i in range(3):
        rank0.put([i], [5, 0], -1.0)
        rank0.flush()
        rank1.put([100 + i], [6, 0], -2.0)
        rank1.flush()
    assert len(list(rank0.directory.glob("part-r0000-*.jsonl"))) == 3
    assert rank1.refresh() == 3 and len(rank1) == 6  # rank 1 now also sees rank 0's entries
    rank0.compact()
    assert len(list(rank0.directory.glob("part-r0000-*.jsonl"))) == 1
    assert len(list(rank0.directory.glob("part-r0001-*.jsonl"))) == 3  # another rank's files are left alone
    assert len(TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING)) == 6


def test_fill_teacher_cache_generates_each_distinct_prompt_once_and_splits_ranks(teacher, tokenizer, tmp_path):
    prompts = [[11, 12, 13, 14], [21, 22], [31, 32, 33], [21, 22], [41], [51, 52, 53, 54, 55]]
    dataset = Dataset.from_dict({"prompt_input_ids": prompts})
    fingerprint = model_fingerprint(teacher)
    shards = [TeacherOutputCache(tmp_path, teacher_id=fingerprint, sampling=SAMPLING, rank=r) for r in (0, 1)]
    made = [fill_teacher_cache(teacher, tokenizer, dataset, shards[r], SAMPLING, batch_size=2, rank=r, world_size=2,
                               show_progress=False) for r in (0, 1)]
    assert made == [3, 2]
    cache = TeacherOutputCache(tmp_path, teacher_id=fingerprint, sampling=SAMPLING)
    assert all(cache.get(p) is not None for p in prompts)
    assert fill_teacher_cache(teacher, tokenizer, dataset, cache, SAMPLING, batch_size=4, show_progress=False) == 0
    _, _, _, n_generated = _outputs(teacher, cache, tokenizer, prompts=prompts)
    assert n_generated == 0


def test_fill_teacher_cache_needs_tokenized_prompts(teacher, tokenizer, tmp_path):
    cache = TeacherOutputCache(tmp_path, teacher_id="t", sampling=SAMPLING)
    with pytest.raises(ValueError, match="prompt_input_ids"):
        fill_teacher_cache(teacher, tokenizer, Dataset.from_dict({"prompt": ["hi"]}), cache, SAMPLING, batch_size=2)
