"""`tokenize_dataset` and `DistillationCollator`: EOS, masks, truncation counts, padding sides."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpkd.data import DataError, DistillationCollator, encode_prompt, load_instruction_data, tokenize_dataset
from dpkd.modeling import tiny_config


@pytest.fixture(scope="module")
def dolly_sample(eval_data_dir):
    return load_instruction_data("dolly", data_dir=eval_data_dir, limit=40)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def small_set() -> Dataset:
    return Dataset.from_dict({
        "prompt": ["Write one word.\n", "Say the number two please and thank you.\n", "Hi\n"],
        "completion": ["Blue.", "Two is the number you want.", "Hello there, how are you today?"],
    })


def test_completion_ids_end_with_eos_and_prompt_ids_are_the_prompt(tokenizer):
    ds, stats = tokenize_dataset(small_set(), tokenizer)
    assert stats.as_dict() == {"total": 3, "kept": 3, "dropped_long_prompts": 0, "left_truncated_prompts": 0,
                               "truncated_completions": 0}
    for row in ds:
        assert row["completion_input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(row["completion_input_ids"][:-1]) == row["completion"]
        assert tokenizer.decode(row["prompt_input_ids"]) == row["prompt"]


def test_labels_cover_exactly_the_completion_and_its_eos_when_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the GPT-2 situation this test is about
    ds, _ = tokenize_dataset(small_set(), tokenizer)
    batch = DistillationCollator(tokenizer.pad_token_id)(list(ds))
    for row, example in enumerate(ds):
        labelled = batch["labels"][row] != -100
        assert torch.equal(batch["labels"][row][labelled], batch["input_ids"][row][labelled])
        assert tokenizer.decode(batch["input_ids"][row][labelled]) == example["completion"] + tokenizer.eos_token
        n_prompt = len(example["prompt_input_ids"])
        assert not labelled[:n_prompt].any()
        assert tokenizer.decode(batch["input_ids"][row][:n_prompt]) == example["prompt"]
        # The EOS that ends the completion keeps its label; the padding after it (same id) does not.
        length = int(batch["attention_mask"][row].sum())
        assert batch["labels"][row][length - 1] == tokenizer.eos_token_id
        assert (batch["labels"][row][length:] == -100).all()
        assert (batch["input_ids"][row][length:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row][:length].all()


def test_prompt_batch_is_left_padded_for_generation(tokenizer):
    ds, _ = tokenize_dataset(small_set(), tokenizer)
    batch = DistillationCollator(tokenizer.pad_token_id)(list(ds))
    width = batch["prompt_input_ids"].shape[1]
    assert width == max(len(p) for p in ds["prompt_input_ids"])
    for row, example in enumerate(ds):
        n = len(example["prompt_input_ids"])
        assert batch["prompt_attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
        assert batch["prompt_input_ids"][row, width - n:].tolist() == example["prompt_input_ids"]
        assert (batch["prompt_input_ids"][row, :width - n] == tokenizer.pad_token_id).all()


def test_drop_counts_and_removes_exactly_the_long_prompts(tokenizer, dolly_sample):
    lengths = [token_count(tokenizer, p) for p in dolly_sample["prompt"]]
    limit = sorted(lengths)[len(lengths) // 2]
    ds, stats = tokenize_dataset(dolly_sample, tokenizer, max_prompt_length=limit, max_length=4096)
    expected_kept = [p for p, n in zip(dolly_sample["prompt"], lengths) if n <= limit]
    assert 0 < stats.dropped_long_prompts == len(lengths) - len(expected_kept)
    assert ds["prompt"] == expected_kept
    assert stats.kept == len(ds) == len(expected_kept)


def test_left_truncation_keeps_the_last_tokens_and_counts_them(tokenizer, dolly_sample):
    full = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in dolly_sample["prompt"]]
    limit = sorted(len(ids) for ids in full)[len(full) // 2]
    ds, stats = tokenize_dataset(dolly_sample, tokenizer, max_prompt_length=limit, max_length=4096,
                                 prompt_truncation="left")
    assert 0 < stats.left_truncated_prompts == sum(len(ids) > limit for ids in full) < len(full)
    assert stats.dropped_long_prompts == 0 and len(ds) == len(full)
    assert ds["prompt_input_ids"] == [ids[-limit:] for ids in full]
    assert all(tokenizer.decode(ids).endswith("### Response:\n") for ids in ds["prompt_input_ids"])


def test_completions_are_cut_to_max_length_and_counted(tokenizer, dolly_sample):
    prompt_lengths = sorted(token_count(tokenizer, p) for p in dolly_sample["prompt"])
    completion_lengths = sorted(token_count(tokenizer, c) for c in dolly_sample["completion"])
    max_prompt = prompt_lengths[-1]
    max_length = max_prompt + completion_lengths[len(completion_lengths) // 2]
    ds, stats = tokenize_dataset(dolly_sample, tokenizer, max_prompt_length=max_prompt, max_length=max_length)
    expected_cut = 0
    for example in ds:
        full = token_count(tokenizer, example["completion"]) + 1  # + EOS
        room = max_length - len(example["prompt_input_ids"])
        if full > room:
            expected_cut += 1
            assert len(example["completion_input_ids"]) == room
            assert example["completion_input_ids"][-1] != tokenizer.eos_token_id
        else:
            assert len(example["completion_input_ids"]) == full
            assert example["completion_input_ids"][-1] == tokenizer.eos_token_id
    assert 0 < stats.truncated_completions == expected_cut
    assert max(len(p) + len(c) for p, c in zip(ds["prompt_input_ids"], ds["completion_input_ids"])) <= max_length


def test_tokenize_dataset_keeps_the_other_columns(tokenizer, eval_data_dir):
    sinst = load_instruction_data("sinst", data_dir=eval_data_dir, limit=5)
    ds, _ = tokenize_dataset(sinst, tokenizer, max_prompt_length=4000, max_length=8000)
    assert ds["references"] == sinst["references"]
    assert ds.column_names == ["prompt", "completion", "references", "prompt_input_ids", "completion_input_ids"]


def test_bos_of_the_tokenizer_goes_once_before_the_prompt_and_survives_left_truncation(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tok.eos_token} $A",
                                                              special_tokens=[(tok.eos_token, tok.eos_token_id)])
    bos = tok.eos_token_id
    data = Dataset.from_dict({"prompt": ["Name a color.\n", f"{tok.eos_token}Name a color.\n", "word " * 50],
                              "completion": ["Blue.", "Red.", "Green."]})
    ds, stats = tokenize_dataset(data, tok, max_prompt_length=10, prompt_truncation="left")
    bare = tok("Name a color.\n", add_special_tokens=False)["input_ids"]
    assert ds["prompt_input_ids"][0] == [bos, *bare]
    assert ds["prompt_input_ids"][1] == [bos, *bare]  # BOS already written by a chat template: not doubled
    assert ds["prompt_input_ids"][2] == [bos, *tok("word " * 50, add_special_tokens=False)["input_ids"][-9:]]
    assert stats.left_truncated_prompts == 1
    assert all(ids[0] != bos for ids in ds["completion_input_ids"])
    assert encode_prompt(tok, "Name a color.\n") == [bos, *bare]  # what generation code should use


def test_encode_prompt_adds_nothing_for_a_tokenizer_without_bos(tokenizer):
    text = "Name a color.\n"
    assert encode_prompt(tokenizer, text) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_are_unshifted_as_transformers_models_expect(tokenizer):
    """The model's own loss on a collated batch equals the mean NLL of the completions computed by hand."""
    torch.manual_seed(0)
    config = tiny_config("gpt2", len(tokenizer), n_layer=1, d_model=32, n_head=2, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    ds, _ = tokenize_dataset(small_set(), tokenizer)
    batch = DistillationCollator(tokenizer.pad_token_id)(list(ds))
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        total, count = 0.0, 0
        for example in ds:
            prompt, completion = example["prompt_input_ids"], example["completion_input_ids"]
            ids = torch.tensor([prompt + completion])
            logprobs = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].log_softmax(-1)
            for offset, token in enumerate(completion):
                total -= float(logprobs[len(prompt) + offset - 1, token])
                count += 1
    # transformers computes its loss in float32; a one-position shift would be off by far more.
    assert loss.item() == pytest.approx(total / count, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.lists(st.integers(0, 9), min_size=1, max_size=8),
                               st.lists(st.integers(0, 9), min_size=0, max_size=8)), min_size=1, max_size=5),
       max_length=st.one_of(st.none(), st.integers(1, 16)), multiple=st.one_of(st.none(), st.integers(1, 8)))
def test_collator_masks_follow_positions_not_token_values(rows, max_length, multiple):
    pad = 0  # token 0 also occurs inside prompts and completions, as EOS does with GPT-2
    collate = DistillationCollator(pad, max_length=max_length, pad_to_multiple_of=multiple)
    batch = collate([{"prompt_input_ids": p, "completion_input_ids": c, "index": i} for i, (p, c) in enumerate(rows)])
    assert batch["index"].tolist() == list(range(len(rows)))
    for row, (prompt, completion) in enumerate(rows):
        sequence = (prompt + completion)[:max_length]
        n = len(sequence)
        assert batch["input_ids"][row, :n].tolist() == sequence
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        expected_labels = [-100] * min(len(prompt), n) + sequence[len(prompt):]
        assert batch["labels"][row, :n].tolist() == expected_labels
        assert (batch["labels"][row, n:] == -100).all()
        width = batch["prompt_input_ids"].shape[1]
        assert batch["prompt_input_ids"][row, width - len(prompt):].tolist() == prompt
        assert batch["prompt_attention_mask"][row].tolist() == [0] * (width - len(prompt)) + [1] * len(prompt)
    if multiple:
        assert batch["input_ids"].shape[1] % multiple == 0 and batch["prompt_input_ids"].shape[1] % multiple == 0


def test_tokenize_dataset_rejects_bad_options_and_data(tokenizer):
    with pytest.raises(DataError, match="prompt_truncation must be 'drop' or 'left', got 'right'"):
        tokenize_dataset(small_set(), tokenizer, prompt_truncation="right")
    with pytest.raises(DataError, match="need 0 < max_prompt_length < max_length"):
        tokenize_dataset(small_set(), tokenizer, max_prompt_length=512, max_length=512)
    with pytest.raises(DataError, match="all 3 prompts are longer than max_prompt_length=1 tokens"):
        tokenize_dataset(small_set(), tokenizer, max_prompt_length=1)
    with pytest.raises(DataError, match="the dataset has no examples to tokenise"):
        tokenize_dataset(Dataset.from_dict({"prompt": [], "completion": []}), tokenizer)
    with pytest.raises(DataError, match="dataset lacks column\\(s\\) completion"):
        tokenize_dataset(Dataset.from_dict({"prompt": ["x"]}), tokenizer)
