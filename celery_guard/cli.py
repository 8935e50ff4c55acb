"""``celery-guard recommend [FILE ...]``: the settings a worker's own log recommends.

It reads worker logs (files, rotated ``.gz`` files, or stdin), shows which tasks grew
their children, how large children got, and for each worker the settings its last
summary line recommends, recomputed from that line's own figures: a value that differs
from what the worker printed is a bug, and is reported as one.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import sys
from collections.abc import Iterator
from typing import Any, NoReturn, TextIO

from . import stats
from .fleet import cell
from .logreader import MAX_WORKERS, Report, build_report, read_records

#: Rows of the peak histogram, and the widest bar.
HISTOGRAM_ROWS = 10
BAR_WIDTH = 40
#: Characters of the longest line read: a record of ours is a few KiB.
MAX_LINE = 1 << 20
#: Exit statuses.
OK, NO_RECORDS, USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad command line or an unreadable file: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"celery-guard: {message} (see celery-guard --help)")


def _parser() -> _Parser:
    parser = _Parser(prog="celery-guard", description="Tools for celery-guard's log lines.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    recommend = commands.add_parser(
        "recommend",
        help="recommend worker_max_memory_per_child and --concurrency from worker logs",
        description="Read worker logs and print the settings their summary lines recommend.",
        epilog=(
            f"exit status: {OK} when a recommendation was printed, {NO_RECORDS} when the logs "
            f"hold no celery-guard line, {USAGE} for a bad command line or a file that cannot "
            "be read. The same figures live from running workers: celery -A proj guard report."
        ),
    )
    recommend.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="worker log files (.gz allowed); stdin when none is given or for '-'",
    )
    return parser


def _bounded(file: TextIO) -> Iterator[str]:
    """The file's lines, but a line longer than MAX_LINE (a task that logged a payload) is
    skipped piece by piece instead of being held whole: no record of ours is that long."""
    skipping = False
    for line in iter(lambda: file.readline(MAX_LINE), ""):
        ends = line.endswith("\n")
        if skipping:
            skipping = not ends
        elif not ends and len(line) >= MAX_LINE:
            skipping = True
        else:
            yield line


def _lines(names: list[str], stdin: TextIO) -> Iterator[str]:
    """The lines of every file in turn; OSError and UnicodeError become UsageError."""
    for name in names or ["-"]:
        try:
            if name == "-":
                yield from _bounded(stdin)
                continue
            opener: Any = gzip.open if name.endswith(".gz") else open
            with opener(name, "rt", encoding="utf-8", errors="replace") as file:
                yield from _bounded(file)
        except (OSError, UnicodeError, EOFError) as error:
            shown = "stdin" if name == "-" else name
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            raise UsageError(f"celery-guard: cannot read {shown}: {reason}") from None


def _system_stdin() -> TextIO:
    """stdin that replaces undecodable bytes instead of raising (detach it after use:
    the wrapper would close the real stdin when it goes away)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        return sys.stdin
    return io.TextIOWrapper(buffer, encoding="utf-8", errors="replace")


def _count(weight: float) -> str:
    """A histogram weight; whole for counts of lines."""
    return str(int(weight)) if weight == int(weight) else f"{weight:.1f}"


def _safe(text: str, limit: int = 200) -> str:
    """Text from a log as one printable line, a long one cut: control characters are
    shown escaped, so a value can neither split the output nor drive the terminal."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _fmt(value: Any, unit: str = "") -> str:
    """A figure as ``celery guard report`` prints it, text escaped and cut; the unit after
    a number or text."""
    if value is None or isinstance(value, bool):
        return cell(value)
    return (cell(value) if isinstance(value, (int, float)) else _safe(str(value))) + unit


# -- the three parts of the output --------------------------------------------------------
def task_table(report: Report) -> list[str]:
    """Growth of the children's peak RSS by task, largest total first."""
    rows = report.task_rows()
    if not rows:
        return ["no child line with peak growth: no task table"]
    names = [_safe(row.task) for row in rows]
    width = max(len("task"), *(len(name) for name in names))
    lines = [
        "children's peak RSS growth by task, largest total first:",
        f"{'task':<{width}}  {'events':>6}  {'total MiB':>9}  {'mean MiB':>8}  {'max MiB':>7}",
    ]
    for name, row in zip(names, rows, strict=True):
        lines.append(
            f"{name:<{width}}  {row.events:>6}  {row.total_mib:>9.1f}"
            f"  {row.mean_mib:>8.1f}  {row.max_mib:>7.1f}"
        )
    return lines


def peak_histogram(report: Report) -> list[str]:
    """About ten rows of the children's peak RSS, from the child lines: runs of the
    report's 1% buckets, so each count is exact for its range."""
    hist = report.peaks
    if hist.min is None or hist.max is None:
        return ["no child line: no histogram of children's peak RSS"]
    first, last = hist.bucket(hist.min), hist.bucket(hist.max)
    per_row = -(-(last - first + 1) // HISTOGRAM_ROWS)  # ceiling
    weights = dict(hist.buckets())
    rows = []
    for start in range(first, last + 1, per_row):
        end = min(start + per_row, last + 1)
        count = sum(weights.get(index, 0.0) for index in range(start, end))
        rows.append((max(hist.lower(start), hist.min), min(hist.upper(end - 1), hist.max), count))
    largest = max(count for _, _, count in rows)
    lines = [f"children's peak RSS (MiB) in {_count(hist.count)} child lines:"]
    for low, high, count in rows:
        bar = "#" * max(1 if count else 0, round(BAR_WIDTH * count / largest))
        lines.append(f"  {low:>8.1f} - {high:>8.1f}  {_count(count):>6}  {bar}".rstrip())
    return lines


def _summary_inputs(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The keyword arguments of ``stats.recommend`` from a summary; None if incomplete or
    out of range: settings are printed from these, and a negative one must never be."""
    inputs = {key: stats.number(value) for key, value in stats.summary_inputs(summary).items()}
    for key, value in inputs.items():
        whole = key == "concurrency" or key.startswith("plan_")  # counts of children, tasks
        if value is None:
            if key in stats.REQUIRED_INPUTS:
                return None
        elif value < 0 or (whole and (value < 1 or value != int(value))):
            return None
        elif whole:
            inputs[key] = int(value)
    return inputs


def worker_section(worker: str, summary: dict[str, Any], recycle_lines: int) -> list[str]:
    """One worker's figures and the settings its summary recommends, recomputed."""
    final = "final summary" if summary.get("final") is True else "last periodic summary"
    worker = _safe(worker)
    lines = [
        f"worker {worker} ({final}):",
        f"  limit {_fmt(summary.get('limit_mib'), ' MiB')},"
        f" headroom {_fmt(summary.get('headroom_mib'), ' MiB')},"
        f" main process {_fmt(summary.get('parent_rss_mib'), ' MiB')},"
        f" usage {_fmt(summary.get('usage_mib'), ' MiB')},"
        f" working set {_fmt(summary.get('working_set_mib'), ' MiB')}",
        f"  concurrency {_fmt(summary.get('concurrency'))},"
        f" children {_fmt(summary.get('children'))},"
        f" samples {_fmt(summary.get('samples'))},"
        f" recycles {_fmt(summary.get('recycles'))} (recycle lines in the log: {recycle_lines})",
    ]
    for label, key in (
        ("children's private memory", "private"),
        ("children's peak RSS", "peak_rss"),
    ):
        figures = "/".join(_fmt(summary.get(f"{key}_{p}_mib")) for p in ("p50", "p95", "max"))
        lines.append(f"  {label} p50/p95/max: {figures} MiB")
    if summary.get("top_tasks"):
        lines.append(f"  top tasks (MiB of peak growth): {_fmt(summary['top_tasks'])}")
    lines.append("")
    inputs = _summary_inputs(summary)
    if inputs is None:
        lines.append(f"# worker {worker}: the summary lacks the figures to recommend from")
        return lines
    advice = stats.recommend(**inputs)
    lines.append(f"# worker {worker}: from the summary of {_fmt(summary.get('samples'))} samples")
    kib, concurrency = advice.max_memory_per_child_kib, advice.concurrency
    # One pair, concurrency first: the recycle value is computed for that many children.
    if concurrency is None or concurrency < 1:  # 0 would mean the host's CPU count
        lines.append("# --concurrency: none (no child sample in the summary): keep yours")
    else:
        lines.append(f"--concurrency {concurrency}")
    if kib is None or kib < 1:  # 0 would mean no limit to billiard
        lines.append("# worker_max_memory_per_child: none (no child sample in the summary)")
    else:
        lines.append(f"worker_max_memory_per_child = {kib}  # KiB")
    if advice.note:
        lines.append(f"# note: {_safe(advice.note, 1000)}")
    fewer, healthy = advice.alternative_concurrency, advice.alternative_max_memory_per_child_kib
    if fewer is not None and healthy is not None:
        lines.append(
            f"# alternative, recycling none of the healthy children: --concurrency {fewer}"
            f" with worker_max_memory_per_child = {healthy}  # KiB"
        )
    lines.extend(_differences(worker, summary, advice))
    return lines


def _differences(worker: str, summary: dict[str, Any], advice: stats.Recommendation) -> list[str]:
    """``warning:`` lines where the summary printed something else than recomputed."""
    if not summary.keys() & {"recommended_concurrency", "recommended_max_memory_per_child_kib"}:
        return []  # a summary from before recommendations were logged
    recomputed = {
        "recommended_max_memory_per_child_kib": advice.max_memory_per_child_kib,
        "recommended_concurrency": advice.concurrency,
        "recommendation_note": advice.note or None,
        "alternative_concurrency": advice.alternative_concurrency,
        "alternative_max_memory_per_child_kib": advice.alternative_max_memory_per_child_kib,
    }
    return [
        f"warning: worker {worker}: recomputed {key}={_fmt(value)}, but the summary printed"
        f" {_fmt(summary.get(key))} (a bug in celery-guard)"
        for key, value in recomputed.items()
        if summary.get(key) != value
    ]


def render(report: Report) -> list[str]:
    """The whole output of ``recommend``."""
    counts = ", ".join(f"{name} {count}" for name, count in sorted(report.events.items()))
    lines = [f"{report.records} celery-guard lines ({counts})", ""]
    lines += [*task_table(report), "", *peak_histogram(report), ""]
    if not report.summaries:
        lines.append("no summary line: nothing to recommend from")
    for worker in sorted(report.summaries):
        lines += worker_section(worker, report.summaries[worker], report.recycles.get(worker, 0))
        lines.append("")
    if report.unlisted:
        lines.append(
            f"# {report.unlisted} summary and recycle lines of workers beyond the first"
            f" {MAX_WORKERS} are not shown"
        )
    return lines


def main(
    argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    """The ``celery-guard`` program; returns the exit status (errors go to stderr)."""
    out = stdout if stdout is not None else sys.stdout
    source = stdin if stdin is not None else _system_stdin()
    try:
        with contextlib.redirect_stdout(out):  # --help
            args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        report = build_report(read_records(_lines(args.files, source)))
    except UsageError as error:
        print(error, file=sys.stderr)
        return USAGE
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else USAGE
    finally:
        if stdin is None and isinstance(source, io.TextIOWrapper) and source is not sys.stdin:
            source.detach()
    if not report.records:
        print("celery-guard: no celery-guard line found", file=sys.stderr)
        return NO_RECORDS
    out.write("\n".join(render(report)).rstrip("\n") + "\n")
    return OK


if __name__ == "__main__":
    raise SystemExit(main())
