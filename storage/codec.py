"""Compact, bit-exact binary encodings of token ids and log-probs.

Token ids are int32 little-endian, log-probs float64 little-endian: 4 and 8 bytes per token,
independent of the machine's byte order, and a float64 round trip keeps every bit (subnormals,
``-0.0``, ``-745.1`` …). Pure standard library: no numpy needed to read a store.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

_BIG_ENDIAN = sys.byteorder == "big"
_INT32 = "i" if array("i").itemsize == 4 else "l"
if array(_INT32).itemsize != 4 or array("d").itemsize != 8:  # pragma: no cover - exotic ABI
    raise ImportError("storage.codec needs a 4-byte C int and an 8-byte C double")


def _pack(typecode: str, values: Iterable[int] | Iterable[float]) -> bytes:
    packed = array(typecode, values)  # type: ignore[arg-type]
    if _BIG_ENDIAN:  # pragma: no cover - no big-endian CI
        packed.byteswap()
    return packed.tobytes()


def _unpack(typecode: str, data: bytes, width: int) -> array:  # type: ignore[type-arg]
    if len(data) % width:
        raise ValueError(f"{len(data)} bytes is not a whole number of {width}-byte values")
    values = array(typecode)
    values.frombytes(data)
    if _BIG_ENDIAN:  # pragma: no cover
        values.byteswap()
    return values


def pack_ids(ids: Iterable[int]) -> bytes:
    """Token ids as int32 little-endian; ids outside [-2**31, 2**31) raise OverflowError."""
    return _pack(_INT32, ids)


def unpack_ids(data: bytes) -> tuple[int, ...]:
    return tuple(_unpack(_INT32, data, 4))


def pack_logprobs(logprobs: Iterable[float]) -> bytes:
    """Log-probs as float64 little-endian (IEEE 754 binary64: bit-exact)."""
    return _pack("d", logprobs)


def unpack_logprobs(data: bytes) -> tuple[float, ...]:
    return tuple(_unpack("d", data, 8))
