"""bench/sd without a CUDA GPU says so plainly, exits 0 and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_bench_sd_without_a_gpu_exits_cleanly() -> None:
    results = ROOT / "bench" / "results" / "sd.json"
    before = results.read_bytes() if results.exists() else None
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hide any GPU: this test is about the no-GPU path
    out = subprocess.run([sys.executable, "-m", "bench.sd"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU" in out.stdout and "nothing was measured" in out.stdout
    assert (results.read_bytes() if results.exists() else None) == before


def test_hub_settings_need_weights_for_the_stable_diffusion_backend() -> None:
    import pytest
    from pydantic import ValidationError

    from hub.config import HubSettings

    with pytest.raises(ValidationError, match="stable_diffusion.model_dir"):
        HubSettings(backend="stable-diffusion")
    assert HubSettings().backend == "bundled"  # the bundled model stays the default
