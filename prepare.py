"""
The contract: what decides val_bpb (the tokenizer, the best-fit packing loader,
the evaluation and its causality check), verify_data, and the one-time preparation that
makes the data. DO NOT MODIFY: this file, constants.py and autoresearch/ are the
fixed harness. Agents edit train.py only; the data, the tokenizer and val_bpb
must stay comparable.

    uv run prepare.py                       # 10 training shards + the pinned val shard
    uv run prepare.py --num-shards -1       # all 6,542 training shards
    uv run prepare.py --source ~/my_corpus  # your own data, offline
    uv run prepare.py --source ~/repo --text-ext py,rs   # code too, one document per file

It fills the cache root (~/.cache/autoresearch, or $AUTORESEARCH_CACHE; the
layout is in autoresearch/paths.py). A run killed at any moment leaves nothing
a later run trusts, a second run with nothing to do changes nothing, and one
run at a time holds the cache.

The machinery behind it (downloads, the --source import, file safety, token
caches, manifests, the evaluation's other checks in scoring.py) lives in
autoresearch/, one concern per module, listed in its __init__.py; agents need
not read it.

API used by train.py: Tokenizer, make_dataloader, verify_data (checks everything
val_bpb depends on, before training), check_evaluation, evaluate_bpb.
"""

if __name__ == "__main__":  # --help, or a bad flag, answers before the imports below (torch takes seconds)
    from autoresearch.command_line import parse_arguments
    parse_arguments()

import bisect
import hashlib
import io
import itertools
import math
import os
import pickle
import time

import numpy as np
import torch

from autoresearch import files, ledger, manifest, paths, scoring, tokencache
from autoresearch.command_line import parse_arguments
from autoresearch.files import RUN_PREPARE, PrepareError, open_parquet, read_json, read_texts, stamp
from autoresearch.paths import list_shards
from autoresearch.prefetch import prefetch
from autoresearch.scoring import EvaluationFailed
from autoresearch.source import ensure_data
from autoresearch.tokenizer_training import ensure_tokenizer
from constants import EVAL_TOKENS, MAX_SEQ_LEN

# =============================================================================
# Constants this file owns
# =============================================================================
# Data: shards shard_00000 ... shard_06542 of the Hugging Face dataset
# karpathy/climbmix-400b-shuffle (autoresearch/download.py). The last is the pinned
# validation split, every other shard present is training (autoresearch/paths.py).

# Tokenizer: BPE trained on the training shards (autoresearch/tokenizer_training.py).
VOCAB_SIZE = 8192                     # learned merges + special tokens
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]  # ids after the merges
BOS_TOKEN = SPECIAL_TOKENS[0]
# GPT-4's split pattern, except numbers are grouped in runs of 1-2 digits (not 1-3).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_DOC_CHARS = 10_000          # documents are capped at this many characters
TOKENIZER_MAX_CHARS = 1_000_000_000   # and training stops after this many in total

# Dataloader (the published algorithm's numbers).
BUFFER_DOCS = 1000                    # refill the buffer to this many documents
DOC_BATCH = 128                       # documents per tokenization batch


# =============================================================================
# Tokenizer
# =============================================================================


class Tokenizer:
    """Thin wrapper around a tiktoken.Encoding trained by prepare.py."""

    def __init__(self, enc, tokenizer_id=None):
        self.enc = enc
        self.id = tokenizer_id  # keys the token cache; None: no cache
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        tokenizer_dir = tokenizer_dir or paths.TOKENIZER_DIR
        recorded = read_json(os.path.join(tokenizer_dir, "manifest.json"))
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if recorded is None or not os.path.exists(path):
            raise PrepareError(f"no tokenizer in {tokenizer_dir}: {RUN_PREPARE}")
        with open(path, "rb") as f:
            blob = f.read()
        tokenizer_id = hashlib.sha256(blob).hexdigest()[:16]
        if tokenizer_id != recorded.get("id"):
            raise PrepareError(f"tokenizer in {tokenizer_dir} does not match its manifest: {RUN_PREPARE}")
        return cls(pickle.loads(blob), tokenizer_id)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """str -> list of ids; list of str -> list of lists (encoded in threads).
        prepend: a token id or a special-token string placed first."""
        if prepend is not None:
            prepend_id = prepend if isinstance(prepend, int) else self.enc.encode_single_token(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if prepend is not None:
                ids.insert(0, prepend_id)
        elif isinstance(text, list):
            ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            if prepend is not None:
                for row in ids:
                    row.insert(0, prepend_id)
        else:
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        return ids

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu"):
    """int32 [vocab]: raw bytes each token stands for (0 for special tokens).
    Checked against the hash in the tokenizer manifest before it is trusted: a
    changed byte here silently rescales val_bpb."""
    path = os.path.join(paths.TOKENIZER_DIR, "token_bytes.pt")
    recorded = read_json(os.path.join(paths.TOKENIZER_DIR, "manifest.json"))
    if not os.path.exists(path) or recorded is None:
        raise PrepareError(f"no token_bytes.pt in {paths.TOKENIZER_DIR}: {RUN_PREPARE}")
    with open(path, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest()[:16] != recorded.get("token_bytes"):
        raise PrepareError(f"{path} differs from the one prepare.py recorded: run `uv run prepare.py` to rebuild it")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True).to(device)

# =============================================================================
# Dataloader: best-fit packing, same rows as the published algorithm
# =============================================================================


def _document_batches(tokenizer, shards, split):
    """(tokens, offsets, epoch) for every batch of DOC_BATCH documents, in the
    published order: shard -> row group -> 128-document batch, forever. A batch
    is the documents tokens[offsets[j]:offsets[j+1]], each starting with BOS.
    Cached shards are read from the token cache, others tokenized on the fly."""
    bos = tokenizer.get_bos_token_id()
    epoch = 1
    while True:
        n_docs = 0
        for path in shards:
            cached = tokencache.load_token_cache(tokenizer, path)
            if cached is not None:
                tokens, offsets, row_groups = cached
                first = 0
                for count in row_groups:
                    for a in range(first, first + count, DOC_BATCH):
                        b = min(a + DOC_BATCH, first + count)
                        yield tokens, offsets[a:b + 1], epoch
                    first += count
                n_docs += first
                continue
            pf = open_parquet(path)
            for rg in range(pf.num_row_groups):
                texts = read_texts(pf, rg)
                for a in range(0, len(texts), DOC_BATCH):
                    ids = tokenizer.encode(texts[a:a + DOC_BATCH], prepend=bos)
                    lengths = [len(x) for x in ids]
                    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16, count=sum(lengths))
                    yield tokens, np.cumsum([0] + lengths), epoch
                n_docs += len(texts)
        if n_docs == 0:
            raise PrepareError(f"the {split} split has no documents ({len(shards)} shards, all empty)")
        epoch += 1


class BestFitPacker:
    """Best-fit packing (the published loader's algorithm), in O(log n) per step.

    Rows of T+1 tokens are filled left to right. Before each placement the
    buffer is refilled (whole 128-document batches) to at least BUFFER_DOCS
    documents. Then the largest document that fits in the remaining space is
    placed whole; if none fits, the shortest is cropped to fill the row exactly
    (the rest of it is dropped). Ties go to the document that entered the
    buffer first. The published loader scans a list for this; here the buffer
    is a sorted list of (length, arrival) keys searched with bisect, and tokens
    are copied as numpy slices, which gives the same rows far faster."""

    def __init__(self, batches):
        self.batches = tokencache.replay_small_split(batches, BUFFER_DOCS)  # of (tokens, offsets, epoch)
        self.keys = []          # sorted (length, arrival)
        self.docs = {}          # arrival -> (tokens, start)
        self.arrivals = 0
        self.epoch = 1

    def _refill(self):
        tokens, offsets, self.epoch = next(self.batches)
        offsets = offsets.tolist()
        for start, end in zip(offsets[:-1], offsets[1:]):
            bisect.insort(self.keys, (end - start, self.arrivals))
            self.docs[self.arrivals] = (tokens, start)
            self.arrivals += 1

    def _select(self, remaining):
        """Index in self.keys of the document to place, and how many tokens to take."""
        keys = self.keys
        i = bisect.bisect_right(keys, (remaining, math.inf)) - 1
        if i >= 0:  # largest that fits; the earliest arrival among equal lengths
            length = keys[i][0]
            return bisect.bisect_left(keys, (length, -1)), length
        return 0, remaining  # none fits: the shortest (earliest first), cropped

    def fill(self, rows):
        """Fill rows (R, T+1) in place; returns the epoch of the last batch fetched."""
        capacity = rows.shape[1]
        for row in rows:
            pos = 0
            while pos < capacity:
                while len(self.keys) < BUFFER_DOCS:
                    self._refill()
                i, take = self._select(capacity - pos)
                _, arrival = self.keys.pop(i)
                tokens, start = self.docs.pop(arrival)
                row[pos:pos + take] = tokens[start:start + take]
                pos += take
        return self.epoch


def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_dataloader(tokenizer, B, T, split, device=None, total_batch_size=None):
    """Infinite iterator of (inputs, targets, epoch) of the training split: B x T
    int64 on device (default CUDA when present, else CPU); inputs = row[:-1],
    targets = row[1:].

    A background thread packs rows ahead while the model runs (autoresearch/
    prefetch.py); every yielded tensor is freshly allocated, so a caller may
    keep a batch across next(). The harness counts the rows it hands out, and
    when (autoresearch/ledger.py): with total_batch_size=TOTAL_BATCH_SIZE it is
    a run's loader, whose first UNTIMED_STEPS steps of rows are untimed and whose
    later rows fall in the budget. The validation split is the evaluation's
    alone: asking for it here stops the run."""
    if split == "val":
        raise ledger.Failed("make_dataloader(..., 'val'): the validation split is for evaluate_bpb only, never "
                            "for training; use 'train'")
    assert split == "train", f"split must be 'train', got {split!r}"
    loader = _packed_rows(tokenizer, B, T, split, device)
    if total_batch_size is not None:
        ledger.start_training(total_batch_size, T)
    return ledger.counted(loader, B)


def _packed_rows(tokenizer, B, T, split, device=None):
    """The loader of either split, uncounted: make_dataloader's insides (the tests
    read the validation split through it; the evaluation reads val_rows)."""
    assert B >= 1 and T >= 1, f"B and T must be positive, got B={B}, T={T}"
    shards = list_shards(split)  # fails here, clearly, when nothing is prepared
    device = torch.device(device) if device is not None else _default_device()
    packer = BestFitPacker(_document_batches(tokenizer, shards, split))
    return prefetch(packer.fill, B, T, device)

# =============================================================================
# Evaluation: the metric (DO NOT MODIFY)
# =============================================================================
# val_bpb is computed on the first EVAL_TOKENS // MAX_SEQ_LEN rows the validation
# loader produces at T = MAX_SEQ_LEN, whatever the batch size. prepare.py stores
# those rows (tokens/<id>/val_rows_T{T}_N{N}.npy, with their sha256 in the .json);
# when missing they are packed on the fly: same rows, same number. verify_data()
# holds them and token_bytes.pt in memory for the run. The model must show that it
# is causal, reads no targets and learns nothing while it is scored; a result that
# is not a finite number is a failure, never a score. The result goes to the
# harness's ledger (autoresearch/ledger.py), from which the summary prints it.


def build_val_rows(tokenizer, T, N):
    """The first N rows (N, T+1) of the validation loader, packed directly."""
    rows = np.empty((N, T + 1), dtype=np.uint16)
    BestFitPacker(_document_batches(tokenizer, list_shards("val"), "val")).fill(rows)
    return rows


def val_rows(tokenizer, T, N, save=True):
    """Validation rows from the cache when valid; else packed now (and cached when save)."""
    rows = tokencache.cached_val_rows(tokenizer, T, N)
    if rows is not None:
        return rows
    val_stamp = stamp(list_shards("val")[0])
    rows = build_val_rows(tokenizer, T, N)
    if save:
        tokencache.save_val_rows(tokenizer, T, N, rows, val_stamp)
    return rows


def _check_causal(model, x, y, losses, vocab_size):
    """A model may not see the future: in a row r chosen at random, change the tokens
    after a position p (inputs and targets), run the same full batch again, and the
    losses at positions <= p of row r, and everywhere in the other rows, must stay
    within scoring.tolerance (a few bf16 rounding steps). Done twice, each in its own
    random row: once with p in the first half of the row, so at least half its tokens
    change and a missing causal mask shows plainly, once with p in the second half, so
    a mask that goes wrong only late in the row shows too. A window that reaches one
    token ahead changes position p."""
    B, T = x.shape
    half = (T - 1) // 2  # p < T - 1: a token after it changes
    for p in [ledger.choose(half), half + ledger.choose(T - 1 - half)] if half else [ledger.choose(T - 1)]:
        r = ledger.choose(B)
        x2, y2 = x.clone(), y.clone()
        x2[r, p + 1:] = (x[r, p + 1:] + 1) % vocab_size  # a different, valid id everywhere after p
        y2[r, p + 1:] = (y[r, p + 1:] + 1) % vocab_size
        may_change = torch.zeros_like(losses, dtype=torch.bool)
        may_change[r, p + 1:] = True  # their own inputs changed
        worst = scoring.worst_change(scoring.token_losses(model, x2, y2), losses, may_change)
        if worst is not None:
            scoring.check_rescored(model, x, y, losses)  # the batch itself moved? then that is the fault to name
            row, pos, nats = worst
            where = f"position {pos}" if row == r else f"position {pos} of another row of the batch (rows must not mix)"
            raise EvaluationFailed(f"the model is not causal: its loss at {where} changed by {nats:.3g} nats when "
                                   f"only the tokens after position {p} changed (a missing causal mask, a window "
                                   f"that reaches ahead, or dropout?)")


@torch.no_grad()
def _evaluate(model, tokenizer, batch_size, final):
    """val_bpb over every validation row (final), or over one batch of them chosen at
    random (check_evaluation); see evaluate_bpb."""
    assert batch_size >= 1, f"batch_size must be positive, got {batch_size}"
    ledger.evaluation_begins(final)  # in a run: the only final one, after training within the budget
    device, vocab_size = next(model.parameters()).device, tokenizer.get_vocab_size()
    T, N = MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN
    held = ledger.held_data(tokenizer.id, T, N)  # what verify_data checked, in memory since
    rows, token_bytes = held if held is not None else (val_rows(tokenizer, T, N), get_token_bytes())
    rows = torch.from_numpy(np.asarray(rows, dtype=np.int32))  # (N, T+1)
    if final:  # every batch reads them; a check moves its batches one at a time
        rows = rows.to(device)
    token_bytes = token_bytes.to(device)
    state = list(itertools.chain(model.named_parameters(), model.named_buffers()))
    before = ledger.fingerprint([t for _, t in state])
    fresh = not final and ledger.fresh_check_due()  # step 0 of a run, before the first training row
    if fresh:
        scoring.check_fresh(model, rows, batch_size, vocab_size, device)
    starts = range(0, N, batch_size)
    checked = ledger.choose(len(starts))  # every batch equally likely: a model cannot tell the checked one
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(len(starts)) if final else [checked]:
        x, y, n = scoring.eval_batch(rows, starts[i], batch_size, device)
        losses = scoring.token_losses(model, x, y)  # (B, T)
        if i == checked:
            _check_causal(model, x, y, losses, vocab_size)
            scoring.check_targets(model, x, y, losses, vocab_size)
            scored = x, y, losses
        nbytes = token_bytes[y[:n]]  # (n, T)
        total_nats += torch.where(nbytes > 0, losses[:n], 0.0).sum(dtype=torch.float64)
        total_bytes += nbytes.sum()
    if final:
        scoring.check_rescored(model, *scored)
    scoring.check_unchanged(state, before)
    if fresh:
        ledger.record_fresh_check([t for _, t in state])
    if total_bytes.item() == 0:
        raise EvaluationFailed("the validation rows hold no bytes to measure")
    bpb = total_nats.item() / (math.log(2) * total_bytes.item())
    if not math.isfinite(bpb):
        raise EvaluationFailed(f"val_bpb is {bpb}: the model's losses on the validation rows are not finite")
    if final:
        ledger.record_evaluation(bpb, T, N, held is not None)
    return bpb


def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte on the validation rows: the summed loss (nats) over target
    tokens that stand for at least one byte, over ln 2 times their bytes.
    Vocabulary-independent; special tokens (0 bytes) are left out of both sums.

    The model is called as model(x, y, reduction='none') on full batches of
    batch_size rows only. One batch, chosen at random, is also run with later
    tokens changed (_check_causal) and with targets changed (scoring.check_targets),
    and scored again at the end (scoring.check_rescored); the model's parameters and
    buffers may not change meanwhile. A model that fails, or a result that is not
    finite, raises EvaluationFailed: one line starting "FAIL: ", exit code 1. In
    a run the result goes to the harness's ledger, and the summary prints it:
    one evaluation a run."""
    return _evaluate(model, tokenizer, batch_size, final=True)


def check_evaluation(model, tokenizer, batch_size):
    """One batch of evaluate_bpb, chosen at random, with its checks, through the
    same code with the same shapes (a compiled model compiles nothing new later),
    for train.py's untimed steps. Returns that batch's bits per byte (a check,
    never the score); raises EvaluationFailed like evaluate_bpb.

    In step 0, after make_dataloader and before the first training row, it is
    also the step-0 check (scoring.check_fresh): the weights must come from the code and
    still be the same when the first row is drawn; a run without it stops at that
    row. The checks see only what the weights let through: at initialisation, with
    zero output projections, attention cannot leak yet, so train.py calls it again
    after the first optimizer steps, and evaluate_bpb checks the trained model."""
    return _evaluate(model, tokenizer, batch_size, final=False)

# =============================================================================
# Verification (train.py calls verify_data before training)
# =============================================================================


def verify_data():
    """Check, by content, everything val_bpb depends on against what prepare.py
    recorded: the validation shard, tokenizer.pkl, token_bytes.pt, every cached
    shard's tokens (structure and sha256), the validation rows; and the harness
    files. Returns the run's fingerprints:
    {"val": short sha, "tokenizer": short id, "train_shards": int, "harness": {file: short sha}}.
    On any failure raises PrepareError: one line naming the file and the command
    that heals it. Cost: one sha256 pass over those files, the token caches in
    parallel threads. What the metric needs (the validation rows, token_bytes.pt)
    stays in memory for the run (autoresearch/ledger.py): prepare.py changing the
    cache meanwhile does not change the run's number."""
    recorded = manifest.read_manifest()
    harness = manifest.check_harness(recorded.get("harness"))
    val_path, train_paths = list_shards("val")[0], list_shards("train")
    val_sha = manifest.check_val_shard(val_path, recorded)
    manifest.check_val_not_training(val_path, val_sha, train_paths)
    tokenizer = Tokenizer.from_directory()  # checks tokenizer.pkl against its manifest
    if tokenizer.id != recorded.get("tokenizer"):
        raise PrepareError(f"the tokenizer in {paths.TOKENIZER_DIR} is not the one prepare.py recorded: "
                           f"run `uv run prepare.py`")
    token_bytes = get_token_bytes()  # checks token_bytes.pt against the tokenizer manifest
    manifest.check_token_cache_files(tokenizer, tokencache.cached_shards(train_paths))
    tokencache.check_read_through(train_paths, recorded.get("read_through"))  # the shards past the cache, by stamp
    T, N = MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN
    rows, problem = tokencache.check_val_rows(tokenizer, T, N)
    if problem == tokencache.NOT_CACHED:
        rows = val_rows(tokenizer, T, N)  # other constants (a smoke run): packed once, from the caches just checked
    elif problem is not None:
        raise PrepareError(f"validation rows {problem}: run `uv run prepare.py` to rebuild them")
    fingerprints = {"val": val_sha[:12], "tokenizer": tokenizer.id[:12], "train_shards": len(train_paths),
                    "harness": harness}
    ledger.hold_data(fingerprints, tokenizer.id, T, N, np.array(rows), token_bytes, train_paths + [val_path])
    return fingerprints


data_fingerprint = verify_data  # the name train.py imported before verify_data existed

# =============================================================================
# prepare: data -> tokenizer -> token cache -> validation rows
# =============================================================================


def prepare(num_shards=10, download_workers=8, source=None, retrain_tokenizer=False, text_ext=()):
    """The whole one-time preparation; returns True when anything changed.
    text_ext: extra extensions --source imports as plain text (".py", ...)."""
    t0 = time.time()
    paths.make_folder(paths.CACHE_DIR)
    changed = ensure_data(num_shards, download_workers, source, text_ext)
    train_paths, val_path = list_shards("train"), list_shards("val")[0]
    for path in train_paths + [val_path]:
        open_parquet(path)  # a corrupt file is named here, not deep in training
    val_sha = manifest.fingerprint_val_shard(val_path)
    manifest.check_val_not_training(val_path, val_sha, train_paths)
    tokencache.check_val_bytes(val_path, EVAL_TOKENS, MAX_SEQ_LEN)  # too small even as bytes: no tokenizer trains

    changed |= ensure_tokenizer(train_paths, retrain_tokenizer, vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                pattern=SPLIT_PATTERN, doc_chars=TOKENIZER_DOC_CHARS, max_chars=TOKENIZER_MAX_CHARS)
    tokenizer = Tokenizer.from_directory()

    changed |= tokencache.ensure_token_cache(tokenizer, tokencache.cached_shards(train_paths))
    tokencache.check_val_split(tokenizer, val_path, EVAL_TOKENS, MAX_SEQ_LEN)  # refuses one too small for val_bpb
    T, N = MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN
    rows, problem = tokencache.check_val_rows(tokenizer, T, N)
    if problem not in (None, tokencache.NOT_CACHED):
        print(f"val rows: {problem}; rebuilding them", flush=True)
    if changed or rows is None:
        val_rows(tokenizer, T, N)
        changed = True
    print(f"val rows: {N} rows of {T + 1} tokens cached", flush=True)

    changed |= manifest.record_fingerprints(val_path, val_sha, tokenizer, train_paths)
    if changed:
        print(f"prepare: done in {time.time() - t0:.1f} s  (val {val_sha[:12]}, tokenizer {tokenizer.id[:12]}, "
              f"{len(train_paths)} training shards) in {paths.CACHE_DIR}", flush=True)
    else:
        print(f"prepare: nothing to do, everything is up to date in {paths.CACHE_DIR}", flush=True)
    return changed

# =============================================================================
# Command line
# =============================================================================


def main(argv=None):
    args = parse_arguments(argv)  # the flags and their checks: autoresearch/command_line.py
    root = paths.CACHE_DIR
    with files.one_line_errors(root):  # Ctrl-C: exit 130; OS errors: one line; temporaries removed
        paths.make_folder(root)
        with files.cache_lock(root):
            files.sweep_stale_temporaries(root)
            prepare(args.num_shards, args.download_workers, args.source, args.retrain_tokenizer, args.text_ext)


if __name__ == "__main__":
    main()
