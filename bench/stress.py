"""Run the integration suite several times in a row while busy loops load the cores.

Issue #8 asks that "the integration suite passes 5 times in a row while two busy-loop
processes load the cores": on a loaded box, starts take seconds, timers fire late and
races that a quiet box hides show up. This is the harness that shows it, on demand
(``make stress``); it is not part of ``make test``, which must stay quick.

Each run is a fresh ``pytest -m "integration and not reliability"`` process, so one
run's leftovers cannot help the next. The busy loops are plain processes spinning at
100 % CPU, started before the first run and killed after the last (also on Ctrl-C or
SIGTERM). The report (a Markdown table: run, result, counts, duration, load average,
failed tests) goes to stdout and to ``var/stress/<start time>.md``; each run's pytest
output and JUnit XML are kept beside it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

MARKER = "integration and not reliability"
SUMMARY = re.compile(r"^=*\s*(?P<text>(\d+ \w+(, )?)+) in [\d.]+s")


@dataclass
class Run:
    number: int
    returncode: int
    seconds: float
    summary: str
    load: str
    failed: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.returncode == 0


@contextmanager
def busy_loops(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` processes spinning at 100 % CPU, killed on the way out."""
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)
    ]
    try:
        yield loops
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait()


def failed_tests(junit: Path) -> list[str]:
    """The ids of the failed or errored tests in a JUnit XML report."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return []
    names = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            names.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return names


def one_run(number: int, out: Path, marker: str, tests: list[str]) -> Run:
    log = out / f"run-{number}.log"
    junit = out / f"run-{number}.xml"
    start = time.monotonic()
    with log.open("wb") as sink:
        returncode = subprocess.call(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
             f"--junitxml={junit}", *tests],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    seconds = time.monotonic() - start
    summary = ""
    for line in log.read_text(errors="replace").splitlines():
        match = SUMMARY.match(line)
        if match:
            summary = match.group("text")
    one, five, _ = os.getloadavg()
    return Run(number, returncode, seconds, summary or f"exit {returncode}",
               f"{one:.1f} / {five:.1f}", failed_tests(junit))


def table(runs: list[Run], busy: int, marker: str, commit: str) -> str:
    lines = [
        f"# Integration suite under load: `-m \"{marker}\"`, {busy} busy loops, commit {commit}",
        "",
        "| run | result | tests | duration | load 1 / 5 min | failed |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.number} | {'pass' if run.passed else 'FAIL'} | {run.summary} "
            f"| {run.seconds:.0f} s | {run.load} | {', '.join(run.failed) or '-'} |"
        )
    streak = 0
    for run in runs:
        streak = streak + 1 if run.passed else 0
    lines += ["", f"{sum(r.passed for r in runs)} of {len(runs)} passed; "
              f"{streak} in a row at the end."]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through busy_loops: the loops are killed

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs in a row (default 5)")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes (default 2)")
    parser.add_argument("--marker", default=MARKER, help=f"pytest -m (default {MARKER!r})")
    parser.add_argument("--keep-going", action="store_true",
                        help="run all --runs even after a failure (default: stop at the first)")
    parser.add_argument("--out", type=Path, default=Path("var/stress"))
    parser.add_argument("tests", nargs="*", default=["tests"])
    args = parser.parse_args(argv)
    _stop_on_sigterm()
    out = args.out / time.strftime("%Y%m%dT%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    commit = _commit()
    runs: list[Run] = []
    report = out.with_suffix(".md")
    with busy_loops(args.busy):
        for number in range(1, args.runs + 1):
            run = one_run(number, out, args.marker, args.tests)
            runs.append(run)
            report.write_text(table(runs, args.busy, args.marker, commit))
            print(f"run {number}: {'pass' if run.passed else 'FAIL'} {run.summary} "
                  f"{run.seconds:.0f} s {' '.join(run.failed)}", flush=True)
            if not run.passed and not args.keep_going:
                break
    print(table(runs, args.busy, args.marker, commit))
    print(f"report: {report}")
    return 0 if runs and all(r.passed for r in runs) and len(runs) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
