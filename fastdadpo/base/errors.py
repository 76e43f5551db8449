"""User-facing errors: one paragraph that names the file and line, or the config key, and says what
to do. The CLI prints these without a traceback and exits with status 2."""


class UserError(Exception):
    """Bad input from the user (a config, a data file, a flag): reported, never a traceback."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass
