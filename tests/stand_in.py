"""
A stand-in research agent: program.md's loop and its board steps, with a
fake training run (no GPU, no model), for tests and examples.

    python tests/stand_in.py PLAN.json OUT PROMPT    # what spawn.sh starts in a pane

The sandbox repository holds a train.py of `GAIN_<idea> = <gain>` lines and
this file's FAKE_TRAIN as fake_train.py, which scores train.py: val_bpb =
1.0 - the sum of the gains + a small wobble fixed by the file's text and the
seed (AUTORESEARCH_SEED), printed in program.md's summary block with `seed:`,
`init:` and `data:` lines as train.py prints them, after a data identity line
(whose fingerprint the `data:` line is) and lines that say where and when it
ran (SLURM_JOB_NAME, CUDA_VISIBLE_DEVICES, start and end times). PLAN.json
maps each worker (gpu<N>) to its ideas, in order: {"name": "swiglu", "gain":
0.004} (a negative gain makes a discard, "crash": true a crash), with
"after": ["gpu0", "swiglu"] to wait until that worker has a result for it.

Each loop: read the board (bash spawn.sh board show --json), adopt another's
best when the board says so (git reset --hard + post adopt), skip an idea
another worker runs or has discarded, commit the edit, post `running`, run
`$AUTORESEARCH_RUN timeout 600 python3 fake_train.py > run.log 2>&1`, log
results.tsv, post keep or discard (and reset on a discard). What it did goes
to OUT/<worker>.log; when its plan is done it sits at a `> ` prompt.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

FAKE_TRAIN = r'''
import hashlib, os, re, sys, time
started = time.time()
text = open("train.py").read()
if "\nCRASH" in text:
    sys.exit("FAIL: out of memory (a stand-in crash)")
seed = int(os.environ.get("AUTORESEARCH_SEED") or 42)
gains = sum(float(g) for g in re.findall(r"^GAIN_\S+ = (-?[0-9.]+)$", text, re.M))
wobble = int(hashlib.sha256(f"{text}{seed}".encode()).hexdigest()[:6], 16) / 0xFFFFFF * 0.0004 - 0.0002
time.sleep(float(os.environ.get("STAND_IN_RUN_SECONDS", "0.3")))
print("data: val=5f0c2a9e tokenizer=1b7d3c4e train_shards=9a8b7c6d | harness train.py=0")
print(f"job: {os.environ.get('SLURM_JOB_NAME', 'none')}")
print(f"gpu: {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")
print(f"ran: {started:.3f} {time.time():.3f}")
print("---")
print(f"val_bpb:          {1.0 - gains + wobble:.6f}")
print("peak_vram_mb:     45060.2")
print(f"seed:             {seed}")
print(f"init:             {hashlib.sha256(f'{seed}'.encode()).hexdigest()[:12]}")
print("data:             bc4697856eaf")
'''


def sh(command, check=True):
    out = subprocess.run(command, shell=True, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{command}: exit {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def main(plan_path, out_dir):
    worker = os.environ["AUTORESEARCH_WORKER"]
    plan = json.loads(Path(plan_path).read_text()).get(worker, [])
    log = open(Path(out_dir) / f"{worker}.log", "a", buffering=1)

    def say(text):
        log.write(f"{time.strftime('%H:%M:%S')} {text}\n")

    def board():
        return json.loads(sh("bash spawn.sh board show --json"))

    def run_and_post(description):
        sh("$AUTORESEARCH_RUN timeout 600 python3 fake_train.py > run.log 2>&1", check=False)
        found = sh("grep '^val_bpb:' run.log", check=False).split()
        if not found:  # a crash: logged, posted, and the code goes back
            with open("results.tsv", "a") as f:
                f.write(f"{sh('git rev-parse --short=7 HEAD').strip()}\t0.000000\t0.0\tcrash\t42\t{description}\n")
            sh(f"bash spawn.sh board post crash '{description}'")
            sh("git reset --hard HEAD~1")
            say(f"crash {description}")
            return
        val = float(found[1])
        mine = board()["mine"]
        keep = mine is None or val < mine["val_bpb"]
        status = "keep" if keep else "discard"
        commit = sh("git rev-parse --short=7 HEAD").strip()
        with open("results.tsv", "a") as f:
            f.write(f"{commit}\t{val:.6f}\t44.0\t{status}\t42\t{description}\n")
        sh(f"bash spawn.sh board post {status} {val:.6f} '{description}'")
        if not keep:
            sh("git reset --hard HEAD~1")
        say(f"{status} {val:.6f} {description}")

    Path("results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tseed\tdescription\n")
    run_and_post("baseline")
    for idea in plan + [None]:
        if idea and "after" in idea:
            who, what = idea["after"]
            while not any(row["worker"] == who and row["description"] == what and row["status"] != "running"
                          for row in board_rows()):
                time.sleep(0.2)
        st = board()
        say("board: best " + (f"{st['best']['val_bpb']:.6f} {st['best']['worker']}" if st["best"] else "none"))
        if st["adopt"]:
            commit = st["adopt"]["commit"]
            sh(f"git reset --hard {commit}")
            sh("bash spawn.sh board post adopt")
            say(f"adopt {st['adopt']['worker']}'s {commit} ({st['adopt']['val_bpb']:.6f})")
        if idea is None:
            break
        taken = {r["description"] for r in st["running"]} | {d["description"] for d in st["discards"]}
        if idea["name"] in taken:
            say(f"skip {idea['name']}: another worker runs or discarded it")
            continue
        with open("train.py", "a") as f:
            f.write("CRASH\n" if idea.get("crash") else f"GAIN_{idea['name']} = {idea['gain']}\n")
        sh(f"git commit -qam '{idea['name']}'")
        sh(f"bash spawn.sh board post running '{idea['name']}'")
        run_and_post(idea["name"])
    say("plan done")
    input("> ")
    time.sleep(600)


def board_rows():
    """Every row of this worker's board, as dicts (the board module, read directly)."""
    sys.path.insert(0, os.getcwd())
    from autoresearch import board
    return [vars(e) for e in board.read(os.environ["AUTORESEARCH_BOARD"])[0]]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
