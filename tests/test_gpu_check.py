"""The GPU check (python -m mbmlib.workflow.gpu_check, make gpu-check) in its dry run: every step planned and
checked, the CUDA steps skipped with a message, nothing written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mbmlib.workflow import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_the_plan_fits_the_budget_and_names_results_by_device(tmp_path):
    steps = gpu_check.plan(tmp_path, "gpu-nvidia-tesla-t4")
    assert [s.name for s in steps] == ["tests", "autotune", "bench", "train-exact", "train-mbm", "train-mitchell"]
    assert sum(s.limit_s for s in steps) <= gpu_check.BUDGET_S <= 8 * 60
    assert gpu_check.check_plan(steps, ROOT) == []
    assert any(str(tmp_path / "gpu" / "gpu-nvidia-tesla-t4" / "tests.xml") in arg for arg in steps[0].command)
    assert "gpu-check-gpu-nvidia-tesla-t4-mbm" in steps[4].command


def test_a_broken_plan_is_refused(tmp_path):
    steps = gpu_check.plan(tmp_path, "gpu-x")
    slow = [s._replace(limit_s=200) for s in steps]
    assert any("budget" in p for p in gpu_check.check_plan(slow, ROOT))
    bad = steps[:2] + [steps[2]._replace(command=(sys.executable, "-m", "mbmlib", "bench", "--no-such-option"))]
    assert any(p.startswith("bench: python -m mbmlib refuses") for p in gpu_check.check_plan(bad, ROOT))
    missing = [steps[0]._replace(command=(sys.executable, "-m", "pytest", "tests/test_nothing_here.py"))]
    assert gpu_check.check_plan(missing, ROOT) == ["tests: tests/test_nothing_here.py is missing"]


def test_dry_run_plans_checks_and_skips_every_cuda_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "mbmlib.workflow.gpu_check", "--dry-run", "--results", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(dry run: CUDA steps skipped)" in proc.stdout and "total          <= 460 s" in proc.stdout
    for name in ("tests", "autotune", "bench", "train-exact", "train-mbm", "train-mitchell"):
        assert f"[skip] {name}: needs a CUDA device (dry run)" in proc.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.skipif(not (ROOT / "Makefile").exists(), reason="no Makefile")
def test_make_target_runs_the_module():
    text = (ROOT / "Makefile").read_text()
    assert "gpu-check:" in text and "-m mbmlib.workflow.gpu_check" in text
