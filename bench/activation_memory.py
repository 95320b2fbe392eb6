"""Activation memory of one student forward over dpkd's scoring batch, by how the batch is passed.

Holds the output (and so everything autograd saved) and reports memory_allocated growth per token and
layer, under bf16 autocast with bf16 weights, for: ids only; an all-ones mask; an all-ones mask with
position_ids (as `build_scoring_batch` gives); left padding with position_ids; and dpkd's scoring path
(`final_hidden_states` then the dense or chunked sequence log-probs). CUDA only.

    python bench/activation_memory.py
"""

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from dpkd.generation import build_scoring_batch
from dpkd.logprobs import sequence_logps_from_hidden
from dpkd.modeling import final_hidden_states


def main() -> None:
    device, V, B, P, T, layers = "cuda", 50257, 32, 128, 128, 12
    config = GPT2Config(vocab_size=V, n_embd=768, n_layer=layers, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    print("attention:", model.config._attn_implementation)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V - 1, (B, P), generator=g).to(device)
    completions = torch.randint(0, V - 1, (B, T), generator=g).to(device)
    ones_p, ones_c = torch.ones_like(prompts), torch.ones_like(completions)
    full = build_scoring_batch(prompts, ones_p, completions, ones_c)
    padded_mask = ones_p.clone()
    padded_mask[:, :8] = 0
    padded = build_scoring_batch(prompts, padded_mask, completions, ones_c)
    head = model.get_output_embeddings()

    def backbone(**kwargs):
        return model.transformer(use_cache=False, **kwargs).last_hidden_state

    cases = {
        "ids only": lambda: backbone(input_ids=full["input_ids"]),
        "mask of ones": lambda: backbone(input_ids=full["input_ids"], attention_mask=full["attention_mask"]),
        "mask of ones + position_ids": lambda: backbone(input_ids=full["input_ids"],
                                                        attention_mask=full["attention_mask"],
                                                        position_ids=full["position_ids"]),
        "left padding + position_ids": lambda: backbone(input_ids=padded["input_ids"],
                                                        attention_mask=padded["attention_mask"],
                                                        position_ids=padded["position_ids"]),
        "final_hidden_states": lambda: final_hidden_states(model, full),
        "scoring, dense head": lambda: sequence_logps_from_hidden(
            final_hidden_states(model, full)[:, :-1], head.weight, full["labels"][:, 1:], chunked=False),
        "scoring, chunked head": lambda: sequence_logps_from_hidden(
            final_hidden_states(model, full)[:, :-1], head.weight, full["labels"][:, 1:], chunked=True),
    }
    tokens = B * (P + T)
    for name, case in cases.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = case()
        torch.cuda.synchronize()
        held, peak = torch.cuda.memory_allocated() - before, torch.cuda.max_memory_allocated() - before
        print(f"{name:32s} held {held / 2**30:5.2f} GiB ({held / tokens / layers / 1024:5.1f} KiB per token-layer), "
              f"peak {peak / 2**30:5.2f} GiB", flush=True)
        del out


if __name__ == "__main__":
    main()
