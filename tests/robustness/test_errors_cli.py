"""#13 item 9: options that used to end in a traceback give one clear line naming the option instead."""

from __future__ import annotations

import argparse

import pytest
import torch
from corpus import write_variant

from rellax_fast.cli import main
from rellax_fast.subr import embed
from rellax_fast.subr.encoders import check_encoder_name, resolve_device


def _run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


COMMANDS = [
    ["prepare"],
    ["embed"],
    ["retrieve"],
    ["train-ctr"],
    ["train"],
    ["eval", "--run", "r"],
    ["demo"],
    ["bench", "cflora"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_out_that_is_a_file(tmp_path, capsys, command):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    rc, err = _run(capsys, [*command, "--out", str(target)])
    assert rc == 2
    assert f"error: --out {target}: exists and is not a folder" in err
    assert target.read_text() == "keep me"
    rc, err = _run(capsys, [*command, "--out", str(target / "sub")])
    assert rc == 2 and f"{target} is a file, not a folder" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "command", [["embed"], ["retrieve"], ["bench", "cflora"], ["bench", "topk"]], ids=str
)
def test_device_cuda_without_cuda(tmp_path, capsys, command):
    rc, err = _run(capsys, [*command, "--out", str(tmp_path), "--device", "cuda"])
    assert rc == 2
    why = "CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
    assert "error: --device 'cuda': CUDA is not available: " in err and why in err
    assert not (tmp_path / "embeddings").exists() or not any((tmp_path / "embeddings").iterdir())


def test_device_that_is_not_a_device(tmp_path, capsys):
    rc, err = _run(capsys, ["embed", "--out", str(tmp_path), "--device", "gpu0"])
    assert rc == 2 and "error: --device 'gpu0': not a device; expected cpu, cuda or cuda:N" in err


def test_resolve_device_api():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("cpu", "cuda")
    with pytest.raises(ValueError, match=r"device 'cuda:99': "):
        resolve_device("cuda:99")
    with pytest.raises(ValueError, match=r"device 'meta': unsupported device type 'meta'"):
        resolve_device("meta")


@pytest.mark.parametrize("encoder", ["/no/such/model", "./models/missing", "~/models/x", "a/b/c"])
def test_encoder_path_that_does_not_exist(tmp_path, capsys, encoder):
    rc, err = _run(capsys, ["embed", "--out", str(tmp_path), "--encoder", encoder, "--device", "cpu"])
    assert rc == 2
    assert f"error: --encoder {encoder!r}: no such file or folder" in err
    assert "Repo id" not in err


def test_encoder_names_that_may_be_hub_ids_pass_the_check(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for name in ("default", "sentence-transformers/all-MiniLM-L6-v2", "bert-base-uncased", str(tmp_path)):
        check_encoder_name(name)
    with pytest.raises(ValueError, match=r"name_or_path '\.\./x': no such file"):
        check_encoder_name("../x", "name_or_path")


def test_encoder_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty_model").mkdir()
    rc, err = _run(
        capsys,
        [
            "embed",
            "--out",
            str(tmp_path / "o"),
            "--encoder",
            str(tmp_path / "empty_model"),
            "--device",
            "cpu",
        ],
    )
    assert (
        rc == 2
        and f"error: --encoder '{tmp_path / 'empty_model'}': not a model folder (no config.json" in err
    )
    (tmp_path / "weights.bin").write_bytes(b"")
    rc, err = _run(
        capsys, ["embed", "--out", str(tmp_path / "o"), "--encoder", str(tmp_path / "weights.bin")]
    )
    assert (
        rc == 2
        and f"error: --encoder '{tmp_path / 'weights.bin'}': is a file; give the model's folder" in err
    )


def test_data_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "ml-100k").write_text("not a folder")
    rc, err = _run(
        capsys,
        [
            "prepare",
            "--dataset",
            "ml-100k",
            "--data-dir",
            str(tmp_path / "ml-100k"),
            "--out",
            str(tmp_path / "o"),
            "--no-download",
        ],
    )
    assert rc == 2 and f"data folder {tmp_path / 'ml-100k'}: is a file, not a folder" in err


def test_embed_reports_what_the_loader_fixed(tmp_path, capsys):
    """embed/retrieve load the raw dataset too: a repeated rating is reported as one warning line."""
    d = write_variant("rerated_copies", tmp_path / "ml-100k")
    args = argparse.Namespace(dataset="ml-100k", data_dir=str(d), no_download=True)
    ds = embed.load_raw_dataset(args)
    err = capsys.readouterr().err
    assert len(ds.ratings) == 96
    assert f"warning: {d / 'u.data'}: dropped 10 repeated ratings" in err
