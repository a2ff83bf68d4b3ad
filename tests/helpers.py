"""
Helpers the test files share (not fixtures: those are in conftest.py): the tiny
corpus, prepare.py in a subprocess, pointing this process at another cache root,
a tiny model, and what a clean failure looks like. Test files import from here,
never from each other.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from autoresearch import board  # noqa: E402 (stdlib only: light)
from stand_in import FAKE_TRAIN  # noqa: E402

# =============================================================================
# A tiny corpus: English-like prose, numbers, code, CJK, kana, emoji
# =============================================================================

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no what up out about into can "
         "model data token train loss value layer batch learning rate network gradient research night agent").split()
CJK = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从"
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコ"
EMOJI = "😀😂🥲😍🤖🚀🌍🔥✨🎉👍🙂🍕🐍📈"
SPECIAL_LITERAL = "<|reserved_0|>"


def _prose(rng, n_words):
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        if i == 0 or out[-1].endswith("."):
            w = w.capitalize()
        if rng.random() < 0.08:
            w += rng.choice([".", ",", "!", "?", ";"])
        out.append(w)
    return " ".join(out) + "."


def _numbers(rng):
    return " ".join(rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 9))), f"{rng.random() * 1000:.3f}",
                                f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"])
                    for _ in range(rng.randint(3, 40)))


def _code(rng):
    name = rng.choice(WORDS)
    lines = [f"def {name}_{rng.randint(0, 99)}(x, y={rng.randint(0, 9)}):"]
    for _ in range(rng.randint(1, 12)):
        lines.append(f"    x = x * {rng.randint(1, 99)} + y  # {rng.choice(WORDS)}")
    lines.append("    return {'a': x, 'b': [1, 2, 3]}\n")
    return "\n".join(lines)


def _cjk(rng):
    s = "".join(rng.choice(CJK) for _ in range(rng.randint(5, 200)))
    return s + "。" + "".join(rng.choice(KANA) for _ in range(rng.randint(0, 40)))


def _emoji(rng):
    return " ".join(rng.choice(WORDS) + rng.choice(EMOJI) * rng.randint(1, 3) for _ in range(rng.randint(2, 30)))


def make_document(rng):
    """One document: a mix of kinds, lengths from a few characters to ~8k."""
    kind = rng.random()
    if kind < 0.15:
        return rng.choice(["ok", "a", "Hi!", "42", "🙂", "你好"])  # very short
    parts = []
    for _ in range(rng.randint(1, 4)):
        pick = rng.random()
        if pick < 0.45:
            parts.append(_prose(rng, rng.randint(5, 300)))
        elif pick < 0.6:
            parts.append(_numbers(rng))
        elif pick < 0.75:
            parts.append(_code(rng))
        elif pick < 0.9:
            parts.append(_cjk(rng))
        else:
            parts.append(_emoji(rng))
    if kind > 0.97:
        parts.append(_prose(rng, 1500))  # long: longer than small T, forces crops
    return "\n\n".join(parts)


def corpus_documents(n, seed):
    """n documents, each one unique across seeds too (a short one is tagged with its seed and
    index): an import drops validation documents that are copies of training documents."""
    rng = random.Random(seed)
    docs = [make_document(rng) for _ in range(n)]
    docs = [f"{doc} {seed}.{i}" if len(doc) < 8 else doc for i, doc in enumerate(docs)]
    if seed == 0:
        docs[7] = f"A document that mentions {SPECIAL_LITERAL} as plain text."
    return docs


def write_parquet(path, docs, row_group_size):
    where = path if hasattr(path, "write") else str(path)
    pq.write_table(pa.table({"text": pa.array(docs, type=pa.string())}), where, row_group_size=row_group_size)


def text_source(folder, n_docs=40, seed=5):
    """n_docs .txt files, one document each; returns the documents in import order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    docs = corpus_documents(n_docs, seed=seed)
    for i, doc in enumerate(docs):
        (folder / f"doc_{i:03d}.txt").write_text(doc)
    return docs


def texts(path):
    """The documents of a parquet file."""
    return pq.read_table(path).column("text").to_pylist()


def make_parquet_corpus(folder, n_train_files=3, docs_per_file=400, val_docs=300):
    """Training files with row groups of uneven sizes (128-document batches then
    restart mid-way), and a last file that becomes the validation split."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_train_files):
        path = folder / f"part_{i:02d}.parquet"
        write_parquet(path, corpus_documents(docs_per_file, seed=i), row_group_size=[300, 100, 250][i % 3])
        paths.append(path)
    path = folder / "zz_val.parquet"
    write_parquet(path, corpus_documents(val_docs, seed=1000), row_group_size=200)
    paths.append(path)
    return paths

# =============================================================================
# Running the harness
# =============================================================================


def run_prepare(args, cache, extra_env=None, timeout=300):
    """prepare.py in a subprocess with its own cache root; returns CompletedProcess."""
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_SMOKE="1", PYTHONUNBUFFERED="1")
    env.update(extra_env or {})
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *map(str, args)], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def run_edited(tmp_path, cache, edits):
    """Copy the project's Python files (the package's too) to tmp_path, apply {file: [(old, new), ...]},
    run a smoke train.py there (the tests of edits an agent makes)."""
    names = ["train.py", "prepare.py", "constants.py",
             *(path.relative_to(ROOT).as_posix() for path in sorted((ROOT / "autoresearch").glob("*.py")))]
    assert set(edits) <= set(names), f"no such file to edit: {set(edits) - set(names)}"
    (tmp_path / "autoresearch").mkdir()
    for name in names:
        text = (ROOT / name).read_text()
        for old, new in edits.get(name, []):
            assert old in text, f"{name} no longer contains {old!r}: update the test"
            text = text.replace(old, new, 1)
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_SMOKE="1", AUTORESEARCH_CACHE=str(cache), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def run_python(code, cache):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=120)


def assert_clean_failure(result, *needles):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def stops_with_one_line(call, exception, *needles):
    """call() must raise exception, a SystemExit whose one line starts with FAIL and holds each needle;
    returns the line."""
    with pytest.raises(exception) as err:
        call()
    assert isinstance(err.value, SystemExit)
    message = str(err.value)
    assert message.startswith("FAIL: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def use_cache(monkeypatch, root):
    from autoresearch import paths

    """Point this process's cache folders (autoresearch.paths) and subprocesses at another cache root."""
    for name in ("CACHE_DIR", "DATA_DIR", "TOKENIZER_DIR", "TOKENS_DIR"):
        monkeypatch.setattr(paths, name, getattr(paths, name))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(root))
    paths.set_cache_root(str(root))


SMOKE_T, SMOKE_N = 256, 32  # the validation rows prepared_cache holds (smoke constants)


def private_cache(prepared_cache, root, monkeypatch):
    """A private copy of the prepared cache at root, with this process's prepare pointed at it and
    its evaluation at the smoke constants the copy holds rows for (T=256, N=32)."""
    import prepare

    shutil.copytree(prepared_cache, root)  # copy2: mtimes kept, so the token caches stay fresh
    use_cache(monkeypatch, root)
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", SMOKE_T)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", SMOKE_N * SMOKE_T)
    return root


# =============================================================================
# A tiny model
# =============================================================================


def tiny_model(n_layer=2, n_embd=64, n_head=2, n_kv_head=None, vocab_size=97, sequence_len=32,
               window_pattern="SL", seed=0, model_class=None):
    """A GPT (or `model_class`, a subclass) on the CPU, initialised from `seed`."""
    import torch

    from train import GPT, GPTConfig

    torch.manual_seed(seed)  # as main(): the global stream too, for whatever a test draws next
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head or n_head, n_embd=n_embd, window_pattern=window_pattern)
    with torch.device("meta"):
        model = (model_class or GPT)(config)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


# =============================================================================
# spawn.sh in a throwaway git repository, with stand-in agents
# =============================================================================

REPO = ROOT
SPAWN = REPO / "spawn.sh"
LAUNCHER = ("spawn.sh", "autoresearch/launch.py", "autoresearch/board.py", "autoresearch/confirm.py")  # spawn.sh's
PROMPT = "Read program.md and follow the instructions."

STAND_IN = r"""#!/usr/bin/env bash
# Stand-in agent: $1 = folder for its report; the prompt is the last argument.
out=$1
report="$out/gpu$CUDA_VISIBLE_DEVICES.txt"
printf '%s\n' "${AUTORESEARCH_CACHE-unset}" > "$out/cache$CUDA_VISIBLE_DEVICES"
printf '%s\n' "${AUTORESEARCH_RUN-unset}" > "$out/run$CUDA_VISIBLE_DEVICES"
env -0 > "$out/env$CUDA_VISIBLE_DEVICES"
printf '%s\n%s\n%s\n' "$CUDA_VISIBLE_DEVICES" "$PWD" "${!#}" > "$report.tmp"
mv "$report.tmp" "$report"
[[ -f results.tsv ]] || printf 'commit\tval_bpb\tmemory_gb\tstatus\tdescription\n' > results.tsv
printf 'abc1234\t0.997900\t44.0\tkeep\tbaseline gpu%s\n' "$CUDA_VISIBLE_DEVICES" >> results.tsv
read -r -p '> ' reply
printf '%s\n' "$reply" > "$out/gpu$CUDA_VISIBLE_DEVICES.nudge"
sleep 600
"""


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


class Sandbox:
    """A throwaway repo with spawn.sh, its own tmux server and a stand-in agent.

    <files>: more of this repo's files to commit there; <venv>: link the repo's
    real .venv (else a dummy folder with a marker file)."""

    def __init__(self, tmp_path, socket, agent_script=STAND_IN, files=(), venv=False):
        self.repo = tmp_path / "repo"
        self.out = tmp_path / "out"
        self.socket = socket
        self.repo.mkdir()
        self.out.mkdir()
        for name in (*LAUNCHER, *files):
            (self.repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, self.repo / name)
        (self.repo / "program.md").write_text("# program\nRun experiments.\n")
        (self.repo / ".gitignore").write_text("worktrees/\nresults/\nresults.tsv\nrun.log\n.venv\n")
        if venv:
            (self.repo / ".venv").symlink_to(REPO / ".venv")
        else:
            (self.repo / ".venv").mkdir()
            (self.repo / ".venv" / "marker").write_text("venv\n")
        agent = tmp_path / "agent.sh"
        agent.write_text(agent_script)
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.fake_nvidia_smi(8)
        self.env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE", "CUDA_VISIBLE_DEVICES")}
        self.env.update(
            PATH=f"{self.bin}:{os.environ['PATH']}",
            TMUX_SOCKET=socket,
            WATCH_INTERVAL="600",
            AUTORESEARCH_AGENT_CMD=f"bash {agent} {self.out}",
            GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
            GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid",
        )
        git(self.repo, "init", "-q", "-b", "main")
        git(self.repo, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "add", "-A")
        git(self.repo, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "init")
        self.head = git(self.repo, "rev-parse", "HEAD")

    def fake_nvidia_smi(self, n_gpus):
        """`nvidia-smi -L` of a machine with <n_gpus> GPUs (None: no nvidia-smi)."""
        tool = self.bin / "nvidia-smi"
        tool.unlink(missing_ok=True)
        if n_gpus is not None:
            lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})\\n" for i in range(n_gpus))
            tool.write_text(f"#!/usr/bin/env bash\nprintf '{lines}'\n")
            tool.chmod(0o755)

    def close(self):
        """Our private tmux server (the watchers are windows of its sessions)."""
        self.tmux("kill-server")
        # tmux leaves the socket file behind; it lives where `tmux -L` puts it.
        tmux_dir = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
        (tmux_dir / self.socket).unlink(missing_ok=True)

    def spawn(self, *args, **env):
        e = dict(self.env)
        e.update(env)
        return subprocess.run(["bash", "spawn.sh", *args], cwd=self.repo, env=e,
                              capture_output=True, text=True, timeout=60)

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True)

    def has_session(self, tag):
        return self.tmux("has-session", "-t", f"=autoresearch-{tag}").returncode == 0

    def branches(self):
        out = git(self.repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/autoresearch/")
        return sorted(out.split())

    def worktrees(self):
        return sorted(p.name for p in (self.repo / "worktrees").glob("gpu*")) if (self.repo / "worktrees").exists() else []

    def watcher_pid(self, tag):
        """The pid of the watcher: the process of the session's window 'watcher'."""
        out = self.tmux("list-panes", "-t", f"=autoresearch-{tag}:watcher", "-F", "#{pane_pid}").stdout.strip()
        return int(out) if out.isdigit() else None

    def report(self, gpu, timeout=10.0):
        """What the stand-in on <gpu> wrote: (CUDA_VISIBLE_DEVICES, cwd, prompt)."""
        path = self.out / f"gpu{gpu}.txt"
        wait_for(path.exists, timeout, f"stand-in agent on gpu{gpu} never reported")
        return tuple(path.read_text().splitlines())


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(what)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def path_without(tmp_path, tool):
    """A PATH with every program of this one but <tool>."""
    shadow = tmp_path / f"path-without-{tool}"
    shadow.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = shadow / entry.name
            if entry.name != tool and not target.exists() and not target.is_symlink():
                target.symlink_to(entry.path)
    assert shutil.which(tool, path=str(shadow)) is None
    return str(shadow)


def make_sandbox(tmp_path, request, **kwargs):
    missing = [tool for tool in ("git", "tmux") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"spawn.sh tests need {' and '.join(missing)}: install them (apt-get install -y tmux; .ci/run does)")
    return Sandbox(tmp_path, f"autoresearch-test-{os.getpid()}-{request.node.name}"[:90], **kwargs)


# =============================================================================
# A night of three stand-in agents (tests/stand_in.py) that share the board
# =============================================================================

# gpu0 takes gpu1's first gain and finds a big one on top; gpu1 takes that and adds its own; gpu2 takes
# gpu1's (or a later commit on it) and adds a third. gpu1 skips "gelu", which gpu0 discarded. The best
# is a chain of kept edits from three workers. The waits ("after") and the gains (each adoption wins by
# more than CONFIRM_THRESHOLD, whatever else ran first) make that so however fast each stand-in runs;
# which other adoptions happen on the way depends on timing.
NIGHT_PLAN = {
    "gpu0": [{"name": "swiglu", "gain": 0.010, "after": ["gpu1", "matrix_lr"]}, {"name": "gelu", "gain": -0.004},
             {"name": "rope_base", "gain": 0.0015}, {"name": "width_x2", "crash": True}],
    "gpu1": [{"name": "matrix_lr", "gain": 0.003}, {"name": "qk_norm", "gain": 0.005, "after": ["gpu0", "swiglu"]},
             {"name": "gelu", "gain": -0.004, "after": ["gpu0", "gelu"]}],
    "gpu2": [{"name": "depth_9", "gain": -0.002}, {"name": "window_sssl", "gain": 0.002},
             {"name": "warmdown", "gain": 0.003, "after": ["gpu1", "qk_norm"]}],
}


def commit_stand_in(sb):
    """Commit the stand-in train.py (GAIN_ lines: the kept ideas) and FAKE_TRAIN as fake_train.py; the hash."""
    (sb.repo / "train.py").write_text("# stand-in train.py: each GAIN_ line is a kept idea\nBASE = 1.0\n")
    (sb.repo / "fake_train.py").write_text(FAKE_TRAIN)
    git(sb.repo, "add", "-A")
    git(sb.repo, "commit", "-qm", "stand-in train.py")
    return git(sb.repo, "rev-parse", "HEAD")


def start_night(sb, tag, *launch_args, **env):
    """Commit a fake train.py into the sandbox and launch three stand-ins on it."""
    sb.head = commit_stand_in(sb)
    plan = sb.out / "plan.json"
    plan.write_text(json.dumps(NIGHT_PLAN))
    agent = f"{sys.executable} {REPO / 'tests' / 'stand_in.py'} {plan} {sb.out}"
    r = sb.spawn("launch", tag, *launch_args, "x:0", "x:1", "x:2", AUTORESEARCH_AGENT_CMD=agent, **env)
    assert r.returncode == 0, r.stderr
    for w in NIGHT_PLAN:
        log = sb.out / f"{w}.log"
        wait_for(lambda: log.exists() and "plan done" in log.read_text(), 180,
                 f"{w} never finished its plan: {log.read_text() if log.exists() else 'no log'}")


def finished_night(sb, tag, ideas=(("swiglu", 0.010), ("gelu", -0.004), ("qk_norm", 0.005))):
    """A night that ran and stopped, without agents: the stand-in train.py and fake_train.py committed on
    main (the launch commit), a commit per idea on the branch autoresearch/<tag>-gpu0 (a negative gain is
    discarded: reset), and the board's rows. Returns {"baseline": hash, "best": hash} (full hashes)."""
    commits = {"baseline": commit_stand_in(sb)}
    git(sb.repo, "checkout", "-q", "-b", f"autoresearch/{tag}-gpu0")
    (sb.repo / "results").mkdir(exist_ok=True)
    path = board.board_file(sb.repo, tag)
    row = lambda commit, val, status, what: board.append(path, board.Entry(  # noqa: E731
        0, board.now_utc(), "gpu0", commit[:7], val, status, 42, "bc4697856eaf", what))
    row(commits["baseline"], 1.0, "keep", "baseline")
    val = 1.0
    for name, gain in ideas:
        with open(sb.repo / "train.py", "a") as f:
            f.write(f"GAIN_{name} = {gain}\n")
        git(sb.repo, "commit", "-qam", name)
        commit = git(sb.repo, "rev-parse", "HEAD")
        if gain > 0:
            val -= gain
            row(commit, val, "keep", name)
            commits["best"] = commit
        else:
            row(commit, val - gain, "discard", name)
            git(sb.repo, "reset", "-q", "--hard", "HEAD~1")
    git(sb.repo, "checkout", "-q", "main")
    return commits


def check_night(sb, tag):
    """What any night of NIGHT_PLAN must show, on the board and in analysis.py's report."""
    path = board.board_file(sb.repo, tag)
    entries, warnings = board.read(path)
    assert warnings == []
    by = lambda w, status: [e for e in entries if e.worker == w and e.status == status]  # noqa: E731
    kept = {e.description: e for e in entries if e.status == "keep"}
    # gpu0 took gpu1's matrix_lr, gpu1 took gpu0's swiglu, gpu2 took qk_norm or a commit on it: their
    # branches really moved there.
    assert kept["matrix_lr"].commit in [e.commit for e in by("gpu0", "adopt")]
    assert kept["swiglu"].commit in [e.commit for e in by("gpu1", "adopt")]
    assert by("gpu2", "adopt")
    for ancestor, branch in ((kept["matrix_lr"], "gpu0"), (kept["swiglu"], "gpu1"), (kept["qk_norm"], "gpu2")):
        assert subprocess.run(["git", "-C", str(sb.repo), "merge-base", "--is-ancestor", ancestor.commit,
                               f"autoresearch/{tag}-{branch}"]).returncode == 0
    assert "gelu" not in [e.description for e in entries if e.worker == "gpu1"]   # gpu0 discarded it
    assert "skip gelu" in (sb.out / "gpu1.log").read_text()
    assert [(e.description, e.val_bpb) for e in by("gpu0", "crash")] == [("width_x2", None)]
    assert all(e.seed == 42 and len(e.data) == 12 for e in entries if e.status in ("keep", "discard"))
    assert {e.description for e in entries if e.status == "running"} >= {"swiglu", "qk_norm", "warmdown"}

    r = subprocess.run([sys.executable, str(REPO / "analysis.py"), str(path), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    night = json.loads(r.stdout)
    assert night["best"]["description"] == "warmdown" and night["best"]["worker"] == "gpu2"
    chain = [(c["description"], c["worker"]) for c in night["chain"]]
    assert chain[0][0] == "baseline" and chain[-1] == ("warmdown", "gpu2")
    assert [c for c in chain if c[0] != "rope_base"][1:] == \
        [("matrix_lr", "gpu1"), ("swiglu", "gpu0"), ("qk_norm", "gpu1"), ("warmdown", "gpu2")]
    assert night["improvement"] >= 0.02
    assert {(a["worker"], a["source"]) for a in night["adoptions"]} >= {("gpu0", "gpu1"), ("gpu1", "gpu0")}
    assert night["workers"]["gpu0"]["adopted_from_it"] >= 1 and night["workers"]["gpu2"]["frontier_moves"] >= 1
    return night
