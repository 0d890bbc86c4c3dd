"""The shipped rules, dashboard and configs, proven with the real Prometheus tools."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.simulator import SimulatorServer, World
from tests.conftest import TEST_KEY, require_tool
from tests.stack import REPO, Alertmanager, Prometheus, Service, start_exporter, wait_until
from tests.test_dashboard import dashboard_expressions

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
ALERTS = [rule for group in RULES["groups"] for rule in group["rules"]]
# Grafana's own variables, as a 1 s scrape interval makes them.
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def run_tool(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(command[0]), *command[1:]],
        capture_output=True,
        text=True,
        cwd=PROMETHEUS_DIR,
        check=False,
        timeout=60,
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    "command",
    [
        ("promtool", "check", "rules", "alerts.yml"),
        ("promtool", "test", "rules", "alerts_test.yml"),
        ("promtool", "check", "config", "prometheus.yml"),
        ("amtool", "check-config", "alertmanager.yml"),
    ],
    ids=["check-rules", "test-rules", "check-config", "amtool"],
)
def test_shipped_files_pass_the_tools(command: tuple[str, ...]) -> None:
    result = run_tool(*command)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    runbook = (REPO / "docs" / "runbook.md").read_text()
    anchors = {line[3:].strip().lower() for line in runbook.splitlines() if line.startswith("## ")}
    for rule in ALERTS:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook"] == f"docs/runbook.md#{rule['alert'].lower()}"
        assert rule["alert"].lower() in anchors, f"no runbook section for {rule['alert']}"


def test_every_alert_has_a_case_that_fires_and_one_that_must_not() -> None:
    cases = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    for rule in ALERTS:
        mine = [c for c in checks if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']} never fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']} never stays quiet"


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # template variables: "All"


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Prometheus]]:
    """The exporter in --demo mode and a real Prometheus scraping it every second, and
    probing two messages through it with the shipped probe job."""
    tmp = tmp_path_factory.mktemp("stack")
    exporter = start_exporter(tmp, "--demo", cwd=REPO)  # the shipped config.yaml
    try:
        prometheus = Prometheus(
            tmp,
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "mailpartner-exporter",
                        "static_configs": [{"targets": [exporter.url.removeprefix("http://")]}],
                    },
                    shipped_probe_job(exporter),
                ],
            },
        )
    except BaseException:
        exporter.stop()
        raise
    try:
        # Enough samples that rate() and increase() over [1m] have two points.
        wait_until(
            lambda: prometheus.query(
                'count_over_time(mailpartner_message_recipients{message_id="300",'
                'state="delivered"}[1m]) >= 3'
            )["data"]["result"],
            60,
            "three scrapes",
        )
        # Recipients newly delivered between two scrapes, which the ratio and delay panels need:
        # the demo's transactional sends and young campaigns deliver within seconds, seen at
        # their next poll (every 20 s while young).
        wait_until(
            lambda: prometheus.query(
                'sum(increase(mailpartner_recipients_total{state="delivered"}[1m])) > 0'
            )["data"]["result"],
            60,
            "recipients newly delivered",
        )
        yield exporter, prometheus
    finally:
        prometheus.stop()
        exporter.stop()


@pytest.mark.e2e
def test_every_dashboard_query_parses_and_returns_series(
    demo_stack: tuple[Service, Prometheus],
) -> None:
    _, prometheus = demo_stack
    empty = []
    for title, expr in dashboard_expressions():
        answer = prometheus.query(grafana_to_promql(expr))
        assert answer["status"] == "success", (title, expr, answer)
        if not answer["data"]["result"]:
            empty.append((title, expr))
    assert empty == [], "panels with no data"


@pytest.mark.e2e
def test_every_alert_expression_is_valid_promql(demo_stack: tuple[Service, Prometheus]) -> None:
    _, prometheus = demo_stack
    for rule in ALERTS:
        answer = prometheus.query(rule["expr"])
        assert answer["status"] == "success", (rule["alert"], answer)
    loaded = requests.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    assert {r["name"] for g in loaded for r in g["rules"]} == {r["alert"] for r in ALERTS}
    assert all(r["health"] == "ok" for g in loaded for r in g["rules"])


# A string, a selector's label matchers, or a comparison operator (not already `bool`).
COMPARISON = re.compile(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|(==|!=|[<>]=?)(?!=)(?!\s*bool\b)')


def judged(expr: str) -> str:
    """``expr`` with every comparison made ``bool``: all the series the rule judges, at 0 or 1,
    instead of only those past its thresholds (``and``/``or``/``unless`` still match labels)."""
    return COMPARISON.sub(lambda m: f"{m.group(1)} bool" if m.group(1) else m.group(0), expr)


def test_judged_keeps_matchers_and_strings() -> None:
    expr = 'a{code!="10",x=~">"} > 0.1 and on (job) b >= bool 50 or c == 0'
    want = 'a{code!="10",x=~">"} > bool 0.1 and on (job) b >= bool 50 or c == bool 0'
    assert judged(expr) == want


@pytest.mark.e2e
def test_every_rule_judges_series_from_the_demo(demo_stack: tuple[Service, Prometheus]) -> None:
    """Each rule's selectors, aggregations and label matching find the demo's series: with its
    thresholds made ``bool``, every expression returns something (the alerts need not fire)."""
    _, prometheus = demo_stack
    empty = []
    for rule in ALERTS:
        answer = prometheus.query(judged(rule["expr"]))
        assert answer["status"] == "success", (rule["alert"], answer)
        if not answer["data"]["result"]:
            empty.append(rule["alert"])
    assert empty == [], "rules that judge no series"


@pytest.mark.e2e
def test_every_metric_the_dashboard_and_rules_use_is_exposed(
    demo_stack: tuple[Service, Prometheus],
) -> None:
    exporter, _ = demo_stack
    exposition = requests.get(f"{exporter.url}/metrics", timeout=5).text
    exposed = {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    used = {
        name
        for _, expr in dashboard_expressions()
        for name in re.findall(r"\bmailpartner_\w+", expr)
    }
    used |= {name for rule in ALERTS for name in re.findall(r"\bmailpartner_\w+", rule["expr"])}
    assert used - exposed == set()
    assert len(used) >= 15  # the test looks at real queries, not an empty list


# A message config.yaml tracks, and one the demo's simulator never sent.
PROBE_TARGETS = ["300", "424242"]


def shipped_probe_job(exporter: Service) -> dict[str, Any]:
    """probe.yml's job as shipped, sent to ``exporter``, probing ``PROBE_TARGETS`` each second."""
    job: dict[str, Any]
    (job,) = yaml.safe_load((PROMETHEUS_DIR / "probe.yml").read_text())["scrape_configs"]
    (address,) = [r for r in job["relabel_configs"] if r.get("target_label") == "__address__"]
    address["replacement"] = exporter.url.removeprefix("http://")
    job["static_configs"] = [{"targets": PROBE_TARGETS}]
    # Reaches /probe as X-Prometheus-Scrape-Timeout-Seconds; Prometheus wants it <= the interval.
    job.update(scrape_interval="1s", scrape_timeout="900ms")
    return job


def by_message(answer: dict[str, Any]) -> dict[str, str]:
    """An instant query's answer as {message_id: value}, one series per message."""
    series = answer["data"]["result"]
    values = {s["metric"]["message_id"]: s["value"][1] for s in series}
    assert len(values) == len(series), series
    return values


@pytest.mark.e2e
def test_the_shipped_probe_job_probes_each_message_through_prometheus(
    demo_stack: tuple[Service, Prometheus],
) -> None:
    _, prometheus = demo_stack
    probed = 'job="mailpartner-probe"'
    wait_until(
        lambda: prometheus.query(f'mailpartner_probe_success{{{probed},message_id="300"}} == 1')[
            "data"
        ]["result"],
        30,
        "message 300 probed successfully",
    )
    wait_until(
        lambda: set(by_message(prometheus.query(f"up{{{probed}}} == 1"))) >= {"424242"},
        30,
        "message 424242 probed",
    )
    # An unknown message fails the probe, not the scrape.
    assert by_message(prometheus.query(f"up{{{probed}}}")) == {"300": "1", "424242": "1"}
    success = by_message(prometheus.query(f"mailpartner_probe_success{{{probed}}}"))
    assert success == {"300": "1", "424242": "0"}
    durations = prometheus.query(f"mailpartner_probe_duration_seconds{{{probed}}}")
    assert set(by_message(durations)) == set(PROBE_TARGETS)

    recipients = prometheus.query(f'mailpartner_message_recipients{{{probed},message_id="300"}}')[
        "data"
    ]["result"]
    states = {s["metric"]["state"] for s in recipients}
    assert states == {"delivered", "failed", "pending", "unknown"}
    assert len(recipients) == len(states)
    # honor_labels: the exporter's message_id is kept, not renamed exported_message_id.
    every_series = prometheus.query(f"{{{probed}}}")["data"]["result"]
    assert {s["metric"]["message_id"] for s in every_series} == set(PROBE_TARGETS)
    assert [s["metric"] for s in every_series if "exported_message_id" in s["metric"]] == []


class Webhook:
    """Records what Alertmanager posts, by path."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def find(self, alertname: str, status: str) -> tuple[str, dict[str, Any]] | None:
        for path, payload in self.posts:
            for alert in payload["alerts"]:
                if alert["labels"]["alertname"] == alertname and alert["status"] == status:
                    return path, alert
        return None

    def close(self) -> None:
        self._server.shutdown()


def shipped_alertmanager_config(webhook: Webhook) -> dict[str, Any]:
    """alertmanager.yml as shipped, with its receivers pointed at ``webhook``, and quick."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "alertmanager.yml").read_text())
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = webhook.url + "/" + hook["url"].rsplit("/", 1)[-1]
    config["route"].update(group_wait="1s", group_interval="1s")
    return config


def quick_rules(tmp: Path) -> Path:
    """alerts.yml as shipped, with every ``for:`` shortened to 1s."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s"
    (tmp / "alerts.yml").write_text(yaml.safe_dump(rules))
    return tmp / "alerts.yml"


@pytest.mark.e2e
def test_a_rejected_key_pages_through_alertmanager_and_resolves(tmp_path: Path) -> None:
    webhook = Webhook()
    services: list[Service] = []
    with SimulatorServer(World(seed=5), api_key=TEST_KEY) as simulator:
        try:
            ids = [simulator.world.send(200).message_id for _ in range(3)]
            config = tmp_path / "config.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "api": {"base_url": simulator.url, "timeout": "2s"},
                        "polling": {"schedule": [{"until": "48h", "every": "1s"}]},
                        "messages": [{"id": i} for i in ids],
                    }
                )
            )
            exporter = start_exporter(
                tmp_path, "--config.file", str(config), env={"MAILPARTNER_API_KEY": TEST_KEY}
            )
            services.append(exporter)
            alertmanager = Alertmanager(tmp_path, shipped_alertmanager_config(webhook))
            services.append(alertmanager)
            prometheus = Prometheus(
                tmp_path,
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(quick_rules(tmp_path))],
                    "alerting": {
                        "alertmanagers": [
                            {
                                "static_configs": [
                                    {"targets": [alertmanager.url.removeprefix("http://")]}
                                ]
                            }
                        ]
                    },
                    "scrape_configs": [
                        {
                            "job_name": "mailpartner-exporter",
                            "static_configs": [{"targets": [exporter.url.removeprefix("http://")]}],
                        }
                    ],
                },
            )
            services.append(prometheus)
            wait_until(
                lambda: prometheus.query("mailpartner_up == 1")["data"]["result"],
                30,
                "the exporter polling successfully",
            )

            simulator.faults.reject_key = True
            path, alert = wait_until(
                lambda: webhook.find("MailPartnerApiKeyRejected", "firing"),
                60,
                "the firing alert at the webhook",
            )
            assert path == "/pager"  # critical alerts take the paging route
            assert alert["labels"]["severity"] == "critical"
            assert alert["labels"]["code"] == "10"
            assert alert["labels"]["job"] == "mailpartner-exporter"
            assert alert["annotations"]["summary"] == "Mail Partner rejects the API key (code 10)"
            assert alert["annotations"]["runbook"] == "docs/runbook.md#mailpartnerapikeyrejected"

            simulator.faults.reject_key = False
            wait_until(
                lambda: webhook.find("MailPartnerApiKeyRejected", "resolved"),
                60,
                "the resolved alert at the webhook",
            )
        finally:
            for service in reversed(services):
                service.stop()
            webhook.close()
