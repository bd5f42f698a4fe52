import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the script would run for real")
def test_gpu_check_exits_clearly_without_cuda():
    p = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and "no CUDA device" in p.stderr


def test_gpu_check_smoke_runs_all_sections_on_cpu(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, OUT=str(tmp_path))
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = (tmp_path / "gpu_results.md").read_text()
    assert "| PASS |" in text and "ERROR" not in text and "FAIL" not in text
