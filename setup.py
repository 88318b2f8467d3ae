"""Builds only the compiled extension ``rellax_fast._C``; everything else is in pyproject.toml.

Environment flags (docs/architecture.md, "Build flags"):
  RELLAX_BUILD_EXT=auto|0|1   0: pure-Python install (no _C). 1: the build must succeed. auto: same as 1
                              (a failed build fails the install; set RELLAX_BUILD_EXT=0 to skip it).
  RELLAX_BUILD_CUDA=auto|0|1  auto: build the .cu sources when torch is a CUDA build and nvcc is found.
  TORCH_CUDA_ARCH_LIST        the GPU architectures to compile for. Unset (or "native") with no GPU visible:
                              DEFAULT_CUDA_ARCHS below, with a warning. Unset with GPUs visible: theirs.
  MAX_JOBS                    parallel compile jobs (torch.utils.cpp_extension).
  RELLAX_BUILD_DEBUG=0|1      1 keeps debug info (-g, no strip) for gdb; the default builds without it.
Install with ``pip install --no-build-isolation .`` so _C is built against the torch in the environment.
The build writes ``_C_build.json`` beside the library (the torch it was built against); rellax_fast/_ext.py
refuses to load _C into any other torch.
"""

import glob
import json
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Used when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a wheel built on a GPU-less host, or pip's
# isolated build). sm_75 (T4), sm_80 (A100; its binaries also run on sm_86 / sm_89: A10, RTX 30xx/40xx, L4,
# L40), sm_90 (H100/H200), and PTX of compute_90 that the driver compiles for newer GPUs (Blackwell). Every
# nvcc since CUDA 11.8 accepts all four, CUDA 13 included (its oldest target is sm_75).
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"
BUILD_RECORD = "_C_build.json"


def _flag(name: str, choices=("auto", "0", "1"), default: str = "auto") -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        sys.exit(f"error: {name} must be {', '.join(choices[:-1])} or {choices[-1]}; got {value!r}")
    return value


def _nvcc_found() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def cuda_arch_list(env_value, visible_capabilities, torch_archs=()):
    """(TORCH_CUDA_ARCH_LIST to build with, where it came from, warning or None).

    ``visible_capabilities``: (major, minor) of each visible GPU. ``torch_archs``: torch's own
    ``sm_XY`` targets, used as torch does to cap a GPU newer than the toolkit.
    """
    value = (env_value or "").strip()
    if value and value != "native":
        return value, "TORCH_CUDA_ARCH_LIST", None
    if visible_capabilities:
        supported = [
            (int(a[3:-1]), int(a[-1])) for a in torch_archs if a.startswith("sm_") and a[3:].isdigit()
        ]
        cap = max(supported) if supported else None
        archs = sorted({min(c, cap) if cap else tuple(c) for c in visible_capabilities})
        arch_str = ";".join(f"{a}.{b}" for a, b in archs) + "+PTX"
        return arch_str, "the visible GPUs", None
    warning = (
        f"rellax-fast: warning: TORCH_CUDA_ARCH_LIST is {'native' if value else 'unset'} and no GPU is visible; "
        f"compiling the CUDA kernels for the default {DEFAULT_CUDA_ARCHS} (T4, A100 and the other sm_8x cards, "
        'H100/H200, newer GPUs through PTX). Set TORCH_CUDA_ARCH_LIST (e.g. "9.0") to choose, or '
        "RELLAX_BUILD_CUDA=0 to build the CPU kernels only."
    )
    return DEFAULT_CUDA_ARCHS, "the default (no GPU visible)", warning


def build_record(torch_module, with_cuda: bool, arch_list: str) -> dict:
    """What _C was built against; rellax_fast/_ext.py compares it with the running torch before loading."""
    return {
        "torch": torch_module.__version__,
        "torch_cuda": torch_module.version.cuda,
        "cxx11_abi": bool(torch_module._C._GLIBCXX_USE_CXX11_ABI),
        "with_cuda": bool(with_cuda),
        "cuda_archs": arch_list if with_cuda else "",
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    }


def _extensions_and_cmdclass():
    build_ext_flag = _flag("RELLAX_BUILD_EXT")
    if build_ext_flag == "0":
        print("rellax-fast: RELLAX_BUILD_EXT=0, pure-Python install without rellax_fast._C")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - depends on the environment
        sys.exit(
            "error: building rellax_fast._C needs torch in the build environment "
            f"({exc}). Install torch first and use `pip install --no-build-isolation .`, "
            "or set RELLAX_BUILD_EXT=0 for a pure-Python install."
        )

    cuda_flag = _flag("RELLAX_BUILD_CUDA")
    debug = _flag("RELLAX_BUILD_DEBUG", ("0", "1"), "0") == "1"
    torch_has_cuda = torch.version.cuda is not None
    if cuda_flag == "1" and not (torch_has_cuda and _nvcc_found()):
        sys.exit(
            "error: RELLAX_BUILD_CUDA=1 but "
            + ("torch is a CPU build" if not torch_has_cuda else "nvcc was not found (set CUDA_HOME)")
        )
    with_cuda = cuda_flag == "1" or (cuda_flag == "auto" and torch_has_cuda and _nvcc_found())

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    # Python's own CFLAGS carry -g, which made a 26 MB library of 0.35 MB code: -g0 (after them, so it wins)
    # and a stripped link, unless RELLAX_BUILD_DEBUG=1.
    debug_flags = ["-g"] if debug else ["-g0"]
    cxx_flags = ["-O3", "-fopenmp", *debug_flags]
    extra_link = ["-fopenmp"] + ([] if debug else ["-Wl,--strip-debug"])
    arch_list = ""
    if with_cuda:
        visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        arch_list, arch_source, warning = cuda_arch_list(
            os.environ.get("TORCH_CUDA_ARCH_LIST"), visible, torch.cuda.get_arch_list() if visible else ()
        )
        if warning:
            print(warning, file=sys.stderr)
        # torch.utils.cpp_extension reads the variable; with no GPU and no value it would fail with an
        # IndexError that names nothing.
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        define_macros.append(("RELLAX_WITH_CUDA", "1"))
        define_macros.append(("RELLAX_CUDA_ARCHS", f'"{arch_list}"'))
        ext_cls = CUDAExtension
        extra_compile_args = {
            "cxx": cxx_flags,
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
            + (["-g"] if debug else []),
        }
    else:
        ext_cls = CppExtension
        extra_compile_args = {"cxx": cxx_flags}
    what = f"CUDA ({arch_list}, from {arch_source})" if with_cuda else "CPU kernels only"
    print(
        f"rellax-fast: building rellax_fast._C with {what} against torch {torch.__version__}"
        + (" (debug info kept)" if debug else "")
    )
    record = build_record(torch, with_cuda, arch_list)

    class RellaxBuildExt(BuildExtension):
        """BuildExtension that records the torch it built against and names RELLAX_BUILD_EXT=0 on failure."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                raise SystemExit(
                    f"error: building rellax_fast._C failed ({type(exc).__name__}: {exc}).\n"
                    "Fix the compiler setup, or set RELLAX_BUILD_EXT=0 for a pure-Python install "
                    "(reference and Triton backends only)."
                ) from exc
            for path in self._record_paths():
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "w") as f:
                    json.dump(record, f, indent=1, sort_keys=True)
                os.replace(path + ".tmp", path)

        def _record_paths(self):
            # beside the library: in build_lib (wheels) and, for --inplace / editable builds, in the source tree
            paths = {
                os.path.join(os.path.dirname(self.get_ext_fullpath(e.name)), BUILD_RECORD)
                for e in self.extensions
            }
            paths.add(os.path.join(self.build_lib, "rellax_fast", BUILD_RECORD))
            return sorted(paths)

        def get_outputs(self):
            return super().get_outputs() + [os.path.join(self.build_lib, "rellax_fast", BUILD_RECORD)]

    ext = ext_cls(
        name="rellax_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link,
    )
    use_ninja = shutil.which("ninja") is not None
    return [ext], {"build_ext": RellaxBuildExt.with_options(use_ninja=use_ninja)}


if __name__ == "__main__":  # pip, `python setup.py ...` and setuptools.build_meta all run it as __main__
    ext_modules, cmdclass = _extensions_and_cmdclass()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
