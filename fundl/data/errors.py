"""Error types for data loading.

Every error names the file (or places) involved and says what was expected
and what was found, so a user can fix the problem without reading our code.
"""


class DataError(ValueError):
    """A data file exists but its content is wrong (bad header, size, checksum...)."""


class DataNotFoundError(FileNotFoundError):
    """Data files are missing; the message lists every place searched and how to get them."""


class DownloadError(RuntimeError):
    """Every mirror failed; the message lists each URL tried and why it failed."""
