"""A hung test must fail the run quickly and say where it hung, not run into CI's 90-minute limit (a one-rank
gloo test once did): pytest-timeout is installed, configured from pyproject.toml, and kills a hang."""

import subprocess
import sys
import textwrap
import time


def test_the_suite_runs_under_a_per_test_timeout(pytestconfig):
    assert pytestconfig.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed (make install)"
    assert 60 <= float(pytestconfig.getini("timeout")) <= 900
    # "thread", not "signal": a hang inside C++ (gloo, a store) never returns to a Python signal handler
    assert pytestconfig.getini("timeout_method") == "thread"


def test_a_hanging_test_is_stopped_with_its_stack(tmp_path):
    (tmp_path / "test_hang.py").write_text(
        textwrap.dedent(
            """
            import time

            def test_hangs():
                time.sleep(120)
            """
        )
    )
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=2",
         "-o", "timeout_method=thread", "test_hang.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert time.monotonic() - start < 60, out
    assert "Timeout" in out and "test_hang.py" in out and "time.sleep(120)" in out, out
