"""Foundation: light import, kernels/ never importable as `kernels`, backend routing, info, build flags."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rellax_testing import REPO

from rellax_fast import _ext
from rellax_fast.ops import _backend
from rellax_fast.ops.dropout import seeded_dropout, seeded_dropout_ref

PY = sys.executable


def _run(code: str, cwd=REPO, env=None, timeout=240):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [PY, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_import_is_light():
    res = _run(
        """
        import sys, torch
        import rellax_fast, rellax_fast.ops, rellax_fast.cli
        rellax_fast.cli.build_parser()          # every command module is imported by the parser
        heavy = [m for m in ("triton", "rellax_fast._C", "transformers", "sentence_transformers", "faiss", "peft")
                 if m in sys.modules]
        print("HEAVY", heavy)
        print("CUDA_INIT", torch.cuda.is_initialized())
        """
    )
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout
    assert "CUDA_INIT False" in res.stdout


def _hf_kernels_dist():
    """Hugging Face's `kernels` distribution in this environment, or None (transformers >= 5.25 requires it)."""
    import importlib.metadata

    try:
        return importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def _site_view_without_hf_kernels(tmp_path) -> Path:
    """A view of this environment's site-packages with every entry but Hugging Face's `kernels` (package
    and dist-info) symlinked: the environment as it would be with `pip uninstall kernels`, without touching it."""
    dist = _hf_kernels_dist()
    site = Path(dist.locate_file(""))
    view = tmp_path / "site-without-kernels"
    view.mkdir()
    for entry in site.iterdir():
        if entry.name == "kernels" or (
            entry.name.startswith("kernels-") and entry.name.endswith(".dist-info")
        ):
            continue
        (view / entry.name).symlink_to(entry)
    return view


_KERNELS_PROBE = """
    import sys
    if {view!r}:
        import site
        site.addsitedir({view!r})     # python -S: this view is the only site-packages
    import glob, importlib, os
    import torch, transformers
    from transformers import BertConfig, BertModel
    from transformers.utils import import_utils
    print("KERNELS_AVAILABLE", import_utils.is_kernels_available())
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    out = BertModel(cfg)(torch.randint(0, 50, (2, 5))).last_hidden_state
    print("SHAPE", tuple(out.shape))
    import kernels
    print("KERNELS_FILE", getattr(kernels, "__file__", None))
    print("KERNELS_PATH", [os.path.realpath(p) for p in getattr(kernels, "__path__", [])])
    mods = sorted(os.path.basename(p)[:-3] for p in glob.glob("kernels/*.py"))
    for m in mods:
        try:
            importlib.import_module("kernels." + m)
            print("IMPORTED_AS_TOPLEVEL", m)
        except ImportError:
            pass
    print("CHECKED", len(mods))
"""


@pytest.mark.parametrize("hf_kernels", ["installed", "absent"])
def test_repo_kernels_folder_never_shadows_or_impersonates_hf_kernels(hf_kernels, tmp_path):
    # From the repository root our kernels/ folder (no __init__.py) is on sys.path as at most a namespace
    # portion. Hugging Face's `kernels` package (a dependency of transformers >= 5.25) must win when it is
    # installed; when it is not, transformers must not take our folder for it. Either way transformers builds
    # and runs a model, and our modules are never importable as `kernels.<name>`.
    dist = _hf_kernels_dist()
    if hf_kernels == "installed" and dist is None:
        pytest.skip(
            "Hugging Face's kernels is not installed here: the 'absent' case is this environment itself"
        )
    view = _site_view_without_hf_kernels(tmp_path) if hf_kernels == "absent" and dist is not None else ""
    code = _KERNELS_PROBE.format(view=str(view))
    cmd = [PY, "-S", "-c", textwrap.dedent(code)] if view else [PY, "-c", textwrap.dedent(code)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SHAPE (2, 5, 16)" in res.stdout
    assert "IMPORTED_AS_TOPLEVEL" not in res.stdout, res.stdout
    assert "CHECKED 0" not in res.stdout, res.stdout
    ours = str((REPO / "kernels").resolve())
    if hf_kernels == "installed":
        # Hugging Face's regular package wins over our namespace portion, wherever it sits on sys.path
        assert "KERNELS_AVAILABLE True" in res.stdout, res.stdout
        kernels_file = res.stdout.split("KERNELS_FILE ")[1].splitlines()[0]
        assert kernels_file.startswith(str(Path(dist.locate_file("")))), kernels_file
        assert ours not in res.stdout.split("KERNELS_PATH ")[1].splitlines()[0]
    else:
        # only our folder answers `import kernels`, as a namespace package transformers does not accept
        assert "KERNELS_AVAILABLE False" in res.stdout, res.stdout
        assert "KERNELS_FILE None" in res.stdout, res.stdout
        assert ours in res.stdout.split("KERNELS_PATH ")[1].splitlines()[0], res.stdout


def test_kernel_modules_carry_the_import_guard():
    for path in sorted((REPO / "kernels").glob("*.py")):
        head = path.read_text().split("\n\n\n")[0] + path.read_text()[:3000]
        assert 'if not __name__.startswith("rellax_fast.")' in head, f"{path.name} lacks the import guard"


def test_forced_unavailable_backend_says_why(monkeypatch):
    x = torch.randn(4, 3)
    with pytest.raises(_backend.BackendUnavailableError, match=r"extension built without CUDA \(torch "):
        seeded_dropout(x, 0.1, 1, backend="cuda")
    with pytest.raises(_backend.BackendUnavailableError, match="has no triton implementation"):
        seeded_dropout(x, 0.1, 1, backend="triton")
    monkeypatch.setenv("RELLAX_BACKEND", "cuda")
    with pytest.raises(_backend.BackendUnavailableError, match="RELLAX_BACKEND=cuda is unavailable"):
        seeded_dropout(x, 0.1, 1)
    monkeypatch.setenv("RELLAX_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"from \$RELLAX_BACKEND"):
        seeded_dropout(x, 0.1, 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        seeded_dropout(x, 0.1, 1, backend="gpu")


def test_auto_choice_and_forcing(monkeypatch):
    monkeypatch.delenv("RELLAX_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert _backend.resolve("seeded_dropout", cpu) == "cpp"  # the extension is built in this test setup
    assert _backend.resolve("seeded_dropout", cpu, "reference") == "reference"
    monkeypatch.setenv("RELLAX_BACKEND", "reference")
    assert _backend.resolve("seeded_dropout", cpu) == "reference"
    assert _backend.resolve("seeded_dropout", cpu, "cpp") == "cpp"  # the argument wins over the variable
    monkeypatch.setenv("RELLAX_BACKEND", "auto")
    assert _backend.resolve("seeded_dropout", cpu) == "cpp"


def test_triton_availability_follows_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET=1" in _backend.why_unavailable("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.why_unavailable("triton", "cpu") is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_seeded_dropout_cpp_matches_reference_mask(dtype, p):
    x = torch.randn(37, 101, dtype=dtype) + 3.0  # never zero, so a dropped element is visible
    seed = int(torch.randint(0, 2**62, (1,)))
    got = seeded_dropout(x, p, seed, backend="cpp")
    ref = seeded_dropout_ref(x.double(), p, seed)
    torch.testing.assert_close(got.double(), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
    kept = (got != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.03
    assert not torch.equal(seeded_dropout(x, p, seed + 1, backend="cpp"), got) or p == 0.0


def test_seeded_dropout_gradcheck_opcheck_compile():
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: seeded_dropout(t, 0.3, 99, backend="cpp"), (x,))
    torch.library.opcheck(torch.ops.rellax_fast.seeded_dropout.default, (x, 0.3, 5))
    f = torch.compile(lambda t: seeded_dropout(t * 2, 0.3, 123) + 1, fullgraph=True)
    torch.testing.assert_close(f(x), seeded_dropout_ref(x * 2, 0.3, 123) + 1)


def test_seeded_dropout_bad_input():
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\); got 1.0"):
        seeded_dropout(torch.randn(3), 1.0, 0)
    with pytest.raises(TypeError, match="x must be a floating tensor; got dtype torch.int64"):
        seeded_dropout(torch.arange(3), 0.1, 0)


def test_info_reports_extension_and_backends():
    res = subprocess.run(
        [PY, "-m", "rellax_fast.cli", "info"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"torch       {torch.__version__}" in out
    assert "_C          loaded from" in out and "built without CUDA" in out
    assert "seeded_dropout" in out and "cpp        available" in out
    assert "cuda       unavailable: extension built without CUDA" in out


def test_info_tells_the_truth_without_the_extension(tmp_path):
    # A RELLAX_BUILD_EXT=0 install is the same files without _C: lay that out and ask it.
    pkg = tmp_path / "rellax_fast"
    # without _C and its build record (_C_build.json), as RELLAX_BUILD_EXT=0 installs it
    shutil.copytree(
        REPO / "rellax_fast", pkg, symlinks=False, ignore=shutil.ignore_patterns("_C*", "__pycache__")
    )
    assert not list(pkg.glob("_C*"))
    # drop the editable-install finder, which would otherwise find the checkout's _C next to the copy
    no_editable = "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
    res = subprocess.run(
        [
            PY,
            "-c",
            no_editable + "import runpy; runpy.run_module('rellax_fast.cli', run_name='__main__')",
            "info",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr
    assert "_C          not loaded: rellax_fast._C is not built" in res.stdout
    assert "cpp        unavailable: rellax_fast._C is not built" in res.stdout
    assert "reference  available" in res.stdout
    res = subprocess.run(
        [
            PY,
            "-c",
            no_editable
            + "import torch, rellax_fast.ops as o; o.seeded_dropout(torch.ones(2), 0.5, 1, backend='cpp')",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert res.returncode != 0 and "backend='cpp' is unavailable: rellax_fast._C is not built" in res.stderr


def test_setup_py_build_ext_flag_zero_builds_nothing(tmp_path):
    env = {**os.environ, "RELLAX_BUILD_EXT": "0"}
    res = subprocess.run(
        [
            PY,
            "setup.py",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "tmp"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "pure-Python install without rellax_fast._C" in res.stdout
    assert not list((tmp_path).rglob("_C*.so"))


def test_setup_py_failed_build_names_the_escape_hatch(tmp_path):
    env = {**os.environ, "RELLAX_BUILD_EXT": "1", "CC": "false", "CXX": "false", "MAX_JOBS": "1"}
    res = subprocess.run(
        [
            PY,
            "setup.py",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "tmp"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "RELLAX_BUILD_EXT=0" in res.stdout + res.stderr
    assert not list((tmp_path).rglob("_C*.so"))


def test_setup_py_rejects_bad_flag_values():
    res = subprocess.run(
        [PY, "setup.py", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RELLAX_BUILD_CUDA": "yes"},
    )
    assert res.returncode != 0 and "RELLAX_BUILD_CUDA must be auto, 0 or 1; got 'yes'" in res.stderr


def test_lazy_loader_state_is_consistent():
    mod = _ext.load()
    assert mod is not None and _ext.load_error() is None
    assert mod.with_cuda() is False and _ext.cuda_archs() == ""
    assert Path(mod.__file__).name.startswith("_C")


def test_first_call_under_torch_compile_fullgraph_loads_the_extension():
    # the one-time _C load happens inside backend resolution, which compile evaluates as a constant
    res = _run(
        """
        import torch
        from rellax_fast.ops import seeded_dropout, seeded_dropout_ref
        x = torch.randn(4, 5)
        f = torch.compile(lambda t: seeded_dropout(t * 2, 0.3, 123) + 1, fullgraph=True)
        torch.testing.assert_close(f(x), seeded_dropout_ref(x * 2, 0.3, 123) + 1)
        print("OK")
        """
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_kernels_import_nothing_above_them():
    """kernels/*.py (installed as rellax_fast.kernels) may import torch, triton, the standard library and the leaf
    rellax_fast._kernel_common, never the ops or anything else of the package (no import cycle ops <-> kernels)."""
    import ast

    allowed_pkg = {"rellax_fast._kernel_common"}
    for path in sorted((REPO / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = (
                    [node.module or ""]
                    if node.level == 0
                    else [f"(relative level {node.level}) {node.module}"]
                )
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("rellax_fast") or name.startswith("(relative"):
                    assert name in allowed_pkg, (
                        f"{path.name} imports {name}: kernels must not depend on the layers above"
                    )
