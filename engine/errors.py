"""Errors a user can fix. The CLI prints their message as one sentence and exits non-zero."""


class UserError(Exception):
    """Bad input (config, data, run id, file): the message says what is wrong and the fix."""
