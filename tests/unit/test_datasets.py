"""Splits: disjoint, complete, and the same as the bundled model's."""

import numpy as np
import pytest

import bundled
from contract.layout import scan
from hub import datasets


def test_split_is_a_partition() -> None:
    sp = datasets.split(1000, seed=3)
    allidx = np.concatenate([sp.public, sp.private, sp.test])
    assert len(allidx) == 1000 and len(np.unique(allidx)) == 1000


def test_dirichlet_sites_partition_the_private_part() -> None:
    labels = np.repeat(np.arange(10), 100)
    sp = datasets.split(1000)
    sites = datasets.dirichlet_sites(labels, sp.private, n_sites=5, alpha=0.1, seed=0)
    joined = np.sort(np.concatenate(sites))
    np.testing.assert_array_equal(joined, np.sort(sp.private))
    assert min(len(s) for s in sites) >= 10

    # Skewed at alpha 0.1, near uniform at alpha 100: measured by per-site label entropy.
    def entropy(parts):
        ent = []
        for s in parts:
            p = np.bincount(labels[s], minlength=10) / len(s)
            ent.append(-(p[p > 0] * np.log(p[p > 0])).sum())
        return float(np.mean(ent))

    iid = datasets.dirichlet_sites(labels, sp.private, n_sites=5, alpha=100.0, seed=0)
    assert entropy(sites) < 0.7 * entropy(iid)
    assert entropy(iid) > 0.95 * np.log(10)


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_bundled_model_was_trained_on_the_public_split_only(name: str) -> None:
    m = bundled.manifest(name)["dataset"]
    data = datasets.load(name)
    sp = datasets.split(len(data.labels), m["split_seed"], m["public_frac"], m["test_frac"])
    assert sp.public_hash() == m["public_indices_sha256"]


def test_folder_round_trip(tmp_path) -> None:
    data = datasets.load("digits")
    datasets.write_folder(tmp_path, data, np.arange(30))
    back = datasets.load(str(tmp_path))
    assert len(back.labels) == 30 and back.image_size == 8
    assert {s.sample_id for s in scan(tmp_path)} == {f"digits-{i}" for i in range(30)}


def test_unknown_dataset_has_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        datasets.load("nope")
