"""What every benchmark returns and how figures are printed."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

from exporter.config.model import Config
from exporter.poller import Poller
from exporter.sources.base import SourceContext
from exporter.sources.bulk_status import BulkStatusSource
from exporter.upstream import Upstream


@dataclass(frozen=True)
class Result:
    """One measured figure, its target, and the baseline measured in the same run."""

    name: str
    value: float
    unit: str
    target: float
    ok: bool
    note: str = ""  # the baseline or context, e.g. "naive 45 s"


def print_results(title: str, results: list[Result]) -> None:
    print(f"\n{title}")
    width = max(len(r.name) for r in results)
    for r in results:
        value = f"{r.value:,.1f}" if isinstance(r.value, float) else f"{r.value:,}"
        if isinstance(r.value, float) and 0 < abs(r.value) < 1:
            value = f"{r.value:.3f}"  # e.g. requests per message early in a run
        status = "PASS" if r.ok else "FAIL"
        print(
            f"  {r.name:<{width}}  {value:>12} {r.unit:<8} target {r.target:,.0f}  "
            f"{status}  {r.note}"
        )


class InlineExecutor(Executor):
    """Runs each poll at once in the caller's thread: a fake clock stays in step with it."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def inline_source(
    config: Config, client: Any, clock: Callable[[], float]
) -> tuple[BulkStatusSource, Poller]:
    """The real bulk_status source over a fake ``client`` (one with ``stats`` and
    ``bulk_status``), and the real poller running its polls inline on ``clock``."""
    upstream = Upstream(config.api, client, client.stats, clock())
    source = BulkStatusSource(SourceContext(config, upstream, clock, jitter=lambda: 1.0), {})
    return source, Poller([source], clock=clock, executor=InlineExecutor())
