"""The sampler against the path it replaced: `dpkd.generation.sample_completions` versus plain `generate`.

"before" is what `sample_completions` did until the static cache was added: `model.generate` with the
dynamic KV cache and the same `GenerationConfig`. The others go through `sample_completions` today:
"static" forces `cache_implementation="static"`, "default" lets it choose for the device
(`decode_cache_implementation`). One process, one model at a time, the paths interleaved run by run (in a
rotating order) so that the load of a shared machine falls on all of them alike; each path draws the same
samples (same seed).
EOS is an id outside the vocabulary, so every sample is exactly `--new-tokens` long on every path.

    .venv/bin/python bench/sampling.py                       # CPU sizes: GPT-2-like 6x384 teacher, 2x256 student
    .venv/bin/python bench/sampling.py --device cuda --size gpt2 --batch 16 --new-tokens 128

Prints one table row per (model, new tokens): the median wall-clock seconds per call of each path, and the
ratios before ÷ path of the medians of wall-clock and of process CPU time (above 1: the path is faster than
before; CPU time is the steadier of the two on a loaded machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpkd.generation import SamplingConfig, decode_cache_implementation, sample_completions

SIZES = {  # name: {role: (layers, hidden, heads)}
    "cpu": {"student": (2, 256, 4), "teacher": (6, 384, 6)},
    "gpt2": {"student": (12, 768, 12), "teacher": (24, 1024, 16)},
}
VOCAB = 50257
PAD = 0


def _model(layers: int, hidden: int, heads: int, device: str, dtype: torch.dtype) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=hidden, n_layer=layers, n_head=heads,
                        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


def _prompts(batch: int, width: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of width/2 to width tokens."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(width // 2, width + 1, (batch,), generator=gen)
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        ids[row, width - length:] = torch.randint(1, VOCAB, (length,), generator=gen)
        mask[row, width - length:] = 1
    return ids.to(device), mask.to(device)


def _before(model, ids, mask, sampling: SamplingConfig, eos: int) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=sampling.to_generation_config(eos, PAD))
    return out[:, ids.shape[1]:]


def _paths(eos: int):
    def dpkd(cache):
        def run(model, ids, mask, sampling):
            return sample_completions(model, ids, mask, sampling, eos_token_id=eos, pad_token_id=PAD,
                                      cache_implementation=cache)[0]
        return run

    return {"before": lambda model, ids, mask, sampling: _before(model, ids, mask, sampling, eos),
            "static": dpkd("static"), "default": dpkd(None)}


def _time(run, model, ids, mask, sampling, device: str) -> tuple[float, float, torch.Tensor]:
    """Wall-clock and process CPU seconds of one call, and its samples."""
    torch.manual_seed(1)
    if device == "cuda":
        torch.cuda.synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    out = run(model, ids, mask, sampling)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, time.process_time() - cpu_started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="model dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="padded prompt width (rows: half to all of it)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per path (after one warm-up call)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    eos = VOCAB  # outside the vocabulary: never sampled, so no sample ends early

    print(f"# bench/sampling.py, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {args.device}, {dtype}, batch {args.batch}, "
          f"prompts {args.prompt_tokens} wide, {args.repeats} timed calls per path", flush=True)
    paths = _paths(eos)
    print("| model | new tokens | default picks | " + " | ".join(f"{name} s" for name in paths)
          + " | before ÷ static | before ÷ default | CPU-time before ÷ static | CPU-time before ÷ default |")
    print("|---|---|---|" + "---|" * (len(paths) + 4))
    ids, mask = _prompts(args.batch, args.prompt_tokens, args.device)
    for role, shape in SIZES[args.size].items():
        torch.manual_seed(0)
        model = _model(*shape, args.device, dtype)
        picked = decode_cache_implementation(model, ids.device)
        for new_tokens in args.new_tokens:
            sampling = SamplingConfig(max_new_tokens=new_tokens)
            wall: dict[str, list[float]] = {name: [] for name in paths}
            cpu: dict[str, list[float]] = {name: [] for name in paths}
            names = list(paths)
            for repeat in range(args.repeats + 1):
                # Each run starts with another path, so that none always follows the same one.
                for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                    seconds, cpu_seconds, out = _time(paths[name], model, ids, mask, sampling, args.device)
                    if out.shape[1] != new_tokens:
                        raise RuntimeError(f"{name}: samples are {out.shape[1]} tokens long, not {new_tokens}")
                    if repeat:  # the first call of each path warms up (allocations, a compile)
                        wall[name].append(seconds)
                        cpu[name].append(cpu_seconds)
            median = {name: statistics.median(values) for name, values in wall.items()}
            median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
            ratios = [median["before"] / median["static"], median["before"] / median["default"],
                      median_cpu["before"] / median_cpu["static"], median_cpu["before"] / median_cpu["default"]]
            print(f"| {role} {'x'.join(map(str, shape[:2]))} | {new_tokens} | {picked} | "
                  + " | ".join(f"{median[name]:.3f}" for name in paths) + " | "
                  + " | ".join(f"{ratio:.2f}" for ratio in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
