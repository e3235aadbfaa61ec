"""One error type for bad input, with messages that say what is wrong and how to fix it."""


class GradshieldError(ValueError):
    """Raised for invalid user input (data, models, checkpoints, options)."""
