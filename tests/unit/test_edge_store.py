"""The edge's durable state: the sample index follows the folder, the outbox keeps what the broker has not acknowledged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contract.layout import scan
from edge.store import EdgeStore, holdout_of


def write(folder: Path, label: str, sid: str, value: float) -> None:
    (folder / label).mkdir(parents=True, exist_ok=True)
    np.save(folder / label / f"{sid}.npy", np.full((8, 8), value, np.float32))


def test_sync_adds_changes_and_removes(tmp_path: Path) -> None:
    data, store = tmp_path / "data", EdgeStore(tmp_path / "s.sqlite")
    write(data, "a", "x1", 0.1)
    write(data, "b", "x2", 0.2)
    assert store.sync(scan(data), 0.0) == (["x1", "x2"], [], [])
    assert store.sync(scan(data), 0.0) == ([], [], [])  # nothing changed, nothing re-hashed
    store.put_embeddings([(s.sample_id, s.sha256, np.ones(4)) for s in store.samples()])
    write(data, "a", "x1", 0.9)
    (data / "b" / "x2.npy").unlink()
    assert store.sync(scan(data), 0.0) == ([], ["x1"], ["x2"])
    assert [s.sample_id for s in store.missing_embeddings()] == ["x1"]  # its old embedding was dropped


def test_holdout_is_a_stable_function_of_the_id() -> None:
    ids = [f"s{i}" for i in range(2000)]
    share = np.mean([holdout_of(i, 0.2) for i in ids])
    assert 0.17 < share < 0.23
    assert [holdout_of(i, 0.2) for i in ids] == [holdout_of(i, 0.2) for i in ids]


def test_outbox_keeps_items_until_acknowledged_across_restarts(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "s.sqlite")
    assert store.enqueue("m1", "embeddings", "t/e", b"payload-1", meta={"contribution_id": "m1"})
    assert not store.enqueue("m1", "embeddings", "t/e", b"payload-1")  # same id: queued once
    store.enqueue("m2", "eval", "t/v", b"payload-2")
    store.close()
    store = EdgeStore(tmp_path / "s.sqlite")
    items = store.pending()
    assert [i.msg_id for i in items] == ["m1", "m2"] and store.get("contribution_id") == "m1"
    store.acknowledged(items[0])
    assert store.outbox_depth() == 1 and store.counters("bytes_sent") == {"embeddings": 9}
    # A hub that lost its session gets the latest of each kind again; a still-queued one is not doubled.
    assert store.requeue_latest() == ["embeddings"]
    assert [i.msg_id for i in store.pending()] == ["m2", "m1"]


def test_a_new_caption_counts_as_a_change(tmp_path: Path) -> None:
    data, store = tmp_path / "data", EdgeStore(tmp_path / "s.sqlite")
    write(data, "bad", "p1", 0.5)
    store.sync(scan(data), 0.0)
    (data / "metadata.csv").write_text("sample_id,label,timestamp,caption\np1,bad,,scratched part with dent\n")
    assert store.sync(scan(data), 0.0) == ([], ["p1"], [])
    assert store.training_captions()[2] == ["scratched part with dent"]
    assert store.sync(scan(data), 0.0) == ([], [], [])
