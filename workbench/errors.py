"""The one user-facing error class: bad config, data, artifact or argument."""


class WorkbenchError(Exception):
    """An error in something the user gave us; the CLI prints it on one line and exits 2.

    Messages name the file and field and say what was expected, e.g.
    ``configs/grokking.yaml: task.p: 91 is not prime, but op '/' needs an inverse``.
    """
