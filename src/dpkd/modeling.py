"""Models and tokenizers: loading, building small ones offline, deriving students from teachers, and the
hidden-state helpers the training step projects through (final hidden states, running inside a DDP/FSDP wrapper).

Nothing here downloads: everything loads from local paths or is built from a config.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dpkd.suggest import did_you_mean

EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, eos_token: str = EOS_TOKEN
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer in seconds, offline.

    Byte-level, so it encodes any text (no unknown tokens). EOS doubles as the padding token, as with
    GPT-2: code that builds labels must therefore never infer masking from `pad_token_id`.
    Deterministic for the same texts and vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos_token, bos_token=eos_token, pad_token=eos_token
    )


def tiny_config(arch: str, vocab_size: int, *, n_layer: int = 2, d_model: int = 64, n_head: int = 4,
                max_positions: int = 512, eos_token_id: int = 0):
    """A small `transformers` config of the given architecture (`gpt2` or `llama`), random weights."""
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=d_model, n_layer=n_layer,
                          n_head=n_head, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                          pad_token_id=eos_token_id)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                           num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                           max_position_embeddings=max_positions, bos_token_id=eos_token_id,
                           eos_token_id=eos_token_id, pad_token_id=eos_token_id, tie_word_embeddings=False)
    raise ValueError(f"arch: expected 'gpt2' or 'llama', got {arch!r}")


def save_model_and_tokenizer(model, tokenizer, path: str | Path) -> Path:
    """Save both with `save_pretrained` (safetensors) so `from_pretrained(path)` restores them."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """`torch.float32`, a name such as `"bf16"`/`"bfloat16"`, `"auto"` (the checkpoint's own) or None (float32)."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


def _resolve_name(path: str | Path) -> str | Path:
    """A registered model name (`dpkd.pretrained.MODELS`, e.g. `smollm2-135m-instruct`) → its converted folder."""
    from dpkd import pretrained

    return pretrained.resolve(path)


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether `source` reads as a Hugging Face Hub repository id, `org/name`, and not as a local path: no
    leading `.` or `/`, one slash, no such file or folder here, and no local folder `org` either (`runs/stdent`
    is a mistyped folder in `runs/`, not a repository of an organisation `runs`). `from_pretrained` fetches it."""
    text = str(source)
    return (re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.startswith(".")
            and not Path(text).exists() and not Path(text).parent.is_dir())


def missing_path_hint(path: str | os.PathLike) -> str:
    """` (did you mean 'x'?)` for the entries of the missing path's folder closest to its name, or ""."""
    path = Path(path)
    try:
        siblings = [entry.name for entry in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        siblings = []
    return did_you_mean(path.name, siblings, n=2)


def hub_unreachable_reason() -> str:
    """Why a hub id could not be fetched, as far as dpkd can tell: offline mode, or a failed download."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "the Hugging Face Hub is offline (HF_HUB_OFFLINE is set) and it is not in the local cache"
    return "the Hugging Face Hub is unreachable or has no such repository, and it is not in the local cache"


def _check_local_source(path: str | Path, gguf_file: str | None) -> None:
    """Fail early and by name on a local path that does not exist (a hub id, `org/name`, is passed through)."""
    path = Path(path)
    looks_local = path.is_absolute() or str(path).startswith(".") or len(path.parts) > 2 or path.exists()
    in_local_folder = len(path.parts) == 2 and path.parent.is_dir()  # `runs/stdent`: see is_hub_id
    if (looks_local or in_local_folder) and not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist{missing_path_hint(path)}")
    if gguf_file is not None and path.is_dir() and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {str(path)!r}")


def load_causal_lm(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from a local directory, a hub id or a registered name (`dpkd.pretrained`) with
    `AutoModelForCausalLM.from_pretrained`.

    safetensors weights are preferred when both formats are present (a `.bin` checkpoint is read with
    `torch.load(weights_only=True)` by transformers). `gguf_file` names a GGUF file inside `path`
    (transformers dequantises it to `dtype`; the `gguf` package must be installed). `device` places the
    weights while loading (`device_map`), so a big teacher never sits twice in host memory.
    Remote code runs only when `trust_remote_code=True`.
    """
    from transformers import AutoModelForCausalLM

    path = _resolve_name(path)
    _check_local_source(path, gguf_file)
    kwargs = {"trust_remote_code": trust_remote_code}
    resolved = resolve_dtype(dtype)
    if resolved is not None:
        kwargs["dtype"] = resolved
    if device is not None:
        kwargs["device_map"] = {"": str(device)}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = _has_safetensors(path) or None
    return _from_files(lambda: AutoModelForCausalLM.from_pretrained(str(path), **kwargs), "model", path, gguf_file)


class ModelFileError(ValueError):
    """A model or tokenizer whose files cannot be read (truncated weights, a corrupt GGUF file, a broken
    config): the message names the folder or file."""


def _from_files(load: Callable[[], object], what: str, path: str | Path, gguf_file: str | None):
    """`load()`, with the errors of unreadable files raised as a ModelFileError that names them."""
    from pickle import UnpicklingError

    from safetensors import SafetensorError

    # A corrupt GGUF file fails in the gguf reader with whatever numpy or struct raise on short data.
    expected = (Exception,) if gguf_file is not None else (OSError, ValueError, RuntimeError, SafetensorError,
                                                           UnpicklingError)
    try:
        return load()
    except (ImportError, MemoryError, torch.OutOfMemoryError):
        raise
    except expected as err:
        source = Path(path) / gguf_file if gguf_file is not None else path
        detail = " ".join(str(err).split()) or type(err).__name__
        damaged = gguf_file is not None or isinstance(err, SafetensorError | RuntimeError | UnpicklingError)
        hint = " (is a file truncated or corrupt? copy or download the model again)" if damaged else ""
        if gguf_file is None and isinstance(err, OSError) and is_hub_id(path):
            hint = f" ({path!s} is a hub id: {hub_unreachable_reason()})"
        raise ModelFileError(f"{source}: cannot load the {what}: {detail}{hint}") from err


def _has_safetensors(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.glob("*.safetensors"))


def load_tokenizer(
    path: str | Path,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    padding_side: str = "left",
) -> PreTrainedTokenizerBase:
    """Load a tokenizer with `AutoTokenizer.from_pretrained`; give it a pad token (EOS) if it has none.

    Left padding by default: prompts are padded on the left for generation.
    """
    from transformers import AutoTokenizer

    path = _resolve_name(path)
    _check_local_source(path, gguf_file)
    kwargs = {"trust_remote_code": trust_remote_code, "padding_side": padding_side}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = _from_files(lambda: AutoTokenizer.from_pretrained(str(path), **kwargs), "tokenizer", path, gguf_file)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {str(path)!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class TokenizerMismatchError(ValueError):
    """Teacher and student do not share a vocabulary: their token ids mean different things."""


def check_tokenizers_match(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    *,
    teacher_vocab_size: int | None = None,
    student_vocab_size: int | None = None,
    max_listed: int = 10,
) -> None:
    """Raise `TokenizerMismatchError` saying what differs, unless both map every token to the same id.

    Compared: the token → id maps (tokens whose ids differ, tokens only one side has), the EOS and pad
    ids, and, when given, the models' vocabulary sizes (`config.vocab_size`: the width of their logits,
    which token-level losses compare position by position).
    """
    problems: list[str] = []
    if teacher_vocab_size is not None and student_vocab_size is not None and teacher_vocab_size != student_vocab_size:
        problems.append(f"model vocabulary sizes differ: teacher {teacher_vocab_size}, student {student_vocab_size}")
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if len(teacher_vocab) != len(student_vocab):
        problems.append(f"tokenizer sizes differ: teacher {len(teacher_vocab)} tokens, student {len(student_vocab)}")
    different_ids = sorted(
        (teacher_vocab[t], t, student_vocab[t]) for t in teacher_vocab.keys() & student_vocab.keys()
        if teacher_vocab[t] != student_vocab[t]
    )
    if different_ids:
        listed = ", ".join(f"{t!r} (teacher {a}, student {b})" for a, t, b in different_ids[:max_listed])
        problems.append(f"{len(different_ids)} tokens have different ids: {listed}")
    for side, only in (("teacher", teacher_vocab.keys() - student_vocab.keys()),
                       ("student", student_vocab.keys() - teacher_vocab.keys())):
        if only:
            vocab = teacher_vocab if side == "teacher" else student_vocab
            listed = ", ".join(f"{t!r} (id {vocab[t]})" for t in sorted(only, key=vocab.get)[:max_listed])
            problems.append(f"{len(only)} tokens only in the {side} tokenizer: {listed}")
    for name in ("eos_token_id", "pad_token_id"):
        teacher_id, student_id = getattr(teacher_tokenizer, name), getattr(student_tokenizer, name)
        if teacher_id != student_id:
            problems.append(f"{name} differs: teacher {teacher_id}, student {student_id}")
    if problems:
        raise TokenizerMismatchError(
            "teacher and student tokenizers do not match; distillation compares token ids and needs one "
            "shared vocabulary:\n  - " + "\n  - ".join(problems)
        )


# ---------------------------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------------------------


def _block_list(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of transformer blocks: the one with `num_hidden_layers` entries (`model.layers`, `transformer.h`, ...)."""
    n_layers = model.config.num_hidden_layers
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers]
    if len(candidates) != 1:
        raise ValueError(
            f"student_from_teacher: expected one list of {n_layers} transformer blocks in "
            f"{type(model).__name__}, found {[name for name, _ in candidates]}"
        )
    return candidates[0]


def evenly_spaced_layers(n_layers: int, keep: int) -> list[int]:
    """`keep` block indices out of `n_layers`, evenly spaced from the first block to the last:
    round(i·(n_layers − 1)/(keep − 1)) for i = 0 … keep − 1 (just block 0 for keep = 1)."""
    if not 1 <= keep <= n_layers:
        raise ValueError(f"keep_layers must be between 1 and the teacher's {n_layers} layers, got {keep}")
    if keep == 1:
        return [0]
    return [round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)]


def student_from_teacher(
    teacher: PreTrainedModel, keep_every: int = 2, *, layers: Sequence[int] | None = None,
    keep_layers: int | None = None,
) -> PreTrainedModel:
    """A smaller student built from a teacher's own weights: blocks 0, k, 2k, ... (k = `keep_every`).

    How same-tokenizer students are usually initialised (DistilBERT kept every other layer): the
    student starts from the teacher's embeddings, final norm, LM head and the kept blocks, copied, with
    the same architecture and `num_hidden_layers` set to the number kept (per-layer config lists such as
    `layer_types` are subset to match). `layers` chooses the blocks explicitly instead, `keep_layers` a
    number of blocks evenly spaced from the first to the last (`evenly_spaced_layers`). Works for any
    decoder whose blocks sit in one `ModuleList` (Llama, GPT-2, OPT, Mistral, Qwen2, ...); the result
    saves with `save_pretrained` and reloads with `AutoModelForCausalLM.from_pretrained`.
    """
    n_layers = teacher.config.num_hidden_layers
    if layers is not None and keep_layers is not None:
        raise ValueError("student_from_teacher: pass layers or keep_layers, not both")
    if keep_layers is not None:
        layers = evenly_spaced_layers(n_layers, keep_layers)
    if layers is None:
        if keep_every < 1:
            raise ValueError(f"keep_every must be >= 1, got {keep_every}")
        layers = list(range(0, n_layers, keep_every))
    layers = list(layers)
    if not layers or any(not 0 <= i < n_layers for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct block indices in [0, {n_layers}), got {layers}")
    list_name, _ = _block_list(teacher)
    config = copy.deepcopy(teacher.config)
    for field, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n_layers and field != "architectures":
            setattr(config, field, [value[i] for i in layers])
    config.num_hidden_layers = len(layers)
    student = type(teacher)(config).to(dtype=next(teacher.parameters()).dtype)
    new_index = {old: new for new, old in enumerate(layers)}
    prefix = list_name + "."
    state = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith(prefix):
            block, rest = key[len(prefix):].split(".", 1)
            if int(block) not in new_index:
                continue
            key = f"{prefix}{new_index[int(block)]}.{rest}"
        state[key] = tensor.detach().clone()
    student.load_state_dict(state, strict=True)
    student.train(teacher.training)
    return student


def apply_lora(
    model: PreTrainedModel,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str | None = None,
    **lora_kwargs,
):
    """Wrap a causal LM with peft LoRA adapters; only the adapters train.

    `target_modules=None` takes peft's defaults for known architectures (the attention projections:
    `q_proj`/`v_proj` for Llama, `c_attn` for GPT-2) and every linear layer but the head otherwise.
    Extra keywords go to `peft.LoraConfig`. `model.merge_and_unload()` gives back a plain model for
    `save_pretrained`.
    """
    try:
        from peft import LoraConfig, get_peft_model
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError as error:
        raise ImportError("LoRA needs peft: pip install 'dpkd[peft]'") from error
    if target_modules is None and model.config.model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        target_modules = "all-linear"
    if model.config.model_type == "gpt2":
        lora_kwargs.setdefault("fan_in_fan_out", True)  # GPT-2's Conv1D stores weights as (in, out)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM", **lora_kwargs)
    return get_peft_model(model, config)


def apply_peft(model: PreTrainedModel, fields: dict):
    """`apply_lora` from a recipe's `peft:` section, written with `peft.LoraConfig`'s own field names (`r`,
    `lora_alpha`, `lora_dropout`, `target_modules`, ...); an unknown name is a ValueError naming it."""
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"peft: unknown LoraConfig field(s) {', '.join(unknown)}"
                         f"{did_you_mean(unknown[0], known)}")
    options = {k: v for k, v in fields.items() if k != "task_type"}
    return apply_lora(model, r=options.pop("r", 8), alpha=options.pop("lora_alpha", 16),
                      dropout=options.pop("lora_dropout", 0.05), **options)


# ---------------------------------------------------------------------------------------------------------
# Distributed: the frozen teacher
# ---------------------------------------------------------------------------------------------------------


def prepare_teacher(teacher: PreTrainedModel, accelerator):
    """Place a frozen teacher for inference under the accelerator's distributed setup; returns the model to call.

    - DDP / single process: `accelerator.prepare_model(teacher, evaluation_mode=True)`: moved to the device,
      not wrapped in DDP (it has no gradients to synchronise), a full copy per rank.
    - FSDP2: sharded with `fully_shard` like the student (each block, then the root), so each rank holds
      1/N of it; its forward gathers the shards. Generate with `synced_gpus=True`. (FSDP1 configs fall
      through to the first case: a full, unwrapped copy per rank.)
    - DeepSpeed: a separate inference engine from the accelerator's DeepSpeed config without optimizer
      or scheduler; ZeRO-3 shards it (generate with `synced_gpus=True`), ZeRO-2 and lower keep a full
      copy (stage 0), since ZeRO-2 shards only optimizer states and gradients, which a teacher has none of.
    The teacher is put in eval mode with gradients off first.
    """
    from accelerate.utils import DistributedType

    teacher.eval()
    teacher.requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for training_only in ("optimizer", "scheduler"):
            config.pop(training_only, None)
        zero = config.setdefault("zero_optimization", {})
        zero.pop("offload_optimizer", None)
        if zero.get("stage", 0) != 3:
            zero["stage"] = 0
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()
        return engine
    if accelerator.distributed_type == DistributedType.FSDP and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

        if isinstance(teacher, FSDPModule):
            return teacher
        if any(p.is_meta for p in teacher.parameters()):
            raise ValueError(
                "prepare_teacher: the teacher has weights on the meta device (fsdp_cpu_ram_efficient_loading "
                "loads real weights on rank 0 only); set fsdp_cpu_ram_efficient_loading: false in the "
                "accelerate config"
            )
        from torch.distributed.fsdp import CPUOffloadPolicy

        plugin = accelerator.state.fsdp_plugin
        options = {"reshard_after_forward": plugin.reshard_after_forward,
                   "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
                   "offload_policy": plugin.cpu_offload}
        if not isinstance(plugin.cpu_offload, CPUOffloadPolicy):
            teacher.to(accelerator.device)
        return shard_with_fsdp2(teacher, **options)
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def shard_with_fsdp2(model: PreTrainedModel, **fully_shard_options) -> PreTrainedModel:
    """Shard a model across the default process group with FSDP2: each transformer block, then the root.

    Block by block, as accelerate shards the student: a forward then gathers one block at a time, so a
    rank never holds more than its shard plus one whole block. Keywords go to `fully_shard`.
    """
    from torch.distributed.fsdp import fully_shard

    _, blocks = _block_list(model)
    for block in blocks:
        fully_shard(block, **fully_shard_options)
    fully_shard(model, **fully_shard_options)
    return model


# ---------------------------------------------------------------------------------------------------------
# Hidden states and heads: what the trainer projects itself
# ---------------------------------------------------------------------------------------------------------

# Config fields of models whose logits are not `lm_head(hidden)`; projecting hidden states with the head alone
# would ignore them.
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the `lm_head` (looking through a peft wrapper, whose adapters live inside it)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model.base_model


def final_hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last-layer hidden states (B, L, H), after the final norm; no logits are computed.

    The backbone is called rather than the model so that no position goes through the `lm_head`: the
    caller projects only the loss-bearing positions.
    """
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    return backbone(model)(**kwargs).last_hidden_state


def check_plain_lm_head(model: torch.nn.Module, name: str) -> None:
    """Raise unless the model's logits are its `lm_head` applied to its final hidden states."""
    config = getattr(model, "config", None)
    if config is None:
        return
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field_name in LOGIT_TRANSFORM_FIELDS:
        if getattr(config, field_name, None) not in (None, 1, 1.0):
            raise ValueError(f"{name}: its config sets {field_name}={getattr(config, field_name)!r}; the trainer "
                             "projects hidden states with the lm_head alone and does not apply that transform")


def check_vocabularies_match(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """Raise unless both output layers score the same number of tokens."""
    t = teacher.get_output_embeddings().weight.shape[0]
    s = student.get_output_embeddings().weight.shape[0]
    if t != s:
        raise ValueError(f"teacher_model: its output vocabulary has {t} entries but the student's has {s}; "
                         "teacher-forced distillation compares distributions over one shared vocabulary")


def is_fsdp2(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def run_in_wrapper(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Callable, *args):
    """Call `fn(*args)` as the forward of `wrapper` (DDP, FSDP), so the wrapper does its forward-time work
    (gradient-sync bookkeeping, gathering sharded parameters) around everything `fn` touches, including
    the `lm_head` applied outside the model's own forward. `fn` must call the backbone, not `module`
    itself (a nested root call would reshard FSDP parameters on its way out)."""
    if wrapper is module and not is_fsdp2(module):
        return fn(*args)
    original_forward = module.forward

    def redirected(*_args, **_kwargs):
        module.forward = original_forward
        return fn(*args)

    module.forward = redirected
    try:
        return wrapper()
    finally:
        module.forward = original_forward


def disable_dropout_in_model(model: torch.nn.Module) -> None:
    """Dropout off: every `torch.nn.Dropout`'s p, and every float attribute named `*dropout` of a module (the
    attention dropout Llama-style models read from their config at build time), set to 0, as TRL's
    `disable_dropout_in_model`. The model's config is left as it was, so a saved model keeps its dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)
