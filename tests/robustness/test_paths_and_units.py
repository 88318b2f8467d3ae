"""Issue #26, without a backbone: paths read from files stay inside their folder (manifest keys, the ``latest``
pointer, a run's recorded dependencies), refused on their text before the target is touched; the DIN folder's
files (umask, a truncated din.json); DIN training on a one-class split or diverging; JSONL samples for eval
checked line by line; eval's data fingerprint check."""

import json
import os
import pathlib

import numpy as np
import pytest
import torch

from rellax_fast._io import PathOutsideFolderError
from rellax_fast.data.ctr import prepare_ctr
from rellax_fast.data.parsing import DataFormatError
from rellax_fast.data.prepared import PreparedDataError, load_prepared, save_prepared
from rellax_fast.data.synthetic import make_synthetic

OPTS = {"embed_dim": 4, "mlp_hidden": (8,), "max_history": 5, "attention_hidden": 4}


def tiny(seed=0):
    return prepare_ctr(make_synthetic(seed=seed, n_users=40, n_items=60, n_ratings=1000))


@pytest.fixture
def touched(monkeypatch):
    """Records every path that is stat'ed or opened through pathlib or open() (see ``outside_of``)."""
    seen = []
    real_stat, real_open = pathlib.Path.stat, open

    def stat(self, *a, **k):
        seen.append(str(self))
        return real_stat(self, *a, **k)

    def opener(file, *a, **k):
        seen.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    monkeypatch.setattr("builtins.open", opener)
    return seen


def outside_of(touched, tmp_path):
    """What was touched inside ``tmp_path/outside`` (the folder the refused paths point to)."""
    return [p for p in touched if os.path.normpath(p).startswith(str(tmp_path / "outside"))]


def _outside(tmp_path):
    target = tmp_path / "outside" / "secret"
    target.parent.mkdir()
    target.write_text("secret bytes")
    return target


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_manifest_key_outside_the_folder_is_refused_before_it_is_opened(tmp_path, touched, form):
    target = _outside(tmp_path)
    out = tmp_path / "deep" / "prepared"
    save_prepared(tiny(), out)
    meta = json.loads((out / "meta.json").read_text())
    key = os.path.relpath(target, out) if form == "relative" else str(target)
    meta["manifest"]["files"][key] = {"bytes": 12, "sha256": "0" * 64, "rows": 1}
    (out / "meta.json").write_text(json.dumps(meta))
    touched.clear()
    with pytest.raises(PreparedDataError, match=r"meta.json: manifest key: .* points outside") as info:
        load_prepared(out)
    assert key in str(info.value) and "bytes" not in str(info.value)  # its size is not reported
    assert outside_of(touched, tmp_path) == []  # the file outside was neither opened nor stat'ed


def test_manifest_key_that_prepare_never_writes_is_refused(tmp_path):
    save_prepared(tiny(), tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["manifest"]["files"]["notes.txt"] = {"bytes": 1, "sha256": "0" * 64, "rows": 0}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        PreparedDataError, match=r"the manifest lists \['notes.txt'\], which `prepare` never writes"
    ):
        load_prepared(tmp_path)


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_latest_pointer_outside_the_run_is_refused(tmp_path, touched, form):
    from rellax_fast.train.checkpoint import latest_checkpoint

    outside = tmp_path / "outside" / "ckpt"
    outside.mkdir(parents=True)
    (outside / "state.json").write_text("{}")
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text(os.path.relpath(outside, root) if form == "relative" else str(outside))
    touched.clear()
    with pytest.raises(
        PathOutsideFolderError, match=r"checkpoints/latest: the latest-checkpoint pointer: .* points outside"
    ):
        latest_checkpoint(tmp_path / "run")
    assert outside_of(touched, tmp_path) == []
    (root / "latest").write_text("optimizer-evil")  # inside, but not a checkpoint folder
    with pytest.raises(PathOutsideFolderError, match=r"names 'optimizer-evil', not a checkpoint folder"):
        latest_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("form", ["relative", "absolute", "old-absolute"])
def test_recorded_dependency_outside_the_out_folder_is_refused(tmp_path, touched, form):
    from rellax_fast.train.pipeline import resolve_dependency

    target = _outside(tmp_path)
    run = tmp_path / "out" / "rellax-full"
    run.mkdir(parents=True)
    meta = {"paths_relative_to": "run", "ctr_dir": os.path.relpath(target.parent, run)}
    if form != "relative":
        meta["ctr_dir"] = str(target.parent)
    if form == "old-absolute":
        del meta["paths_relative_to"]
    touched.clear()
    with pytest.raises(
        PathOutsideFolderError, match=r"rellax.json: ctr_dir: .* points outside the run's --out folder"
    ):
        resolve_dependency(run, meta, "ctr_dir")
    assert outside_of(touched, tmp_path) == []
    # what train records is accepted: ../ctr relative to the run, or (older runs) a path inside --out
    assert (
        resolve_dependency(run, {"paths_relative_to": "run", "ctr_dir": "../ctr"}, "ctr_dir")
        == tmp_path / "out" / "ctr"
    )
    assert (
        resolve_dependency(run, {"ctr_dir": str(tmp_path / "out" / "ctr")}, "ctr_dir")
        == tmp_path / "out" / "ctr"
    )


def test_din_safetensors_gets_the_umask_mode(tmp_path):
    from rellax_fast.ctr.din import DINTrainConfig
    from rellax_fast.ctr.store import fit_din, save_ctr

    model, report, vocab = fit_din(tiny(), OPTS, DINTrainConfig(epochs=1, progress=False))
    old = os.umask(0o027)
    try:
        save_ctr(model, vocab, report, tmp_path / "ctr")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ctr").iterdir()}
    assert modes["din.safetensors"] == 0o640, modes
    assert set(modes.values()) == {0o640}, modes


def test_truncated_din_json_is_named_and_retrained(tmp_path):
    from rellax_fast.ctr.din import DINTrainConfig, load_din
    from rellax_fast.ctr.store import train_or_load_ctr

    data, cfg = tiny(), DINTrainConfig(epochs=1, progress=False)
    train_or_load_ctr(data, tmp_path / "ctr", OPTS, cfg, log=lambda *_: None)
    text = (tmp_path / "ctr" / "din.json").read_text()
    (tmp_path / "ctr" / "din.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"din.json: unreadable or incomplete \(JSONDecodeError"):
        load_din(tmp_path / "ctr")
    logs = []
    train_or_load_ctr(data, tmp_path / "ctr", OPTS, cfg, log=logs.append)
    assert logs and logs[0].startswith("retraining the DIN") and "din.json is unreadable" in logs[0]
    load_din(tmp_path / "ctr")  # rewritten whole


def test_din_on_a_one_class_split_says_so(tmp_path):
    from rellax_fast.ctr.din import DINTrainConfig, SingleClassSplitError
    from rellax_fast.ctr.store import fit_din

    data = tiny()
    data.sequences.ratings[:] = 5.0  # every rating positive
    for name, split in data.splits.items():
        data.splits[name] = split.subset(np.arange(len(split)))
        data.splits[name].label[:] = 1
    with pytest.raises(SingleClassSplitError, match=r"the train split holds only label 1 \(\d+ samples\)"):
        fit_din(data, OPTS, DINTrainConfig(epochs=1, progress=False))


def test_din_that_diverges_stops_at_the_step(tmp_path):
    from rellax_fast.ctr.din import DINTrainConfig, NonFiniteLossError
    from rellax_fast.ctr.store import fit_din

    with pytest.raises(NonFiniteLossError, match=r"DIN training diverged: .*with --lr 1e\+30; lower --lr"):
        fit_din(tiny(), OPTS, DINTrainConfig(epochs=3, lr=1e30, batch_size=64, progress=False))


def test_trainer_stops_at_the_step_whose_loss_is_not_finite():
    from rellax_fast.ctr.din import NonFiniteLossError
    from rellax_fast.train.trainer import TrainConfig, check_finite_loss

    check_finite_loss(0.69, 1, 1, TrainConfig())
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 3 \(epoch 1\) with --lr 1e\+30"):
        check_finite_loss(float("nan"), 3, 1, TrainConfig(lr=1e30))


# --------------------------------------------------------------------------------------------- eval JSONL


def _jsonl(tmp_path, lines):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = '{"user_id": 1, "item_id": 3, "history": [1, 2], "history_ratings": [4, 5], "label": 1}'


@pytest.mark.parametrize(
    "lines, message",
    [
        ([GOOD, '{"user_id": 1, "item_id": 3, "history": [1, 2'], r"line 2: not valid JSON"),
        (
            [GOOD, '{"user_id": 1, "item_id": 99999, "history": [1]}'],
            r"line 2: item id\(s\) \[99999\] are not items",
        ),
        (
            ['{"user_id": 1, "item_id": 3, "history": [1, 2], "history_timestamps": [5]}'],
            r"line 1: history_timestamps has 1 values for 2 history items",
        ),
        (
            ['{"user_id": 1, "item_id": 3, "history": [1, 2], "history_timestamps": [9, 5]}'],
            r"line 1: history_timestamps are not in time order",
        ),
        ([GOOD, GOOD.replace('"label": 1', '"label": 7')], r"line 2: label must be 0 or 1, got 7"),
        (["[1, 2, 3]"], r"line 1: expected a JSON object .* got a list"),
        ([], r"no samples \(the file is empty"),
        (['{"user_id": "u1", "item_id": 3, "history": []}'], r"line 1: user_id must be an integer"),
        (
            ['{"user_id": 1, "item_id": 3, "history": [1], "history_ratings": [NaN]}'],
            r"line 1: history_ratings must be a list of finite numbers",
        ),
    ],
    ids=[
        "bad-json",
        "unknown-item",
        "timestamps-length",
        "timestamps-order",
        "label-7",
        "list-line",
        "empty",
        "user-id-string",
        "nan-rating",
    ],
)
def test_jsonl_bad_lines_are_data_format_errors_naming_the_line(tmp_path, lines, message):
    from rellax_fast.train.runs import jsonl_split

    path = _jsonl(tmp_path, lines)
    with pytest.raises(DataFormatError, match=message) as info:
        jsonl_split(path, tiny())
    assert str(path) in str(info.value)


def test_jsonl_missing_file_and_a_good_file(tmp_path):
    from rellax_fast.train.runs import jsonl_split

    with pytest.raises(
        DataFormatError, match=r"nothing.jsonl: cannot read the --jsonl file \(FileNotFoundError"
    ):
        jsonl_split(tmp_path / "nothing.jsonl", tiny())
    view, split, has_label = jsonl_split(_jsonl(tmp_path, [GOOD, GOOD.replace(', "label": 1', "")]), tiny())
    assert (
        not has_label
        and len(split) == 2
        and split.item_id.tolist() == [3, 3]
        and split.pos.tolist() == [2, 2]
    )
    assert split.history(0).tolist() == [1, 2] and split.history_ratings(0).tolist() == [4.0, 5.0]


def test_eval_data_must_be_the_data_the_run_was_trained_on(tmp_path):
    from rellax_fast.data.ctr import ctr_fingerprint
    from rellax_fast.train.runs import RunDataMismatchError, check_run_data

    data = tiny()
    meta = {"dataset": "synthetic", "data_fingerprint": ctr_fingerprint(data)}
    check_run_data(tmp_path, meta, data)
    with pytest.raises(RunDataMismatchError, match=r"not the ones the run was trained on .*data_fingerprint"):
        check_run_data(tmp_path, meta, tiny(seed=1))
    with pytest.raises(RunDataMismatchError, match=r"trained on 'ml-100k', not 'synthetic'"):
        check_run_data(tmp_path, {**meta, "dataset": "ml-100k"}, data)


def test_run_tensors_are_checked_before_any_is_copied(tmp_path):
    from safetensors.torch import save_file

    from rellax_fast.train.runs import RunFileError, _load_tensors

    targets = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    cases = {
        "nan": ({"a": torch.full((2, 3), float("nan"))}, r"'a' holds 6 non-finite value"),
        "shape": ({"b": torch.zeros(5)}, r"'b' has shape \(5,\), the model expects \(4,\)"),
        "extra": (
            {"a": torch.zeros(2, 3), "zzz": torch.zeros(1)},
            r"holds tensor 'zzz', which the rebuilt model",
        ),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(RunFileError, match=message):
            _load_tensors(tmp_path / f"{name}.safetensors", targets, "tensor")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "shape.safetensors").read_bytes()[:20])
    with pytest.raises(RunFileError, match=r"cut.safetensors: unreadable"):
        _load_tensors(tmp_path / "cut.safetensors", targets, "tensor")
    assert set(
        _load_tensors(tmp_path / "extra.safetensors", {**targets, "zzz": torch.ones(1)}, "tensor")
    ) == {"a", "zzz"}


def test_resume_check_names_changed_options_and_warns_on_older_records(tmp_path, monkeypatch):
    from dataclasses import replace

    from rellax_fast.train import pipeline
    from rellax_fast.train.pipeline import (
        PipelineConfig,
        ResumeMismatchError,
        VariantSpec,
        check_inputs_for_resume,
    )

    monkeypatch.setattr(pipeline, "run_inputs", lambda ctx, spec: {"data_fingerprint": "d"})
    cfg, spec = PipelineConfig(model=str(tmp_path)), VariantSpec("v")
    check_inputs_for_resume(tmp_path, None, spec, False, cfg)  # the start: records inputs and options
    assert json.loads((tmp_path / "inputs.json").read_text())["options"]["cflora.r"] == 8
    check_inputs_for_resume(tmp_path, None, spec, True, replace(cfg, n_test=7))  # a free option
    changed = replace(
        cfg, k=2, cflora=replace(cfg.cflora, r=4), train=replace(cfg.train, lr=0.5, save_every_steps=3)
    )
    with pytest.raises(ResumeMismatchError, match=r"--r 8 -> 4; --k 5 -> 2; --lr 0.001 -> 0.5\. Resume with"):
        check_inputs_for_resume(tmp_path, None, spec, True, changed)
    with pytest.raises(ResumeMismatchError, match=r"--no-spa True -> False"):
        check_inputs_for_resume(tmp_path, None, replace(spec, spa=False), True, cfg)
    (tmp_path / "inputs.json").write_text(
        json.dumps({"data_fingerprint": "d"})
    )  # written before options were
    logs = []
    check_inputs_for_resume(tmp_path, None, spec, True, changed, log=logs.append)
    assert logs and "written before runs recorded their options" in logs[0]
