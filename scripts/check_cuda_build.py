"""Proves a CUDA build of rellax_fast._C links and registers CUDA kernels, without a GPU.

Usage: python scripts/check_cuda_build.py BUILD_LIB_DIR
Loads BUILD_LIB_DIR/rellax_fast/_C*.so into the CUDA torch of this interpreter, lists every
rellax_fast:: operator with the dispatch keys it has kernels for, fails if the build reports no CUDA
or if no operator has a CUDA kernel, and lists the SASS targets embedded in the library (cuobjdump).
"""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import torch


def main(lib_dir: str) -> int:
    paths = glob.glob(os.path.join(lib_dir, "rellax_fast", "_C*.so"))
    if not paths:
        print(f"cuda-check: no rellax_fast/_C*.so under {lib_dir}", file=sys.stderr)
        return 1
    spec = importlib.util.spec_from_file_location("rellax_fast._C", paths[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    print(f"cuda-check: loaded {paths[0]} into torch {torch.__version__} (CUDA {torch.version.cuda})")
    if not mod.with_cuda():
        print("cuda-check: the library was built without CUDA", file=sys.stderr)
        return 1
    print(f"cuda-check: archs {mod.cuda_archs()}")
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rellax_fast::"))
    with_cuda = []
    for op in ops:
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(op, k)]
        print(f"  {op:<40} kernels: {', '.join(keys) or 'none'}")
        if "CUDA" in keys:
            with_cuda.append(op)
    if not with_cuda:
        print("cuda-check: no operator has a CUDA kernel", file=sys.stderr)
        return 1
    cuobjdump = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if os.path.exists(cuobjdump):
        out = subprocess.run([cuobjdump, "--list-elf", paths[0]], capture_output=True, text=True).stdout
        archs = sorted({line.split(".")[-2] for line in out.splitlines() if ".sm_" in line})
        print(f"cuda-check: SASS in the library: {', '.join(archs) or 'none listed'}")
    else:
        print("cuda-check: cuobjdump not found; SASS targets not listed (the build used TORCH_CUDA_ARCH_LIST)")
    print(f"cuda-check: OK, {len(with_cuda)} of {len(ops)} operators have CUDA kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/cuda-check/lib"))
