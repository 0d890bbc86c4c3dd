"""Sources: what the exporter polls. See ``base`` for the interface and docs/plugins.md."""

from exporter.sources.base import PeriodicSource, Poll, Settings, Source, SourceContext

__all__ = ["PeriodicSource", "Poll", "Settings", "Source", "SourceContext"]
