"""The exceptions that mean "bad input" (shown to a user as one line, never a traceback)."""
from __future__ import annotations

from ddlib.methods.base import DivergenceError

# ValueError covers DatasetFormatError, SynsetFormatError, DatasetMismatchError and bad settings;
# OSError covers missing files and folders (DatasetNotFoundError is a FileNotFoundError).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, DivergenceError)
