"""``ReportShape``: the names one API gives its bulk-status document.

Mail Partner and SMS Partner write the same document under different names: a shape says
which (``MAIL``, the default, or ``SMS``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportShape:
    """The names one API gives its bulk-status document: the report list's key, the
    unsubscribe flag's key, and a report's keys in the order the API writes them, ``cost``
    left out or not if ``cost_optional``. That order is what the JSON fast path matches
    and where the keyless XML form puts each value; it holds ``status``, the flag and
    ``date``, and may hold ``cost`` (neither first nor last)."""

    list_key: str
    stop_key: str
    report_keys: tuple[str, ...]
    cost_optional: bool = False

    def __post_init__(self) -> None:
        # The keys are written into the fast path's patterns as they are.
        for name in (self.list_key, *self.report_keys):
            if not name.isprintable() or not name or '"' in name or "\\" in name:
                raise ValueError(f"unusable key {name!r}")
        keys = self.report_keys
        if len(set(keys)) != len(keys) or self.stop_key in ("status", "cost", "date"):
            raise ValueError("report keys must be distinct")
        if not {"status", self.stop_key, "date"} <= set(keys):
            raise ValueError(f"report keys must hold status, {self.stop_key} and date")
        if "cost" in (keys[0], keys[-1]):
            raise ValueError("cost must be neither the first nor the last report key")
        if self.cost_optional and "cost" not in keys:
            raise ValueError("an optional cost must have its place among the report keys")

    @property
    def layouts(self) -> tuple[tuple[str, ...], ...]:
        """The key orders a report comes in: all the keys, then without cost if optional."""
        if not self.cost_optional:
            return (self.report_keys,)
        return self.report_keys, tuple(key for key in self.report_keys if key != "cost")


MAIL = ReportShape(
    "StatutResponseList", "stopMail", ("email", "token", "status", "cost", "stopMail", "date")
)
# SMS Partner's documented example has no cost; the simulator writes it where Mail's is.
SMS = ReportShape(
    "StatutResponse_List",
    "stopSMS",
    ("phoneNumber", "status", "cost", "stopSMS", "date"),
    cost_optional=True,
)
