"""Lists of strings in ``.npz`` files, stored variable-length: every string's UTF-8 bytes in one
``uint8`` array and where each one ends in another. A fixed-width numpy string array pads every
row to the longest one (one 10,000-character item id made a catalogue's items file 31x larger)
and drops trailing NUL characters; this keeps each string as given, in about its own size.

Plain arrays in and out, no pickle: ``np.load(..., allow_pickle=False)`` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Lone surrogates (a file name that is not UTF-8, as Python decodes it) survive the round trip.
_ERRORS = "surrogatepass"


def packed(name: str, strings: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays that hold ``strings`` under ``name``: ``NAME_utf8`` and ``NAME_ends``."""
    encoded = [str(text).encode("utf-8", _ERRORS) for text in strings]
    ends = np.cumsum([len(data) for data in encoded], dtype=np.int64)
    return {f"{name}_utf8": np.frombuffer(b"".join(encoded), dtype=np.uint8),
            f"{name}_ends": ends if len(encoded) else np.zeros(0, np.int64)}


def has_strings(arrays: Mapping, name: str) -> bool:
    """Whether ``arrays`` (an npz file or a dict) hold ``name``, packed or fixed-width."""
    return f"{name}_ends" in arrays or name in arrays


def unpacked(arrays: Mapping, name: str) -> list[str]:
    """The strings stored under ``name``: packed by ``packed``, or a fixed-width array (what
    files written before held). ``ValueError`` when they are damaged: ends that go back, run
    past the bytes or leave some over, or bytes that are not UTF-8."""
    if f"{name}_ends" not in arrays:
        old = arrays[name]
        if old.dtype.kind not in "US" or old.ndim != 1:
            raise ValueError(f"{name} is not a list of strings")
        return [str(text) for text in old.tolist()]
    data, ends = arrays[f"{name}_utf8"], arrays[f"{name}_ends"]
    if (data.dtype != np.uint8 or data.ndim != 1 or ends.dtype.kind not in "iu"
            or ends.ndim != 1):
        raise ValueError(f"{name} is not a packed list of strings")
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    if len(ends) and ((np.diff(ends) < 0).any() or ends[0] < 0 or ends[-1] != len(data)):
        raise ValueError(f"the ends of {name} do not fit its bytes")
    if not len(ends) and len(data):
        raise ValueError(f"{name} holds bytes but no strings")
    buffer = data.tobytes()
    return [buffer[start:end].decode("utf-8", _ERRORS)
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True)]
