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

import os
import signal
import stat
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
        return
    previous = sys.unraisablehook

    def unraisable(args) -> None:
        # the handlers' exception raised inside a weakref callback or __del__, which Python swallows
        # (seen: importlib's module-lock callback during the CLI's imports): kept, raised again at the
        # next safe point (interrupts.check), not printed as "Exception ignored ..."
        keeper = sys.modules.get("ema_cli.interrupts")
        if keeper is not None and isinstance(args.exc_value, (KeyboardInterrupt, Terminated)):
            keeper.lost(args.exc_value)
            return
        previous(args)

    sys.unraisablehook = unraisable


def _quiet_exit(message: str | None, code: int) -> None:
    """Print the one line and leave with ``code``.

    ``os._exit``, not ``sys.exit``: CPython remembers a KeyboardInterrupt that
    escaped any ``exec``/``eval`` of a string during the imports (a flag in
    ``run_eval_code_obj``), and at the end of ``Py_RunMain`` it then kills the
    process with SIGINT, whatever exit code was asked for (seen here: exit -2
    instead of 130, about one interrupt in 150 during start-up).  Everything
    that needs cleaning (staging files, handles) was cleaned while the
    exception unwound to here."""
    # a second interrupt must not turn the exit into a traceback: ignored first thing (main imported
    # the module; a lookup, not the import machinery's Python code, where pending handlers would run)
    sys.modules["ema_cli.interrupts"].ignore()
    for stream, text in ((sys.stdout, ""), (sys.stderr, "" if message is None else message + "\n")):
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)


HEAD = 32 << 20  # bytes of each input file read while Python imports the CLI ...
HEADS = 256 << 20  # ... at most this many in all


def read_heads(args: list[str]) -> None:
    """Start reading the first bytes of every input file named on the command
    line, in a thread, while the CLI is imported (a quarter of a second of
    Python, numpy and typer): from a cold disk the header and the first
    tensors then arrive during start-up instead of after it (up to 256 MiB in
    that time).  ``posix_fadvise(WILLNEED)``, a hint, in 1 MiB calls (Linux
    reads at most max(read_ahead_kb, max_sectors_kb) per call); on the page
    cache a no-op.  Local regular files only, not the ``-o`` output (an
    existing one is replaced, not read)."""
    if not hasattr(os, "posix_fadvise"):
        return
    files = []
    for k, a in enumerate(args):
        if a.startswith("-") or "://" in a or (k and args[k - 1] in ("-o", "--output")):
            continue
        try:
            st = os.stat(a)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            files.append((a, st.st_size))
    if not files:
        return
    head = min(HEAD, HEADS // len(files))

    def run() -> None:
        for path, size in files:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            try:
                for off in range(0, min(head, size), 1 << 20):
                    os.posix_fadvise(fd, off, 1 << 20, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    import threading

    threading.Thread(target=run, name="ema-avg-read-heads", daemon=True).start()


def _import_cli():
    """``ema_cli.cli.main``, imported with the garbage collector paused.

    The imports (numpy, typer, the format registry) allocate enough objects for
    about 50 collections, and the first collections after them walk all of those
    objects: 20-40 ms of a small run, which find nothing to free.  What the
    imports made lives as long as the process, so it is moved to the permanent
    generation (``gc.freeze``, which CPython documents for objects that live
    forever) and later collections skip it.  Only the command line does this;
    the library leaves the host program's collector alone."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        from ema_cli.cli import main as cli_main
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
    return cli_main


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 1 and args[0] in ("--version", "-V"):  # answered before importing anything
        from ema_cli import __version__

        print(f"ema-avg {__version__}")
        return
    from ema_cli import interrupts

    interrupts.ends_at_commit = True  # this process ends with its command: a signal from the commit on is ignored
    try:
        install_signal_handlers()
        read_heads(args)
        cli_main = _import_cli()
        interrupts.check()  # a signal swallowed during the imports
        cli_main(argv)
    except SystemExit as e:
        interrupts.ignore()  # the outcome is printed: a late signal must not add a second line
        if e.code in (EXIT_INTERRUPTED, EXIT_TERMINATED):  # printed by the CLI; see _quiet_exit
            _quiet_exit(None, e.code)
        raise
    except KeyboardInterrupt:
        _quiet_exit("error: interrupted", EXIT_INTERRUPTED)
    except Terminated:
        _quiet_exit("error: terminated", EXIT_TERMINATED)


if __name__ == "__main__":
    main()
