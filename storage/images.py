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
from collections import OrderedDict
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


class RecentImages:
    """A small LRU of decoded images by reference.

    A trajectory reads back the image it has just made (reflect, then refine), so decoding the
    PNG it has just encoded is wasted work. Images go in and come out as copies: a caller that
    draws on what it got cannot change what the next caller gets.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, ref: str, image: Image.Image) -> None:
        if image.mode not in ("RGB", "RGBA", "L"):  # what encode_png stores is converted
            return
        copy = image.copy()
        with self._lock:
            self._images[ref] = copy
            self._images.move_to_end(ref)
            while len(self._images) > self.capacity:
                self._images.popitem(last=False)

    def recall(self, ref: str) -> Image.Image | None:
        with self._lock:
            image = self._images.get(ref)
            if image is None:
                return None
            self._images.move_to_end(ref)
        return image.copy()


@runtime_checkable
class ImageStore(Protocol):
    def put(self, image: Image.Image) -> str: ...
    def put_bytes(self, data: bytes) -> str: ...
    def get(self, ref: str) -> Image.Image: ...
    def get_bytes(self, ref: str) -> bytes: ...
    def __contains__(self, ref: object) -> bool: ...


class _StoreBase:
    recent: RecentImages

    def put(self, image: Image.Image) -> str:
        ref = self.put_bytes(encode_png(image))
        self.recent.remember(ref, image)
        return ref

    def put_bytes(self, data: bytes) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def get_bytes(self, ref: str) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def get(self, ref: str) -> Image.Image:
        return self.recent.recall(check_ref(ref)) or decode_png(self.get_bytes(ref))


class MemoryImageStore(_StoreBase):
    """Images in a dict. The default for one-off runs and tests."""

    def __init__(self) -> None:
        self.recent = RecentImages()
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
        self.recent = RecentImages()

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
