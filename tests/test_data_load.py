"""`dpkd.data.load_instruction_data`: every format, source kind and template, and the bundled sets."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

import dpkd
import dpkd.data_files
from dpkd.data import DataError, bundled_set_path, find_data_dir, load_instruction_data, packaged_data_dir

# The two Alpaca templates of MiniLLM/DPKD, written out here independently of the module's constants.
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\nName a color.\n\n### Response:\n")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
              "Sum the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

DOLLY_ROWS = [
    {"instruction": "Name a color.", "context": "", "response": "Blue is a color.", "category": "open_qa"},
    {"instruction": "Sum the numbers.", "context": "2 and 3", "response": "The sum is 5.", "category": "closed_qa"},
]
ALPACA_ROWS = [
    {"instruction": "Name a color.", "input": "", "output": "Blue is a color."},
    {"instruction": "Sum the numbers.", "input": "2 and 3", "output": "The sum is 5."},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def chat_tokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = CHAT_TEMPLATE
    return tok


# --- formats and templates --------------------------------------------------------------------------


def test_raw_dolly_gets_the_paper_alpaca_templates_byte_exact(tmp_path):
    ds = load_instruction_data(write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS))
    assert ds.column_names == ["prompt", "completion", "references"]
    assert ds["prompt"] == [NO_INPUT, WITH_INPUT]
    assert ds["completion"] == ["Blue is a color.", "The sum is 5."]
    assert ds["references"] == [["Blue is a color."], ["The sum is 5."]]


def test_alpaca_rows_without_stored_prompt_get_the_alpaca_templates(tmp_path):
    rows = [dict(ALPACA_ROWS[0]), {k: v for k, v in ALPACA_ROWS[1].items()}]
    del rows[0]["input"]  # `input` is optional
    ds = load_instruction_data(write_jsonl(tmp_path / "a.jsonl", rows))
    assert ds["prompt"] == [NO_INPUT, WITH_INPUT]


@pytest.mark.parametrize("name", ["dolly", "selfinst", "vicuna", "sinst"])
def test_alpaca_rendering_equals_every_stored_minillm_prompt(name, eval_data_dir):
    stored = [row["prompt"] for row in read_jsonl(bundled_set_path(name, eval_data_dir))]
    rendered = load_instruction_data(name, template="alpaca", data_dir=eval_data_dir)["prompt"]
    assert rendered == stored


def test_stored_prompt_is_used_by_default_and_ignored_by_other_templates(tmp_path):
    row = {**ALPACA_ROWS[0], "prompt": "Q: Name a color.\nA:"}
    path = write_jsonl(tmp_path / "m.jsonl", [row])
    assert load_instruction_data(path)["prompt"] == ["Q: Name a color.\nA:"]
    assert load_instruction_data(path, template="alpaca")["prompt"] == [NO_INPUT]
    assert load_instruction_data(path, template="none")["prompt"] == ["Name a color."]


def test_list_outputs_become_references_and_the_first_is_the_completion(tmp_path):
    row = {"instruction": "Say hi.", "input": "", "output": ["Hi there.", "Hello.", "Hey."]}
    ds = load_instruction_data(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert ds["completion"] == ["Hi there."]
    assert ds["references"] == [["Hi there.", "Hello.", "Hey."]]


def test_prompt_completion_is_verbatim_by_default_and_templated_on_request(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Name a color.", "completion": "Blue is a color."}])
    assert load_instruction_data(path)["prompt"] == ["Name a color."]
    assert load_instruction_data(path, template="alpaca")["prompt"] == [NO_INPUT]
    assert load_instruction_data(path, template="Q: {instruction}\nA:")["prompt"] == ["Q: Name a color.\nA:"]
    assert load_instruction_data(path)["references"] == [["Blue is a color."]]


def test_chat_messages_prompt_is_all_but_the_last_turn_with_the_generation_prompt(tmp_path, chat_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another."},
                {"role": "assistant", "content": "Blue is a color."}]
    ds = load_instruction_data(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tokenizer=chat_tokenizer)
    assert ds["prompt"] == ["<|system|>Be brief.\n<|user|>Name a color.\n<|assistant|>Red.\n<|user|>Another.\n"
                            "<|assistant|>"]
    assert ds["completion"] == ["Blue is a color."]


def test_conversational_prompt_completion_uses_the_chat_template(tmp_path, chat_tokenizer):
    row = {"prompt": [{"role": "user", "content": "Name a color."}],
           "completion": [{"role": "assistant", "content": "Blue is a color."}]}
    ds = load_instruction_data(write_jsonl(tmp_path / "c.jsonl", [row]), tokenizer=chat_tokenizer)
    assert ds["prompt"] == ["<|user|>Name a color.\n<|assistant|>"]
    assert ds["completion"] == ["Blue is a color."]


def test_chat_template_wraps_instruction_and_input_in_one_user_turn(tmp_path, chat_tokenizer):
    ds = load_instruction_data(write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS), template="chat",
                               tokenizer=chat_tokenizer)
    assert ds["prompt"] == ["<|user|>Name a color.\n<|assistant|>",
                            "<|user|>Sum the numbers.\n\n2 and 3\n<|assistant|>"]


def test_none_template_is_the_instruction_then_the_input(tmp_path):
    ds = load_instruction_data(write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS), template="none")
    assert ds["prompt"] == ["Name a color.", "Sum the numbers.\n\n2 and 3"]


def test_user_template_fills_instruction_and_input(tmp_path):
    template = "Task: {instruction}\nData: {input}\nAnswer ({{short}}):"
    ds = load_instruction_data(write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS), template=template)
    assert ds["prompt"] == ["Task: Name a color.\nData: \nAnswer ({short}):",
                            "Task: Sum the numbers.\nData: 2 and 3\nAnswer ({short}):"]


# --- source kinds -----------------------------------------------------------------------------------


def test_json_array_json_lines_csv_parquet_dataset_and_records_load_alike(tmp_path):
    (tmp_path / "array.json").write_text(json.dumps(DOLLY_ROWS), encoding="utf-8")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": DOLLY_ROWS}), encoding="utf-8")
    write_jsonl(tmp_path / "lines.json", DOLLY_ROWS)
    with (tmp_path / "table.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(DOLLY_ROWS[0]))
        writer.writeheader()
        writer.writerows(DOLLY_ROWS)
    pq.write_table(pa.Table.from_pylist(DOLLY_ROWS), tmp_path / "table.parquet")
    sources = [tmp_path / "array.json", tmp_path / "wrapped.json", tmp_path / "lines.json", tmp_path / "table.csv",
               str(tmp_path / "table.parquet"), Dataset.from_list(DOLLY_ROWS),
               DatasetDict({"train": Dataset.from_list(DOLLY_ROWS)}), DOLLY_ROWS]
    for source in sources:
        ds = load_instruction_data(source)
        assert ds["prompt"] == [NO_INPUT, WITH_INPUT], source
        assert ds["completion"] == ["Blue is a color.", "The sum is 5."], source


def test_directory_reads_its_data_files_in_name_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", DOLLY_ROWS[1:])
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS[:1])
    (tmp_path / "notes.txt").write_text("not data", encoding="utf-8")
    assert load_instruction_data(tmp_path)["prompt"] == [NO_INPUT, WITH_INPUT]


def test_save_to_disk_folder_loads(tmp_path):
    DatasetDict({"train": Dataset.from_list(ALPACA_ROWS)}).save_to_disk(str(tmp_path / "saved"))
    assert load_instruction_data(tmp_path / "saved")["prompt"] == [NO_INPUT, WITH_INPUT]


# --- the bundled evaluation sets --------------------------------------------------------------------


# sha256 of MiniLLM's processed files (src/dpkd/eval_data/README.md), which dpkd ships gzip-compressed.
MINILLM_SHA256 = {
    "dolly": "f2624572fdde0bec8759e63fecefdc5e38679816464cd57ef563612ccc6acc06",
    "dolly-dev": "a16927bf54fa96c945f267db083520301b751bdbab23c5f55f4482950bcb4f6c",
    "selfinst": "18922e8ac8a6034ecf0ec8026e24473a30297aaa2e7182d6beb56682586af525",
    "vicuna": "04f5fabc7e2660a778ef86f7d2779f69a8f108b892074517566b7d714a269c3a",
    "sinst": "8c62f31543f02f3dc44ceb62436ec633ab7add9a94307a7dd1977f90378576a6",
}


@pytest.mark.parametrize("name", sorted(MINILLM_SHA256))
def test_packaged_sets_decompress_to_minillm_files_byte_for_byte(name, eval_data_dir):
    path = bundled_set_path(name, eval_data_dir)
    assert path.name.endswith(".jsonl.gz")
    assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == MINILLM_SHA256[name]


def test_package_data_globs_ship_every_file_of_the_packaged_copy():
    tomllib = pytest.importorskip("tomllib")
    package = Path(dpkd.__file__).parent
    pyproject = package.parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("dpkd is installed, not run from a checkout")
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["dpkd"]
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    packaged = {p for p in (package / "eval_data").rglob("*") if p.is_file()}
    assert packaged and packaged <= shipped


@pytest.mark.parametrize("name, rows", [("dolly", 500), ("selfinst", 242), ("vicuna", 80), ("sinst", 1694),
                                        ("dolly-dev", 1000)])
def test_bundled_sets_have_the_paper_row_counts(name, rows, monkeypatch):
    monkeypatch.delenv("DPKD_DATA_DIR", raising=False)
    ds = load_instruction_data(name)
    assert len(ds) == rows
    assert all(isinstance(p, str) and p.endswith("### Response:\n") for p in ds["prompt"])


def test_sinst_keeps_every_reference_of_list_outputs(eval_data_dir):
    raw = read_jsonl(bundled_set_path("sinst", eval_data_dir))
    ds = load_instruction_data("sinst", data_dir=eval_data_dir)
    assert ds["references"] == [row["output"] for row in raw]
    assert max(len(refs) for refs in ds["references"]) > 1
    assert ds["completion"] == [row["output"][0] for row in raw]


def test_the_copy_packaged_with_dpkd_is_the_default_data_dir(monkeypatch):
    monkeypatch.delenv("DPKD_DATA_DIR", raising=False)
    assert find_data_dir() == packaged_data_dir() == Path(dpkd.__file__).parent / "eval_data"
    assert bundled_set_path("vicuna") == packaged_data_dir() / "vicuna/valid.jsonl.gz"
    assert len(load_instruction_data("vicuna")) == 80


def vicuna_folder(folder: Path, rows: int, *, gzipped: bool = False) -> Path:
    """A MiniLLM-layout data folder holding the first `rows` Vicuna questions."""
    (folder / "vicuna").mkdir(parents=True)
    lines = "".join(json.dumps(r) + "\n" for r in read_jsonl(bundled_set_path("vicuna", packaged_data_dir()))[:rows])
    if gzipped:
        (folder / "vicuna/valid.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    else:
        (folder / "vicuna/valid.jsonl").write_text(lines, encoding="utf-8")
    return folder


def test_data_dir_comes_from_the_environment_and_the_argument_overrides_both(tmp_path, monkeypatch):
    monkeypatch.setenv("DPKD_DATA_DIR", str(vicuna_folder(tmp_path / "env", 3)))
    assert len(load_instruction_data("vicuna")) == 3
    assert len(load_instruction_data("vicuna", data_dir=vicuna_folder(tmp_path / "arg", 2))) == 2


def test_an_override_folder_holds_plain_jsonl_as_minillm_ships_it_or_gzipped_jsonl(tmp_path):
    plain, gzipped = vicuna_folder(tmp_path / "plain", 4), vicuna_folder(tmp_path / "gz", 5, gzipped=True)
    assert bundled_set_path("vicuna", plain) == plain / "vicuna/valid.jsonl"
    assert len(load_instruction_data("vicuna", data_dir=plain)) == 4
    assert len(load_instruction_data("vicuna", data_dir=gzipped)) == 5


def test_missing_data_dir_names_the_argument_or_variable_at_fault(tmp_path, monkeypatch):
    monkeypatch.setenv("DPKD_DATA_DIR", str(tmp_path / "nowhere"))
    assert f"$DPKD_DATA_DIR={str(tmp_path / 'nowhere')!r} is not a directory" in error_message("dolly")
    assert f"data_dir {str(tmp_path / 'gone')!r} is not a directory" in error_message("dolly", data_dir=tmp_path / "gone")


def test_a_missing_packaged_copy_says_to_reinstall_or_point_elsewhere(tmp_path, monkeypatch):
    monkeypatch.delenv("DPKD_DATA_DIR", raising=False)
    monkeypatch.setattr(dpkd.data_files, "packaged_data_dir", lambda: tmp_path / "eval_data")
    message = error_message("dolly")
    assert f"the evaluation sets packaged with dpkd are missing ({tmp_path / 'eval_data'} does not exist)" in message
    assert "DPKD_DATA_DIR" in message and "--data-dir" in message


def test_min_response_words_and_limit(eval_data_dir):
    raw = read_jsonl(bundled_set_path("dolly", eval_data_dir))
    long_enough = [row["output"] for row in raw if len(row["output"].split()) > 10]
    ds = load_instruction_data("dolly", data_dir=eval_data_dir, min_response_words=11)
    assert ds["completion"] == long_enough
    assert len(long_enough) < len(raw)
    limited = load_instruction_data("dolly", data_dir=eval_data_dir, min_response_words=11, limit=7)
    assert limited["completion"] == long_enough[:7]


# --- bad input: the message names file, line and field -----------------------------------------------


def error_message(source, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load_instruction_data(source, **kwargs)
    return str(caught.value)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(DOLLY_ROWS[0]) + "\n\n" + '{"instruction": "x", "response": \n', encoding="utf-8")
    message = error_message(path)
    assert f"{path}, line 3: malformed JSON" in message


def test_malformed_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "x",\n   "response": oops}\n]', encoding="utf-8")
    assert f"{path}, line 3: malformed JSON" in error_message(path)


def test_missing_field_names_line_field_and_the_fields_found(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [DOLLY_ROWS[0], {"instruction": "x", "context": "", "category": "c"}])
    message = error_message(path, data_format="dolly")
    assert f"{path}, line 2: field 'response' is missing (fields found: instruction, context, category)" in message


def test_missing_field_detected_after_the_first_row(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [ALPACA_ROWS[0], {"input": "y", "output": "z"}])
    assert f"{path}, line 2: field 'instruction' is missing" in error_message(path)


def test_non_string_field_names_line_field_and_type(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [ALPACA_ROWS[0], {"instruction": "x", "input": 5, "output": "y"}])
    assert f"{path}, line 2: field 'input' must be a string, got int" in error_message(path)


def test_non_string_reference_in_a_list_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"instruction": "x", "output": ["fine", 3]}])
    assert f"{path}, line 1: field 'output' must be a string or a list of strings, got int" in error_message(path)


def test_empty_response_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [DOLLY_ROWS[0], {**DOLLY_ROWS[1], "response": "  \n"}])
    assert f"{path}, line 2: field 'response' is empty" in error_message(path)


def test_empty_response_in_csv_names_the_line(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("prompt,completion\nhello,world\nagain,\n", encoding="utf-8")
    assert f"{path}, line 3: field 'completion' is empty" in error_message(path)


def test_empty_file_is_reported(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    assert f"{path}: empty file, no examples" in error_message(path)


def test_unknown_format_lists_the_fields_found(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"question": "x", "answer": "y"}])
    message = error_message(path)
    assert f"{path}, line 1: unknown data format; fields found: question, answer" in message
    assert "prompt+completion" in message


def test_template_without_instruction_placeholder_is_rejected_before_reading(tmp_path):
    message = error_message(tmp_path / "never-read.jsonl", template="Answer this: {input}")
    assert "has no {instruction} placeholder" in message
    assert "unknown placeholder(s) question" in error_message(DOLLY_ROWS, template="{instruction} {question}")


def test_unknown_template_name_is_rejected():
    message = error_message(DOLLY_ROWS, template="alpacca")
    assert "template 'alpacca' has no {instruction} placeholder and is not one of auto, alpaca, chat, none" in message


def test_chat_template_without_a_tokenizer_is_rejected_before_reading(tmp_path):
    assert "template='chat': the chat template needs a tokenizer" in \
        error_message(tmp_path / "never-read.jsonl", template="chat")


def test_csv_with_byte_order_mark_and_short_rows(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_text("\ufeffinstruction,context,response\nName a color.,,Blue is a color.\nSum it.,2\n",
                    encoding="utf-8")
    assert f"{path}, line 3: field 'response' is missing" in error_message(path)


def test_template_without_input_placeholder_refuses_to_drop_an_input(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    assert f"{path}, line 2: field 'context' is not empty but the template has no {{input}}" in \
        error_message(path, template="Q: {instruction}\nA:")
    assert "data_format 'sharegpt': expected one of dolly, alpaca, prompt_completion, messages" in \
        error_message(path, data_format="sharegpt")


def test_unknown_bundled_name_lists_the_known_ones():
    message = error_message("dolly2")
    assert "unknown bundled data set 'dolly2'; known: dolly, selfinst, vicuna, sinst, dolly-dev" in message


def test_missing_bundled_set_says_where_the_data_comes_from_and_how_to_point_elsewhere(tmp_path, monkeypatch):
    message = error_message("sinst", data_dir=tmp_path)
    assert (f"{tmp_path} (from the data_dir argument (CLI: --data-dir)) holds neither sinst/11_/valid.jsonl nor "
            "sinst/11_/valid.jsonl.gz") in message
    assert f"MiniLLM's processed evaluation sets, packaged with dpkd in {packaged_data_dir()}" in message
    assert "set $DPKD_DATA_DIR to a folder laid out like MiniLLM's processed data (sinst/11_/valid.jsonl)" in message
    monkeypatch.setenv("DPKD_DATA_DIR", str(tmp_path))
    assert f"{tmp_path} (from $DPKD_DATA_DIR) holds neither" in error_message("sinst")


def test_gzipped_files_load_like_plain_ones_and_errors_name_the_gz_file_and_line(tmp_path):
    good = tmp_path / "d.jsonl.gz"
    good.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in DOLLY_ROWS).encode()))
    assert load_instruction_data(good)["prompt"] == [NO_INPUT, WITH_INPUT]
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress((json.dumps(DOLLY_ROWS[0]) + "\n{oops\n").encode()))
    assert f"{bad}, line 2: malformed JSON" in error_message(bad)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all\n")
    assert f"{broken}: not a readable gzip file" in error_message(broken)


def test_hub_id_that_cannot_be_loaded_offline_says_what_was_tried():
    message = error_message("nobody/no-such-set")
    assert "nobody/no-such-set: not a file, directory or bundled set" in message
    assert "datasets.load_dataset failed" in message


def test_dataset_dict_split_is_chosen_or_asked_for():
    splits = DatasetDict({"valid": Dataset.from_list(DOLLY_ROWS[:1]), "test": Dataset.from_list(DOLLY_ROWS)})
    assert "several splits (valid, test); choose one with split=" in error_message(splits)
    assert load_instruction_data(splits, split="test")["prompt"] == [NO_INPUT, WITH_INPUT]


def test_missing_file_is_reported(tmp_path):
    assert f"{tmp_path / 'nope.jsonl'}: no such file or directory" in error_message(tmp_path / "nope.jsonl")


def test_chat_format_without_a_tokenizer_or_template_is_rejected(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                            {"role": "assistant", "content": "y"}]}])
    assert f"{path}, line 1: the chat template needs a tokenizer" in error_message(path)
    assert "the tokenizer has no chat template" in error_message(path, tokenizer=tokenizer)


def test_chat_messages_must_end_with_the_assistant(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    assert f"{path}, line 1: field 'messages': the last message must be the assistant's answer" in \
        error_message(path, tokenizer=chat_tokenizer)
