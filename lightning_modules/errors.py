"""The one exception type for user mistakes: the CLI prints its message alone, without a traceback."""


class ConfigError(ValueError):
    """A config value, path or file the user gave is wrong; the message names it and says what to do."""


def close_names(name: str, candidates: list[str], n: int = 5) -> list[str]:
    """The candidates most similar to a misspelt name, best first."""
    import difflib

    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)


class TrainingStopped(RuntimeError):
    """Training cannot go on (the loss became NaN or infinite); the message says where and what is left."""
