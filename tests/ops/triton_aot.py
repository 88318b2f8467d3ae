"""Ahead-of-time compilation of the Triton kernels for a named GPU without a GPU (the compile gate's engine).

Owns: capturing the launch arguments a launcher really passes (each @triton.jit kernel's ``run`` is
replaced, so nothing executes), turning one captured launch into the signature / constexprs / attributes
that the runtime would specialise on, ``triton.compile`` for a ``GPUTarget``, and reading the resources of
the result: registers and spill bytes from ``ptxas -v`` (the ptxas that ships in the triton wheel), shared
memory from the compiled metadata, and tensor-core instructions from the PTX.

Used by tests/ops/test_triton_compile_gate.py (CI, no GPU) and runnable as a script for a table:
``.venv/bin/python tests/ops/triton_aot.py`` (see the test for the matrix).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

# Largest dynamic shared memory per block (opt-in) in bytes, from the CUDA programming guide's table.
SMEM_LIMIT = {80: 166_912, 90: 232_448}


@dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.__name__


@contextlib.contextmanager
def capture_launches(kernels) -> List[Launch]:
    """Within the block, launching any of ``kernels`` records a Launch instead of running."""
    launches: List[Launch] = []
    saved = [(fn, fn.__dict__.get("run")) for fn in kernels]

    for fn in kernels:

        def fake_run(*args, grid, warmup=False, _fn=fn, **kwargs):
            launches.append(Launch(_fn, args, dict(kwargs, _grid=grid)))

        fn.run = fake_run
    try:
        yield launches
    finally:
        for fn, old in saved:
            if old is None:
                del fn.run
            else:
                fn.run = old


def native_specializer():
    """triton.runtime.jit.native_specialize_impl (triton >= 3.4): how the runtime specialises each argument.

    Without it the gate cannot know what the runtime compiles, so it fails loudly (a RuntimeError naming the
    triton version) instead of skipping: a gate that silently does not run is no gate."""
    import triton
    import triton.runtime.jit as jit

    impl = getattr(jit, "native_specialize_impl", None)
    if impl is None:
        raise RuntimeError(
            f"the Triton compile gate needs triton.runtime.jit.native_specialize_impl (triton >= 3.4); triton "
            f"{triton.__version__} has none, so the runtime's specialisation (==1 constexprs, %16 divisibility) "
            "cannot be reproduced. Run the gate with the triton of pyproject's dev extra."
        )
    return impl


def specialise(launch: Launch, backend) -> Tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) with the ==1 constexprs and %16 divisibility the runtime picks."""
    from triton.backends.compiler import BaseBackend

    native_specialize_impl = native_specializer()

    fn = launch.fn
    bound = dict(zip(fn.arg_names, launch.args))
    bound.update({k: v for k, v in launch.kwargs.items() if not k.startswith("_")})
    signature, constexprs, attrs = {}, {}, {}
    for p in fn.params:
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(p.num,)] = "constexpr", value
            continue
        ty, attr = native_specialize_impl(
            BaseBackend, value, False, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        if ty == "constexpr":
            signature[p.name], constexprs[(p.num,)] = "constexpr", attr
        else:
            signature[p.name] = ty
            if isinstance(attr, str) and attr:
                attrs[(p.num,)] = backend.parse_attr(attr)
    options = {n: bound[n] for n in ("num_warps", "num_stages") if n in bound}
    return signature, constexprs, attrs, options


def compile_key(launch: Launch, backend) -> str:
    """Everything that decides the binary: two launches with the same key compile to the same code."""
    signature, constexprs, attrs, options = specialise(launch, backend)
    text = repr(
        (
            launch.name,
            sorted(signature.items()),
            sorted(constexprs.items()),
            sorted((k, repr(v)) for k, v in attrs.items()),
            sorted(options.items()),
        )
    )
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def ptxas_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


_USAGE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str, arch: str) -> Tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) per thread from ``ptxas -v --gpu-name=<arch>``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [str(ptxas_path()), "-v", f"--gpu-name={arch}", str(src), "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
    text = out.stdout + out.stderr
    regs, spill = _USAGE.search(text), _SPILL.search(text)
    if regs is None or spill is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{text}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


@dataclass
class Resources:
    kernel: str
    arch: str
    num_warps: int
    num_stages: int
    constexprs: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    smem_limit: int
    tensor_cores: str  # "wgmma", "mma" or "-"
    tma: str  # the PTX's cp.async.bulk.tensor copies: "load+store", "load", "store" or "-"
    compile_s: float


def tensor_core_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\.aligned", ptx):
        return "mma"
    return "-"


def tma_kind(ptx: str) -> str:
    """Which TMA copies the PTX holds: global->shared loads, shared->global stores, both or none."""
    load = re.search(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx) is not None
    store = re.search(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared::\w+", ptx) is not None
    return {(True, True): "load+store", (True, False): "load", (False, True): "store"}.get((load, store), "-")


def compile_launch(launch: Launch, capability: int) -> Tuple[object, Resources]:
    """triton.compile one captured launch for sm_<capability> (sm_90a for 90) and measure it."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = specialise(launch, backend)
    t0 = time.perf_counter()
    compiled = triton.compile(
        ASTSource(launch.fn, signature, constexprs, attrs), target=target, options=options
    )
    elapsed = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    regs, st, ld = ptxas_usage(ptx, arch)
    shown = {
        launch.fn.arg_names[k[0]]: v
        for k, v in constexprs.items()
        if launch.fn.arg_names[k[0]].isupper()
        and signature[launch.fn.arg_names[k[0]]] == "constexpr"
        and launch.fn.params[k[0]].is_constexpr
    }
    res = Resources(
        launch.name,
        arch,
        options.get("num_warps", 4),
        options.get("num_stages", 3),
        " ".join(f"{k}={v}" for k, v in shown.items()),
        regs,
        st,
        ld,
        int(compiled.metadata.shared),
        SMEM_LIMIT[capability],
        tensor_core_kind(ptx),
        tma_kind(ptx),
        elapsed,
    )
    return compiled, res


def capture(kernels, launcher: Callable[[], None]) -> List[Launch]:
    with capture_launches(kernels) as launches:
        launcher()
    return list(launches)


def write_table(rows: List[dict], path: Path, columns: Optional[List[str]] = None) -> Path:
    """Markdown table of ``rows`` to ``path`` (written atomically)."""
    from rellax_fast._io import atomic_write_text

    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
