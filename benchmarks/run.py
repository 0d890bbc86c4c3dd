"""Every benchmark, each figure next to its baseline and target; exits 1 if a target is missed.

    python -m benchmarks.run [--quick]

The machine may be shared and noisy: compare a figure with the baseline printed beside it,
measured in the same run, rather than with another day's absolute number.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import bench_freshness, bench_memory, bench_parse, bench_scrape
from benchmarks.common import Result, print_results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    quick = parser.parse_args().quick
    sections: list[tuple[str, list[Result]]] = [
        (
            "Freshness per request (5,000 messages/day, 600 requests/min)",
            bench_freshness.run(quick=quick),
        ),
        ("Big sends in bounded memory", bench_parse.run(100_000 if quick else 1_000_000)),
        ("Cheap scrapes (10,000 messages)", bench_scrape.run()),
        ("Memory at scale (10,000 messages)", bench_memory.run()),
    ]
    for title, results in sections:
        print_results(title, results)
    missed = [r.name for _, results in sections for r in results if not r.ok]
    print("\nall targets met" if not missed else f"\ntargets missed: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
