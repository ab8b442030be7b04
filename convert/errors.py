"""The one exception type users see."""


class MixqError(Exception):
    """An error the user can act on.

    Its message is a single line that names the file, tensor or option at fault; the CLI prints it
    and exits non-zero instead of showing a traceback.
    """
