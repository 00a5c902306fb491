"""The two kinds of failure.

`UserError` is the input's fault (a missing file, a bad flag, a model that cannot be read or written):
the CLI prints its message on one line and exits with code 2. Any other exception is a bug in lc-onnx
and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something about the user's input or environment that lc-onnx cannot work with."""

    exit_code = 2


class VerificationError(UserError):
    """The fused model does not match the original within the allowed error; nothing was written."""

    exit_code = 1
