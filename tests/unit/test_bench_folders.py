"""bench/folders (`fedge-hub evaluate`): every row end to end on tiny folders, with the real bundled digits encoder."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import elpv_folders, folders

LABELS = ("bar", "dot")


def draw(label: str, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 image: a vertical bar or a blob at a random place, plus noise (uint8)."""
    im = rng.uniform(0, 40, (8, 8))
    if label == "bar":
        im[:, rng.integers(1, 7)] = 255
    else:
        r, c = rng.integers(2, 6, 2)
        im[r - 1 : r + 1, c - 1 : c + 1] = 255
    return im.astype(np.uint8)


def write_folder(root: Path, counts: dict[str, int], rng: np.random.Generator, flat: bool = False) -> Path:
    """`root/<label>/<id>.png` (or flat images) with `counts` images per label."""
    for label, n in counts.items():
        folder = root if flat else root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(draw(label, rng)).save(folder / f"{label}-{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path | list[Path]]:
    """Three imbalanced sites (one holds a single label), a test folder and a flat public folder."""
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    return {
        "sites": [
            write_folder(root / "site1", {"bar": 14, "dot": 6}, rng),
            write_folder(root / "site2", {"bar": 12}, rng),
            write_folder(root / "site3", {"bar": 5, "dot": 16}, rng),
        ],
        "test": write_folder(root / "test", {"bar": 10, "dot": 6}, rng),
        "public": write_folder(root / "public", {"x": 12}, rng, flat=True),
    }


def run(tiny: dict, out: Path, *extra: str) -> dict:
    argv = ["--sites", *map(str, tiny["sites"]), "--test", str(tiny["test"]), "--public", str(tiny["public"]),
            "--bundle", "digits", "--seeds", "2", "--rounds", "1", "--out", str(out), "--name", "tiny", *extra]  # fmt: skip
    with warnings.catch_warnings():  # flwr imports typer, which touches an API click 8.2 deprecates (not ours)
        warnings.filterwarnings("ignore", message=r".*click\.utils\..* is deprecated.*", category=DeprecationWarning)
        assert folders.main(argv) == 0
    return json.loads((out / "tiny.json").read_text())


def test_every_row_end_to_end_and_the_same_bytes_twice(tiny, tmp_path: Path) -> None:
    result = run(tiny, tmp_path / "a")

    assert result["data"]["label_names"] == list(LABELS)
    assert result["data"]["counts"]["site2"] == {"bar": 12}
    assert result["data"]["public"] == 12
    rows = result["rows"]
    assert sorted({r["seed"] for r in rows}) == [0, 1]
    for r in rows:
        if "note" in r:  # only fedge's rows may be missing, and then they say why
            assert r["method"] in ("fedge", "fedge+refine") and r["note"].startswith("not available: ")
            continue
        assert 0.0 <= r["balanced_accuracy"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        cm = np.array(r["confusion"])
        # rows: the test folder's true labels
        assert cm.shape == (2, 2) and cm.sum() == 16 and list(cm.sum(1)) == [10, 6]
        assert r["recall"] == [round(cm[c, c] / cm[c].sum(), 4) for c in range(2)]
        assert r["balanced_accuracy"] == pytest.approx(np.mean(r["recall"]), abs=1e-4)
        assert r["bytes_up_per_site"] > 0 and r["bytes_down_per_site"] > 0
    # fedge's rows as the service delivers them: the delivery gate chose a head on the sites' held-out part
    for r in rows:
        if r["method"] in ("fedge", "fedge+refine") and "note" not in r:
            scored = r["gate"]["balanced_accuracy"]
            assert list(scored)[0] == "logits" and "head_nearest_prototype" in scored and r["served"] in scored
            assert r["gate"]["samples"] == 3 + 1 + 2 + 1 + 3  # the held-out 20 %, carved as the validation carve
            if r["method"] == "fedge+refine" and "kept_one_round_model" not in r:
                assert [h for h in scored if h.startswith("head_refined_")] == [f"head_refined_{i}" for i in range(3)]
    methods = {s["method"]: s for s in result["summary"]}
    assert set(methods) == set(folders.METHODS)
    for m in folders.METHODS[:-2]:  # every row but fedge's always runs
        assert methods[m]["seeds"] == 2, m
    # FedAvg: one round is one download and one upload of the model per site; the linear head's download adds the encoder
    enc = result["data"]["encoder"]["bytes"]
    lin = methods["fedavg-linear"]
    assert lin["bytes_down_per_site"] == lin["bytes_up_per_site"] + enc
    # choices come from the validation carve (held-back site images), never from the test folder
    for sel in result["selection"]:
        assert set(sel["chosen"]) == {"gaussian+logreg", "closed-form", "centralized-logreg"}
        assert sel["validation_images"] == 3 + 1 + 2 + 1 + 3  # 20 % of each site's labels, rounded, at least one
    md = (tmp_path / "a" / "tiny.md").read_text()
    assert "recall bar" in md and "balanced accuracy" in md
    assert "The head the delivery gate served" in md and "80 % of each site's data" in md
    assert (tmp_path / "a" / "tiny.png").stat().st_size > 0

    first = (tmp_path / "a" / "tiny.json").read_bytes()
    run(tiny, tmp_path / "a")
    assert (tmp_path / "a" / "tiny.json").read_bytes() == first  # every seed derives from --seed


def test_validation_carve_is_per_site_and_per_label() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2])
    part = folders.Part("site1", "x", labels, np.eye(16, 4, dtype=np.float32), np.zeros((16, 1, 4, 4), np.float32), 0)
    fit, val = folders.carve([part], 0.2, (0, "folders", 0))
    assert sorted(val[0].labels.tolist()) == [0, 0, 1]  # 2 of 10, 1 of 5, none of a lone image
    assert len(fit[0].labels) + len(val[0].labels) == 16
    fit2, val2 = folders.carve([part], 0.2, (0, "folders", 0))
    assert np.array_equal(val[0].emb, val2[0].emb)


def test_scores_balanced_accuracy_and_absent_labels() -> None:
    y = np.array([0, 0, 0, 1])
    s = folders.scores(y, np.array([0, 0, 0, 0]), 3)
    assert s["accuracy"] == 0.75 and s["balanced_accuracy"] == 0.5  # "always the majority" is at chance
    assert s["recall"] == [1.0, 0.0, None]
    assert s["confusion"] == [[3, 0, 0], [1, 0, 0], [0, 0, 0]]


def test_evaluate_help_loads_no_torch_from_any_folder(tmp_path: Path) -> None:
    probe = (
        "import sys\nfrom hub.cli import main\ntry:\n    main(['evaluate', '--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "fedge-hub evaluate" in out.stdout and "--public" in out.stdout


def test_folder_export_splits_and_refuses_the_repository(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="repository"):
        elpv_folders.main(["--source", "digits", "--out", str(Path(elpv_folders.__file__).parent / "x")])
    assert elpv_folders.main(["--source", "digits", "--out", str(tmp_path / "d")]) == 0
    info = json.loads((tmp_path / "d" / "folders.json").read_text())
    n = sum(sum(c.values()) for c in info["counts"].values())
    assert n == 1797
    assert abs(sum(info["counts"]["test"].values()) / n - 0.3) < 0.01
    assert abs(info["counts"]["public"]["unlabelled"] / n - 0.2) < 0.01
    assert not any(p.is_dir() for p in (tmp_path / "d" / "public").iterdir())  # flat
    assert len(list((tmp_path / "d" / "site1").rglob("*.npy"))) == sum(info["counts"]["site1"].values())


def test_select_refine_scores_the_refinement_settings_on_validation_only(tiny, tmp_path: Path) -> None:
    argv = ["--sites", *map(str, tiny["sites"]), "--test", str(tiny["test"]), "--bundle", "digits", "--out",
            str(tmp_path), "--name", "tiny", "--select-refine", "1"]  # fmt: skip
    with warnings.catch_warnings():  # flwr imports typer, which touches an API click 8.2 deprecates (not ours)
        warnings.filterwarnings("ignore", message=r".*click\.utils\..* is deprecated.*", category=DeprecationWarning)
        assert folders.main(argv) == 0
    sel = json.loads((tmp_path / "tiny-refine-select.json").read_text())
    settings = {r["setting"] for r in sel["ranking"]}
    per = len(folders.REFINE_LAMS) + 2 * len(folders.REFINE_HEAD_SETS)  # every head set through the gate, and refit
    assert len(settings) == len(folders.REFINE_KINDS) * len(folders.REFINE_DIMS) * per
    assert all(0.0 <= r["mean"] <= 1.0 and len(r["per_seed"]) == 1 for r in sel["ranking"])
    assert not (tmp_path / "tiny.json").exists()  # nothing evaluated on the test folder
