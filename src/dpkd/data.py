"""Instruction data: from files, `datasets` objects or bundled evaluation sets to token batches.

The path is `load_instruction_data` (rows of any supported format → `prompt`, `completion`,
`references` strings) → `tokenize_dataset` (→ `prompt_input_ids`, `completion_input_ids`) →
`DistillationCollator` (→ a training batch and a left-padded prompt batch for generation).
`load_pretrain_chunks` packs a text corpus into fixed-length chunks for the language-modelling loss.

Formats, recognised from the fields of the first row (or forced with `data_format=`):

| format | fields | default template (`template="auto"`) |
|---|---|---|
| `dolly` (raw databricks-dolly-15k) | `instruction`, `response`, optional `context`, `category` | `alpaca` |
| `alpaca` (MiniLLM / Alpaca) | `instruction`, `output` (string or list of strings), optional `input`, `prompt` | the stored `prompt`, else `alpaca` |
| `prompt_completion` (TRL) | `prompt`, `completion` (strings, or lists of chat messages) | `none` (verbatim); `chat` for message lists |
| `messages` (chat) | `messages`: list of `{"role", "content"}`, ending with the assistant turn | `chat` |

Templates: `alpaca` (the two Alpaca templates of MiniLLM/DPKD, byte-exact), `chat` (the tokenizer's chat
template around one user turn), `none` (the instruction, then a blank line and the input if there is one),
or a string with an `{instruction}` placeholder and optionally `{input}`.

Every bad row raises `DataError` naming the file, the line (1-based; "row" for tables and `datasets`
objects) and the field, while the data loads, before any model is touched. Reading files (plain or
`.gz`) and finding the bundled evaluation sets that ship with dpkd live in `dpkd.data_files`.
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict

from dpkd.data_files import (
    BUNDLED_SETS,
    DATA_DIR_ENV,
    DataError,
    bundled_set_path,
    find_data_dir,
    iter_sources,
    packaged_data_dir,
    read_dataset,
    read_file,
)

logger = logging.getLogger(__name__)


ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
TEMPLATE_NAMES = ("auto", "alpaca", "chat", "none")
DATA_FORMATS = ("dolly", "alpaca", "prompt_completion", "messages")
_FORMAT_HELP = ("instruction+response[+context] (Dolly), instruction+output[+input, prompt] "
                "(MiniLLM/Alpaca), prompt+completion (TRL), messages (chat)")


# ---------------------------------------------------------------------------------------------------
# Templates and per-format normalisation


def _check_template(template: str) -> None:
    if template in TEMPLATE_NAMES:
        return
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as err:
        raise DataError(f"template {template!r}: {err} (write literal braces as {{{{ and }}}})") from None
    if "instruction" not in fields:
        raise DataError(f"template {template!r} has no {{instruction}} placeholder and is not one of "
                        f"{', '.join(TEMPLATE_NAMES)}")
    unknown = fields - {"instruction", "input"}
    if unknown:
        raise DataError(f"template {template!r}: unknown placeholder(s) {', '.join(sorted(unknown))}; allowed: "
                        "{instruction}, {input} (write literal braces as {{ and }})")


class TokenizerNeeded(DataError):
    """Data (or a template) that is rendered with the tokenizer's chat template, and no tokenizer given."""


def _check_chat_tokenizer(tokenizer: Any, where: str) -> None:
    if tokenizer is None:
        raise TokenizerNeeded(f"{where}: the chat template needs a tokenizer: pass tokenizer=")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: the tokenizer has no chat template (tokenizer.chat_template is empty); "
                        "use another template, e.g. template='alpaca'")


def _apply_chat(tokenizer: Any, messages: list[dict[str, str]], where: str) -> str:
    _check_chat_tokenizer(tokenizer, where)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _render(template: str, instruction: str, input_text: str, tokenizer: Any, where: str,
            input_field: str = "input") -> str:
    """The prompt for one instruction (+ input) under a resolved template (not "auto")."""
    if template == "alpaca":
        if input_text:
            return ALPACA_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
        return ALPACA_TEMPLATE.format(instruction=instruction)
    plain = f"{instruction}\n\n{input_text}" if input_text else instruction
    if template == "none":
        return plain
    if template == "chat":
        return _apply_chat(tokenizer, [{"role": "user", "content": plain}], where)
    if input_text and "{input}" not in template:
        raise DataError(f"{where}: field {input_field!r} is not empty but the template has no {{input}} "
                        "placeholder, so it would be lost")
    return template.format(instruction=instruction, input=input_text)


def _fields(record: Mapping[str, Any]) -> str:
    return ", ".join(record) or "none"


def _string(record: Mapping[str, Any], field: str, where: str, *, required: bool = True) -> str:
    value = record.get(field)
    if value is None:
        if required:
            raise DataError(f"{where}: field {field!r} is missing (fields found: {_fields(record)})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _references(record: Mapping[str, Any], field: str, where: str) -> list[str]:
    value = record.get(field)
    if value is None:
        raise DataError(f"{where}: field {field!r} is missing (fields found: {_fields(record)})")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise DataError(f"{where}: field {field!r} is an empty list")
    for item in values:
        if not isinstance(item, str):
            raise DataError(f"{where}: field {field!r} must be a string or a list of strings, "
                            f"got {type(item).__name__}")
        if not item.strip():
            raise DataError(f"{where}: field {field!r} is empty (the response must have text)")
    return values


def detect_format(record: Mapping[str, Any], where: str = "data") -> str:
    """`messages`, `prompt_completion`, `dolly` or `alpaca`, from the fields of one row."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object with named fields, got {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "response" in record:
        return "dolly"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise DataError(f"{where}: unknown data format; fields found: {_fields(record)}. Expected {_FORMAT_HELP}")


def _messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{'role', 'content'}} messages")
    for number, message in enumerate(value, start=1):
        if (not isinstance(message, Mapping) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise DataError(f"{where}: field {field!r}, message {number}: needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _normalise(record: Any, data_format: str, template: str, tokenizer: Any, where: str
               ) -> tuple[str, str, list[str]]:
    """(prompt, completion, references) of one row."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object with named fields, got {type(record).__name__}")
    if data_format == "messages":
        if template not in ("auto", "chat"):
            raise DataError(f"{where}: chat 'messages' data takes template='chat' (or 'auto'), not {template!r}")
        messages = _messages(record.get("messages"), "messages", where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages': the last message must be the assistant's answer, "
                            f"got role {messages[-1]['role']!r}")
        completion = messages[-1]["content"]
        if not completion.strip():
            raise DataError(f"{where}: field 'messages': the last (assistant) message is empty")
        return _apply_chat(tokenizer, messages[:-1], where), completion, [completion]

    if data_format == "prompt_completion":
        prompt_value, completion_value = record.get("prompt"), record.get("completion")
        if isinstance(prompt_value, list):  # TRL's conversational prompt/completion
            if template not in ("auto", "chat"):
                raise DataError(f"{where}: conversational prompts take template='chat' (or 'auto')")
            turns = _messages(completion_value, "completion", where)
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise DataError(f"{where}: field 'completion' must hold exactly one assistant message")
            prompt = _apply_chat(tokenizer, _messages(prompt_value, "prompt", where), where)
            references = _references({"completion": turns[0]["content"]}, "completion", where)
        else:
            prompt = _string(record, "prompt", where)
            references = _references(record, "completion", where)
            if template != "auto":
                prompt = _render(template, prompt, "", tokenizer, where)
        return prompt, references[0], references

    input_field = "context" if data_format == "dolly" else "input"
    if data_format == "dolly":
        instruction = _string(record, "instruction", where)
        input_text = _string(record, "context", where, required=False)
        references = _references(record, "response", where)
        stored_prompt = None
    elif data_format == "alpaca":
        instruction = _string(record, "instruction", where)
        input_text = _string(record, "input", where, required=False)
        references = _references(record, "output", where)
        stored_prompt = _string(record, "prompt", where, required=False) or None
    else:
        raise DataError(f"data_format {data_format!r}: expected one of {', '.join(DATA_FORMATS)}")
    if template == "auto":
        if stored_prompt is not None:
            return stored_prompt, references[0], references
        template = "alpaca"
    return _render(template, instruction, input_text, tokenizer, where, input_field), references[0], references


def load_instruction_data(
    source: str | os.PathLike | Dataset | DatasetDict | Sequence[Mapping[str, Any]],
    *,
    template: str = "auto",
    tokenizer: Any = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    min_response_words: int | None = None,
    data_format: str | None = None,
    split: str | None = None,
    dataset_config: str | None = None,
) -> Dataset:
    """Load instruction data into a `Dataset` with `prompt`, `completion` and `references` columns.

    `source`: a JSONL, JSON, CSV or parquet file; a directory (a `save_to_disk` folder, or its data files
    read in name order); a bundled evaluation set name (`dolly`, `selfinst`, `vicuna`, `sinst`,
    `dolly-dev`: MiniLLM's processed sets, packaged with dpkd; `data_dir`, else `$DPKD_DATA_DIR`, names
    another folder to read them from, see `find_data_dir`); anything else `datasets.load_dataset` loads; a
    `datasets.Dataset`/`DatasetDict`; or a list of dicts. Bundled names win over same-named folders in
    the current directory (write `./dolly` for the folder).

    `template`: `auto` (per format, see the module docstring; a stored MiniLLM `prompt` is used as is),
    `alpaca`, `chat` (needs `tokenizer` with a chat template), `none`, or a string with `{instruction}`
    and optionally `{input}`. `prompt` holds the template already applied; `completion` is the (first)
    reference answer; `references` all of them (S-NI has several).

    `min_response_words`: keep only rows whose completion has at least this many whitespace-separated
    words (the paper trains on Dolly responses longer than 10 words: 11). `limit`: the first `limit`
    rows that pass the filter. `data_format`: force a format instead of detecting it. `split`: the split
    of a `DatasetDict` or `load_dataset` source (default: the only one, else `train`); `dataset_config`: the
    configuration name of a `load_dataset` source (its `name`).
    """
    _check_template(template)
    if template == "chat":
        _check_chat_tokenizer(tokenizer, "template='chat'")
    if data_format is not None and data_format not in DATA_FORMATS:
        raise DataError(f"data_format {data_format!r}: expected one of {', '.join(DATA_FORMATS)}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    prompts: list[str] = []
    completions: list[str] = []
    references: list[list[str]] = []
    short = 0
    for name, rows in iter_sources(source, data_dir=data_dir, split=split, dataset_config=dataset_config):
        file_format = data_format
        seen_any = False
        for where, record in rows:
            seen_any = True
            file_format = file_format or detect_format(record, where)
            prompt, completion, refs = _normalise(record, file_format, template, tokenizer, where)
            if min_response_words is not None and len(completion.split()) < min_response_words:
                short += 1
                continue
            prompts.append(prompt)
            completions.append(completion)
            references.append(refs)
        if not seen_any:
            raise DataError(f"{name}: empty file, no examples" if Path(name).is_file() else f"{name}: no examples")
    if short:
        logger.info("dropped %d examples whose response has fewer than %d words", short, min_response_words)
    if limit is not None:
        prompts, completions, references = prompts[:limit], completions[:limit], references[:limit]
    logger.info("loaded %d examples from %s", len(prompts), source if isinstance(source, str | Path) else
                type(source).__name__)
    return Dataset.from_dict({"prompt": prompts, "completion": completions, "references": references})


# ---------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class TokenizationStats:
    """What `tokenize_dataset` did to fit the length limits."""

    total: int = 0
    kept: int = 0
    dropped_long_prompts: int = 0
    left_truncated_prompts: int = 0
    truncated_completions: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text by default (e.g. BOS for Llama and OPT)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start])
    return []


def encode_prompt(
    tokenizer: Any, prompt: str, prefix: Sequence[int] | None = None, max_prompt_length: int | None = None
) -> list[int]:
    """Token ids of a prompt: the tokenizer's special prefix (once) then the text, without other specials.

    With `max_prompt_length`, a longer prompt keeps its last tokens after the prefix (the template's
    "### Response:" marker is at the end), as `tokenize_dataset(..., prompt_truncation="left")` does.
    Generation and evaluation encode prompts with this, so a model sees the same ids at training and
    at evaluation.
    """
    prefix = special_prefix(tokenizer) if prefix is None else list(prefix)
    ids = _with_prefix(tokenizer(prompt, add_special_tokens=False)["input_ids"], prefix)
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = _left_truncate(ids, prefix, max_prompt_length)
    return ids


def _left_truncate(ids: list[int], prefix: list[int], max_prompt_length: int) -> list[int]:
    keep_prefix = prefix if ids[:len(prefix)] == prefix else []
    return keep_prefix + ids[len(ids) - (max_prompt_length - len(keep_prefix)):]


def _with_prefix(ids: list[int], prefix: list[int]) -> list[int]:
    if prefix and ids[:len(prefix)] != prefix:  # chat templates often write BOS as text already
        return prefix + list(ids)
    return list(ids)


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_prompt_length: int = 256,
    max_length: int = 512,
    prompt_truncation: str = "drop",
) -> tuple[Dataset, TokenizationStats]:
    """Add `prompt_input_ids` and `completion_input_ids` (which ends with EOS) to a `prompt`/`completion` set.

    Prompt and completion are tokenised separately with `add_special_tokens=False` so that the boundary
    between them is exact: the training sequence is the prompt's ids followed by the completion's, the
    same ids a model sees when it generates from that prompt, and the label mask starts exactly at the
    first completion token (tokenising the joined text can merge tokens across the boundary). The
    tokenizer's own special prefix (BOS, if it adds one) goes once before the prompt.

    Prompts longer than `max_prompt_length` tokens are dropped (`prompt_truncation="drop"`) or keep their
    last tokens (`"left"`, after the special prefix). A completion that does not fit in `max_length`
    together with its prompt is cut, and then does not end with EOS (it did not end there). The counts
    are returned and logged.
    """
    if prompt_truncation not in ("drop", "left"):
        raise DataError(f"prompt_truncation must be 'drop' or 'left', got {prompt_truncation!r}")
    if not 0 < max_prompt_length < max_length:
        raise DataError(f"need 0 < max_prompt_length < max_length, got max_prompt_length={max_prompt_length}, "
                        f"max_length={max_length}")
    missing = {"prompt", "completion"} - set(dataset.column_names)
    if missing:
        raise DataError(f"dataset lacks column(s) {', '.join(sorted(missing))}; columns: "
                        f"{', '.join(dataset.column_names)} (use load_instruction_data)")
    if len(dataset) == 0:
        raise DataError("the dataset has no examples to tokenise")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token")
    prefix = special_prefix(tokenizer)
    if len(prefix) >= max_prompt_length:
        raise DataError(f"max_prompt_length={max_prompt_length} leaves no room after the special prefix {prefix}")
    prompts, completions = list(dataset["prompt"]), list(dataset["completion"])
    prompt_ids = [_with_prefix(ids, prefix) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]

    stats = TokenizationStats(total=len(prompts))
    kept: list[int] = []
    kept_prompt_ids: list[list[int]] = []
    kept_completion_ids: list[list[int]] = []
    for index, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        if len(prompt) > max_prompt_length:
            if prompt_truncation == "drop":
                stats.dropped_long_prompts += 1
                continue
            prompt = _left_truncate(prompt, prefix, max_prompt_length)
            stats.left_truncated_prompts += 1
        completion = list(completion) + [eos]
        room = max_length - len(prompt)
        if len(completion) > room:
            completion = completion[:room]
            stats.truncated_completions += 1
        kept.append(index)
        kept_prompt_ids.append(list(prompt))
        kept_completion_ids.append(completion)
    stats.kept = len(kept)
    if not kept:
        raise DataError(f"all {stats.total} prompts are longer than max_prompt_length={max_prompt_length} tokens; "
                        "raise it or use prompt_truncation='left'")
    log = logger.warning if stats.dropped_long_prompts else logger.info
    log("tokenised %d examples: kept %d, dropped %d prompts longer than %d tokens, left-truncated %d prompts, "
        "cut %d completions to fit %d tokens", stats.total, stats.kept, stats.dropped_long_prompts,
        max_prompt_length, stats.left_truncated_prompts, stats.truncated_completions, max_length)
    columns: dict[str, list[Any]] = {}
    for name in dataset.column_names:
        values = list(dataset[name])
        columns[name] = [values[i] for i in kept]
    columns["prompt_input_ids"] = kept_prompt_ids
    columns["completion_input_ids"] = kept_completion_ids
    return Dataset.from_dict(columns), stats


# ---------------------------------------------------------------------------------------------------
# Batching


@dataclass
class DistillationCollator:
    """Features with `prompt_input_ids` and `completion_input_ids` → one batch of tensors.

    - `input_ids`, `attention_mask`, `labels` (B, L): prompt + completion, right-padded. `labels` are the
      token ids on completion positions (its EOS included) and -100 on prompt and padding, unshifted as
      transformers' models expect. The mask comes from positions, never from `pad_token_id`, which may
      equal EOS (GPT-2).
    - `prompt_input_ids`, `prompt_attention_mask` (B, P): the prompts alone, left-padded, for generation.

    `max_length` cuts longer sequences on the right; `pad_to_multiple_of` rounds L and P up. A feature
    without `completion_input_ids` counts as an empty completion. Other integer or float fields pass
    through as (B,) tensors.
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def _width(self, lengths: Sequence[int]) -> int:
        width = max(lengths, default=0)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [_ids(f["prompt_input_ids"]) for f in features]
        completions = [_ids(f.get("completion_input_ids", [])) for f in features]
        sequences = [p + c for p, c in zip(prompts, completions)]
        if self.max_length is not None:
            sequences = [s[:self.max_length] for s in sequences]

        batch_size, width = len(features), self._width([len(s) for s in sequences])
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for row, (prompt, sequence) in enumerate(zip(prompts, sequences)):
            input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, :len(sequence)] = 1
            labels[row, len(prompt):len(sequence)] = input_ids[row, len(prompt):len(sequence)]

        prompt_width = self._width([len(p) for p in prompts])
        prompt_input_ids = torch.full((batch_size, prompt_width), self.pad_token_id, dtype=torch.long)
        prompt_attention_mask = torch.zeros((batch_size, prompt_width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if prompt:
                prompt_input_ids[row, prompt_width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
                prompt_attention_mask[row, prompt_width - len(prompt):] = 1

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "prompt_input_ids": prompt_input_ids, "prompt_attention_mask": prompt_attention_mask}
        for key, value in features[0].items():
            if key not in batch and key != "completion_input_ids" and isinstance(value, int | float):
                batch[key] = torch.tensor([f[key] for f in features])
        return batch


def _ids(value: Any) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


# ---------------------------------------------------------------------------------------------------
# Pre-training text


def _pretrain_documents(source: Any, text_field: str) -> Iterator[str]:
    if isinstance(source, Dataset):
        rows: Iterator[tuple[str, Any]] = read_dataset(source, "dataset")
        yield from (_string(r, text_field, w) for w, r in rows)
        return
    paths = [Path(p).expanduser() for p in source] if isinstance(source, list | tuple) else [Path(source).expanduser()]
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".jsonl", ".json"))
            if not found:
                raise DataError(f"{path}: directory holds no .txt, .jsonl or .json files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    for path in files:
        if path.suffix.lower() in (".jsonl", ".json"):
            rows = read_file(path)
            count = 0
            for where, record in rows:
                if not isinstance(record, Mapping):
                    raise DataError(f"{where}: expected an object with a {text_field!r} field")
                count += 1
                yield _string(record, text_field, where)
            if not count:
                raise DataError(f"{path}: empty file, no documents")
        else:
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                raise DataError(f"{path}: empty file, no text")
            yield text


def load_pretrain_chunks(
    source: str | os.PathLike | Sequence[str | os.PathLike] | Dataset,
    tokenizer: Any,
    seq_length: int,
    *,
    text_field: str = "text",
    max_chunks: int | None = None,
) -> Dataset:
    """Pack a text corpus into a `Dataset` of `input_ids` chunks of exactly `seq_length` tokens.

    `source`: a plain-text file (one document per file), a JSONL/JSON file with a `text` field per row
    (one document per row), a directory or list of such files, or a `Dataset` with a `text` column.
    Each document is tokenised without special tokens and followed by EOS; the documents are joined and
    cut into consecutive chunks. The ragged tail (fewer than `seq_length` tokens) is dropped, so up to
    `seq_length - 1` tokens of the corpus go unused. `max_chunks` stops after that many chunks.
    """
    if seq_length < 1:
        raise DataError(f"seq_length must be >= 1, got {seq_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token")
    budget = None if max_chunks is None else max_chunks * seq_length
    tokens: list[int] = []
    for document in _pretrain_documents(source, text_field):
        tokens += tokenizer(document, add_special_tokens=False)["input_ids"]
        tokens.append(eos)
        if budget is not None and len(tokens) >= budget:
            break
    n_chunks = len(tokens) // seq_length
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise DataError(f"{source}: only {len(tokens)} tokens, fewer than seq_length={seq_length}")
    chunks = np.asarray(tokens[:n_chunks * seq_length], dtype=np.int64).reshape(n_chunks, seq_length)
    logger.info("packed %d tokens into %d chunks of %d; dropped the last %d tokens", len(tokens), n_chunks,
                seq_length, len(tokens) - n_chunks * seq_length)
    return Dataset.from_dict({"input_ids": chunks})


__all__ = [
    "ALPACA_TEMPLATE", "ALPACA_TEMPLATE_WITH_INPUT", "BUNDLED_SETS", "DATA_DIR_ENV", "DataError",
    "DistillationCollator", "TokenizationStats", "bundled_set_path", "detect_format", "encode_prompt",
    "find_data_dir", "load_instruction_data", "load_pretrain_chunks", "packaged_data_dir", "special_prefix",
    "tokenize_dataset",
]


def prepare_training_dataset(dataset, tokenizer, args, name: str):
    """Any format `load_instruction_data` reads → a dataset with `prompt_input_ids` and `completion_input_ids`,
    tokenised with the template, lengths and truncation of `args` (a `DistillationConfig`); `name` is the
    argument named in errors."""
    if dataset is None:
        return None
    columns = set(dataset.column_names)
    if not {"prompt_input_ids", "completion_input_ids"} <= columns:
        dataset = load_instruction_data(dataset, template=args.template, tokenizer=tokenizer)
        dataset, _ = tokenize_dataset(dataset, tokenizer, max_prompt_length=args.max_prompt_length,
                                      max_length=args.max_length, prompt_truncation=args.prompt_truncation)
        if len(dataset) == 0:
            raise ValueError(f"{name}: no example left after tokenization (prompts over max_prompt_length="
                             f"{args.max_prompt_length} are dropped with prompt_truncation='drop')")
    if (getattr(args, "train_sampling_strategy", "random") != "random"
            and args.length_column_name not in dataset.column_names):
        # The length-aware samplers (group_by_length, batch_rebalance) read each example's length from this
        # column; without it they look for an `input_ids` column, which this dataset does not have.
        def length(example: dict) -> dict:
            total = len(example["prompt_input_ids"]) + len(example["completion_input_ids"])
            return {args.length_column_name: min(total, args.max_length)}

        dataset = dataset.map(length, desc="lengths")
    return dataset
