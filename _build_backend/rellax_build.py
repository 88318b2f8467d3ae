"""The PEP 517 build backend of rellax-fast: setuptools, plus the extension's build requirements only when
the extension is built (#25 item 5).

``build-system.requires`` is static, so listing torch there made every isolated build, the pure-Python one
(``RELLAX_BUILD_EXT=0``) included, download a CUDA torch and its CUDA wheels (about 2.7 GB) into pip's
temporary build environment although it compiles nothing. Here torch, pybind11 and ninja are asked for
through ``get_requires_for_build_wheel`` / ``_editable`` (PEP 517's dynamic requirements) unless
``RELLAX_BUILD_EXT=0``; an sdist never needs them. Everything else is setuptools' own backend.
"""

from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (build_wheel, build_sdist, prepare_metadata_..., ...)

# what setup.py's extension build imports; the torch range is the runtime one in pyproject.toml
EXTENSION_BUILD_REQUIRES = ["torch>=2.4", "pybind11>=2.10", "ninja"]


def extension_build_requires() -> list:
    """EXTENSION_BUILD_REQUIRES, or nothing for a pure-Python build (RELLAX_BUILD_EXT=0)."""
    return [] if os.environ.get("RELLAX_BUILD_EXT", "auto").strip() == "0" else list(EXTENSION_BUILD_REQUIRES)


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + extension_build_requires()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + extension_build_requires()
