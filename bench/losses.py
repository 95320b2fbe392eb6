"""Dense versus chunked losses: time and peak memory of one forward + backward, as ratios.

Dense: the student's logits are materialised (``hidden @ lm_head.T``, with gradient), the teacher's under
``torch.no_grad``, then the loss and its backward. Chunked: :func:`dpkd.losses.chunked_token_loss` (or
:func:`dpkd.losses.chunked_sequence_logps` for ``seq_logps``) straight from the hidden states.

Each case runs in a fresh subprocess, so that its peak memory is its own: the peak is the process's
``ru_maxrss`` high-water mark after the step minus the same after the inputs were made (CPU; on CUDA,
``torch.cuda.max_memory_allocated`` above the inputs). Children run with ``THP_MEM_ALLOC_ENABLE=1`` so that
freed large tensors leave the resident set (see ``_run_child``). Time is the wall-clock time of the step (best of
``--repeats``) and the process CPU time beside it, which the shared machine's load disturbs less.

Before a dense case the parent extrapolates its peak from the same loss at a smaller vocabulary and skips
the case, saying so, when that would not fit in the memory available; each child also caps its address
space so a misjudged case fails with an allocation error instead of waking the kernel's OOM killer.

    .venv/bin/python bench/losses.py                      # V = 32k, 50k, 150k; 4096 tokens; hidden 256
    .venv/bin/python bench/losses.py --vocab-sizes 32000 --losses fkl jsd --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
from measure import cpu_seconds, max_rss_bytes  # bench/ is the script's folder, so first on sys.path

from dpkd.losses import TOKEN_LOSSES, chunked_sequence_logps, chunked_token_loss, sequence_logps

SEQUENCE_LOGPS = "seq_logps"
# chunked: activation checkpointing (the default); chunked_nr: recompute=False, gradients taken in the forward.
FORMS = ["dense", "chunked", "chunked_nr"]
GIB = 1024**3


def _make_inputs(vocab: int, tokens: int, hidden: int, batch: int, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    length = tokens // batch

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    student_hidden = randn(batch, length, hidden).requires_grad_()
    student_weight = randn(vocab, hidden, scale=hidden**-0.5).requires_grad_()
    teacher_hidden = randn(batch, length, hidden)
    teacher_weight = randn(vocab, hidden, scale=hidden**-0.5)
    labels = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def _step(loss_name: str, form: str, inputs, chunk_size: int) -> None:
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs
    if loss_name == SEQUENCE_LOGPS:
        if form == "dense":
            sums, _ = sequence_logps(student_hidden @ student_weight.T, labels)
        else:
            sums, _ = chunked_sequence_logps(student_hidden, student_weight, labels, chunk_size=chunk_size)
        loss = -sums.sum()
    elif form == "dense":
        student_logits = student_hidden @ student_weight.T
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        loss = TOKEN_LOSSES[loss_name](student_logits, teacher_logits, labels)
    else:
        loss = chunked_token_loss(
            TOKEN_LOSSES[loss_name],
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            chunk_size=chunk_size,
            recompute=form == "chunked",
        )
    loss.backward()
    student_hidden.grad = student_weight.grad = None


def run_case(args: argparse.Namespace) -> dict:
    """One (vocabulary, loss, form) case; runs inside the child process."""
    if args.device == "cpu" and args.memory_cap_gib:
        with open("/proc/self/statm") as statm:
            virtual_bytes = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        cap = virtual_bytes + int(args.memory_cap_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.set_num_threads(args.threads)
    # One small step first: the first checkpointed call imports torch's compiler stack (seconds), a
    # one-time cost that is not the loss's.
    _step(args.loss, args.form, _make_inputs(64, 64, 16, 1, args.device), args.chunk_size)
    inputs = _make_inputs(args.vocab, args.tokens, args.hidden, args.batch, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = max_rss_bytes()
    wall, cpu = [], []
    for _ in range(args.repeats):
        wall_start, cpu_start = time.perf_counter(), cpu_seconds()
        _step(args.loss, args.form, inputs, args.chunk_size)
        if args.device == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(cpu_seconds() - cpu_start)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else max_rss_bytes()
    return {"seconds": min(wall), "cpu_seconds": min(cpu), "peak_bytes": peak - baseline}


def _available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def _run_child(args: argparse.Namespace, vocab: int, loss: str, form: str) -> dict:
    command = [
        sys.executable, __file__, "--child",
        "--vocab", str(vocab), "--loss", loss, "--form", form,
        "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--batch", str(args.batch),
        "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats), "--device", args.device,
        "--memory-cap-gib", str(args.memory_cap_gib), "--threads", str(args.threads),
    ]  # fmt: skip
    load_before = os.getloadavg()[0]
    # Transparent huge pages for torch's large CPU allocations (the project's Makefile sets this too):
    # without it glibc serves chunk-sized tensors from its heap and keeps freed memory resident, so RSS
    # would overstate the chunked peak several times over (measured: 2.26 vs 0.34 GiB for jsd at V = 32k).
    child_env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=child_env)
    if finished.returncode != 0:
        return {"error": finished.stderr.strip().splitlines()[-1] if finished.stderr else "failed"}
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    result["load"] = max(load_before, os.getloadavg()[0])
    return result


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32000, 50257, 151936])
    parser.add_argument("--losses", nargs="+", default=[*TOKEN_LOSSES, SEQUENCE_LOGPS])
    parser.add_argument(
        "--big-vocab-losses",
        nargs="+",
        default=["fkl", "dpkd_token", SEQUENCE_LOGPS],
        help="the losses run at vocabularies above --all-losses-up-to (each dense case there takes several "
        "GiB and minutes of CPU)",
    )
    parser.add_argument("--all-losses-up-to", type=int, default=40000)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per case (1: steadier on a loaded machine)"
    )
    parser.add_argument("--tokens", type=int, default=4096, help="valid tokens per step")
    parser.add_argument("--batch", type=int, default=4, help="sequences the tokens are split into")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of student and teacher")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument(
        "--chunked-forms",
        nargs="+",
        choices=FORMS[1:],
        default=FORMS[1:],
        help="chunked: activation checkpointing; chunked_nr: chunked_token_loss(recompute=False)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--memory-cap-gib", type=float, default=12.0, help="address-space cap of each child above its start"
    )
    parser.add_argument(
        "--reserve-gib",
        type=float,
        default=8.0,
        help="memory left to others when deciding to run a dense case",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_case(args)))
        return

    print(
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {_gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} GiB; "
        f"torch {torch.__version__}, {args.threads} thread(s) per case; device {args.device}; "
        f"load average at start {os.getloadavg()[0]:.1f}\n"
        f"# {args.tokens} tokens ({args.batch} x {args.tokens // args.batch}), hidden {args.hidden}, "
        f"chunk {args.chunk_size}, best of {args.repeats}; peak = RSS high-water mark above the inputs"
    )
    header = (
        "| V | loss | dense s | chunked s | time ratio | CPU-time ratio | dense peak GiB | chunked peak GiB "
        "| memory ratio | load |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    peak_per_vocab: dict[str, tuple[int, int]] = {}  # loss -> (vocab, dense peak) at the largest vocab run
    for vocab in sorted(args.vocab_sizes):
        losses = args.losses
        if vocab > args.all_losses_up_to:
            losses = [loss for loss in losses if loss in args.big_vocab_losses]
        for loss in losses:
            dense: dict = {}
            if loss in peak_per_vocab and args.device == "cpu":
                measured_vocab, measured_peak = peak_per_vocab[loss]
                needed = measured_peak * vocab / measured_vocab
                available = _available_bytes() - args.reserve_gib * GIB
                if needed > available:
                    dense = {"skipped_needs": needed, "error": f"skipped: needs ~{_gib(needed)} GiB"}
            if not dense:
                dense = _run_child(args, vocab, loss, "dense")
            if "error" not in dense:
                peak_per_vocab[loss] = (vocab, dense["peak_bytes"])
            for form in args.chunked_forms:
                if form == "chunked_nr" and loss == SEQUENCE_LOGPS:
                    continue  # chunked_sequence_logps has the checkpointed form only
                label = loss if form == "chunked" else f"{loss}, recompute=False"
                print(_row(vocab, label, dense, _run_child(args, vocab, loss, form)), flush=True)


def _row(vocab: int, loss: str, dense: dict, chunked: dict) -> str:
    if "error" in chunked:
        return f"| {vocab} | {loss} | chunked failed: {chunked['error']} |"
    chunked_cells = f"{chunked['seconds']:.1f}", _gib(chunked["peak_bytes"])
    if "skipped_needs" in dense:
        return (
            f"| {vocab} | {loss} | {dense['error']} | {chunked_cells[0]} | | | ~{_gib(dense['skipped_needs'])} "
            f"(extrapolated) | {chunked_cells[1]} | ~{chunked['peak_bytes'] / dense['skipped_needs']:.3f} | "
            f"{chunked['load']:.1f} |"
        )
    if "error" in dense:
        return f"| {vocab} | {loss} | dense failed: {dense['error']} | {chunked_cells[0]} | | | | {chunked_cells[1]} | | |"
    return (
        f"| {vocab} | {loss} | {dense['seconds']:.1f} | {chunked_cells[0]} | "
        f"{chunked['seconds'] / dense['seconds']:.2f} | {chunked['cpu_seconds'] / dense['cpu_seconds']:.2f} | "
        f"{_gib(dense['peak_bytes'])} | {chunked_cells[1]} | {chunked['peak_bytes'] / dense['peak_bytes']:.3f} | "
        f"{max(dense['load'], chunked['load']):.1f} |"
    )


if __name__ == "__main__":
    main()
