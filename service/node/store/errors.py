"""What the store raises: :class:`StoreError` when storing fails, :class:`InvalidUIDError` (a
StoreError) for a UID that must not become part of a path or a row, and :func:`validate_uid`, the
check that raises it.

The receiver tells the two apart: a StoreError is answered 0xA700 "out of resources" (disk full,
permission, broken path, database error; the sender retries later), an InvalidUIDError is "cannot
understand".
"""

from __future__ import annotations

import re

__all__ = ["InvalidUIDError", "StoreError", "validate_uid"]

# A DICOM UID is digits and dots, at most 64 characters, no empty component. Leading zeros in a
# component are not conformant but occur in the wild; they are accepted since they are path-safe.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_MAX_LENGTH = 64


class StoreError(RuntimeError):
    """Storing failed (disk full, permission, broken path, database error): answer OUT_OF_RESOURCES."""


class InvalidUIDError(StoreError, ValueError):
    """A UID that is not a DICOM UID: refused before it can become part of a path."""


def validate_uid(value: str, name: str = "UID") -> str:
    """``value`` when it is a DICOM UID (digits and dots, at most 64 characters), else InvalidUIDError."""
    if not isinstance(value, str) or len(value) > _UID_MAX_LENGTH or not _UID_PATTERN.match(value):
        raise InvalidUIDError(
            f"{name} {value!r} is not a DICOM UID (digits and dots, at most {_UID_MAX_LENGTH} characters)"
        )
    return value
