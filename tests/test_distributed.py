"""Several processes on CPU (gloo): DDP training equals one process, sharded generation cannot deadlock.

The workers live in this file too (`python -m torch.distributed.run ... tests/test_distributed.py WORKER
ARGS_JSON`); each writes its results as JSON and the tests compare them. A timeout guards every launch,
so a deadlock fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO_ROOT / "src" / "dpkd" / "configs" / "accelerate"
LAUNCH_TIMEOUT_S = 150  # two CPU ranks importing transformers take ~25 s on an idle 2-core machine

TRAIN_EXAMPLES = [
    {"prompt": f"Write the number {n} in words.\n", "completion": text}
    for n, text in enumerate(["zero is small", "one is the first", "two is a pair of things", "three",
                              "four is even and square", "five ends with a five", "six is half a dozen",
                              "seven days make a week"])
]


def _launch(worker: str, args: dict, nproc: int, tmp_path: Path, accelerate_config: str | None = None) -> str:
    """Run a worker of this file on `nproc` gloo ranks with torchrun, or with `accelerate launch` and one of
    the shipped configs; returns its output.

    On timeout torchrun gets SIGTERM (it stops its workers, which run in sessions of their own), then
    any worker still alive is killed through the pid it recorded, so a deadlock cannot outlive the test.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT / "src"), "DPKD_TEST_PID_DIR": str(tmp_path)}
    if accelerate_config is None:
        launcher = ["torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port())]
    else:
        launcher = ["accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / accelerate_config),
                    "--num_processes", str(nproc), "--main_process_port", str(_free_port())]
    command = [sys.executable, "-m", *launcher, __file__, worker, json.dumps(args)]
    log_path = tmp_path / f"{worker}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            for pid_file in tmp_path.glob("worker-*.pid"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pytest.fail(f"{worker} on {nproc} ranks did not finish in {LAUNCH_TIMEOUT_S} s (deadlock?):\n"
                        f"{log_path.read_text()[-3000:]}")
    output = log_path.read_text()
    assert process.returncode == 0, f"{worker} failed:\n{output[-5000:]}"
    return output


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------
# DDP: the same loss trajectory as one process with the same global batch
# ---------------------------------------------------------------------------------------------------------


def _training_config(output_dir: str, per_device_batch: int, method: str):
    from dpkd import DistillationConfig

    return DistillationConfig(
        output_dir=output_dir, method=method, per_device_train_batch_size=per_device_batch, max_steps=4,
        learning_rate=5e-3, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, seed=0, data_seed=0,
        # No use_cpu: DistillationConfig sets it itself when several processes start without an
        # accelerator, which is what makes transformers join the gloo group (world_size 2 below).
        report_to="none", save_strategy="no", max_prompt_length=32, max_length=64,
        dataloader_num_workers=0,
    )


def _train(args: dict) -> dict:
    """Train the student for a few steps and return the logged losses (rank 0's view)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpkd import DistillationTrainer

    tokenizer = AutoTokenizer.from_pretrained(args["student"])
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(args["student"]),
        teacher_model=AutoModelForCausalLM.from_pretrained(args["teacher"]),
        args=_training_config(args["output_dir"], args["per_device_batch"], args["method"]),
        train_dataset=Dataset.from_list(args["examples"]),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args["output_dir"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "world_size": trainer.args.world_size}


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(model_pairs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    teacher_dir, student_dir = (str(p) for p in model_pairs["llama"])  # Llama: no dropout, so no RNG in the step
    common = {"teacher": teacher_dir, "student": student_dir, "examples": TRAIN_EXAMPLES, "method": "kd"}
    single = _train({**common, "output_dir": str(tmp_path / "one"), "per_device_batch": 4})
    assert single["world_size"] == 1

    args = {**common, "output_dir": str(tmp_path / "two"), "per_device_batch": 2, "result": str(tmp_path / "two.json")}
    _launch("train", args, nproc=2, tmp_path=tmp_path, accelerate_config="ddp.yaml")
    double = json.loads((tmp_path / "two.json").read_text())
    assert double["world_size"] == 2
    assert len(single["losses"]) == len(double["losses"]) == 4
    assert single["losses"][0] != single["losses"][-1]  # it trained
    torch.testing.assert_close(torch.tensor(double["losses"]), torch.tensor(single["losses"]), rtol=0, atol=1e-5)
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------
# A sharded teacher (FSDP2) on two ranks that sample different lengths
# ---------------------------------------------------------------------------------------------------------


def _sharded_sampling(args: dict) -> dict:
    """Each step below makes the ranks disagree on how long generation lasts; all must still finish."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpkd.generation import (
        SamplingConfig,
        build_scoring_batch,
        left_pad,
        sample_completions,
        score_sequences,
    )
    from dpkd.modeling import shard_with_fsdp2
    from dpkd.teacher_cache import TeacherOutputCache, fill_teacher_cache, model_fingerprint, teacher_outputs

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # ranks draw different samples
    tokenizer = AutoTokenizer.from_pretrained(args["teacher"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    whole = AutoModelForCausalLM.from_pretrained(args["teacher"]).eval()
    fingerprint = model_fingerprint(whole)
    teacher = shard_with_fsdp2(AutoModelForCausalLM.from_pretrained(args["teacher"]).eval())
    result = {"rank": rank}

    # 1. Plain sampling, rank 1 going on 5 times longer than rank 0.
    prompt_ids, prompt_mask = left_pad([[11, 12, 13], [21]], pad)
    sampling = SamplingConfig(max_new_tokens=3 if rank == 0 else 15)
    ids, mask = sample_completions(teacher, prompt_ids, prompt_mask, sampling, eos_token_id=eos, pad_token_id=pad,
                                   synced_gpus=True)
    result["sampled_width"] = ids.shape[1]

    # 2. Teacher outputs when only rank 1 misses the cache: rank 0 must step through generation anyway.
    shared = SamplingConfig(max_new_tokens=8)
    cache = TeacherOutputCache(args["cache_dir"], teacher_id=fingerprint, sampling=shared)
    own_prompts = [[31 + rank, 32, 33], [41 + rank]]
    if rank == 0:
        for prompt in own_prompts:
            cache.put(prompt, [5, eos], -1.0)
    ids, mask, logps, n_generated = teacher_outputs(teacher, cache, *left_pad(own_prompts, pad), shared,
                                                    eos_token_id=eos, pad_token_id=pad, synced_gpus=True)
    result["n_generated"] = n_generated
    # The sharded teacher's stored scores equal the whole teacher's.
    reference, _ = score_sequences(whole, build_scoring_batch(*left_pad(own_prompts, pad), ids, mask))
    result["score_error"] = float((logps - reference).abs().max())

    # 3. Filling the cache with more batches on rank 0 than on rank 1.
    prompts = {"prompt_input_ids": [[51, 52], [61, 62, 63], [71]]}
    result["filled"] = fill_teacher_cache(teacher, tokenizer, prompts, cache, shared, batch_size=1,
                                          synced_gpus=True, show_progress=False)
    dist.barrier()
    reopened = TeacherOutputCache(args["cache_dir"], teacher_id=fingerprint, sampling=shared)
    result["all_cached"] = all(reopened.get(p) is not None for p in prompts["prompt_input_ids"])
    dist.destroy_process_group()
    return result


@pytest.mark.slow
def test_sharded_teacher_on_two_ranks_with_different_lengths_finishes(model_pairs, tmp_path):
    args = {"teacher": str(model_pairs["llama"][0]), "cache_dir": str(tmp_path / "cache"),
            "result": str(tmp_path / "sampling-{rank}.json")}
    _launch("sharded_sampling", args, nproc=2, tmp_path=tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"sampling-{r}.json").read_text()) for r in (0, 1))
    assert rank0["sampled_width"] <= 3 < rank1["sampled_width"]  # seeded: rank 1 samples no early EOS
    assert rank0["n_generated"] == 0 and rank1["n_generated"] == 2
    assert rank1["score_error"] < 1e-4
    assert rank0["filled"] + rank1["filled"] == 3 and rank0["filled"] == 2
    assert rank0["all_cached"] and rank1["all_cached"]


# ---------------------------------------------------------------------------------------------------------
# The shipped accelerate configs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,distributed_type", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                                   ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED")])
def test_accelerate_configs_load_with_accelerates_own_reader(name, distributed_type):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig) and config.distributed_type.value == distributed_type
    raw = yaml.safe_load(path.read_text())
    if name == "fsdp":
        assert raw["fsdp_config"]["fsdp_version"] == 2
        assert raw["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model stays loadable
    if name.startswith("deepspeed"):
        assert raw["deepspeed_config"]["zero_stage"] == int(name[-1])
        assert raw["deepspeed_config"]["zero3_init_flag"] is False


def _worker_main() -> None:
    import torch.distributed as dist

    worker, args = sys.argv[1], json.loads(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    Path(os.environ["DPKD_TEST_PID_DIR"], f"worker-{rank}.pid").write_text(str(os.getpid()))
    result = {"train": _train, "sharded_sampling": _sharded_sampling}[worker](args)
    if "result" in args and (rank == 0 or "{rank}" in args["result"]):
        Path(args["result"].format(rank=rank)).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker_main()
