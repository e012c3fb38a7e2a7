"""User-facing errors.

A :class:`BenchError` is a mistake the user can fix (a config value, an unknown plugin, a
missing or corrupt file, a wrong shape, a NaN loss). The CLI prints its message alone, with
no traceback unless ``--debug``, and exits non-zero. Everything else is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BenchError(Exception):
    """An error caused by the user's input; the message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(BenchError):
    """A configuration value, file or override is invalid."""


class PluginNotFoundError(BenchError):
    """No registered plugin has the requested name."""


class DataError(BenchError):
    """A dataset file is missing, corrupt or has the wrong shape or content."""


class TrainingError(BenchError):
    """Training diverged (NaN/inf loss) or could not run."""

    exit_code = 3


class TrackingUnavailable(BenchError):
    """The tracking server stayed unreachable through the retries: the unit in progress
    failed, finished results are recorded, the run stops (every later unit would fail the
    same way)."""

    exit_code = 4


class StillRunning(BenchError):
    """Units of this sweep are held by other live processes (a sweep still running): this
    run did not start them, nor wait for them (``--wait`` follows them)."""

    exit_code = 5


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ``did you mean 'x'?`` hint for ``name`` among ``choices``, or ``""``."""
    matches = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"
