"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad config, missing or corrupt data, a refused checkpoint: the message names the problem and the fix."""


class DataError(UserError):
    """A dataset is missing, truncated or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint is incomplete or fails its checksums."""
