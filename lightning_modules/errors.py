"""The one exception type for user mistakes: the CLI prints its message alone, without a traceback."""


class ConfigError(ValueError):
    """A config value, path or file the user gave is wrong; the message names it and says what to do."""
