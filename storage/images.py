"""Content-addressed image store: state holds sha256 references, never pixels.

An image is stored once as PNG bytes under the sha256 of those bytes. References are validated
as 64 lowercase hex digits before they touch a path, so a reference can never walk out of the
store's directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

_REF_RE = re.compile(r"[0-9a-f]{64}")


class ImageNotFound(KeyError):
    pass


class InvalidImageRef(ValueError):
    pass


def encode_png(image: Image.Image) -> bytes:
    """Deterministic PNG bytes for an image (same pixels and mode → same bytes → same ref)."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def image_ref(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_ref(ref: str) -> str:
    if not isinstance(ref, str) or not _REF_RE.fullmatch(ref):
        raise InvalidImageRef(f"not an image reference (64 hex digits): {ref!r}")
    return ref


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@runtime_checkable
class ImageStore(Protocol):
    def put(self, image: Image.Image) -> str: ...
    def put_bytes(self, data: bytes) -> str: ...
    def get(self, ref: str) -> Image.Image: ...
    def get_bytes(self, ref: str) -> bytes: ...
    def __contains__(self, ref: object) -> bool: ...


class _StoreBase:
    def put(self, image: Image.Image) -> str:
        return self.put_bytes(encode_png(image))

    def put_bytes(self, data: bytes) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def get_bytes(self, ref: str) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def get(self, ref: str) -> Image.Image:
        return decode_png(self.get_bytes(ref))


class MemoryImageStore(_StoreBase):
    """Images in a dict. The default for one-off runs and tests."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put_bytes(self, data: bytes) -> str:
        ref = image_ref(data)
        with self._lock:
            self._blobs.setdefault(ref, data)
        return ref

    def get_bytes(self, ref: str) -> bytes:
        try:
            return self._blobs[check_ref(ref)]
        except KeyError:
            raise ImageNotFound(ref) from None

    def __contains__(self, ref: object) -> bool:
        return isinstance(ref, str) and ref in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)


class DirectoryImageStore(_StoreBase):
    """Images as files ``root/ab/<sha256>.png``; writes are atomic (temp file + rename).

    A written file survives the process being killed (it is in the OS page cache). With
    ``fsync=True`` the file and its directory entry are also flushed to disk before ``put``
    returns, so they survive a power loss.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync

    def path_for(self, ref: str) -> Path:
        ref = check_ref(ref)
        return self.root / ref[:2] / f"{ref}.png"

    def put_bytes(self, data: bytes) -> str:
        ref = image_ref(data)
        path = self.path_for(ref)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(path.parent)
        return ref

    def get_bytes(self, ref: str) -> bytes:
        try:
            return self.path_for(ref).read_bytes()
        except FileNotFoundError:
            raise ImageNotFound(ref) from None

    def __contains__(self, ref: object) -> bool:
        try:
            return self.path_for(ref).exists()  # type: ignore[arg-type]
        except InvalidImageRef:
            return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
