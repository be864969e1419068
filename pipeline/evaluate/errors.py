"""The one error type of the evaluate stage: the CLI prints its message and exits 2 (no traceback)."""


class EvalError(ValueError):
    """A problem with the evaluation's inputs (task, folder, split, adapter), named in the message."""
