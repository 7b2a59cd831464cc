"""The edge never imports torch, diffusers or torchvision: checked in a fresh interpreter."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

FORBIDDEN = ("torch", "diffusers", "torchvision")

PROBE = """
import importlib, json, pkgutil, sys
import bundled, contract, edge, runtime
for pkg in (contract, edge, runtime):  # every module of the edge and of the shared packages it uses
    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
{extra}
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})))
"""


def run_probe(extra: str = "") -> list[str]:
    """Modules of the forbidden families loaded after running `extra` in a fresh interpreter."""
    code = PROBE.format(extra=extra, forbidden=set(FORBIDDEN))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_edge_loads_no_torch() -> None:
    assert run_probe() == []


def test_encoding_a_data_folder_loads_no_torch(tmp_path: Path) -> None:
    # Prepare: a small data folder in the local layout.
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(6):
            np.save(tmp_path / label / f"{label}{i}.npy", rng.random((8, 8), dtype=np.float32))
    out = tmp_path / "c.json"
    # Execute: the whole edge path, encoder selection included.
    args = ["encode", "--data", str(tmp_path), "--site-id", "s1", "--k", "1", "--out", str(out)]
    loaded = run_probe(f"assert edge.cli.main({args!r}) == 0")
    # Assert
    assert loaded == []
    assert out.is_file()


def test_the_edge_service_path_loads_no_torch(tmp_path: Path) -> None:
    # Prepare: a data folder; the service is built and does its local work (index, encode, contribute).
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(12):
            np.save(tmp_path / "data" / label / f"{label}{i}.npy", rng.random((8, 8), dtype=np.float32))
    extra = (
        "from edge.config import EdgeSettings\n"
        "from edge.service import EdgeService\n"
        f"svc = EdgeService(EdgeSettings(site_id='s1', data_dir={str(tmp_path / 'data')!r}, "
        f"state_dir={str(tmp_path / 'state')!r}, settle_s=0, k=1))\n"
        "svc.sync()\n"
        "assert svc.maybe_contribute() is not None"
    )
    # Execute and assert
    assert run_probe(extra) == []
