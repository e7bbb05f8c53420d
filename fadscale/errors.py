"""The one exception type every stage raises for a problem a user can act on."""


class FadscaleError(Exception):
    """An error a user can act on: printed as one line, without a traceback, with a non-zero exit."""
