"""The one base class for problems the user can fix; the CLI prints these without a traceback."""


class UserError(ValueError):
    """Bad input or configuration. The message names the file/line, field or config key, and what to do."""
