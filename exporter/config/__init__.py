"""Configuration: ``load_config`` turns a YAML file into a frozen ``Config``."""

from exporter.config.errors import ConfigError, ConfigErrors
from exporter.config.loader import (
    API_KEY_ENV,
    load_config,
    parse_config,
    parse_message,
    parse_messages,
)
from exporter.config.model import (
    ApiConfig,
    Config,
    MessageSpec,
    PollingConfig,
    ScheduleStep,
    SourceConfig,
    State,
    StatusMap,
)

__all__ = [
    "API_KEY_ENV",
    "ApiConfig",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "MessageSpec",
    "PollingConfig",
    "ScheduleStep",
    "SourceConfig",
    "State",
    "StatusMap",
    "load_config",
    "parse_config",
    "parse_message",
    "parse_messages",
]
