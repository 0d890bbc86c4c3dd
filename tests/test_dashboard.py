"""Static checks of the Grafana dashboard and its provisioning files.

`dashboard_expressions()` is the list of (panel title, PromQL) pairs that other tests
evaluate against a real Prometheus; here the dashboard is only read, never served.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config.reader import RESERVED_LABELS

REPO = Path(__file__).parent.parent
GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "mailpartner-overview.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "mailpartner.yml"
README = REPO / "README.md"

DS_REF = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's built-in variables the expressions may use, besides the template variables.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}
MESSAGE_FILTERS = ('campaign=~"$campaign"', 'message_id=~"$message_id"')
INSTANCE_FILTERS = ('job=~"$job"', 'instance=~"$instance"')
CAMPAIGN_FILTERS = ('campaign=~"$campaign"',)
# The aggregate series: labelled by metrics.aggregate_by (campaign), never by message_id.
AGGREGATES = (
    "mailpartner_recipients_total",
    "mailpartner_cost_total",
    "mailpartner_unsubscribed_recipients_total",
    "mailpartner_messages_total",
    "mailpartner_delivery_delay_seconds_",
)
# Labels a `by (...)` clause may name: the exporter's, the scrape's, a message's `campaign`.
KNOWN_LABELS = RESERVED_LABELS | {"campaign"}

HISTOGRAM_BUCKET = "mailpartner_api_request_duration_seconds_bucket{"
DELAY_BUCKET = "mailpartner_delivery_delay_seconds_bucket{"
# Panel title -> fragments (whitespace-insensitive) that one of its expressions must contain.
REQUIRED_PANELS: dict[str, list[str]] = {
    # totals over the time range, from the aggregates
    "Delivered": ['sum(increase(mailpartner_recipients_total{state="delivered"', "[$__range]))"],
    "Failed": ['sum(increase(mailpartner_recipients_total{state="failed"', "[$__range]))"],
    "Unknown": ['sum(increase(mailpartner_recipients_total{state="unknown"', "[$__range]))"],
    "Delivery ratio": [
        'sum(increase(mailpartner_recipients_total{state="delivered"',
        '/ (sum(increase(mailpartner_recipients_total{state=~"delivered|failed"',
    ],
    "Cost": ["sum(increase(mailpartner_cost_total{", "[$__range]))"],
    # pending now: a gauge; unfinished messages keep their per-message series first
    "Pending": ['sum(mailpartner_message_recipients{state="pending"'],
    # per campaign
    "Delivered per campaign": [
        'sum by (campaign) (increase(mailpartner_recipients_total{state="delivered"'
    ],
    "Failed per campaign": [
        'sum by (campaign) (increase(mailpartner_recipients_total{state="failed"'
    ],
    "Newly pending per campaign": [
        'sum by (campaign) (increase(mailpartner_recipients_total{state="pending"'
    ],
    "Failure ratio per campaign": [
        'sum by (campaign) (increase(mailpartner_recipients_total{state="failed"',
        '/ (sum by (campaign) (increase(mailpartner_recipients_total{state=~"delivered|failed"',
    ],
    "Delivery delay per campaign": [
        f"histogram_quantile({q}, sum by (campaign, le) (rate({DELAY_BUCKET}"
        for q in ("0.5", "0.95", "0.99")
    ],
    "Cost per campaign": ["sum by (campaign) (increase(mailpartner_cost_total{"],
    "Messages per campaign": ["sum by (campaign) (increase(mailpartner_messages_total{"],
    "New reports by state": ["sum by (state) (increase(mailpartner_recipients_total{"],
    "Recipients by raw status": ["sum by (status) (mailpartner_message_recipients_by_status{"],
    "Per-message series withheld": ["sum(mailpartner_exporter_per_message_withheld{"],
    "Aggregate overflow": ["sum(increase(mailpartner_exporter_aggregate_overflow_total{"],
    "API errors by code": ["sum by (code) (increase(mailpartner_api_errors_total{"],
    "Request failures by reason": [
        "sum by (reason) (increase(mailpartner_api_request_failures_total{"
    ],
    "API request duration": [
        "histogram_quantile(0.5, sum by (le) (rate(" + HISTOGRAM_BUCKET,
        "histogram_quantile(0.95, sum by (le) (rate(" + HISTOGRAM_BUCKET,
    ],
    "API up": ["mailpartner_up{"],
    "Last successful poll age": [
        "time() - max(mailpartner_message_last_poll_success_timestamp_seconds{"
    ],
    "Request budget use": [
        "mailpartner_exporter_scheduled_requests_per_minute{",
        "/ mailpartner_exporter_request_budget_per_minute{",
    ],
    "Requests per minute vs budget": [
        "(rate(mailpartner_api_requests_total{",
        "[$__rate_interval])) * 60",
        "mailpartner_exporter_request_budget_per_minute{",
    ],
    "Tracked messages by phase": ["sum by (phase) (mailpartner_exporter_messages{"],
    "Poll delay": ["mailpartner_exporter_poll_delay_seconds{"],
    "Credits left": ["mailpartner_account_credits{"],
    "Credits vs low threshold": [
        "mailpartner_account_credits{",
        "/ on (instance, job, field) mailpartner_account_credits_low_threshold{",
    ],
    "Account poll": ["mailpartner_account_poll_success{"],
    "Credits over time": [
        "mailpartner_account_credits{",
        "mailpartner_account_credits_low_threshold{",
    ],
    "Credits used per hour": ["clamp_min(-delta(mailpartner_account_credits{"],
}
# Delivery, failures and cost come from the aggregates, which count every tracked message:
# the per-message gauges are only for the messages that have series (metrics.per_message_limit).
AGGREGATE_PANELS = [
    "Delivered",
    "Failed",
    "Unknown",
    "Delivery ratio",
    "Cost",
    "Delivered per campaign",
    "Failed per campaign",
    "Newly pending per campaign",
    "Failure ratio per campaign",
    "Delivery delay per campaign",
    "Cost per campaign",
    "Messages per campaign",
    "New reports by state",
]
CREDITS_ROW = "Credits"
MESSAGES_TABLE = "Messages"
# Series the per-message table must show, as fragments of its expressions.
TABLE_COLUMNS = [
    'mailpartner_message_recipients{state="delivered"',
    'mailpartner_message_recipients{state="failed"',
    'mailpartner_message_recipients{state="pending"',
    "mailpartner_message_unsubscribed_recipients{",
    "mailpartner_message_cost{",
    "mailpartner_message_final{",
]


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def all_panels(dashboard: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    found: list[dict[str, Any]] = []
    for panel in (dashboard or load_dashboard())["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query target of the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels()
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def squash(text: str) -> str:
    return "".join(text.split())


def panel_by_title(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    matches = [panel for panel in all_panels(dashboard) if panel.get("title") == title]
    assert len(matches) == 1, f"expected one panel titled {title!r}, found {len(matches)}"
    return matches[0]


def readme_metric_names() -> set[str]:
    """Sample names of the README's metric tables (histograms as _bucket/_sum/_count)."""
    names: set[str] = set()
    row = re.compile(r"^\| `(mailpartner_\w+)(?:\{[^}`]*\})?` \| (gauge|counter|histogram) \|")
    for line in README.read_text(encoding="utf-8").splitlines():
        match = row.match(line)
        if not match:
            continue
        name, kind = match.groups()
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def test_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "mailpartner-overview"
    assert dashboard["title"] == "Mail Partner overview"
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 39
    # An id would make an import overwrite whatever dashboard has it in the target Grafana.
    assert dashboard.get("id") is None


def test_file_is_pretty_printed_with_sorted_keys() -> None:
    text = DASHBOARD.read_text(encoding="utf-8")
    canonical = json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
    assert text == canonical + "\n", "regenerate with json.dumps(indent=2, sort_keys=True)"


def test_datasource_input_and_variable(dashboard: dict[str, Any]) -> None:
    inputs = {item["name"]: item for item in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"

    variable = variables(dashboard)["datasource"]
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"
    assert not variable.get("multi")
    assert not variable.get("includeAll")


def test_everything_queries_through_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        if panel.get("type") == "row":
            continue
        assert panel.get("datasource") == DS_REF, panel.get("title")
        for target in panel.get("targets", []):
            assert target.get("datasource") == DS_REF, (panel.get("title"), target.get("refId"))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DS_REF, variable["name"]


def test_every_panel_has_title_position_and_queries(dashboard: dict[str, Any]) -> None:
    panels = [panel for panel in all_panels(dashboard) if panel.get("type") != "row"]
    assert panels
    titles = [panel.get("title") for panel in panels]
    assert all(isinstance(title, str) and title for title in titles), titles
    assert len(set(titles)) == len(titles), "panel titles must be unique"
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        title = panel["title"]
        grid = panel.get("gridPos")
        assert isinstance(grid, dict), title
        assert all(isinstance(grid.get(key), int) for key in ("h", "w", "x", "y")), title
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, title
        targets = panel.get("targets")
        assert targets, f"{title} has no query"
        ref_ids = [target.get("refId") for target in targets]
        assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), title
        for target in targets:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), title


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


@pytest.mark.parametrize("title", sorted(REQUIRED_PANELS))
def test_required_panel(dashboard: dict[str, Any], title: str) -> None:
    panel = panel_by_title(dashboard, title)
    exprs = [squash(target["expr"]) for target in panel["targets"]]
    for fragment in REQUIRED_PANELS[title]:
        assert any(squash(fragment) in expr for expr in exprs), (title, fragment, exprs)


def test_messages_table(dashboard: dict[str, Any]) -> None:
    panel = panel_by_title(dashboard, MESSAGES_TABLE)
    assert panel["type"] == "table"
    targets = panel["targets"]
    for target in targets:
        assert target.get("format") == "table", target["refId"]
        assert target.get("instant") is True and not target.get("range"), target["refId"]
        # one row per message: every query keeps exactly the labels that identify it
        by = re.search(r"\bby \(([^)]*)\)", target["expr"])
        assert by, target["expr"]
        assert {label.strip() for label in by.group(1).split(",")} == {"message_id", "campaign"}
    exprs = [squash(target["expr"]) for target in targets]
    for fragment in TABLE_COLUMNS:
        assert any(squash(fragment) in expr for expr in exprs), fragment

    transformations = {item["id"]: item["options"] for item in panel["transformations"]}
    assert "merge" in transformations
    organize = transformations["organize"]
    assert organize["excludeByName"].get("Time") is True
    renamed = organize["renameByName"]
    assert {f"Value #{target['refId']}" for target in targets} <= set(renamed)
    for column in ("delivered", "failed", "pending", "unsubscribed", "cost", "final"):
        assert column in {name.lower() for name in renamed.values()}, column


def test_template_variables(dashboard: dict[str, Any]) -> None:
    found = variables(dashboard)
    expected = {
        # every campaign with aggregates, also those whose messages have no per-message series
        "campaign": ("mailpartner_messages_total", "campaign"),
        "message_id": ("mailpartner_message_recipients", "message_id"),
        "job": ("mailpartner_", "job"),
        "instance": ("mailpartner_", "instance"),
    }
    for name, (metric, label) in expected.items():
        variable = found[name]
        assert variable["type"] == "query", name
        assert variable["multi"] is True and variable["includeAll"] is True, name
        # "All" must also match series without the label (messages with no campaign).
        assert variable["allValue"] == ".*", name
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else None
        assert query == variable["definition"], name
        match = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?, (\w+)\)", query or "")
        assert match, (name, query)
        assert match.group(1).startswith(metric) and match.group(3) == label, (name, query)
    message_query = found["message_id"]["definition"]
    assert 'campaign=~"$campaign"' in message_query


def test_expressions_use_only_known_variables(dashboard: dict[str, Any]) -> None:
    template = {v["name"] for v in dashboard["templating"]["list"] if v["type"] == "query"}
    allowed = template | BUILTIN_VARIABLES
    used: set[str] = set()
    for title, expr in dashboard_expressions():
        names = set(re.findall(r"\$\{?(\w+)", expr))
        assert names <= allowed, (title, names - allowed)
        used |= names
    assert {"campaign", "message_id", "job", "instance", "__rate_interval"} <= used


def test_metric_names_are_exposed() -> None:
    exposed = readme_metric_names()
    # the README tables: 5 aggregates (one a histogram), 11 per-message, 5 of the API (one a
    # histogram), 15 of the exporter's own, 3 of the account's, 4 of the message files, 2 of /probe
    assert len(exposed) == 49, sorted(exposed)
    used: set[str] = set()
    for title, expr in dashboard_expressions():
        names = set(re.findall(r"\bmailpartner_\w+", expr))
        assert names, (title, expr)
        assert names <= exposed, (title, names - exposed)
        used |= names
    for name in (
        "mailpartner_recipients_total",
        "mailpartner_cost_total",
        "mailpartner_messages_total",
        "mailpartner_delivery_delay_seconds_bucket",
        "mailpartner_exporter_per_message_withheld",
        "mailpartner_exporter_aggregate_overflow_total",
        "mailpartner_message_recipients",
        "mailpartner_message_unsubscribed_recipients",
        "mailpartner_message_final",
        "mailpartner_api_request_duration_seconds_bucket",
        "mailpartner_exporter_messages",
        "mailpartner_account_credits",
        "mailpartner_account_credits_low_threshold",
    ):
        assert name in used, name


def test_credits_row_holds_the_account_panels(dashboard: dict[str, Any]) -> None:
    """The row below the exporter's panels; every panel under it reads the account."""
    panels = dashboard["panels"]
    (row,) = [panel for panel in panels if panel.get("type") == "row"]
    assert row["title"] == CREDITS_ROW
    assert row["collapsed"] is False and row["gridPos"]["w"] == 24
    top = row["gridPos"]["y"]
    above = [panel for panel in panels if panel["gridPos"]["y"] < top]
    below = [panel for panel in panels if panel["gridPos"]["y"] > top]
    assert all(panel["gridPos"]["y"] + panel["gridPos"]["h"] <= top for panel in above)
    assert below
    for panel in below:
        exprs = [target["expr"] for target in panel["targets"]]
        assert all("mailpartner_account_" in expr for expr in exprs), panel["title"]


def test_credit_thresholds_are_dashed_lines(dashboard: dict[str, Any]) -> None:
    panel = panel_by_title(dashboard, "Credits over time")
    (threshold,) = [
        target for target in panel["targets"] if "credits_low_threshold" in target["expr"]
    ]
    (override,) = [
        override
        for override in panel["fieldConfig"]["overrides"]
        if override["matcher"] == {"id": "byFrameRefID", "options": threshold["refId"]}
    ]
    properties = {item["id"]: item["value"] for item in override["properties"]}
    assert properties["custom.lineStyle"]["fill"] == "dash"
    assert properties["custom.fillOpacity"] == 0


def test_selectors_filter_by_the_template_variables() -> None:
    for title, expr in dashboard_expressions():
        for name, matchers in re.findall(r"\b(mailpartner_\w+)(\{[^}]*\})?", expr):
            assert matchers, (title, name)
            needed: tuple[str, ...] = INSTANCE_FILTERS
            if name.startswith("mailpartner_message_"):
                needed += MESSAGE_FILTERS
            if name.startswith(AGGREGATES):
                needed += CAMPAIGN_FILTERS
                # no message_id on the aggregates: picking a message would empty the panel
                assert "message_id" not in matchers, (title, name)
            for matcher in needed:
                assert matcher in matchers, (title, name, matcher)


def test_delivery_failures_and_cost_come_from_the_aggregates(dashboard: dict[str, Any]) -> None:
    for title in AGGREGATE_PANELS:
        for target in panel_by_title(dashboard, title)["targets"]:
            names = set(re.findall(r"\bmailpartner_\w+", target["expr"]))
            assert names and all(name.startswith(AGGREGATES) for name in names), (title, names)
            # counters: only their increase or rate means something
            assert re.search(r"\b(?:increase|rate)\(mailpartner_", target["expr"]), title
    # the one total left on the per-message gauges: pending now (unfinished messages keep their
    # series first)
    per_message = {
        title
        for title, expr in dashboard_expressions()
        if re.search(r"\bsum(?: by \([^)]*\))? ?\(mailpartner_message_(?:recipients|cost)\{", expr)
    }
    assert per_message == {"Pending"}, per_message


def test_panel_descriptions_say_what_they_count(dashboard: dict[str, Any]) -> None:
    for title in AGGREGATE_PANELS:
        description = panel_by_title(dashboard, title).get("description", "")
        assert "campaign" in description, title
    for title in ("Messages", "Pending", "Recipients by raw status"):
        assert "per-message series" in panel_by_title(dashboard, title)["description"], title


def test_quantiles_use_the_histogram_per_campaign(dashboard: dict[str, Any]) -> None:
    panel = panel_by_title(dashboard, "Delivery delay per campaign")
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"
    legends = sorted(target["legendFormat"] for target in panel["targets"])
    assert legends == ["p50 {{campaign}}", "p95 {{campaign}}", "p99 {{campaign}}"]
    for target in panel["targets"]:
        # quantiles of a sum of rates, never of a single bucket series or of raw counters
        assert squash(f"rate({DELAY_BUCKET}") in squash(target["expr"]), target["refId"]
        assert "[$__rate_interval]" in target["expr"], target["refId"]


def test_aggregations_use_known_labels() -> None:
    for title, expr in dashboard_expressions():
        for clause in re.findall(r"\b(?:by|without) \(([^)]*)\)", expr):
            labels = {label.strip() for label in clause.split(",")}
            assert labels <= KNOWN_LABELS, (title, labels - KNOWN_LABELS)


def test_expressions_are_balanced() -> None:
    pairs = {")": "(", "}": "{", "]": "["}
    for title, expr in dashboard_expressions():
        stack: list[str] = []
        in_string = False
        for char in expr:
            if char == '"':
                in_string = not in_string
            elif in_string:
                continue
            elif char in "({[":
                stack.append(char)
            elif char in pairs:
                assert stack and stack.pop() == pairs[char], (title, expr)
        assert not stack and not in_string, (title, expr)


def test_provisioned_datasource_is_the_dashboard_default(dashboard: dict[str, Any]) -> None:
    config = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    assert datasource["name"] == "Prometheus"
    assert datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True
    variable = variables(dashboard)["datasource"]
    assert datasource["type"] == variable["query"] == dashboard["__inputs"][0]["pluginId"]
    # the variable's default value is the provisioned datasource, by uid
    assert variable["current"]["value"] == datasource["uid"]


def test_dashboard_provider_loads_this_dashboard() -> None:
    config = yaml.safe_load(PROVIDERS.read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "Mail Partner"
    # grafana/ is mounted at this path, so the dashboard sits at its top level
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD.parent == GRAFANA
    # the provider loads every JSON file under the path: their uids must not collide
    uids = [json.loads(path.read_text(encoding="utf-8"))["uid"] for path in GRAFANA.rglob("*.json")]
    assert "mailpartner-overview" in uids
    assert len(set(uids)) == len(uids), uids
