"""
The evaluation's machinery behind prepare.evaluate_bpb. DO NOT MODIFY.

prepare.py reads as the metric: which rows are scored, how the bits are counted,
and the causality check. What it calls lives here: the batches (full ones, wrapping
around past the last row), the per-token losses, the tolerance two runs of the
same computation may differ by, and the checks beyond causality:

- check_targets: a model may not read its targets;
- check_rescored: the checked batch, scored again at the end, gives the same losses
  (no learning while scored);
- check_unchanged: parameters and buffers keep their fingerprints through an evaluation;
- check_fresh: at step 0, the weights come from the code (no warm start).

A failed check raises EvaluationFailed: one "FAIL: " line, exit code 1. Imported by
prepare.py only; imports autoresearch.ledger (its random choices and fingerprints).
"""

import torch

from autoresearch import ledger

# Evaluation: its checks compare per-token losses (nats) of one batch before and
# after some of its tokens change. Deterministic kernels give identical losses;
# the tolerance covers a few bf16 rounding steps.
CAUSAL_ATOL, CAUSAL_RTOL = 0.02, 0.01 # allowed change: ATOL + RTOL * |loss|
TARGET_SHARE = 8                      # the targets check changes the target alone at 1 position in 8
RESCORE_MEAN_ATOL = 1e-3              # nats: a batch scored twice may drift this much on average
# The step-0 check: before any training a model's mean loss over the first validation
# batches (FRESH_TOKENS targets or more) may not be below their unigram entropy.
FRESH_TOKENS = 65_536
FRESH_MARGIN = 0.02                   # nats: summation error (no frequency guess is below the entropy)


class EvaluationFailed(ledger.Failed):
    """The metric refuses the model. Uncaught, it prints its one line, which
    starts with "FAIL: ", and exits with code 1: a failed run, never a score."""


def eval_batch(rows, start, batch_size, device):
    """Rows start, start+1, ... of (N, T+1) rows as (x, y) on device, both
    (batch_size, T) int64, and how many of them are real. Every batch is full:
    past the last row it wraps around to the first, so a model compiled for
    batch_size never sees another shape; the caller drops the padding's losses."""
    index = torch.arange(start, start + batch_size, device=rows.device) % rows.shape[0]
    batch = rows[index].to(device).long()  # (B, T+1)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), min(batch_size, rows.shape[0] - start)


def token_losses(model, x, y):
    """model(x, y, reduction='none') as (B, T) float32 nats, detached: the model
    may return them with gradients (its training graph) or in bf16."""
    loss = model(x, y, reduction="none")
    if not isinstance(loss, torch.Tensor) or loss.numel() != x.numel():
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise EvaluationFailed(f"model(x, y, reduction='none') must return the {x.numel()} per-token losses of "
                               f"x {tuple(x.shape)}, got {got}")
    return loss.detach().float().reshape(x.shape)


def tolerance(losses):
    """How much a loss may move between two runs of the same computation (bf16 rounding)."""
    return CAUSAL_ATOL + CAUSAL_RTOL * losses.abs()


def worst_change(new, losses, may_change):
    """(row, position, nats) of the largest change from losses to new beyond the tolerance,
    outside may_change (a (B, T) bool mask); None when there is none. NaN losses are the
    finiteness check's to report, not this one's."""
    change = (new - losses).abs().masked_fill(may_change, 0.0)  # (B, T)
    excess = (change - tolerance(losses)).nan_to_num(nan=0.0)
    worst = int(excess.argmax())
    if excess.view(-1)[worst] <= 0:
        return None
    return (*divmod(worst, losses.shape[1]), float(change.view(-1)[worst]))


def check_targets(model, x, y, losses, vocab_size):
    """A model may not read its targets: in a row chosen at random, change the targets
    alone at a random one in TARGET_SHARE of its positions (Q) and run the batch again.
    Every other loss must stay within the tolerance (targets read as inputs move the
    later positions), and at each position of Q the old and the new target's
    probabilities, exp(-loss), may not add up to more than 1 (a model that sees the
    token it is scored on gives any target a high probability)."""
    B, T = x.shape
    r, generator = ledger.choose(B), torch.Generator().manual_seed(ledger.choose(2**62))
    picked = torch.rand(T, generator=generator) < 1 / TARGET_SHARE
    picked[ledger.choose(T)] = True  # at least one
    q = picked.nonzero().squeeze(1).to(y.device)
    y2 = y.clone()
    y2[r, q] = (y[r, q] + torch.randint(1, vocab_size, (len(q),), generator=generator).to(y.device)) % vocab_size
    losses2 = token_losses(model, x, y2)
    worst = worst_change(losses2, losses, y2 != y)
    if worst is not None:
        check_rescored(model, x, y, losses)
        row, pos, nats = worst
        where = f"position {pos}" if row == r else f"position {pos} of another row of the batch"
        raise EvaluationFailed(f"the model reads its targets: its loss at {where} changed by {nats:.3g} nats when "
                               f"only the targets at other positions changed (targets go to the loss, never into "
                               f"the model's inputs)")
    a, b = losses[r, q], losses2[r, q]
    both = (torch.exp(-(a + tolerance(a))) + torch.exp(-(b + tolerance(b)))).nan_to_num(nan=0.0)
    worst = int(both.argmax())
    if both[worst] > 1:
        check_rescored(model, x, y, losses)
        total = float(torch.exp(-a[worst]) + torch.exp(-b[worst]))
        raise EvaluationFailed(f"the model reads its targets: at position {int(q[worst])} the target and another "
                               f"token get probabilities that add up to {total:.3g}, more than 1 (a model may not "
                               f"see the token it is scored on)")


def check_rescored(model, x, y, losses):
    """A model may not learn while it is scored: the checked batch, scored again at the
    end of the evaluation, must give the same losses, each within the tolerance and
    their mean within RESCORE_MEAN_ATOL (rounding averages out; a drift does not).
    State carried from one batch to the next (dynamic evaluation) changes them. (The
    other checks run it too before they fail, so such a model is named for what it does.)"""
    again = token_losses(model, x, y)
    worst = worst_change(again, losses, torch.zeros_like(losses, dtype=torch.bool))
    drift = float((again - losses).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).mean())
    if worst is not None or abs(drift) > RESCORE_MEAN_ATOL:
        moved = f"up to {worst[2]:.3g} nats" if worst is not None else f"{drift:+.3g} nats on average"
        raise EvaluationFailed(f"the model learns while it is scored: a batch scored again at the end of the "
                               f"evaluation moved by {moved} (state carried from batch to batch, or weights "
                               f"updated during the evaluation?)")


def check_unchanged(state, before):
    """The model's parameters and buffers, [(name, tensor)], still have the fingerprints `before`."""
    after = ledger.fingerprint([t for _, t in state])
    changed = [name for (name, _), a, b in zip(state, before, after) if not torch.equal(a, b)]
    if changed:
        raise EvaluationFailed(f"the model's weights changed during the evaluation ({', '.join(changed[:3])}"
                               f"{' ...' if len(changed) > 3 else ''}): it may not learn from the validation rows")


def check_fresh(model, rows, batch_size, vocab_size, device):
    """The step-0 check: the weights come from the code. Before its first training step
    a model can know the targets' frequencies at best (a zero-init head, a learned
    unigram bias), not their context: its mean loss over the first batches (at least
    FRESH_TOKENS targets, or all rows) may not be below the unigram entropy of those
    very targets, the least loss of any frequency guess, by more than FRESH_MARGIN.
    A warm start from an earlier run's weights is below it."""
    T = rows.shape[1] - 1
    n_batches = min(-(-FRESH_TOKENS // (batch_size * T)), -(-rows.shape[0] // batch_size))
    nats = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(vocab_size, dtype=torch.int64, device=device)
    for i in range(n_batches):
        x, y, n = eval_batch(rows, i * batch_size, batch_size, device)
        nats += token_losses(model, x, y)[:n].sum(dtype=torch.float64)
        counts += torch.bincount(y[:n].reshape(-1), minlength=vocab_size)
    share = counts[counts > 0].double() / counts.sum()
    entropy, loss = float(-(share * share.log()).sum()), float(nats / counts.sum())
    if loss < entropy - FRESH_MARGIN:
        raise EvaluationFailed(f"the weights do not come from the code: before any training the model's loss is "
                               f"{loss:.3f} nats, below the {entropy:.3f} nats of the best guess from token "
                               f"frequencies alone, which no fresh model beats (weights loaded from an earlier "
                               f"run?); start from the code's initialisation")
