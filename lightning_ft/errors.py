"""The one exception type for bad input: the entry points print its message alone, without a traceback."""


class UserError(ValueError):
    """A mistake in the user's config or data, with a message that names the thing and the fix."""
