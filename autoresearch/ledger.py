"""
The run's ledger: what the harness itself saw during a run, kept here and not in
train.py, so that the number in the summary is the harness's. DO NOT MODIFY.

- The data the metric needs (the validation rows, token_bytes.pt), held in memory
  from verify_data() on with the fingerprints it checked: a cache re-imported or
  re-tokenized during the run does not change the run's number.
- The training rows the loader hands out, and when. The first UNTIMED_STEPS steps
  of rows (TOTAL_BATCH_SIZE tokens a step, passed to make_dataloader) are untimed;
  the budget runs from the next row: TIME_BUDGET seconds plus the longest step
  plus BUDGET_SLACK, or SMOKE_STEPS steps of rows in a smoke run.
- The step-0 check (the weights come from the code, not from an earlier run) and
  the one final evaluation, whose result report.print_summary prints.

A tripwire against eager edits, not a sandbox: code that writes here on purpose
can forge it (the README says where the line is). Failures are one line,
`FAIL: ...`, exit 1 (Failed). prepare.py (the loader, the evaluation and
verify_data), scoring.py (the checks' random choices), live.py (Failed), gpu.py
(a retried step 0) and report.py (the summary) import it;
it imports constants.py and autoresearch.files. Tests call reset().
"""

import os
import secrets
import time

import torch

from autoresearch.files import stamp
from constants import SMOKE, SMOKE_STEPS, TIME_BUDGET, UNTIMED_STEPS

# Timed training may run TIME_BUDGET seconds, plus its longest step (the last one starts
# before the budget ends and finishes after it), plus this slack: the loop's work between
# the steps it times (a progress line, a rare gc pass) takes well under a second a run.
BUDGET_SLACK = max(1.0, 0.01 * TIME_BUDGET)  # seconds: 3 s of the 300 s budget


class Failed(SystemExit):
    """A run the harness refuses: one line starting "FAIL: ", exit code 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"FAIL: {message}")


class _Ledger:
    def __init__(self):
        self.held = None            # (tokenizer id, T, N, rows, token_bytes) from verify_data
        self.fingerprints = None    # what verify_data returned: val, tokenizer, train_shards, harness
        self.stamps = {}            # data file -> its stamp when verify_data checked it
        self._start_training()
        self.evaluations = []       # evaluate_bpb's results: {"bpb", "T", "N", "held"}

    def _start_training(self):
        self.rows_per_step = None   # TOTAL_BATCH_SIZE // T, from make_dataloader: a run's loader
        self.rows = 0               # training rows handed out
        self.last_start = None      # (step, time its first row was handed out) of the latest step
        self.longest = {}           # "timed"/"untimed": the longest step so far (step 0 left out)
        self.timed_start = None     # when the first row past UNTIMED_STEPS steps was handed out
        self.fresh = None           # (tensors, fingerprint) of the step-0 check's model


_ledger = _Ledger()


def reset():
    """Forget everything (tests: one ledger per test)."""
    global _ledger
    _ledger = _Ledger()


def choose(n):
    """A uniform choice in range(n) from os.urandom: no seed train.py sets can predict it."""
    return secrets.randbelow(n)


@torch.no_grad()
def fingerprint(tensors):
    """(len(tensors), 2) int64 checksums of each tensor's bits, one plain and one
    position-weighted: any change a training step or a load makes shows."""
    sums = []
    for t in tensors:
        bits = t.detach().reshape(-1).view(_BITS[t.element_size()]).long()
        weights = torch.arange(1, bits.numel() + 1, device=bits.device) % 65_521
        sums.append(torch.stack([bits.sum(), (bits * weights).sum()]))
    return torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.int64)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# =============================================================================
# The data the metric needs, held from verify_data on
# =============================================================================


def hold_data(fingerprints, tokenizer_id, T, N, rows, token_bytes, data_files):
    """verify_data(): keep what it checked (rows (N, T+1) and token_bytes in memory) and the
    data files' stamps, so the number measures what the `data:` line says."""
    _ledger.held = (tokenizer_id, T, N, rows, token_bytes)
    _ledger.fingerprints = fingerprints
    _ledger.stamps = {path: stamp(path) for path in data_files}


def held_data(tokenizer_id, T, N):
    """(rows, token_bytes) verify_data holds for this tokenizer and shape, or None (nothing
    held, or another shape: then the evaluation reads the cache, and a run's summary refuses it)."""
    if _ledger.held is None or tokenizer_id is None:
        return None
    held_id, held_T, held_N, rows, token_bytes = _ledger.held
    if held_id != tokenizer_id:
        raise Failed(f"the tokenizer ({tokenizer_id[:12]}) is not the one verify_data checked ({held_id[:12]}): "
                     f"prepare.py changed the cache during this run; run again")
    return (rows, token_bytes) if (held_T, held_N) == (T, N) else None


def data_fingerprints():
    """What verify_data returned, for the summary and the live check; FAIL if it never ran."""
    if _ledger.fingerprints is None:
        raise Failed("the run did not call verify_data() before training: nothing checked its data or the "
                     "fixed files (keep `fingerprints = verify_data()` at the top of main())")
    return _ledger.fingerprints

# =============================================================================
# Training rows: the budget
# =============================================================================


def start_training(total_batch_size, T):
    """make_dataloader(..., total_batch_size=TOTAL_BATCH_SIZE): this loader is a run's, and a
    step is total_batch_size // T of its rows."""
    if not isinstance(total_batch_size, int) or total_batch_size < T or total_batch_size % T:
        raise Failed(f"make_dataloader: total_batch_size={total_batch_size!r} must be TOTAL_BATCH_SIZE, a "
                     f"whole multiple of the row length {T}")
    _ledger.rows_per_step = total_batch_size // T


def restart_training():
    """gpu.fit_micro_batch: step 0 did not fit and starts again from scratch (a new model, a new
    loader), so its rows and its check start again too."""
    _ledger._start_training()


def counted(batches, rows_per_batch):
    """Pass the loader's batches through, counting rows_per_batch rows for each one handed out."""
    for batch in batches:
        _hand_out(rows_per_batch)
        yield batch


def _hand_out(n):
    led, now = _ledger, time.monotonic()
    first, led.rows = led.rows, led.rows + n
    if first == 0 and led.fresh is not None:
        tensors, before = led.fresh
        if not torch.equal(fingerprint(tensors), before):
            raise Failed("the weights changed between the step-0 check (check_evaluation) and the first "
                         "training row: a run starts from the code's initialisation, not from loaded weights")
    R = led.rows_per_step
    if R is None:
        return
    if first == 0 and led.fresh is None:
        raise Failed("the step-0 check did not run: call check_evaluation(...) after make_dataloader and before "
                     "step 0's training step (it checks that the weights come from the code)")
    for step in range(-(-first // R), -(-led.rows // R)):  # the steps whose first row is among these
        if led.last_start is not None and led.last_start[0] >= 1:
            kind = "timed" if led.last_start[0] >= UNTIMED_STEPS else "untimed"
            led.longest[kind] = max(led.longest.get(kind, 0.0), now - led.last_start[1])
        led.last_start = (step, now)
        if step == UNTIMED_STEPS:
            led.timed_start = now
    if SMOKE and led.rows > SMOKE_STEPS * R:
        raise Failed(f"training drew more than SMOKE_STEPS={SMOKE_STEPS} steps of {R} rows: a smoke run's "
                     f"budget is its steps (extra steps, or a schedule that counts them twice?)")
    if not SMOKE and led.timed_start is not None:
        _check_budget(now)


def _check_budget(now):
    longest = _ledger.longest  # the longest step: a timed one, else an untimed one after step 0
    elapsed, step = now - _ledger.timed_start, longest.get("timed", longest.get("untimed", 0.0))
    if elapsed > TIME_BUDGET + step + BUDGET_SLACK:
        raise Failed(f"training ran {elapsed:.1f} s from step {UNTIMED_STEPS}'s first row on, more than "
                     f"TIME_BUDGET={TIME_BUDGET} s plus one step ({step:.2f} s) and {BUDGET_SLACK:.1f} s of slack: "
                     f"the budget is constants.py's, and warm-up steps past UNTIMED_STEPS count in it")

# =============================================================================
# The step-0 check and the evaluation
# =============================================================================


def fresh_check_due():
    """check_evaluation runs the step-0 check when a run's loader exists and has handed out nothing."""
    return _ledger.rows_per_step is not None and _ledger.rows == 0 and _ledger.fresh is None


def record_fresh_check(tensors):
    """The model passed the step-0 check: its tensors must be unchanged at the first training row."""
    _ledger.fresh = (list(tensors), fingerprint(tensors))


def evaluation_begins(final):
    """evaluate_bpb (final) in a run: the first and only one, after the step-0 check and a timed
    phase within the budget, on data unchanged since verify_data. Outside a run (no run loader:
    tests, a notebook) and for check_evaluation, nothing is required."""
    led = _ledger
    if not final or led.rows_per_step is None:
        return
    if led.evaluations:
        raise Failed("evaluate_bpb ran a second time in this run: val_bpb is one evaluation after training, "
                     "never a choice among several (settle every choice in train.py before it)")
    if led.timed_start is None:
        raise Failed(f"evaluate_bpb before training: the run drew no training rows past its "
                     f"UNTIMED_STEPS={UNTIMED_STEPS} warm-up steps")
    if not SMOKE:
        _check_budget(time.monotonic())
    changed = [os.path.basename(path) for path, was in led.stamps.items()
               if not os.path.exists(path) or stamp(path) != was]
    if changed:
        raise Failed(f"the data changed on disk during this run ({', '.join(changed[:3])}"
                     f"{' ...' if len(changed) > 3 else ''}): prepare.py ran on this cache, so the run did not "
                     f"train on what its data: line says; run again")


def record_evaluation(bpb, T, N, held):
    """evaluate_bpb's result: bits per byte over N rows of T tokens; held: on verify_data's rows."""
    _ledger.evaluations.append({"bpb": bpb, "T": T, "N": N, "held": held})


def final_result(rules):
    """The number the summary prints: the run's one evaluation, over the rows constants.py's
    rules (as its bytes give them) ask for, on the data verify_data held; else FAIL."""
    led = _ledger
    if led.rows_per_step is None:
        raise Failed("no run loader counted the training rows: make it with make_dataloader(tokenizer, B, T, "
                     "'train', device=..., total_batch_size=TOTAL_BATCH_SIZE)")
    if not led.evaluations:
        raise Failed("a summary without the harness's evaluation: val_bpb is what evaluate_bpb returns, called "
                     "once after training (not check_evaluation's batch)")
    result = led.evaluations[0]
    T, N = rules["MAX_SEQ_LEN"], rules["EVAL_TOKENS"] // rules["MAX_SEQ_LEN"]
    if (result["T"], result["N"]) != (T, N):
        raise Failed(f"the evaluation scored {result['N']} rows of {result['T']} tokens, constants.py says {N} "
                     f"rows of {T}: EVAL_TOKENS or MAX_SEQ_LEN was changed in memory")
    if not result["held"]:
        raise Failed("the evaluation did not score the validation rows verify_data checked and holds")
    return result["bpb"]
