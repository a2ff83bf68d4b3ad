"""
Fixed rules of the game. DO NOT MODIFY.

Every experiment is compared with every other under these numbers: the
context length, the wall-clock training budget and the size of the
validation set that `val_bpb` is measured on. `prepare.py` and `train.py`
import them; agents never change them.

One switch, for smoke runs only: `AUTORESEARCH_SMOKE=1` shrinks all three so
the whole pipeline (prepare -> train -> evaluate) runs in a minute or two on
a laptop CPU. Without it nothing here changes. Numbers from a smoke run are
not comparable with real runs and must never be reported as results. It reads
like every AUTORESEARCH_* switch (autoresearch/environment.py): 1/true/yes/on, or
0/false/no/off, empty or unset (any case); anything else stops with one line.
"""

from autoresearch.environment import switch

# =============================================================================
# The contract (do not modify)
# =============================================================================

MAX_SEQ_LEN = 2048          # context length in tokens
TIME_BUDGET = 300           # seconds of training, wall clock, compile excluded
EVAL_TOKENS = 40 * 524288   # validation tokens behind val_bpb (20,971,520)
UNTIMED_STEPS = 11          # steps 0..10 compile and warm up: not counted in the budget

# =============================================================================
# Smoke switch (for people and tests without a GPU; its numbers are not comparable)
# =============================================================================

SMOKE = switch("AUTORESEARCH_SMOKE", False)
SMOKE_STEPS = 20            # a smoke run trains this many steps (its budget), not TIME_BUDGET seconds

if SMOKE:
    MAX_SEQ_LEN = 256
    TIME_BUDGET = 10
    EVAL_TOKENS = 32 * 256
