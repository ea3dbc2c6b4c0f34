"""The entry point (``ema-avg`` and ``python -m ema_cli``): signal handlers
first, then the command line.

Importing the CLI (typer, rich, numpy, ml_dtypes) takes a noticeable fraction
of a second.  A Ctrl-C in that window used to print Python's multi-line
KeyboardInterrupt traceback, and a SIGTERM killed the process without a word.
This module imports nothing heavy: it installs the SIGINT and SIGTERM
handlers, then imports ``ema_cli.cli`` and runs it, so an interrupt at any
moment ends with one line, ``error: interrupted`` (exit 130) or
``error: terminated`` (exit 143).
"""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so staging files are removed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def install_signal_handlers() -> None:
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
        # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (nohup, job control)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread (the CLI called from a library user's thread)
        pass


def _ignore_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _quiet_exit(message: str, code: int) -> None:
    _ignore_signals()  # a second interrupt must not turn the exit into a traceback
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        install_signal_handlers()
        from ema_cli.cli import main as cli_main

        cli_main(argv)
    except SystemExit:
        _ignore_signals()  # the outcome is printed: a late signal must not add a second line
        raise
    except KeyboardInterrupt:
        _quiet_exit("error: interrupted", EXIT_INTERRUPTED)
    except Terminated:
        _quiet_exit("error: terminated", EXIT_TERMINATED)


if __name__ == "__main__":
    main()
