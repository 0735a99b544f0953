"""One exception type for everything a user can get wrong; the CLI prints it as one line."""


class Qwen2Error(Exception):
    """A clear, user-facing error (bad path, bad checkpoint, bad argument)."""


class CheckpointError(Qwen2Error):
    """A checkpoint file or its config is missing, corrupt or does not match the model."""
