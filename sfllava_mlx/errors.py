"""Errors a user can cause. The CLI prints the message as one line and exits with 2."""


class UserError(Exception):
    """A problem with the user's input, not a bug: reported without a traceback."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details  # printed after the first line (e.g. a tensor report)


class VideoError(UserError):
    """The video is missing, unreadable or unusable."""


class CheckpointError(UserError):
    """The checkpoint or model directory cannot be used."""


class ContextOverflowError(UserError):
    """The conversation would pass the model's context length."""


class MemoryPlanError(UserError):
    """A request that will not fit in memory."""
