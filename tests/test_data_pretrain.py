"""`load_pretrain_chunks`: documents joined with EOS, packed into fixed-length chunks, tail dropped."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from dpkd.data import DataError, load_pretrain_chunks

DOCUMENTS = ["The cat sat on the mat.", "A dog ran in the park, and then home.", "Water is wet.\nSo is rain."]


def expected_stream(tokenizer, documents) -> list[int]:
    stream: list[int] = []
    for text in documents:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


@pytest.mark.parametrize("seq_length", [1, 7, 16])
def test_jsonl_documents_are_joined_with_eos_and_cut_into_full_chunks(tmp_path, tokenizer, seq_length):
    path = tmp_path / "pt.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCUMENTS)), encoding="utf-8")
    chunks = load_pretrain_chunks(path, tokenizer, seq_length)
    stream = expected_stream(tokenizer, DOCUMENTS)
    assert chunks.column_names == ["input_ids"]
    assert len(chunks) == len(stream) // seq_length
    assert all(len(ids) == seq_length for ids in chunks["input_ids"])
    flat = [t for ids in chunks["input_ids"] for t in ids]
    assert flat == stream[:len(flat)]  # in order, only the ragged tail is missing
    assert len(stream) - len(flat) < seq_length


def test_plain_text_files_in_a_directory_are_one_document_each(tmp_path, tokenizer):
    for name, text in zip(["a.txt", "b.txt", "c.txt"], DOCUMENTS):
        (tmp_path / name).write_text(text, encoding="utf-8")
    chunks = load_pretrain_chunks(tmp_path, tokenizer, 5)
    flat = [t for ids in chunks["input_ids"] for t in ids]
    assert flat == expected_stream(tokenizer, DOCUMENTS)[:len(flat)]
    assert flat.count(tokenizer.eos_token_id) >= 2


def test_a_list_of_files_and_a_dataset_give_the_same_chunks(tmp_path, tokenizer):
    paths = []
    for name, text in zip(["x.txt", "y.txt", "z.txt"], DOCUMENTS):
        (tmp_path / name).write_text(text, encoding="utf-8")
        paths.append(tmp_path / name)
    from_files = load_pretrain_chunks(paths, tokenizer, 6)["input_ids"]
    assert load_pretrain_chunks(Dataset.from_dict({"text": DOCUMENTS}), tokenizer, 6)["input_ids"] == from_files


def test_max_chunks_stops_early(tokenizer):
    chunks = load_pretrain_chunks(Dataset.from_dict({"text": DOCUMENTS * 20}), tokenizer, 4, max_chunks=3)
    assert len(chunks) == 3
    assert [t for ids in chunks["input_ids"] for t in ids] == expected_stream(tokenizer, DOCUMENTS)[:12]


def test_pretrain_errors_name_file_line_and_field(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: field 'text' is missing \(fields found: body\)"):
        load_pretrain_chunks(bad, tokenizer, 4)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt: empty file"):
        load_pretrain_chunks(empty, tokenizer, 4)
    short = tmp_path / "short.txt"
    short.write_text("Hi.", encoding="utf-8")
    with pytest.raises(DataError, match=r"only \d+ tokens, fewer than seq_length=1000"):
        load_pretrain_chunks(short, tokenizer, 1000)
    with pytest.raises(DataError, match="no such file or directory"):
        load_pretrain_chunks(tmp_path / "missing.txt", tokenizer, 4)
