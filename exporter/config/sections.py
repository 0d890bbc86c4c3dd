"""The config's sections that hold values only (no secrets, no files, no sources): the poll
schedule, the status map and the ``metrics`` section, read by ``SectionReader``."""

from __future__ import annotations

from exporter.config import convert, errors
from exporter.config.convert import join, kind
from exporter.config.model import MetricsConfig, PollingConfig, ScheduleStep
from exporter.config.reader import Reader, label_name_problem
from exporter.domain import DEFAULT_STATUSES, State, StatusMap

_POLLING_KEYS = frozenset(
    {
        "schedule",
        "settled_recheck",
        "final_after",
        "retention",
        "unreported_every",
        "unreported_max",
        "quiet_hours",
        "transactional_labels",
    }
)


class SectionReader(Reader):
    def polling(self, value: object) -> PollingConfig:
        section = self.mapping(value, "polling", _POLLING_KEYS)
        d = PollingConfig()

        def positive(name: str, default: float) -> float:
            return self.field(section, name, "polling", default, convert.positive_duration)

        polling = PollingConfig(
            schedule=self.schedule(section["schedule"]) if "schedule" in section else d.schedule,
            settled_recheck=positive("settled_recheck", d.settled_recheck),
            final_after=positive("final_after", d.final_after),
            retention=self.field(section, "retention", "polling", d.retention, convert.duration),
            unreported_every=positive("unreported_every", d.unreported_every),
            unreported_max=positive("unreported_max", d.unreported_max),
            quiet_hours=self.field(section, "quiet_hours", "polling", True, convert.boolean),
            transactional_labels=self.transactional_labels(section.get("transactional_labels")),
        )
        if polling.schedule and polling.final_after < polling.schedule[-1].until:
            self.fail(
                errors.InvalidValueError,
                "polling.final_after",
                "is before the last schedule step's until; that step would never run",
            )
        return polling

    def transactional_labels(self, value: object) -> tuple[tuple[str, frozenset[str]], ...]:
        """``{label: [values]}``: messages with one of these values are never held."""
        key = "polling.transactional_labels"
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.fail(errors.InvalidTypeError, key, f"must be a mapping, not {kind(value)}")
            return ()
        pairs = []
        for name, values in value.items():
            where = join(key, str(name)[:64])
            if problem := label_name_problem(name):
                self.fail(errors.LabelNameError, where, problem)
            elif not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                self.fail(errors.InvalidTypeError, where, "must be a list of label values")
            else:
                pairs.append((name, frozenset(values)))
        return tuple(pairs)

    def schedule(self, value: object) -> tuple[ScheduleStep, ...]:
        if not isinstance(value, list) or not value:
            self.fail(
                errors.InvalidTypeError,
                "polling.schedule",
                "must be a non-empty list of {until, every}",
            )
            return PollingConfig().schedule
        steps: list[ScheduleStep] = []
        for i, item in enumerate(value):
            key = f"polling.schedule[{i}]"
            step = self.mapping(item, key, frozenset({"until", "every"}))
            for name in ("until", "every"):
                if name not in step:
                    self.fail(errors.MissingKeyError, convert.join(key, name), "is required")
            until = self.field(step, "until", key, 0.0, convert.positive_duration)
            every = self.field(step, "every", key, 0.0, convert.positive_duration)
            if steps and until and until <= steps[-1].until:
                self.fail(
                    errors.ScheduleOrderError,
                    convert.join(key, "until"),
                    "must be greater than the previous step's until",
                )
            steps.append(ScheduleStep(until, every))
        return tuple(steps)

    def status_map(self, value: object) -> StatusMap:
        section = self.mapping(value, "status_map", frozenset(s.value for s in State))
        lists = dict(DEFAULT_STATUSES)
        for state in State:
            raws = section.get(state.value)
            if state.value not in section:
                continue
            if not isinstance(raws, list) or not all(isinstance(r, str) and r for r in raws):
                self.fail(
                    errors.InvalidTypeError,
                    f"status_map.{state.value}",
                    "must be a list of status strings",
                )
                continue
            lists[state] = tuple(raws)
        # Claims made in the file come first, so a clash with a default list is
        # reported at the key the operator wrote.
        owner: dict[str, State] = {}
        for state in sorted(lists, key=lambda st: st.value not in section):
            for raw in lists[state]:
                first = owner.setdefault(raw.lower(), state)
                if first == state:
                    continue
                if state.value in section:
                    self.fail(
                        errors.InvalidValueError,
                        f"status_map.{state.value}",
                        f"status {raw!r} is already mapped to {first.value}",
                    )
                else:
                    self.fail(
                        errors.InvalidValueError,
                        f"status_map.{first.value}",
                        f"status {raw!r} is also in the default list of {state.value}; "
                        f"set status_map.{state.value} without it",
                    )
        return StatusMap.from_lists(lists)

    def metrics(self, value: object) -> MetricsConfig:
        keys = frozenset(
            {
                "aggregate_by",
                "max_aggregate_label_sets",
                "per_message_limit",
                "delivery_delay_buckets",
            }
        )
        section = self.mapping(value, "metrics", keys)
        d = MetricsConfig()
        return MetricsConfig(
            aggregate_by=self.aggregate_by(section.get("aggregate_by", list(d.aggregate_by))),
            max_aggregate_label_sets=self.field(
                section, "max_aggregate_label_sets", "metrics", d.max_aggregate_label_sets,
                convert.positive_int,
            ),
            per_message_limit=self.field(
                section, "per_message_limit", "metrics", d.per_message_limit,
                convert.non_negative_int,
            ),
            delivery_delay_buckets=self.field(
                section, "delivery_delay_buckets", "metrics", d.delivery_delay_buckets,
                convert.increasing_numbers,
            ),
        )  # fmt: skip

    def aggregate_by(self, value: object) -> tuple[str, ...]:
        key = "metrics.aggregate_by"
        if not isinstance(value, list):
            self.fail(
                errors.InvalidTypeError, key, f"must be a list of label names, not {kind(value)}"
            )
            return MetricsConfig().aggregate_by
        names: list[str] = []
        for i, name in enumerate(value):
            if problem := label_name_problem(name):
                self.fail(errors.LabelNameError, f"{key}[{i}]", problem)
            elif name in names:
                self.fail(errors.InvalidValueError, f"{key}[{i}]", f"{name!r} is listed twice")
            else:
                names.append(name)
        return tuple(names)
