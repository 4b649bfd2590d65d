"""User-facing errors: one line, actionable; the CLI prints them without a traceback."""


class MambaCliError(Exception):
    """An error the user can act on. str(e) is the whole message, one line."""


class ModelFormatError(MambaCliError):
    """A model file or folder is malformed, incomplete or of an unsupported kind."""


class ResourceError(MambaCliError):
    """The model or context does not fit in the memory or device available."""
