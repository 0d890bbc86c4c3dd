"""Which sources exist: the built-ins, and plugins from the ``mailpartner_exporter.sources``
entry-point group (``name = "package.module:SourceClass"``), looked up when a config loads.

The caller hands ``available()`` to the config loader, which knows nothing of sources.
"""

from __future__ import annotations

import importlib.metadata
import logging

from exporter.config.loader import Kinds
from exporter.config.model import SourceKind
from exporter.sources.account import AccountSource
from exporter.sources.base import Source
from exporter.sources.bulk_status import MAIL_PARTNER, SMS_PARTNER

log = logging.getLogger(__name__)
GROUP = "mailpartner_exporter.sources"
BUILTINS: dict[str, SourceKind] = {
    MAIL_PARTNER.name: MAIL_PARTNER,
    AccountSource.name: AccountSource,
    SMS_PARTNER.name: SMS_PARTNER,
}


def available() -> Kinds:
    """Every source by name; a plugin that fails to load maps to why (reported if used).

    A plugin may not take a built-in's name: the built-in wins, with a warning.
    """
    found: dict[str, SourceKind | Exception] = dict(BUILTINS)
    for entry in importlib.metadata.entry_points(group=GROUP):
        if entry.name in BUILTINS:
            log.warning("a plugin takes a built-in source's name; ignored", extra=_fields(entry))
            continue
        try:
            kind = entry.load()
        except Exception as e:  # a broken plugin must not stop the exporter
            found[entry.name] = RuntimeError(f"{entry.value}: {type(e).__name__}: {e}")
            continue
        if not (isinstance(kind, type) and issubclass(kind, Source)):
            found[entry.name] = TypeError(f"{entry.value} is not a subclass of Source")
            continue
        if not kind.__dict__.get("name"):
            kind.name = entry.name
        found[entry.name] = kind
    return found


def _fields(entry: importlib.metadata.EntryPoint) -> dict[str, str]:
    return {"source": entry.name, "plugin": entry.value}
