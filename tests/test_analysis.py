"""
analysis.py on small results files written by the tests.

    uv run pytest tests/test_analysis.py -v

The functions (parse, summarize, report, plot) are imported directly; the
command line (exit codes, stderr warnings, --json, --plot) runs in a
subprocess. CPU only, no network, about a second.
"""

import json
import subprocess
import sys
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


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "analysis.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def night(tmp_path):
    return write(tmp_path, "results.tsv", NIGHT)


# =============================================================================
# parse and summarize
# =============================================================================

def test_parse_skips_and_warns(night):
    rows, warnings = analysis.parse(night)
    assert [r.status for r in rows] == ["keep", "keep", "discard", "crash", "noise", "keep", "keep"]
    assert [r.n for r in rows] == list(range(1, 8))
    assert rows[-1].description == "bigger batch, less depth" and rows[-1].val_bpb == BEST
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{night}:7:")       # the malformed line
    assert warnings[1].startswith(f"{night}:10:") and "not tab-separated" in warnings[1]


@pytest.mark.parametrize("line, why", [
    ("abc\tnot-a-number\t44.0\tkeep\tx", "not a number"),
    ("abc\t0.99\t44.0\tmaybe\tx", "unknown status"),
    ("abc\t0.000000\t0.0\tkeep\tx", "a crash?"),
    ("abc\t0.99", "expected 5"),
])
def test_parse_rejects_malformed_rows(tmp_path, line, why):
    rows, warnings = analysis.parse(write(tmp_path, "r.tsv", HEADER + line + "\n"))
    assert rows == [] and len(warnings) == 1 and why in warnings[0]


def test_summary_numbers(night):
    rows, _ = analysis.parse(night)
    s = analysis.summarize(rows, night)
    assert (s["experiments"], s["kept"], s["discarded"], s["crashed"], s["noise_runs"]) == (6, 4, 1, 1, 1)
    assert s["keep_rate"] == pytest.approx(3 / 5)      # changes after the baseline: 3 kept of 5
    assert s["baseline"]["val_bpb"] == BASELINE and s["baseline"]["commit"] == "a1b2c3d"
    assert s["best"]["val_bpb"] == BEST and s["best"]["commit"] == "f6a7b8c"
    assert s["improvement"] == pytest.approx(BASELINE - BEST)
    assert s["improvement_pct"] == pytest.approx(100 * (BASELINE - BEST) / BASELINE, abs=1e-4)
    assert s["noise"] == pytest.approx(NOISE) and s["noise_source"] == "reruns"
    assert [st["delta"] for st in s["steps"]] == pytest.approx(STEP_DELTAS)
    assert [st["within_noise"] for st in s["steps"]] == [False, True, False]
    assert [st["commit"] for st in s["top"]] == ["f6a7b8c", "b2c3d4e", "e5f6a7b"]


def test_explicit_noise_overrides_reruns(night):
    rows, _ = analysis.parse(night)
    s = analysis.summarize(rows, night, noise=0.005)
    assert s["noise"] == 0.005 and s["noise_source"] == "--noise"
    # 0.0047 and 0.0002 are under 0.005; 0.008 is not.
    assert [st["within_noise"] for st in s["steps"]] == [True, True, False]


def test_no_noise_flags_nothing(tmp_path):
    rows, _ = analysis.parse(write(tmp_path, "r.tsv", HEADER + "a\t1.0\t1.0\tkeep\tbase\nb\t0.9\t1.0\tkeep\tx\n"))
    s = analysis.summarize(rows)
    assert s["noise"] is None and s["steps"][0]["within_noise"] is False


@pytest.mark.parametrize("text", ["", HEADER, HEADER + "\n\n", HEADER + "abc\t0.000000\t0.0\tcrash\toom\n"])
def test_empty_or_all_crashed(tmp_path, text):
    path = write(tmp_path, "r.tsv", text)
    rows, warnings = analysis.parse(path)
    s = analysis.summarize(rows, path)
    assert warnings == []
    assert s["baseline"] is None and s["best"] is None and s["improvement"] is None and s["steps"] == []
    assert s["crashed"] == len(rows)
    text_report = analysis.report([s])
    assert "no experiments yet" in text_report or "all crashed" in text_report


# =============================================================================
# Text report
# =============================================================================

def test_text_report(night):
    r = run_cli(night)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("experiments: 6", "kept: 4", "discarded: 1", "crashed: 1", "keep rate: 60%",
                   f"baseline:    {BASELINE:.6f}", f"best:        {BEST:.6f}",
                   f"improvement: {BASELINE - BEST:.6f}", f"({100 * (BASELINE - BEST) / BASELINE:.2f}% of the baseline)",
                   f"noise:       {NOISE:.6f}",
                   f"{STEP_DELTAS[0]:+.6f}  increase matrix LR to 0.05",
                   f"{STEP_DELTAS[1]:+.6f}  warmdown 0.6  within noise",
                   f"1. {-STEP_DELTAS[2]:.6f}  f6a7b8c"):
        assert needle in out, (needle, out)
    # Malformed input is warned with file:line and skipped.
    assert f"warning: {night}:7:" in r.stderr
    assert f"warning: {night}:10:" in r.stderr


def test_missing_file_exits_1(tmp_path):
    r = run_cli(tmp_path / "nope.tsv")
    assert r.returncode == 1
    assert "results file not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("value", ["-0.001", "nan"])
def test_negative_noise_is_refused(night, value):
    r = run_cli(night, f"--noise={value}")
    assert r.returncode == 2 and "--noise must be a spread >= 0" in r.stderr


def test_default_is_results_tsv(night):
    r = run_cli(cwd=night.parent)
    assert r.returncode == 0 and "experiments: 6" in r.stdout


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
# JSON and plot
# =============================================================================

def test_json_fields(night, tmp_path):
    other = write(tmp_path, "gpu1.tsv", HEADER + "1111111\t0.998000\t44.0\tkeep\tbaseline\n")
    r = run_cli(night, other, "--json", "--noise", "0.001")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"files", "best_file"} and data["best_file"] == str(night)
    s = data["files"][0]
    assert set(s) == {"path", "experiments", "kept", "discarded", "crashed", "noise_runs", "keep_rate",
                      "baseline", "best", "improvement", "improvement_pct", "noise", "noise_source",
                      "steps", "top", "warnings"}
    assert s["best"] == {"n": 7, "commit": "f6a7b8c", "val_bpb": BEST, "memory_gb": 43.0,
                         "status": "keep", "description": "bigger batch, less depth"}
    assert s["noise"] == 0.001 and s["noise_source"] == "--noise"
    assert set(s["steps"][0]) >= {"prev_best", "delta", "within_noise"}
    assert [st["within_noise"] for st in s["steps"]] == [False, True, False]
    assert len(s["warnings"]) == 2
    assert data["files"][1]["steps"] == [] and data["files"][1]["improvement"] == 0


def test_plot_writes_png(night, tmp_path):
    png = tmp_path / "progress.png"
    r = run_cli(night, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_several_and_empty(night, tmp_path):
    rows, _ = analysis.parse(night)
    summaries = [analysis.summarize(rows, night), analysis.summarize([], "empty.tsv")]
    png = tmp_path / "two.png"
    analysis.plot(summaries, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    analysis.plot([analysis.summarize([], "empty.tsv")], tmp_path / "none.png")
    assert (tmp_path / "none.png").stat().st_size > 0


def test_import_is_light():
    # matplotlib is loaded only when plotting.
    code = "import sys; sys.path.insert(0, %r); import analysis; print('matplotlib' in sys.modules)" % str(REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
