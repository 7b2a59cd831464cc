"""Shared fixtures. Markers are registered in pyproject.toml ([tool.pytest.ini_options])."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.threads import size_pools

# Deliberate pool sizes for every test, whatever OMP_NUM_THREADS says: the cores are shared with the
# services the tests start (field notes: default pools made `make test` 5x slower on a busy machine).
size_pools(1, import_torch=True)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real but tiny, untrained, seeded foundation bundle (diffusers UNet + scheduler, ONNX encoder)."""
    import torch

    from hub.foundation.bundle import save_bundle
    from hub.foundation.encoder import ConvEncoder
    from hub.foundation.generator import PrototypeConditionedUNet

    torch.manual_seed(0)
    encoder = ConvEncoder(image_size=8, dim=8, channels=(4,)).eval()
    generator = PrototypeConditionedUNet(
        sample_size=8,
        cond_dim=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
    ).eval()
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    calibration = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    save_bundle(path, "tiny", encoder, generator, calibration, {"note": "test fixture"})
    return path


@pytest.fixture(scope="session")
def digits_bundle() -> Path:
    """The committed bundled digits model."""
    import bundled

    return bundled.path("digits")
