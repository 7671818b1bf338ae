"""The one exception type for mistakes a user can fix (bad path, unknown key, wrong checkpoint).

The CLI prints such an error as a single line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line that names the thing and the fix."""


def short_list(names: list[str] | tuple[str, ...], limit: int = 10) -> str:
    """Names for a one-line message: at most `limit`, then how many more."""
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
