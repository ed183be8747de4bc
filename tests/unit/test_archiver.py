"""The archiver's upload pass on a real store and a real file target."""

from __future__ import annotations

from vigo.snapshots.archiver import Archiver
from vigo.snapshots.targets import open_target
from vigo.state.store import Store


class WritesWhileUploading:
    """A file target that commits one more transaction during every put, as a busy primary does."""

    def __init__(self, inner, store: Store) -> None:
        self.inner, self.store, self.url = inner, store, inner.url

    def put(self, key, data, metadata):
        with self.store.write() as db:
            self.store.set_meta(db, f"during-{key}", b"x")
        return self.inner.put(key, data, metadata)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_an_upload_pass_takes_what_was_spooled_when_it_began(tmp_path):
    (tmp_path / "archive").mkdir()
    store = Store(tmp_path / "data")
    target = WritesWhileUploading(open_target((tmp_path / "archive").as_uri()), store)
    archiver = Archiver(target, tmp_path / "spool", partition="p0")
    store.stream.consumers.append(archiver)
    store.stream.snapshot()
    assert archiver.upload_once() == 1  # the snapshot
    for i in range(5):
        with store.write() as db:
            store.set_meta(db, f"k{i}", b"v")
    assert archiver.upload_once() == 1, "five segments of one index go as one object"
    assert archiver.status()["spool_files"] == 1, "the segment committed during the PUT waits for the next pass"
    assert archiver.upload_once() == 1
    store.close()
