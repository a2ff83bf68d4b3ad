"""
What a run prints about itself: the identity lines before training (what a reader
needs to trust the number), the overhead line, and the summary block after `---`, the
last thing printed, which machines read. DO NOT MODIFY. The summary's val_bpb is the
harness's: the one evaluation the ledger recorded, printed only after the live check.

train.py and the package's attention module import it; it imports constants.py,
autoresearch.ledger and autoresearch.live, nothing else of the project.
"""

import hashlib
import sys

from autoresearch import ledger, live
from constants import EVAL_TOKENS, MAX_SEQ_LEN, SMOKE, TIME_BUDGET


def print_identity(lines):
    """`name: value` lines, names padded to one column, flushed (a crash right after still shows them)."""
    for name, value in lines:
        print(f"{name + ':':<13}{value}")
    sys.stdout.flush()


def fingerprint_line(fingerprints):
    """The `data:` line: the validation data, tokenizer and shards by short sha, and the fixed
    files as one sha over their names and hashes (verify_data names the file that differs)."""
    files = fingerprints.get("harness", {})
    harness = hashlib.sha256(" ".join(f"{n}={s}" for n, s in sorted(files.items())).encode()).hexdigest()[:12]
    return (f"val={fingerprints['val']} tokenizer={fingerprints['tokenizer']} "
            f"train_shards={fingerprints['train_shards']}" + (f" harness={harness} ({len(files)} files)" if files else ""))


def constants_line():
    """The `constants:` line: the rules of the game in force."""
    return (f"MAX_SEQ_LEN={MAX_SEQ_LEN} TIME_BUDGET={TIME_BUDGET} EVAL_TOKENS={EVAL_TOKENS:,}"
            + (" (smoke)" if SMOKE else ""))


def smoke_line(replaced, settings, smoke_steps):
    """What a smoke run replaces, on one line: nobody should mistake it for a test of their edit.
    `replaced`: {name: value before the smoke block}; `settings`: the values now (train.py's globals)."""
    changes = ", ".join(f"{name} {value} -> {settings[name]}" for name, value in replaced.items())
    return (f"{changes}, TIME_BUDGET -> {smoke_steps} steps "
            f"(and from constants.py: MAX_SEQ_LEN={MAX_SEQ_LEN}, EVAL_TOKENS={EVAL_TOKENS:,})")


def batch_line(total_batch_size, micro_batch, grad_accum_steps, fit_note):
    """The `batch:` line: how the step's tokens are split, and why the micro-batch is lower, if it is."""
    return (f"TOTAL_BATCH_SIZE={total_batch_size:,} = micro-batch {micro_batch} x MAX_SEQ_LEN={MAX_SEQ_LEN} x "
            f"{grad_accum_steps} accumulation steps" + (f" ({fit_note})" if fit_note else ""))


def print_overhead(startup, fitting, warmup, step0, evaluation):
    """The `overhead:` line, in seconds: what the run spent outside the timed steps.
    `fitting` (the attempts that did not fit) is None when step 0 fit at once."""
    parts = [f"startup {startup:.1f} s"]
    if fitting is not None:
        parts.append(f"fitting to memory {fitting:.1f} s")
    parts.append(f"warm-up steps {warmup:.1f} s (step 0 with the evaluation check: {step0:.1f} s)")
    parts.append(f"evaluation {evaluation:.1f} s")
    print_identity([("overhead", ", ".join(parts))])


def print_summary(items):
    """The block a machine reads, the last thing a run prints: `---`, then keys padded to 18 columns.
    A smoke run says first, on the line before `---`, that its numbers are not comparable.

    Before it prints, what runs must be the fingerprinted files (live.check_live), and val_bpb is
    the run's one evaluation from the ledger: an item `val_bpb` with another number, or no
    evaluation, stops the run with one FAIL line instead (exit 1)."""
    rules = live.check_live(ledger.data_fingerprints()["harness"])
    items = harness_number(items, ledger.final_result(rules))
    if SMOKE:
        print("smoke run (AUTORESEARCH_SMOKE=1): tiny model, fixed steps; these numbers are not comparable")
    print("---")
    for key, value in items:
        print(f"{key + ':':<18}{value}")
    sys.stdout.flush()


def harness_number(items, val_bpb):
    """items with val_bpb as the harness measured it (first, if train.py left it out); an item
    val_bpb that says another number is a FAIL."""
    shown, items = f"{val_bpb:.6f}", list(items)
    for i, (key, value) in enumerate(items):
        if key != "val_bpb":
            continue
        try:
            same = round(float(value), 6) == round(val_bpb, 6)
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ledger.Failed(f"the summary's val_bpb ({value}) is not the evaluation's ({shown}): val_bpb is "
                                f"what evaluate_bpb returned, printed as it is")
        items[i] = (key, shown)
    return items if any(key == "val_bpb" for key, _ in items) else [("val_bpb", shown), *items]
