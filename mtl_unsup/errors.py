"""The base class of every mistake a user can make and fix: a config value, a folder, an image,
a checkpoint, a run directory.

The console commands (:mod:`mtl_unsup.cli`) end on one of these with its message alone and exit
status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for; the message names the key or path and the fix."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable, not one of mtl-unsup's, or of another model."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The weights diverged (a NaN or infinite loss, or features k-means cannot use); the run
    stops with its last good checkpoint kept."""
