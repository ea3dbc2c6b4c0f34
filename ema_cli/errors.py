"""The one exception type the CLI turns into ``error: ...`` lines.

Every failure caused by the user's input (files, options, data) is raised as
:class:`EmaError` with a one-line message that names the file and, where there
is one, the tensor.  Anything else reaching the CLI is a bug and is reported as
such (still without a traceback unless ``EMA_AVG_DEBUG=1``).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # bad input, failed check, failed write
EXIT_USAGE = 2  # bad command line (click/typer's own code)
EXIT_INTERRUPTED = 130  # Ctrl-C


class EmaError(Exception):
    """A user-facing failure: ``str(err)`` is the whole one-line message."""

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        self.path = path
        self.tensor = tensor
        parts = []
        if path:
            parts.append(str(path))
        if tensor:
            parts.append(f"tensor {tensor!r}")
        prefix = ": ".join(parts)
        msg = f"{prefix}: {message}" if prefix else message
        super().__init__(one_line(msg))

    def naming(self, path: str) -> "EmaError":
        """The same error, naming ``path`` instead of its own path (a staging
        path, which the user never named, becomes the output behind it)."""
        text, old = str(self), str(self.path)
        if self.path and text.startswith(old):
            text = path + text[len(old):]
        return _rebuild(type(self), text, path, self.tensor)

    def __reduce__(self):  # picklable with its path and tensor (errors raised on Dask workers)
        return (_rebuild, (type(self), str(self), self.path, self.tensor))


def _rebuild(cls, text: str, path, tensor):
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    err.path, err.tensor = path, tensor
    return err


def one_line(text: str) -> str:
    """Newlines become spaces; other control characters (e.g. in a tensor name
    read from a corrupt file) are escaped, so an error is always one line."""
    text = " ".join(text.split("\n"))
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class UsageError(EmaError):
    """Options that contradict each other or are out of range."""
