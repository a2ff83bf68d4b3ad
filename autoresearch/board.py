"""
The night's board: one file that every worker of a night posts to.

Holds the board's format, the safe append, the reader, and the two commands an
agent runs (through `bash spawn.sh board ...`):

    bash spawn.sh board                              # where the night stands (short)
    bash spawn.sh board post running "try SwiGLU"    # what I am trying now
    bash spawn.sh board post keep 0.981200 "SwiGLU"  # a result: keep | discard | noise | confirm
    bash spawn.sh board post crash "SwiGLU, OOM"     # a run that gave no number
    bash spawn.sh board post adopt                   # after git reset --hard <commit>
    bash spawn.sh board show mar5                    # a person, outside a worker

A worker started by spawn.sh has AUTORESEARCH_BOARD (the file),
AUTORESEARCH_WORKER (gpu<N>) and AUTORESEARCH_TAG in its environment; outside
one, pass --board PATH or a tag, and --worker. Stdlib only: imported by
autoresearch.launch and analysis.py, never by train.py or prepare.py.

The file: results/<tag>-board.tsv in the main repository (made by launch; the
worktrees share the repository's filesystem, and so do Slurm nodes that run
the worktrees' jobs). Tab-separated, one header line, then a row a post:

    time  worker  commit  val_bpb  status  seed  data  description

time is UTC (2026-03-05T01:23:45Z); commit the 7-character hash of the
worker's HEAD; val_bpb 6 decimals, '-' for running and crash rows; status
keep | discard | crash | noise | confirm | adopt | running (confirm: a run at a
second seed that confirms a small gain, program.md); seed the run's
AUTORESEARCH_SEED (default 42); data the run's data fingerprint ('-' when
unknown); description free text without tabs or line breaks.

Appends are safe with many writers, on one machine or on several sharing the
filesystem: each post takes an exclusive flock on the file (NFS clients turn
it into a POSIX lock), writes its row with one write() on an O_APPEND
descriptor, and lets go; readers take a shared lock, so they never see half a
row. The worktrees of a night are worktrees of one repository and share its
object store: a commit on one worker's branch is reachable from every other,
so adopting one is a `git reset --hard <commit>`.

Adopting: `show`, for a worker, prints an `adopt:` line when another worker's
best keep beats its own best (its best keep or adopt row) by more than
CONFIRM_THRESHOLD, on comparable data (the same fingerprint, or one unknown):
`git reset --hard <commit> && bash spawn.sh board post adopt`. The adopt row
carries the commit's val_bpb, which becomes the worker's best to beat.
"""

import argparse
import calendar
import fcntl
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

COLUMNS = ("time", "worker", "commit", "val_bpb", "status", "seed", "data", "description")
RESULTS = ("keep", "discard", "noise", "confirm")  # posts that carry a val_bpb from a run
STATUSES = RESULTS + ("crash", "adopt", "running")
DEFAULT_SEED = 42           # train.py's AUTORESEARCH_SEED when unset
# The keep rule's one number (program.md; analysis.py and the adopt rule use it). Measured on an H100
# before common random numbers (issue 24, 120 s budgets): the same code twice 0.0007 apart, other
# seeds up to 0.0086 apart (0.0056 at 300 s). A gain three rerun differences wide is unlikely to be
# chance at one seed; a smaller one is confirmed at a second seed. With common random numbers (H200,
# 120 s): a rerun 0.0005 apart, seeds up to 0.0064 apart, and DEPTH 8 -> 9 lost by 0.0223 at one seed
# and 0.0298 at another: a paired run gets an architectural edit's sign right, not its size
# (docs/agents.md).
RERUN_NOISE = 0.0007        # val_bpb between two runs of the same code at one seed
CONFIRM_FACTOR = 3          # a gain this many rerun noises wide is kept without confirming
CONFIRM_THRESHOLD = 0.002   # CONFIRM_FACTOR * RERUN_NOISE, rounded: larger gains are kept at once
THRESHOLD_SOURCE = f"{CONFIRM_FACTOR} x the {RERUN_NOISE} rerun difference measured on an H100, issue 24"
MIN_PLAUSIBLE_BPB = 0.01    # no model of text gets near this: a smaller value is a slip, not a result
MAX_PLAUSIBLE_BPB = 16.0    # twice a byte's 8 bits: no trained model is kept above it
SHOW_DISCARDS = 8           # recent discards and crashes `show` lists
STALE_SECONDS = 20 * 60     # a running row older than this is flagged: a run takes ~6 minutes
WORKER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class BoardError(Exception):
    """A problem the user can fix, said in one line."""


# =============================================================================
# Rows
# =============================================================================

@dataclass
class Entry:
    line: int                  # line number in the file (0 before it is written)
    time: str                  # UTC, 2026-03-05T01:23:45Z
    worker: str
    commit: str
    val_bpb: float | None      # None for running and crash rows
    status: str
    seed: int | None
    data: str                  # data fingerprint, '-' when unknown
    description: str

    def to_line(self):
        val = "-" if self.val_bpb is None else f"{self.val_bpb:.6f}"
        seed = "-" if self.seed is None else str(self.seed)
        fields = (self.time, self.worker, self.commit, val, self.status, seed, self.data or "-", self.description)
        return "\t".join(clean(f) for f in fields) + "\n"

    @property
    def epoch(self):
        return parse_time(self.time)


def clean(text):
    """One field: no tabs, no line breaks of any kind (they would split or shift the row)."""
    return " ".join(str(text).replace("\t", " ").splitlines()).strip()


def now_utc():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse_time(text):
    """Seconds since the epoch of a board time, or None."""
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except (ValueError, OverflowError):
        return None


def implausible(status, val_bpb):
    """The rule a result's val_bpb breaks, or None. Crash and running rows carry no number."""
    if status in ("crash", "running"):
        return None
    if val_bpb is None or not math.isfinite(val_bpb) or val_bpb <= 0:
        return "a result needs a finite val_bpb > 0 (a crash?)"
    if val_bpb < MIN_PLAUSIBLE_BPB:
        return f"a val_bpb below {MIN_PLAUSIBLE_BPB} is implausible (a unit slip or a corrupt row?)"
    if val_bpb > MAX_PLAUSIBLE_BPB and status != "discard":
        return f"a {status} above {MAX_PLAUSIBLE_BPB:g} bits per byte is implausible (a memory figure?)"
    return None


# =============================================================================
# Appending and reading, safe with many writers
# =============================================================================

def append(path, entry):
    """Append one row under an exclusive lock with one write(); the header if the file is new."""
    append_line(path, entry.to_line(), COLUMNS)


def append_line(path, line, columns):
    """Append one line to a tab-separated file of <columns> as `append` does (other files use it too)."""
    row = line.encode("utf-8")
    fd = os.open(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size == 0:
            row = ("\t".join(columns) + "\n").encode() + row
        while row:  # a short write is resumed under the same lock
            row = row[os.write(fd, row):]
    finally:
        os.close(fd)  # closing lets go of the lock


def create(path):
    """A new, empty board (the header only); nothing if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size == 0:
            os.write(fd, ("\t".join(COLUMNS) + "\n").encode())
    finally:
        os.close(fd)


def read_text(path):
    """The file's text under a shared lock (no half-written row), a BOM dropped."""
    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        data = f.read()
    return data.decode("utf-8", errors="replace").removeprefix("\ufeff")


def lines_of(text):
    """(number, line) for each line: split on '\\n' only, never on U+2028, U+0085 and kin."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def read(path):
    """Every well-formed row of a board, and "file:line: why" warnings for the rest."""
    entries, warnings = [], []
    for number, line in lines_of(read_text(path)):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        fields = line.split("\t")
        if [f.strip().lower() for f in fields[:3]] == list(COLUMNS[:3]):
            continue  # the header
        if len(fields) < len(COLUMNS):
            warnings.append(f"{where}: expected {len(COLUMNS)} tab-separated columns, found {len(fields)}; skipped")
            continue
        if len(fields) > len(COLUMNS):
            warnings.append(f"{where}: {len(fields) - len(COLUMNS)} extra column(s) after the description, "
                            f"ignored: {' | '.join(fields[len(COLUMNS):])[:80]!r}")
        stamp, worker, commit, val, status, seed, data, desc = (f.strip() for f in fields[:len(COLUMNS)])
        status = status.lower()
        if status not in STATUSES:
            warnings.append(f"{where}: unknown status {status!r} (want {'|'.join(STATUSES)}); skipped")
            continue
        try:
            val_bpb = None if val in ("-", "") else float(val)
            seed_n = None if seed in ("-", "") else int(seed)
        except ValueError:
            warnings.append(f"{where}: val_bpb {val!r} or seed {seed!r} is not a number; skipped")
            continue
        if status in ("crash", "running"):
            val_bpb = None
        rule = implausible(status, val_bpb)
        if rule:
            warnings.append(f"{where}: status {status} with val_bpb {val}: {rule}; skipped")
            continue
        if parse_time(stamp) is None:
            warnings.append(f"{where}: time {stamp!r} is not YYYY-MM-DDTHH:MM:SSZ; skipped")
            continue
        entries.append(Entry(number, stamp, worker, commit, val_bpb, status, seed_n, data, desc))
    return entries, warnings


# =============================================================================
# A run's identity, from its run.log
# =============================================================================

def summary_block(text):
    """{key: value} of the `key: value` lines after a run's last '---' line, and the lines before it."""
    lines = text.replace("\r", "\n").split("\n")
    start = max((i for i, line in enumerate(lines) if line.strip() == "---"), default=None)
    summary = {}
    for line in lines[start + 1:] if start is not None else []:
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            summary[key.strip()] = value.strip()
    return summary, lines[:start]


def data_fingerprint(identity_line):
    """The 12-hex-digit data fingerprint of an identity line `val=... tokenizer=... train_shards=...`,
    made as train.py makes its summary's `data:` (autoresearch/seeding.py): logs of either kind agree."""
    fields = dict(word.split("=", 1) for word in identity_line.split() if "=" in word)
    if not all(key in fields for key in ("val", "tokenizer", "train_shards")):
        return hashlib.sha256(identity_line.split(" | ")[0].strip().encode()).hexdigest()[:12]
    text = " ".join(f"{key}={fields[key]}" for key in ("val", "tokenizer", "train_shards"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_identity(run_log):
    """val_bpb, seed and data fingerprint from a run.log's summary block (after the last '---').

    The seed is the summary's `seed:`; the data fingerprint its `data:` (12 hex digits, train.py
    prints it) or `data_fingerprint:`, else one made from the identity line before the block,
    `data: val=... tokenizer=... train_shards=...`, the same way. Missing parts are None."""
    try:
        text = Path(run_log).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"val_bpb": None, "seed": None, "data": None}
    summary, before = summary_block(text)
    identity = {"val_bpb": None, "seed": None, "data": None}
    try:
        identity["val_bpb"] = float(summary["val_bpb"])
    except (KeyError, ValueError):
        pass
    try:
        identity["seed"] = int(summary["seed"])
    except (KeyError, ValueError):
        pass
    data = summary.get("data") or summary.get("data_fingerprint") or next(
        (line.split(":", 1)[1].strip() for line in before if line.startswith("data:") and "val=" in line), None)
    if data:
        identity["data"] = data if re.fullmatch(r"[0-9a-f]{6,64}", data) else data_fingerprint(data)
    return identity


# =============================================================================
# Where the night stands
# =============================================================================

def comparable(a, b):
    """Two data fingerprints that may be compared: equal, or one unknown."""
    return a in ("-", "", None) or b in ("-", "", None) or a == b


def standing(entries, worker=None, now=None, threshold=CONFIRM_THRESHOLD):
    """What `show` prints, as a dict: the night's best, each worker's best and latest row, who runs
    what, recent discards, and for <worker> its best and whether to adopt another's."""
    now = time.time() if now is None else now
    results = [e for e in entries if e.status in ("keep", "adopt")]
    best = min((e for e in entries if e.status == "keep"), key=lambda e: e.val_bpb, default=None)
    workers = {}
    for e in entries:
        w = workers.setdefault(e.worker, {"best": None, "last": None, "results": 0})
        w["last"] = e
        w["results"] += e.status in RESULTS + ("crash",)
    for e in results:
        w = workers[e.worker]
        if w["best"] is None or e.val_bpb < w["best"].val_bpb:
            w["best"] = e
    running = [dict(asdict(w["last"]), age=now - (w["last"].epoch or now))
               for name, w in sorted(workers.items()) if w["last"].status == "running" and name != worker]
    failed = [e for e in entries if e.status in ("discard", "crash")]
    fingerprints = {}
    for e in entries:
        if e.data not in ("-", ""):
            fingerprints[e.data] = fingerprints.get(e.data, 0) + 1
    out = {
        "rows": len(entries),
        "best": asdict(best) if best else None,
        "workers": {name: {"results": w["results"], "best": asdict(w["best"]) if w["best"] else None,
                           "last": asdict(w["last"])} for name, w in sorted(workers.items())},
        "running": running,
        "discards": [asdict(e) for e in reversed(failed[-SHOW_DISCARDS:])],
        "discards_total": len(failed),
        "fingerprints": fingerprints,
        "worker": worker,
        "mine": None,
        "adopt": None,
        "threshold": threshold,
    }
    if worker is not None:
        mine = workers.get(worker, {}).get("best")
        out["mine"] = asdict(mine) if mine else None
        if mine is not None:
            # The best keep of another worker on data comparable with mine.
            others = [e for e in entries if e.status == "keep" and e.worker != worker and comparable(e.data, mine.data)]
            top = min(others, key=lambda e: e.val_bpb, default=None)
            if top is not None and mine.val_bpb - top.val_bpb > threshold:
                out["adopt"] = dict(asdict(top), gain=round(mine.val_bpb - top.val_bpb, 6))
    return out


def _age(seconds):
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m"


def _result(row, worker=True):
    who = f"{row['worker']:<6} " if worker else ""
    return f"{row['val_bpb']:.6f}  {who}{row['commit']:<8} {row['description'][:60]}"


def format_standing(st, label):
    """The short text an agent reads at the top of its loop."""
    lines = [f"board {label}: {st['rows']} rows from {len(st['workers'])} workers"]
    if len(st["fingerprints"]) > 1:
        lines.append("warning: rows with different data fingerprints ("
                     + ", ".join(f"{k} x{n}" for k, n in st["fingerprints"].items())
                     + "): compare only rows of one fingerprint")
    lines.append(f"best:     {_result(st['best'])}" if st["best"] else "best:     none yet")
    if st["worker"] is not None:
        mine = st["mine"]
        lines.append(f"yours:    {_result(mine)}  (keep only what beats it)" if mine
                     else f"yours:    none yet ({st['worker']}: run the baseline and post it)")
        if st["adopt"]:
            a = st["adopt"]
            lines.append(f"adopt:    {a['worker']}'s {a['commit']} beats yours by {a['gain']:.6f} "
                         f"(> {st['threshold']}): git reset --hard {a['commit']} && bash spawn.sh board post adopt")
    else:
        for name, w in st["workers"].items():
            lines.append(f"  {name:<6} best {_result(w['best'], False)}" if w["best"] else f"  {name:<6} no result yet")
    if st["running"]:
        lines.append("running:")
        for r in st["running"]:
            stale = "  (stale?)" if r["age"] > STALE_SECONDS else ""
            lines.append(f"  {r['worker']:<6} {r['commit']:<8} {_age(r['age']):>6}  {r['description'][:70]}{stale}")
    if st["discards"]:
        lines.append(f"recent discards and crashes ({len(st['discards'])} of {st['discards_total']}, latest "
                     "first; do not repeat them without a reason):")
        for d in st["discards"]:
            val = f"{d['val_bpb']:.6f}" if d["val_bpb"] is not None else "crash   "
            lines.append(f"  {d['worker']:<6} {val}  {d['description'][:70]}")
    return "\n".join(lines)


# =============================================================================
# Posting
# =============================================================================

def git_head(cwd="."):
    out = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise BoardError("cannot read the commit (git rev-parse HEAD failed here): post from your worktree, "
                         "or pass --commit")
    return out.stdout.strip()


def same_commit(a, b):
    n = min(len(a), len(b))
    return n >= 7 and a[:n] == b[:n]


def make_post(entries, worker, status, words, commit, seed=None, data=None, run_log="run.log", env=os.environ):
    """The Entry that `post` appends (BoardError for a post that cannot be right)."""
    identity = run_identity(run_log) if status in RESULTS + ("crash",) else {"val_bpb": None, "seed": None, "data": None}
    if seed is None:
        seed = identity["seed"]
    if seed is None:
        try:
            seed = int(env.get("AUTORESEARCH_SEED") or DEFAULT_SEED)
        except ValueError:
            seed = DEFAULT_SEED
    data = (data or identity["data"] or "-").lower()
    val_bpb = None
    if status == "adopt":
        kept = [e for e in entries if e.status == "keep" and same_commit(e.commit, commit)]
        if not kept:
            raise BoardError(f"HEAD {commit} is no kept commit on the board: first git reset --hard <commit> "
                             "to a commit the board shows as best, then post adopt")
        src = min(kept, key=lambda e: e.val_bpb)
        if src.worker == worker:
            raise BoardError(f"{commit} is your own kept commit: adopt is for another worker's")
        note = " ".join(words)
        return Entry(0, now_utc(), worker, commit, src.val_bpb, status, src.seed, src.data,
                     f"from {src.worker}: {src.description}" + (f" ({note})" if note else ""))
    if status in RESULTS:
        if len(words) < 2:
            raise BoardError(f"post {status} needs a val_bpb and a description: "
                             f"bash spawn.sh board post {status} 0.981200 \"what you tried\"")
        try:
            val_bpb = float(words[0])
        except ValueError:
            raise BoardError(f"val_bpb {words[0]!r} is not a number: bash spawn.sh board post {status} "
                             "0.981200 \"what you tried\"") from None
        words = words[1:]
        rule = implausible(status, val_bpb)
        if rule:
            raise BoardError(f"val_bpb {val_bpb:g}: {rule}; read it again: grep '^val_bpb:' run.log")
        logged = identity["val_bpb"]
        if logged is not None and abs(logged - val_bpb) > 5e-7:
            print(f"warning: run.log says val_bpb {logged:.6f}, you posted {val_bpb:.6f}", file=sys.stderr)
        # one night, one dataset: a result on other data cannot be compared with the night's
        night = next((e for e in entries if e.status in RESULTS and e.data not in ("-", "")), None)
        if night is not None and not comparable(data, night.data):
            raise BoardError(f"this run's data fingerprint {data} is not the night's {night.data} (its first result, "
                             f"{night.worker} {night.commit}): runs on different data are not comparable; put the "
                             f"cache back as the night began, or start a new night with a new tag")
    elif status == "crash" and words and re.fullmatch(r"[0-9.]+", words[0]):
        words = words[1:]  # program.md's crash row has 0.000000: accept and drop it
    description = clean(" ".join(words))
    if not description:
        raise BoardError(f"post {status} needs a description: what the experiment tried")
    return Entry(0, now_utc(), worker, commit, val_bpb, status, seed, data, description)


# =============================================================================
# Command line (bash spawn.sh board ...)
# =============================================================================

def board_file(root, tag):
    """Where launch puts a night's board."""
    return Path(root) / "results" / f"{tag}-board.tsv"


def board_path(args, env, root):
    if args.board:
        return Path(args.board)
    tag = getattr(args, "tag", None)
    if tag:
        return board_file(root, tag)
    if env.get("AUTORESEARCH_BOARD"):
        return Path(env["AUTORESEARCH_BOARD"])
    raise BoardError("which board? inside a worker started by spawn.sh AUTORESEARCH_BOARD says; "
                     "elsewhere: bash spawn.sh board show <tag>")


def main(argv=None, env=None, root="."):
    """The board's commands; <root> is the main repository (for `show <tag>`)."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog="bash spawn.sh board",
                                     description="The night's shared board: show it, or post a row to it.")
    sub = parser.add_subparsers(dest="command")
    show = sub.add_parser("show", help="where the night stands (the default)")
    show.add_argument("tag", nargs="?", help="the night's tag (default: this worker's board)")
    show.add_argument("--json", action="store_true", help="the same as JSON")
    post = sub.add_parser("post", help="post a row: keep|discard|noise|confirm VAL_BPB DESC, crash DESC, "
                                       "running DESC, adopt")
    post.add_argument("status", choices=STATUSES)
    post.add_argument("words", nargs="*", help="VAL_BPB and DESCRIPTION, as the status needs")
    post.add_argument("--commit", help="default: git rev-parse --short=7 HEAD")
    post.add_argument("--seed", type=int, help="default: run.log's seed:, else $AUTORESEARCH_SEED, else 42")
    post.add_argument("--data", help="data fingerprint (default: from run.log)")
    post.add_argument("--log", default="run.log", help="the run's log (default: run.log)")
    for p in (show, post):
        p.add_argument("--board", help="the board file (default: $AUTORESEARCH_BOARD)")
        p.add_argument("--worker", default=env.get("AUTORESEARCH_WORKER"),
                       help="this worker's name (default: $AUTORESEARCH_WORKER)")
    argv = list(argv or [])
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "show")  # `board` and `board --json` show
    args = parser.parse_args(argv)
    try:
        path = board_path(args, env, root)
        if args.command == "post":
            if not args.worker or not WORKER_RE.match(args.worker):
                raise BoardError(f"worker name {args.worker!r}: set AUTORESEARCH_WORKER or pass --worker "
                                 "(letters, digits, '.', '_', '-')")
            if not path.is_file():
                raise BoardError(f"no board at {path}: spawn.sh launch makes it")
            entries, _ = read(path)
            commit = args.commit or git_head()
            entry = make_post(entries, args.worker, args.status, args.words, commit, args.seed, args.data, args.log, env)
            append(path, entry)
            print(f"posted: {entry.to_line().rstrip()}")
            return 0
        if not path.is_file():
            raise BoardError(f"no board at {path}: spawn.sh launch makes it")
        entries, warnings = read(path)
        st = standing(entries, args.worker or None)
        if args.json:
            print(json.dumps(dict(st, board=str(path), warnings=warnings), indent=1))
        else:
            print(format_standing(st, env.get("AUTORESEARCH_TAG") or getattr(args, "tag", None) or path.name))
            for w in warnings[:3]:
                print(f"warning: {w}", file=sys.stderr)
        return 0
    except (BoardError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
