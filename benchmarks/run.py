"""Every benchmark, each figure next to its baseline and target; exits 1 if a target is missed.

    python -m benchmarks.run [--quick]

Each benchmark runs in a fresh Python process, so one's memory (and its children's peak RSS)
cannot show up in another's figures. The machine may be shared and noisy: compare a figure
with the baseline printed beside it, measured in the same run, rather than with another day's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    quick = parser.parse_args().quick
    short, short_pairs = (["--seconds", "20"], ["--pairs", "2"]) if quick else ([], [])
    runs = [
        ["benchmarks.bench_freshness", *(["--quick"] if quick else [])],
        ["benchmarks.bench_parse", "--recipients", "200000" if quick else "1000000"],
        ["benchmarks.bench_scrape"],
        ["benchmarks.bench_memory"],
        ["benchmarks.bench_registrations", *(["--held", "5000"] if quick else [])],
        # The real exporter process against the simulator: about 1.5 and 3 minutes.
        ["benchmarks.bench_process", "--scenario", "transactional", *short],
        ["benchmarks.bench_process", "--scenario", "per-message", *short, *short_pairs],
    ]
    failed = []
    for module, *args in runs:
        result = subprocess.run([sys.executable, "-m", module, *args], check=False)  # noqa: S603
        if result.returncode != 0:
            failed.append(module)
    print("\nall targets met" if not failed else f"\ntargets missed in: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
