"""The `dpkd` command line: parse, build a config, call the library.

Each subcommand has one `_add_<name>` function that declares its arguments and one `_run_<name>`
function that calls the library; library imports happen inside `_run_*` so `dpkd --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from dpkd import __version__


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="distil a student from a teacher with a YAML recipe")
    p.add_argument("config", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs that override the recipe")


def _run_train(args: argparse.Namespace) -> int:
    from dpkd.trainer import train_from_cli

    return train_from_cli(args.config, args.overrides)


def _add_teacher_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher-generate", help="fill the teacher-output cache ahead of training")
    p.add_argument("config", help="YAML recipe (the same one `dpkd train` takes)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs that override the recipe")


def _run_teacher_generate(args: argparse.Namespace) -> int:
    from dpkd.trainer import teacher_generate_from_cli

    return teacher_generate_from_cli(args.config, args.overrides)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="generate on evaluation sets and score exact match and ROUGE-L")
    p.add_argument("--model", required=True, help="directory of the model to evaluate")
    p.add_argument("--teacher", default=None, help="teacher directory, for implicit rewards and reverse KL")
    p.add_argument("--data", default="dolly,selfinst,vicuna,sinst",
                   help="comma-separated bundled set names (dolly, selfinst, vicuna, sinst, dolly-dev) or data files")
    p.add_argument("--data-dir", default=None, help="folder holding the bundled evaluation sets")
    p.add_argument("--seeds", default="10,20,30,40,50", help="comma-separated sampling seeds")
    p.add_argument("--out", default=None, help="output folder (default: <model>/eval)")
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
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype for generation and scoring (float32 is the fast path on CPUs)")


def _run_eval(args: argparse.Namespace) -> int:
    from dpkd.evaluation import eval_from_cli

    return eval_from_cli(args)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and charts from training and evaluation runs")
    p.add_argument("runs", nargs="+",
                   help="run directories: training output dirs (or a teacher's dir) evaluated by `dpkd eval`")
    p.add_argument("--out", required=True, help="folder for report.md and the PNG charts")


def _run_report(args: argparse.Namespace) -> int:
    from dpkd.report import report_from_cli

    return report_from_cli(args)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a complete distillation study on generated tasks, on a CPU in minutes")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--config", default=None, help="demo recipe (default: the bundled configs/demo.yaml)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    size.add_argument("--big", action="store_true", help="a bigger, slower run")


def _run_demo(args: argparse.Namespace) -> int:
    from dpkd.demo import demo_from_cli

    return demo_from_cli(args)


_COMMANDS = {
    "train": (_add_train, _run_train),
    "teacher-generate": (_add_teacher_generate, _run_teacher_generate),
    "eval": (_add_eval, _run_eval),
    "report": (_add_report, _run_report),
    "demo": (_add_demo, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpkd",
        description="Direct Preference Knowledge Distillation and its baselines for language models.",
    )
    parser.add_argument("--version", action="version", version=f"dpkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in _COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(_COMMANDS[args.command][1](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
