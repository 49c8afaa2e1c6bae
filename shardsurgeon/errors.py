"""The project's exceptions: one base class, one subclass per layer.

Every message is one line that names the file, tensor or flag, says what was expected and what was
found, and what to do. The CLI prints ``str(error)`` and chooses the exit status by the error's
class; nothing matches on message text.
"""


class ShardSurgeonError(Exception):
    """Base class of every error this library raises on purpose."""


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
