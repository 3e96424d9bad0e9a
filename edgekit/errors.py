"""User-facing errors.

What: ``EdgekitError`` is raised for bad input anywhere in the library (missing or corrupt
checkpoint, unknown architecture, NaN weights, bad recipe keys, empty data ...). Its message is one
line that says what is wrong and how to fix it. The CLI turns it into exit code 2 with no traceback.
"""


class EdgekitError(Exception):
    """Bad input the user can fix. The message names the fix."""

    exit_code = 2
