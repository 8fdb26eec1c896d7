"""The one user-facing error class: bad config, data, artifact or argument."""


class WorkbenchError(Exception):
    """An error in something the user gave us; the CLI prints it on one line and exits 2.

    Messages name the file and field and say what was expected, e.g.
    ``configs/grokking.yaml: task.p: 91 is not prime, but op '/' needs an inverse``.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): errors are said on one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
