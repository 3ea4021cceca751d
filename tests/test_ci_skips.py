"""CI's rule: a test that CI is meant to run fails instead of skipping (XMODAL_REQUIRE_ALL=1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ALLOWED_SKIPS, DEFER_SKIPS_ENV, DEFERRED_SKIPS, REQUIRE_ALL_ENV

SAMPLE = """
import pytest

def test_missing_binary():
    pytest.skip("needs /usr/bin/nothing (apt-get install nothing)")

@pytest.mark.skipif(True, reason="dataset-nothing not installed")
def test_missing_dataset():
    pass

def test_cpu_capability():
    pytest.skip("CPU without AVX512-BF16/AMX: precision auto trains in fp32 here")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False

def test_runs():
    assert True
"""
MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_package_xmodal")\n'
OPEN_CLIP_SAMPLE = """
import pytest

def test_needs_open_clip():
    pytest.skip("open_clip does not import here (No module named 'torchvision')")

def test_runs():
    assert True
"""
OPEN_CLIP_MODULE_SKIP = 'import pytest\npytest.importorskip("open_clip_xmodal_missing")\n'


def run_pytest(
    tmp_path: Path, require: bool, defer_to: Path | None = None, samples: dict | None = None
) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    if samples is None:
        samples = {"test_sample.py": SAMPLE, "test_module_skip.py": MODULE_SKIP}
    for name, text in samples.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in (REQUIRE_ALL_ENV, DEFER_SKIPS_ENV)}
    if require:
        env[REQUIRE_ALL_ENV] = "1"
    if defer_to is not None:
        env[DEFER_SKIPS_ENV] = str(defer_to)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    cmd += ["--continue-on-collection-errors", str(tmp_path)]  # to see every test's outcome
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_skips_fail_under_require_all_except_allowed_reasons(tmp_path) -> None:
    proc = run_pytest(tmp_path, require=True)
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 2 errors" in out, out
    assert f"{REQUIRE_ALL_ENV}=1 requires it to run" in out
    assert "needs /usr/bin/nothing" in out and "dataset-nothing not installed" in out
    assert "no_such_package_xmodal" in out  # a module-level import skip: a collection error
    assert "SKIPPED" in out and "CPU without AVX512-BF16" in out  # allowed, reason printed


def test_without_require_all_they_are_plain_skips_with_reasons(tmp_path) -> None:
    proc = run_pytest(tmp_path, require=False)
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "1 passed, 4 skipped, 1 xfailed" in out, out
    assert out.count("SKIPPED") == 4


def test_allowed_reasons_are_capabilities_only() -> None:
    assert len(ALLOWED_SKIPS) == 2
    text = " ".join(ALLOWED_SKIPS)
    for needed_in_ci in ("chromium", "fashion", "npm", "compiler", "open_clip"):
        assert needed_in_ci not in text.lower()
    assert DEFERRED_SKIPS == (r"open_clip",)


OPEN_CLIP_SAMPLES = {"test_oc.py": OPEN_CLIP_SAMPLE, "test_oc_module.py": OPEN_CLIP_MODULE_SKIP}


def test_open_clip_skips_fail_unless_deferred_to_the_second_environment(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    proc = run_pytest(run, require=True, samples=OPEN_CLIP_SAMPLES)
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed, 1 error" in proc.stdout, proc.stdout
    # .ci/run names a file: the main run passes and lists what the second environment runs
    deferred = tmp_path / "deferred.txt"
    proc = run_pytest(run, require=True, defer_to=deferred, samples=OPEN_CLIP_SAMPLES)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 2 skipped" in proc.stdout, proc.stdout
    ids = deferred.read_text(encoding="utf-8").splitlines()
    assert sorted(ids) == ["test_oc.py::test_needs_open_clip", "test_oc_module.py"]
    # those ids run as they are (here still without open_clip: under the rule they fail)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids]
    env = {k: v for k, v in os.environ.items() if k != DEFER_SKIPS_ENV}
    env[REQUIRE_ALL_ENV] = "1"
    proc = subprocess.run(cmd, cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"{REQUIRE_ALL_ENV}=1 requires it to run" in proc.stdout


def test_other_skips_are_not_deferred(tmp_path) -> None:
    deferred = tmp_path / "deferred.txt"
    run = tmp_path / "run"
    run.mkdir()
    proc = run_pytest(run, require=True, defer_to=deferred)
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 2 errors" in proc.stdout, proc.stdout
    assert not deferred.exists()
