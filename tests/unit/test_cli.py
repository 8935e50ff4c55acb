"""Tests for celery_guard.cli: ``celery-guard recommend`` on real-looking worker logs.

The recommended lines are asserted exactly: they are what a user pastes into a config.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
from pathlib import Path

import pytest

from celery_guard.cli import main

LOGS = Path(__file__).resolve().parent.parent / "testdata" / "logs"
TWO = str(LOGS / "two_workers.log")
JSON = str(LOGS / "json_worker.log")
NONE = str(LOGS / "no_guard.log")
REPO = Path(__file__).resolve().parents[2]

# Worked out by hand as in tests/unit/test_stats.py: host-a's budget 1663.2 MiB holds 11
# children of 150 MiB; each can afford 170 + 1663.2 / 11 = 321.2 MiB (328908.8 KiB) of
# peak RSS, below the healthy 300 * 1.15 = 345; floor(1663.2 / (345 - 170)) = 9 children
# recycle none. host-b (budget 721.6): 6 children of 110 MiB at 180 + 721.6 / 6 = 300.27
# MiB (307473.07 KiB), or floor(721.6 / 165) = 4 at 345. host-c: the docstring's example.
HOST_A = [
    "# worker celery@host-a: from the summary of 96 samples",
    "--concurrency 11",
    "worker_max_memory_per_child = 328908  # KiB",
    "# note: at 11 children each can afford 321.2 MiB of peak RSS, less than the healthy"
    " peaks with margin (345.0 MiB): children that peak above it are recycled; 9 children"
    " would recycle none of the healthy ones",
    "# alternative, recycling none of the healthy children: --concurrency 9 with"
    " worker_max_memory_per_child = 353280  # KiB",
    "",
]
HOST_B = [
    "# worker celery@host-b: from the summary of 64 samples",
    "--concurrency 6",
    "worker_max_memory_per_child = 307473  # KiB",
    "# note: at 6 children each can afford 300.3 MiB of peak RSS, less than the healthy"
    " peaks with margin (345.0 MiB): children that peak above it are recycled; 4 children"
    " would recycle none of the healthy ones",
    "# alternative, recycling none of the healthy children: --concurrency 4 with"
    " worker_max_memory_per_child = 353280  # KiB",
]
HOST_C = [
    "# worker celery@host-c: from the summary of 48 samples",
    "--concurrency 7",
    "worker_max_memory_per_child = 292805  # KiB",
    "# note: at 7 children each can afford 285.9 MiB of peak RSS, less than the healthy"
    " peaks with margin (322.0 MiB): children that peak above it are recycled; 5 children"
    " would recycle none of the healthy ones",
    "# alternative, recycling none of the healthy children: --concurrency 5 with"
    " worker_max_memory_per_child = 329728  # KiB",
]
TABLE_HEAD = "task              events  total MiB  mean MiB  max MiB"


def _run(argv: list[str], stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    status = main(argv, stdin=io.StringIO(stdin), stdout=out)
    return status, out.getvalue()


def _contains_block(lines: list[str], block: list[str]) -> bool:
    return any(lines[i : i + len(block)] == block for i in range(len(lines)))


# id, files, blocks of consecutive lines the output must contain
OUTPUTS: list[tuple[str, list[str], list[list[str]]]] = [
    (
        "two-workers-text",
        [TWO],
        [
            ["18 celery-guard lines (child 11, recycle 1, startup 2, summary 4)"],
            [
                "children's peak RSS growth by task, largest total first:",
                TABLE_HEAD,
                "app.tasks.leak         4      240.5      60.1    110.5",
                "app.tasks.walk         4      174.5      43.6     80.0",
                "app.tasks.resize       1        5.5       5.5      5.5",
            ],
            [
                "children's peak RSS (MiB) in 10 child lines:",
                "     245.5 -    252.7       3  ########################################",
                "     252.7 -    260.4       1  #############",
                "     260.4 -    268.3       0",
                "     268.3 -    276.4       0",
                "     276.4 -    284.8       2  ###########################",
                "     284.8 -    293.4       0",
                "     293.4 -    302.3       1  #############",
                "     302.3 -    311.5       2  ###########################",
                "     311.5 -    320.9       0",
                "     320.9 -    330.0       1  #############",
            ],
            [
                "worker celery@host-a (final summary):",
                "  limit 2048.0 MiB, headroom 204.8 MiB, main process 180.0 MiB,"
                " usage 1520.3 MiB, working set 1490.8 MiB",
                "  concurrency 8, children 8, samples 96, recycles 1 (recycle lines in the log: 1)",
                "  children's private memory p50/p95/max: 120.0/150.0/162.4 MiB",
                "  children's peak RSS p50/p95/max: 290.0/300.0/330.0 MiB",
                "  top tasks (MiB of peak growth):"
                " app.tasks.leak:130.0,app.tasks.walk:93.5,app.tasks.resize:5.5",
            ],
            HOST_A,
            ["worker celery@host-b (last periodic summary):"],
            HOST_B,
        ],
    ),
    (
        "one-worker-json",
        [JSON],
        [
            ["7 celery-guard lines (child 4, recycle 1, startup 1, summary 1)"],
            [
                TABLE_HEAD,
                "app.tasks.leak         2      150.0      75.0     90.0",
                "app.tasks.walk         1       85.0      85.0     85.0",
                "app.tasks.resize       1       10.5      10.5     10.5",
            ],
            ["children's peak RSS (MiB) in 4 child lines:"],
            HOST_C,
        ],
    ),
    (
        "all-three",
        [TWO, JSON],
        [
            [
                TABLE_HEAD,
                "app.tasks.leak         6      390.5      65.1    110.5",
                "app.tasks.walk         5      259.5      51.9     85.0",
                "app.tasks.resize       2       16.0       8.0     10.5",
            ],
            ["children's peak RSS (MiB) in 14 child lines:"],
            HOST_A,
            HOST_B,
            HOST_C,
        ],
    ),
]


@pytest.mark.parametrize("files,blocks", [o[1:] for o in OUTPUTS], ids=[o[0] for o in OUTPUTS])
def test_recommend_on_fixture_logs(files: list[str], blocks: list[list[str]]) -> None:
    status, output = _run(["recommend", *files])
    lines = output.splitlines()
    assert status == 0
    for block in blocks:
        assert _contains_block(lines, block), block
    assert not [line for line in lines if line.startswith("warning:")]


def test_histogram_has_about_ten_rows_that_add_up() -> None:
    _, output = _run(["recommend", TWO, JSON])
    lines = output.splitlines()
    start = lines.index("children's peak RSS (MiB) in 14 child lines:") + 1
    rows = lines[start : lines.index("", start)]
    assert 5 <= len(rows) <= 10
    assert sum(int(row.split()[3]) for row in rows) == 14


# id, argv that read stdin
STDIN = [
    ("no-file", ["recommend"]),
    ("dash", ["recommend", "-"]),
]


@pytest.mark.parametrize("argv", [s[1] for s in STDIN], ids=[s[0] for s in STDIN])
def test_stdin_reads_like_a_file(argv: list[str]) -> None:
    text = Path(JSON).read_text(encoding="utf-8")
    assert _run(argv, text) == _run(["recommend", JSON])


def test_file_and_stdin_together() -> None:
    text = Path(JSON).read_text(encoding="utf-8")
    assert _run(["recommend", TWO, "-"], text) == _run(["recommend", TWO, JSON])


def test_gzip_file(tmp_path: Path) -> None:
    """Rotated logs are often compressed."""
    packed = tmp_path / "worker.log.1.gz"
    packed.write_bytes(gzip.compress(Path(JSON).read_bytes()))
    assert _run(["recommend", str(packed)]) == _run(["recommend", JSON])


SUMMARY = (
    "[2026-11-21 07:00:00,000: INFO/MainProcess] celery-guard event=summary worker=w@x"
    " final=true limit_mib=1024.0 headroom_mib=102.4 parent_rss_mib=180.0 concurrency=7"
    " children=7 samples={samples} private_p50_mib={p50} private_p95_mib={p95}"
    " peak_rss_p50_mib={peak50} peak_rss_p95_mib={peak95}"
    " recommended_max_memory_per_child_kib={kib} recommended_concurrency={conc}{note}\n"
)
WORKED = {"samples": 48, "p50": "90.0", "p95": "98.0", "peak50": "270.0", "peak95": "280.0"}
NOTE = (
    ' recommendation_note="at 7 children each can afford 285.9 MiB of peak RSS, less than the'
    " healthy peaks with margin (322.0 MiB): children that peak above it are recycled;"
    ' 5 children would recycle none of the healthy ones"'
    " alternative_concurrency=5 alternative_max_memory_per_child_kib=329728"
)
EMPTY = {"samples": 0, "p50": "", "p95": "", "peak50": "", "peak95": ""}

# id, log text, lines the output must contain, lines it must not contain
SUMMARY_CASES: list[tuple[str, str, list[str], list[str]]] = [
    (
        "agrees",
        SUMMARY.format(**WORKED, kib=292805, conc=7, note=NOTE),
        ["worker_max_memory_per_child = 292805  # KiB", "--concurrency 7"],
        ["warning:"],
    ),
    (
        "kib-differs",
        SUMMARY.format(**WORKED, kib=292806, conc=7, note=NOTE),
        [
            "warning: worker w@x: recomputed recommended_max_memory_per_child_kib=292805,"
            " but the summary printed 292806 (a bug in celery-guard)"
        ],
        [],
    ),
    (
        "concurrency-differs",
        SUMMARY.format(**WORKED, kib=292805, conc=8, note=NOTE),
        [
            "warning: worker w@x: recomputed recommended_concurrency=7,"
            " but the summary printed 8 (a bug in celery-guard)"
        ],
        [],
    ),
    (
        "note-missing",
        SUMMARY.format(**WORKED, kib=292805, conc=7, note=""),
        ["warning: worker w@x: recomputed recommendation_note=at 7 children each"],
        [],
    ),
    (
        "no-samples",
        SUMMARY.format(**EMPTY, kib="", conc="", note=""),
        [
            "# worker w@x: from the summary of 0 samples",
            "# worker_max_memory_per_child: none (no child sample in the summary)",
            "# --concurrency: none (no child sample in the summary): keep yours",
            "no child line: no histogram of children's peak RSS",
            "no child line with peak growth: no task table",
        ],
        ["warning:", "worker_max_memory_per_child ="],
    ),
    (
        "before-recommendations",
        SUMMARY.format(**WORKED, kib="", conc="", note="").split(" recommended_")[0],
        ["worker_max_memory_per_child = 292805  # KiB"],
        ["warning:"],
    ),
    (
        "summary-cut-short",
        SUMMARY.format(**WORKED, kib="", conc="", note="").split(" parent_rss_mib")[0],
        ["# worker w@x: the summary lacks the figures to recommend from"],
        ["worker_max_memory_per_child ="],
    ),
    (
        "no-summary",
        '{"event":"startup","concurrency":7}\n',
        ["1 celery-guard lines (startup 1)", "no summary line: nothing to recommend from"],
        ["# worker"],
    ),
]


@pytest.mark.parametrize(
    "text,present,absent", [c[1:] for c in SUMMARY_CASES], ids=[c[0] for c in SUMMARY_CASES]
)
def test_summary_cases(text: str, present: list[str], absent: list[str]) -> None:
    status, output = _run(["recommend"], text)
    assert status == 0
    for expected in present:
        assert any(line.startswith(expected) for line in output.splitlines()), expected
    for unexpected in absent:
        assert unexpected not in output


# id, argv, stdin, expected status, expected stderr (start of it)
FAILURES = [
    ("no-guard-line", ["recommend", NONE], "", 1, "celery-guard: no celery-guard line found"),
    ("empty-stdin", ["recommend"], "", 1, "celery-guard: no celery-guard line found"),
    (
        "missing-file",
        ["recommend", str(LOGS / "missing.log")],
        "",
        2,
        f"celery-guard: cannot read {LOGS / 'missing.log'}: No such file or directory",
    ),
    (
        "missing-after-good",
        ["recommend", JSON, str(LOGS / "missing.log")],
        "",
        2,
        f"celery-guard: cannot read {LOGS / 'missing.log'}: No such file or directory",
    ),
    ("directory", ["recommend", str(LOGS)], "", 2, f"celery-guard: cannot read {LOGS}: "),
    ("no-command", [], "", 2, "celery-guard: the following arguments are required: COMMAND"),
    ("unknown-command", ["frobnicate"], "", 2, "celery-guard: argument COMMAND: invalid choice"),
    ("unknown-option", ["recommend", "--bad"], "", 2, "celery-guard: unrecognized arguments"),
]


@pytest.mark.parametrize(
    "argv,stdin,status,message", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
def test_failures(
    argv: list[str], stdin: str, status: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line on stderr, no traceback, nothing on stdout."""
    assert _run(argv, stdin) == (status, "")
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_help_goes_to_stdout() -> None:
    status, output = _run(["--help"])
    assert status == 0
    assert output.startswith("usage: celery-guard")
    assert "recommend" in output


def test_the_commands_help_gives_its_exit_statuses() -> None:
    """Each status ``recommend`` can end with is in its --help, as docs/exit-statuses.md
    gives them: the program's own constants, so the help cannot drift from the code."""
    from celery_guard.cli import NO_RECORDS, OK, USAGE

    status, output = _run(["recommend", "--help"])
    assert status == 0
    text = " ".join(output.split())
    for code, meaning in ((OK, "a recommendation"), (NO_RECORDS, "no celery-guard line"),
                          (USAGE, "a bad command line")):  # fmt: skip
        assert f"{code} when" in text or f"{code} for" in text, code
        assert meaning in text


def test_python_dash_m(tmp_path: Path) -> None:
    """``python -m celery_guard.cli`` runs, and stdin with bytes that are not UTF-8 is read."""
    done = subprocess.run(
        [sys.executable, "-m", "celery_guard.cli", "recommend"],
        input=Path(TWO).read_bytes(),  # has a garbled line of invalid UTF-8
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, b"")
    assert _contains_block(done.stdout.decode().splitlines(), HOST_A)
