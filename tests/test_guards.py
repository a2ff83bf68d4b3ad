"""
The guards that make val_bpb the harness's number (the live check, the run's ledger,
the evaluation's checks) and keep a run's data its own (held from verify_data on).
Each kind of eager edit an agent might make stops the run with its one FAIL line; a
legitimate edit next to it passes. CPU only, temporary cache roots.

    uv run pytest tests/test_guards.py                 # five smoke runs of edited copies: minutes on 2 cores
    uv run pytest tests/test_guards.py -m "not slow"   # the guards in this process: seconds

The checks are tested in this process where they can be (a fake clock for the budget,
tiny models for the evaluation); the smoke runs show the wiring in train.py end to end.
"""

import importlib
import math
import os
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import constants
import prepare
from autoresearch import files, ledger, live, manifest, paths, report, scoring
from helpers import (SMOKE_N, SMOKE_T, corpus_documents, private_cache, run_edited, stops_with_one_line, tiny_model,
                     write_parquet)

T, N = SMOKE_T, SMOKE_N


def caught(call, *needles):
    """call() must stop the run with one FAIL line naming the needles."""
    return stops_with_one_line(call, ledger.Failed, *needles)

# =============================================================================
# The live check: what runs is what the fingerprinted files say
# =============================================================================


@pytest.fixture
def recorded():
    """The fixed files' fingerprints as verify_data returns them at start-up."""
    return {name: sha[:12] if sha else "missing" for name, sha in manifest.harness_fingerprints().items()}


def test_the_harness_as_loaded_passes_and_gives_the_rules(recorded, sdpa_backend, monkeypatch):
    """Legitimate: train.py's own pieces replaced (they are the agent's), the harness's state in use."""
    import train

    monkeypatch.setattr(train, "softcapped_cross_entropy", lambda *args: None)
    rules = live.check_live(recorded)
    assert {name: rules[name] for name in ("MAX_SEQ_LEN", "TIME_BUDGET", "EVAL_TOKENS", "UNTIMED_STEPS")} == {
        "MAX_SEQ_LEN": constants.MAX_SEQ_LEN, "TIME_BUDGET": constants.TIME_BUDGET,
        "EVAL_TOKENS": constants.EVAL_TOKENS, "UNTIMED_STEPS": constants.UNTIMED_STEPS}


REPLACED_AT_RUN_TIME = [  # (module, attribute, new value, what the line names)
    ("prepare", "evaluate_bpb", lambda model, tokenizer, batch_size: 0.5,
     "prepare.evaluate_bpb is not the function prepare.py defines"),
    ("prepare", "_check_causal", lambda *args: None, "prepare._check_causal is not the function"),
    ("prepare", "EVAL_TOKENS", constants.EVAL_TOKENS // 4, "prepare.EVAL_TOKENS is"),
    ("constants", "TIME_BUDGET", 3 * constants.TIME_BUDGET, f"constants.TIME_BUDGET is {3 * constants.TIME_BUDGET}"),
    ("prepare", "ledger", types.SimpleNamespace(), "prepare.ledger is not autoresearch.ledger"),
    ("autoresearch.ledger", "_check_budget", lambda now: None, "autoresearch.ledger._check_budget is not"),
    ("autoresearch.scoring", "FRESH_MARGIN", 100.0, "autoresearch.scoring.FRESH_MARGIN is"),
    ("prepare", "scoring", types.SimpleNamespace(), "prepare.scoring is not autoresearch.scoring"),
    ("autoresearch.guards", "check_loss", lambda loss, step: None, "autoresearch.guards.check_loss is not"),
    ("autoresearch.report", "harness_number", lambda items, val_bpb: items, "autoresearch.report.harness_number"),
]


@pytest.mark.parametrize("module, name, value, needle", REPLACED_AT_RUN_TIME, ids=[f"{m}.{n}" for m, n, *_ in
                                                                                    REPLACED_AT_RUN_TIME])
def test_a_harness_object_replaced_at_run_time_is_named(recorded, monkeypatch, module, name, value, needle):
    monkeypatch.setattr(importlib.import_module(module), name, value)
    caught(lambda: live.check_live(recorded), needle)


def test_code_defaults_and_methods_changed_in_place_are_named(recorded, monkeypatch):
    monkeypatch.setattr(prepare._check_causal, "__code__", (lambda *args: None).__code__)
    caught(lambda: live.check_live(recorded), "prepare._check_causal is not the function")
    monkeypatch.undo()
    monkeypatch.setattr(scoring.check_targets, "__code__", (lambda *args: None).__code__)
    caught(lambda: live.check_live(recorded), "autoresearch.scoring.check_targets is not the function")
    monkeypatch.undo()
    monkeypatch.setattr(prepare.val_rows, "__defaults__", (False,))
    caught(lambda: live.check_live(recorded), "prepare.val_rows's default arguments")
    monkeypatch.undo()
    monkeypatch.setattr(prepare.Tokenizer, "get_vocab_size", lambda self: 1)
    caught(lambda: live.check_live(recorded), "prepare.Tokenizer.get_vocab_size is not the function")


def test_a_fixed_file_changed_on_disk_during_the_run_is_named(recorded):
    caught(lambda: live.check_live(dict(recorded, **{"prepare.py": "0" * 12})), "prepare.py changed on disk")

# =============================================================================
# The budget: rows and time, counted by the loader
# =============================================================================


class Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """A real run's budget (not smoke) on a fake clock; a run's loader of 2 rows a step, checked at step 0."""
    fake = Clock()
    monkeypatch.setattr(ledger, "time", fake)
    monkeypatch.setattr(ledger, "SMOKE", False)
    ledger.start_training(2 * T, T)
    ledger.record_fresh_check([])
    return fake


def steps(clock, n, seconds):
    """n steps of 2 rows, one row at a time, each step taking `seconds`."""
    for _ in range(n):
        for _ in range(2):
            ledger._hand_out(1)
        clock.now += seconds


def test_warm_up_steps_then_the_budget_pass(clock):
    steps(clock, constants.UNTIMED_STEPS, 30.0)  # compiling: the untimed steps take what they take
    steps(clock, int(constants.TIME_BUDGET / 0.5), 0.5)  # the loop's timed steps, 0.5 s each
    ledger.evaluation_begins(final=True)
    assert ledger._ledger.timed_start is not None


def test_a_budget_changed_in_memory_stops_at_the_first_row_past_it(clock):
    steps(clock, constants.UNTIMED_STEPS, 1.0)
    caught(lambda: steps(clock, 3 * int(constants.TIME_BUDGET / 0.5), 0.5), "training ran",
           f"more than TIME_BUDGET={constants.TIME_BUDGET} s plus one step (0.50 s)")


def test_extra_warm_up_steps_drawing_rows_count_in_the_budget(clock):
    """train.py's loop times only its steps from UNTIMED_STEPS on; ten extra untimed steps draw rows
    that the harness counts from the first row past UNTIMED_STEPS steps."""
    steps(clock, constants.UNTIMED_STEPS + 10, 0.5)
    caught(lambda: steps(clock, int(constants.TIME_BUDGET / 0.5), 0.5), "training ran")


def test_training_on_after_the_last_row_is_caught_at_the_evaluation(clock):
    steps(clock, constants.UNTIMED_STEPS + int(constants.TIME_BUDGET / 0.5), 0.5)
    clock.now += 30  # more steps on batches kept from before: no rows drawn, but time passes
    caught(lambda: ledger.evaluation_begins(final=True), "training ran")


def test_a_smoke_run_counts_steps(clock, monkeypatch):
    monkeypatch.setattr(ledger, "SMOKE", True)
    steps(clock, constants.SMOKE_STEPS, 10.0)  # a slow machine: seconds do not count in a smoke run
    caught(lambda: steps(clock, 1, 0.1), f"more than SMOKE_STEPS={constants.SMOKE_STEPS} steps of 2 rows")


def test_the_step_0_check_must_run_before_the_first_row_and_the_weights_must_stay():
    ledger.start_training(2 * T, T)
    caught(lambda: ledger._hand_out(1), "the step-0 check did not run")
    weights = torch.zeros(3)
    ledger.restart_training()  # a step 0 that did not fit starts again: its rows and its check too
    ledger.start_training(2 * T, T)
    ledger.record_fresh_check([weights])
    weights += 1  # loaded after the check
    caught(lambda: ledger._hand_out(1), "the weights changed between the step-0 check")


def test_one_evaluation_after_training(clock):
    caught(lambda: ledger.evaluation_begins(final=True), "evaluate_bpb before training")
    steps(clock, constants.UNTIMED_STEPS + 5, 0.5)
    ledger.evaluation_begins(final=False)  # check_evaluation: any number of times
    ledger.evaluation_begins(final=True)
    ledger.record_evaluation(1.5, T, N, held=True)
    caught(lambda: ledger.evaluation_begins(final=True), "evaluate_bpb ran a second time")


def test_outside_a_run_evaluations_are_free():
    """No run loader (a test, a notebook): evaluate as often as you like; no summary follows."""
    for _ in range(3):
        ledger.evaluation_begins(final=True)
        ledger.record_evaluation(1.5, T, N, held=False)

# =============================================================================
# The summary prints the harness's number
# =============================================================================


def test_the_summary_number_is_the_recorded_evaluation():
    rules = {"MAX_SEQ_LEN": T, "EVAL_TOKENS": N * T}
    caught(lambda: ledger.final_result(rules), "no run loader counted the training rows")
    ledger.start_training(2 * T, T)
    caught(lambda: ledger.final_result(rules), "a summary without the harness's evaluation")
    ledger.record_evaluation(1.7, T, N // 4, held=True)  # EVAL_TOKENS shrunk in memory for the evaluation
    caught(lambda: ledger.final_result(rules), f"scored {N // 4} rows of {T} tokens, constants.py says {N} rows")
    ledger.reset()
    ledger.start_training(2 * T, T)
    ledger.record_evaluation(1.7, T, N, held=False)
    caught(lambda: ledger.final_result(rules), "did not score the validation rows verify_data checked")
    ledger._ledger.evaluations[0]["held"] = True
    assert ledger.final_result(rules) == 1.7


def test_the_summary_prints_the_evaluation_not_another_number():
    items = [("val_bpb", "1.7"), ("depth", 2)]
    assert report.harness_number(items, 1.7) == [("val_bpb", "1.700000"), ("depth", 2)]
    assert report.harness_number([("depth", 2)], 1.7) == [("val_bpb", "1.700000"), ("depth", 2)]
    # the number taken from check_evaluation's batch, or a picked temperature: another number
    caught(lambda: report.harness_number([("val_bpb", "1.612345")], 1.7), "the summary's val_bpb (1.612345) is not "
                                                                            "the evaluation's (1.700000)")

# =============================================================================
# The evaluation's checks, on tiny models
# =============================================================================


@pytest.fixture
def tok(prepared_cache, tmp_path, monkeypatch):
    private_cache(prepared_cache, tmp_path / "cache", monkeypatch)
    return prepare.Tokenizer.from_directory()


def val_targets(tok):
    rows = torch.from_numpy(np.asarray(prepare.val_rows(tok, T, N), dtype=np.int64))
    return rows[:, :-1], rows[:, 1:]


class Table(torch.nn.Module):
    """logits = table[x] (a bigram model), or the same row everywhere when the table has one row
    (a frequency guess). Causal, reads no targets."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table.float())

    def logits(self, x, y):
        return self.table[x] if len(self.table) > 1 else self.table[0].expand(*x.shape, -1)

    def forward(self, x, y, reduction="mean"):
        logits = self.logits(x, y)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction=reduction)


def frequencies(y, vocab, smoothing=0.0):
    return (torch.bincount(y.reshape(-1), minlength=vocab).double() + smoothing).log().log_softmax(0)[None]


def bigram(x, y, vocab):
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    counts.index_put_((x.reshape(-1), y.reshape(-1)), torch.ones(x.numel(), dtype=torch.float64), accumulate=True)
    return (counts + 1e-6).log().log_softmax(1)


class ReadsTargets(Table):
    """A model that sees its targets: at its own position (`same`), or the one before (`earlier`,
    which is the input token there, unless only the target changed)."""

    def __init__(self, table, where):
        super().__init__(table)
        self.where = where

    def logits(self, x, y):
        seen = y if self.where == "same" else torch.cat([x[:, :1], y[:, :-1]], dim=1)
        return super().logits(x, y) + 12 * F.one_hot(seen, self.table.shape[1])


class LeaksExceptOnOneBatch(Table):
    """Sees the next token, except on the batch whose last row starts with `honest_start`: an
    edit that passes a check made on one fixed batch."""

    def __init__(self, table, honest_start):
        super().__init__(table)
        self.honest_start = honest_start

    def logits(self, x, y):
        logits = super().logits(x, y)
        if torch.equal(x[-1, :16], self.honest_start):
            return logits
        ahead = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
        return logits + 8 * F.one_hot(ahead, self.table.shape[1])


class Remembers(Table):
    """Dynamic evaluation: each call adds what the previous batches' targets were to its guess."""

    def __init__(self, table):
        super().__init__(table)
        self.seen = torch.zeros(table.shape[1])

    def logits(self, x, y):
        logits = super().logits(x, y) + self.seen.log1p()
        self.seen += torch.bincount(y.reshape(-1), minlength=len(self.seen))
        return logits


class CountsCalls(Table):
    """A buffer that changes at every call, without changing a loss."""

    def __init__(self, table):
        super().__init__(table)
        self.register_buffer("calls", torch.zeros(()))

    def logits(self, x, y):
        self.calls += 1
        return super().logits(x, y)


@pytest.mark.slow
def test_a_model_that_reads_its_targets_fails(tok, middle_choices):
    table = frequencies(val_targets(tok)[1], tok.get_vocab_size(), 1.0)
    prepare.check_evaluation(Table(table), tok, 4)  # the honest model passes
    caught(lambda: prepare.check_evaluation(ReadsTargets(table, "same"), tok, 4), "the model reads its targets: at "
           "position", "more than 1")
    caught(lambda: prepare.evaluate_bpb(ReadsTargets(table, "earlier"), tok, 4), "the model reads its targets: its "
           "loss at position", "when only the targets at other positions changed")


def test_the_checked_batch_is_random_so_a_leak_cannot_skip_it(tok, monkeypatch):
    x, _ = val_targets(tok)
    model = LeaksExceptOnOneBatch(frequencies(x, tok.get_vocab_size(), 1.0), honest_start=x[3, :16])
    monkeypatch.setattr(ledger, "choose", lambda n: 0)  # a check on the first batch, as it used to be: passes
    prepare.check_evaluation(model, tok, 4)
    prepare.evaluate_bpb(model, tok, 4)
    monkeypatch.setattr(ledger, "choose", lambda n: n - 1)  # any other batch: caught
    caught(lambda: prepare.evaluate_bpb(model, tok, 4), "the model is not causal")


@pytest.mark.slow
def test_every_batch_is_equally_likely_whatever_the_seed(tok, monkeypatch):
    """The choice comes from os.urandom: torch's seed (train.py sets it) does not fix it."""
    checked, real = [], prepare._check_causal

    def spy(model, x, *args):
        checked.append(tuple(x[0, :16].tolist()))  # which batch: by its first row
        return real(model, x, *args)

    monkeypatch.setattr(prepare, "_check_causal", spy)
    x, _ = val_targets(tok)
    model = Table(frequencies(x, tok.get_vocab_size(), 1.0))
    for _ in range(100):
        torch.manual_seed(0)
        prepare.check_evaluation(model, tok, 4)
    batches = {tuple(x[start, :16].tolist()) for start in range(0, N, 4)}
    assert set(checked) == batches, "every batch of the 8 gets checked (a miss has odds of 8 * (7/8)^100 = 1e-5)"
    assert len(set(checked[:20])) > 1, "not one fixed batch under a fixed torch seed"


def test_a_model_that_learns_while_it_is_scored_fails(tok, middle_choices):
    x, y = val_targets(tok)
    guess = frequencies(y, tok.get_vocab_size(), 1.0)
    caught(lambda: prepare.check_evaluation(Remembers(guess), tok, 4), "the model learns while it is scored")
    caught(lambda: prepare.evaluate_bpb(Remembers(guess), tok, 4), "the model learns while it is scored")
    caught(lambda: prepare.evaluate_bpb(CountsCalls(guess), tok, 4), "the model's weights changed during the "
                                                                      "evaluation (calls)")
    model = Table(guess)
    model.calls = 0  # legitimate: a Python counter (logging), not a weight and not in the losses
    assert math.isfinite(prepare.evaluate_bpb(model, tok, 4))


# =============================================================================
# The step-0 check: weights come from the code
# =============================================================================


@pytest.mark.slow
def test_fresh_weights_pass_and_weights_that_know_the_data_fail(tok, middle_choices, sdpa_backend):
    """A run's step-0 check: a fresh model, a zero-init head, another init scale and even a unigram
    guess fitted on the very targets scored pass (none beats their unigram entropy); a model that
    has learned their context (here a bigram fitted on them, as weights from an earlier run) fails."""
    x, y = val_targets(tok)
    vocab = tok.get_vocab_size()

    def step_0(model):
        ledger.reset()
        ledger.start_training(4 * T, T)  # a run's loader exists, no row drawn yet
        prepare.check_evaluation(model, tok, 4)
        return ledger._ledger.fresh is not None

    fresh = tiny_model(vocab_size=vocab, sequence_len=T)
    zero_head, larger_init = tiny_model(vocab_size=vocab, sequence_len=T), tiny_model(vocab_size=vocab, sequence_len=T)
    torch.nn.init.zeros_(zero_head.lm_head.weight)
    torch.nn.init.normal_(larger_init.lm_head.weight, std=0.05)
    for model in (fresh, zero_head, larger_init, Table(frequencies(y, vocab))):
        assert step_0(model)
    caught(lambda: step_0(Table(bigram(x, y, vocab))), "the weights do not come from the code: before any "
                                                       "training the model's loss is")
    ledger.reset()  # outside a run the step-0 check does not apply: the same model is just causal
    prepare.check_evaluation(Table(bigram(x, y, vocab)), tok, 4)

# =============================================================================
# The loader: training rows only, counted
# =============================================================================


def test_the_training_loader_refuses_validation_and_counts_what_it_hands_out(tok):
    caught(lambda: prepare.make_dataloader(tok, 4, 64, "val", device="cpu"), "validation split is for evaluate_bpb "
                                                                             "only")
    counted = prepare.make_dataloader(tok, 4, 64, "train", device="cpu")
    plain = prepare._packed_rows(tok, 4, 64, "train", device="cpu")
    for _ in range(5):
        (a, b, _), (c, d, _) = next(counted), next(plain)
        assert torch.equal(a, c) and torch.equal(b, d), "counting changes no row"
    assert ledger._ledger.rows == 20
    caught(lambda: prepare.make_dataloader(tok, 4, 64, "train", device="cpu", total_batch_size=100),
           "total_batch_size=100 must be TOTAL_BATCH_SIZE, a whole multiple of the row length 64")

# =============================================================================
# The data: held for the run, and the validation split never in training
# =============================================================================


def cache_stamps(root):
    return {path: os.stat(path).st_mtime_ns for path in map(str, root.rglob("*")) if os.path.isfile(path)}


@pytest.mark.slow
def test_a_run_measures_the_data_its_identity_lines_name(tok, tmp_path, middle_choices):
    """prepare.py re-importing other data and retraining the tokenizer while a run trains: the run's
    number is still its data's (held since verify_data), and the run stops at its evaluation, since it
    trained on changed shards. Runs only read the cache: another run starting meanwhile changes nothing."""
    fingerprints = prepare.verify_data()
    before = cache_stamps(tmp_path / "cache")
    model = Table(frequencies(val_targets(tok)[1], tok.get_vocab_size(), 1.0))
    expected = prepare.evaluate_bpb(model, tok, 8)
    ledger._ledger.evaluations.clear()
    ledger.start_training(2 * T, T)
    ledger.record_fresh_check([])
    for _ in range(2 * (constants.UNTIMED_STEPS + 1)):
        ledger._hand_out(1)  # the run trains into its timed steps
    assert prepare.verify_data() == fingerprints, "another run starting on the same cache"
    assert cache_stamps(tmp_path / "cache") == before, "runs only read the cache"

    other = tmp_path / "other"
    other.mkdir()
    for i in range(3):
        write_parquet(other / f"part_{i}.parquet", corpus_documents(400, seed=50 + i), row_group_size=100)
    write_parquet(other / "zz_val.parquet", corpus_documents(300, seed=60), row_group_size=100)
    prepare.prepare(source=str(other))
    prepare.prepare(source=str(other), retrain_tokenizer=True)
    caught(lambda: ledger.evaluation_begins(final=True), "the data changed on disk during this run",
           "prepare.py ran on this cache")
    ledger.restart_training()  # the evaluation alone, outside the run's checks: on the rows held
    assert prepare.evaluate_bpb(model, tok, 8) == expected
    ledger.reset()  # without them, the same call measures the new data: the number would have moved
    assert prepare.evaluate_bpb(model, prepare.Tokenizer.from_directory(), 8) != expected
    assert fingerprints["val"] != prepare.verify_data()["val"]


def test_a_validation_shard_copied_into_training_is_refused(tok):
    val = paths.shard_path(paths.VAL_SHARD)
    copy = paths.shard_path(3)
    shutil.copy2(val, copy)
    with pytest.raises(prepare.PrepareError, match=f"the training shard {copy} is a copy of the validation shard"):
        prepare.verify_data()
    with pytest.raises(prepare.PrepareError, match="is a copy of the validation shard"):
        prepare.prepare()
    os.remove(copy)
    shutil.copy2(paths.shard_path(0), copy)  # a copy of a training shard is only more training data
    manifest.check_val_not_training(val, files.sha256(val), prepare.list_shards("train"))

# =============================================================================
# Edits an agent makes, run end to end (smoke): each stops the run with its line, or passes
# =============================================================================


def fail_line(result):
    lines = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 1 and len(lines) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "\nval_bpb:" not in result.stdout, result.stderr[-2000:]
    return lines[0]


TRAIN_STEP_LOOP = """    for _ in range(grad_accum_steps):
        x, y, epoch = next(batches)
        with autocast:
            loss = model(x, y)
        (loss / grad_accum_steps).backward()
"""
LEGITIMATE_TRAIN_STEP = """    losses = []  # rewritten accumulation (one backward), a custom loss on the per-token losses
    for _ in range(grad_accum_steps):
        x, y, epoch = next(batches)
        with autocast:
            per_token = model(x, y, reduction="none")
        losses.append(per_token.mean() + 1e-4 * per_token.square().mean())
    loss = torch.stack(losses).mean()
    loss.backward()
    if step < UNTIMED_STEPS:  # an extra untimed forward pass, for logging
        with torch.no_grad(), autocast:
            print(f"log: step {step}, loss {model(x, y).item():.4f}")
"""
SUMMARY = "    report.print_summary(["


@pytest.mark.slow
def test_legitimate_edits_pass_and_a_warm_start_from_their_weights_fails(tmp_path, prepared_cache):
    weights = tmp_path / "weights.pt"
    (tmp_path / "first").mkdir()
    result = run_edited(tmp_path / "first", prepared_cache, {"train.py": [
        (TRAIN_STEP_LOOP, LEGITIMATE_TRAIN_STEP),
        ("std=0.001)", "std=0.01)"),  # another init scale for lm_head
        (SUMMARY, f"    torch.save(model.state_dict(), {str(weights)!r})\n{SUMMARY}"),
    ]})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "log: step 10, loss" in result.stdout and "\nval_bpb:" in result.stdout
    (tmp_path / "second").mkdir()
    result = run_edited(tmp_path / "second", prepared_cache, {"train.py": [
        ("    model.init_weights(seed)\n",
         f"    model.init_weights(seed)\n    model.load_state_dict(torch.load({str(weights)!r}))  # a warm start\n")]})
    assert fail_line(result).startswith("FAIL: the weights do not come from the code")
    assert "step 00001" not in result.stdout


@pytest.mark.slow
def test_the_causality_check_replaced_at_import_stops_the_run(tmp_path, prepared_cache):
    result = run_edited(tmp_path, prepared_cache, {"train.py": [(
        "from autoresearch.attention import attention  #",
        "import prepare\nprepare._check_causal = lambda *args: None  # an eager edit\n"
        "from autoresearch.attention import attention  #")]})
    assert fail_line(result).startswith("FAIL: prepare._check_causal is not the function prepare.py defines")


@pytest.mark.slow
def test_evaluating_several_times_stops_the_run(tmp_path, prepared_cache):
    """Picking the best of several evaluations (a temperature, a checkpoint) is choosing on validation."""
    result = run_edited(tmp_path, prepared_cache, {"train.py": [(
        "        val_bpb = evaluate_bpb(gpu.evaluation_model(model), tokenizer, micro_batch)\n",
        "        val_bpb = min(evaluate_bpb(gpu.evaluation_model(model), tokenizer, micro_batch) for _ in range(3))\n")]})
    assert fail_line(result).startswith("FAIL: evaluate_bpb ran a second time in this run")


@pytest.mark.slow
def test_extra_warm_up_steps_stop_the_run(tmp_path, prepared_cache):
    """An extra training step inside every untimed step: more rows than the budget's steps."""
    line = "        train_loss, epoch = train_step(model, optimizer, batches, grad_accum_steps, step, progress, autocast)\n"
    result = run_edited(tmp_path, prepared_cache, {"train.py": [(
        line, line + "        if step < UNTIMED_STEPS:  # an eager edit: free extra steps\n    " + line)]})
    assert fail_line(result).startswith(f"FAIL: training drew more than SMOKE_STEPS={constants.SMOKE_STEPS} steps")
