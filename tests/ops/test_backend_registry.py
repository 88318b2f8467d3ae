"""The op backend registry (rellax_fast.ops._backend): one implementation table per op, capability checks,
automatic choice and forcing, the extension hooks each op module registers at import, and the backend names
that every command line and API takes from BACKENDS.

Registrations go into test-local copies of the tables (monkeypatch), so nothing leaks into other tests.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from rellax_fast.ops import _backend, _registry, all_ops
from rellax_fast.ops._backend import BACKEND_CHOICES, BACKENDS, BackendUnavailableError

CPU = torch.device("cpu")


@pytest.fixture
def tables(monkeypatch):
    """Test-local copies of the op tables, plus a fifth backend "fake" whose environment check passes on CPU."""
    all_ops()  # every real op registered before copying
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(
        _backend,
        "_OPS",
        {op: {d: list(o) for d, o in orders.items()} for op, orders in _backend._OPS.items()},
    )
    monkeypatch.setattr(_backend, "_IMPLS", {op: dict(rows) for op, rows in _backend._IMPLS.items()})
    monkeypatch.setattr(_backend, "BACKENDS", (*BACKENDS, "fake"))
    checks = dict(_backend._CHECKS)
    checks["fake"] = lambda device_type: None if device_type in (None, "cpu") else "fake runs on CPU only"
    monkeypatch.setattr(_backend, "_CHECKS", checks)
    return _backend


def _toy_op(b, supports=None):
    """A toy op: auto order on CPU fake > reference; each implementation returns its name and its argument."""
    b.register_op("toy", {"cpu": ["fake", "reference"]})
    b.register_impl("toy", "reference", lambda v: ("reference", v))
    b.register_impl("toy", "fake", lambda v: ("fake", v), supports=supports)


def test_a_registered_backend_is_chosen_and_dispatched(tables):
    _toy_op(tables)
    assert tables.implemented("toy") == ("reference", "fake")
    assert tables.auto_order("toy", "cpu") == ["fake", "reference"]
    assert tables.auto_order("toy", "cuda") == ["reference"]  # a device type the op did not name
    which = tables.resolve("toy", CPU)
    assert which == "fake"
    v = torch.randn(3)
    name, got = tables.impl("toy", which)(v)
    assert name == "fake" and got is v
    assert tables.resolve("toy", CPU, "reference") == "reference"
    assert (
        tables.resolve("toy", torch.device("cuda")) == "reference"
    )  # no CUDA tensor is made: a device object
    assert tables.why_unavailable("fake", "cuda", "toy") == "fake runs on CPU only"
    assert tables.why_unavailable("cpp", "cpu", "toy") == "toy has no cpp implementation"
    with pytest.raises(BackendUnavailableError, match="toy: backend='cpp' is unavailable: toy has no cpp"):
        tables.resolve("toy", CPU, "cpp")
    assert "toy" in tables.registered_ops()


def test_register_impl_rejects_bad_arguments(tables):
    with pytest.raises(ValueError, match=r"register_impl\('toy'\): backend must be one of .*; got 'gpu'"):
        tables.register_impl("toy", "gpu", lambda: None)
    with pytest.raises(TypeError, match="fn must be callable; got int"):
        tables.register_impl("toy", "fake", 3)
    with pytest.raises(TypeError, match="supports must be callable or None; got str"):
        tables.register_impl("toy", "fake", lambda: None, supports="small only")
    with pytest.raises(ValueError, match=r"register_op\('toy'\): backend must be one of"):
        tables.register_op("toy", {"cpu": ["gpu"]})
    with pytest.raises(BackendUnavailableError, match="toy has no triton implementation"):
        tables.impl("toy", "triton")


def test_supports_refusal_is_explained_skipped_by_auto_and_raised_when_forced(tables, monkeypatch):
    def small_only(v, **_call):
        return None if v.numel() <= 4 else f"fake takes at most 4 elements; got {v.numel()}"

    _toy_op(tables, supports=small_only)
    small, big = torch.randn(4), torch.randn(5)
    # why_unavailable / availability explain the capability reason once they see the call
    assert tables.why_unavailable("fake", "cpu", "toy", v=small) is None
    assert tables.why_unavailable("fake", "cpu", "toy", v=big) == "fake takes at most 4 elements; got 5"
    assert tables.why_unavailable("fake", "cpu", "toy") is None  # without a call: the environment only
    assert tables.availability("toy", "cpu", v=big)["fake"] == "fake takes at most 4 elements; got 5"
    # automatic choice skips a refusing candidate, and takes it when it accepts
    assert tables.resolve("toy", CPU, v=small) == "fake"
    assert tables.resolve("toy", CPU, v=big) == "reference"
    # forcing a refusing backend raises with the op, the backend and the reason; it never falls back
    with pytest.raises(
        BackendUnavailableError,
        match=r"^toy: backend='fake' cannot run this call: fake takes at most 4 elements; got 5$",
    ):
        tables.resolve("toy", CPU, "fake", v=big)
    monkeypatch.setenv(_backend.ENV_VAR, "fake")
    with pytest.raises(
        BackendUnavailableError, match="toy: RELLAX_BACKEND=fake cannot run this call: fake takes"
    ):
        tables.resolve("toy", CPU, v=big)
    assert tables.resolve("toy", CPU, v=small) == "fake"


def test_no_candidate_left_raises_with_every_reason(tables):
    tables.register_op("picky", {"cpu": ["fake"]})
    tables.register_impl("picky", "fake", lambda v: v, supports=lambda v: "never")
    assert tables.availability("picky", "cpu", v=1)["reference"] == "picky has no reference implementation"
    with pytest.raises(
        BackendUnavailableError, match=r"picky: no backend can run this call on cpu tensors \(fake: never\)"
    ):
        tables.resolve("picky", CPU, v=1)


def test_every_op_dispatches_through_its_table(tables):
    """Replacing an op's reference row changes what the public op runs, with the arguments the table defines."""
    seen = {}

    def fake_dropout(x, p, seed):
        seen["dropout"] = (x, p, seed)
        return torch.full_like(x, 7.0)

    def fake_cflora(x, weight, bias, lora_a, lora_b, interaction, rows_per_sample, scale, dropout_p, seed):
        seen["cflora"] = (rows_per_sample, scale, dropout_p, seed)
        return x.new_full((*x.shape[:-1], weight.shape[0]), 5.0)

    def fake_topk(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, normalize, max_pos):
        seen["topk"] = (k, normalize, max_pos)
        n = sample_user.shape[0]
        return torch.zeros(n, k, dtype=torch.int64), torch.zeros(n, k)

    tables.register_impl("seeded_dropout", "reference", fake_dropout)
    tables.register_impl("cflora_linear", "reference", fake_cflora)
    tables.register_impl("semantic_topk", "reference", fake_topk)
    from rellax_fast.ops import cflora_linear, seeded_dropout, semantic_topk

    x = torch.randn(3, 5)
    assert torch.equal(seeded_dropout(x, 0.25, 11, backend="reference"), torch.full_like(x, 7.0))
    assert seen["dropout"] == (x, 0.25, 11)

    b, t, d_in, d_out, r = 2, 3, 6, 4, 2
    y = cflora_linear(
        torch.randn(b, t, d_in),
        torch.randn(d_out, d_in),
        None,
        torch.randn(r, d_in),
        torch.randn(d_out, r),
        torch.randn(b, r, r),
        scale=0.5,
        dropout_p=0.1,
        seed=9,
        backend="reference",
    )
    assert y.shape == (b, t, d_out) and bool((y == 5.0).all())
    assert seen["cflora"] == (t, 0.5, 0.1, 9)  # per-sample C: t rows share one C[b]

    emb = torch.randn(5, 3)
    items, offsets = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 4])
    pos, _ = semantic_topk(
        emb, items, offsets, torch.tensor([0, 0]), torch.tensor([1, 3]), 2, metric="dot", backend="reference"
    )
    assert pos.shape == (2, 2) and seen["topk"] == (2, False, 3)


def test_cflora_triton_capability_check(monkeypatch):
    """The triton row of cflora_linear refuses ranks above the kernel's limit and float64, with the reason."""
    from rellax_fast._kernel_common import CFLORA_TRITON_MAX_RANK
    from rellax_fast.ops.cflora import cflora_linear

    if _backend.why_unavailable("triton", "cuda") is not None:
        pytest.skip(f"triton: {_backend.why_unavailable('triton', 'cuda')}")
    big_r = CFLORA_TRITON_MAX_RANK + 1
    x32, a_big, a_ok = torch.randn(2, 4), torch.randn(big_r, 4), torch.randn(3, 4)
    reason = _backend.why_unavailable("triton", "cuda", "cflora_linear", x=x32, lora_a=a_big)
    assert reason == f"rank r={big_r} exceeds the triton kernel's limit of {CFLORA_TRITON_MAX_RANK}"
    reason = _backend.why_unavailable("triton", "cuda", "cflora_linear", x=x32.double(), lora_a=a_ok.double())
    assert "float64" in reason and "bfloat16" in reason
    assert _backend.why_unavailable("triton", "cuda", "cflora_linear", x=x32, lora_a=a_ok) is None
    assert _backend.why_unavailable("reference", "cuda", "cflora_linear", x=x32, lora_a=a_big) is None
    # CPU tensors under the interpreter: a forced triton with too large a rank raises before any kernel runs
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    w, lb = torch.randn(3, 4), torch.randn(3, big_r)
    with pytest.raises(
        BackendUnavailableError,
        match=rf"cflora_linear: backend='triton' cannot run this call: rank r={big_r} exceeds",
    ):
        cflora_linear(x32, w, None, a_big, lb, backend="triton")


def test_auto_choice_skips_a_refusing_real_backend(tables, monkeypatch):
    """With triton first in cflora_linear's CPU order (under the interpreter), auto takes it for a small rank
    and skips it for a rank above the kernel's limit, without running anything."""
    from rellax_fast._kernel_common import CFLORA_TRITON_MAX_RANK

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if tables.why_unavailable("triton", "cpu") is not None:
        pytest.skip(f"triton: {tables.why_unavailable('triton', 'cpu')}")
    tables.register_op("cflora_linear", {"cpu": ["triton", "reference"]})
    x = torch.randn(2, 4)
    assert tables.resolve("cflora_linear", CPU, x=x, lora_a=torch.randn(8, 4)) == "triton"
    assert (
        tables.resolve("cflora_linear", CPU, x=x, lora_a=torch.randn(CFLORA_TRITON_MAX_RANK + 1, 4))
        == "reference"
    )
    assert (
        tables.resolve("cflora_linear", CPU, x=x.double(), lora_a=torch.randn(8, 4).double()) == "reference"
    )


def test_op_modules_register_their_extension_hooks_at_import():
    from rellax_fast.ops import cflora, dropout, topk

    for mod in (cflora, dropout, topk):
        assert mod._register_ext in _registry._hooks, mod.__name__


def test_extension_hooks_run_once_after_the_load_and_at_once_after_it(monkeypatch):
    monkeypatch.setattr(_registry, "_hooks", [])
    monkeypatch.setattr(_registry, "_registered", False)
    loads = []
    monkeypatch.setattr(_registry._ext, "require", lambda: loads.append(1))
    calls = []
    first = lambda: calls.append("first")  # noqa: E731
    _registry.register_ext_hook(first)
    _registry.register_ext_hook(first)  # the same hook twice is kept once
    assert calls == []  # registering loads nothing and runs nothing
    _registry.ensure_ext_registered()
    _registry.ensure_ext_registered()
    assert calls == ["first"] and len(loads) == 2
    _registry.register_ext_hook(lambda: calls.append("late"))  # a module imported after the load
    assert calls == ["first", "late"]


def _backend_actions(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _backend_actions(sub, (*path, name))
        elif "backend" in action.dest and action.choices is not None:
            yield " ".join(path) + " " + action.option_strings[0], list(action.choices)


def test_cli_backend_choices_are_BACKENDS():
    from rellax_fast.cli import build_parser

    found = dict(_backend_actions(build_parser()))
    assert "retrieve --backend" in found, sorted(found)
    for where, choices in found.items():
        assert choices == list(BACKENDS), where


def test_api_backend_choices_are_BACKEND_CHOICES():
    from rellax_fast.cflora import config

    assert BACKEND_CHOICES == (None, "auto", *BACKENDS)
    assert tuple(config.BACKEND_CHOICES) == BACKEND_CHOICES


def test_sanitizer_smoke_choices_and_skips(capsys):
    import importlib.util

    from rellax_testing import REPO

    spec = importlib.util.spec_from_file_location("sanitizer_smoke", REPO / "scripts" / "sanitizer_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    with pytest.raises(SystemExit):
        smoke.main(["--help"])
    assert "{" + ",".join(b for b in BACKENDS if b != "reference") + "}" in capsys.readouterr().out
    ran = []

    def never(dev, backend):
        raise AssertionError("an op without the backend must be skipped")

    smoke.CASES = [
        ("seeded_dropout", lambda dev, backend: ran.append((dev.type, backend))),
        ("no_such_op", never),
    ]
    assert smoke.main(["--backend", "cpp"]) == 0
    out = capsys.readouterr().out
    assert ran == [("cpu", "cpp")]
    assert "no_such_op: skipped (no cpp implementation)" in out and "1/1 cases passed" in out


def test_backend_names_import_no_torch():
    code = "import sys, rellax_fast.ops._backend as b; print(b.BACKENDS, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{BACKENDS} False"
