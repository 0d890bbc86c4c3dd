"""Which sources exist: the built-ins, and plugins from the ``mailpartner_exporter.sources``
entry-point group (``name = "package.module:SourceClass"``), looked up when a config loads."""

from __future__ import annotations

import importlib.metadata
import logging

from exporter.sources.base import Source

log = logging.getLogger(__name__)
GROUP = "mailpartner_exporter.sources"


def builtins() -> dict[str, type[Source]]:
    from exporter.sources.account import AccountSource  # noqa: PLC0415 - avoids an import cycle
    from exporter.sources.bulk_status import (  # noqa: PLC0415
        BulkStatusSource,
        SmsPartnerBulkStatusSource,
    )

    return {
        "bulk_status": BulkStatusSource,
        "account": AccountSource,
        "smspartner_bulk_status": SmsPartnerBulkStatusSource,
    }


def available() -> dict[str, type[Source] | Exception]:
    """Every source by name; a plugin that fails to load maps to why (reported if used).

    A plugin may not take a built-in's name: the built-in wins, with a warning.
    """
    found: dict[str, type[Source] | Exception] = dict(builtins())
    for entry in importlib.metadata.entry_points(group=GROUP):
        if entry.name in found and entry.name in builtins():
            if entry.value.split(":")[0].startswith("exporter.sources."):
                continue  # this package's own entry points name the built-ins
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
        found[entry.name] = kind
    for name, kind in found.items():
        if isinstance(kind, type) and not kind.__dict__.get("name"):
            kind.name = name
    return found


def _fields(entry: importlib.metadata.EntryPoint) -> dict[str, str]:
    return {"source": entry.name, "plugin": entry.value}
