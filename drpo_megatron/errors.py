"""The errors we expect and explain.  The command line prints them once, from rank 0, as
``drpo <command>: <what is wrong and how to fix it>`` with no traceback (``--debug`` shows it),
and exits with :attr:`DrpoError.exit_code`: 2 for bad input (config, data, arguments, files the
user gave), 1 for a failure at run time (a server died, a checkpoint could not be written, the
loss went non-finite).  Anything else is a bug: it keeps its traceback, followed by one line
naming the logs.

A neutral module: it imports nothing, every layer may raise these.
"""

from __future__ import annotations


class DrpoError(Exception):
    """An expected, explained failure (message names the thing, the value and the fix)."""

    exit_code = 1


class InputError(DrpoError, ValueError):
    """Bad input from the user: a config value, a data file, a command-line argument."""

    exit_code = 2


class RuntimeFailure(DrpoError, RuntimeError):
    """Something failed while running (a server, a file system, the numbers)."""

    exit_code = 1


class CheckpointError(RuntimeFailure):
    """A checkpoint could not be written or read; the message names the directory and what is
    still intact."""


class NonFiniteError(RuntimeFailure):
    """The loss or the gradient went non-finite more often than ``train.max_nonfinite_steps``
    allows; the weights were not updated with it."""
