"""#25 item 9: `rellax-fast --help` and every subcommand's help. Every option of every subcommand has a help text
that shows its default; the command list names every bench suite, from the suite table."""

from __future__ import annotations

import argparse

import pytest

from rellax_fast.cli import COMMANDS, HelpFormatter, build_parser, main


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _helps(sub):
    """{option: its formatted help} as `--help` prints it (argparse's own -h left out)."""
    formatter = HelpFormatter(sub.prog)
    out = {}
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        out[name] = (action, formatter._get_help_string(action) if action.help else "")
    return out


def test_every_option_of_every_command_has_a_help_that_shows_its_default():
    subs = _subparsers(build_parser())
    assert set(subs) == set(COMMANDS)
    subs.update({f"bench {suite}": p for suite, p in _subparsers(subs["bench"]).items()})
    missing_help, missing_default = [], []
    for command, sub in subs.items():
        for name, (action, text) in _helps(sub).items():
            if not text.strip():
                missing_help.append(f"{command} {name}")
            elif action.option_strings and not action.required and "default" not in text:
                missing_default.append(f"{command} {name}: {text!r}")
    assert not missing_help, f"options without a help text: {missing_help}"
    assert not missing_default, f"options whose help shows no default: {missing_default}"


def test_a_default_is_shown_once_and_is_the_real_one(capsys):
    assert main(["bench", "cflora", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--out OUT output folder (created if missing) (default: bench_out)" in text  # bench's own default
    assert "--repeat REPEAT timed calls per case (the median is reported) (default: 5)" in text
    assert "(default: None)" not in text
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR learning rate (AdamW) (default: 0.001)" in text
    assert "--lr-lora LR_LORA learning rate of CFLoRA A and B (default: --lr)" in text
    assert text.count("(default: synthetic)") == 1
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--run RUN a run folder written by `rellax-fast train` or `demo` --split" in text
    )  # required: no default
    assert "instead of a split (default: not set)" in text and "(default: None)" not in text


def test_top_level_help_lists_every_bench_suite(capsys):
    from rellax_fast.bench.cli import SUITE_HELP, SUITES

    assert set(SUITES) < set(SUITE_HELP) and {"quality", "data", "lifelong", "finetune"} < set(SUITE_HELP)
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "bench " + " | ".join(SUITE_HELP) in text
    assert main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "benchmarks: cflora, topk, e2e, all, data; experiments: quality, lifelong, finetune" in text
    suites = _subparsers(_subparsers(build_parser())["bench"])
    assert list(suites) == list(SUITE_HELP)  # one subcommand per suite, from the table
    assert {suite: p.description for suite, p in suites.items()} == SUITE_HELP


@pytest.mark.parametrize(
    "suite, has, lacks",
    [
        (
            "quality",
            ["--seeds", "--n-boot", "--r", "--out"],
            ["--repeat", "--users", "--ks", "--lifelong", "--size"],
        ),
        ("lifelong", ["--ks", "--n-boot", "--r", "--dataset"], ["--repeat", "--users", "--lifelong"]),
        ("topk", ["--lifelong", "--repeat", "--size", "--out"], ["--seeds", "--users", "--ks", "--r"]),
        ("cflora", ["--repeat", "--warmup", "--dtype"], ["--lifelong", "--seeds", "--users"]),
        ("data", ["--users", "--gemm-size", "--out"], ["--repeat", "--seeds", "--ks", "--r"]),
        ("finetune", ["--n-train", "--warmup", "--r"], ["--repeat", "--users", "--ks", "--lifelong"]),
    ],
)
def test_each_bench_suite_has_its_own_help(capsys, suite, has, lacks):
    assert main(["bench", suite, "--help"]) == 0
    words = set(capsys.readouterr().out.replace("[", " ").replace("]", " ").split())
    assert set(has) <= words, sorted(set(has) - words)
    assert not set(lacks) & words, sorted(set(lacks) & words)


def test_every_suite_runs_through_one_protocol():
    from rellax_fast.bench.cli import SUITE_COMMANDS, SUITE_HELP

    assert list(SUITE_COMMANDS) == list(SUITE_HELP)
    assert all(callable(add) and callable(run) for add, run in SUITE_COMMANDS.values())


@pytest.mark.parametrize("suite", ["nosuch"])
def test_an_unknown_suite_names_the_choices(capsys, suite):
    assert main(["bench", suite]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nosuch'" in err and "finetune" in err


def _defaults(add):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args([])


def test_the_flags_default_to_the_configs_defaults(monkeypatch):
    """The parsers build without importing torch, so their defaults restate the config dataclasses' (a second
    home); this pins them together: with no flags, each command builds exactly the configs' defaults."""
    from dataclasses import fields

    from rellax_fast.ctr import cli as ctr_cli
    from rellax_fast.ctr.din import DINConfig, DINTrainConfig
    from rellax_fast.train.args import add_model_arguments, pipeline_config
    from rellax_fast.train.context import din_options_of, din_train_config_of
    from rellax_fast.train.pipeline import PipelineConfig

    monkeypatch.delenv("RELLAX_BACKEND", raising=False)
    din_model = {
        f.name: f.default for f in fields(DINConfig) if f.name in ("embed_dim", "mlp_hidden", "max_history")
    }
    args = _defaults(add_model_arguments)
    assert pipeline_config(args) == PipelineConfig()
    assert din_options_of(args) == din_model
    assert din_train_config_of(args) == DINTrainConfig()
    args = _defaults(ctr_cli.add_arguments)
    assert ctr_cli.din_options(args) == din_model
    assert ctr_cli.din_train_config(args) == DINTrainConfig()
