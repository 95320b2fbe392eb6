"""Worker processes: each is started with a `WorkerContext` and runs one stage at a time, reporting
through a `StageContext` that the stage is handed; the teacher's data-parallel ranks are started the same way.

Every process started here ends with the process that started it: Ctrl-C reaches the whole process
group but only the parent acts on it (it stops the workers), and a worker whose parent is killed
outright (SIGKILL) notices within half a second and exits, so no orphan goes on writing into the
output folder.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class WorkerContext:
    """What a worker process is started with."""

    channel: Any  # the queue its stages' progress and notes go to the parent by; None: no parent listens
    threads: int  # torch threads
    parent: int  # pid of the process it must not outlive


@dataclass(frozen=True)
class StageContext:
    """What a running stage reports through: its notes and training progress go to the parent's board."""

    stage: str
    channel: Any = None

    def send(self, kind: str, value: Any) -> None:
        if self.channel is not None:
            self.channel.put((kind, self.stage, value))

    def note(self, text: str) -> None:
        """A line for the study's log, written by the parent under the stage's progress line."""
        self.send("note", text)

    def progress_callback(self):
        """A `TrainerCallback` that reports steps and losses to the parent; None when no parent listens."""
        if self.channel is None:
            return None
        from transformers import TrainerCallback

        context = self

        class StageProgress(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                context.send("total", state.max_steps)

            def on_step_end(self, args, state, control, **kwargs):
                context.send("step", state.global_step)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    context.send("loss", logs["loss"])

        return StageProgress()


def resolve_parallelism(workers: int | str, threads: int | str) -> tuple[int, int]:
    """(worker processes, torch threads per worker) for the recipe's `workers` and `threads`.

    `workers: auto` is one per core, at most 4 (the study rarely has more independent stages ready);
    `threads: auto` shares the cores among the workers. Measurements: docs/benchmarks.md.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_workers = min(cores, 4) if workers == "auto" else int(workers)
    n_threads = max(1, cores // n_workers) if threads == "auto" else int(threads)
    return n_workers, n_threads


def _exit_with_parent(parent: int) -> None:
    """End this process as soon as its parent (pid `parent`, given by the parent itself: a process that
    asked for its parent only after that one died would get the adopting process) is gone, killed without
    a chance to stop its workers."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def start_worker(context: WorkerContext) -> None:
    """Initialise a worker process: its torch threads, quiet libraries, the watch on its parent."""
    import signal

    # Ctrl-C reaches the whole process group; the parent alone handles it (it stops the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(context.parent)
    os.environ["TQDM_DISABLE"] = "1"  # the parent draws the bars; read when tqdm is first imported
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    torch.set_num_threads(context.threads)
    transformers.logging.set_verbosity_error()


class _RemoteTraceback(Exception):
    """The traceback of a stage's error in its worker, attached to the error raised in the parent."""

    def __str__(self) -> str:
        return self.args[0]


def _portable(err: BaseException) -> BaseException:
    """`err`, or an error that keeps its type's name and message when `err` itself cannot be pickled."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def _serve(context: WorkerContext, tasks) -> None:
    """A worker's life: take `(run, name, args)` tasks until None, call `run(name, *args, StageContext(...))`,
    and say on the channel whether it was `done` or `failed`."""
    start_worker(context)
    while (task := tasks.get()) is not None:
        run, name, args = task
        try:
            run(name, *args, StageContext(name, context.channel))
        except BaseException as err:
            context.channel.put(("failed", name, (_portable(err), traceback.format_exc())))
        else:
            context.channel.put(("done", name, None))


class WorkerPool:
    """Up to `size` spawned worker processes, each running one stage at a time.

    Messages from the stages (`note`, `total`, `step`, `loss`) and from the workers (`done`) come out of
    `messages` in the order they were sent; a stage's error is raised there, in the parent, with the
    worker's traceback as its cause.
    """

    def __init__(self, size: int, threads: int, run: Callable, args: tuple):
        import multiprocessing

        self._spawn = multiprocessing.get_context("spawn")  # no fork of a process that has loaded torch
        self.channel = self._spawn.Queue()
        self.size = size
        self._run, self._args = run, args
        self._context = WorkerContext(self.channel, threads, os.getpid())
        self._processes: list = []
        self._tasks: list = []
        self.running: dict[int, str] = {}  # worker index → the stage it runs

    def idle(self) -> int:
        return self.size - len(self.running)

    def start(self, name: str) -> None:
        """Run the stage `name` on an idle worker, started now if none is (so no more start than are used)."""
        index = next((i for i in range(len(self._processes)) if i not in self.running), len(self._processes))
        if index == len(self._processes):
            tasks = self._spawn.SimpleQueue()
            process = self._spawn.Process(target=_serve, args=(self._context, tasks))
            process.start()
            self._processes.append(process)
            self._tasks.append(tasks)
        self._tasks[index].put((self._run, name, self._args))
        self.running[index] = name

    def messages(self, timeout: float) -> Iterator[tuple[str, str, Any]]:
        """What arrived within `timeout` seconds (all of it once the first has come)."""
        from queue import Empty

        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, name, value = self.channel.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                break
            if kind in ("done", "failed"):
                del self.running[next(i for i, running in self.running.items() if running == name)]
            if kind == "failed":
                err, remote = value
                err.__cause__ = _RemoteTraceback(remote)
                raise err
            yield kind, name, value
            deadline = 0.0
        for index, name in self.running.items():
            code = self._processes[index].exitcode
            if code is not None:
                raise RuntimeError(f"the worker process running stage {name!r} ended unexpectedly (exit code {code})")

    def close(self) -> None:
        """Let the workers finish and exit (after the last stage)."""
        for tasks in self._tasks:
            tasks.put(None)
        for process in self._processes:
            process.join()

    def stop(self) -> None:
        """Terminate the workers and their own children (the teacher's data-parallel ranks) now."""
        import psutil

        everyone = []
        for process in self._processes:
            try:
                worker = psutil.Process(process.pid)
                everyone += [worker, *worker.children(recursive=True)]
            except (psutil.NoSuchProcess, ValueError):
                pass
        for process in everyone:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(everyone, timeout=10)
        for process in self._processes:
            process.join(timeout=1)


# ----------------------------------------------------------------------------------------------------
# The teacher's data-parallel ranks


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_data_parallel(processes: int, source: str, values: dict, out: Path,
                        context: StageContext | None = None) -> dict:
    """Train the teacher with DDP over `processes` CPU processes (gloo), each with 1/processes of the batch.

    Reads `<out>/data/train.jsonl` and `<out>/teacher/init`, writes the model to `<out>/teacher`; returns
    the last logged values, as `train` does. Rank 0 reports progress through `context`. Processes
    synchronise once a step (the gradient all-reduce), threads at every operation, which is why the
    teacher trains on processes: on a busy machine, whose CPU time is partly stolen, threads lost and
    processes held up (docs/benchmarks.md).
    """
    import torch.multiprocessing

    from dpkd.study.build import Layout, last_logged

    channel = context.channel if context is not None else None
    torch.multiprocessing.start_processes(
        _teacher_rank, args=(processes, _free_port(), source, values, str(out), channel, os.getpid()),
        nprocs=processes, join=True, start_method="spawn")
    state = json.loads((Layout(out).teacher / "training" / "trainer_state.json").read_text())
    return last_logged(state["log_history"])


def _teacher_rank(rank: int, processes: int, port: int, source: str, values: dict, out: str, channel,
                  parent: int) -> None:
    """One process of `train_data_parallel`: rank `rank` of `processes`."""
    from dpkd.study.build import Layout, train
    from dpkd.study.recipe import DemoRecipe, training_configs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes))
    context = WorkerContext(channel if rank == 0 else None, threads=1, parent=parent)
    start_worker(context)
    values = copy.deepcopy(values)
    # Only the teacher's config: the first config built fixes accelerate's process state for good, and it
    # must be one with use_cpu set, or a CPU run does not count as distributed.
    values["distill"]["methods"] = {}
    values["init"] = "scratch"
    values.pop("warm_start", None)
    training = values["teacher"]["training"]
    training["per_device_train_batch_size"] //= processes  # the recipe gives the batch of all ranks together
    training["use_cpu"] = True
    at = Layout(Path(out))
    args = training_configs(DemoRecipe(source=source, values=values), Path(out))["teacher"]
    assert args.world_size == processes, f"the teacher's rank {rank} does not see the other ranks"
    train(args, at.teacher / "init", at.split["train"], at.teacher,
          progress=StageContext("teacher", context.channel).progress_callback())
