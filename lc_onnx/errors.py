"""The two kinds of failure, and the one way an exception becomes one line.

`UserError` is the input's fault (a missing file, a bad option, a model that cannot be read or written):
the CLI prints its message on one line and exits with code 2. Any other exception is a bug in lc-onnx
and keeps its traceback.

A library error names the *parameter* at fault (`max_batch_size`), never a command-line flag: the message
is a template with `{name}` placeholders for the parameters in `params`. `str(error)` fills them with the
Python names; the CLI renders the same error with its flag names (`--max-batch-size`), so a Python caller
and a CLI user each read their own spelling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class UserError(Exception):
    """Something about the user's input or environment that lc-onnx cannot work with.

    Args:
        message: the one-line message; each `{name}` in it, for a `name` in `params`, is the place where
            that parameter is named (other braces are left as they are).
        params: the parameters the message names.
    """

    exit_code = 2

    def __init__(self, message: str, *, params: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.params = tuple(params)

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each parameter spelled as `names` says (default: its own name)."""
        names = names or {}
        text = self.message
        for p in self.params:
            text = text.replace("{" + p + "}", names.get(p, p))
        return text

    def __str__(self) -> str:
        return self.render()


class VerificationError(UserError):
    """The fused model does not match the original within the allowed error; nothing was written."""

    exit_code = 1


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's message on one line: every non-empty line joined (onnxruntime spreads one message
    over several: "index: 0 Got: 2 Expected: 3"), a trailing period dropped, at most `limit` characters;
    the exception's type name when it has no message."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text.rstrip(".")[:limit] or type(exc).__name__
