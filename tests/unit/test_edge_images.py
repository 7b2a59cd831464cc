"""A site's own images: other sizes and colour are resized to the encoder's input; what cannot be used is reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from contract.layout import fit_image
from edge.config import EdgeSettings
from edge.service import EdgeService
from hub import datasets


def test_fit_image_resizes_the_whole_image_into_range() -> None:
    img = np.zeros((30, 60), np.float32)
    img[:, 30:] = 1.0  # right half white: it must survive, not be cropped away
    out = fit_image(img, 8)
    assert out.shape == (8, 8) and out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    assert out[:, :3].max() < 0.1 and out[:, 5:].min() > 0.9
    assert fit_image(out, 8) is out


def test_32x32_colour_images_are_ingested_and_a_3_sample_label_is_reported_skipped(tmp_path: Path) -> None:
    data = datasets.load("digits")
    root = tmp_path / "data"
    wanted = {"0": 20, "1": 20, "2": 3}
    for label, n in wanted.items():
        (root / label).mkdir(parents=True)
        idx = np.flatnonzero(data.labels == data.label_names.index(label))[:n]
        for i in idx:
            grey = (np.kron(data.images[i, 0], np.ones((4, 4))) * 255).astype(np.uint8)  # 8x8 -> 32x32
            rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)  # colour, so channels must be converted
            Image.fromarray(rgb, "RGB").save(root / label / f"s{i}.png")
    (root / "1" / "broken.png").write_bytes(b"not a png")
    svc = EdgeService(EdgeSettings(site_id="site-a", data_dir=root, state_dir=tmp_path / "state", metrics_port=None,
                                   holdout_fraction=0.0))  # fmt: skip
    try:
        svc.sync()
        made = svc._next_contribution()
        assert made is not None
        contribution, _ = made
        assert [lp.label for lp in contribution.labels] == ["0", "1"]  # "2" cannot make one prototype of 5
        assert contribution.n_samples == 40
        status = svc.status()
        assert status.skipped_labels == ["2"] and status.unreadable_samples == 1
        reg = svc.metrics.registry
        assert reg.get_sample_value("fedge_edge_resized_samples_total") == 43
        assert reg.get_sample_value("fedge_edge_skipped_labels") == 1
        assert reg.get_sample_value("fedge_edge_unreadable_samples_total") == 1
    finally:
        svc.store.close()
