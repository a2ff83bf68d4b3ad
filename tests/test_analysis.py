"""
analysis.py on small results files written by the tests.

    uv run pytest tests/test_analysis.py -v

The functions (parse, summarize, report, plot) are imported directly; the
command line (exit codes, stderr warnings, --json, --plot) runs in a
subprocess. CPU only, no network, a few seconds (the 100k-line file is the
longest).
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import analysis  # noqa: E402

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"

# A night in miniature: baseline, two real improvements, one tiny one, a
# discard, a crash, a noise rerun of the first improvement, a blank line,
# a malformed line, and a row written with spaces instead of tabs.
NIGHT = HEADER + (
    "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
    "b2c3d4e\t0.993200\t44.2\tkeep\tincrease matrix LR to 0.05\n"
    "c3d4e5f\t1.005000\t44.0\tdiscard\tswitch to GeLU\n"
    "d4e5f6a\t0.000000\t0.0\tcrash\tdouble the width (OOM)\n"
    "\n"
    "this line is not a result\n"
    "b2c3d4e\t0.993900\t44.2\tnoise\trerun of b2c3d4e\n"
    "e5f6a7b\t0.993000\t44.1\tkeep\twarmdown 0.6\n"
    "f6a7b8c 0.985000 43.0 keep bigger batch, less depth\n"
)
# Worked by hand from NIGHT:
BASELINE, BEST = 0.997900, 0.985000
NOISE = 0.993900 - 0.993200               # b2c3d4e's two runs
STEP_DELTAS = [0.993200 - 0.997900,       # LR
               0.993000 - 0.993200,       # warmdown: smaller than NOISE
               0.985000 - 0.993000]       # bigger batch


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(*args, cwd=REPO, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "analysis.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def night(tmp_path):
    return write(tmp_path, "results.tsv", NIGHT)


# =============================================================================
# parse and summarize
# =============================================================================

def test_parse_skips_and_warns(night):
    rows, warnings = analysis.parse(night)
    assert [r.status for r in rows] == ["keep", "keep", "discard", "crash", "noise", "keep", "keep"]
    assert [r.n for r in rows] == [0, 1, 2, 3, None, 4, 5]     # the noise rerun takes no number
    assert [r.line for r in rows] == [2, 3, 4, 5, 8, 9, 10]
    assert rows[-1].description == "bigger batch, less depth" and rows[-1].val_bpb == BEST
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{night}:7:")       # the malformed line
    assert warnings[1].startswith(f"{night}:10:") and "not tab-separated" in warnings[1]


@pytest.mark.parametrize("line, why", [
    ("abc\tnot-a-number\t44.0\tkeep\tx", "not a number"),
    ("abc\t0.99\t44.0\tmaybe\tx", "unknown status"),
    ("abc\t0.000000\t0.0\tkeep\tx", "a crash?"),
    ("abc\t0.99", "expected 5"),
    # Implausible numbers (issue 22): skipped, naming the rule.
    ("abc\t1e-300\t44.0\tkeep\tx", "below 0.01 is implausible"),
    ("abc\t0.000001\t44.0\tdiscard\tx", "below 0.01 is implausible"),
    ("abc\t44.000000\t44.0\tkeep\tx", "above 16 bits per byte is implausible"),
    ("abc\t44.000000\t0.9979\tdiscard\tx", "val_bpb and memory_gb look swapped"),
])
def test_parse_rejects_malformed_rows(tmp_path, line, why):
    rows, warnings = analysis.parse(write(tmp_path, "r.tsv", HEADER + line + "\n"))
    assert rows == [] and len(warnings) == 1 and why in warnings[0] and "skipped" in warnings[0]


def test_summary_numbers(night):
    rows, _ = analysis.parse(night)
    s = analysis.summarize(rows, night)
    # After the baseline: 5 experiments, of which 3 kept; the baseline is not "kept".
    assert (s["experiments"], s["kept"], s["discarded"], s["crashed"], s["noise_runs"]) == (5, 3, 1, 1, 1)
    assert s["crashed_before_baseline"] == 0
    assert s["keep_rate"] == pytest.approx(3 / 5)
    assert s["baseline"]["val_bpb"] == BASELINE and s["baseline"]["commit"] == "a1b2c3d"
    assert s["best"]["val_bpb"] == BEST and s["best"]["commit"] == "f6a7b8c"
    assert s["improvement"] == pytest.approx(BASELINE - BEST)
    assert s["improvement_pct"] == pytest.approx(100 * (BASELINE - BEST) / BASELINE, abs=1e-4)
    # The threshold: 3 x the rerun noise (0.0021), above the default 0.002.
    assert s["noise"] == pytest.approx(NOISE) and s["noise_groups"] == 1
    assert s["threshold"] == pytest.approx(3 * NOISE) and s["threshold_source"] == "reruns"
    assert [st["delta"] for st in s["steps"]] == pytest.approx(STEP_DELTAS)
    assert [st["within_noise"] for st in s["steps"]] == [False, True, False]
    assert [st["verdict"] for st in s["steps"]] == ["large", "unconfirmed", "large"]
    assert [st["parent"] for st in s["steps"]] == ["a1b2c3d", "b2c3d4e", "e5f6a7b"]
    assert [st["commit"] for st in s["top"]] == ["f6a7b8c", "b2c3d4e", "e5f6a7b"]


# The case: "5 experiments, kept 2", yet the kept step was "#6". The baseline
# is #0 and not kept; noise reruns (two of them here) take no number.
COUNTED = HEADER + (
    "0000000\t1.000000\t44.0\tkeep\tbaseline\n"
    "0000000\t1.001000\t44.0\tnoise\trerun of the baseline\n"
    "1111111\t1.004000\t44.0\tdiscard\tone\n"
    "2222222\t0.990000\t44.0\tkeep\ttwo\n"
    "2222222\t0.991000\t44.0\tnoise\trerun of two\n"
    "3333333\t0.000000\t0.0\tcrash\tthree\n"
    "4444444\t0.980000\t44.0\tkeep\tfour\n"
    "5555555\t0.985000\t44.0\tdiscard\tfive\n"
)


def test_numbering_as_a_reader_counts(tmp_path):
    path = write(tmp_path, "r.tsv", COUNTED)
    s = analysis.summarize(analysis.parse(path)[0], path)
    assert (s["experiments"], s["kept"], s["discarded"], s["crashed"]) == (5, 2, 2, 1)
    assert s["keep_rate"] == pytest.approx(2 / 5)
    assert s["baseline"]["n"] == 0
    assert [(st["n"], st["description"]) for st in s["steps"]] == [(2, "two"), (4, "four")]
    assert [st["line"] for st in s["steps"]] == [5, 8]
    out = run_cli(path).stdout
    assert "experiments: 5 after the baseline  kept: 2  discarded: 2  crashed: 1  keep rate: 40%" in out
    assert "#2    2222222" in out and "#4    4444444" in out and "#6" not in out


def test_crashes_before_the_baseline_are_counted_apart(tmp_path):
    path = write(tmp_path, "r.tsv", HEADER + "a\t0.0\t0.0\tcrash\tdefault OOMs\n"
                                              "b\t0.0\t0.0\tcrash\tsmaller batch, still OOM\n"
                                              "c\t1.0\t40.0\tkeep\tbaseline at batch 64\n"
                                              "d\t0.9\t40.0\tkeep\tone\n")
    rows, _ = analysis.parse(path)
    assert [r.n for r in rows] == [None, None, 0, 1]
    s = analysis.summarize(rows, path)
    assert (s["experiments"], s["kept"], s["crashed"], s["crashed_before_baseline"]) == (1, 1, 0, 2)
    assert "crashed before the baseline: 2" in analysis.report([s])


def test_explicit_noise_overrides_reruns(night):
    rows, _ = analysis.parse(night)
    s = analysis.summarize(rows, night, noise=0.005)
    assert s["threshold"] == 0.005 and s["threshold_source"] == "--noise" and s["noise"] == pytest.approx(NOISE)
    # 0.0047 and 0.0002 are under 0.005; 0.008 is not.
    assert [st["within_noise"] for st in s["steps"]] == [True, True, False]
    assert [st["verdict"] for st in s["steps"]] == ["unconfirmed", "unconfirmed", "large"]


def test_without_reruns_the_default_threshold_applies(tmp_path):
    rows, _ = analysis.parse(write(tmp_path, "r.tsv", HEADER + "a\t1.0\t1.0\tkeep\tbase\nb\t0.9\t1.0\tkeep\tx\n"
                                                              "c\t0.899\t1.0\tkeep\ty\n"))
    s = analysis.summarize(rows)
    assert s["noise"] is None and s["threshold"] == board.CONFIRM_THRESHOLD and s["threshold_source"] == "default"
    assert [(st["within_noise"], st["verdict"]) for st in s["steps"]] == [(False, "large"), (True, "unconfirmed")]
    assert (f"threshold:   0.002000  (the default, {board.CONFIRM_FACTOR} x the 0.0007 rerun difference measured on "
            "an H100, issue 24; no paired reruns here)") in analysis.report([s])


@pytest.mark.parametrize("text", ["", HEADER, HEADER + "\n\n", HEADER + "abc\t0.000000\t0.0\tcrash\toom\n"])
def test_empty_or_all_crashed(tmp_path, text):
    path = write(tmp_path, "r.tsv", text)
    rows, warnings = analysis.parse(path)
    s = analysis.summarize(rows, path)
    assert warnings == []
    assert s["baseline"] is None and s["best"] is None and s["improvement"] is None and s["steps"] == []
    assert s["experiments"] == s["crashed"] == 0 and s["crashed_before_baseline"] == len(rows)
    text_report = analysis.report([s])
    assert (f"no successful run yet ({len(rows)} crashed)" if rows else "no experiments yet") in text_report


# =============================================================================
# Text report
# =============================================================================

def test_text_report(night):
    r = run_cli(night)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("experiments: 5 after the baseline  kept: 3  discarded: 1  crashed: 1  keep rate: 60%",
                   "noise reruns: 1",
                   f"baseline:    {BASELINE:.6f}", f"best:        {BEST:.6f}",
                   f"improvement: {BASELINE - BEST:.6f}", f"({100 * (BASELINE - BEST) / BASELINE:.2f}% of the baseline)",
                   f"threshold:   {3 * NOISE:.6f}  (3 x the rerun noise, paired reruns here: max-min "
                   f"{NOISE:.6f} over 1 commit(s) at one seed)",
                   "kept experiments (2 large, 1 unconfirmed; delta vs the best before it):",
                   f"#1    b2c3d4e  0.993200  {STEP_DELTAS[0]:+.6f}  large        increase matrix LR to 0.05\n",
                   f"#4    e5f6a7b  0.993000  {STEP_DELTAS[1]:+.6f}  unconfirmed  warmdown 0.6\n",
                   f"1. {-STEP_DELTAS[2]:.6f}  #5    f6a7b8c"):
        assert needle in out, (needle, out)
    # Malformed input is warned with file:line and skipped.
    assert f"warning: {night}:7:" in r.stderr
    assert f"warning: {night}:10:" in r.stderr


def test_missing_file_exits_1(tmp_path):
    r = run_cli(tmp_path / "nope.tsv")
    assert r.returncode == 1
    assert "results file not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("value", ["-0.001", "nan", "inf"])
def test_negative_noise_is_refused(night, value):
    r = run_cli(night, f"--noise={value}")
    assert r.returncode == 2 and "--noise must be a spread >= 0" in r.stderr and "Traceback" not in r.stderr


def test_default_is_results_tsv(night):
    r = run_cli(cwd=night.parent)
    assert r.returncode == 0 and "experiments: 5 after the baseline" in r.stdout


def test_several_files_compared(tmp_path, night):
    other = write(tmp_path, "gpu1.tsv", HEADER + "1111111\t0.998000\t44.0\tkeep\tbaseline\n"
                                                  "2222222\t0.990000\t40.0\tkeep\tsmaller window\n")
    empty = write(tmp_path, "gpu2.tsv", "")
    r = run_cli(night, other, empty)
    assert r.returncode == 0, r.stderr
    titles = [line for line in r.stdout.splitlines() if line.startswith("== ")]
    assert titles == [f"== {night} ==", f"== {other} ==", f"== {empty} ==", "== comparison =="]
    table = r.stdout.split("== comparison ==")[1]
    assert f"{BEST:.6f}" in table and "0.990000" in table
    assert f"best overall: {night}" in table


# =============================================================================
# The seed column and the keep rule: paired noise, large, confirmed, unconfirmed
# =============================================================================

SEEDED = "commit\tval_bpb\tmemory_gb\tstatus\tseed\tdescription\n"

# program.md's keep rule, logged: a large gain kept at once; a small one confirmed at seed 43 (parent and
# candidate each a confirm row) and kept; one that lost its confirmation (its parent's run at 43 reused)
# but was kept anyway; a small one kept without confirming; one kept though worse than the best. The
# baseline's run at seed 44 is no noise (another seed); its rerun at 42 is.
KEEP_RULE = SEEDED + (
    "aaaaaaa\t1.000000\t44.0\tkeep\t42\tbaseline\n"
    "aaaaaaa\t1.000600\t44.0\tnoise\t42\trerun of the baseline\n"
    "aaaaaaa\t0.991000\t44.0\tnoise\t44\tthe baseline at another seed: not noise\n"
    "bbbbbbb\t0.995000\t44.0\tkeep\t42\tlarge: matrix lr\n"
    "ccccccc\t0.994000\t44.0\tconfirm\t43\tsmall: warmdown, at seed 43\n"
    "bbbbbbb\t0.994500\t44.0\tconfirm\t43\tits parent at seed 43\n"
    "ccccccc\t0.994200\t44.0\tkeep\t42\tsmall: warmdown\n"
    "ddddddd\t0.994900\t44.0\tconfirm\t43\tsmall: rope base, at seed 43\n"
    "ddddddd\t0.993900\t44.0\tkeep\t42\tsmall: rope base, lost at 43, kept anyway\n"
    "eeeeeee\t0.993500\t44.0\tkeep\t42\tsmall: unconfirmed\n"
    "fffffff\t0.996000\t44.0\tkeep\t42\tkept though worse\n"
    "0000000\t0.990000\t44.0\tdiscard\t42\tdiscarded\n"
)


def test_seed_column_and_old_files(tmp_path):
    rows, warnings = analysis.parse(write(tmp_path, "r.tsv", KEEP_RULE))
    assert warnings == [] and [r.seed for r in rows[:4]] == [42, 42, 44, 42]
    assert [r.n for r in rows] == [0, None, None, 1, None, None, 2, None, 3, 4, 5, 6]  # confirm: no number
    # Five-column files still read (seed unknown: 42); a six-column row without a header is read by its shape.
    old, _ = analysis.parse(write(tmp_path, "old.tsv", NIGHT))
    assert all(r.seed is None for r in old) and len(old) == 7
    bare, warnings = analysis.parse(write(tmp_path, "bare.tsv", "a\t1.0\t44.0\tkeep\t7\tbase\n"
                                                                "b\t0.9\t44.0\tkeep\tx\n"))
    assert warnings == [] and [(r.seed, r.description) for r in bare] == [(7, "base"), (None, "x")]
    _, warnings = analysis.parse(write(tmp_path, "bad.tsv", SEEDED + "a\t1.0\t44.0\tkeep\tseven\tx\n"
                                                                     "b\t1.0\t44.0\tkeep\tx\n"))
    assert "seed 'seven' is not a number" in warnings[0] and "expected 6 tab-separated columns" in warnings[1]


def test_the_keep_rule_verdicts(tmp_path):
    path = write(tmp_path, "r.tsv", KEEP_RULE)
    s = analysis.summarize(analysis.parse(path)[0], path)
    # Paired noise only: the baseline's rerun at 42 (0.0006), not its run at 44 (0.009 away).
    assert s["noise"] == pytest.approx(0.0006) and s["noise_groups"] == 1
    assert s["threshold"] == board.CONFIRM_THRESHOLD and s["threshold_source"] == "default"  # 3 x 0.0006 < 0.002
    steps = {st["commit"]: st for st in s["steps"]}
    assert {c: st["verdict"] for c, st in steps.items()} == {
        "bbbbbbb": "large", "ccccccc": "confirmed", "ddddddd": "unconfirmed", "eeeeeee": "unconfirmed",
        "fffffff": "no gain"}
    assert steps["ccccccc"]["confirmations"] == [{"seed": 43, "val_bpb": 0.994, "parent": 0.9945, "won": True}]
    assert steps["ddddddd"]["confirmations"] == [{"seed": 43, "val_bpb": 0.9949, "parent": 0.994, "won": False}]
    # Kept though worse than the best: not an improvement, and not "within noise" (it was flagged so).
    assert steps["fffffff"]["within_noise"] is False and steps["fffffff"]["delta"] > 0
    assert steps["eeeeeee"]["within_noise"] is True and steps["bbbbbbb"]["within_noise"] is False
    out = run_cli(path).stdout
    assert "kept experiments (1 large, 1 confirmed, 2 unconfirmed, 1 no gain; delta vs the best before it):" in out
    assert "confirmed    small: warmdown  (seed 43: 0.994000 vs 0.994500, won)" in out
    assert "unconfirmed  small: rope base, lost at 43, kept anyway  (seed 43: 0.994900 vs 0.994000, lost)" in out
    assert "no gain      kept though worse  (not an improvement)" in out and "within noise" not in out
    assert "noise reruns: 2  confirmation runs: 3" in out


def test_noise_is_measured_on_paired_runs_only(tmp_path):
    # Before: every run of a commit counted, whatever its seed: 0.009 here, a seed's difference, not a rerun's.
    path = write(tmp_path, "r.tsv", SEEDED + "aaaaaaa\t1.000000\t44.0\tkeep\t42\tbaseline\n"
                                             "aaaaaaa\t0.991000\t44.0\tnoise\t43\tanother seed\n"
                                             "bbbbbbb\t0.995000\t44.0\tkeep\t42\tx\n")
    s = analysis.summarize(analysis.parse(path)[0], path)
    assert s["noise"] is None and s["threshold_source"] == "default"
    # A measured noise above the default's raises the threshold to 3 x it.
    path = write(tmp_path, "r2.tsv", SEEDED + "aaaaaaa\t1.000000\t44.0\tkeep\t42\tbaseline\n"
                                              "aaaaaaa\t1.001000\t44.0\tnoise\t42\trerun\n"
                                              "bbbbbbb\t0.997500\t44.0\tkeep\t42\tx\n")
    s = analysis.summarize(analysis.parse(path)[0], path)
    assert s["threshold"] == pytest.approx(0.003) and s["threshold_source"] == "reruns"
    assert s["steps"][0]["verdict"] == "unconfirmed"   # 0.0025: above the default, not above 3 x 0.001


def test_a_step_at_another_seed_is_not_paired(tmp_path):
    path = write(tmp_path, "r.tsv", SEEDED + "aaaaaaa\t1.000000\t44.0\tkeep\t42\tbaseline\n"
                                             "bbbbbbb\t0.990000\t44.0\tkeep\t137\tlucky seed\n")
    s = analysis.summarize(analysis.parse(path)[0], path)
    assert s["steps"][0]["paired"] is False and s["steps"][0]["verdict"] == "unconfirmed"
    assert "(not paired: its seed differs from aaaaaaa's)" in analysis.report([s])


# =============================================================================
# JSON and plot
# =============================================================================

def test_json_fields(night, tmp_path):
    other = write(tmp_path, "gpu1.tsv", HEADER + "1111111\t0.998000\t44.0\tkeep\tbaseline\n")
    r = run_cli(night, other, "--json", "--noise", "0.001")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"files", "best_file"} and data["best_file"] == str(night)
    s = data["files"][0]
    assert set(s) == {"path", "experiments", "kept", "discarded", "crashed", "crashed_before_baseline",
                      "noise_runs", "confirm_runs", "keep_rate", "baseline", "best", "improvement", "improvement_pct",
                      "noise", "noise_groups", "threshold", "threshold_source", "steps", "top", "warnings"}
    assert s["best"] == {"n": 5, "line": 10, "commit": "f6a7b8c", "val_bpb": BEST, "memory_gb": 43.0,
                         "status": "keep", "description": "bigger batch, less depth", "seed": None}
    assert s["threshold"] == 0.001 and s["threshold_source"] == "--noise"
    assert set(s["steps"][0]) >= {"prev_best", "parent", "delta", "paired", "within_noise", "verdict",
                                  "confirmations"}
    assert [st["within_noise"] for st in s["steps"]] == [False, True, False]
    assert len(s["warnings"]) == 2
    assert data["files"][1]["steps"] == [] and data["files"][1]["improvement"] == 0


def _no_constants(name):
    raise AssertionError(f"{name} in the output is not JSON")


def test_json_has_no_nan_or_infinity(tmp_path):
    # Python's json writes and reads NaN/Infinity by default; strict readers refuse them.
    path = write(tmp_path, "r.tsv", HEADER + "a\t1.0\tnan\tkeep\tbaseline\n"
                                              "b\tnan\t0.0\tcrash\tdiverged\n"
                                              "c\t-inf\tinf\tcrash\tdiverged harder\n"
                                              "d\t0.9\tinf\tkeep\tone\n"
                                              "e\tinf\t40.0\tdiscard\tnot a number\n")
    r = run_cli(path, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout, parse_constant=_no_constants)
    s = data["files"][0]
    assert s["baseline"]["memory_gb"] is None and s["best"]["memory_gb"] is None
    assert (s["experiments"], s["kept"], s["crashed"]) == (3, 1, 2)
    assert "memory_gb nan is not a finite number; read as unknown" in r.stderr
    assert f"{path}:6: status discard with val_bpb inf: a result needs a finite val_bpb > 0" in r.stderr
    assert "1.000000  (#0 a, ? GB) baseline" in run_cli(path).stdout


def test_to_json_nulls_any_non_finite_number():
    data = analysis.to_json([{"path": "x", "best": None, "noise": math.inf, "steps": [{"delta": -math.nan}]}])
    assert data["files"][0]["noise"] is None and data["files"][0]["steps"][0]["delta"] is None
    json.dumps(data, allow_nan=False)


def test_100k_lines_in_seconds(tmp_path):
    # Noise reruns of many commits made the noise measurement quadratic: 100k lines took 131 s.
    lines = [HEADER.rstrip("\n")]
    for i in range(50_000):
        status = "keep" if i % 10 == 0 else "discard"
        val = 1.0 - i * 1e-6 if status == "keep" else 1.0 + (i % 7) * 1e-3
        lines.append(f"{i:07x}\t{val:.6f}\t44.0\t{status}\tchange {i}")
        lines.append(f"{i:07x}\t{val + (i % 3) * 1e-4:.6f}\t44.0\tnoise\trerun")
    path = write(tmp_path, "big.tsv", "\n".join(lines) + "\n")
    start = time.monotonic()
    r = run_cli(path, "--json", timeout=60)
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["files"][0]
    assert (s["experiments"], s["kept"], s["noise_runs"]) == (49_999, 4_999, 50_000)
    assert s["noise"] == pytest.approx(2e-4)
    assert elapsed < 15, f"100k lines took {elapsed:.1f} s"


def test_warnings_are_capped_on_stderr_but_all_in_json(tmp_path):
    path = write(tmp_path, "r.tsv", HEADER + "junk\n" * 15 + "a\t1.0\t1.0\tkeep\tbaseline\n")
    r = run_cli(path, "--json")
    assert r.returncode == 0
    assert r.stderr.count("expected 5 tab-separated columns") == analysis.MAX_WARNINGS
    assert f"{path}: {15 - analysis.MAX_WARNINGS} more not shown" in r.stderr
    assert len(json.loads(r.stdout)["files"][0]["warnings"]) == 15


def test_unreadable_results_file_is_one_line(tmp_path):
    r = run_cli(tmp_path)  # a folder, not a file
    assert r.returncode == 1 and r.stderr.startswith("error: cannot read") and "Traceback" not in r.stderr


def _figure(tmp_path, *texts):
    summaries = []
    for i, text in enumerate(texts):
        path = write(tmp_path, f"gpu{i}.tsv", text)
        summaries.append(analysis.summarize(analysis.parse(path)[0], path))
    png = tmp_path / "progress.png"
    fig = analysis.plot(summaries, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return fig, fig.axes[0]


def _by_kind(ax):
    """x (and y) of each kind of marker drawn, by the gid the plot gives each scatter."""
    return {c.get_gid(): c for c in ax.collections}


def test_plot_labels_stay_inside_the_frame(tmp_path):
    # Long descriptions on kept steps at both ends of the x axis and at the bottom of the frame.
    long = "a long description of what changed, " * 4
    text = HEADER + "".join(f"{i:07x}\t{1.0 - 0.01 * i:.6f}\t44.0\tkeep\t{long}{i}\n" for i in range(8))
    fig, ax = _figure(tmp_path, text)
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    assert len(ax.texts) == 7                          # one label per kept step
    for t in ax.texts:
        box = t.get_window_extent(renderer)
        assert frame.x0 - 0.5 <= box.x0 and box.x1 <= frame.x1 + 0.5, (t.get_text(), box, frame)
        assert frame.y0 - 0.5 <= box.y0 and box.y1 <= frame.y1 + 0.5, (t.get_text(), box, frame)


def test_plot_numbers_without_gaps(tmp_path):
    # NIGHT's noise rerun (b2c3d4e, experiment #1) takes no x position: experiments are 0..5.
    fig, ax = _figure(tmp_path, NIGHT)
    assert list(ax.lines[0].get_xdata()) == [0, 1, 2, 3, 4, 5]
    kinds = _by_kind(ax)
    xs = {kind: list(c.get_offsets()[:, 0]) for kind, c in kinds.items()}
    assert xs == {"baseline": [0], "kept": [1, 4, 5], "discarded": [2], "crash": [3], "noise rerun": [1]}
    assert list(kinds["noise rerun"].get_offsets()[:, 1]) == [0.993900]


def test_plot_discards_are_visible(tmp_path):
    wild = "9999999\t3.000000\t44.0\tdiscard\tdiverged\n"
    fig, ax = _figure(tmp_path, NIGHT + wild)
    kinds = _by_kind(ax)
    discarded = kinds["discarded"]
    assert len(discarded.get_offsets()) == 1
    assert discarded.get_alpha() >= 0.5 and min(discarded.get_sizes()) >= 20
    assert discarded.get_edgecolor()[0][3] > 0         # drawn outline, not a faint dot
    # A wild discard is not lost off the top: it sits on the top edge.
    assert list(kinds["discarded, above"].get_offsets()[:, 0]) == [6]
    assert ax.get_ylim()[1] < 3.0


def test_plot_legend_has_every_kind(tmp_path):
    fig, ax = _figure(tmp_path, NIGHT)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["running best", "baseline", "kept", "discarded", "noise rerun", "crash"]
    fig, ax = _figure(tmp_path, NIGHT, HEADER + "1111111\t0.998000\t44.0\tkeep\tbaseline\n")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["gpu0", "gpu1", "baseline", "kept", "discarded", "noise rerun", "crash"]


def test_plot_several_and_empty(night, tmp_path):
    rows, _ = analysis.parse(night)
    summaries = [analysis.summarize(rows, night), analysis.summarize([], "empty.tsv")]
    png = tmp_path / "two.png"
    analysis.plot(summaries, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = analysis.plot([analysis.summarize([], "empty.tsv")], tmp_path / "none.png")
    assert (tmp_path / "none.png").stat().st_size > 0 and fig.axes[0].get_legend() is None


def test_plot_into_a_missing_folder(night, tmp_path):
    png = tmp_path / "plots" / "mar5" / "progress.png"
    r = run_cli(night, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in r.stdout


def test_plot_without_a_suffix_says_the_file_it_wrote(night, tmp_path):
    r = run_cli(night, "--plot", tmp_path / "progress")
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'progress.png'}" in r.stdout and (tmp_path / "progress.png").is_file()


@pytest.mark.parametrize("where, code, message", [
    ("file.txt/progress.png", 1, "error: cannot write the plot"),   # a folder that is a file
    ("progress.xyz", 2, "unknown image type .xyz"),
    ("", 2, "is a folder: name the image"),
])
def test_plot_that_cannot_be_written_is_one_line(night, tmp_path, where, code, message):
    (tmp_path / "file.txt").write_text("not a folder")
    r = run_cli(night, "--plot", tmp_path / where)
    assert r.returncode == code and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_import_is_light():
    # matplotlib is loaded only when plotting.
    code = "import sys; sys.path.insert(0, %r); import analysis; print('matplotlib' in sys.modules)" % str(REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# =============================================================================
# Rows not to trust (issue 22): swapped columns, extra columns, a BOM, line separators
# =============================================================================

def test_a_baseline_with_swapped_columns_is_not_trusted(tmp_path):
    # Before: read as a baseline of 44.0 bpb, and a "97.74 % improvement".
    path = write(tmp_path, "r.tsv", HEADER + "a1b2c3d\t44.0\t0.997900\tkeep\tbaseline\n"
                                              "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline, again\n"
                                              "b2c3d4e\t0.993200\t44.2\tkeep\tincrease matrix LR\n")
    r = run_cli(path)
    assert r.returncode == 0
    assert f"{path}:2: status keep with val_bpb 44.0: val_bpb and memory_gb look swapped" in r.stderr
    assert "baseline:    0.997900" in r.stdout and "(0.47% of the baseline)" in r.stdout


def test_a_wild_discard_is_still_a_discard(tmp_path):
    rows, warnings = analysis.parse(write(tmp_path, "r.tsv", HEADER + "a\t1.0\t44.0\tkeep\tbase\n"
                                                                     "b\t25.0\t44.0\tdiscard\tdiverged\n"))
    assert warnings == [] and [r.status for r in rows] == ["keep", "discard"]


def test_extra_columns_are_reported_not_merged(tmp_path):
    path = write(tmp_path, "r.tsv", HEADER + "a\t1.0\t44.0\tkeep\tbaseline\tseed 42\tmore\n")
    rows, warnings = analysis.parse(path)
    assert rows[0].description == "baseline"      # before: "baseline\tseed 42\tmore"
    assert len(warnings) == 1 and "2 extra tab-separated column(s)" in warnings[0] and "seed 42" in warnings[0]


def test_a_bom_is_not_a_data_row(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + NIGHT.encode())
    rows, warnings = analysis.parse(path)
    assert len(rows) == 7 and len(warnings) == 2    # NIGHT's own two (before: a third, the header)
    assert not any(":1:" in w for w in warnings)


def test_lines_end_at_newline_only(tmp_path):
    # U+2028, U+0085 and a form feed are characters of a description, not line ends.
    path = write(tmp_path, "r.tsv", HEADER + "a\t1.0\t44.0\tkeep\tbase\u2028line\n"
                                              "b\t0.9\t44.0\tkeep\tnext\x85line\x0cand more\r\n"
                                              "c\t0.8\t44.0\tkeep\tthird\n")
    rows, warnings = analysis.parse(path)
    assert warnings == [] and [r.line for r in rows] == [2, 3, 4]
    assert [r.description for r in rows] == ["base\u2028line", "next\x85line\x0cand more", "third"]


# =============================================================================
# A night's board: frontier, gains per worker, adoptions, the chain of kept edits
# =============================================================================

def _commit(repo, message, parent=None):
    if parent:
        subprocess.run(["git", "-C", str(repo), "checkout", "-q", parent], check=True)
    (repo / "train.py").write_text(f"# {message}\n")
    for args in (["add", "train.py"], ["-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", message]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.fixture
def night_board(tmp_path):
    """A repository whose history is a night of three workers, and its board in results/."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    base = _commit(repo, "baseline")
    lr = _commit(repo, "matrix lr", base)            # gpu1, then left behind when it adopts
    swiglu = _commit(repo, "swiglu", base)           # gpu0
    qk = _commit(repo, "qk norm", swiglu)            # gpu1, on gpu0's swiglu
    depth = _commit(repo, "depth 9", swiglu)         # gpu2, on gpu0's swiglu: a discard
    warm = _commit(repo, "warmdown", qk)             # gpu2, on gpu1's qk norm
    rows = [
        (0, "gpu0", base, "1.000000", "keep", "baseline"), (1, "gpu1", base, "1.000100", "keep", "baseline"),
        (1, "gpu2", base, "0.999900", "keep", "baseline"), (2, "gpu1", lr, "-", "running", "matrix lr"),
        (5, "gpu1", lr, "0.997000", "keep", "matrix lr"), (6, "gpu0", swiglu, "0.990000", "keep", "swiglu"),
        (7, "gpu2", swiglu, "0.990000", "adopt", "from gpu0: swiglu"),
        (8, "gpu1", swiglu, "0.990000", "adopt", "from gpu0: swiglu"),
        (12, "gpu1", qk, "0.985000", "keep", "qk norm"), (13, "gpu2", depth, "0.992000", "discard", "depth 9"),
        (14, "gpu0", "eeeeeee", "-", "crash", "width x2 (OOM)"),
        (15, "gpu2", qk, "0.985000", "adopt", "from gpu1: qk norm"),
        (20, "gpu2", warm, "0.981000", "keep", "warmdown"),
    ]
    (repo / "results").mkdir()
    path = repo / "results" / "n1-board.tsv"
    path.write_text("\t".join(board.COLUMNS) + "\n" + "".join(
        f"2026-03-05T01:{m:02d}:00Z\t{w}\t{c}\t{v}\t{s}\t42\tabc123def456\t{d}\n" for m, w, c, v, s, d in rows))
    return path, dict(base=base, lr=lr, swiglu=swiglu, qk=qk, warm=warm)


from autoresearch import board  # noqa: E402


def test_board_summary(night_board):
    path, c = night_board
    entries, warnings = board.read(path)
    b = analysis.summarize_board(entries, path, warnings, repo=path.parent)
    assert warnings == [] and b["rows"] == 13 and b["minutes"] == 20
    assert [(p["worker"], p["commit"], p["delta"]) for p in b["frontier"]] == [
        ("gpu0", c["base"], None), ("gpu1", c["lr"], -0.003), ("gpu0", c["swiglu"], -0.007),
        ("gpu1", c["qk"], -0.005), ("gpu2", c["warm"], -0.004)]
    assert b["improvement"] == pytest.approx(0.019) and b["best"]["commit"] == c["warm"]
    w = b["workers"]
    assert (w["gpu0"]["experiments"], w["gpu0"]["kept"], w["gpu0"]["crashed"], w["gpu0"]["baselines"]) == (2, 1, 1, 1)
    assert (w["gpu0"]["frontier_moves"], w["gpu0"]["frontier_gain"], w["gpu0"]["adopted_from_it"]) == (1, 0.007, 2)
    # gpu1's own gain: its baseline run (1.0001) to matrix lr, then from the adopted 0.99 to qk norm.
    assert (w["gpu1"]["frontier_moves"], w["gpu1"]["own_gain"], w["gpu1"]["adopted"]) == (2, 0.0081, 1)
    assert (w["gpu2"]["adopted"], w["gpu2"]["discarded"], w["gpu2"]["own_gain"]) == (2, 1, 0.004)
    assert [(a["worker"], a["source"], a["previous_best"]) for a in b["adoptions"]] == [
        ("gpu2", "gpu0", 0.9999), ("gpu1", "gpu0", 0.997), ("gpu2", "gpu1", 0.99)]
    # The chain follows git: matrix lr (left behind by gpu1's adoption) is not in it.
    assert [(x["commit"], x["worker"], x["delta"]) for x in b["chain"]] == [
        (c["base"], "gpu0", None), (c["swiglu"], "gpu0", -0.01), (c["qk"], "gpu1", -0.005),
        (c["warm"], "gpu2", -0.004)]
    assert b["chain"][1]["adopted_by"] == ["gpu2", "gpu1"]


def test_board_report_json_and_plot(night_board, tmp_path):
    path, c = night_board
    png = tmp_path / "frontier.png"
    r = run_cli(path, "--plot", png)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("3 workers, 6 experiments after 3 baseline runs (4 kept, 1 discarded, 1 crashed), 3 adoptions, 13 rows over 0:20:00",
                   f"best:        0.981000  gpu2 {c['warm']}  warmdown", "improvement: 0.019000  (1.90% of the baseline)",
                   f"+0:06:00  gpu0   {c['swiglu']}  0.990000  -0.007000  swiglu",
                   f"+0:15:00  gpu2 took gpu1's {c['qk']} (0.985000; its best was 0.990000)",
                   f"  {c['qk']}  gpu1   0.985000  -0.005000  qk norm  (adopted by gpu2)"):
        assert needle in out, (needle, out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(run_cli(path, "--json").stdout, parse_constant=_no_constants)
    assert set(data) == {"board", "rows", "minutes", "baseline", "best", "improvement", "improvement_pct",
                         "frontier", "workers", "adoptions", "chain", "chain_note", "fingerprints", "warnings"}
    assert [x["description"] for x in data["chain"]] == ["baseline", "swiglu", "qk norm", "warmdown"]


def test_board_chain_without_git(night_board, tmp_path):
    path, _ = night_board
    elsewhere = tmp_path / "not-a-repo"
    elsewhere.mkdir()
    r = run_cli(path, "--repo", elsewhere)
    assert r.returncode == 0 and "chain of kept edits: unavailable: git ancestry unavailable" in r.stdout


def test_board_is_read_alone(night_board, night):
    path, _ = night_board
    r = run_cli(path, night)
    assert r.returncode == 1 and "is a board: read it alone" in r.stderr
    r = run_cli(path, "--noise", "0.001")
    assert r.returncode == 2 and "--noise is for results files" in r.stderr


def test_board_mixing_data_fingerprints_is_flagged(tmp_path):
    path = write(tmp_path, "b.tsv", "\t".join(board.COLUMNS) + "\n"
                 "2026-03-05T01:00:00Z\tgpu0\taaaaaaa\t1.0\tkeep\t42\tfp1\tbaseline\n"
                 "2026-03-05T01:05:00Z\tgpu1\tbbbbbbb\t0.9\tkeep\t42\tfp2\tother data\n")
    r = run_cli(path)
    assert r.returncode == 0 and "rows with 2 data fingerprints (fp1, fp2)" in r.stderr


def test_empty_board(tmp_path):
    path = write(tmp_path, "b.tsv", "\t".join(board.COLUMNS) + "\n")
    r = run_cli(path, "--plot", tmp_path / "f.png")
    assert r.returncode == 0 and "no kept result yet (0 rows)" in r.stdout and (tmp_path / "f.png").is_file()


# =============================================================================
# The morning's confirm file: the night's gain over seeds
# =============================================================================

CONFIRM_HEADER = "time\trole\tcommit\tseed\tval_bpb\tmemory_gb\tdata\twhere\tnote\n"
T = "2026-03-06T08:00:00Z"
CONFIRMED = CONFIRM_HEADER + "".join(
    f"{T}\t{role}\t{commit}\t{seed}\t{val}\t44.0\t{data}\tgpu{seed % 3}\t{note}\n"
    for role, commit, seed, val, data, note in (
        ("baseline", "aaaaaaa", 1, "1.000000", "fp", "-"), ("best", "fffffff", 1, "0.985000", "fp", "-"),
        ("baseline", "aaaaaaa", 2, "0.998000", "fp", "-"), ("best", "fffffff", 2, "0.985000", "fp", "-"),
        ("baseline", "aaaaaaa", 3, "1.002000", "fp", "-"), ("best", "fffffff", 3, "0.985000", "fp", "-"),
        ("best", "fffffff", 3, "0.987000", "fp", "-"),     # a rerun at seed 3: the mean counts (0.986)
        ("baseline", "aaaaaaa", 4, "1.000000", "fp", "-"), ("best", "fffffff", 4, "0.990000", "fp2", "-"),  # other data
        ("baseline", "aaaaaaa", 5, "-", "-", "no val_bpb: exit 1"), ("best", "fffffff", 5, "0.985000", "fp", "-"),
    ))


def test_confirm_file_report(tmp_path):
    (tmp_path / "results").mkdir()
    path = write(tmp_path / "results", "mar5-confirm.tsv", CONFIRMED)
    r = run_cli(path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    gains = [0.015, 0.013, 0.016]          # seeds 1, 2, 3; 4 is on other data, 5 has no baseline number
    mean = sum(gains) / 3
    sd = (sum((g - mean) ** 2 for g in gains) / 2) ** 0.5
    for needle in ("baseline aaaaaaa vs best fffffff, paired seed by seed:",
                   "  seed 3     baseline 1.002000  best 0.986000  gain +0.016000",
                   f"gain:         {mean:.6f} +- {sd:.6f}  (mean +- sd over 3 seed(s); range 0.013000 .. 0.016000; "
                   "the best wins at 3 of 3)",
                   f"quote:        {mean:.4f} +- {sd:.4f} val_bpb over 3 seed(s)",
                   "runs without a number: 1 (baseline seed 5: no val_bpb: exit 1)"):
        assert needle in out, (needle, out)
    assert "the loop saw" not in out and "seed 4 " not in out
    # Its night's board, found next to it, gives the one-seed figure the loop saw.
    write(tmp_path / "results", "mar5-board.tsv", "\t".join(board.COLUMNS) + "\n"
          f"{T}\tgpu0\taaaaaaa\t1.000000\tkeep\t42\tfp\tbaseline\n"
          f"{T}\tgpu1\tfffffff\t0.980000\tkeep\t42\tfp\tbest\n")
    out = run_cli(path).stdout
    assert "the loop saw: 0.020000  (one run each at seed 42, " in out and "note:" not in out
    data = json.loads(run_cli(path, "--json").stdout, parse_constant=_no_constants)
    assert set(data) == {"confirm", "baseline_commit", "best_commit", "pairs", "gain", "night", "no_number", "warnings"}
    assert data["gain"] == {"seeds": 3, "mean": pytest.approx(mean, abs=1e-6), "sd": pytest.approx(sd, abs=1e-6),
                            "min": 0.013, "max": 0.016, "wins": 3}
    assert data["night"]["gain"] == 0.02 and data["night"]["same_commits"] is True


def test_confirm_file_with_its_board_and_refusals(tmp_path, night_board, night):
    board_path, c = night_board
    path = write(tmp_path, "confirm.tsv", CONFIRMED.replace("aaaaaaa", c["base"]).replace("fffffff", c["warm"]))
    r = run_cli(board_path, path)
    assert r.returncode == 0, r.stderr
    assert "the night's board ==" in r.stdout and "the loop saw: 0.019000" in r.stdout
    data = json.loads(run_cli(board_path, path, "--json").stdout)
    assert data["best"]["commit"] == c["warm"] and data["confirm"]["gain"]["seeds"] == 3
    for args, code, message in (([path, night], 1, "is a confirm file: read it alone, or with its night's board"),
                                ([path, "--noise", "0.001"], 2, "--noise is for results files"),
                                ([path, "--plot", tmp_path / "x.png"], 2, "a confirm file has no plot")):
        r = run_cli(*args)
        assert r.returncode == code and message in r.stderr, r.stderr


def test_confirm_file_bad_rows_are_skipped(tmp_path):
    path = write(tmp_path, "c.tsv", CONFIRM_HEADER + f"{T}\tbest\tfffffff\tone\t0.98\t44.0\tfp\tgpu0\t-\n"
                                                     f"{T}\tworst\tfffffff\t1\t0.98\t44.0\tfp\tgpu0\t-\n"
                                                     f"{T}\tbest\tfffffff\t1\t0.98\n")
    r = run_cli(path)
    assert r.returncode == 0 and "no seed has both runs yet" in r.stdout
    assert r.stderr.count("skipped") == 3 and "role 'worst' is not baseline or best" in r.stderr
