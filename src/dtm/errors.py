"""User-facing errors.

Every error a user can cause (bad config, bad data, bad model directory) is a `DtmError`.
The CLI prints its message and exits with status 2, without a traceback; anything else
is a bug in dtm and keeps its traceback.
"""

from __future__ import annotations


class DtmError(Exception):
    """An error in the user's input, with a message that says where and what to do."""


class ConfigError(DtmError):
    """A config file or override is invalid; the message names the file and the key."""


class DataError(DtmError):
    """A data file is unreadable or malformed; the message names the file and line."""


class TrainingError(DtmError):
    """Training cannot start or cannot go on; the message says which model, step or key."""


class OutputError(DtmError):
    """An output cannot be written (disk full, a path that cannot be made); the message names the path."""
