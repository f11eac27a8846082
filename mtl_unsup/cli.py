"""Console commands: a user's mistake ends with one message and exit status 2, a bug with its
traceback and exit status 1.

Hydra prints a failed composition (misspelt key, wrong type, unknown group option) as one message
but exits 1, and prints an exception raised in the task function with its traceback. Here a
composition failure (before the task function started) and a :class:`UserError` or a required
``???`` value left out in the task function (under ``-m`` too) end with the message alone and
exit status 2; any other exception is left to Hydra. ``HYDRA_FULL_ERROR=1`` shows the full
trace of all of them.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import CompactHydraException, ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from mtl_unsup.config import CONF_DIR
from mtl_unsup.console import quiet_third_party
from mtl_unsup.errors import UserError

USAGE_ERROR = 2  # the exit status of a user's mistake, as for a wrong command-line flag

TaskFunction = Callable[[DictConfig], Any]


class ReportedUserError(CompactHydraException):
    """A UserError raised in a task function: Hydra prints a compact exception's message alone.

    It also travels back from a job run elsewhere (submitit), where no state of ours is shared.
    """


class _Progress:
    task_started = False  # composition succeeded and a task function was called


def full_error() -> bool:
    """``HYDRA_FULL_ERROR=1``: every error keeps its full traceback (Hydra's own switch)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def user_message(err: BaseException | None) -> str | None:
    """The message of a user's mistake in ``err`` or what it was raised from (``instantiate``
    wraps a constructor's error); None for anything else."""
    while err is not None:
        if isinstance(err, UserError):
            return str(err)
        if isinstance(err, MissingMandatoryValue):  # a `???` in the config was not given
            return f"{err.full_key} is required: add {err.full_key}=<value> to the command."
        err = err.__cause__
    return None


def _reporting_user_errors(task: TaskFunction) -> TaskFunction:
    """The task function, with a user's mistake in it re-raised as a :class:`ReportedUserError`."""

    @functools.wraps(task)  # Hydra unwraps it to name the job after the task's module
    def run_task(cfg: DictConfig) -> Any:
        _Progress.task_started = True
        try:
            return task(cfg)
        except Exception as err:
            message = user_message(err)
            if message is None or full_error():  # a bug, or the full trace asked for
                raise
            raise ReportedUserError(f"error: {message}") from None

    return run_task


def _is_user_mistake(err: BaseException | None) -> bool:
    """Whether the exception Hydra reported was a user's mistake (not a bug in a task function)."""
    if isinstance(err, ReportedUserError):
        return True
    composing = isinstance(err, ConfigCompositionException | OverrideParseException)
    return composing and not _Progress.task_started


# Groups a config's defaults list names in another's choice (train.yaml: ${protocol}_${backbone}):
# set to null or deleted, Hydra stops with a traceback rather than a message.
NEEDED_GROUPS = {"train": ("protocol", "backbone")}


def removed_group(argv: list[str], groups: tuple[str, ...]) -> str | None:
    """The message for a command line that sets one of ``groups`` to null or deletes it."""
    for arg in argv:
        name, _, value = arg.partition("=")
        if name.lstrip("~") in groups and (value == "null" or name.startswith("~")):
            return (f"error: {arg}: the run needs one of conf/{name.lstrip('~')}/'s options"
                    + (" (protocol=single trains the listed tasks in one stage)." if "protocol" in name
                       else "."))
    return None


def exit_2_on_user_errors(main: Callable[..., Any], groups: tuple[str, ...] = ()) -> Callable[..., Any]:
    """Run a command's ``main``; a user's mistake ends with its message and exit status 2."""

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> Any:
        if full_error():
            return main(*args, **kwargs)
        removed = removed_group(sys.argv[1:], groups)
        if removed:  # in the form Hydra gives its own messages
            print(f"{removed}\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.",
                  file=sys.stderr)
            raise SystemExit(USAGE_ERROR)
        try:
            return main(*args, **kwargs)
        except SystemExit as done:  # Hydra has printed the message and exits 1
            if done.code == 1 and _is_user_mistake(done.__context__):
                raise SystemExit(USAGE_ERROR) from None
            raise
        except (UserError, ReportedUserError) as err:  # without Hydra (mtl-report), or main(cfg)
            message = str(err) if isinstance(err, ReportedUserError) else f"error: {err}"
            print(message, file=sys.stderr)
            raise SystemExit(USAGE_ERROR) from None

    return run


def hydra_command(config_name: str) -> Callable[[TaskFunction], Callable[..., Any]]:
    """``@hydra.main`` on ``conf/<config_name>.yaml`` for a console command, with the exit
    statuses above."""

    def decorate(task: TaskFunction) -> Callable[..., Any]:
        quiet_third_party()
        hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
        return exit_2_on_user_errors(hydra_main(_reporting_user_errors(task)),
                                     NEEDED_GROUPS.get(config_name, ()))

    return decorate
