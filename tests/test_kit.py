"""The test kit itself: tokenizer and tiny models load back as a user loads them."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpkd.generation import SamplingConfig, completion_mask, generate_texts, left_pad


def test_tokenizer_round_trips_any_text(tokenizer):
    text = "Sort the list: 3, 1, 2. Ünïcödé → ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id


def test_pairs_share_vocabulary_and_reload(model_pairs, tokenizer):
    for teacher_dir, student_dir in model_pairs.values():
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        student = AutoModelForCausalLM.from_pretrained(student_dir)
        assert teacher.config.vocab_size == student.config.vocab_size == len(tokenizer)
        assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
        assert AutoTokenizer.from_pretrained(student_dir).get_vocab() == tokenizer.get_vocab()


def test_completion_mask_keeps_first_eos_and_masks_after():
    ids = torch.tensor([[5, 6, 0, 7, 0], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]])
    assert completion_mask(ids, eos_token_id=0).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_left_pad_puts_padding_on_the_left():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generation_is_seeded_and_batch_independent_of_resume(student_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    prompts = ["one two three", "the world", "sort this list", "reverse it"]
    sampling = SamplingConfig(max_new_tokens=8)
    full = generate_texts(model, tokenizer, prompts, sampling, batch_size=2, seed=3)
    assert full == generate_texts(model, tokenizer, prompts, sampling, batch_size=2, seed=3)
    resumed = generate_texts(model, tokenizer, prompts[2:], sampling, batch_size=2, seed=3, start_index=2)
    assert resumed == full[2:]
    assert full != generate_texts(model, tokenizer, prompts, sampling, batch_size=2, seed=4)
