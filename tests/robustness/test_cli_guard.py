"""#26's standing guard: every `rellax-fast` command, fed bad input, ends in one `error:` line and an exit code;
never an uncaught exception or a traceback (unless RELLAX_DEBUG=1 asks for it). Also: Ctrl-C, a full disk, the
numeric option checks, a forced backend that cannot run here and a garbage $RELLAX_BACKEND."""

from __future__ import annotations

import errno
import importlib
import json
import os

import pytest
from corpus import VARIANTS, Expect, write_variant

from rellax_fast import cli
from rellax_fast._io import DiskFullError, atomic_write, atomic_write_text
from rellax_fast.cli import COMMANDS, main

# what a command needs on its line before any bad input (eval: a run folder; bench: a suite)
REQUIRED = {"eval": ["--run", "no-such-run"], "bench": ["cflora"]}
DATA_COMMANDS = ("prepare", "embed", "retrieve", "train-ctr", "train", "demo", "eval")


def _call(capsys, argv):
    """main(argv) must return an int exit code, whatever happens inside."""
    try:
        rc = main(argv)
    except BaseException as exc:  # noqa: BLE001  (the guard is what is tested)
        pytest.fail(f"rellax-fast {' '.join(argv)} raised {type(exc).__name__}: {exc}")
    captured = capsys.readouterr()
    return rc, captured.err


def _assert_one_error_line(rc, err, argv):
    assert isinstance(rc, int) and rc != 0, (argv, rc, err)
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") or last.startswith("rellax-fast ") and ": error: " in last, err


def _bad_inputs(tmp_path):
    """[(id, argv, env)] for every command in cli.COMMANDS: unknown flags, an --out that is a file, corrupt data, a
    garbage $RELLAX_BACKEND."""
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    cases = []
    for name in COMMANDS:
        base = [name, *REQUIRED.get(name, [])]
        cases.append((f"{name}-unknown-flag", [*base, "--no-such-flag"], {}))
        if name == "info":
            continue
        cases.append((f"{name}-out-is-a-file", [*base, "--out", str(a_file)], {}))
        cases.append(
            (f"{name}-garbage-backend", [*base, "--out", str(tmp_path / "o")], {"RELLAX_BACKEND": "garbage"})
        )
        if name in DATA_COMMANDS:
            for variant in ("uitem_is_a_folder", "timestamp_beyond_int64"):
                data = write_variant(variant, tmp_path / variant / "ml-100k")
                extra = ["--no-download"] if name == "prepare" else []
                cases.append(
                    (
                        f"{name}-{variant}",
                        [
                            *base,
                            "--dataset",
                            "ml-100k",
                            "--data-dir",
                            str(data),
                            *extra,
                            "--out",
                            str(tmp_path / f"out-{name}-{variant}"),
                        ],
                        {},
                    )
                )
    return cases


def test_every_command_on_bad_input_ends_in_one_error_line(tmp_path, capsys, monkeypatch):
    cases = _bad_inputs(tmp_path)
    assert {c[1][0] for c in cases} == set(COMMANDS)  # a new command is covered without editing this test
    for case_id, argv, env in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            rc, err = _call(capsys, argv)
        _assert_one_error_line(rc, err, case_id)
    assert (tmp_path / "a-file").read_text() == "keep"


@pytest.mark.parametrize("name", sorted(n for n, v in VARIANTS.items() if v.expect is Expect.error))
@pytest.mark.parametrize("command", ["train-ctr", "train"])
def test_the_bad_input_corpus_through_train_ctr_and_train(tmp_path, capsys, command, name):
    """The corpus `prepare` is held to (test_inputs_corpus.py), fed to the commands that load the raw data
    themselves: each variant is one `error:` line naming the file and what is wrong, exit 2, nothing written."""
    import re

    folder = write_variant(name, tmp_path / "ml-100k")
    out = tmp_path / "out"
    rc, err = _call(capsys, [command, "--dataset", "ml-100k", "--data-dir", str(folder), "--out", str(out)])
    assert rc == cli.EXIT_USER_ERROR and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(folder) in line and re.search(VARIANTS[name].message, line), err
    assert not out.exists() or not any(out.iterdir())


def _raising(exc):
    def run(args):
        raise exc

    return run


def _patch_run(monkeypatch, command, exc):
    module = importlib.import_module(COMMANDS[command][0])
    monkeypatch.setattr(module, "run", _raising(exc))


@pytest.mark.parametrize(
    "exc",
    [
        "DataFormatError",
        "PreparedDataError",
        "BackendUnavailableError",
        "ChecksumError",
        "ResumeMismatchError",
        "FileNotFoundError",
        "PermissionError",
        "JSONDecodeError",
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, exc):
    from rellax_fast.data.download import ChecksumError
    from rellax_fast.data.parsing import DataFormatError
    from rellax_fast.data.prepared import PreparedDataError
    from rellax_fast.ops._backend import BackendUnavailableError
    from rellax_fast.train.pipeline import ResumeMismatchError

    made = {
        "DataFormatError": DataFormatError("u.data line 3: not a number\n(second line)"),
        "PreparedDataError": PreparedDataError("meta.json: missing"),
        "BackendUnavailableError": BackendUnavailableError("cflora_linear: backend='cuda' is unavailable"),
        "ChecksumError": ChecksumError("ml-100k.zip: sha256 mismatch"),
        "ResumeMismatchError": ResumeMismatchError("x"),
        "FileNotFoundError": FileNotFoundError(2, "No such file or directory", "u.data"),
        "PermissionError": PermissionError(13, "Permission denied", "out"),
        "JSONDecodeError": json.JSONDecodeError("Expecting value", "{", 1),
    }[exc]
    _patch_run(monkeypatch, "prepare", made)
    rc, err = _call(capsys, ["prepare", "--out", str(tmp_path)])
    assert rc == cli.EXIT_USER_ERROR
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert " ".join(str(made).split()) in err


def test_a_bug_is_a_summary_with_the_debug_hint_and_the_traceback_only_on_request(
    tmp_path, capsys, monkeypatch
):
    _patch_run(monkeypatch, "train", RuntimeError("boom"))
    monkeypatch.delenv(cli.DEBUG_VAR, raising=False)
    rc, err = _call(capsys, ["train", "--out", str(tmp_path)])
    assert rc == cli.EXIT_BUG and "Traceback" not in err and err.count("\n") == 1
    assert "error: internal error in `rellax-fast train`: RuntimeError: boom" in err
    assert "RELLAX_DEBUG=1" in err and "report it" in err
    monkeypatch.setenv(cli.DEBUG_VAR, "1")
    rc, err = _call(capsys, ["train", "--out", str(tmp_path)])
    assert rc == cli.EXIT_BUG and "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    _patch_run(monkeypatch, "train", KeyError("x"))  # a bug class that is not a user error
    monkeypatch.setenv(cli.DEBUG_VAR, "0")
    rc, err = _call(capsys, ["train", "--out", str(tmp_path)])
    assert rc == cli.EXIT_BUG and "KeyError" in err and "Traceback" not in err


def test_a_command_that_exits_with_a_message_is_one_error_line(tmp_path, capsys, monkeypatch):
    _patch_run(monkeypatch, "eval", SystemExit("error: r has no rellax.json (not a finished run folder)"))
    rc, err = _call(capsys, ["eval", "--run", "r"])
    assert rc == cli.EXIT_USER_ERROR and err == "error: r has no rellax.json (not a finished run folder)\n"


@pytest.mark.parametrize(
    "command, says",
    [
        ("train", "--resume"),
        ("demo", "--resume"),
        ("train-ctr", "keeps no checkpoint"),
        ("eval", "nothing new was written"),
        ("prepare", "written atomically"),
        ("bench", "written atomically"),
    ],
)
def test_ctrl_c_says_what_was_kept_and_how_to_continue(tmp_path, capsys, monkeypatch, command, says):
    _patch_run(monkeypatch, command, KeyboardInterrupt())
    rc, err = _call(capsys, [command, *REQUIRED.get(command, []), "--out", str(tmp_path / "o")])
    assert rc == cli.EXIT_INTERRUPTED == 130
    assert err.count("\n") == 1 and err.startswith("interrupted: ") and says in err and "Traceback" not in err
    if command not in ("eval",):
        assert str(tmp_path / "o") in err


def _enospc_writer(fh):
    fh.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(DiskFullError, match=f"disk full writing {target}") as exc:
        atomic_write(target, _enospc_writer)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_disk_full_in_a_command_is_one_error_line(tmp_path, capsys, monkeypatch):
    target = tmp_path / "o" / "meta.json"
    atomic_write_text(target, "old")

    def run(args):
        atomic_write(target, _enospc_writer)

    monkeypatch.setattr(importlib.import_module(COMMANDS["prepare"][0]), "run", run)
    rc, err = _call(capsys, ["prepare", "--out", str(tmp_path / "o")])
    assert rc == cli.EXIT_USER_ERROR and err.count("\n") == 1
    assert (
        err.startswith(f"error: disk full writing {target} (No space left on device)")
        and "previous outputs are kept" in err
    )
    assert target.read_text() == "old"
    # a writer that does not say which file (pyarrow, a raw write): the command's --out is named
    _patch_run(monkeypatch, "retrieve", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    rc, err = _call(capsys, ["retrieve", "--out", str(tmp_path / "o")])
    assert rc == 2 and f"error: disk full writing under --out {tmp_path / 'o'}" in err


# ------------------------------------------------------------------------------------------- option checks


@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "nan", "must be a finite number > 0"),
        ("--lr", "-1", "must be a finite number > 0"),
        ("--lr", "inf", "must be a finite number > 0"),
        ("--lora-dropout", "1", "must be a finite number >= 0 and < 1"),
        ("--lr-lora", "nan", "must be a finite number >= 0"),
        ("--batch-size", "0", "must be an integer >= 1"),
        ("--alpha", "-inf", "must be a finite number > 0"),
        ("--epochs", "x", "expected an integer"),
    ],
)
def test_numeric_options_are_checked_when_parsed(tmp_path, capsys, command, flag, value, message):
    out = tmp_path / "o"
    rc, err = _call(capsys, [command, "--out", str(out), f"{flag}={value}"])  # "=": -inf would read as a flag
    assert rc == 2 and f"error: argument {flag}: {message}; got '{value}'" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train-ctr", "--lr=inf"], "argument --lr: must be a finite number > 0; got 'inf'"),
        (
            ["bench", "data", "--length-scale=nan"],
            "argument --length-scale: must be a finite number > 0; got 'nan'",
        ),
        (
            ["bench", "lifelong", "--budget-quantile=1.5"],
            "argument --budget-quantile: must be a finite number > 0 and <= 1",
        ),
        (["bench", "cflora", "--repeat=0"], "argument --repeat: must be an integer >= 1; got '0'"),
        (["demo", "--n-boot=0"], "argument --n-boot: must be an integer >= 1; got '0'"),
    ],
)
def test_other_commands_check_their_numbers_when_parsed(tmp_path, capsys, argv, message):
    rc, err = _call(capsys, [*argv, "--out", str(tmp_path / "o")])
    assert rc == 2 and message in err and not (tmp_path / "o").exists()


def _unavailable_backend():
    """A backend the CFLoRA op cannot run on the device training would use here (cuda on a CPU build; cpp for CUDA
    tensors on a GPU machine): always one exists."""
    import torch

    import rellax_fast.ops.cflora  # noqa: F401
    from rellax_fast.ops import _backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return next(b for b in _backend.BACKENDS if _backend.why_unavailable(b, device, "cflora_linear"))


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_forced_backend_that_cannot_run_stops_before_any_work(tmp_path, capsys, monkeypatch, how):
    """`train --cflora-backend cuda` on a CPU build used to fail only after DIN training and embedding: with a data
    folder that does not exist, an error about the backend (not the data) shows the check comes first."""
    backend = _unavailable_backend()
    argv = [
        "train",
        "--out",
        str(tmp_path / "o"),
        "--dataset",
        "ml-100k",
        "--data-dir",
        str(tmp_path / "none"),
    ]
    if how == "flag":
        argv += ["--cflora-backend", backend]
    else:
        monkeypatch.setenv("RELLAX_BACKEND", backend)
    rc, err = _call(capsys, argv)
    source = f"--cflora-backend {backend}" if how == "flag" else f"$RELLAX_BACKEND={backend}"
    assert rc == 2 and err.startswith(f"error: {source}: the CFLoRA op cannot run on this machine's ")
    assert not (tmp_path / "o" / "ctr").exists()


def test_garbage_rellax_backend_is_refused_and_flagged_by_info(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RELLAX_BACKEND", "garbage")
    rc, err = _call(capsys, ["train", "--out", str(tmp_path / "o")])
    assert rc == 2 and err.startswith(
        "error: $RELLAX_BACKEND='garbage' is not a backend: choose one of reference"
    )
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "WARNING     $RELLAX_BACKEND='garbage' is not a backend" in out


def test_info_says_what_automatic_choice_picks_per_op(capsys, monkeypatch):
    from rellax_fast.ops import _backend, all_ops

    monkeypatch.delenv("RELLAX_BACKEND", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    auto_lines, current = {}, None
    for line in out.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            current = line.strip()
        elif current and line.startswith("    auto "):
            auto_lines[current] = line
    for op in all_ops():
        assert auto_lines[op].startswith(
            f"    auto       picks cpu tensors: {_backend.auto_candidates(op, 'cpu')[0]}"
        )


def _own_error_line_then_exit_1(tree):
    """(line, code) of each ``print("error: ...")`` directly followed by ``return 1`` in a parsed module."""
    import ast

    found = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        for stmts in (body, getattr(node, "orelse", None), getattr(node, "finalbody", None)):
            if not isinstance(stmts, list):
                continue
            for first, second in zip(stmts, stmts[1:]):
                call = first.value if isinstance(first, ast.Expr) else None
                printed = isinstance(call, ast.Call) and getattr(call.func, "id", None) == "print"
                text = ast.unparse(call.args[0]) if printed and call.args else ""
                returns_1 = isinstance(second, ast.Return) and getattr(second.value, "value", None) == 1
                if "error: " in text and returns_1:
                    found.append((first.lineno, text))
    return found


def test_no_command_reports_a_user_error_itself_with_the_bug_exit_code():
    """Exit 1 means a bug (rellax_fast.cli.EXIT_BUG, with the RELLAX_DEBUG hint). A command module that prints its
    own ``error:`` line returns 2, or raises and lets rellax_fast.cli classify the error; six modules used to print
    and return 1 for a missing dataset, a refused --resume or a bad encoder path."""
    import ast
    from pathlib import Path

    import rellax_fast

    root = Path(rellax_fast.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for line, text in _own_error_line_then_exit_1(ast.parse(path.read_text(encoding="utf-8"))):
            offenders.append(f"{path.relative_to(root)}:{line}: print({text}); return 1")
    assert not offenders, "\n".join(offenders)
