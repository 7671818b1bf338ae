"""The one exception type for mistakes a user can fix (bad path, unknown key, wrong checkpoint).

The CLI prints such an error as a single line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line that names the thing and the fix."""
