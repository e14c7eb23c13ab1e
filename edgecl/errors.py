"""Errors a user or a client can cause. The CLI prints these as one line, never a traceback."""


class UserError(Exception):
    """Bad configuration, bad arguments, a port in use, a missing file: the user can fix it."""
