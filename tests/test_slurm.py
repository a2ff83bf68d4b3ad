"""
spawn.sh --slurm against a real one-node Slurm cluster started on this machine.

    uv run pytest tests/test_slurm.py -v

The module starts munged, slurmctld and slurmd once (tests/slurm_cluster.py:
127.0.0.1 only, state, spool and logs in a temporary folder, stopped by their
pid files) and drives spawn.sh in a throwaway repo as test_spawn.py does, with
stand-in agents that run what program.md runs: `$AUTORESEARCH_RUN <command>`.
The node has no GPUs, so SLURM_RUN_ARGS leaves out --gres. test_board.py's
night of three stand-ins runs here too, each fake run a job, to show the board
reads the same under Slurm. Needs Debian's
slurmctld, slurmd, slurm-client and munge (.ci/run installs them): without
them these tests fail, they do not skip.
"""

import subprocess
from pathlib import Path

import pytest

from helpers import REPO, check_night, finished_night, git, make_sandbox, path_without, start_night, wait_for
from slurm_cluster import INSTALL, SlurmCluster, missing_tools

pytestmark = pytest.mark.slurm  # a one-node Slurm cluster: deselect with -m "not slurm"

# What a worker's runs ask of the test node: no GPU, a short time limit.
RUN_ARGS = "--time=00:10:00"

STAND_IN = r"""#!/usr/bin/env bash
# Stand-in agent under --slurm: $1 = folder for its reports, $2 = what to run.
out=$1 mode=$2
w=${PWD##*/}
printf '%s\n' "${AUTORESEARCH_RUN-unset}" > "$out/$w.run"
printf '%s\n' "${CUDA_VISIBLE_DEVICES-unset}" > "$out/$w.cuda"
case "$mode" in
    job)
        # srun's own notes ("job 3 queued and waiting for resources") go to stderr, kept apart
        $AUTORESEARCH_RUN bash -c 'printf "%s\n" "${SLURM_JOB_ID-}" "${SLURM_JOB_NAME-}" "$PWD"' > "$out/$w.tmp" \
            2> "$out/$w.stderr"
        mv "$out/$w.tmp" "$out/$w.job"
        ;;
    smoke)
        # program.md's run command, then its log row.
        export AUTORESEARCH_SMOKE=1
        $AUTORESEARCH_RUN uv run train.py > run.log 2>&1
        rc=$?
        val=$(grep '^val_bpb:' run.log | awk '{print $2}')
        mem=$(grep '^peak_vram_mb:' run.log | awk '{printf "%.1f", $2 / 1024}')
        seed=$(grep '^seed:' run.log | tail -n 1 | awk '{print $2}')   # the summary's, after the identity line
        printf 'commit\tval_bpb\tmemory_gb\tstatus\tseed\tdescription\n' > results.tsv
        printf '%s\t%s\t%s\tkeep\t%s\tbaseline\n' "$(git rev-parse --short HEAD)" "$val" "$mem" "$seed" >> results.tsv
        printf '%s\n' "$rc" > "$out/$w.done"
        ;;
    sleep)
        $AUTORESEARCH_RUN sleep 600
        ;;
    escape)
        # An srun that left the night: its own session, none of the night's environment.
        env -i PATH="$PATH" SLURM_CONF="$SLURM_CONF" setsid $AUTORESEARCH_RUN sleep 600 < /dev/null > /dev/null 2>&1 &
        ;;
esac
read -r -p '> ' reply
sleep 600
"""


# =============================================================================
# Fixtures
# =============================================================================

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.fail(f"the Slurm tests need {', '.join(missing)}: {INSTALL}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def slurm_sandbox(tmp_path, request, cluster, mode, **kwargs):
    box = make_sandbox(tmp_path, request, agent_script=STAND_IN, **kwargs)
    box.env = cluster.env(box.env)
    box.env.update(AUTORESEARCH_AGENT_CMD=f"bash {tmp_path / 'agent.sh'} {box.out} {mode}", SLURM_RUN_ARGS=RUN_ARGS)
    return box


@pytest.fixture
def slurm_box(tmp_path, request, cluster):
    """A sandbox whose stand-in agents pick what to run from request.param."""
    box = slurm_sandbox(tmp_path, request, cluster, request.param)
    yield box
    box.close()


def job_names(cluster):
    return {name: (job_id, state) for job_id, name, state in cluster.jobs()}


# =============================================================================
# Tests
# =============================================================================

@pytest.mark.parametrize("slurm_box", ["job"], indirect=True)
def test_each_run_is_a_slurm_job(slurm_box, cluster):
    sb = slurm_box
    # Worker numbers are not GPU indices: 12 is fine on a machine of 8 (or none).
    r = sb.spawn("launch", "s1", "--slurm", "a:0", "a:12")
    assert r.returncode == 0, r.stderr
    for w in (0, 12):
        report = sb.out / f"gpu{w}.job"
        wait_for(report.exists, 30, f"worker {w}'s run never came back\n{cluster.log_tail()}")
        lines = report.read_text().splitlines()
        assert len(lines) == 3, f"worker {w}: {lines} (stderr: {(sb.out / f'gpu{w}.stderr').read_text()!r})"
        job_id, job_name, cwd = lines
        assert job_id.isdigit(), report.read_text()
        assert job_name == f"autoresearch-s1-{w}"
        assert Path(cwd).resolve() == (sb.repo / "worktrees" / f"gpu{w}").resolve()
        # No local GPU is bound; the prefix is srun with the job name and the site's arguments.
        assert (sb.out / f"gpu{w}.cuda").read_text() == "unset\n"
        assert (sb.out / f"gpu{w}.run").read_text() == f"srun --job-name=autoresearch-s1-{w} {RUN_ARGS}\n"
    assert sb.branches() == ["autoresearch/s1-gpu0", "autoresearch/s1-gpu12"]
    assert sb.spawn("stop", "s1").returncode == 0


@pytest.mark.parametrize("slurm_box", ["sleep", "escape"], indirect=True)
def test_stop_ends_the_running_job(slurm_box, cluster, request):
    """The job's srun is one of the night's processes: stop ends it, and the job with it. An srun that
    left the night (escape) is found by its job's name and cancelled."""
    sb = slurm_box
    assert sb.spawn("launch", "--slurm", "s2", "a:3").returncode == 0
    wait_for(lambda: job_names(cluster).get("autoresearch-s2-3", (0, ""))[1] == "RUNNING", 30,
             f"the job never ran\n{cluster.log_tail()}")
    job_id = job_names(cluster)["autoresearch-s2-3"][0]

    r = sb.spawn("status")
    assert r.returncode == 0, r.stderr
    assert f"{job_id}|autoresearch-s2-3|RUNNING|" in r.stdout, r.stdout

    r = sb.spawn("stop", "s2")
    assert r.returncode == 0, r.stderr
    if "escape" in request.node.name:
        assert f"Slurm job(s) {job_id} cancelled" in r.stdout, r.stdout
    wait_for(lambda: "autoresearch-s2-3" not in job_names(cluster), 30, "the job outlived stop")
    assert sb.branches() == ["autoresearch/s2-gpu3"] and sb.worktrees() == []
    assert "Slurm jobs" not in sb.spawn("status").stdout   # the night is over: nothing to ask Slurm


def test_smoke_training_run_through_slurm(tmp_path, request, cluster, prepared_cache):
    """program.md's run line, `$AUTORESEARCH_RUN uv run train.py > run.log 2>&1`, as a job."""
    files = [p.name for p in REPO.glob("*.py") if p.name != "analysis.py"] + ["pyproject.toml", "uv.lock"]
    files += [str(p.relative_to(REPO)) for p in REPO.glob("autoresearch/*.py")]
    sb = slurm_sandbox(tmp_path, request, cluster, "smoke", files=files, venv=True)
    try:
        # uv must find the locked environment as it is: nothing to fetch.
        r = sb.spawn("launch", "s3", "--slurm", "a:0", AUTORESEARCH_CACHE=str(prepared_cache), UV_OFFLINE="1")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: "autoresearch-s3-0" in job_names(cluster), 60, f"no job\n{cluster.log_tail()}")
        done = sb.out / "gpu0.done"
        wait_for(done.exists, 420, "the smoke run never finished")
        log = (sb.repo / "worktrees" / "gpu0" / "run.log").read_text()
        assert done.read_text() == "0\n", log[-3000:]
        assert "\n---\nval_bpb:" in log and "\npeak_vram_mb:" in log, log[-3000:]
        assert sb.spawn("stop", "s3").returncode == 0
        rows = (sb.repo / "results" / "s3-gpu0.tsv").read_text().splitlines()
        assert len(rows) == 2, rows
        commit, val_bpb, memory_gb, status, seed, description = rows[1].split("\t")
        assert commit == git(sb.repo, "rev-parse", "--short", "autoresearch/s3-gpu0")
        assert 0 < float(val_bpb) < 20 and float(memory_gb) >= 0 and status == "keep" and seed == "42"
    finally:
        sb.close()


def test_the_board_under_slurm(tmp_path, request, cluster):
    """test_board.py's night of three stand-ins, each fake run a Slurm job: the board reads the same."""
    sb = make_sandbox(tmp_path, request)
    sb.env = cluster.env(sb.env)
    sb.env.update(SLURM_RUN_ARGS=RUN_ARGS)
    try:
        start_night(sb, "s5", "--slurm")
        check_night(sb, "s5")
        for w in (1, 2):
            assert f"job: autoresearch-s5-{w}\n" in (sb.repo / "worktrees" / f"gpu{w}" / "run.log").read_text()
        assert "srun: error" in (sb.repo / "worktrees" / "gpu0" / "run.log").read_text()  # its last run crashed
        # A post from inside a job, on the node, lands on the same board.
        board = sb.repo / "results" / "s5-board.tsv"
        env = dict(sb.env, AUTORESEARCH_BOARD=str(board), AUTORESEARCH_WORKER="gpu1")
        r = subprocess.run(["srun", "--job-name=autoresearch-s5-1", *RUN_ARGS.split(), "bash", "spawn.sh", "board",
                            "post", "noise", "0.990000", "rerun from a job"], cwd=sb.repo / "worktrees" / "gpu1",
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert board.read_text().rstrip("\n").split("\n")[-1].endswith("\tnoise\t42\tbc4697856eaf\trerun from a job")
        assert sb.spawn("stop", "s5").returncode == 0
    finally:
        sb.close()


def test_confirm_under_slurm(tmp_path, request, cluster):
    """spawn.sh confirm --slurm: each run of the morning's confirmation a job, all queued at once."""
    sb = make_sandbox(tmp_path, request)
    sb.env = cluster.env(sb.env)
    sb.env.update(SLURM_RUN_ARGS=RUN_ARGS, CONFIRM_RUN_CMD="python3 fake_train.py")
    sb.fake_nvidia_smi(None)  # a login node without GPUs: --slurm needs none
    try:
        commits = finished_night(sb, "s6")
        r = sb.spawn("confirm", "s6", "2", "--slurm")
        assert r.returncode == 0, r.stdout + r.stderr + cluster.log_tail()
        lines = (sb.repo / "results" / "s6-confirm.tsv").read_text().splitlines()[1:]
        got = sorted((f[1], f[2], f[3], f[7]) for f in (line.split("\t") for line in lines))
        roles = ("baseline", "best")
        assert got == sorted((role, commits[role][:7], str(s), "slurm") for role in roles for s in (1, 2))
        for role in ("baseline", "best"):
            for s in (1, 2):
                log = (sb.repo / "results" / "s6-confirm" / f"{commits[role][:7]}-seed{s}.log").read_text()
                assert "job: autoresearch-s6-confirm\n" in log and "gpu: unset\n" in log, log
                assert f"seed:             {s}\n" in log
        assert not (sb.repo / "worktrees" / "confirm-s6").exists()
    finally:
        sb.close()


# =============================================================================
# Refused before anything is made (no cluster needed)
# =============================================================================

@pytest.mark.parametrize("env, message", [
    ("no srun", "srun not found"),
    ({"SLURM_RUN_ARGS": "--account='my lab' --time=10"}, "SLURM_RUN_ARGS must not contain quotes"),
])
def test_launch_slurm_refused_cleanly(tmp_path, request, env, message):
    sb = make_sandbox(tmp_path, request)
    try:
        if env == "no srun":
            env = {"PATH": path_without(tmp_path, "srun")}
        r = sb.spawn("launch", "s4", "--slurm", "a:0", **env)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr
        assert sb.branches() == [] and sb.worktrees() == [] and not sb.has_session("s4")
    finally:
        sb.close()

