"""Evaluation as in MiniLLM and DPKD: exact match and ROUGE-L on instruction sets, over several seeds.

`compute_metrics` is the metric; `evaluate_model` (behind `dpkd eval`) generates on the evaluation sets,
keeps resumable predictions files, and writes `metrics.json`; with a teacher it adds the paper's Table 3
diagnostics (implicit reward and reverse KL on the first response token). Tables and charts over several
runs are `dpkd.report`'s.

Output layout of `evaluate_model(model, out_dir=OUT)`:

    OUT/metrics.json                            per set: per-seed values, their mean and std, settings
    OUT/predictions/<set>/seed<k>.jsonl         one line per example (text and sampled token ids), written
                                                batch by batch, each with a digest of its content, the
                                                model's fingerprint and the settings
    OUT/predictions/<set>/seed<k>.settings.json what produced that file (model, sampling, batch size)
    OUT/teacher_predictions/<set>/...           the same for the teacher's outputs (with a teacher)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import re
import string
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from dpkd.data import BUNDLED_SETS, encode_prompt, load_instruction_data
from dpkd.durable import write_atomically
from dpkd.generation import (
    SamplingConfig,
    build_scoring_batch,
    generate_responses,
    left_pad,
    score_sequences,
)
from dpkd.modeling import (
    TokenizerMismatchError,
    check_tokenizers_match,
    hub_unreachable_reason,
    is_hub_id,
    load_tokenizer,
    missing_path_hint,
)
from dpkd.teacher_cache import model_fingerprint

logger = logging.getLogger(__name__)

DEFAULT_SETS = ("dolly", "selfinst", "vicuna", "sinst")
DEFAULT_SEEDS = (10, 20, 30, 40, 50)
# Predictions files whose settings say so carry a digest per line; older ones are generated again.
PREDICTIONS_FORMAT = 2
# Bytes hashed per weight tensor to identify the evaluated model (see `model_fingerprint`).
FINGERPRINT_SAMPLE_BYTES = 1 << 16
# Reference-length buckets of the paper's Tables 4-5, in words: [0, 30), [30, 70), [70, inf).
LENGTH_BUCKETS = (("0-30", 0, 30), ("30-70", 30, 70), ("70+", 70, math.inf))

_PUNCTUATION = set(string.punctuation)
_rouge_scorer = None


class EvaluationError(ValueError):
    """Bad input to `dpkd eval` or `dpkd report`: the message names the argument, file or field."""


# --------------------------------------------------------------------------------------------------
# Metrics


def normalize_answer(text: str) -> str:
    """MiniLLM's normalisation: lower-case, drop ASCII punctuation, collapse whitespace (articles stay)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def _rouge_l(prediction: str, reference: str) -> float:
    global _rouge_scorer
    if _rouge_scorer is None:
        from rouge_score import rouge_scorer

        _rouge_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _rouge_scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure


def compute_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and ROUGE-L as MiniLLM computes them, both in percent.

    exact_match = 100 · mean_i max_r [normalize(pred_i) == normalize(ref_ir)]
    rougeL      = 100 · mean_i max_r F1_LCS(pred_i, ref_ir)   (rouge-score, Porter stemmer, reference as target)
    """
    if len(predictions) != len(references):
        raise EvaluationError(f"compute_metrics: {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise EvaluationError("compute_metrics: no predictions to score")
    exact = rouge = 0.0
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str) or not refs:
            raise EvaluationError(f"compute_metrics: references[{i}] must be a non-empty list of strings")
        normalized = normalize_answer(prediction)
        exact += max(float(normalized == normalize_answer(r)) for r in refs)
        rouge += max(_rouge_l(prediction, r) for r in refs)
    return {"exact_match": 100.0 * exact / len(predictions), "rougeL": 100.0 * rouge / len(predictions)}


def length_bucket(reference: str) -> str:
    """The paper's bucket ("0-30", "30-70", "70+") of a reference by its number of words."""
    words = len(reference.split())
    return next(name for name, low, high in LENGTH_BUCKETS if low <= words < high)


def metrics_by_reference_length(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, dict[str, float | int | None]]:
    """`compute_metrics` within each reference-length bucket (the first reference decides the bucket).

    Returns {bucket: {"n": count, "exact_match": ..., "rougeL": ...}}; metrics are None for an empty bucket.
    """
    out: dict[str, dict[str, float | int | None]] = {}
    for name, _, _ in LENGTH_BUCKETS:
        rows = [i for i, refs in enumerate(references) if length_bucket(refs[0]) == name]
        scores = (compute_metrics([predictions[i] for i in rows], [references[i] for i in rows])
                  if rows else {"exact_match": None, "rougeL": None})
        out[name] = {"n": len(rows), **scores}
    return out


def summarize_seeds(per_seed: Sequence[dict]) -> dict:
    """Mean and population standard deviation (ddof=0) over seeds, leaf by leaf of nested dicts.

    A leaf that is None for any seed (an empty bucket) stays None.
    """
    first = per_seed[0]
    if isinstance(first, dict):
        return {key: summarize_seeds([d[key] for d in per_seed]) for key in first}
    if any(v is None for v in per_seed):
        return {"mean": None, "std": None}
    mean = sum(per_seed) / len(per_seed)
    std = math.sqrt(sum((v - mean) ** 2 for v in per_seed) / len(per_seed))
    return {"mean": mean, "std": std}


# --------------------------------------------------------------------------------------------------
# Checking arguments (before anything is loaded)


def parse_seeds(text: str) -> list[int]:
    """'10,20,30' -> [10, 20, 30]; a clear error naming the bad item."""
    seeds = []
    for item in (s.strip() for s in text.split(",")):
        if not re.fullmatch(r"-?\d+", item):
            raise EvaluationError(f"--seeds: {item!r} is not an integer (expected e.g. 10,20,30,40,50)")
        seeds.append(int(item))
    if len(set(seeds)) != len(seeds):
        raise EvaluationError(f"--seeds: {text!r} repeats a seed")
    return seeds


def set_name(source: str) -> str:
    """The name a set's results are filed under: the bundled name, or a data file's stem."""
    return source if source in BUNDLED_SETS else Path(source).stem


def check_data_sources(sources: Sequence[str]) -> list[str]:
    """Each source must be a bundled set name or an existing file or directory."""
    sources = [s.strip() for s in sources if s.strip()]
    if not sources:
        raise EvaluationError("--data: no evaluation set given")
    for source in sources:
        if source not in BUNDLED_SETS and not Path(source).exists():
            raise EvaluationError(
                f"--data: unknown evaluation set {source!r}: expected one of {', '.join(BUNDLED_SETS)} "
                "or the path of an existing data file"
            )
    names = [set_name(s) for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluationError(f"--data: two sets would be filed under the same name {duplicates[0]!r}")
    return sources


def check_model_dir(path: str | Path, argument: str = "--model") -> Path | str:
    """A model directory that `from_pretrained` can load (it exists and holds config.json), or a Hugging Face
    Hub id (`org/name`, no such local path), returned as the string for `from_pretrained` to fetch; whether
    the hub has it is `check_hub_model`'s to say."""
    if is_hub_id(path):
        return str(path)
    path = Path(path)
    if not path.is_dir():
        raise EvaluationError(f"{argument}: model directory {str(path)!r} does not exist{missing_path_hint(path)}")
    if not (path / "config.json").is_file():
        raise EvaluationError(f"{argument}: {str(path)!r} has no config.json; is it a saved model directory?")
    return path


def check_hub_model(source: str, argument: str = "--model") -> None:
    """Fetch (or find in the local cache) a hub id's config, the smallest file of the model: an id that cannot
    be had fails here, by name, before the data or any weights are read."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source)
    except OSError as error:
        raise _hub_error(source, argument, error) from error


def _hub_error(source: str, argument: str, error: OSError) -> EvaluationError:
    detail = " ".join(str(error).split()) or type(error).__name__
    return EvaluationError(f"{argument}: {source!r} is no local folder, and as a hub id it cannot be fetched: "
                           f"{hub_unreachable_reason()} ({detail})")


def default_out_dir(model: str | Path) -> Path:
    """Where `dpkd eval` writes by default: `<model>/eval`, or `runs/eval/<org>__<name>` for a hub id."""
    if is_hub_id(model):
        return Path("runs", "eval", str(model).replace("/", "__"))
    return Path(model) / "eval"


def _source_label(source: str | Path) -> str:
    """What the files record as a model: a folder's absolute path, or the hub id."""
    return str(source) if isinstance(source, str) else str(source.resolve())


# --------------------------------------------------------------------------------------------------
# Resumable predictions files


def _read_records(path: Path) -> list[dict]:
    """The JSON lines of a predictions file. A last line cut short (a write interrupted by an older dpkd,
    which appended) ends the list; anything else that is not a record is an EvaluationError."""
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise EvaluationError(f"{path}: not UTF-8 text (byte {error.start}), so not a predictions file dpkd "
                              "wrote; delete it or pass another --out") from error
    if lines and lines[-1] == "":
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines):
            logger.info("%s: line %d is cut short (an interrupted write); generating from its batch on", path, number)
        else:
            raise EvaluationError(f"{path}: line {number} is not a predictions record (the file is damaged or "
                                  "was not written by dpkd); delete it or pass another --out")
    return records


def _read_settings(path: Path) -> dict:
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvaluationError(f"{path}: not a readable settings file ({error}); delete it and its predictions "
                              "file, or pass another --out") from error
    if not isinstance(saved, dict):
        raise EvaluationError(f"{path}: not a settings file (expected a JSON object); delete it and its "
                              "predictions file, or pass another --out")
    return saved


def _settings_key(settings: dict) -> str:
    """What a predictions line's digest binds it to: the model's fingerprint and every setting but the path."""
    return json.dumps({k: v for k, v in settings.items() if k != "model"}, sort_keys=True)


def _digest(settings_key: str, record: dict) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "digest"}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(f"{settings_key}\n{body}".encode()).hexdigest()[:24]


def _write_records(path: Path, records: list[dict]) -> None:
    write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _reusable_prefix(records: list[dict], prompts: Sequence[str], batch_size: int, path: Path) -> int:
    """How many leading records can be kept: whole batches laid out exactly as this run lays them out."""
    total = len(prompts)
    kept = 0
    for start in range(0, total, batch_size):
        end = min(start + batch_size, total)
        batch = records[start:end]
        if len(batch) < end - start or any(r.get("index") != start + j or r.get("batch_end") != end
                                           for j, r in enumerate(batch)):
            break
        for r in batch:
            if r.get("prompt") != prompts[r["index"]]:
                raise EvaluationError(
                    f"{path}: line {r['index'] + 1} was generated for another prompt than example "
                    f"{r['index']} of this set (the data changed); delete the file or pass another --out"
                )
        kept = end
    # Lines past the reusable prefix are redone only when they are less than one batch's worth: a batch
    # cut by an interruption, or the short last batch of a run with a smaller --limit. More means real
    # work done with another layout, which is not thrown away silently.
    if kept < total and len(records) - kept >= batch_size:
        raise EvaluationError(
            f"{path}: holds {len(records)} predictions laid out for another --limit; only the first {kept} "
            f"fit this run's {total} examples. Pass another --out or delete the file to start over"
        )
    return kept


def generate_predictions(
    model,
    tokenizer,
    dataset,
    path: Path,
    settings: dict,
    sampling: SamplingConfig,
    *,
    seed: int,
    batch_size: int,
    max_prompt_length: int | None,
    progress_label: str = "",
) -> tuple[list[str], list[list[int]]]:
    """Predictions for every example of `dataset` and their generated token ids, resuming the JSONL file
    at `path` if it exists.

    Each line: {"index", "prompt", "prediction", "response_ids", "references", "batch_end"};
    `response_ids` are the sampled tokens up to and including the EOS generation stopped on (no EOS if it
    stopped at the token limit), without padding: what the teacher diagnostics score. Lines are flushed
    batch by batch. A rerun keeps the complete batches already there and generates the rest; batches are
    seeded by `generate_responses` from `seed` and their first index, so the result equals an
    uninterrupted run. A file whose `<stem>.settings.json` disagrees with `settings` is refused.
    Lines written by an older dpkd, without `response_ids`, are generated again from the first of them
    on (same seeds and settings, so normally the same texts), with a warning: re-encoding their text
    would score other tokens than were sampled.

    Nothing is scored that this model did not make with these settings: each line carries a digest of its
    content, `settings` (with the model's fingerprint) and nothing else, and a line whose digest does not
    match (edited by hand, or copied from another model's file) is refused. A file from an older dpkd,
    without digests, is generated again with a warning. The file is rewritten whole after each batch
    (temporary file, then rename), so an interruption leaves the previous complete batches.
    """
    from tqdm.auto import tqdm

    prompts, references = list(dataset["prompt"]), list(dataset["references"])
    settings = {**settings, "format": PREDICTIONS_FORMAT}
    key = _settings_key(settings)
    settings_path = path.with_name(path.stem + ".settings.json")
    records: list[dict] = []
    if path.exists():
        if not settings_path.exists():
            raise EvaluationError(f"{path}: exists without {settings_path.name}, so what produced it is "
                                  "unknown; delete the file or pass another --out")
        saved = _read_settings(settings_path)
        # The model path is informative only: the fingerprint identifies the model.
        differing = sorted(k for k in set(settings) | set(saved)
                           if k not in ("model", "model_fingerprint", "format") and saved.get(k) != settings.get(k))
        if differing:
            raise EvaluationError(
                f"{path}: predictions made with other settings (differ in: {', '.join(differing)}); "
                "delete the file or pass another --out"
            )
        if saved.get("format") != PREDICTIONS_FORMAT:
            logger.warning("%s: written by an older dpkd, without a digest per line, so it cannot be checked; "
                           "generating it again", path)
        elif saved.get("model_fingerprint") != settings["model_fingerprint"]:
            raise EvaluationError(
                f"{path}: predictions made by another model (fingerprint {saved.get('model_fingerprint')}, this "
                f"model's is {settings['model_fingerprint']}); delete the file or pass another --out"
            )
        else:
            records = _read_records(path)
        without_ids = next((i for i, r in enumerate(records) if not _has_response_ids(r)), None)
        if without_ids is not None and without_ids < len(prompts):
            logger.warning("%s: lines from %d on have no generated token ids (written by an older dpkd); "
                           "generating them again", path, without_ids + 1)
            records = records[:without_ids]
        kept = _reusable_prefix(records, prompts, batch_size, path)
        for r in records[:kept]:
            if r.get("digest") != _digest(key, r):
                raise EvaluationError(
                    f"{path}: line {r['index'] + 1} is not what this model made with these settings (its digest "
                    "does not match: edited by hand, or copied from another run), so the file is not scored; "
                    "delete it or pass another --out"
                )
        if kept == len(prompts):
            # Complete (possibly for a larger --limit too): nothing to generate, the file stays as it is.
            return [r["prediction"] for r in records[:kept]], [r["response_ids"] for r in records[:kept]]
        records = records[:kept]
        if kept:
            logger.info("%s: resuming after %d of %d predictions", path, kept, len(prompts))
    path.parent.mkdir(parents=True, exist_ok=True)
    if records:
        _write_records(path, records)  # drop what follows the kept batches; the settings are the same
    else:
        path.unlink(missing_ok=True)  # never lines without the settings that made them
    write_atomically(settings_path, json.dumps(settings, indent=2) + "\n")
    bar = tqdm(total=len(prompts), initial=len(records), desc=progress_label, unit="ex", leave=False)
    for start in range(len(records), len(prompts), batch_size):
        end = min(start + batch_size, len(prompts))
        responses = generate_responses(model, tokenizer, prompts[start:end], sampling,
                                       batch_size=end - start, max_prompt_length=max_prompt_length,
                                       seed=seed, start_index=start)
        for i, response in zip(range(start, end), responses):
            record = {"index": i, "prompt": prompts[i], "prediction": response.text,
                      "response_ids": response.token_ids, "references": list(references[i]), "batch_end": end}
            records.append({**record, "digest": _digest(key, record)})
        _write_records(path, records)
        bar.update(end - start)
    bar.close()
    return [r["prediction"] for r in records], [r["response_ids"] for r in records]


def _has_response_ids(record: dict) -> bool:
    ids = record.get("response_ids")
    return isinstance(ids, list) and bool(ids) and all(isinstance(t, int) for t in ids)


# --------------------------------------------------------------------------------------------------
# Teacher diagnostics (the paper's Table 3)


def _forward(model, input_ids, attention_mask, logits_to_keep: int):
    # Left padding: positions must count real tokens only, or padded rows see shifted positions.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = logits_to_keep
    return model(**kwargs).logits[:, -logits_to_keep:]


def response_logps(model, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], *,
                   pad_token_id: int, batch_size: int = 8):
    """log q(y|x) = Σ_i log q(y_i | x, y_<i) for each (prompt, response) pair, and |y|, in float32.

    Left-padded prompts, right-padded responses, scored by `dpkd.generation.score_sequences` (inference
    mode, positions from the attention mask, only the response positions projected to the vocabulary).
    """
    device = next(model.parameters()).device
    sums, lengths = [], []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, responses = prompt_ids[start:start + batch_size], response_ids[start:start + batch_size]
        prompt_ids_, prompt_mask = left_pad(prompts, pad_token_id)
        width = max(len(r) for r in responses)
        response_ids_ = torch.full((len(responses), width), pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((len(responses), width), dtype=torch.long)
        for row, r in enumerate(responses):
            response_ids_[row, :len(r)] = torch.tensor(r, dtype=torch.long)
            response_mask[row, :len(r)] = 1
        batch = build_scoring_batch(prompt_ids_, prompt_mask, response_ids_, response_mask)
        total, count = score_sequences(model, {k: v.to(device) for k, v in batch.items()})
        sums.append(total.float().cpu())
        lengths.append(count.cpu())
    return torch.cat(sums), torch.cat(lengths)


def first_token_reverse_kl(student, teacher, prompt_ids: Sequence[list[int]], *, pad_token_id: int,
                           batch_size: int = 8) -> float:
    """Mean over prompts of KL(q || p) = Σ_v q(v|x) [log q(v|x) − log p(v|x)] at the first response token.

    q is the student, p the teacher; float32 log-softmax. When the two models pad their vocabularies to
    different sizes, both distributions are taken over the shared leading ids.
    """
    device = next(student.parameters()).device
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(prompt_ids), batch_size):
            ids, mask = left_pad(prompt_ids[start:start + batch_size], pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            q_logits = _forward(student, ids, mask, 1)[:, -1].float()
            p_logits = _forward(teacher, ids, mask, 1)[:, -1].float()
            vocab = min(q_logits.shape[-1], p_logits.shape[-1])
            log_q = torch.log_softmax(q_logits[:, :vocab], dim=-1)
            log_p = torch.log_softmax(p_logits[:, :vocab], dim=-1)
            total += (log_q.exp() * (log_q - log_p)).sum().item()
    return total / len(prompt_ids)


def implicit_rewards(student, teacher, tokenizer, prompts: Sequence[str], response_ids: Sequence[list[int]], *,
                     beta: float, max_prompt_length: int | None, batch_size: int) -> dict[str, float]:
    """Mean implicit reward r̂ = β·[log q(y|x) − log p(y|x)] over the pairs, and its per-token form r̂/|y|.

    y is the response's token ids as generated (EOS included if generation stopped on it, no padding;
    see `generate_predictions`), never its text re-encoded, which can be tokenised differently.
    x is the prompt encoded as generation encoded it.
    """
    empty = [i for i, r in enumerate(response_ids) if len(r) == 0]
    if empty:
        raise EvaluationError(f"implicit_rewards: response {empty[0]} has no tokens to score")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = [_encode_prompt(tokenizer, p, max_prompt_length) for p in prompts]
    log_q, n = response_logps(student, prompt_ids, response_ids, pad_token_id=pad, batch_size=batch_size)
    log_p, _ = response_logps(teacher, prompt_ids, response_ids, pad_token_id=pad, batch_size=batch_size)
    reward = beta * (log_q - log_p)
    return {"reward": reward.mean().item(), "reward_per_token": (reward / n).mean().item()}


def _encode_prompt(tokenizer, prompt: str, max_prompt_length: int | None) -> list[int]:
    # The same encoding and truncation `generate_responses` and training apply.
    return encode_prompt(tokenizer, prompt, max_prompt_length=max_prompt_length)


def check_shared_vocabulary(student_dir: Path, teacher_dir: Path):
    """Load both tokenizers, refuse them unless `dpkd.modeling.check_tokenizers_match` accepts them, and
    return the student's.

    Both are loaded with `load_tokenizer`, which gives a tokenizer without a pad token its EOS, as training
    does: a teacher saved without a pad token still matches a student that `dpkd train` saved with one.
    The models' vocabulary sizes are not compared: `first_token_reverse_kl` handles padded vocabularies.
    """
    student_tok = load_tokenizer(student_dir)
    try:
        check_tokenizers_match(load_tokenizer(teacher_dir), student_tok)
    except TokenizerMismatchError as error:
        # Its first line says what distillation needs; the list of differences follows it.
        _, _, differences = str(error).partition(":\n")
        raise EvaluationError(
            f"--teacher: {teacher_dir} and --model {student_dir} do not share a vocabulary; log q/p "
            f"compares token ids:\n{differences or str(error)}"
        ) from error
    return student_tok


# --------------------------------------------------------------------------------------------------
# The evaluation run


def _check_sampling(sampling: SamplingConfig) -> None:
    if sampling.max_new_tokens < 1:
        raise EvaluationError(f"--max-new-tokens: expected at least 1, got {sampling.max_new_tokens}")
    if sampling.do_sample:
        if sampling.temperature <= 0:
            raise EvaluationError(f"--temperature: expected > 0 (or --greedy), got {sampling.temperature}")
        if sampling.top_k < 0:
            raise EvaluationError(f"--top-k: expected >= 0 (0 is off), got {sampling.top_k}")
        if not 0 < sampling.top_p <= 1:
            raise EvaluationError(f"--top-p: expected a value in (0, 1], got {sampling.top_p}")


def _load_model(path: Path | str, device: str, dtype: str, argument: str):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=False)
    except OSError as error:
        if not isinstance(path, str):
            raise
        raise _hub_error(path, argument, error) from error
    return model.to(device).eval()


def evaluate_model(
    model_dir: str | Path,
    *,
    data: Sequence[str] = DEFAULT_SETS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    out_dir: str | Path | None = None,
    teacher_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    sampling: SamplingConfig | None = None,
    max_prompt_length: int | None = 256,
    beta: float = 0.1,
    device: str | None = None,
    dtype: str = "float32",
    template: str = "auto",
) -> dict:
    """Generate on each evaluation set with each seed, score, and write `metrics.json`; returns its content.

    `model_dir` and `teacher_dir` are folders or hub ids (`org/name`, fetched by `from_pretrained`).
    `out_dir` defaults to `<model_dir>/eval` (`runs/eval/<org>__<name>` for a hub id). Per set: per-seed exact match and ROUGE-L, their breakdown
    by reference length, and mean/std over seeds. With `teacher_dir`: the teacher's outputs too (same
    seeds), the mean implicit reward β·log q/p of student and teacher outputs (summed over the sampled
    response tokens and per token), and the reverse KL KL(q||p) on the first response token.
    The evaluated checkpoint is exactly `model_dir`: no checkpoint selection happens here.
    `template`: the prompt template (`dpkd.data.load_instruction_data`); `auto` renders chat data with the
    model's chat template, `chat` renders every set with it (an instruct model), `alpaca`/`none` as named.
    """
    # Everything that can be wrong with the arguments is found before a model is loaded.
    model_dir = check_model_dir(model_dir)
    teacher_dir = check_model_dir(teacher_dir, "--teacher") if teacher_dir is not None else None
    sources = check_data_sources(list(data))
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise EvaluationError("--seeds: no seed given")
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit: expected a positive number of examples, got {limit}")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size: expected at least 1, got {batch_size}")
    if beta <= 0:
        raise EvaluationError(f"--beta: expected β > 0, got {beta}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise EvaluationError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    sampling = sampling or SamplingConfig()
    _check_sampling(sampling)
    for source, argument in ((model_dir, "--model"), (teacher_dir, "--teacher")):
        if isinstance(source, str):
            check_hub_model(source, argument)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(model_dir)
    # The tokenizer (cheap) before the data: chat prompts are rendered with its chat template.
    if teacher_dir is not None:
        tokenizer = check_shared_vocabulary(model_dir, teacher_dir)
    else:
        tokenizer = load_tokenizer(model_dir)
    datasets = {set_name(s): load_instruction_data(s, data_dir=data_dir, limit=limit, template=template,
                                                   tokenizer=tokenizer) for s in sources}
    for name, dataset in datasets.items():
        if len(dataset) == 0:
            raise EvaluationError(f"--data: evaluation set {name!r} has no examples")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _load_model(model_dir, device, dtype, "--model")
    teacher = _load_model(teacher_dir, device, dtype, "--teacher") if teacher_dir is not None else None

    # The models are identified by a hash of their weights, so a moved run directory still resumes and a
    # model retrained in place does not.
    fingerprints = {model_dir: model_fingerprint(model, sample_bytes_per_tensor=FINGERPRINT_SAMPLE_BYTES)}
    if teacher is not None:
        fingerprints[teacher_dir] = model_fingerprint(teacher, sample_bytes_per_tensor=FINGERPRINT_SAMPLE_BYTES)

    def file_settings(path: Path, seed: int) -> dict:
        return {"model": _source_label(path), "model_fingerprint": fingerprints[path], "seed": seed,
                "sampling": asdict(sampling), "batch_size": batch_size, "max_prompt_length": max_prompt_length,
                "dtype": dtype, "device_type": torch.device(device).type,
                **({"template": template} if template != "auto" else {})}

    generation = dict(sampling=sampling, batch_size=batch_size, max_prompt_length=max_prompt_length)
    results: dict[str, dict] = {}
    for name, dataset in datasets.items():
        references = [list(r) for r in dataset["references"]]
        per_seed: dict[str, dict] = {}
        for seed in seeds:
            path = out_dir / "predictions" / name / f"seed{seed}.jsonl"
            predictions, response_ids = generate_predictions(
                model, tokenizer, dataset, path, file_settings(model_dir, seed), seed=seed,
                progress_label=f"{name} seed {seed}", **generation)
            scores: dict = {**compute_metrics(predictions, references),
                            "by_reference_length": metrics_by_reference_length(predictions, references)}
            if teacher is not None:
                teacher_path = out_dir / "teacher_predictions" / name / f"seed{seed}.jsonl"
                teacher_predictions, teacher_response_ids = generate_predictions(
                    teacher, tokenizer, dataset, teacher_path, file_settings(teacher_dir, seed), seed=seed,
                    progress_label=f"{name} seed {seed} (teacher)", **generation)
                scores["teacher"] = compute_metrics(teacher_predictions, references)
                reward_args = dict(beta=beta, max_prompt_length=max_prompt_length, batch_size=batch_size)
                scores["implicit_reward"] = {
                    "student_outputs": implicit_rewards(model, teacher, tokenizer, dataset["prompt"],
                                                        response_ids, **reward_args),
                    "teacher_outputs": implicit_rewards(model, teacher, tokenizer, dataset["prompt"],
                                                        teacher_response_ids, **reward_args),
                }
            per_seed[str(seed)] = scores
        results[name] = {"n_examples": len(dataset), "per_seed": per_seed,
                         "summary": summarize_seeds(list(per_seed.values()))}
        if teacher is not None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            prompt_ids = [_encode_prompt(tokenizer, p, max_prompt_length) for p in dataset["prompt"]]
            results[name]["reverse_kl_first_token"] = first_token_reverse_kl(
                model, teacher, prompt_ids, pad_token_id=pad, batch_size=batch_size)

    metrics = {
        "model": _source_label(model_dir),
        "teacher": _source_label(teacher_dir) if teacher_dir is not None else None,
        "settings": {"data": sources, "seeds": seeds, "limit": limit, "sampling": asdict(sampling),
                     "batch_size": batch_size, "max_prompt_length": max_prompt_length, "beta": beta,
                     "template": template, "dtype": dtype, "device": device, "std": "population (ddof=0) over seeds",
                     "length_buckets_words": [name for name, _, _ in LENGTH_BUCKETS]},
        "sets": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics

