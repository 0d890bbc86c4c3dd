"""One exception per kind of configuration problem.

Every error names the file, the key path inside it and the problem, so that
``--config.check`` can print a list an operator can act on line by line.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A problem at one key of one configuration file."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class SyntaxConfigError(ConfigError):
    """The file is not readable YAML."""


class UnknownKeyError(ConfigError):
    """A key the exporter does not know (usually a typo)."""


class MissingKeyError(ConfigError):
    """A required key is absent."""


class InvalidTypeError(ConfigError):
    """A value of the wrong type, e.g. a list where a mapping belongs."""


class InvalidValueError(ConfigError):
    """A value of the right type that is out of range or malformed."""


class InvalidDurationError(InvalidValueError):
    """Not a Prometheus duration such as ``30s`` or ``1h30m``."""


class ScheduleOrderError(InvalidValueError):
    """Poll schedule steps whose ``until`` does not increase."""


class LabelNameError(InvalidValueError):
    """A label name Prometheus rejects, or one that shadows the exporter's own."""


class DuplicateMessageError(InvalidValueError):
    """The same message ID listed twice."""


class SecretError(ConfigError):
    """The API key cannot be read (missing file, unset environment variable)."""


class ConfigErrors(Exception):
    """All the problems found in one configuration, in file order."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))
