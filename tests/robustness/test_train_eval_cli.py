"""Issue #26 through the CLI: `train`, `train-ctr` and `eval` on the probes that used to give wrong results
silently or a traceback. Each ends in one `error:` line naming the file or the option (exit 2; a refused resume
keeps its exit 1) and writes nothing half-done.

One tiny pipeline (a ml-100k-format corpus of 8 users, a 2-layer BERT) is trained once; the probes copy it.
"""

import json
import os
import shutil

import pytest
from corpus import VARIANTS, Expect, write_clean, write_variant
from safetensors.torch import load_file, save_file

from rellax_fast.cli import main

pytestmark = pytest.mark.slow  # one tiny `train` through the CLI, then evals and resumes of copies: ~1-2 min

DIN = ["--din-epochs", "1", "--din-hidden", "8", "--din-embed-dim", "4", "--din-max-history", "5"]


def train_argv(raw, out, model, *extra):
    return [
        "train",
        "--dataset",
        "ml-100k",
        "--data-dir",
        str(raw),
        "--out",
        str(out),
        "--model",
        model,
        "--n-train",
        "16",
        "--n-test",
        "0",
        "--k",
        "3",
        "--batch-size",
        "8",
        "--max-length",
        "96",
        "--cflora-backend",
        "reference",
        "--no-progress",
        *DIN,
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from rellax_testing import save_tiny_bert

    root = tmp_path_factory.mktemp("train_eval")
    model = save_tiny_bert(root / "tiny_bert")
    raw = write_clean(root / "raw")
    out = root / "out"
    assert main(train_argv(raw, out, model)) == 0
    return raw, out, model


def copy_out(trained, dest):
    raw, out, model = trained
    shutil.copytree(out, dest)
    return dest, dest / "rellax-full"


def evaluate(capsys, raw, run, out, *extra):
    capsys.readouterr()
    rc = main(
        [
            "eval",
            "--run",
            str(run),
            "--dataset",
            "ml-100k",
            "--out",
            str(out),
            "--no-progress",
            *(["--data-dir", str(raw)] if raw is not None else []),
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_resume_with_changed_options_is_refused_naming_each(trained, tmp_path, capsys):
    raw, _, model = trained
    out, run = copy_out(trained, tmp_path / "out")
    before = (run / "rellax.json").read_bytes()
    argv = train_argv(raw, out, model, "--resume")
    for flag, value in (("--batch-size", "16"), ("--k", "2")):
        argv[argv.index(flag) + 1] = value
    argv += ["--lr", "0.002", "--r", "4"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "inputs.json: cannot resume" in err and "with other options than it started with" in err
    for change in ("--batch-size 8 -> 16", "--k 3 -> 2", "--lr 0.001 -> 0.002", "--r 8 -> 4"):
        assert change in err, err
    assert "size mismatch" not in err and (run / "rellax.json").read_bytes() == before
    # the same options (and a free one: --save-every) resume
    assert main(train_argv(raw, out, model, "--resume", "--save-every", "7")) == 0
    assert "resumed from" in capsys.readouterr().out


def test_eval_on_other_data_of_the_same_name_is_refused(trained, tmp_path, capsys):
    raw, out, _ = trained
    other = write_clean(tmp_path / "other")
    rows = [
        r for r in (other / "u.data").read_text().splitlines() if not r.startswith("8\t")
    ]  # one user fewer
    (other / "u.data").write_text("".join(r + "\n" for r in rows))
    rc, err = evaluate(capsys, other, out / "rellax-full", tmp_path / "ev")
    assert (
        rc == 2
        and "error:" in err
        and "not the ones the run was trained on" in err
        and "data_fingerprint" in err
    )
    assert not (tmp_path / "ev").exists()


def _nan_lora_b(run):
    tensors = load_file(str(run / "trainable.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_B"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(run / "trainable.safetensors"))
    return rf"trainable.safetensors: tensor '{key}' holds 1 non-finite value"


def _wrong_shape(run):
    tensors = load_file(str(run / "trainable.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(run / "trainable.safetensors"))
    return rf"trainable.safetensors: tensor '{key}' has shape"


def _extra_tensor(run):
    import torch

    tensors = load_file(str(run / "trainable.safetensors"))
    tensors["backbone.not_a_parameter"] = torch.zeros(3)
    save_file(tensors, str(run / "trainable.safetensors"))
    return r"trainable.safetensors: holds tensor 'backbone.not_a_parameter', which the rebuilt model does not have"


def _truncated_meta(run):
    text = (run / "rellax.json").read_text()
    (run / "rellax.json").write_text(text[: len(text) // 3])
    return r"rellax.json: unreadable or truncated"


def _dependency_outside(run):
    meta = json.loads((run / "rellax.json").read_text())
    meta["ctr_dir"] = os.path.join("..", "..", "elsewhere", "ctr")
    (run / "rellax.json").write_text(json.dumps(meta))
    return r"rellax.json: ctr_dir: '../../elsewhere/ctr' points outside the run's --out folder"


@pytest.mark.parametrize(
    "damage",
    [_nan_lora_b, _wrong_shape, _extra_tensor, _truncated_meta, _dependency_outside],
    ids=["nan-lora-B", "wrong-shape", "extra-tensor", "truncated-rellax-json", "ctr-dir-outside"],
)
def test_eval_of_a_damaged_run_is_refused_before_scoring(trained, tmp_path, capsys, damage):
    import re

    raw = trained[0]
    _, run = copy_out(trained, tmp_path / "out")
    message = damage(run)
    rc, err = evaluate(capsys, raw, run, tmp_path / "ev")
    assert rc == 2 and "error: " in err and re.search(message, err), err
    assert not (tmp_path / "ev" / "predictions.jsonl").exists()


def test_eval_jsonl_errors_name_the_line_and_good_lines_score(trained, tmp_path, capsys):
    raw, out, _ = trained
    good = '{"user_id": 1, "item_id": 3, "history": [1, 2, 5], "history_ratings": [4, 5, 3], "label": 1}'
    path = tmp_path / "samples.jsonl"
    path.write_text(good + "\n" + '{"user_id": 2, "item_id": 3, "history": [1], "label": 7}\n')
    rc, err = evaluate(capsys, raw, out / "rellax-full", tmp_path / "ev", "--jsonl", str(path))
    assert rc == 2 and f"error: {path}: line 2: label must be 0 or 1, got 7" in err
    rc, err = evaluate(
        capsys, raw, out / "rellax-full", tmp_path / "ev", "--jsonl", str(tmp_path / "missing.jsonl")
    )
    assert rc == 2 and "missing.jsonl: cannot read the --jsonl file" in err
    assert not (tmp_path / "ev").exists()
    path.write_text(good + "\n" + good.replace('"label": 1', '"label": 0') + "\n")
    rc, err = evaluate(capsys, raw, out / "rellax-full", tmp_path / "ev", "--jsonl", str(path))
    assert rc == 0, err
    lines = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(0 < json.loads(x)["p_click"] < 1 for x in lines)


def test_eval_without_data_dir_creates_nothing(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELLAX_DATA_DIR", raising=False)
    rc, err = evaluate(capsys, None, trained[1] / "rellax-full", tmp_path / "ev")
    assert rc == 2 and "error:" in err and "ml-100k" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "ev").exists()


def test_train_option_errors_come_before_any_work(trained, tmp_path, capsys):
    raw, _, model = trained
    capsys.readouterr()
    assert main(train_argv(raw, tmp_path / "a", "/no/such/model")) == 2
    err = capsys.readouterr().err
    assert "error: --model '/no/such/model': no such file or folder" in err and not (tmp_path / "a").exists()
    out, _ = copy_out(trained, tmp_path / "b")
    assert main(train_argv(raw, out, model, "--max-length", "16", "--name", "short")) == 2
    err = capsys.readouterr().err
    assert "error: --max-length 16: " in err and "cannot hold even the prompt without history" in err
    assert not (out / "short" / "rellax.json").exists() and not (out / "short" / "checkpoints").exists()


def test_train_that_diverges_stops_at_the_step(trained, tmp_path, capsys):
    raw, _, model = trained
    out, _ = copy_out(trained, tmp_path / "out")
    capsys.readouterr()
    assert main(train_argv(raw, out, model, "--lr", "1e30", "--name", "diverge")) == 2
    err = capsys.readouterr().err
    assert "error: training diverged: the loss is" in err and "at step 2 (epoch 1) with --lr 1e+30" in err, (
        err
    )
    assert not (out / "diverge" / "rellax.json").exists()


def ctr_argv(raw, out, *extra):
    return [
        "train-ctr",
        "--dataset",
        "ml-100k",
        "--data-dir",
        str(raw),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--hidden",
        "8",
        "--embed-dim",
        "4",
        "--max-history",
        "5",
        "--batch-size",
        "16",
        "--no-progress",
        *extra,
    ]


BAD_DATA = [name for name, v in VARIANTS.items() if v.expect is Expect.error]  # the corpus prepare is held to


@pytest.mark.parametrize("variant", BAD_DATA)
@pytest.mark.parametrize("command", ["train-ctr", "train", "eval"])
def test_bad_data_is_one_error_line(tmp_path, capsys, request, variant, command):
    raw = write_variant(variant, tmp_path / "raw")
    argv = (
        ctr_argv(raw, tmp_path / "out")
        if command == "train-ctr"
        else train_argv(raw, tmp_path / "out", "unused")
    )
    if command == "eval":  # the trained run scored on a corrupt copy of its data
        run = request.getfixturevalue("trained")[1] / "rellax-full"
        argv = [
            "eval",
            "--run",
            str(run),
            "--data-dir",
            str(raw),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    import re

    assert re.search(VARIANTS[variant].message, err), err
    assert not (tmp_path / "out").exists()  # nothing written


def test_train_ctr_single_class_and_divergence_and_truncated_din_json(tmp_path, capsys):
    raw = write_clean(tmp_path / "raw")
    rows = [r.rsplit("\t", 2) for r in (raw / "u.data").read_text().splitlines()]
    (tmp_path / "pos").mkdir()
    shutil.copytree(raw, tmp_path / "pos", dirs_exist_ok=True)
    (tmp_path / "pos" / "u.data").write_text("".join(f"{a}\t5\t{t}\n" for a, _, t in rows))  # every rating 5
    capsys.readouterr()
    assert main(ctr_argv(tmp_path / "pos", tmp_path / "o1")) == 2
    assert "error: the train split holds only label 1" in capsys.readouterr().err
    assert main(ctr_argv(raw, tmp_path / "o2", "--lr", "1e30")) == 2
    assert "error: DIN training diverged" in capsys.readouterr().err
    assert not (tmp_path / "o1" / "ctr").exists() and not (tmp_path / "o2" / "ctr").exists()
    assert main(ctr_argv(raw, tmp_path / "o3")) == 0
    text = (tmp_path / "o3" / "ctr" / "din.json").read_text()
    (tmp_path / "o3" / "ctr" / "din.json").write_text(text[:40])
    capsys.readouterr()
    assert main(ctr_argv(raw, tmp_path / "o3")) == 0
    assert "din.json is unreadable" in capsys.readouterr().out
    json.loads((tmp_path / "o3" / "ctr" / "din.json").read_text())
