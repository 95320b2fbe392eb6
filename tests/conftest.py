"""The test kit every test uses: an offline tokenizer and tiny teacher/student pairs that share it.

Models are built from configs (random weights), saved with `save_pretrained` and loaded back with
`AutoModelForCausalLM.from_pretrained`, the path a user takes.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# One intra-op thread, here and in the subprocesses tests start: the tiny models' matrices are too small to
# split, and a second thread spins on the other core (the trainer's steps cost several times the CPU time).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dpkd.data_files import packaged_data_dir  # noqa: E402
from dpkd.modeling import save_model_and_tokenizer, tiny_config, train_bpe_tokenizer  # noqa: E402

_WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had "
    "by word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again animal point "
    "mother world near build self earth father instruction response input task answer list sort reverse"
).split()


def _make_corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-like text plus the Alpaca template, for training the test tokenizer."""
    rng = random.Random(seed)
    corpus = [
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n\n### Input:\n"
        "\n\n### Response:\n",
    ]
    for _ in range(n_sentences):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        corpus.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]) + " " + str(rng.randint(0, 999)))
    return corpus


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(_make_corpus(), vocab_size=512).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_corpus():
    """`make_corpus(n_sentences=400, seed=0)`: the text the test tokenizer was trained on (seed 0)."""
    return _make_corpus


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _build_pair(root: Path, arch: str, tokenizer) -> tuple[Path, Path]:
    torch.manual_seed(1234)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    teacher = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, n_layer=3, d_model=64, n_head=4, eos_token_id=eos))
    student = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, n_layer=2, d_model=32, n_head=2, eos_token_id=eos))
    return (save_model_and_tokenizer(teacher, tokenizer, root / f"{arch}-teacher"),
            save_model_and_tokenizer(student, tokenizer, root / f"{arch}-student"))


@pytest.fixture(scope="session")
def model_pairs(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, Path]]:
    """{"gpt2": (teacher_dir, student_dir), "llama": (...)}: saved directories, shared tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {arch: _build_pair(root, arch, tokenizer) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def teacher_dir(model_pairs) -> Path:
    return model_pairs["llama"][0]


@pytest.fixture(scope="session")
def student_dir(model_pairs) -> Path:
    return model_pairs["llama"][1]


def load_model(path):
    """Load a saved model as a user would."""
    return AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="session")
def eval_data_dir() -> Path:
    """MiniLLM's evaluation sets as packaged with dpkd (src/dpkd/eval_data, gzip-compressed JSONL)."""
    path = packaged_data_dir()
    if not path.is_dir():
        pytest.fail(f"the packaged evaluation data is missing: {path}")
    return path


# ----------------------------------------------------------------------------------------------------
# Training runs on the tiny models: data, a fast configuration, parameter snapshots

_TRAIN_WORDS = "the of and water people sound house world".split()


def _make_dataset(n: int = 16, seed: int = 0, prompt_words: int = 3,
                  completion_words: int | tuple[int, int] = 4):
    """Short prompt/completion pairs (the TRL format; templates off) so the tiny models run fast.

    `completion_words`: a number of words, or an inclusive (low, high) range drawn per example.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "Repeat: " + " ".join(rng.choices(_TRAIN_WORDS, k=prompt_words)) + "\nAnswer:"
        k = rng.randint(*completion_words) if isinstance(completion_words, tuple) else completion_words
        rows.append({"prompt": prompt, "completion": " " + " ".join(rng.choices(_TRAIN_WORDS, k=k))})
    return Dataset.from_list(rows)


def _make_config(output_dir, method: str, **overrides):
    """A `DistillationConfig` for two steps of batch 4 with short generations, on the CPU unless
    `DPKD_TEST_DEVICE=cuda` (bench/gpu.sh runs the trainer tests on a GPU so); `overrides` win."""
    from dpkd.config import DistillationConfig

    settings = dict(output_dir=str(output_dir), method=method, max_steps=2, per_device_train_batch_size=4,
                    learning_rate=1e-3, max_new_tokens=8, max_prompt_length=48, max_length=64, logging_steps=1,
                    save_steps=2, disable_tqdm=True, seed=0,
                    use_cpu=os.environ.get("DPKD_TEST_DEVICE", "cpu") == "cpu")
    settings.update(overrides)
    return DistillationConfig(**settings)


def _parameters(model) -> dict[str, torch.Tensor]:
    # On the CPU whatever the model's device, so that tests compare them the same way on a GPU.
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


@pytest.fixture(scope="session")
def make_dataset():
    """`make_dataset(n=16, seed=0, prompt_words=3, completion_words=4)` → a prompt/completion `Dataset`."""
    return _make_dataset


@pytest.fixture(scope="session")
def make_config():
    """`make_config(output_dir, method, **overrides)` → a fast `DistillationConfig`."""
    return _make_config


@pytest.fixture(scope="session")
def parameters():
    """`parameters(model)` → {name: detached copy} of its parameters, to compare before and after."""
    return _parameters


@pytest.fixture
def training_jsonl(tmp_path, make_dataset):
    """`training_jsonl(n)`: `n` rows of `make_dataset` written to `<tmp_path>/train.jsonl`, whose path it returns."""

    def write(n: int) -> Path:
        path = tmp_path / "train.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in make_dataset(n=n)))
        return path

    return write
