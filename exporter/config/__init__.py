"""Configuration: ``load_config`` turns a YAML file into a frozen ``Config``."""

from exporter.config.errors import ConfigError, ConfigErrors
from exporter.config.loader import API_KEY_ENV, load_config, parse_config
from exporter.config.model import (
    ApiConfig,
    Config,
    MessageSpec,
    PollingConfig,
    ScheduleStep,
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
    "State",
    "StatusMap",
    "load_config",
    "parse_config",
]
