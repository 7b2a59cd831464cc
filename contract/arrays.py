"""Binary arrays on the wire: base64 of little-endian float16/float32 with explicit shape and dtype."""

from __future__ import annotations

import base64
import binascii
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

WireDtype = Literal["float16", "float32"]

# Upper bound on one array's element count: a contribution is a few KB; anything near this
# is a mistake or an attack, and it is refused before base64 decoding allocates it.
MAX_ELEMENTS = 1 << 20


class ArrayPayload(BaseModel):
    """A dense array: `data` is base64 of the little-endian bytes, row-major."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: WireDtype = Field(description="Element type, little-endian.")
    shape: list[int] = Field(min_length=1, max_length=4, description="Array shape, row-major.")
    data: str = Field(description="Base64 (RFC 4648, with padding) of the raw bytes.")

    @model_validator(mode="after")
    def _check_bytes(self) -> ArrayPayload:
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape {self.shape} has a negative dimension")
        n = int(np.prod(self.shape, dtype=np.int64))
        if n > MAX_ELEMENTS:
            raise ValueError(f"shape {self.shape} has {n} elements; at most {MAX_ELEMENTS} are accepted")
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"data is not valid base64: {err}") from None
        itemsize = np.dtype(self.dtype).itemsize
        if len(raw) != n * itemsize:
            raise ValueError(
                f"data holds {len(raw)} bytes but shape {self.shape} with dtype {self.dtype} needs {n * itemsize}"
            )
        values = np.frombuffer(raw, dtype=np.dtype(self.dtype).newbyteorder("<"))
        if not np.all(np.isfinite(values)):
            raise ValueError("array contains NaN or infinite values")
        return self

    @classmethod
    def from_numpy(cls, array: np.ndarray, dtype: WireDtype = "float16") -> ArrayPayload:
        """Encode `array` as `dtype`; refuses non-finite values and values that overflow it."""
        src = np.asarray(array, dtype=np.float64)
        if not np.all(np.isfinite(src)):
            raise ValueError("array contains NaN or infinite values")
        if src.size and np.abs(src).max() > np.finfo(dtype).max:
            raise ValueError(f"array has values out of {dtype} range (|x| > {np.finfo(dtype).max})")
        wire = src.astype(np.dtype(dtype).newbyteorder("<"))
        return cls(
            dtype=dtype,
            shape=list(wire.shape),
            data=base64.b64encode(wire.tobytes(order="C")).decode("ascii"),
        )

    def to_numpy(self) -> np.ndarray:
        """Decode to a native-endian float32 array of `shape`."""
        raw = base64.b64decode(self.data)
        values = np.frombuffer(raw, dtype=np.dtype(self.dtype).newbyteorder("<"))
        return values.reshape(self.shape).astype(np.float32)
