"""
`bash spawn.sh confirm` (autoresearch/confirm.py): the night's baseline and best
commits at K seeds, on stand-in GPUs, and analysis.py's report of the gain.

    uv run pytest tests/test_confirm.py -v

Each test makes a finished night in a throwaway repository (tests/helpers.py's
Sandbox and finished_night: the stand-in train.py, a commit per kept idea, the
board) and runs confirm there with CONFIRM_RUN_CMD set to the stand-in
training run (tests/stand_in.py's FAKE_TRAIN: its val_bpb depends on the
commit's train.py and on AUTORESEARCH_SEED; it prints the GPU it saw and when
it ran). A stand-in nvidia-smi lists three GPUs. The Slurm variant is in
test_slurm.py. CPU only, no network; needs git.
"""

import json
import signal
import subprocess
import sys

import pytest

from helpers import REPO, alive, finished_night, git, make_sandbox, path_without, wait_for

FAKE_RUN = "python3 fake_train.py"


@pytest.fixture
def sb(tmp_path, request):
    box = make_sandbox(tmp_path, request)
    box.fake_nvidia_smi(3)
    box.env.update(CONFIRM_RUN_CMD=FAKE_RUN, STAND_IN_RUN_SECONDS="0.6")
    yield box
    box.close()


def rows(sb, tag):
    """The confirm file's rows as dicts."""
    lines = (sb.repo / "results" / f"{tag}-confirm.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def log_of(sb, tag, commit, seed):
    return (sb.repo / "results" / f"{tag}-confirm" / f"{commit[:7]}-seed{seed}.log").read_text()


def analysis(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "analysis.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def nothing_made(sb, tag):
    assert not (sb.repo / "results" / f"{tag}-confirm").exists()
    assert not (sb.repo / "results" / f"{tag}-confirm.tsv").exists()
    assert not (sb.repo / "worktrees" / f"confirm-{tag}").exists()
    assert "confirm-" not in git(sb.repo, "worktree", "list")


# =============================================================================
# A confirmation on three GPUs
# =============================================================================

@pytest.mark.slow
def test_each_seed_runs_on_a_gpu_of_its_own_in_parallel(sb):
    commits = finished_night(sb, "n1")
    r = sb.spawn("confirm", "n1")
    assert r.returncode == 0, r.stdout + r.stderr
    got = rows(sb, "n1")
    # The baseline and the best at seeds 1, 2, 3: six runs, each a row with its seed, GPU and data.
    assert sorted((x["role"], x["commit"], int(x["seed"])) for x in got) == sorted(
        (role, commits[role][:7], s) for role in ("baseline", "best") for s in (1, 2, 3))
    assert {x["where"] for x in got} <= {"gpu0", "gpu1", "gpu2"} and all(x["note"] == "-" for x in got)
    assert all(x["data"] == "bc4697856eaf" and x["memory_gb"] == "44.0" for x in got)
    spans = {}
    for x in got:
        log = log_of(sb, "n1", x["commit"], x["seed"])
        # Each run got its seed and its GPU, and ran the commit's own train.py.
        assert f"\nseed:             {x['seed']}\n" in log and f"\ngpu: {x['where'][3:]}\n" in log
        assert f"val_bpb:          {x['val_bpb']}" in log
        start, end = map(float, log.split("\nran: ")[1].split()[:2])
        spans.setdefault(x["where"], []).append((start, end))
    # One run per GPU at a time, and the three GPUs at work at once.
    for gpu, runs in spans.items():
        runs.sort()
        assert all(a[1] <= b[0] for a, b in zip(runs, runs[1:])), (gpu, runs)
    firsts = [min(runs)[0] for runs in spans.values()]
    lasts = [min(runs)[1] for runs in spans.values()]
    assert len(spans) == 3 and max(firsts) < min(lasts), spans
    # The best wins at every seed by about the night's gain (0.015: the wobble is 0.0002 at most).
    best = {int(x["seed"]): float(x["val_bpb"]) for x in got if x["role"] == "best"}
    base = {int(x["seed"]): float(x["val_bpb"]) for x in got if x["role"] == "baseline"}
    assert all(abs(base[s] - best[s] - 0.015) <= 0.0004 for s in (1, 2, 3))
    # Nothing left behind: the worktrees are gone, the logs and rows stay.
    assert not (sb.repo / "worktrees" / "confirm-n1").exists()
    assert git(sb.repo, "worktree", "list").count("\n") == 0
    assert "the night's gain: 0.01" in r.stdout and "uv run analysis.py results/n1-confirm.tsv" in r.stdout

    # analysis.py: the gain as mean +- sd over the seeds, next to the loop's one-seed figure (from the board
    # next to the file).
    out = analysis("results/n1-confirm.tsv", cwd=sb.repo)
    assert out.returncode == 0, out.stderr
    gains = [base[s] - best[s] for s in (1, 2, 3)]
    mean = sum(gains) / 3
    sd = (sum((g - mean) ** 2 for g in gains) / 2) ** 0.5
    assert f"gain:         {mean:.6f} +- {sd:.6f}  (mean +- sd over 3 seed(s)" in out.stdout, out.stdout
    assert "the best wins at 3 of 3" in out.stdout
    assert "the loop saw: 0.015000  (one run each at seed 42, " in out.stdout
    assert f"quote:        {mean:.4f} +- {sd:.4f} val_bpb over 3 seed(s)" in out.stdout
    data = json.loads(analysis("results/n1-board.tsv", "results/n1-confirm.tsv", "--json", cwd=sb.repo).stdout)
    c = data["confirm"]
    assert data["best"]["commit"] == commits["best"][:7] and c["best_commit"] == commits["best"][:7]
    assert c["gain"]["seeds"] == 3 and c["gain"]["mean"] == pytest.approx(mean, abs=2e-6)
    assert [p["seed"] for p in c["pairs"]] == [1, 2, 3] and c["night"]["gain"] == 0.015

    # Again with K=4: only seed 4 runs; the six done are not repeated.
    r = sb.spawn("confirm", "n1", "4")
    assert r.returncode == 0, r.stderr
    assert "2 run(s) on GPU(s) 0 1 2" in r.stdout
    assert sorted(int(x["seed"]) for x in rows(sb, "n1")) == [1, 1, 2, 2, 3, 3, 4, 4]


def test_gpus_of_a_running_night_are_not_used(sb):
    finished_night(sb, "n1")
    (sb.repo / "worktrees").mkdir()
    # Another night holds GPUs 0 and 2 (its launch record); confirm takes GPU 1 alone.
    record = {"tag": "other", "root": str(sb.repo), "head": "x", "launch_id": "x", "slurm": False, "tmux_socket": "",
              "board": "b", "watch": {}, "workers": [{"index": i, "agent": "a", "branch": "b", "worktree": "w"}
                                                      for i in (0, 2)]}
    (sb.repo / "worktrees" / ".launch-other.json").write_text(json.dumps(record))
    r = sb.spawn("confirm", "n1", "1")
    assert r.returncode == 0, r.stderr
    assert {x["where"] for x in rows(sb, "n1")} == {"gpu1"}
    (sb.repo / "worktrees" / ".launch-other.json").write_text(json.dumps(
        dict(record, workers=[dict(record["workers"][0], index=i) for i in range(3)])))
    r = sb.spawn("confirm", "n1", "2")
    assert r.returncode == 1 and "all 3 GPU(s) are held by running nights" in r.stderr


# =============================================================================
# Runs that give no number, and Ctrl-C
# =============================================================================

@pytest.mark.slow
def test_a_run_without_a_number_is_a_row_with_a_note(sb):
    commits = finished_night(sb, "n2")
    # Seed 2 fails; and a train.py that ignores AUTORESEARCH_SEED is caught by its summary's seed.
    cmd = 'if [ "$AUTORESEARCH_SEED" = 2 ]; then echo boom; exit 3; fi; ' + FAKE_RUN
    r = sb.spawn("confirm", "n2", "3", CONFIRM_RUN_CMD=cmd)
    assert r.returncode == 1 and "2 run(s) gave no number" in r.stderr, r.stderr
    notes = {(x["role"], int(x["seed"])): (x["val_bpb"], x["note"]) for x in rows(sb, "n2")}
    assert notes[("best", 2)] == ("-", "no val_bpb: exit 3") and notes[("baseline", 1)][1] == "-"
    assert "boom" in log_of(sb, "n2", commits["best"], 2)
    out = analysis("results/n2-confirm.tsv", cwd=sb.repo).stdout
    assert "over 2 seed(s)" in out and "runs without a number: 2 (" in out
    assert not (sb.repo / "worktrees" / "confirm-n2").exists()

    r = sb.spawn("confirm", "n2", "4", CONFIRM_RUN_CMD=f"AUTORESEARCH_SEED=42 {FAKE_RUN}")
    assert r.returncode == 1
    seed4 = [x for x in rows(sb, "n2") if x["seed"] == "4"]
    assert len(seed4) == 2 and all(x["val_bpb"] == "-" and "ignores AUTORESEARCH_SEED" in x["note"] for x in seed4)


def test_ctrl_c_ends_the_runs_and_removes_the_worktrees(sb):
    finished_night(sb, "n3")
    pids = sb.out / "pids"
    pids.mkdir()
    cmd = f'echo $$ > {pids}/$AUTORESEARCH_SEED-$CUDA_VISIBLE_DEVICES; exec {FAKE_RUN}'
    env = dict(sb.env, CONFIRM_RUN_CMD=cmd, STAND_IN_RUN_SECONDS="120")
    proc = subprocess.Popen(["bash", "spawn.sh", "confirm", "n3"], cwd=sb.repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(list(pids.iterdir())) == 3, 30, "three runs never started")
    assert len(list((sb.repo / "worktrees" / "confirm-n3").iterdir())) == 3
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted" in err
    for f in pids.iterdir():
        pid = int(f.read_text())
        wait_for(lambda: not alive(pid), 10, f"run {f.name} outlived Ctrl-C")
    assert not (sb.repo / "worktrees" / "confirm-n3").exists()
    assert git(sb.repo, "worktree", "list").count("\n") == 0
    confirm_tsv = sb.repo / "results" / "n3-confirm.tsv"
    assert not confirm_tsv.exists() or confirm_tsv.read_text().count("\n") <= 1   # no row for a stopped run


# =============================================================================
# Refused in one line, before anything is made
# =============================================================================

@pytest.mark.parametrize("setup, args, env, message", [
    ("night", ["nope"], {}, "unknown tag 'nope': no board results/nope-board.tsv and no branch"),
    ("no board", ["n4"], {}, "no board for n4 (results/n4-board.tsv is missing)"),
    ("night", ["n4", "0"], {}, "K='0': the number of seeds must be a whole number from 1"),
    ("night", ["n4", "three"], {}, "K='three'"),
    ("night", ["n4", "--fast"], {}, "unknown option '--fast'"),
    ("night", [], {}, "confirm needs a tag"),
    ("night", ["bad/tag"], {}, "invalid tag"),
    ("no gpu", ["n4"], {}, "no GPU: nvidia-smi not found; confirm runs on this machine's NVIDIA GPUs (on a Slurm "
                           "login node: confirm --slurm)"),
    ("running", ["n4"], {}, "the night n4 still runs (its best may change): bash spawn.sh stop n4 first"),
    ("no gain", ["n4"], {}, "kept nothing better than its baseline"),
    ("night", ["n4", "--slurm"], {"PATH": "no srun"}, "srun not found"),
    ("night", ["n4", "--slurm"], {"SLURM_RUN_ARGS": "--account='my lab'"}, "SLURM_RUN_ARGS must not contain quotes"),
])
def test_bad_input_is_refused_before_anything_is_made(sb, tmp_path, setup, args, env, message):
    ideas = (("depth_9", -0.002),) if setup == "no gain" else (("swiglu", 0.01),)
    finished_night(sb, "n4", ideas)
    if setup == "no board":
        (sb.repo / "results" / "n4-board.tsv").unlink()
    elif setup == "no gpu":
        sb.fake_nvidia_smi(None)
    elif setup == "running":
        (sb.repo / "worktrees").mkdir()
        (sb.repo / "worktrees" / ".launch-n4.json").write_text("{}")
    if env.get("PATH") == "no srun":
        env = {"PATH": path_without(tmp_path, "srun")}
    elif "SLURM_RUN_ARGS" in env:
        (sb.bin / "srun").write_text("#!/bin/sh\nexit 0\n")   # found: the arguments are what is wrong
        (sb.bin / "srun").chmod(0o755)
    r = sb.spawn("confirm", *args, **env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.stderr
    nothing_made(sb, "n4")
    nothing_made(sb, "nope")


def test_help_names_confirm():
    r = subprocess.run(["bash", str(REPO / "spawn.sh"), "help"], capture_output=True, text=True, timeout=30)
    assert "bash spawn.sh confirm <tag> [K] [--slurm]" in r.stdout and "CONFIRM_RUN_CMD" in r.stdout


def test_import_is_light():
    """The module imports nothing heavy (analysis.py imports it too): the stdlib, board and launch."""
    code = ("import sys; sys.path.insert(0, %r); from autoresearch import confirm; "
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))") % str(REPO)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
