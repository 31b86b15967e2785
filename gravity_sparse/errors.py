"""User errors: problems with the user's input, reported as one line and a non-zero exit (no traceback)."""


class UserError(Exception):
    """Bad input from the user (path, file, config, budget). The CLI prints `error: <message>` and exits 2."""
