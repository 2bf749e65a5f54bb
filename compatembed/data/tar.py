"""An ImageFolder tree read straight out of a plain tar archive, without extracting it."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import tarfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
from torch.utils.data import Dataset

from compatembed.data._common import Transform, as_int64, decode_rgb, is_image_name
from compatembed.errors import DataError

_logger = logging.getLogger(__name__)


class ImageFolderTar(Dataset):
    """Images of a tar archive holding an ImageFolder tree, e.g. ``train/<class>/0000.jpg``.

    The class of a member is the last directory above it, so a leading split folder
    (``train/``, ``test/``) or any other prefix is handled without configuration. Classes are
    sorted by name and members by path within each class, which fixes item ids.

    The archive is indexed once at construction (member name, data offset, size) and each item is
    read by seeking to its offset. The file handle is opened lazily and reopened in every new
    process (the pid is checked on each read), so the dataset pickles, and DataLoader workers, forked
    or spawned, never share a file position. Nothing is written to disk: the archive may sit on a
    read-only share.

    Args:
        path: A plain (uncompressed) ``.tar`` file; compressed archives cannot be read by offset.
        transform: Applied to each PIL RGB image; ``None`` returns the image itself.

    Attributes:
        members: Member names, in item order.
        offsets: Byte offsets of the members' data, int64 ``(N,)``.
        sizes: Byte sizes of the members' data, int64 ``(N,)``.
        targets: Labels, int64 ``(N,)``.
        ids: Item ids, int64 ``(N,)`` (``arange(N)``).
        classes: Class names; ``classes[label]`` names a label.

    Raises:
        DataError: The file is missing, not a plain tar archive, or holds no image in a class folder.
    """

    def __init__(self, path: str | os.PathLike[str], transform: Transform | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"dataset path not found: {self.path}")
        self.path = Path(os.path.abspath(self.path))  # workers and readers may run from another directory
        start = time.perf_counter()
        entries, skipped = self._index(self.path)
        if not entries:
            raise DataError(f"no images in class folders inside {self.path} (expected [split/]<class>/<image>)")
        self.classes: list[str] = sorted({cls for cls, _, _, _ in entries})
        label_of = {name: i for i, name in enumerate(self.classes)}
        entries.sort(key=lambda e: (label_of[e[0]], e[1].split("/")))
        self.members: list[str] = [name for _, name, _, _ in entries]
        self.offsets: np.ndarray = as_int64([off for _, _, off, _ in entries])
        self.sizes: np.ndarray = as_int64([size for _, _, _, size in entries])
        self.targets: np.ndarray = as_int64([label_of[cls] for cls, _, _, _ in entries])
        self.ids: np.ndarray = np.arange(len(entries), dtype=np.int64)
        self.transform = transform
        self._fh: IO[bytes] | None = None
        self._pid: int | None = None
        self._lock: threading.Lock | None = None
        _logger.info(
            "indexed %s: %d images, %d classes in %.2f s (%d non-image or class-less members skipped)",
            self.path,
            len(entries),
            len(self.classes),
            time.perf_counter() - start,
            skipped,
        )

    @staticmethod
    def _index(path: Path) -> tuple[list[tuple[str, str, int, int]], int]:
        """Return ``(class, member name, data offset, size)`` per image member, and the skipped count."""
        members = _scan_ustar(path)
        if members is None:  # headers the fast scan does not handle (sparse, V7...): let tarfile read them
            members = _scan_tarfile(path)
        entries: list[tuple[str, str, int, int]] = []
        skipped = 0
        for name, offset, size in members:
            parts = name.split("/")
            if "" in parts or "." in parts:  # "./train/x.jpg", "a//b.jpg": rare, normalise
                parts = [p for p in parts if p and p != "."]
            if len(parts) < 2 or not is_image_name(parts[-1]) or any(p[0] == "." for p in parts[:-1]):
                skipped += 1
                continue
            entries.append((parts[-2], name, offset, size))
        return entries, skipped

    def _handle(self) -> tuple[IO[bytes], threading.Lock]:
        # A forked child inherits the parent's handle and with it a shared file position: reopen.
        pid = os.getpid()
        if self._fh is None or self._pid != pid or self._lock is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open across reads, closed in close()
            self._pid = pid
            self._lock = threading.Lock()
        return self._fh, self._lock

    def read_bytes(self, index: int) -> bytes:
        """Return the encoded bytes of item ``index`` as stored in the archive."""
        offset, size = int(self.offsets[index]), int(self.sizes[index])
        fh, lock = self._handle()
        with lock:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise DataError(f"truncated tar archive {self.path}: member {self.members[index]} is cut short")
        return data

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = decode_rgb(self.read_bytes(index), f"{self.path}:{self.members[index]}")
        label = int(self.targets[index])
        return (self.transform(image) if self.transform is not None else image), label

    def close(self) -> None:
        """Close this process's file handle (reads reopen it)."""
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fh=None, _pid=None, _lock=None)
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down globals
            self.close()

    def __repr__(self) -> str:
        return f"ImageFolderTar(path={str(self.path)!r}, n={len(self)}, classes={len(self.classes)})"


_BLOCK = 512
_USTAR_MAGICS = (b"ustar\x0000", b"ustar  \x00")
_REGULAR = (b"0", b"\x00", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: no data follows


def _scan_tarfile(path: Path) -> list[tuple[str, int, int]]:
    """Regular members ``(name, data offset, size)`` through :mod:`tarfile` (every header format)."""
    try:
        with tarfile.open(path, mode="r:") as tf:
            return [(m.name, m.offset_data, m.size) for m in tf if m.isreg()]
    except tarfile.ReadError as e:
        raise DataError(f"not a plain (uncompressed) tar archive: {path} ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read tar archive {path}: {e}") from None


def _scan_ustar(path: Path) -> list[tuple[str, int, int]] | None:
    """Regular members ``(name, data offset, size)`` of a ustar, GNU or pax archive, or None.

    About ten times faster than :mod:`tarfile` on 50k members, which matters because every run
    indexes its archives. Handles long names (ustar prefix, pax ``path``, GNU ``L``) and pax sizes;
    returns None as soon as it meets anything else (sparse files, base-256 sizes, pre-POSIX headers,
    a bad checksum, a truncated file) so the caller falls back to :mod:`tarfile`, which also
    produces the error for a file that is no tar.
    """
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _scan_ustar_buffer(mm)
    except (OSError, ValueError):  # ValueError: mmap of an empty file
        return None


def _scan_ustar_buffer(buf: mmap.mmap) -> list[tuple[str, int, int]] | None:
    total = len(buf)
    members: list[tuple[str, int, int]] = []
    headers: list[int] = []
    pending: dict[bytes, bytes] = {}  # pax / GNU long-name values for the next member
    pos = 0
    while pos + _BLOCK <= total:
        header = buf[pos : pos + _BLOCK]
        if header[:100].count(0) == 100 and header == bytes(_BLOCK):
            break  # end-of-archive marker
        magic = header[257:265]
        if magic not in _USTAR_MAGICS:
            return None
        kind = header[156:157]
        size_field = header[124:136]
        if size_field[:1] and size_field[0] & 0x80:
            return None  # base-256 size
        try:
            size = int(size_field.rstrip(b"\x00 ").lstrip(b" ") or b"0", 8)
        except ValueError:
            return None
        headers.append(pos)
        data = pos + _BLOCK
        if data + size > total:
            return None
        if kind in (b"x", b"g"):  # pax extended header: for the next member, or global
            records = _pax_records(buf[data : data + size])
            if records is None or any(k.startswith(b"GNU.sparse") for k in records):
                return None
            if kind == b"x":
                pending.update(records)
            elif b"path" in records or b"size" in records:
                return None
        elif kind == b"L":  # GNU long name of the next member
            pending[b"path"] = buf[data : data + size].split(b"\x00", 1)[0]
        elif kind == b"K":  # GNU long link target: irrelevant here
            pass
        elif kind in _REGULAR or kind in _NO_DATA:
            if b"size" in pending:
                try:
                    size = int(pending[b"size"])
                except ValueError:
                    return None
                if data + size > total:
                    return None
            if b"path" in pending:
                name = pending[b"path"]
            else:
                name = header[:100].split(b"\x00", 1)[0]
                prefix = header[345:500].split(b"\x00", 1)[0] if magic == _USTAR_MAGICS[0] else b""
                if prefix:
                    name = prefix + b"/" + name
            pending = {}
            if kind in _NO_DATA:
                size = 0  # like tarfile: only regular members are followed by data
            elif not name.endswith(b"/"):  # a pre-POSIX directory is a regular entry ending in "/"
                members.append((name.decode("utf-8", "surrogateescape"), data, size))
        else:
            return None  # sparse files, volume headers, vendor extensions
        pos = data + -(-size // _BLOCK) * _BLOCK
    else:
        if pos < total:
            return None  # trailing bytes that are no full header
    if not _checksums_ok(buf, headers):
        return None
    return members


def _pax_records(block: bytes) -> dict[bytes, bytes] | None:
    """Parse pax records (``b"<len> <key>=<value>\\n"``), or None when malformed."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(block) and block[pos : pos + 1] != b"\x00":
        space = block.find(b" ", pos)
        if space < 0 or not block[pos:space].isdigit():
            return None
        length = int(block[pos:space])
        record = block[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            return None
        key, value = record[:-1].split(b"=", 1)
        records[key] = value
        pos += length
    return records


def _checksums_ok(buf: mmap.mmap, headers: list[int]) -> bool:
    """Verify every header's checksum (unsigned sum with the checksum field read as spaces), vectorised."""
    if not headers:
        return True
    data = np.frombuffer(buf, dtype=np.uint8)
    cols = np.arange(_BLOCK)
    chunk = 4096
    try:
        for i in range(0, len(headers), chunk):
            rows = np.asarray(headers[i : i + chunk], dtype=np.int64)
            block = data[rows[:, None] + cols]
            actual = block.sum(axis=1, dtype=np.int64) - block[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
            fields = block[:, 148:156].tobytes()
            for j in range(len(rows)):
                raw = fields[8 * j : 8 * j + 8].split(b"\x00", 1)[0].strip()
                if not raw or int(raw, 8) != actual[j]:
                    return False
    except ValueError:
        return False
    finally:
        del data
    return True
