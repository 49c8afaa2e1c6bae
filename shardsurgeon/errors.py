"""The project's exceptions: one base class, one subclass per layer.

Every message is one line that names the file, tensor or flag, says what was expected and what was
found, and what to do. The CLI prints ``str(error)`` and chooses the exit status by the error's
class; nothing matches on message text. Text from outside (names, paths) goes into a message
through :func:`safe_text`.
"""

import os


class ShardSurgeonError(Exception):
    """Base class of every error this library raises on purpose.

    Its text is one line whatever a message put in it: a name or path from outside that reached a
    message without :func:`safe_text` still has its line breaks and control characters escaped.
    """

    def __str__(self) -> str:
        return safe_text(super().__str__(), limit=None)


class FormatError(ShardSurgeonError):
    """A safetensors file or header breaks the format."""


class CheckpointError(ShardSurgeonError):
    """A checkpoint folder is missing, incomplete or inconsistent."""


class RecipeError(ShardSurgeonError):
    """A recipe (command-line flags or a mergekit config) is malformed or does not fit the model."""


class PlanError(ShardSurgeonError):
    """The recipe and the checkpoint cannot be combined into a plan."""


class OutputError(ShardSurgeonError):
    """The output folder cannot be written: exists, no room, not writable, or inside the source."""


class DestinationError(OutputError):
    """The output folder given is not acceptable: inside the source, a file, or not empty."""


class VerifyError(ShardSurgeonError):
    """An output checkpoint does not match what it should hold."""


MAX_QUOTED_CHARS = 200
"""Longest untrusted text quoted in a message: a line stays readable, a huge name costs nothing."""


def safe_text(value: object, limit: int | None = MAX_QUOTED_CHARS) -> str:
    """``value`` (a name, path or message from outside) as text safe for a one-line message.

    Control and other unprintable characters are escaped as ``repr`` escapes them (``\\n``,
    ``\\x1b``, ``\\u2028``), bytes of a name that is not valid UTF-8 as ``\\xNN``, and text longer
    than ``limit`` keeps its start and end around ``...``. The work is bounded by ``limit``, not by
    the length of ``value``. With ``limit`` None the text is escaped but kept whole.
    """
    text = os.fsdecode(value) if isinstance(value, bytes | os.PathLike) else str(value)
    if limit is None:
        return "".join(map(_escape, text))
    if len(text) > 2 * limit:  # only the two ends can be shown: escape no more than those
        text = text[:limit] + text[-limit:]
    escaped = "".join(map(_escape, text))
    if len(escaped) <= limit:
        return escaped
    tail = (limit - 3) // 3
    return escaped[: limit - 3 - tail] + "..." + escaped[len(escaped) - tail :]


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    if "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8, as os.fsdecode keeps it
        return f"\\x{ord(char) - 0xDC00:02x}"
    return repr(char)[1:-1]
