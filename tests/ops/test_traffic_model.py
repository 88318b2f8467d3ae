"""The memory-traffic model of the Triton CFLoRA backend (#23 section 3), from its real launch arguments.

The launchers (kernels/cflora.py cflora_fwd / cflora_bwd) are called on CPU tensors with every kernel's
``run`` captured (tests/ops/triton_aot.py), so nothing runs and no GPU is needed. Each captured launch reads
and writes the tensors named in READS / WRITES below (pointer arguments, some only under a constexpr
flag); the model counts each such tensor once per launch, i.e. it assumes a tiled kernel reads each operand
from HBM once (grouped tile order, L2 reuse) -- the roofline's assumption. The frozen linear's own traffic
(x, W, b read and y written; dy, W read and dx written) is the base; the rest is the LoRA path's extra.

The minimum extra traffic of fused CFLoRA is one read of x for the shrink, one read of dy for dT and dB
together, and one read of x for dA (2·|x| + |dy|; r-sized tensors are noise): about 0.40 GB at the headline
shape (bf16, M = 16384, d_in = d_out = 4096, r = 16), 94 us at 4.3 TB/s. The Triton backend reads dy once
for dT and dB together (the fused dY pass: its dB partials per 256-row block, 17 MB, are written and read
back by the fixed-order reduction, and counted): 3 big reads, 1.13x the minimum (1.37x before, when dB had
its own pass over dy). The test asserts the issue's goal (<= 1.2x) and pins the measured ratio as a
ceiling, so that no pass can be added back unnoticed.
"""

from __future__ import annotations

import pytest
import torch
import triton_aot as aot

from rellax_fast.ops._backend import triton_interpreting

if triton_interpreting():
    pytest.skip(
        "the model captures compiled-mode launches; it runs in the non-TRITON_INTERPRET pass",
        allow_module_level=True,
    )
pytest.importorskip("triton")

# pointer arguments each kernel reads / writes; (name, flags) pairs count only when every constexpr flag named
# is set (a pointer that a flag leaves unread is a stand-in, often lora_a: counting it would be wrong)
READS = {
    "_cflora_shrink_kernel": ["x_ptr", "a_ptr", ("c_ptr", "SHARED_C")],
    "_cflora_interact_fwd_kernel": ["s_ptr", "c_ptr"],
    "_cflora_fwd_gemm_kernel": ["x_ptr", "w_ptr", ("bias_ptr", "HAS_BIAS"), "t_ptr", "b_ptr"],
    "_cflora_dy_pass_kernel": [
        "dy_ptr",
        ("b_ptr", "NEED_DT"),
        ("t_ptr", "NEED_DB"),
        ("c_ptr", ("EPILOGUE", "SHARED_C", "NEED_DS")),
        ("s_ptr", ("EPILOGUE", "SHARED_C", "NEED_DC")),
    ],
    "_cflora_dt_finish_kernel": [
        "part_ptr",
        ("c_ptr", ("SHARED_C", "NEED_DS")),
        ("s_ptr", ("SHARED_C", "NEED_DC")),
    ],
    "_cflora_partial_sum_kernel": ["part_ptr"],
    "_cflora_interact_bwd_kernel": ["dst_ptr", ("s_ptr", "NEED_DC"), ("c_ptr", "NEED_DS")],
    "_cflora_rank_grad_kernel": ["u_ptr", ("v_ptr", "NEED_OUT")],
    "_cflora_dx_kernel": ["dy_ptr", "w_ptr", "ds_ptr", "a_ptr"],
    "_matmul_kernel": ["a_ptr", "b_ptr"],
    # sm_90+ (aligned tensors): the same GEMMs through TMA descriptors, counted as the tensors they describe
    "_cflora_fwd_gemm_tma_kernel": ["x_desc", "w_desc", ("bias_ptr", "HAS_BIAS"), "t_ptr", "b_ptr"],
    "_cflora_dx_tma_kernel": ["dy_desc", "w_desc", "ds_ptr", "a_ptr"],
}
WRITES = {
    "_cflora_shrink_kernel": ["s_ptr", ("t_ptr", "SHARED_C")],
    "_cflora_interact_fwd_kernel": ["t_ptr"],
    "_cflora_fwd_gemm_kernel": ["y_ptr"],
    "_cflora_dy_pass_kernel": [
        ("dst_ptr", "NEED_DT"),
        ("dc_ptr", ("EPILOGUE", "SHARED_C", "NEED_DC")),
        ("db_part_ptr", "NEED_DB"),
        ("dbias_part_ptr", "NEED_DBIAS"),
    ],
    "_cflora_dt_finish_kernel": ["dst_ptr", ("dc_ptr", ("SHARED_C", "NEED_DC"))],
    "_cflora_partial_sum_kernel": ["out_ptr"],
    "_cflora_interact_bwd_kernel": [("dst_ptr", "NEED_DS"), ("dc_ptr", "NEED_DC")],
    "_cflora_rank_grad_kernel": [("out_ptr", "NEED_OUT"), ("colsum_ptr", "NEED_COLSUM")],
    "_cflora_dx_kernel": ["dx_ptr"],
    "_matmul_kernel": ["c_ptr"],
    "_cflora_fwd_gemm_tma_kernel": ["y_desc"],
    "_cflora_dx_tma_kernel": ["dx_desc"],
}
BASE_GEMMS = {
    "_cflora_fwd_gemm_kernel",
    "_cflora_dx_kernel",
    "_cflora_fwd_gemm_tma_kernel",
    "_cflora_dx_tma_kernel",
}
GOAL = 1.2  # the target: modelled extra traffic <= 1.2x the minimum
# the measured structure (3 big reads, plus r-sized tensors and the dB / dT / dA partials: 1.134x), with
# room for rounding only: a bound on regressions, below the goal
TRITON_CEILING = 1.14


def _nbytes(t) -> int:
    """Bytes of a tensor, or of the tensor a TMA descriptor describes (its base); 0 for scalars."""
    t = getattr(t, "base", t)  # triton.tools.tensor_descriptor.TensorDescriptor
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _pointers(launch, spec):
    bound = dict(zip(launch.fn.arg_names, launch.args), **launch.kwargs)
    for item in spec:
        name, flags = (item, ()) if isinstance(item, str) else item
        if all(bound.get(flag) for flag in ((flags,) if isinstance(flags, str) else flags)):
            yield name, bound[name]


def kernel_traffic(launches):
    """[(kernel, bytes read, bytes written)] per captured launch."""
    out = []
    for launch in launches:
        read = sum(_nbytes(t) for _, t in _pointers(launch, READS[launch.name]))
        written = sum(_nbytes(t) for _, t in _pointers(launch, WRITES[launch.name]))
        out.append((launch.name, read, written))
    return out


def headline_model(dropout_p=0.0, m=16384, d=4096, r=16, samples=16, dtype=torch.bfloat16, capability=90):
    """(per-kernel traffic, base bytes, extra bytes, minimum extra bytes) of one forward+backward with W and b
    frozen (the LoRA training pattern) and a per-sample C, as launched on a GPU of ``capability`` (90: the
    TMA GEMMs; 80: the pointer GEMMs)."""
    from test_triton_compile_gate import LORA_GRADS, _cflora_kernels, cflora_capability

    from rellax_fast.kernels import cflora as k

    e = torch.empty
    x, w, b, gy = e(m, d, dtype=dtype), e(d, d, dtype=dtype), e(d, dtype=dtype), e(m, d, dtype=dtype)
    a, lb, c = e(r, d, dtype=dtype), e(d, r, dtype=dtype), e(samples, r, r, dtype=dtype)
    s, t = e(m, r, dtype=dtype), e(m, r, dtype=dtype)
    seed = 7 if dropout_p else None

    def run():
        k.cflora_fwd(x, w, b, a, lb, c, m // samples, 2.0, dropout_p, seed)
        k.cflora_bwd(gy, x, w, a, lb, c, s, t, m // samples, 2.0, dropout_p, seed, list(LORA_GRADS))

    with cflora_capability(capability):
        traffic = kernel_traffic(aot.capture(_cflora_kernels(k), run))
    base = 3 * _nbytes(x) + 2 * _nbytes(w) + _nbytes(b) + _nbytes(gy)  # x, W, b -> y; dy, W -> dx
    total = sum(rd + wr for _, rd, wr in traffic)
    return traffic, base, total - base, 2 * _nbytes(x) + _nbytes(gy)


def _big_passes(traffic):
    """The LoRA-only launches that stream a big operand (x or dy): shrink (x), the dY pass, dA (x), and dB
    when it has a pass of its own (a launch that reads u = dy, i.e. rank_grad without dropout's x)."""
    big = 16384 * 4096 * 2  # one read of x or dy at the headline shape
    return [n for n, rd, _ in traffic if rd >= big and n not in BASE_GEMMS]


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_triton_traffic_at_the_headline_shape(dropout_p):
    traffic, base, extra, minimum = headline_model(dropout_p)
    big = 16384 * 4096 * 2  # one read of x or dy
    assert minimum == 3 * big  # 0.40 GB
    passes = _big_passes(traffic)
    assert sorted(passes) == ["_cflora_dy_pass_kernel", "_cflora_rank_grad_kernel", "_cflora_shrink_kernel"]
    ratio = extra / minimum
    print(
        f"\ntriton, p={dropout_p}: extra {extra / 1e9:.3f} GB vs minimum {minimum / 1e9:.3f} GB: {ratio:.3f}x "
        f"(goal {GOAL}x); base {base / 1e9:.3f} GB; per kernel (read, written MB): "
        + ", ".join(
            f"{n.strip('_').removesuffix('_kernel')} {rd / 1e6:.0f}/{wr / 1e6:.0f}" for n, rd, wr in traffic
        )
    )
    assert 3 * big <= extra <= TRITON_CEILING * minimum, (extra, minimum)
    assert ratio <= GOAL


def test_tma_gemms_move_the_bytes_of_the_pointer_gemms():
    """sm_90 launches the TMA GEMMs, sm_80 the pointer ones: the same tensors, the same bytes per kernel (TMA
    changes how tiles reach shared memory, not what is read); descriptors are counted as their tensors."""
    sm90, base90, extra90, _ = headline_model(capability=90)
    sm80, base80, extra80, _ = headline_model(capability=80)
    names90, names80 = [n for n, *_ in sm90], [n for n, *_ in sm80]
    assert "_cflora_fwd_gemm_tma_kernel" in names90 and "_cflora_dx_tma_kernel" in names90, names90
    assert not BASE_GEMMS.intersection(names80) - {"_cflora_fwd_gemm_kernel", "_cflora_dx_kernel"}, names80
    assert [(rd, wr) for _, rd, wr in sm90] == [(rd, wr) for _, rd, wr in sm80]
    assert (base90, extra90) == (base80, extra80)


def test_model_counts_an_added_pass():
    """The model is structural: one more launch that reads dy moves the ratio by |dy| / minimum (+0.33x)."""
    traffic, base, extra, minimum = headline_model()
    dy_pass = next(t for t in traffic if t[0] == "_cflora_dy_pass_kernel")
    assert (extra + dy_pass[1]) / minimum > GOAL


def test_dB_back_in_its_own_pass_fails_the_goal(monkeypatch):
    """With the fusion of dB into the dY pass turned off (the structure before #23's change: dB by the
    split-K rank_grad kernel, a second read of dy), the model sees 4 big passes and misses the goal."""
    from rellax_fast.kernels import cflora as k

    monkeypatch.setattr(k, "_fuse_db", lambda *a: False)
    traffic, _, extra, minimum = headline_model()
    assert len(_big_passes(traffic)) == 4
    assert extra / minimum > GOAL


@pytest.mark.parametrize("r", [16, 32, 64, 128])
def test_fusion_rule_picks_the_cheaper_structure(monkeypatch, r):
    """_fuse_db fuses dB into the dY pass exactly when the model says that is cheaper, or keeps dB apart
    where the fused tile would not fit its registers (16-bit: BLOCK_R > 32; the compile gate). At r >= 64
    the per-row-block partials (8·r bytes per row block and column) cost more than a second read of dy."""
    from rellax_fast.kernels import cflora as k

    real = k._fuse_db
    chosen = real(16384, 4096, r, 256, max(16, r), 2)
    extras = {}
    for forced in (True, False):
        monkeypatch.setattr(k, "_fuse_db", lambda *a, _f=forced: _f)
        extras[forced] = headline_model(r=r)[2]
    assert chosen == (r <= 32)
    if r <= 32:
        assert extras[True] < extras[False]
    else:
        assert extras[True] > extras[False]
