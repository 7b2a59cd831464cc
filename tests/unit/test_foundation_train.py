"""`fedge-hub foundation train`: folders (labelled, flat, one label), sizes, time budget, hold-out, output, chance."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bundled
from edge.encoder import OnnxEncoder
from hub import datasets
from hub.cli import foundation_train_parser
from hub.cli import main as hub_main
from hub.foundation.budget import StepBudget
from hub.foundation.bundle import load, sha256_file
from hub.foundation.generator import PrototypeConditionedUNet
from hub.foundation.judge import chance_verdict, unavailable
from hub.foundation.train import SIDES, FoundationError, Public, default_recipe, quality_holdout, report_quality

TINY = ["--diffusion-steps", "2", "--simclr-steps", "2"]


def flat_folder(root: Path, n: int, side: int, rgb: bool = False) -> Path:
    """`n` random PNG images of side x side directly in `root` (no label subfolders)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (side, side, 3) if rgb else (side, side), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:03d}.png")
    return root


def npy_folder(root: Path, sizes: dict[str, list[int]]) -> Path:
    """`<root>/<label>/<i>.npy` with one image per listed side."""
    rng = np.random.default_rng(0)
    for label, sides in sizes.items():
        (root / label).mkdir(parents=True)
        for i, s in enumerate(sides):
            np.save(root / label / f"{label}{i}.npy", rng.random((s, s), dtype=np.float32))
    return root


def train(argv: list[str], capsys) -> tuple[int, str, str]:
    code = hub_main(["foundation", "train", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- sizes ---


@pytest.mark.parametrize("side", [30, 64, 300])
def test_a_side_the_generator_cannot_take_is_a_one_line_error_naming_the_sides(tmp_path: Path, capsys, side) -> None:
    data = npy_folder(tmp_path / "data", {"a": [side] * 3, "b": [side] * 3})

    code, _, err = train(["--dataset", str(data), "--out", str(tmp_path / "b"), *TINY], capsys)

    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{side}x{side}" in err and ", ".join(map(str, SIDES)) in err and "--image-size" in err
    assert not (tmp_path / "b").exists()


def test_an_image_size_the_generator_cannot_take_is_refused_at_once(tmp_path: Path, capsys) -> None:
    data = npy_folder(tmp_path / "data", {"a": [8] * 3})

    code, _, err = train(["--dataset", str(data), "--out", str(tmp_path / "b"), "--image-size", "300"], capsys)

    assert code == 2 and len(err.strip().splitlines()) == 1 and "300x300" in err


def test_images_of_mixed_sizes_are_a_one_line_error(tmp_path: Path, capsys) -> None:
    data = npy_folder(tmp_path / "data", {"a": [16, 16], "b": [12, 12]})

    code, _, err = train(["--dataset", str(data), "--out", str(tmp_path / "b")], capsys)

    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "12x12, 16x16" in err and "--image-size" in err


@pytest.mark.parametrize("side", SIDES)
def test_every_named_side_has_a_recipe_whose_generator_runs(side: int) -> None:
    recipe = default_recipe("x", side)
    torch.manual_seed(0)
    unet = PrototypeConditionedUNet(
        sample_size=side, cond_dim=recipe.embedding_dim, block_out_channels=recipe.block_out_channels,
        down_block_types=recipe.down_block_types, up_block_types=recipe.up_block_types,
    )  # fmt: skip
    with torch.no_grad():
        eps = unet(torch.zeros(1, 1, side, side), torch.tensor([10]), torch.zeros(1, recipe.embedding_dim))
    assert eps.shape == (1, 1, side, side)


@pytest.mark.parametrize("side", [7, 15, 18, 33])
def test_sides_outside_the_list_are_refused_before_any_training(side: int) -> None:
    with pytest.raises(FoundationError, match=f"{side}x{side}"):
        default_recipe("x", side)


def test_the_help_names_the_same_sides_the_trainer_takes() -> None:
    assert ", ".join(map(str, SIDES)) in " ".join(foundation_train_parser().format_help().split())


# --- folders: flat, one label, resize, default output ---


def test_a_flat_folder_of_large_colour_images_trains_with_no_score_and_lands_outside_the_repo(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    data = flat_folder(tmp_path / "plant", 24, 40, rgb=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    before = sorted(p.name for p in bundled.ROOT.iterdir())

    code, out, err = train(["--dataset", str(data), "--image-size", "8", *TINY], capsys)

    assert code == 0, err
    bundle = tmp_path / "home" / ".cache" / "fedge" / "bundles" / "plant"
    assert sorted(p.name for p in bundled.ROOT.iterdir()) == before  # nothing written into bundled/
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["dataset"]["layout"] == "flat" and m["dataset"]["resized_to"] == 8
    assert m["dataset"]["original_sizes"] == ["40x40"]
    assert m["quality_holdout"]["images"] == 0 and m["quality_holdout"]["train_images"] == 24  # all of it trains
    assert m["quality"]["available"] is False and m["quality"]["judge_accuracy"] is None
    assert "flat folder has no labels" in m["quality"]["reason"]
    assert "quality: not available" in out and "WARNING" not in err
    assert OnnxEncoder(bundle / "encoder.onnx").encode(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 32)


def test_one_label_is_never_a_perfect_score(tmp_path: Path, capsys) -> None:
    data = npy_folder(tmp_path / "data", {"good": [8] * 20})

    code, out, _ = train(["--dataset", str(data), "--out", str(tmp_path / "b"), *TINY], capsys)

    assert code == 0
    q = json.loads((tmp_path / "b" / "manifest.json").read_text())["quality"]
    assert q == {**unavailable(q["reason"]), "command": q["command"]}
    assert "one label (good)" in q["reason"] and "not available" in out


def test_a_folder_with_both_layouts_is_refused(tmp_path: Path, capsys) -> None:
    data = npy_folder(tmp_path / "data", {"a": [8] * 3})
    np.save(data / "stray.npy", np.zeros((8, 8), np.float32))

    code, _, err = train(["--dataset", str(data), "--out", str(tmp_path / "b")], capsys)

    assert code == 2 and "both label subfolders and 1 images" in err


def test_an_out_folder_that_is_not_a_bundle_is_not_replaced(tmp_path: Path, capsys) -> None:
    data = npy_folder(tmp_path / "data", {"a": [8] * 3})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")

    code, _, err = train(["--dataset", str(data), "--out", str(tmp_path / "b"), *TINY], capsys)

    assert code == 2 and "not a foundation bundle" in err
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


# --- hold-out ---


def test_the_holdout_takes_a_share_of_each_label_with_a_floor_and_a_ceiling() -> None:
    labels = np.array([0] * 200 + [1] * 30 + [2] * 6 + [3] * 1)
    public = Public(np.zeros((len(labels), 1, 8, 8), np.float32), labels, ("a", "b", "c", "d"))

    held = quality_holdout(public, 0.1, seed=0)

    assert [int((labels[held] == c).sum()) for c in range(4)] == [20, 5, 3, 0]  # 10 %, at least 5, at most half
    assert np.array_equal(held, quality_holdout(public, 0.1, seed=0))
    assert len(quality_holdout(public, 0.0, seed=0)) == 0
    flat = Public(public.images, np.zeros(len(labels), np.int64), ())
    assert len(quality_holdout(flat, 0.1, seed=0)) == 0  # no labels, no score: everything trains
    with pytest.raises(FoundationError, match="between 0 and 0.5"):
        quality_holdout(public, 0.7, seed=0)


# --- time budget ---


def test_step_budget_plans_over_what_the_time_affords_and_stops_at_it() -> None:
    now = [0.0]
    budget = StepBudget(1000, seconds=10.0, clock=lambda: now[0])
    steps = 0
    while True:
        now[0] += 0.125  # 8 steps a second: the budget affords 80 of the 1000
        steps += 1
        if not budget.advance():
            break
    assert steps == budget.done == budget.planned
    assert steps == 80 and budget.stopped_by_budget
    assert budget.progress(steps) == 1.0  # the cosine schedule ended where the run did
    free = StepBudget(5)
    assert [free.advance() for _ in range(5)] == [True] * 4 + [False] and not free.stopped_by_budget


def test_time_budget_stops_training_and_saves(tmp_path: Path, capsys) -> None:
    data = flat_folder(tmp_path / "data", 40, 8)

    code, _, err = train(["--dataset", str(data), "--out", str(tmp_path / "b"), "--time-budget", "4"], capsys)

    assert code == 0, err
    t = json.loads((tmp_path / "b" / "manifest.json").read_text())["training"]
    assert t["time_budget_s"] == 4 and t["stopped_by_time_budget"] is True
    assert t["simclr_steps"] < 1500 and t["diffusion_steps"] < 4000
    # It stops at the first step boundary after the budget (exactly: the fake-clock test above). One step
    # can take seconds on an overloaded machine, so the bound here is loose; ignoring the budget
    # (1500 + 4000 steps) would take far longer.
    assert t["encoder_wall_s"] + t["generator_wall_s"] < 4 + 60
    assert load(tmp_path / "b").generator.config.sample_size == 8


def test_a_time_budget_must_be_positive(tmp_path: Path, capsys) -> None:
    data = npy_folder(tmp_path / "data", {"a": [8] * 3})
    code, _, err = train(["--dataset", str(data), "--out", str(tmp_path / "b"), "--time-budget", "0"], capsys)
    assert code == 2 and "--time-budget" in err


# --- chance ---


def test_a_score_at_chance_is_flagged_and_shouted(capsys) -> None:
    quality = {"available": True, "judge_accuracy": 0.72, "judge_balanced_accuracy": 0.52}  # all "good": 72 %

    flagged = chance_verdict(quality, n_labels=2)
    report_quality(flagged)

    assert flagged["at_chance"] is True and flagged["chance_level"] == 0.5
    assert "quality at chance" in flagged["warning"]
    assert capsys.readouterr().err.startswith("WARNING: quality at chance")
    assert chance_verdict({**quality, "judge_balanced_accuracy": 0.8}, n_labels=2)["at_chance"] is False
    assert chance_verdict(unavailable("x"), n_labels=1) == unavailable("x")


@pytest.mark.slow
def test_train_from_a_labelled_folder_writes_a_bundle(tmp_path: Path, capsys) -> None:
    data = datasets.load("digits")  # three labels keep the judge's work (and this test) small
    datasets.write_folder(tmp_path / "data", data, np.flatnonzero(data.labels < 3)[:120])
    out = tmp_path / "bundle"
    argv = ["--dataset", str(tmp_path / "data"), "--out", str(out), "--diffusion-steps", "5", "--simclr-steps", "20"]

    code, stdout, err = train(argv, capsys)

    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    # How it was made: the whole folder, the hold-out, command, steps, wall time, quality.
    assert manifest["dataset"]["n_public"] == 120 and manifest["dataset"]["layout"] == "labelled"
    assert len(manifest["dataset"]["samples_sha256"]) == 64
    assert manifest["quality_holdout"]["images"] == 15 and manifest["quality_holdout"]["train_images"] == 105
    assert manifest["command"].startswith("fedge-hub foundation train")
    assert manifest["training"]["diffusion_steps"] == 5 and manifest["training"]["stopped_by_time_budget"] is False
    assert manifest["training"]["total_wall_s"] > 0
    assert set(manifest["quality"]["per_class"]) == {"0", "1", "2"}
    # 5 steps learn nothing: the score sits at chance and says so, in the manifest and on stderr.
    assert manifest["quality"]["at_chance"] is True
    assert "WARNING: quality at chance" in err
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest
    # Both sides can load it: the edge its ONNX encoder, the hub its generator.
    assert OnnxEncoder(out / "encoder.onnx").encode(data.images[:4]).shape == (4, 32)
    assert load(out).encoder_id == manifest["encoder_id"]
    # `foundation evaluate` finds the same images and hold-out again.
    assert hub_main(["foundation", "evaluate", "--bundle", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["quality"]["samples"] == manifest["quality"]["samples"]
