"""Backups in a bucket, in one process, against real local servers (tests/object_stores.py).

Every test runs on `s3://` (moto's S3 server) and `gs://` (gcp-storage-emulator),
with a real `model.fit` on the test process's backend.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import keras
import numpy as np
import pytest

import ft
from ft import errors, inspection
from ft.store import background_removal
from ft.store.bucket_lease import Lease
from ft.store.bucket_paths import BucketURL, filesystem

X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = X.sum(axis=1, keepdims=True)


def make_model() -> keras.Model:
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


class Crash(keras.callbacks.Callback):
    def __init__(self, at_batch: int) -> None:
        super().__init__()
        self.at, self.n = at_batch, 0

    def on_train_batch_end(self, batch, logs=None):
        self.n += 1
        if self.n == self.at:
            raise RuntimeError("interrupted")


def fit(model: keras.Model, callbacks: list, epochs: int = 2) -> keras.callbacks.History:
    return model.fit(
        X, Y, batch_size=4, epochs=epochs, shuffle=False, callbacks=callbacks, verbose=0
    )


def values(model: keras.Model) -> list[np.ndarray]:
    return [
        np.array(keras.ops.convert_to_numpy(v)) for v in model.variables + model.optimizer.variables
    ]


def objects(url: str) -> dict[str, int]:
    """Key below `url` -> size, listed afresh."""
    location = BucketURL.parse(url)
    fs = filesystem(location.scheme)
    root = location.fs_path()
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {k[len(root) + 1 :]: int(v["size"]) for k, v in found.items()}


def put(url: str, key: str, data: bytes) -> None:
    location = BucketURL.parse(url)
    filesystem(location.scheme).pipe_file(location.fs_path(key), data)


def get(url: str, key: str) -> bytes:
    location = BucketURL.parse(url)
    fs = filesystem(location.scheme)
    fs.invalidate_cache(location.fs_path())
    return bytes(fs.cat_file(location.fs_path(key)))


def remove(url: str, key: str) -> None:
    location = BucketURL.parse(url)
    filesystem(location.scheme).rm_file(location.fs_path(key))


def kept_backup(url: str) -> str:
    """Train 2 epochs keeping the backup; the name of the committed backup."""
    fit(make_model(), [ft.BackupAndRestore(url, delete_checkpoint=False)])
    names = {key.split("/")[0] for key in objects(url) if key.startswith("ft-step-")}
    assert names == {"ft-step-0000000016"}, names
    return "ft-step-0000000016"


def test_interrupted_fit_resumes_exactly_from_the_bucket(bucket) -> None:
    reference = make_model()
    fit(reference, [])
    model = make_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(model, [ft.BackupAndRestore(bucket.url, save_freq=3), Crash(7)])
    assert "ft-step-0000000006/ft-commit.json" in objects(bucket.url)
    assert not any(k.startswith(".ft-lease-") for k in objects(bucket.url)), "lease released"
    resumed = make_model()
    callback = ft.BackupAndRestore(bucket.url, save_freq=3)
    history = fit(resumed, [callback])
    assert callback.restored is not None
    assert (callback.restored["epoch"], callback.restored["batch"]) == (0, 6)
    assert callback.restored["path"] == f"{bucket.url}/ft-step-0000000006"
    assert len(history.history["loss"]) == 2
    for a, b in zip(values(reference), values(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not any(k.endswith("/ft-commit.json") for k in objects(bucket.url)), "uncommitted"
    assert background_removal.wait(60), "the objects are removed in the background"
    assert objects(bucket.url) == {}, "delete_checkpoint removes every object ft wrote"


@pytest.mark.parametrize("damage", ["flip-chunk", "delete-chunk", "edit-record", "metadata"])
def test_damaged_object_is_detected_and_never_loaded(bucket, damage: str) -> None:
    name = kept_backup(bucket.url)
    listing = objects(bucket.url)
    chunk = next(k for k in sorted(listing) if k.startswith(f"{name}/arrays/model/0/c/"))
    if damage == "flip-chunk":  # same size: only the chunk's crc32c can tell
        data = bytearray(get(bucket.url, chunk))
        data[len(data) // 2] ^= 0x10
        put(bucket.url, chunk, bytes(data))
    elif damage == "delete-chunk":
        remove(bucket.url, chunk)
    elif damage == "edit-record":  # still valid JSON, another epoch
        record = json.loads(get(bucket.url, f"{name}/ft-backup.json"))
        record["epoch"] = 0
        put(bucket.url, f"{name}/ft-backup.json", json.dumps(record).encode())
    else:
        meta = f"{name}/arrays/model/0/zarr.json"
        put(bucket.url, meta, get(bucket.url, meta).replace(b"little", b"big   "))
    model = make_model()
    before = model.get_weights()
    with pytest.raises(errors.CheckpointCorruptedError, match=f"{bucket.url}/{name}"):
        fit(model, [ft.BackupAndRestore(bucket.url)])
    # Nothing of the damaged backup reached the model.
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert inspection.main([bucket.url]) == inspection.EXIT_DAMAGED
    # fit raised after taking the lease: it gave the lease up (no renewing thread is left).
    assert not any(k.startswith(".ft-lease-") for k in objects(bucket.url))
    assert inspection.describe(bucket.url)["live_run"] is None


def test_backup_without_its_marker_is_ignored_and_removed(bucket) -> None:
    name = kept_backup(bucket.url)
    remove(bucket.url, f"{name}/ft-commit.json")  # as if killed just before the marker
    put(bucket.url, "notes.txt", b"the user's own")
    callback = ft.BackupAndRestore(bucket.url)
    fit(make_model(), [callback])
    assert callback.restored is None, "an uncommitted backup is never restored"
    assert background_removal.wait(60)
    assert objects(bucket.url) == {"notes.txt": len(b"the user's own")}


def test_delete_checkpoint_false_keeps_one_committed_backup(bucket) -> None:
    name = kept_backup(bucket.url)
    keys = objects(bucket.url)
    assert f"{name}/ft-commit.json" in keys and f"{name}/ft-backup.json" in keys
    assert not any(k.startswith(".ft-lease-") for k in keys), "the lease is released"
    marker = json.loads(get(bucket.url, f"{name}/ft-commit.json"))
    assert marker["record"]["size"] == len(get(bucket.url, f"{name}/ft-backup.json"))
    assert inspection.main([bucket.url]) == inspection.EXIT_INTACT
    report = inspection.describe(bucket.url)
    assert report["backups"][0]["step"] == 16 and report["backups"][0]["intact"]
    assert report["live_run"] is None


def test_fit_returns_before_the_objects_are_removed_and_a_second_fit_waits_for_them(
    bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The objects of a finished fit are removed on a thread of its own, slowed
    # here: fit returns with every marker gone (nothing is committed any more)
    # while they are still there, and the lease is held until they are gone.
    # A second fit in the same process on the same backup_dir waits for that
    # removal before it takes the lease, so it never writes where it deletes.
    real_start = background_removal.start

    def slow_start(url: str, remove: Callable[[], None]) -> None:
        def slow() -> None:
            time.sleep(1.5)
            remove()

        real_start(url, slow)

    monkeypatch.setattr(background_removal, "start", slow_start)
    fit(make_model(), [ft.BackupAndRestore(bucket.url)])
    left = objects(bucket.url)
    assert any(k.startswith("ft-step-") for k in left), "fit did not wait for the removal"
    assert not any(k.endswith("/ft-commit.json") for k in left), "nothing is committed"
    assert any(k.startswith(".ft-lease-") for k in left), "the lease is held while removing"
    assert inspection.describe(bucket.url)["backups"] == []

    callback = ft.BackupAndRestore(bucket.url, delete_checkpoint=False)
    fit(make_model(), [callback])
    assert callback.restored is None
    assert background_removal.wait(60)
    keys = objects(bucket.url)
    assert "ft-step-0000000016/ft-commit.json" in keys, keys
    assert not any(k.startswith(".ft-lease-") for k in keys), "the lease is released"
    assert inspection.main([bucket.url]) == inspection.EXIT_INTACT


def test_crashed_runs_lease_expires_and_is_taken_over(bucket) -> None:
    # What a SIGKILLed run on another machine leaves: its lease, renewed no more.
    crashed = {
        "owner": "pid 4242 on another-host",
        "token": "crashed",
        "job": None,
        "renewed_at": time.time() - 0.5,
        "renewals": 3,
        "ttl_s": 1.0,
    }
    put(bucket.url, ".ft-lease-0000000007", json.dumps(crashed).encode())
    callback = ft.BackupAndRestore(bucket.url, delete_checkpoint=False)
    fit(make_model(), [callback])
    keys = objects(bucket.url)
    assert "ft-step-0000000016/ft-commit.json" in keys
    assert ".ft-lease-0000000007" not in keys, "the expired lease was taken over"


# S3 only: gcp-storage-emulator ignores GCS's ifGenerationMatch=0 (GCS itself honours it).
@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
def test_racing_creates_of_one_lease_give_it_to_one_run(bucket) -> None:
    location = BucketURL.parse(bucket.url)
    fs = filesystem(location.scheme)
    first, second = Lease(fs, location), Lease(fs, location)
    assert first._create(1) is True
    assert second._create(1) is False, "create-if-absent refused the second writer"
    assert json.loads(get(bucket.url, ".ft-lease-0000000001"))["token"] == first.token


def test_lease_holder_that_was_taken_over_refuses_to_commit(bucket) -> None:
    location = BucketURL.parse(bucket.url)
    fs = filesystem(location.scheme)
    old = Lease(fs, location, ttl=5.0)
    old.acquire(timeout=10)
    old._stop.set()  # paused, say, longer than its lease: its last renewal is long past
    old._thread.join()  # type: ignore[union-attr]
    stale = json.loads(get(bucket.url, ".ft-lease-0000000001"))
    stale["renewed_at"] = time.time() - 60
    put(bucket.url, ".ft-lease-0000000001", json.dumps(stale).encode())
    new = Lease(fs, location, ttl=5.0)
    new.acquire(timeout=10)
    try:
        assert new.number == 2
        with pytest.raises(errors.BackupDirInUseError, match="took it over"):
            old.check()
    finally:
        new.release()


def test_unreachable_bucket_fails_before_training(bucket) -> None:
    missing = bucket.url.replace("ft-test", "no-such-bucket-ft")
    with pytest.raises(errors.BackupDirNotWritableError, match="no-such-bucket-ft"):
        fit(make_model(), [ft.BackupAndRestore(missing)])


@pytest.mark.parametrize("url", ["s3://", "gs:///x", "s3://bucket/../x"])
def test_malformed_bucket_urls_are_refused_at_construction(url: str) -> None:
    with pytest.raises(ValueError, match="Invalid value for argument `backup_dir`"):
        ft.BackupAndRestore(url)
