"""
The night's board (autoresearch/board.py), and a night of stand-in agents sharing one.

    uv run pytest tests/test_board.py -v

Posting and reading run `bash spawn.sh board ...` in throwaway git repositories
(test_spawn.py's Sandbox); the concurrency test runs many writer processes on
one file. The night launches three stand-in agents (tests/stand_in.py) with
spawn.sh on a private tmux server: they follow the board steps with a fake
training run, adopt each other's best, and analysis.py reports the frontier.
test_slurm.py runs the same night with --slurm. CPU only, no network; needs
git and tmux.
"""

import json
import multiprocessing
import subprocess
import sys
import time

import pytest

from autoresearch import board
from helpers import REPO, check_night, git, make_sandbox, start_night


HEADER = "\t".join(board.COLUMNS)
RUN_LOG = """\
data: val=5f0c2a9e tokenizer=1b7d3c4e train_shards=9a8b7c6d | harness train.py=0
step 00953 (100.0%) | loss: 3.2
---
val_bpb:          0.981200
peak_vram_mb:     45060.2
seed:             7
"""


@pytest.fixture
def sb(tmp_path, request):
    box = make_sandbox(tmp_path, request)
    box.board = tmp_path / "board.tsv"
    board.create(box.board)
    box.env.update(AUTORESEARCH_BOARD=str(box.board), AUTORESEARCH_WORKER="gpu0", AUTORESEARCH_TAG="t")
    yield box
    box.close()


def spawn_board(sb, *args, cwd=None, **env):
    e = dict(sb.env)
    e.update(env)
    return subprocess.run(["bash", "spawn.sh", "board", *args], cwd=cwd or sb.repo, env=e,
                          capture_output=True, text=True, timeout=60)


def entry(worker, commit, val, status="keep", description="x", seed=42, data="-", stamp=None):
    return board.Entry(0, stamp or board.now_utc(), worker, commit, val, status, seed, data, description)


# =============================================================================
# Appending: many writers, no row lost or torn
# =============================================================================

def _writer(path, worker, n):
    for i in range(n):
        board.append(path, entry(worker, f"{i:07x}", 1.0 - i * 1e-6, "discard", description=f"row {i} " + "x" * 300))


def test_concurrent_appends_lose_no_row(tmp_path):
    path = tmp_path / "board.tsv"  # not made beforehand: the first writer adds the header, once
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(path, f"w{k}", 50)) for k in range(12)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    text = path.read_text()
    assert text.startswith(HEADER + "\n") and text.count(HEADER) == 1
    entries, warnings = board.read(path)
    assert warnings == [] and len(entries) == 600 == len(text.splitlines()) - 1
    assert {(e.worker, e.description.split()[1]) for e in entries} == \
        {(f"w{k}", str(i)) for k in range(12) for i in range(50)}


def test_concurrent_posts_through_the_command(sb):
    procs = [subprocess.Popen(["bash", "spawn.sh", "board", "post", "discard", f"0.99{i}", f"post {w}-{i}",
                               "--worker", f"gpu{w}"], cwd=sb.repo, env=sb.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for w in range(4) for i in range(6)]
    assert all(p.wait(60) == 0 for p in procs)
    entries, warnings = board.read(sb.board)
    assert warnings == [] and sorted(e.description for e in entries) == \
        sorted(f"post {w}-{i}" for w in range(4) for i in range(6))


# =============================================================================
# Posting
# =============================================================================

def test_post_reads_seed_and_data_from_run_log(sb):
    (sb.repo / "run.log").write_text(RUN_LOG)
    r = spawn_board(sb, "post", "keep", "0.981200", "swiglu\tmlp")
    assert r.returncode == 0, r.stderr
    (e,) = board.read(sb.board)[0]
    assert (e.worker, e.commit, e.val_bpb, e.status, e.seed) == ("gpu0", sb.head[:7], 0.9812, "keep", 7)
    assert len(e.data) == 12 and e.description == "swiglu mlp"   # a tab in the description is no column
    # Another run.log identity gives another fingerprint; none at all gives '-' and seed 42.
    (sb.repo / "run.log").unlink()
    assert spawn_board(sb, "post", "discard", "0.99", "gelu").returncode == 0
    assert spawn_board(sb, "post", "running", "depth 9", AUTORESEARCH_SEED="5").returncode == 0
    assert spawn_board(sb, "post", "crash", "0.000000", "width x2 (OOM)", "--seed", "9").returncode == 0
    rows = board.read(sb.board)[0]
    assert [(e.status, e.val_bpb, e.seed, e.data) for e in rows[1:]] == \
        [("discard", 0.99, 42, "-"), ("running", None, 5, "-"), ("crash", None, 9, "-")]
    assert rows[3].description == "width x2 (OOM)"


def test_post_warns_when_run_log_disagrees(sb):
    (sb.repo / "run.log").write_text(RUN_LOG)
    r = spawn_board(sb, "post", "keep", "0.9712", "typo")
    assert r.returncode == 0 and "run.log says val_bpb 0.981200" in r.stderr


def test_post_refuses_a_result_on_other_data(sb):
    board.append(sb.board, entry("gpu1", "0000000", 0.99, data=""))  # an unknown fingerprint sets no night's data
    (sb.repo / "run.log").write_text(RUN_LOG)
    assert spawn_board(sb, "post", "keep", "0.981200", "baseline").returncode == 0
    assert spawn_board(sb, "post", "discard", "0.981200", "same data").returncode == 0
    (sb.repo / "run.log").write_text(RUN_LOG.replace("val=5f0c2a9e", "val=00000000"))  # the cache changed
    r = spawn_board(sb, "post", "keep", "0.981200", "other data")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "is not the night's" in lines[0], r.stderr
    assert spawn_board(sb, "post", "crash", "other data, OOM").returncode == 0  # no number: nothing to compare
    assert [e.description for e in board.read(sb.board)[0]][1:] == ["baseline", "same data", "other data, OOM"]


@pytest.mark.parametrize("args, env, message", [
    (["keep", "1e-300", "x"], {}, "implausible"),
    (["keep", "0", "x"], {}, "finite val_bpb > 0"),
    (["keep", "44.0", "x"], {}, "implausible"),
    (["keep", "abc", "x"], {}, "is not a number"),
    (["keep", "0.99"], {}, "needs a val_bpb and a description"),
    (["running"], {}, "needs a description"),
    (["adopt"], {}, "is no kept commit on the board"),
    (["keep", "0.99", "x"], {"AUTORESEARCH_WORKER": ""}, "set AUTORESEARCH_WORKER"),
    (["keep", "0.99", "x"], {"AUTORESEARCH_BOARD": "/nonexistent/board.tsv"}, "no board at"),
])
def test_post_refuses_what_cannot_be_right(sb, args, env, message):
    r = spawn_board(sb, "post", *args, **env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.stderr
    assert board.read(sb.board)[0] == []


# =============================================================================
# Reading
# =============================================================================

def test_read_skips_bad_rows_and_names_the_rule(tmp_path):
    path = tmp_path / "board.tsv"
    t = "2026-03-05T01:00:00Z"
    path.write_text("\ufeff" + HEADER + "\n"
                    f"{t}\tgpu0\taaaaaaa\t0.990000\tkeep\t42\t-\tbase\u2028line\n"   # U+2028 splits nothing
                    f"{t}\tgpu0\tbbbbbbb\t1e-300\tkeep\t42\t-\ttiny\n"
                    f"{t}\tgpu0\tccccccc\tnan\tdiscard\t42\t-\tnan\n"
                    f"{t}\tgpu0\tddddddd\t0.980000\tkeep\t42\t-\tok\textra\tmore\n"
                    f"{t}\tgpu0\teeeeeee\t0.98\tmaybe\t42\t-\tstatus\n"
                    f"not a time\tgpu0\tfffffff\t0.98\tkeep\t42\t-\ttime\n"
                    "short\trow\n")
    entries, warnings = board.read(path)
    assert [e.commit for e in entries] == ["aaaaaaa", "ddddddd"]
    assert entries[0].description == "base\u2028line" and entries[1].description == "ok"
    assert [w.split(":")[1] for w in warnings] == ["3", "4", "5", "6", "7", "8"]
    assert "implausible" in warnings[0] and "finite val_bpb > 0" in warnings[1]
    assert "2 extra column(s)" in warnings[2] and "unknown status" in warnings[3]


def test_show_for_a_worker(sb):
    t0 = time.time()
    stamp = lambda minutes: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 - 60 * minutes))  # noqa: E731
    for e in (entry("gpu0", "aaaaaaa", 0.997, stamp=stamp(50), description="baseline"),
              entry("gpu1", "aaaaaaa", 0.9972, stamp=stamp(49), description="baseline"),
              entry("gpu1", "bbbbbbb", 0.990, stamp=stamp(30), description="swiglu"),
              entry("gpu1", "ccccccc", 0.999, "discard", stamp=stamp(20), description="gelu"),
              entry("gpu2", "ddddddd", None, "running", stamp=stamp(3), description="depth 9"),
              entry("gpu0", "eeeeeee", None, "running", stamp=stamp(2), description="my own idea")):
        board.append(sb.board, e)
    r = spawn_board(sb)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "best:     0.990000  gpu1   bbbbbbb  swiglu" in out
    assert "yours:    0.997000  gpu0   aaaaaaa  baseline" in out
    assert "adopt:    gpu1's bbbbbbb beats yours by 0.007000" in out
    assert "git reset --hard bbbbbbb && bash spawn.sh board post adopt" in out
    assert "gpu2   ddddddd      3m  depth 9" in out and "my own idea" not in out  # the others' runs
    assert "gpu1   0.999000  gelu" in out
    assert len(out.splitlines()) <= 12
    data = json.loads(spawn_board(sb, "--json").stdout)    # the same, for scripts
    assert data["adopt"]["commit"] == "bbbbbbb" and data["mine"]["val_bpb"] == 0.997
    # Within the threshold: no adopt line. A person (no worker): each worker's best.
    board.append(sb.board, entry("gpu0", "fffffff", 0.9915, description="lr"))
    assert "adopt:" not in spawn_board(sb).stdout
    r = spawn_board(sb, "show", "--worker", "")
    assert "gpu0   best 0.991500" in r.stdout and "gpu2   no result yet" in r.stdout


def test_show_for_a_tag_from_the_root(sb):
    (sb.repo / "results").mkdir()
    path = board.board_file(sb.repo, "mar5")
    board.append(path, entry("gpu3", "aaaaaaa", 0.99, description="baseline"))
    r = spawn_board(sb, "show", "mar5", AUTORESEARCH_BOARD="", AUTORESEARCH_WORKER="", AUTORESEARCH_TAG="")
    assert r.returncode == 0 and "board mar5: 1 rows from 1 workers" in r.stdout
    assert spawn_board(sb, "show", "nope", AUTORESEARCH_BOARD="").returncode == 1


def test_adopt_moves_the_branch(sb):
    """gpu1 takes gpu0's better commit: git reset --hard in its worktree, then an adopt row."""
    wts = {}
    for w in ("gpu0", "gpu1"):
        wts[w] = sb.repo / "worktrees" / w
        git(sb.repo, "worktree", "add", "-q", "-b", f"autoresearch/t-{w}", str(wts[w]))
        assert spawn_board(sb, "post", "keep", "0.997", "baseline", cwd=wts[w], AUTORESEARCH_WORKER=w).returncode == 0
    (wts["gpu0"] / "train.py").write_text("# swiglu\n")
    git(wts["gpu0"], "add", "train.py")
    git(wts["gpu0"], "commit", "-qm", "swiglu")
    better = git(wts["gpu0"], "rev-parse", "--short=7", "HEAD")
    assert spawn_board(sb, "post", "keep", "0.985", "swiglu", cwd=wts["gpu0"]).returncode == 0

    shown = spawn_board(sb, cwd=wts["gpu1"], AUTORESEARCH_WORKER="gpu1").stdout
    assert f"git reset --hard {better} && bash spawn.sh board post adopt" in shown
    git(wts["gpu1"], "reset", "-q", "--hard", better)  # the shared object store has gpu0's commit
    r = spawn_board(sb, "post", "adopt", cwd=wts["gpu1"], AUTORESEARCH_WORKER="gpu1")
    assert r.returncode == 0, r.stderr
    assert git(sb.repo, "rev-parse", "autoresearch/t-gpu1") == git(sb.repo, "rev-parse", "autoresearch/t-gpu0")
    last = board.read(sb.board)[0][-1]
    assert (last.worker, last.status, last.commit, last.val_bpb) == ("gpu1", "adopt", better, 0.985)
    assert last.description == "from gpu0: swiglu"
    shown = spawn_board(sb, cwd=wts["gpu1"], AUTORESEARCH_WORKER="gpu1").stdout
    assert "adopt:" not in shown and "yours:    0.985000  gpu1" in shown
    # Adopting one's own commit is refused.
    r = spawn_board(sb, "post", "adopt", cwd=wts["gpu0"])
    assert r.returncode == 1 and "your own kept commit" in r.stderr


def test_run_identity_variants(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("---\nval_bpb: 0.95\nseed: 43\ndata_fingerprint: abcdef012345\n")
    assert board.run_identity(log) == {"val_bpb": 0.95, "seed": 43, "data": "abcdef012345"}
    # train.py's own: identity lines (data: val=..., seed: ... init=... data=...), then the summary's seed:,
    # init: and data: (12 hex digits). The summary's data wins; without it, the identity line gives the same.
    identity = ("data:        val=5f0c2a9e tokenizer=1b7d3c4e train_shards=9a8b7c6d harness=0a1b2c3d4e5f (14 files)\n"
                "seed:        43 init=0123456789ab data=bc4697856eaf (equal seed and data: paired runs)\n")
    log.write_text(identity + "---\nval_bpb:          0.950000\nseed:             43\n"
                              "init:             0123456789ab\ndata:             bc4697856eaf\n")
    assert board.run_identity(log) == {"val_bpb": 0.95, "seed": 43, "data": "bc4697856eaf"}
    log.write_text(identity + "---\nval_bpb:          0.950000\n")
    assert board.run_identity(log) == {"val_bpb": 0.95, "seed": None, "data": "bc4697856eaf"}
    log.write_text("step 1\rstep 2\r\n---\nval_bpb: 0.95\n")
    assert board.run_identity(log) == {"val_bpb": 0.95, "seed": None, "data": None}
    assert board.run_identity(tmp_path / "missing.log") == {"val_bpb": None, "seed": None, "data": None}


def test_identity_line_fingerprint_is_train_pys():
    """A log with only the identity line (an older train.py) gets the fingerprint train.py prints: the
    same runs pair up on the board whichever train.py wrote their logs."""
    from autoresearch import seeding  # train.py's: imports torch
    fingerprints = {"val": "5f0c2a9e", "tokenizer": "1b7d3c4e", "train_shards": "9a8b7c6d", "harness": {"a.py": "1"}}
    assert board.data_fingerprint("val=5f0c2a9e tokenizer=1b7d3c4e train_shards=9a8b7c6d harness=x (1 files)") \
        == seeding.data_fingerprint(fingerprints) == "bc4697856eaf"


def test_post_confirm_takes_the_seed_from_run_log(sb):
    (sb.repo / "run.log").write_text(RUN_LOG.replace("seed:             7", "seed:             43"))
    r = spawn_board(sb, "post", "confirm", "0.981200", "swiglu at seed 43")
    assert r.returncode == 0, r.stderr
    (e,) = board.read(sb.board)[0]
    assert (e.status, e.seed, e.val_bpb) == ("confirm", 43, 0.9812)
    assert "adopt:" not in spawn_board(sb).stdout   # a confirm row is no keep: nothing to adopt


# =============================================================================
# A night of three stand-in agents (tests/stand_in.py) that share the board
# =============================================================================

@pytest.mark.slow
def test_a_night_of_stand_ins(tmp_path, request):
    sb = make_sandbox(tmp_path, request)
    try:
        start_night(sb, "n1")
        night = check_night(sb, "n1")
        # Each worker's pane has its name and the board in its environment; the board outlives stop.
        r = sb.spawn("stop", "n1")
        assert r.returncode == 0, r.stderr
        assert "board: results/n1-board.tsv" in r.stdout
        assert (sb.repo / "results" / "n1-board.tsv").is_file()
        assert "baseline" in (sb.repo / "results" / "n1-gpu2.tsv").read_text()
        assert (sb.repo / "results" / "n1-gpu2" / "run.log").is_file()
        text = subprocess.run([sys.executable, str(REPO / "analysis.py"), "results/n1-board.tsv", "--plot",
                               "frontier.png"], cwd=sb.repo, capture_output=True, text=True, timeout=120)
        assert text.returncode == 0, text.stderr
        assert "chain of kept edits that led to it" in text.stdout and (sb.repo / "frontier.png").is_file()
        # The morning: the night's baseline and best at two new seeds, then the gain to quote.
        r = sb.spawn("confirm", "n1", "2", CONFIRM_RUN_CMD="python3 fake_train.py")
        assert r.returncode == 0, r.stdout + r.stderr
        text = subprocess.run([sys.executable, str(REPO / "analysis.py"), "results/n1-confirm.tsv", "--json"],
                              cwd=sb.repo, capture_output=True, text=True, timeout=120)
        morning = json.loads(text.stdout)
        assert morning["best_commit"] == night["best"]["commit"] and morning["gain"]["seeds"] == 2
        assert morning["gain"]["mean"] == pytest.approx(night["improvement"], abs=0.0005)
    finally:
        sb.close()
