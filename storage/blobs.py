"""The SQL image store: PNGs deduplicated by sha256, in the ``images`` table or in a directory.

:class:`SQLImageStore` implements the :class:`~storage.images.ImageStore` protocol over the
store's database; :class:`~storage.store.TrajectoryStore` is one. With ``files`` (a
:class:`~storage.images.DirectoryImageStore`) the bytes are files and the table keeps only the
metadata (``data`` NULL); the file is written before any row names it.

While a recorder is attached (``_attach_writer``), ``put`` only buffers a new image in memory —
readable at once — and the recorder writes every buffered image in the same transaction as its
next batch of steps, so images cost no commit of their own and are never durable after a step
that references them. Past ``max_pending_image_bytes`` (or with no recorder) ``put`` writes at
once, in its own transaction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, cast

from PIL import Image
from sqlalchemy import select

from storage.engine import Database
from storage.images import (
    DirectoryImageStore,
    ImageNotFound,
    InvalidImageRef,
    RecentImages,
    check_ref,
    decode_png,
    encode_png,
    image_ref,
)
from storage.records import StoredImage
from storage.rows import image_row
from storage.schema import ImageRow
from storage.writes import insert_images

_KNOWN_REFS_CAP = 200_000
"""How many refs known to be stored are remembered (to skip re-inserting them)."""

RECENT_IMAGE_BYTES = 64 << 20
"""Bytes of recently put or read images kept in memory. A trajectory reads back the image it
has just made (reflect, refine); content addressing makes the cache always valid."""


class SQLImageStore:
    def __init__(
        self, db: Database, files: DirectoryImageStore | None, max_pending_image_bytes: int
    ) -> None:
        self.db = db
        self.files = files
        self.max_pending_image_bytes = max_pending_image_bytes
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}
        self._pending_bytes = 0
        self._known: dict[str, None] = {}
        self._deferring = 0
        self.recent = RecentImages()
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0

    def put(self, image: Image.Image) -> str:
        data = encode_png(image)
        ref = self._put(data, image.size)
        self.recent.remember(ref, image)
        return ref

    def put_bytes(self, data: bytes) -> str:
        return self._put(bytes(data), None)

    def _put(self, data: bytes, size: tuple[int, int] | None) -> str:
        ref = image_ref(data)
        self._cache(ref, data)
        with self._lock:
            if ref in self._known or ref in self._pending:
                return ref
        row = image_row(ref, data, keep_bytes=self.files is None, size=size)
        if self.files is not None:
            self.files.put_bytes(data)  # the file is in place before any row names it
        with self._lock:
            if self._deferring and self._pending_bytes + len(data) <= self.max_pending_image_bytes:
                if ref not in self._pending:
                    self._pending[ref] = row
                    self._pending_bytes += len(data)
                return ref
        self.db.write(lambda conn: insert_images(conn, [row]))
        self._remember([ref])
        return ref

    def get(self, ref: str) -> Image.Image:
        return self.recent.recall(check_ref(ref)) or decode_png(self.get_bytes(ref))

    def get_bytes(self, ref: str) -> bytes:
        check_ref(ref)
        with self._lock:
            recent = self._recent.get(ref)
            if recent is not None:
                self._recent.move_to_end(ref)
                return recent
            pending = self._pending.get(ref)
        if pending is not None:
            if pending["data"] is not None:
                return cast(bytes, pending["data"])
            return self._file_bytes(ref)
        with self.db.read() as conn:
            row = conn.execute(select(ImageRow.data).where(ImageRow.sha256 == ref)).first()
        if row is None:
            raise ImageNotFound(ref)
        data = bytes(row[0]) if row[0] is not None else self._file_bytes(ref)
        self._cache(ref, data)
        return data

    def _cache(self, ref: str, data: bytes) -> None:
        with self._lock:
            if ref in self._recent or len(data) > RECENT_IMAGE_BYTES // 8:
                return
            self._recent[ref] = data
            self._recent_bytes += len(data)
            while self._recent_bytes > RECENT_IMAGE_BYTES:
                _, evicted = self._recent.popitem(last=False)
                self._recent_bytes -= len(evicted)

    image = get
    image_bytes = get_bytes

    def _file_bytes(self, ref: str) -> bytes:
        if self.files is None:
            raise ImageNotFound(
                f"{ref} (its bytes are in an image directory; open the store with image_dir=...)"
            )
        return self.files.get_bytes(ref)

    def __contains__(self, ref: object) -> bool:
        try:
            check_ref(ref)  # type: ignore[arg-type]
        except InvalidImageRef:
            return False
        with self._lock:
            if ref in self._pending or ref in self._known:
                return True
        with self.db.read() as conn:
            return conn.scalar(select(ImageRow.sha256).where(ImageRow.sha256 == ref)) is not None

    def image_info(self, ref: str) -> StoredImage:
        check_ref(ref)
        with self._lock:
            pending = self._pending.get(ref)
        if pending is not None:
            return StoredImage(ref, pending["width"], pending["height"], pending["size"], self.get)
        with self.db.read() as conn:
            row = conn.execute(
                select(ImageRow.width, ImageRow.height, ImageRow.size).where(ImageRow.sha256 == ref)
            ).first()
        if row is None:
            raise ImageNotFound(ref)
        return StoredImage(ref, row.width, row.height, row.size, self.get)

    def flush_images(self) -> int:
        """Write buffered images now; returns how many were written."""
        rows = self._pending_images()
        if rows:
            self.db.write(lambda conn: insert_images(conn, rows))
            self._images_committed(rows)
        return len(rows)

    # Used by SQLRecorder: buffering while attached, and the hand-over of buffered images.

    def _attach_writer(self) -> None:
        with self._lock:
            self._deferring += 1

    def _detach_writer(self) -> None:
        with self._lock:
            self._deferring = max(0, self._deferring - 1)
            idle = self._deferring == 0
        if idle:
            self.flush_images()

    def _pending_images(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._pending.values())

    def _images_committed(self, rows: Iterable[dict[str, Any]]) -> None:
        refs = []
        with self._lock:
            for row in rows:
                if self._pending.pop(row["sha256"], None) is not None:
                    self._pending_bytes -= row["size"]
                refs.append(row["sha256"])
        self._remember(refs)

    def _is_known(self, ref: str) -> bool:
        with self._lock:
            return ref in self._known

    def _remember(self, refs: Iterable[str]) -> None:
        with self._lock:
            for ref in refs:
                self._known[ref] = None
            while len(self._known) > _KNOWN_REFS_CAP:
                del self._known[next(iter(self._known))]
