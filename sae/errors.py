"""One kind of user-facing error, and the way entry points report it."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class ConfigError(Exception):
    """Bad input: the message names the problem and the way out, in one line."""


class TrainingDiverged(ConfigError):
    """The loss stopped being finite; reported like bad input (one line, exit 2)."""


def exit_on_config_error(fn: F) -> F:
    """Wrap an entry point so a ConfigError prints one line to stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
