"""`fedge-edge encode` reads a folder as the site service does: luminance, the whole image resized to the encoder's input."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

import bundled
from contract.layout import fit_image, read_image, scan
from edge.cli import main
from edge.contribution import make_contribution
from edge.encoder import OnnxEncoder
from tests.unit.test_edge_no_torch import run_probe


def mixed_folder(root: Path) -> Path:
    """Label a: 8x8 and 12x12 arrays; label b: 20x16 RGB PNGs."""
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(6):
        np.save(root / "a" / f"a{i}.npy", rng.random((8, 8) if i < 3 else (12, 12), dtype=np.float32))
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(root / "b" / f"b{i}.png")
    return root


def test_encode_resizes_other_sizes_and_colour_as_the_service_does(tmp_path: Path, capsys) -> None:
    data = mixed_folder(tmp_path / "site")
    out = tmp_path / "c.json"

    code = main(["encode", "--data", str(data), "--site-id", "s1", "--k", "1", "--out", str(out)])

    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (report["samples"], report["resized"], report["skipped"]) == (12, 9, 0)
    # The same contribution as the service's path: read_image (luminance), then fit_image to the input, encoded
    # with the variant the command chose (fp32 or int8: choose_encoder times them, so it depends on the machine).
    samples = scan(data)
    images = np.stack([fit_image(read_image(s.path), 8) for s in samples])[:, None]
    variant = report["encoder"]["variant"]
    bundle = bundled.resolve("digits")
    encoder = OnnxEncoder(bundle / ("encoder.onnx" if variant == "fp32" else "encoder.int8.onnx"))
    encoder_id = json.loads((bundle / "manifest.json").read_text())["encoder_id"]
    expected = make_contribution(
        "s1", encoder_id, encoder.encode(images), [s.label for s in samples], k=1, min_group_size=5
    )
    assert json.loads(out.read_bytes())["contribution_id"] == expected.contribution_id


def test_encode_names_and_skips_a_file_it_cannot_read(tmp_path: Path, capsys) -> None:
    data = mixed_folder(tmp_path / "site")
    (data / "b" / "broken.png").write_bytes(b"not a png")

    code = main(["encode", "--data", str(data), "--site-id", "s1", "--k", "1", "--out", str(tmp_path / "c.json")])

    out = capsys.readouterr()
    assert code == 0
    assert json.loads(out.out)["skipped"] == 1
    assert out.err.count("warning: skipping") == 1 and "broken.png" in out.err


def test_encode_refuses_a_folder_with_nothing_readable(tmp_path: Path, capsys) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")

    assert main(["encode", "--data", str(tmp_path), "--site-id", "s1", "--out", str(tmp_path / "c.json")]) == 2
    assert "could be read" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_resizing_on_the_edge_loads_no_torch(tmp_path: Path) -> None:
    data = mixed_folder(tmp_path / "site")
    args = ["encode", "--data", str(data), "--site-id", "s1", "--k", "1", "--out", str(tmp_path / "c.json")]
    assert run_probe(f"assert edge.cli.main({args!r}) == 0") == []
