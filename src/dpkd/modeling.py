"""Models and tokenizers: loading, building small ones offline, and deriving students from teachers.

Nothing here downloads: everything loads from local paths or is built from a config.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

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
