"""Loading, tokenizer checks, students built from teachers, LoRA, and the teacher's preparation."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpkd.modeling import (
    TokenizerMismatchError,
    apply_lora,
    check_tokenizers_match,
    load_causal_lm,
    load_tokenizer,
    prepare_teacher,
    student_from_teacher,
    tiny_config,
    train_bpe_tokenizer,
)


def test_load_causal_lm_applies_dtype_and_device(teacher_dir):
    model = load_causal_lm(teacher_dir, dtype="bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    reference = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert torch.equal(load_causal_lm(teacher_dir).lm_head.weight, reference.lm_head.weight)

def test_loading_a_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_causal_lm(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        load_causal_lm(tmp_path, gguf_file="model.gguf")
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(tmp_path, dtype="float8")

def test_load_tokenizer_pads_on_the_left_with_eos(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == tokenizer.eos_token_id

def test_identical_tokenizers_match_and_one_other_special_id_is_refused_by_name(tokenizer_dir):
    teacher, student = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert check_tokenizers_match(teacher, student, teacher_vocab_size=512, student_vocab_size=512) is None
    # The same token -> id map with another EOS, then another pad token: each alone is refused, by name.
    for name, token_id in (("eos_token_id", 5), ("pad_token_id", 6)):
        other = AutoTokenizer.from_pretrained(tokenizer_dir)
        setattr(other, name.removesuffix("_id"), other.convert_ids_to_tokens(token_id))
        assert other.get_vocab() == teacher.get_vocab()
        with pytest.raises(TokenizerMismatchError) as error:
            check_tokenizers_match(teacher, other, teacher_vocab_size=512, student_vocab_size=512)
        problems = str(error.value).split("\n  - ")[1:]
        assert problems == [f"{name} differs: teacher {getattr(teacher, name)}, student {token_id}"]

def test_tokenizer_with_other_merges_is_refused_with_the_differing_tokens(tokenizer, make_corpus):
    other = train_bpe_tokenizer(make_corpus(seed=1)[::-1][:150], vocab_size=len(tokenizer))
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    moved = sorted((i, t) for t, i in mine.items() if t in theirs and theirs[t] != i)
    only_mine = mine.keys() - theirs.keys()
    assert moved and only_mine  # the two tokenizers really differ
    with pytest.raises(TokenizerMismatchError) as error:
        check_tokenizers_match(tokenizer, other)
    message = str(error.value)
    first_id, first_token = moved[0]
    assert f"{len(moved)} tokens have different ids" in message
    assert f"{first_token!r} (teacher {first_id}, student {theirs[first_token]})" in message
    assert f"{len(only_mine)} tokens only in the teacher tokenizer" in message


def test_swapped_token_ids_are_listed(tokenizer):
    vocab = tokenizer.get_vocab()

    class Swapped:
        eos_token_id, pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id

        @staticmethod
        def get_vocab():
            changed = dict(vocab)
            a, b = sorted(vocab, key=vocab.get)[100:102]
            changed[a], changed[b] = vocab[b], vocab[a]
            return changed

    a, b = sorted(vocab, key=vocab.get)[100:102]
    with pytest.raises(TokenizerMismatchError, match=r"2 tokens have different ids") as error:
        check_tokenizers_match(tokenizer, Swapped())
    assert f"{a!r} (teacher 100, student 101)" in str(error.value)

def test_model_vocabulary_sizes_must_agree(tokenizer):
    with pytest.raises(TokenizerMismatchError, match="teacher 512, student 640"):
        check_tokenizers_match(tokenizer, tokenizer, teacher_vocab_size=512, student_vocab_size=640)

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_student_from_teacher_keeps_every_kth_block_and_reloads(tmp_path, tokenizer, arch):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), n_layer=5, eos_token_id=tokenizer.eos_token_id))
    student = student_from_teacher(teacher, keep_every=2)
    assert student.config.num_hidden_layers == 3
    blocks = {"gpt2": lambda m: m.transformer.h, "llama": lambda m: m.model.layers}[arch]
    for new, old in enumerate([0, 2, 4]):
        for (name, p_student), (_, p_teacher) in zip(blocks(student)[new].named_parameters(),
                                                     blocks(teacher)[old].named_parameters()):
            assert torch.equal(p_student, p_teacher), name
    teacher_rest = {k: v for k, v in teacher.state_dict().items() if ".h." not in k and ".layers." not in k}
    student_state = student.state_dict()
    assert all(torch.equal(student_state[k], v) for k, v in teacher_rest.items())

    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert type(reloaded) is type(teacher) and reloaded.config.num_hidden_layers == 3
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)
        # Functionally the teacher with blocks 1 and 3 removed.
        del blocks(teacher)[3], blocks(teacher)[1]
        teacher.config.num_hidden_layers = 3
        if getattr(teacher.config, "layer_types", None):
            teacher.config.layer_types = teacher.config.layer_types[:3]
        # use_cache=False: the remaining blocks keep their old cache indices.
        torch.testing.assert_close(teacher.eval()(ids, use_cache=False).logits, student(ids).logits)

def test_student_from_teacher_rejects_bad_layer_choices(tokenizer):
    teacher = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), n_layer=3))
    with pytest.raises(ValueError, match="keep_every"):
        student_from_teacher(teacher, keep_every=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        student_from_teacher(teacher, layers=[0, 3])
    assert student_from_teacher(teacher, layers=[2]).config.num_hidden_layers == 1

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_student_keeping_every_teacher_block_gives_the_teachers_exact_logits(tokenizer, arch):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), n_layer=4)).eval()
    student = student_from_teacher(teacher, keep_layers=4)
    assert student is not teacher and student.config.num_hidden_layers == 4
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    # A copy, not shared weights: training the student leaves the teacher as it was.
    assert all(s.data_ptr() != t.data_ptr() for s, t in zip(student.parameters(), teacher.parameters()))


def test_student_keeping_fewer_blocks_is_a_valid_smaller_model_of_evenly_spaced_blocks(tmp_path, tokenizer):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), n_layer=7))
    student = student_from_teacher(teacher, keep_layers=3)  # blocks 0, 3, 6
    for new, old in enumerate([0, 3, 6]):
        for p_student, p_teacher in zip(student.model.layers[new].parameters(), teacher.model.layers[old].parameters()):
            assert torch.equal(p_student, p_teacher)
    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded.config.num_hidden_layers == 3
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in teacher.parameters())
    out = reloaded(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with pytest.raises(ValueError, match="keep_layers must be between 1 and the teacher's 7"):
        student_from_teacher(teacher, keep_layers=8)
    with pytest.raises(ValueError, match="not both"):
        student_from_teacher(teacher, layers=[0], keep_layers=1)


@pytest.mark.parametrize("n_layers", [1, 2, 7, 30])
def test_evenly_spaced_layers_start_at_the_first_block_end_at_the_last_and_never_repeat(n_layers):
    from dpkd.modeling import evenly_spaced_layers

    for keep in range(1, n_layers + 1):
        layers = evenly_spaced_layers(n_layers, keep)
        assert len(layers) == keep and layers == sorted(set(layers)) and layers[0] == 0
        if keep > 1:
            assert layers[-1] == n_layers - 1
            gaps = [b - a for a, b in zip(layers, layers[1:])]
            assert max(gaps) - min(gaps) <= 1
    assert evenly_spaced_layers(n_layers, n_layers) == list(range(n_layers))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_trains_only_the_adapters_and_merges_back(model_pairs, tmp_path, arch):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_pairs[arch][1]), r=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for _ in range(2):  # LoRA's B starts at zero, so A moves only from the second step on
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits, expected,
                                   rtol=1e-5, atol=1e-5)

def test_prepare_teacher_in_one_process_freezes_without_wrapping(teacher_dir):
    from accelerate import Accelerator

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).train()
    prepared = prepare_teacher(teacher, Accelerator(cpu=True))
    assert prepared is teacher and not prepared.training
    assert not any(p.requires_grad for p in prepared.parameters())


def _write_gpt2_gguf(model, tokenizer, path):
    """Write a GPT-2 model and its BPE tokenizer as an F32 GGUF file, with llama.cpp's tensor names and layout."""
    import json

    import gguf
    import numpy as np

    config = model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == tokenizer.eos_token else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the token embedding
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        array = tensor.detach().float().numpy()
        if suffix == "weight" and any(k in gguf_name for k in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")):
            array = array.T  # GPT-2's Conv1D stores (in, out); llama.cpp stores (out, in)
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_teacher_loads_with_the_same_logits_and_tokenizer(tmp_path, tokenizer):
    torch.manual_seed(0)
    # GGUF's gpt2 metadata has no separate n_positions, so the model uses transformers' default 1024.
    model = AutoModelForCausalLM.from_config(
        tiny_config("gpt2", len(tokenizer), n_layer=2, max_positions=1024, eos_token_id=tokenizer.eos_token_id)).eval()
    _write_gpt2_gguf(model, tokenizer, tmp_path / "tiny.gguf")

    loaded = load_causal_lm(tmp_path, gguf_file="tiny.gguf", dtype="float32")
    gguf_tokenizer = load_tokenizer(tmp_path, gguf_file="tiny.gguf")
    check_tokenizers_match(gguf_tokenizer, tokenizer, teacher_vocab_size=loaded.config.vocab_size,
                           student_vocab_size=len(tokenizer))
    text = "Sort the list: three, one, two."
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert gguf_tokenizer(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
