"""``python -m bench [--full | --smoke] [--only NAME,...] [--out DIR]``: run the suite, render
``REPORT.md`` and the plots.

Profiles: ``quick`` (default; under 10 minutes on 2 cores; writes ``bench/results/``),
``--full`` (bigger: ViT-B/16 too, more rounds and samples; writes ``bench/results/full/``),
``--smoke`` (tiny backbone, seconds: the suite's own test).
Exit status 1 when a section failed (its JSON says why; the report still renders).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import timing
from bench.report import render
from bench.suite import BY_NAME, ProfileName, run_suite

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the suite, render the report; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the full profile (tens of minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny profile (tests)")
    parser.add_argument(
        "--only", metavar="NAME,...", help=f"run these sections only: {', '.join(BY_NAME)}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default bench/results, or bench/results/full with --full)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="clock of compute comparisons: wall (default) or this process's CPU time "
        "(for a busy shared machine; use with --threads 1)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--report-only", action="store_true", help="render the report, run nothing")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / "full" if args.full else RESULTS
    timing.configure(clock=args.clock, threads=args.threads)
    if not args.report_only:
        profile: ProfileName = "full" if args.full else "smoke" if args.smoke else "quick"
        only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        try:
            suite = run_suite(profile, args.out, only)
        except ValueError as exc:
            parser.error(str(exc))
        failed = [n for n in suite["ran"] if suite["sections"][n]["status"] == "error"]
    else:
        failed = []
    report = render(args.out)
    print(f"[bench] report: {report}")
    if failed:
        print(f"[bench] failed sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
