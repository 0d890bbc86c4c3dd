"""Memory at scale: resident memory with 10,000 tracked messages, after a scrape.

Two child processes, so neither inherits the other's heap: a baseline that imports what the
exporter imports and builds nothing, and one that builds 10,000 messages through the real
``MessageBook.record_success`` and renders one scrape, plain and gzip, through the fast path.
Each reports its peak RSS (``ru_maxrss``) and its current RSS (``/proc/self/statm``).

    python benchmarks/bench_memory.py [--messages N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_scrape import MESSAGES, build_book, registry_for
from benchmarks.common import Result, print_results
from exporter.exposition import TextExposition

TARGET_MB = 100.0
MB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def measure_self() -> dict[str, int]:
    """This process's peak and current resident memory, in bytes."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return {
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "current": resident_pages * os.sysconf("SC_PAGE_SIZE"),
    }


def child(messages: int) -> dict[str, int]:
    """With ``messages`` > 0: build them and scrape once; with 0, only the imports."""
    if messages:
        book, config = build_book(messages)
        exposition = TextExposition(registry_for(book, config))
        size = sum(map(len, exposition.plain())) + sum(map(len, exposition.gzipped()))
        return {**measure_self(), "body": size}
    return measure_self()


def spawn(messages: int) -> dict[str, int]:
    command = [sys.executable, "-m", "benchmarks.bench_memory", "--child", str(messages)]
    output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)  # noqa: S603 - this interpreter, this module
    figures: dict[str, int] = json.loads(output.stdout)
    return figures


def run(messages: int = MESSAGES) -> list[Result]:
    baseline = spawn(0)
    loaded = spawn(messages)
    per_message = (loaded["current"] - baseline["current"]) / messages
    peak_per_message = (loaded["peak"] - baseline["peak"]) / messages
    imports = f"imports alone: peak {baseline['peak'] / MB:.1f} MB"
    return [
        Result(
            "RSS peak (ru_maxrss)",
            loaded["peak"] / MB,
            "MB",
            TARGET_MB,
            loaded["peak"] <= TARGET_MB * MB,
            f"<= {TARGET_MB:g} MB; {imports}",
        ),
        Result(
            "RSS after the scrape (statm)",
            loaded["current"] / MB,
            "MB",
            TARGET_MB,
            loaded["current"] <= TARGET_MB * MB,
            f"<= {TARGET_MB:g} MB; imports alone: {baseline['current'] / MB:.1f} MB",
        ),
        Result(
            "bytes per message",
            per_message,
            "B",
            0,
            True,
            f"no target: (RSS - imports alone) / {messages:,}; peak {peak_per_message:,.0f} B",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return 0
    results = run(args.messages)
    print_results(f"Memory at scale ({args.messages:,} messages)", results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
