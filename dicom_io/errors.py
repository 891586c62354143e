"""Errors raised for DICOM input that pacs-xai cannot use.

Each error says what was found and what the user can do about it; callers report the message
as it is (it never contains patient data, at most UIDs and attribute values).
"""


class DicomInputError(ValueError):
    """A file or dataset cannot be turned into model input (not DICOM, no pixels, ...)."""


class UnsupportedImageError(DicomInputError):
    """The image is DICOM with pixels, but in a form pacs-xai does not handle."""
