"""Errors a user causes and fixes by changing an option. ``run.py`` prints the message (which
names the option and the fix) and exits with status 2, without a traceback."""


class ConfigError(ValueError):
    pass
