"""The core loop through the command-line tools, without MQTT: encode -> train -> predict."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.slow


def test_cli_encode_then_train_then_predict(tmp_path: Path) -> None:
    from hub import datasets

    data = datasets.load("digits")
    datasets.write_folder(tmp_path / "site", data, np.arange(400))
    contribution = tmp_path / "c.json"
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    enc = run(
        "edge.cli", "encode", "--data", str(tmp_path / "site"), "--site-id", "plant-a", "--out", str(contribution)
    )
    assert enc.returncode == 0, enc.stderr
    assert json.loads(enc.stdout)["bytes"] == contribution.stat().st_size
    tr = run("hub.cli", "train", str(contribution), "--models", str(tmp_path / "models"))
    assert tr.returncode == 0, tr.stderr
    model = tmp_path / "models" / "v0001" / "model.onnx"
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"image": data.images[:3]})[0].shape == (3, 10)
    threes = sorted((tmp_path / "site" / "3").glob("*.npy"))[:10]
    pr = run("edge.cli", "predict", "--model", str(model), *map(str, threes))
    assert pr.returncode == 0, pr.stderr
    predicted = [line.split("\t")[1] for line in pr.stdout.strip().splitlines()]
    assert len(predicted) == 10 and predicted.count("3") >= 7


def test_train_rejects_a_bad_contribution_with_a_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 9}')
    out = subprocess.run(
        [sys.executable, "-m", "hub.cli", "train", str(bad)], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 2
    assert "not a valid contribution" in out.stderr and "schema_version" in out.stderr
