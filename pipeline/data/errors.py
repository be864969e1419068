"""The one exception type of the prep stage, so the CLI can print it without a traceback."""


class PrepError(ValueError):
    """Bad input or configuration found while preparing data; the message names the file/line/task/field."""
