"""Builds only the compiled extension ``rellax_fast._C``; everything else is in pyproject.toml.

Environment flags (see DESIGN.md):
  RELLAX_BUILD_EXT=auto|0|1   0: pure-Python install (no _C). 1: the build must succeed. auto: same as 1
                              (a failed build fails the install; set RELLAX_BUILD_EXT=0 to skip it).
  RELLAX_BUILD_CUDA=auto|0|1  auto: build the .cu sources when torch is a CUDA build and nvcc is found.
  TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured by torch.utils.cpp_extension.
Install with ``pip install --no-build-isolation .`` so _C is built against the torch in the environment.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"error: {name} must be auto, 0 or 1; got {value!r}")
    return value


def _nvcc_found() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


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
    torch_has_cuda = torch.version.cuda is not None
    if cuda_flag == "1" and not (torch_has_cuda and _nvcc_found()):
        sys.exit(
            "error: RELLAX_BUILD_CUDA=1 but "
            + ("torch is a CPU build" if not torch_has_cuda else "nvcc was not found (set CUDA_HOME)")
        )
    with_cuda = cuda_flag == "1" or (cuda_flag == "auto" and torch_has_cuda and _nvcc_found())

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    cxx_flags = ["-O3", "-fopenmp"]
    extra_link = ["-fopenmp"]
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        define_macros.append(("RELLAX_WITH_CUDA", "1"))
        define_macros.append(("RELLAX_CUDA_ARCHS", f'"{arch_list or "default"}"'))
        ext_cls = CUDAExtension
        extra_compile_args = {
            "cxx": cxx_flags,
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        }
    else:
        ext_cls = CppExtension
        extra_compile_args = {"cxx": cxx_flags}
    print(
        f"rellax-fast: building rellax_fast._C with {'CUDA (' + (arch_list or 'default archs') + ')' if with_cuda else 'CPU kernels only'}"
        f" against torch {torch.__version__}"
    )

    class RellaxBuildExt(BuildExtension):
        """BuildExtension that turns a compiler failure into an error naming RELLAX_BUILD_EXT=0."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                raise SystemExit(
                    f"error: building rellax_fast._C failed ({type(exc).__name__}: {exc}).\n"
                    "Fix the compiler setup, or set RELLAX_BUILD_EXT=0 for a pure-Python install "
                    "(reference and Triton backends only)."
                ) from exc

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


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
