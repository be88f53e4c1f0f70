"""The session snapshot file format (server.snapshot_format): round trip, and every way a file can be
refused (checksum, truncation at any byte, extra bytes, another format), and the atomic write."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lstmd.server import snapshot_format
from lstmd.server.endings import Ending
from lstmd.server.snapshot_format import NotRegularFile, SessionRecord, SnapshotError, UnsupportedVersion


def records() -> list[SessionRecord]:
    rng = np.random.default_rng(0)
    shape = (2, 2, 3)  # (h and c, layers, hidden)

    def state() -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    last_request = {"key": [4, [5, 6], 3, True], "answer": {"probability": 0.1 + 0.2, "logprob": -float("inf")}}
    return [
        SessionRecord("a" * 32, "tiny", "1", 5, 7, 12, 1.5e9 + 0.123456789, 1.6e9, "key-1", state(), state(),
                      last_request),
        SessionRecord("b" * 32, "tiny2", "3", 1, 0, 0, 1.0, 2.0, "", state(), state()),
    ]  # fmt: skip


def assert_same(got: list[SessionRecord], want: list[SessionRecord]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.state.dtype == np.float32 and a.state.tobytes() == b.state.tobytes()
        assert a.prev_state.tobytes() == b.prev_state.tobytes()
        a_fields = {k: v for k, v in vars(a).items() if k not in ("state", "prev_state")}
        assert a_fields == {k: v for k, v in vars(b).items() if k not in ("state", "prev_state")}


def test_round_trip_is_exact() -> None:
    data = snapshot_format.encode(records())
    assert data.startswith(snapshot_format.MAGIC)
    assert_same(snapshot_format.decode(data), records())
    assert snapshot_format.decode(snapshot_format.encode([])) == []


def test_a_new_zero_state_session_without_a_last_token_round_trips() -> None:
    """A new session of a model that starts from zeros: zero state, last token -1 (none), position 0."""
    zero = np.zeros((2, 2, 3), np.float32)
    fresh = [SessionRecord("c" * 32, "zero", "1", 5, -1, 0, 1.0, 2.0, "", zero, zero.copy())]
    got = snapshot_format.decode(snapshot_format.encode(fresh))
    assert_same(got, fresh)
    assert got[0].last_token == -1


def test_a_changed_byte_fails_the_checksum() -> None:
    data = bytearray(snapshot_format.encode(records()))
    data[len(data) // 2] ^= 0x01
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        snapshot_format.decode(bytes(data))


def test_truncation_at_every_cut_point_is_refused() -> None:
    data = snapshot_format.encode(records()[1:])
    for cut in range(len(data)):
        with pytest.raises(SnapshotError, match="truncated") as refused:
            snapshot_format.decode(data[:cut])
        assert refused.type is SnapshotError and refused.value.kind == "corrupt"
    with pytest.raises(SnapshotError, match="extra bytes"):
        snapshot_format.decode(data + b"\0")


def test_other_files_and_versions_are_refused() -> None:
    data = snapshot_format.encode(records())
    with pytest.raises(SnapshotError, match="not an lstmd snapshot"):
        snapshot_format.decode(b"PK\x03\x04" + data[4:])
    newer = snapshot_format.MAGIC + struct.pack("<I", snapshot_format.FORMAT_VERSION + 1) + data[12:]
    with pytest.raises(UnsupportedVersion, match="format version 3; this lstmd reads versions 1 to 2") as refused:
        snapshot_format.decode(newer)
    assert refused.value.kind == "unsupported"


def test_a_payload_that_lies_about_its_shape_is_refused_even_with_a_valid_checksum() -> None:
    header = 8 + 4 + 8 + 32  # magic, version, length, sha256
    payload = snapshot_format.encode(records()[1:])[header:-8]  # no ended records' count, the last array cut short
    forged = snapshot_format.MAGIC + struct.pack("<IQ", 2, len(payload)) + hashlib.sha256(payload).digest() + payload
    with pytest.raises(SnapshotError, match="malformed payload: the payload ends inside a state array"):
        snapshot_format.decode(forged)


def test_write_replaces_the_file_atomically_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snap"
    size = snapshot_format.write(path, records(), 2)
    assert size == path.stat().st_size == len(snapshot_format.encode(records()))
    assert_same(snapshot_format.read(path), records())
    snapshot_format.write(path, records()[:1], 1)
    assert len(snapshot_format.read(path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sessions.snap"]  # no temporary file left


def test_a_failed_write_keeps_the_previous_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sessions.snap"
    snapshot_format.write(path, records(), 2)

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        snapshot_format.write(path, records()[:1], 1)
    monkeypatch.undo()
    assert_same(snapshot_format.read(path), records())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sessions.snap"]


def test_set_aside_keeps_the_file_under_a_new_name(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snap"
    path.write_bytes(b"junk")
    aside = snapshot_format.set_aside(path, "corrupt")
    assert not path.exists() and aside.read_bytes() == b"junk"
    assert aside.name.startswith("sessions.snap.corrupt-")


def test_a_large_file_is_refused_by_its_header_without_reading_the_rest(tmp_path: Path) -> None:
    """1 GB (sparse) behind a foreign start, and behind a snapshot header announcing another length:
    both refused from the header and the file's size, with almost nothing read into memory."""
    header = snapshot_format.encode(records())[: 8 + 4 + 8 + 32]
    for start, reason in ((b"PK\x03\x04", "not an lstmd snapshot"), (header, "extra bytes")):
        path = tmp_path / "sessions.snap"
        with open(path, "wb") as f:
            f.write(start)
            f.truncate(1 << 30)
        tracemalloc.start()
        try:
            with pytest.raises(SnapshotError, match=reason):
                snapshot_format.read(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"{peak} bytes allocated to refuse it"


@pytest.mark.timeout(30)
def test_a_path_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path: Path) -> None:
    """A FIFO would block a reader until a writer opened it: refused at once, as are a folder and a device."""
    fifo, folder, device = tmp_path / "fifo.snap", tmp_path / "folder.snap", tmp_path / "device.snap"
    os.mkfifo(fifo)
    folder.mkdir()
    device.symlink_to("/dev/zero")
    for path, kind in ((fifo, "a FIFO"), (folder, "a folder"), (device, "a character device")):
        with pytest.raises(NotRegularFile, match=f"not a regular file but {kind}") as refused:
            snapshot_format.read(path)
        assert refused.value.kind == "not-a-file"


@pytest.mark.timeout(30)
def test_write_replaces_whatever_is_left_under_the_temporary_name(tmp_path: Path) -> None:
    """A FIFO under the temporary file's name would block the write until a reader came."""
    path = tmp_path / "sessions.snap"
    os.mkfifo(path.with_name("sessions.snap.tmp"))
    snapshot_format.write(path, records(), 2)
    assert_same(snapshot_format.read(path), records())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sessions.snap"]


def test_ended_session_records_round_trip_and_a_version_1_file_still_reads() -> None:
    """Version 2 adds the records of why sessions ended after the sessions; a version 1 file (sessions
    only, as lstmd wrote before) reads with none."""
    endings = [Ending("c" * 32, "deleted", 1.7e9 + 0.25, "key-1"), Ending("d" * 32, "evicted", 1.8e9, "")]
    data = snapshot_format.encode(records(), endings)
    got = snapshot_format.decode_all(data)
    assert_same(got.sessions, records())
    assert got.endings == endings
    payload = data[8 + 4 + 8 + 32 :]
    without = snapshot_format.encode(records())[8 + 4 + 8 + 32 : -4]  # the sessions alone, no records' count
    assert payload.startswith(without)
    version_1 = snapshot_format.MAGIC + struct.pack("<IQ", 1, len(without)) + hashlib.sha256(without).digest() + without
    old = snapshot_format.decode_all(version_1)
    assert_same(old.sessions, records())
    assert old.endings == []
    with pytest.raises(SnapshotError, match="unknown reason 'gone'"):
        snapshot_format.decode(snapshot_format.encode([], [Ending("e" * 32, "gone", 1.0, "")]))


def test_write_keeps_the_ended_session_records(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snap"
    endings = [Ending("c" * 32, "expired", 1.7e9, "key-1")]
    snapshot_format.write(path, records(), 2, endings)
    assert snapshot_format.read_all(path).endings == endings
    assert_same(snapshot_format.read(path), records())
