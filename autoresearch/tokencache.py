"""
The token cache: every cached shard tokenized once, at prepare time, and the
stored validation rows behind val_bpb. It holds how both are written, checked
(structure on every load, sha256 when asked) and read back, the checks that
the validation split is large enough (by bytes before a tokenizer exists, by
tokens after), the training shards past the cache's span (read through once,
then known by size and mtime), and the in-memory replay of a split too small
for the packer's buffer; what goes into them (the tokenizer, the packing) is
prepare.py's. DO NOT MODIFY (fixed harness).

Per shard, under tokens/<tokenizer id>/ (the id is a hash of tokenizer.pkl, so a
new tokenizer never reads old tokens):

    NAME.tokens.npy   uint16, all documents back to back, each with BOS in front
    NAME.offsets.npy  int64 [docs + 1], where each document starts
    NAME.json         written last: the shard's size and mtime, docs per row group,
                      the token count and the sha256 of both .npy files

The row-group counts let the loader rebuild the published 128-document batches
(which restart at every row group) exactly. The validation rows are
val_rows_T{T}_N{N}.npy beside them, with the val shard's stamp and their
sha256 in the .json written after them: no json, no trust.

Imported by prepare.py (and its tests); it imports autoresearch.files and
autoresearch.paths. A tokenizer here is prepare.Tokenizer, passed in.
"""

import itertools
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from autoresearch import paths
from autoresearch.files import (PrepareError, open_parquet, read_json, read_texts, sha256, stamp, write_atomic,
                                write_json)

TOKEN_CACHE_SHARDS = 16               # training shards tokenized at prepare time (~1B
                                      # ClimbMix tokens); later ones tokenize on the fly
NOT_CACHED = "not cached"  # the one problem that is no fault: prepare.py has not tokenized the shard
# The validation split: val_bpb scores EVAL_TOKENS tokens of it, cycling a
# smaller split. Below this fraction (each token scored 100+ times; 209,715
# tokens, ~0.8 MB of text, on the real contract) or below one full row, the
# number would measure a handful of documents, so prepare refuses the split.
MIN_VAL_FRACTION = 0.01
# Shards are checked in threads (hashing releases the GIL); only the .npy header reads are serialised:
# concurrent ast parsing in threads can raise "AST constructor recursion depth mismatch" (CPython 3.11).
_NPY_LOAD_LOCK = threading.Lock()

# =============================================================================
# Building: tokenize a shard into the cache
# =============================================================================


def _cache_base(tokenizer_id, path):
    return os.path.join(paths.TOKENS_DIR, tokenizer_id, os.path.basename(path)[:-len(".parquet")])


def _encode_arrays(tokenizer, texts, pool, threads):
    """Encode documents in threads (tiktoken releases the GIL) into uint32 arrays.
    encode_to_numpy with no special tokens allowed or disallowed is ordinary
    encoding (tests pin it to Tokenizer.encode), minus the Python lists."""
    enc = tokenizer.enc

    def work(chunk):
        return [enc.encode_to_numpy(t, disallowed_special=()) for t in chunk]

    step = max(1, -(-len(texts) // (4 * threads)))  # a few chunks per thread: balance
    chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
    return list(itertools.chain.from_iterable(pool.map(work, chunks)))


def _pack_documents(arrays, bos):
    """[ids, ...] -> (uint16 tokens with BOS before each document, int64 offsets)."""
    lengths = np.fromiter((len(a) + 1 for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(offsets[-1], dtype=np.uint16)
    is_bos = np.zeros(offsets[-1], dtype=bool)
    is_bos[offsets[:-1]] = True
    tokens[is_bos] = bos
    if arrays:
        tokens[~is_bos] = np.concatenate(arrays)
    return tokens, offsets


def build_token_cache(tokenizer, path, pool, threads):
    """Tokenize one shard into the cache (all its documents in one parallel map).
    Returns the number of tokens."""
    pf = open_parquet(path)
    texts, counts = [], []
    for rg in range(pf.num_row_groups):
        rg_texts = read_texts(pf, rg)
        texts += rg_texts
        counts.append(len(rg_texts))
    arrays = _encode_arrays(tokenizer, texts, pool, threads)
    tokens, offsets = _pack_documents(arrays, tokenizer.get_bos_token_id())
    base = _cache_base(tokenizer.id, path)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    write_atomic(base + ".tokens.npy", lambda f: np.save(f, tokens))
    write_atomic(base + ".offsets.npy", lambda f: np.save(f, offsets))
    write_json(base + ".json", {"shard": stamp(path), "row_groups": counts, "tokens": int(len(tokens)),
                                "sha256": {part: sha256(f"{base}.{part}.npy") for part in ("tokens", "offsets")}})
    return len(tokens)


def cached_shards(train_paths):
    """The shards prepare tokenizes ahead of time: the first training shards and val."""
    return train_paths[:TOKEN_CACHE_SHARDS] + paths.list_shards("val")


def ensure_token_cache(tokenizer, shards):
    """Tokenize the shards not cached yet; drop caches of other tokenizers."""
    if os.path.isdir(paths.TOKENS_DIR):
        for name in os.listdir(paths.TOKENS_DIR):
            if name != tokenizer.id:
                shutil.rmtree(os.path.join(paths.TOKENS_DIR, name), ignore_errors=True)
    todo = []
    for path, (cached, problem) in zip(shards, check_token_caches(tokenizer, shards)):
        if cached is None:
            todo.append(path)
            if problem != NOT_CACHED:
                print(f"tokens: {problem}; rebuilding it", flush=True)
    print(f"tokens: {len(shards) - len(todo)} of {len(shards)} shards cached in {paths.TOKENS_DIR}", flush=True)
    if not todo:
        return False
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for path in todo:
            t0 = time.time()
            n = build_token_cache(tokenizer, path, pool, threads)
            dt = time.time() - t0
            print(f"  {os.path.basename(path)}  {n / 1e6:.1f} M tokens  {dt:.1f} s ({n / 1e6 / max(dt, 1e-9):.1f} M tok/s)",
                  flush=True)
    return True

# =============================================================================
# Training shards past the cache's span: read through once, then known by stamp
# =============================================================================
# The loader tokenizes them on the fly, so no token cache vouches for them. prepare
# reads every page of their text once (a corrupt page stops it, naming the shard)
# and manifest.json keeps their size and mtime; verify_data compares those.


def _decode_fault(path):
    """None when every page of the shard's text column decodes, else what failed."""
    try:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            pf.read_row_group(rg, columns=["text"])
    except Exception as e:  # any damage: named by prepare, never a crash
        return f"{type(e).__name__}: {e}"
    return None


def read_through(train_paths, recorded):
    """Read every page of the training shards past TOKEN_CACHE_SHARDS that recorded
    ({name: stamp}, from manifest.json) does not know at their current stamp, in threads.
    Returns {name: stamp} of all of them, for manifest.json; one line for a corrupt one."""
    recorded = recorded if isinstance(recorded, dict) else {}
    stamps = {path: stamp(path) for path in train_paths[TOKEN_CACHE_SHARDS:]}
    todo = [path for path, now in stamps.items() if recorded.get(os.path.basename(path)) != now]
    if todo:
        with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool:
            for path, fault in zip(todo, pool.map(_decode_fault, todo)):
                if fault is not None:
                    imported = paths.import_state()
                    fix = (f"mend or remove the file it came from in {imported['source']}, then import again"
                           if imported else "remove it and run `uv run prepare.py` to download it again")
                    raise PrepareError(f"training shard {path} does not read ({fault}): {fix}")
        print(f"data: {len(todo)} training shards past the token cache read through: every page decodes", flush=True)
    return {os.path.basename(path): now for path, now in stamps.items()}


def check_read_through(train_paths, recorded):
    """verify_data's check: every training shard past TOKEN_CACHE_SHARDS has the size and
    mtime it had when prepare.py read it through (recorded: {name: stamp})."""
    recorded = recorded if isinstance(recorded, dict) else {}
    for path in train_paths[TOKEN_CACHE_SHARDS:]:
        if recorded.get(os.path.basename(path)) != stamp(path):
            raise PrepareError(f"training shard {path} is new or changed since prepare.py read it through: "
                               f"run `uv run prepare.py`")

# =============================================================================
# Checking and loading a cached shard
# =============================================================================


def _token_cache_fault(tokenizer, base, tokens, offsets, meta):
    """What is structurally wrong with a cached shard's arrays, or None. One pass
    over the tokens (ids below the vocabulary); the offsets are small."""
    name = os.path.relpath(base, paths.CACHE_DIR)
    n_docs = sum(meta["row_groups"])
    if tokens.dtype != np.uint16 or tokens.ndim != 1 or len(tokens) != meta["tokens"]:
        return f"{name}.tokens.npy is not the {meta['tokens']} uint16 tokens recorded"
    if offsets.dtype != np.int64 or offsets.shape != (n_docs + 1,):
        return f"{name}.offsets.npy does not hold the {n_docs + 1} offsets recorded"
    if offsets[0] != 0 or offsets[-1] != len(tokens) or not np.all(np.diff(offsets) > 0):
        return f"{name}.offsets.npy does not rise from 0 to the token count"
    if len(tokens) and int(tokens.max()) >= tokenizer.get_vocab_size():
        return f"{name}.tokens.npy holds ids beyond the vocabulary ({tokenizer.get_vocab_size()})"
    if not np.all(tokens[offsets[:-1]] == tokenizer.get_bos_token_id()):
        return f"{name}.tokens.npy has documents that do not start with BOS"
    return None


def check_token_cache(tokenizer, path, content=False):
    """(cached, problem) for one shard: cached = (tokens memmap, offsets, docs per
    row group) when the cache is there, fresh (the shard's size and mtime match)
    and sound, else None with problem one short phrase naming the file. content:
    also compare both arrays with the sha256 recorded when they were written."""
    if tokenizer.id is None:
        return None, NOT_CACHED
    base = _cache_base(tokenizer.id, path)
    meta = read_json(base + ".json")
    if meta is None:
        return None, NOT_CACHED
    name = os.path.relpath(base, paths.CACHE_DIR)
    try:
        if meta["shard"] != stamp(path):
            return None, NOT_CACHED  # the shard changed since: tokenized again, not a fault
        with _NPY_LOAD_LOCK:  # np.load parses each header with ast; CPython 3.11's ast is not thread-safe
            tokens = np.load(base + ".tokens.npy", mmap_mode="r")
            offsets = np.load(base + ".offsets.npy")
        problem = _token_cache_fault(tokenizer, base, tokens, offsets, meta)
        if problem is None and content:
            recorded = meta.get("sha256") or {}
            for part in ("tokens", "offsets"):
                if sha256(f"{base}.{part}.npy") != recorded.get(part):
                    problem = (f"{name}.{part}.npy differs from the sha256 recorded"
                               if part in recorded else f"{name}.json records no sha256")
                    break
    except Exception as e:  # any damage to these files reads as "not trusted", never as a crash
        problem = f"{name}.*: unreadable ({type(e).__name__}: {e})"
    if problem is not None:
        return None, problem
    return (tokens, offsets, meta["row_groups"]), None


def load_token_cache(tokenizer, path):
    """(tokens memmap, offsets, docs per row group) of a cached shard, or None
    when it is missing, stale or damaged (the loader then tokenizes the shard
    on the fly: same rows, slower; verify_data() stops a run before that)."""
    return check_token_cache(tokenizer, path)[0]


def check_token_caches(tokenizer, shards):
    """check_token_cache(content=True) for every shard, in threads (hashing and
    numpy release the GIL): [(cached, problem), ...] in the order of shards."""
    if not shards:
        return []
    with ThreadPoolExecutor(max_workers=min(len(shards), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda p: check_token_cache(tokenizer, p, content=True), shards))

# =============================================================================
# A split too small for the packer's buffer, replayed from memory
# =============================================================================


def replay_small_split(batches, min_docs):
    """Pass (tokens, offsets, epoch) batches through; when a whole epoch holds
    fewer than min_docs documents (the packer's BUFFER_DOCS), replay it from
    memory from then on. A split that small is walked once per placed document
    (the buffer wants min_docs), and re-reading its shards each time made two
    one-line files take ~10 minutes to pack the validation rows. Same batches,
    same rows."""
    seen, n_docs = [], 0
    for tokens, offsets, epoch in batches:
        if epoch > 1:
            break
        yield tokens, offsets, epoch
        seen.append((tokens, offsets))
        n_docs += len(offsets) - 1
        if n_docs >= min_docs:
            yield from batches
            return
    for epoch in itertools.count(2):
        for tokens, offsets in seen:
            yield tokens, offsets, epoch

# =============================================================================
# The validation split: its size, and the stored rows
# =============================================================================


def _val_minimum(eval_tokens, seq_len):
    """The fewest text tokens a validation split may hold: MIN_VAL_FRACTION of eval_tokens, and one full row."""
    return max(math.ceil(eval_tokens * MIN_VAL_FRACTION), seq_len + 1)


def _too_small(size, eval_tokens, seq_len):
    minimum = _val_minimum(eval_tokens, seq_len)
    return PrepareError(f"the validation split is too small for val_bpb: {size}; it needs at least {minimum:,} "
                        f"tokens ({MIN_VAL_FRACTION:.0%} of EVAL_TOKENS={eval_tokens:,}, and one full row); "
                        f"add data (the last parquet file, or the last 10% of documents, is validation)")


def check_val_bytes(val_path, eval_tokens, seq_len):
    """Before any tokenizer is trained: refuse a validation split whose text has fewer
    UTF-8 bytes than the tokens it needs. Every text token stands for at least one byte,
    so such a split is too small whatever the tokenizer; check_val_split counts exactly."""
    pf = open_parquet(val_path)
    docs, nbytes = pf.metadata.num_rows, 0
    for rg in range(pf.num_row_groups):
        column = pf.read_row_group(rg, columns=["text"]).column("text").cast(pa.large_string())
        nbytes += pc.sum(pc.binary_length(column)).as_py() or 0
    if nbytes < _val_minimum(eval_tokens, seq_len):
        raise _too_small(f"{docs:,} documents, {nbytes:,} bytes of text (so at most {nbytes:,} tokens)",
                         eval_tokens, seq_len)


def check_val_split(tokenizer, val_path, eval_tokens, seq_len):
    """Refuse a validation split too small for val_bpb to mean anything (below
    MIN_VAL_FRACTION of eval_tokens, or one row of seq_len + 1), and say in one
    line when it is smaller than eval_tokens, i.e. cycled. Counts text tokens
    (BOS excluded) in the val shard's token cache."""
    cached = load_token_cache(tokenizer, val_path)
    if cached is None:  # ensure_token_cache has just written it; nothing to count otherwise
        return
    tokens, offsets = cached[0], cached[1]
    docs = len(offsets) - 1
    n = len(tokens) - docs
    size = f"{docs:,} documents, {n:,} tokens"
    if n < _val_minimum(eval_tokens, seq_len):
        raise _too_small(size, eval_tokens, seq_len)
    if n < eval_tokens:
        print(f"val split: {size}, fewer than the {eval_tokens:,} tokens val_bpb scores: each token counts about "
              f"{eval_tokens / n:.1f} times (a larger split gives a steadier number)", flush=True)


def val_rows_path(tokenizer, T, N):
    return os.path.join(paths.TOKENS_DIR, tokenizer.id or "none", f"val_rows_T{T}_N{N}.npy")


def check_val_rows(tokenizer, T, N):
    """(rows, problem): the cached validation rows when they match the tokenizer,
    the val shard and (T, N) and hash to the sha256 recorded with them; else None
    with NOT_CACHED or one phrase naming the fault. The .json is written after
    the .npy: no json, no trust."""
    path = val_rows_path(tokenizer, T, N)
    meta = read_json(path[:-len(".npy")] + ".json")
    if tokenizer.id is None or meta is None or meta.get("val") != stamp(paths.list_shards("val")[0]):
        return None, NOT_CACHED
    name = os.path.relpath(path, paths.CACHE_DIR)
    try:
        if "sha256" not in meta:
            return None, f"{name[:-len('.npy')]}.json records no sha256"
        if sha256(path) != meta["sha256"]:
            return None, f"{name} differs from the sha256 recorded"
        rows = np.load(path, mmap_mode="r")
    except Exception as e:  # damaged: rebuilt or refused, never a crash
        return None, f"{name}: unreadable ({type(e).__name__}: {e})"
    if rows.shape != (N, T + 1) or rows.dtype != np.uint16:
        return None, f"{name} is not {N} rows of {T + 1} uint16 tokens"
    return rows, None


def cached_val_rows(tokenizer, T, N):
    """The cached validation rows when they pass check_val_rows, else None."""
    return check_val_rows(tokenizer, T, N)[0]


def save_val_rows(tokenizer, T, N, rows, val_stamp):
    """Store rows packed from the val shard with stamp val_stamp (taken before
    packing: a shard that changed meanwhile is packed again next time). A
    read-only cache only costs the packing next time."""
    if tokenizer.id is None:
        return
    path = val_rows_path(tokenizer, T, N)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, lambda f: np.save(f, rows))
        write_json(path[:-len(".npy")] + ".json", {"val": val_stamp, "T": T, "N": N, "sha256": sha256(path)})
    except OSError:
        pass
