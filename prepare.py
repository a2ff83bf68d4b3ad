"""
One-time data preparation and the runtime utilities every experiment shares.
DO NOT MODIFY: this file and constants.py are the fixed harness. Agents edit
train.py only; the data, the tokenizer and val_bpb must stay comparable.

    uv run prepare.py                       # 10 training shards + the pinned val shard
    uv run prepare.py --num-shards -1       # all 6,542 training shards
    uv run prepare.py --source ~/my_corpus  # your own data, offline
    uv run prepare.py --source ~/repo --text-ext py,rs   # code too, one document per file

What it leaves under the cache root (~/.cache/autoresearch, or $AUTORESEARCH_CACHE):

    data/shard_NNNNN.parquet      documents (column "text"); shard_06542 is validation
    data/source.json              only for --source imports: where the data came from
    tokenizer/tokenizer.pkl       pickled tiktoken.Encoding (BPE trained with rustbpe)
    tokenizer/token_bytes.pt      int32 [vocab]: raw bytes per token, 0 for special tokens
    tokenizer/manifest.json       written last: hashes, and the shards it was trained on
    tokens/<tokenizer id>/        token cache: every cached shard tokenized once, and
                                  the validation rows behind val_bpb
    manifest.json                 written last: fingerprints of the prepared data

A run killed at any moment leaves nothing a later run trusts: files are
written to a fresh temporary name and renamed, manifests are written last.
A second run with nothing to do says so and changes nothing. One run at a
time holds the cache (.prepare.lock); another one waits.

Runtime API used by train.py: Tokenizer, get_token_bytes, make_dataloader,
verify_data (checks everything val_bpb depends on, before training),
check_evaluation, evaluate_bpb, CACHE_DIR, DATA_DIR, TOKENIZER_DIR.
"""

import argparse
import bisect
import collections
import contextlib
import errno
import fcntl
import glob
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import queue
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from constants import EVAL_TOKENS, MAX_SEQ_LEN

# =============================================================================
# Constants this file owns
# =============================================================================

# Data: the Hugging Face dataset karpathy/climbmix-400b-shuffle.
BASE_URL = os.environ.get(
    "AUTORESEARCH_BASE_URL",
    "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
)
MAX_SHARD = 6542                      # shards are shard_00000 ... shard_06542
VAL_SHARD = MAX_SHARD                 # pinned validation shard, always fetched
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"
SHARD_RE = re.compile(r"shard_\d{5}\.parquet")
DOWNLOAD_ATTEMPTS = 5                 # back-off between them: 2, 4, 8, 16 s
BACKOFF_BASE = float(os.environ.get("AUTORESEARCH_BACKOFF", "2"))  # tests shrink it
CHUNK_BYTES = 1 << 20                 # download streaming chunk
CONNECT_TIMEOUT, READ_TIMEOUT = 5, 60 # seconds

# Tokenizer.
VOCAB_SIZE = 8192                     # learned merges + special tokens
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]  # ids after the merges
BOS_TOKEN = SPECIAL_TOKENS[0]
# GPT-4's split pattern, except numbers are grouped in runs of 1-2 digits (not 1-3).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_DOC_CHARS = 10_000          # documents are capped at this many characters
TOKENIZER_MAX_CHARS = 1_000_000_000   # and training stops after this many in total
SANITY_TEXT = "Hello world! 12345 67 + 3.14 = ok\n\tdef f(x): return x**2  # 你好，世界 こんにちは 🙂🚀 café"

# Dataloader (the published algorithm's numbers).
BUFFER_DOCS = 1000                    # refill the buffer to this many documents
DOC_BATCH = 128                       # documents per tokenization batch
LOADER_POOL = 4                       # packed batches ready ahead of the consumer
TOKEN_CACHE_SHARDS = 16               # training shards tokenized at prepare time (~1B
                                      # ClimbMix tokens); later ones tokenize on the fly

# Local import (--source) of .txt/.md/.jsonl documents.
DOCUMENT_EXTENSIONS = (".txt", ".md", ".jsonl")  # more with --text-ext (code, ...)
IMPORT_VAL_FRACTION = 0.1             # the last 10% of documents become validation
IMPORT_SHARD_DOCS = 65536             # documents per written shard
IMPORT_ROW_GROUP = 1024               # documents per parquet row group

# Evaluation: the causality check compares per-token losses (nats) of one row
# before and after the tokens behind a cut point change. Deterministic kernels
# give identical losses; the tolerance covers a few bf16 rounding steps.
CAUSAL_ATOL, CAUSAL_RTOL = 0.02, 0.01 # allowed change: ATOL + RTOL * |loss|

# The fixed harness: prepare.py records these files' sha256 in the cache manifest,
# verify_data() refuses a run when one differs (a missing file is recorded as missing).
HARNESS_FILES = ("constants.py", "prepare.py", "runtime.py")
HARNESS_DIR = os.path.dirname(os.path.abspath(__file__))

# The validation split: val_bpb scores EVAL_TOKENS tokens of it, cycling a
# smaller split. Below this fraction (each token scored 100+ times; 209,715
# tokens, ~0.8 MB of text, on the real contract) or below one full row, the
# number would measure a handful of documents, so prepare refuses the split.
MIN_VAL_FRACTION = 0.01


def set_cache_root(root):
    """Point every path at a cache root (import reads $AUTORESEARCH_CACHE; tests call this)."""
    global CACHE_DIR, DATA_DIR, TOKENIZER_DIR, TOKENS_DIR
    CACHE_DIR = os.path.abspath(os.path.expanduser(root))
    DATA_DIR = os.path.join(CACHE_DIR, "data")
    TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
    TOKENS_DIR = os.path.join(CACHE_DIR, "tokens")


set_cache_root(os.environ.get("AUTORESEARCH_CACHE") or "~/.cache/autoresearch")

# =============================================================================
# Errors and small file helpers
# =============================================================================


class PrepareError(SystemExit):
    """A problem the user can fix. Uncaught, it prints its one-line message and
    exits with code 1, no traceback: train.py gets the same clear message."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


RUN_PREPARE = "run `uv run prepare.py` (or `uv run prepare.py --source PATH` for local data)"


def _size(nbytes):
    return f"{nbytes:,} bytes" if nbytes < 10_000 else f"{nbytes / 1e6:,.1f} MB"


def _disk_full(folder, name, needed, written):
    """The one line for a full disk: where, and how much the write needed."""
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    need = _size(needed) if needed else f"more than {_size(written)}" if written else "more space"
    return PrepareError(f"disk full in {folder}: writing {name} needs {need} ({free}); free some space there "
                        f"(or set AUTORESEARCH_CACHE to a disk with room) and run the same command again")


def _is_disk_full(exc):
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _make_folder(path):
    """os.makedirs with one clear line when a file stands where a folder must be."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        what = "the cache root" if path == CACHE_DIR else "the cache folder"
        raise PrepareError(f"{what} {path} is (or lies under) a file, not a folder: move that file away "
                           f"or set AUTORESEARCH_CACHE to another folder") from None


# Temporaries are NAME.<random>.tmp next to NAME, created exclusively (O_EXCL,
# O_NOFOLLOW): a file or symlink planted at a predictable name is never written
# through. The ones being written are remembered so that an interrupted run
# removes them (main), and prepare.py sweeps any a killed run left behind.
_LIVE_TEMPORARIES = set()
_TEMPORARY_RE = re.compile(r".+\.tmp")
_NEW_FILE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL
                   | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


class _TemporaryFile:
    """A binary file being written that remembers whether the disk filled up:
    libraries (pyarrow, torch) re-raise write errors as their own types."""

    def __init__(self, path, fd):
        self.path = path
        self.disk_full = False
        self._file = open(fd, "wb")

    def _call(self, method, *args):
        try:
            return getattr(self._file, method)(*args)
        except OSError as e:
            self.disk_full |= _is_disk_full(e)
            raise

    def write(self, data):
        return self._call("write", data)

    def flush(self):
        return self._call("flush")

    def close(self):
        return self._call("close")

    def __getattr__(self, name):  # tell, seek, closed, ... as the real file has them
        return getattr(self._file, name)


@contextlib.contextmanager
def _new_file(path, size=None):
    """Write PATH through a fresh temporary in its folder, renamed into place on
    success: readers see the old file or the new one, never a partial one. On
    any error the temporary is removed; a full disk becomes one line naming the
    folder and the size (when known) the file needs."""
    folder, name = os.path.split(path)
    while True:
        tmp = os.path.join(folder, f"{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, _NEW_FILE_FLAGS, 0o666)
            break
        except FileExistsError:
            continue  # taken (or planted): another random name
        except OSError as e:
            if _is_disk_full(e):
                raise _disk_full(folder, name, size, 0) from None
            raise
    _LIVE_TEMPORARIES.add(tmp)
    f = _TemporaryFile(tmp, fd)
    try:
        yield f
        f.close()
        os.replace(tmp, path)
    except BaseException as e:
        written = f._file.tell() if not f._file.closed else 0
        with contextlib.suppress(OSError):
            f._file.close()
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if f.disk_full or _is_disk_full(e):
            raise _disk_full(folder, name, size, written) from None
        raise
    finally:
        _LIVE_TEMPORARIES.discard(tmp)


def _remove_temporaries(paths):
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)


def _sweep_stale_temporaries():
    """Temporaries a killed run left in the cache (only under the cache lock)."""
    for folder, _, names in os.walk(CACHE_DIR):
        _remove_temporaries(os.path.join(folder, n) for n in names if _TEMPORARY_RE.fullmatch(n))


def _write_atomic(path, write, size=None):
    """write(f) into a fresh temporary, then rename (see _new_file)."""
    with _new_file(path, size) as f:
        write(f)


def _write_json(path, obj):
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stamp(path):
    """Cheap identity of a file: size and modification time."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _parquet_readable(path):
    """A file counts as present only if its parquet footer reads."""
    try:
        pq.ParquetFile(path)
        return True
    except Exception:
        return False


def _open_parquet(path):
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise PrepareError(f"corrupt parquet file {path} ({type(e).__name__}: {e})") from None


def read_texts(pf, row_group):
    """The documents of one row group, in order (nulls read as empty documents)."""
    texts = pf.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    return [t if t is not None else "" for t in texts]


def _import_state():
    """data/source.json: None when the data was downloaded. An import whose
    record cannot be read is still an import: treating it as downloaded data
    would mix downloads into it, so it stops here with one line."""
    path = os.path.join(DATA_DIR, "source.json")
    if not os.path.lexists(path):
        return None
    state = _read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("source"), str) \
            or not isinstance(state.get("shards"), list):
        raise PrepareError(f"{path} is unreadable, so the data in {DATA_DIR} (imported with --source) cannot "
                           f"be trusted: import it again with `uv run prepare.py --source PATH`, or remove "
                           f"{DATA_DIR} to download instead")
    return state


def _check_import_finished():
    """A --source import that was killed half-way leaves shards no run may use."""
    imported = _import_state()
    if imported is not None and not imported.get("complete"):
        raise PrepareError(f"the import from {imported['source']} did not finish: "
                           f"run `uv run prepare.py --source {imported['source']}` again")


def shard_path(index):
    return os.path.join(DATA_DIR, f"shard_{index:05d}.parquet")


def _existing_shards():
    if not os.path.isdir(DATA_DIR):
        return []
    return sorted(f for f in os.listdir(DATA_DIR) if SHARD_RE.fullmatch(f))


def list_shards(split):
    """Parquet files of a split: 'val' is the pinned shard, 'train' every other shard."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    names = _existing_shards()
    if not names:
        raise PrepareError(f"no data in {DATA_DIR}: {RUN_PREPARE}")
    _check_import_finished()
    if split == "val":
        if VAL_FILENAME not in names:
            raise PrepareError(f"validation shard {VAL_FILENAME} missing in {DATA_DIR}: {RUN_PREPARE}")
        return [os.path.join(DATA_DIR, VAL_FILENAME)]
    train = [os.path.join(DATA_DIR, n) for n in names if n != VAL_FILENAME]
    if not train:
        raise PrepareError(f"the training split is empty: {DATA_DIR} holds only the validation shard; {RUN_PREPARE}")
    return train

# =============================================================================
# Data: download
# =============================================================================


def _is_offline(exc):
    """True for errors that mean 'no network' (name resolution, refused, connect
    timeout): retrying them with long back-offs only delays the message."""
    import requests
    import urllib3

    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (requests.exceptions.ConnectTimeout, urllib3.exceptions.NewConnectionError,
                          socket.gaierror, ConnectionRefusedError)):
            return True
        stack += [e.__cause__, e.__context__, getattr(e, "reason", None)]
        stack += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return False


def _download_shard(index, stop, reached):
    """Stream one shard to a temporary in 1 MiB chunks, check its footer, rename.
    Up to DOWNLOAD_ATTEMPTS attempts with exponential back-off. Returns bytes.
    Until the server has answered once (reached), 'no network' errors end the
    run at once instead of being retried."""
    import requests

    path = shard_path(index)
    name = os.path.basename(path)
    url = f"{BASE_URL.rstrip('/')}/{name}"
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        if stop.is_set():
            return 0
        try:
            with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as r:
                reached.set()
                r.raise_for_status()
                expected = int(r.headers.get("Content-Length", -1))
                with _new_file(path, size=expected if expected >= 0 else None) as f:
                    nbytes = 0
                    for chunk in r.iter_content(CHUNK_BYTES):
                        if stop.is_set():
                            raise InterruptedError("stopped")
                        f.write(chunk)
                        nbytes += len(chunk)
                    f.flush()
                    if expected >= 0 and nbytes != expected:
                        raise IOError(f"truncated: {nbytes} of {expected} bytes")
                    if not _parquet_readable(f.path):
                        raise IOError("not a readable parquet file (truncated body?)")
            return nbytes
        except Exception as e:
            if stop.is_set():
                return 0
            if _is_offline(e) and not reached.is_set():
                host = re.sub(r"^\w+://([^/]+).*$", r"\1", url)
                raise PrepareError(
                    f"cannot reach {host} ({type(e).__name__}); no network? "
                    f"Import local data instead: uv run prepare.py --source PATH") from None
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status is not None and 400 <= status < 500 and status != 429:
                raise PrepareError(f"cannot download {url}: HTTP {status} "
                                   f"(or import local data instead: uv run prepare.py --source PATH)") from None
            if attempt == DOWNLOAD_ATTEMPTS:
                raise PrepareError(f"could not download {name} after {attempt} attempts: {e}") from None
            delay = BACKOFF_BASE * 2 ** (attempt - 1)
            print(f"  {name}: attempt {attempt} failed ({type(e).__name__}: {e}); retrying in {delay:g} s", flush=True)
            stop.wait(delay)
    return 0


def download_data(num_shards, workers):
    """Fetch training shards 0..num_shards-1 (-1: all) and the pinned val shard.
    Shards whose footer reads are kept, so an interrupted run resumes.

    The workers are daemon threads fed from a queue, not a pool: a pool joins
    its threads before an error or Ctrl-C can end the run, and a worker waiting
    on a server that never answers holds that up for READ_TIMEOUT. A stopped
    worker's temporary is removed by main()."""
    n_train = MAX_SHARD if num_shards == -1 else min(num_shards, MAX_SHARD)
    wanted = [VAL_SHARD] + list(range(n_train))
    _make_folder(DATA_DIR)
    todo = [i for i in wanted if not _parquet_readable(shard_path(i))]
    print(f"data: {len(wanted) - len(todo)} of {len(wanted)} shards present in {DATA_DIR}", flush=True)
    if not todo:
        return False
    print(f"data: downloading {len(todo)} shards with {workers} workers from {BASE_URL}", flush=True)
    stop, reached = threading.Event(), threading.Event()
    pending, results = queue.Queue(), queue.Queue()
    for index in todo:
        pending.put(index)

    def worker():
        while not stop.is_set():
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((index, _download_shard(index, stop, reached), None))
            except BaseException as e:  # raised in the main thread
                results.put((index, 0, e))

    for _ in range(min(workers, len(todo))):
        threading.Thread(target=worker, name="download", daemon=True).start()
    t0 = time.time()
    try:
        for done in range(1, len(todo) + 1):
            index, nbytes, error = results.get()
            if error is not None:
                raise error
            name = os.path.basename(shard_path(index))
            print(f"  [{done}/{len(todo)}] {name}  {nbytes / 1e6:.1f} MB  {time.time() - t0:.1f} s", flush=True)
    finally:
        stop.set()
    return True

# =============================================================================
# Data: local import (--source)
# =============================================================================


def _source_files(source):
    """A folder (walked recursively), a single file, or a glob; sorted by path."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    elif os.path.isfile(path):
        files = [path]
    else:
        files = glob.glob(path, recursive=True)
    return sorted(os.path.abspath(f) for f in files if os.path.isfile(f))


def _within(path, folder):
    """True when path (symlinks resolved) is folder or lies inside it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _check_source_outside_cache(source):
    """Importing from the cache itself would delete the shards before copying
    them. For a glob, its fixed leading folders are what count."""
    path = os.path.expanduser(source)
    while glob.has_magic(path):
        path = os.path.dirname(path)
    if _within(path or ".", CACHE_DIR):
        raise PrepareError(f"--source {source} lies inside the cache root {CACHE_DIR}, which the import "
                           f"replaces: import from a folder outside it (or use another AUTORESEARCH_CACHE)")


def _extension(path):
    return os.path.splitext(path)[1].lower()


def text_extensions(values):
    """--text-ext values ("py", ".rs", "c,h") -> (".py", ".rs", ".c", ".h")."""
    extensions = []
    for value in values:
        for part in value.split(","):
            ext = "." + part.strip().lstrip(".").lower()
            if not re.fullmatch(r"\.[a-z0-9_+-]+", ext):
                raise PrepareError(f"--text-ext {value!r}: name file extensions, e.g. --text-ext py,rs or --text-ext .c")
            if ext in (".parquet", ".jsonl"):
                raise PrepareError(f"--text-ext {ext}: {ext} files are imported by their own rules already")
            extensions.append(ext)
    return tuple(dict.fromkeys(extensions))


def _skipped_by_extension(files):
    """'576 .py, 2 .csv, 1 with no extension' (most first), or ''."""
    counts = collections.Counter(_extension(f) or "with no extension" for f in files)
    return ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _has_documents(pf):
    """True when the parquet file's 'text' column holds at least one non-empty string."""
    import pyarrow.compute as pc

    for rg in range(pf.num_row_groups):
        column = pf.read_row_group(rg, columns=["text"]).column("text")
        if column.null_count < len(column) and (pc.max(pc.utf8_length(column)).as_py() or 0) > 0:
            return True
    return False


def _read_documents(files):
    """Documents from .txt/.md (one per file) and .jsonl (one per line with a
    "text" string). Undecodable files, bad lines and empty documents are skipped
    and counted."""
    docs, skipped = [], {"files that are not valid UTF-8": 0, "jsonl lines without a text string": 0,
                         "empty documents": 0}
    for path in files:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError:
            skipped["files that are not valid UTF-8"] += 1
            continue
        if path.endswith(".jsonl"):
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    doc = obj["text"]
                    assert isinstance(doc, str)
                except (ValueError, KeyError, TypeError, AssertionError):
                    skipped["jsonl lines without a text string"] += 1
                    continue
                if doc:
                    docs.append(doc)
                else:
                    skipped["empty documents"] += 1
        elif text:
            docs.append(text)
        else:
            skipped["empty documents"] += 1
    return docs, skipped


def _write_docs(path, docs):
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    _write_atomic(path, lambda f: pq.write_table(table, f, row_group_size=IMPORT_ROW_GROUP))


def import_source(source, extra_extensions=()):
    """Copy local data into DATA_DIR so the rest of the pipeline is identical.

    Parquet files (column "text"): copied as they are (row groups kept); the
    last in sorted order becomes the validation shard. .txt/.md/.jsonl, and
    files with extra_extensions as plain text: the documents in sorted file
    order are written into parquet shards; the last 10% of them (at least one)
    become the validation shard. Files inside the cache root are never read."""
    _check_source_outside_cache(source)
    files = _source_files(source)
    if not files and not glob.has_magic(source) and not os.path.exists(os.path.expanduser(source)):
        raise PrepareError(f"--source {source}: no such file or folder")
    in_cache = {f for f in files if _within(f, CACHE_DIR)}  # the source holds the cache
    files = [f for f in files if f not in in_cache]
    parquet = [f for f in files if _extension(f) == ".parquet"]
    documents = [f for f in files if _extension(f) in DOCUMENT_EXTENSIONS + tuple(extra_extensions)]
    used = parquet or documents
    by_extension = _skipped_by_extension(sorted(set(files) - set(used)))
    skipped = ", ".join(filter(None, [by_extension, f"{len(in_cache)} inside the cache root" if in_cache else ""]))
    skipped = f" (skipped files: {skipped})" if skipped else ""
    if not used:
        raise PrepareError(f"--source {source}: no usable files (.parquet, or text: "
                           f"{', '.join(DOCUMENT_EXTENSIONS + tuple(extra_extensions))}) found{skipped}; "
                           f"import other UTF-8 text files with --text-ext EXT")
    record = {"source": os.path.abspath(os.path.expanduser(source)),
              "files": [[f] + _stamp(f) for f in used]}
    state_path = os.path.join(DATA_DIR, "source.json")
    existing = _existing_shards()
    try:
        state = _import_state()
    except PrepareError:
        state = {}  # an import with an unreadable record: ours to redo
    if existing and state is None:
        raise PrepareError(f"{DATA_DIR} holds downloaded shards; to import --source {source}, "
                           f"use another cache root (AUTORESEARCH_CACHE=DIR) or remove {DATA_DIR}")
    if state and state.get("complete") and {k: state.get(k) for k in record} == record and all(
            _parquet_readable(os.path.join(DATA_DIR, n)) for n in state["shards"]):
        print(f"data: already imported from {source} ({len(state['shards'])} shards)", flush=True)
        return False

    if parquet:
        for f in parquet:
            pf = _open_parquet(f)
            field = pf.schema_arrow.field("text") if "text" in pf.schema_arrow.names else None
            if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
                raise PrepareError(f"{f} has no string column 'text'")
            if not _has_documents(pf):
                raise PrepareError(f"{f}: its column 'text' holds no documents (all {pf.metadata.num_rows} "
                                   f"values are null or empty); remove the file or fill it")
        if len(parquet) < 2:
            raise PrepareError(f"--source {source}: one parquet file only; the last file is the validation "
                               f"split, so the training split would be empty (add training files)")
        if len(parquet) - 1 > MAX_SHARD:
            raise PrepareError(f"--source {source}: at most {MAX_SHARD} training files")
        plan = [(f, f"shard_{i:05d}.parquet") for i, f in enumerate(parquet[:-1])] + [(parquet[-1], VAL_FILENAME)]
        print(f"data: importing {len(parquet)} parquet files from {source}{skipped}; validation: {parquet[-1]}",
              flush=True)
    else:
        docs, unusable = _read_documents(documents)
        counts = ", ".join(f"{n} {what}" for what, n in unusable.items() if n)
        if counts:
            print(f"data: skipped {counts}", flush=True)
        if len(docs) < 2:
            raise PrepareError(f"--source {source}: {len(docs)} usable documents, need at least 2 "
                               f"(one for training, one for validation){'; skipped ' + counts if counts else ''}")
        n_val = min(len(docs) - 1, max(1, round(len(docs) * IMPORT_VAL_FRACTION)))
        train_docs, val_docs = docs[:-n_val], docs[-n_val:]
        groups = [train_docs[i:i + IMPORT_SHARD_DOCS] for i in range(0, len(train_docs), IMPORT_SHARD_DOCS)]
        plan = [(g, f"shard_{i:05d}.parquet") for i, g in enumerate(groups)] + [(val_docs, VAL_FILENAME)]
        hint = "; import skipped UTF-8 text files with --text-ext EXT" if by_extension else ""
        print(f"data: importing {len(docs)} documents from {len(documents)} files in {source}{skipped}; "
              f"validation: the last {n_val}{hint}", flush=True)

    _make_folder(DATA_DIR)
    # Marked as ours but unfinished first: a killed import is redone, never trusted.
    _write_json(state_path, {**record, "shards": [], "complete": False})
    for name in existing:  # a previous import: ours to replace
        os.remove(os.path.join(DATA_DIR, name))
    for what, name in plan:
        dst = os.path.join(DATA_DIR, name)
        if isinstance(what, str):
            with open(what, "rb") as src:
                _write_atomic(dst, lambda f: shutil.copyfileobj(src, f, CHUNK_BYTES), size=os.path.getsize(what))
        else:
            _write_docs(dst, what)
        print(f"  {name}  {os.path.getsize(dst) / 1e6:.1f} MB", flush=True)
    _write_json(state_path, {**record, "shards": [name for _, name in plan], "complete": True})
    return True

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
        tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
        manifest = _read_json(os.path.join(tokenizer_dir, "manifest.json"))
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if manifest is None or not os.path.exists(path):
            raise PrepareError(f"no tokenizer in {tokenizer_dir}: {RUN_PREPARE}")
        with open(path, "rb") as f:
            blob = f.read()
        tokenizer_id = hashlib.sha256(blob).hexdigest()[:16]
        if tokenizer_id != manifest.get("id"):
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
    path = os.path.join(TOKENIZER_DIR, "token_bytes.pt")
    manifest = _read_json(os.path.join(TOKENIZER_DIR, "manifest.json"))
    if not os.path.exists(path) or manifest is None:
        raise PrepareError(f"no token_bytes.pt in {TOKENIZER_DIR}: {RUN_PREPARE}")
    with open(path, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest()[:16] != manifest.get("token_bytes"):
        raise PrepareError(f"{path} differs from the one prepare.py recorded: run `uv run prepare.py` to rebuild it")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True).to(device)


def _save_token_bytes(enc, path):
    """Write the bytes-per-token table of enc; returns its short hash for the manifest.
    Raw bytes (decode_single_token_bytes): a token that is part of a multi-byte
    character counts its own bytes, not the 3 bytes of U+FFFD."""
    specials = {enc.encode_single_token(name) for name in enc.special_tokens_set}
    token_bytes = torch.tensor([0 if i in specials else len(enc.decode_single_token_bytes(i))
                                for i in range(enc.n_vocab)], dtype=torch.int32)
    _write_atomic(path, lambda f: torch.save(token_bytes, f))
    return _sha256(path)[:16]


def _repair_token_bytes():
    """token_bytes.pt is derived from tokenizer.pkl: when only it fails its hash,
    rebuild it from the pickle instead of training the tokenizer again.
    Returns True when it was rebuilt."""
    manifest_path = os.path.join(TOKENIZER_DIR, "manifest.json")
    manifest = _read_json(manifest_path)
    pkl_path, tb_path = os.path.join(TOKENIZER_DIR, "tokenizer.pkl"), os.path.join(TOKENIZER_DIR, "token_bytes.pt")
    try:
        if manifest is None or _sha256(pkl_path)[:16] != manifest["id"]:
            return False  # no trusted tokenizer: it is trained again anyway
        if os.path.exists(tb_path) and _sha256(tb_path)[:16] == manifest["token_bytes"]:
            return False
        with open(pkl_path, "rb") as f:
            enc = pickle.load(f)
    except (OSError, KeyError, TypeError):
        return False
    manifest["token_bytes"] = _save_token_bytes(enc, tb_path)
    _write_json(manifest_path, manifest)
    print(f"tokenizer: {tb_path} did not match the manifest; rebuilt it from tokenizer.pkl", flush=True)
    return True


def _training_texts(paths, stats):
    """Training documents for the tokenizer: capped at TOKENIZER_DOC_CHARS each,
    TOKENIZER_MAX_CHARS in all. Records in stats the [name, size] of every shard
    it reads, the characters and whether the total cap cut it short."""
    for path in paths:
        pf = _open_parquet(path)
        stats["trained_on"].append([os.path.basename(path), os.path.getsize(path)])
        for rg in range(pf.num_row_groups):
            for text in read_texts(pf, rg):
                doc = text[:TOKENIZER_DOC_CHARS]
                stats["chars"] += len(doc)
                yield doc
                if stats["chars"] >= TOKENIZER_MAX_CHARS:
                    stats["capped"] = True
                    return


def _tokenizer_input_changed(manifest, train_paths):
    """Compare the shards the tokenizer read with the training shards now present.
    Returns a description of the change, or None."""
    now = [[os.path.basename(p), os.path.getsize(p)] for p in train_paths]
    before = manifest["trained_on"]
    # Capped: only the shards it read matter; else every training shard.
    if (now[:len(before)] if manifest["capped"] else now) == before:
        return None
    return f"trained on {len(before)} shards ({before[0][0]} ... {before[-1][0]}), now {len(now)} training shards differ"


def _tokenizer_state():
    """The tokenizer manifest, if the files it vouches for are there and match."""
    manifest = _read_json(os.path.join(TOKENIZER_DIR, "manifest.json"))
    if manifest is None:
        return None
    try:
        pkl_ok = _sha256(os.path.join(TOKENIZER_DIR, "tokenizer.pkl"))[:16] == manifest["id"]
        tb_ok = _sha256(os.path.join(TOKENIZER_DIR, "token_bytes.pt"))[:16] == manifest["token_bytes"]
    except (OSError, KeyError):
        return None
    return manifest if pkl_ok and tb_ok else None


def train_tokenizer(train_paths):
    """BPE with rustbpe on the training shards; saved as a pickled tiktoken.Encoding."""
    import rustbpe
    import tiktoken

    os.makedirs(TOKENIZER_DIR, exist_ok=True)
    manifest_path = os.path.join(TOKENIZER_DIR, "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # from here on, no half-written state is trusted
    t0 = time.time()
    stats = {"trained_on": [], "chars": 0, "capped": False}
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_training_texts(train_paths, stats), VOCAB_SIZE - len(SPECIAL_TOKENS),
                            pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    # A tiny corpus may not fill the vocabulary: keep what was learned.
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="autoresearch", pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                            special_tokens=specials)
    assert enc.n_vocab <= 1 << 16, "token cache stores uint16 ids"
    if enc.decode(enc.encode_ordinary(SANITY_TEXT)) != SANITY_TEXT:
        raise PrepareError("tokenizer round trip failed on the sanity text")
    pkl_path = os.path.join(TOKENIZER_DIR, "tokenizer.pkl")
    _write_atomic(pkl_path, lambda f: pickle.dump(enc, f))
    tb_hash = _save_token_bytes(enc, os.path.join(TOKENIZER_DIR, "token_bytes.pt"))
    manifest = {"id": _sha256(pkl_path)[:16], "token_bytes": tb_hash, "vocab_size": enc.n_vocab,
                **stats, "seconds": round(time.time() - t0, 1)}
    _write_json(manifest_path, manifest)
    print(f"tokenizer: vocab {enc.n_vocab} ({len(ranks)} merges+bytes, {len(specials)} special) trained on "
          f"{stats['chars'] / 1e6:.1f} M chars of {len(stats['trained_on'])} shards in {time.time() - t0:.1f} s", flush=True)
    return manifest

# =============================================================================
# Token cache: every cached shard tokenized once, at prepare time
# =============================================================================
# Per shard, under tokens/<tokenizer id>/ (the id is a hash of tokenizer.pkl, so a
# new tokenizer never reads old tokens):
#   NAME.tokens.npy   uint16, all documents back to back, each with BOS in front
#   NAME.offsets.npy  int64 [docs + 1], where each document starts
#   NAME.json         written last: the shard's size and mtime, docs per row group,
#                     the token count and the sha256 of both .npy files
# The row-group counts let the loader rebuild the published 128-document
# batches (which restart at every row group) exactly. Every load checks the
# structure (cheap); prepare.py and verify_data() also check the content hashes.


def _cache_base(tokenizer_id, path):
    return os.path.join(TOKENS_DIR, tokenizer_id, os.path.basename(path)[:-len(".parquet")])


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
    pf = _open_parquet(path)
    texts, counts = [], []
    for rg in range(pf.num_row_groups):
        rg_texts = read_texts(pf, rg)
        texts += rg_texts
        counts.append(len(rg_texts))
    arrays = _encode_arrays(tokenizer, texts, pool, threads)
    tokens, offsets = _pack_documents(arrays, tokenizer.get_bos_token_id())
    base = _cache_base(tokenizer.id, path)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    _write_atomic(base + ".tokens.npy", lambda f: np.save(f, tokens))
    _write_atomic(base + ".offsets.npy", lambda f: np.save(f, offsets))
    _write_json(base + ".json", {"shard": _stamp(path), "row_groups": counts, "tokens": int(len(tokens)),
                                 "sha256": {part: _sha256(f"{base}.{part}.npy") for part in ("tokens", "offsets")}})
    return len(tokens)


NOT_CACHED = "not cached"  # the one problem that is no fault: prepare.py has not tokenized the shard


def _token_cache_fault(tokenizer, base, tokens, offsets, meta):
    """What is structurally wrong with a cached shard's arrays, or None. One pass
    over the tokens (ids below the vocabulary); the offsets are small."""
    name = os.path.relpath(base, CACHE_DIR)
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
    meta = _read_json(base + ".json")
    if meta is None:
        return None, NOT_CACHED
    try:
        if meta["shard"] != _stamp(path):
            return None, NOT_CACHED  # the shard changed since: tokenized again, not a fault
        tokens = np.load(base + ".tokens.npy", mmap_mode="r")
        offsets = np.load(base + ".offsets.npy")
        problem = _token_cache_fault(tokenizer, base, tokens, offsets, meta)
        if problem is None and content:
            recorded = meta.get("sha256") or {}
            for part in ("tokens", "offsets"):
                if _sha256(f"{base}.{part}.npy") != recorded.get(part):
                    problem = (f"{os.path.relpath(base, CACHE_DIR)}.{part}.npy differs from the sha256 recorded"
                               if part in recorded else f"{os.path.relpath(base, CACHE_DIR)}.json records no sha256")
                    break
    except Exception as e:  # any damage to these files reads as "not trusted", never as a crash
        problem = f"{os.path.relpath(base, CACHE_DIR)}.*: unreadable ({type(e).__name__}: {e})"
    if problem is not None:
        return None, problem
    return (tokens, offsets, meta["row_groups"]), None


def load_token_cache(tokenizer, path):
    """(tokens memmap, offsets, docs per row group) of a cached shard, or None
    when it is missing, stale or damaged (the loader then tokenizes the shard
    on the fly: same rows, slower; verify_data() stops a run before that)."""
    return check_token_cache(tokenizer, path)[0]


def check_token_caches(tokenizer, paths):
    """check_token_cache(content=True) for every path, in threads (hashing and
    numpy release the GIL): [(cached, problem), ...] in the order of paths."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda p: check_token_cache(tokenizer, p, content=True), paths))


def cached_shards(train_paths):
    """The shards prepare tokenizes ahead of time: the first training shards and val."""
    return train_paths[:TOKEN_CACHE_SHARDS] + list_shards("val")


def ensure_token_cache(tokenizer, paths):
    """Tokenize the shards not cached yet; drop caches of other tokenizers."""
    if os.path.isdir(TOKENS_DIR):
        for name in os.listdir(TOKENS_DIR):
            if name != tokenizer.id:
                shutil.rmtree(os.path.join(TOKENS_DIR, name), ignore_errors=True)
    todo = []
    for path, (cached, problem) in zip(paths, check_token_caches(tokenizer, paths)):
        if cached is None:
            todo.append(path)
            if problem != NOT_CACHED:
                print(f"tokens: {problem}; rebuilding it", flush=True)
    print(f"tokens: {len(paths) - len(todo)} of {len(paths)} shards cached in {TOKENS_DIR}", flush=True)
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
# Dataloader: best-fit packing, same rows as the published algorithm
# =============================================================================


def _document_batches(tokenizer, paths, split):
    """(tokens, offsets, epoch) for every batch of DOC_BATCH documents, in the
    published order: shard -> row group -> 128-document batch, forever. A batch
    is the documents tokens[offsets[j]:offsets[j+1]], each starting with BOS.
    Cached shards are read from the token cache, others tokenized on the fly."""
    bos = tokenizer.get_bos_token_id()
    epoch = 1
    while True:
        n_docs = 0
        for path in paths:
            cached = load_token_cache(tokenizer, path)
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
            pf = _open_parquet(path)
            for rg in range(pf.num_row_groups):
                texts = read_texts(pf, rg)
                for a in range(0, len(texts), DOC_BATCH):
                    ids = tokenizer.encode(texts[a:a + DOC_BATCH], prepend=bos)
                    lengths = [len(x) for x in ids]
                    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16, count=sum(lengths))
                    yield tokens, np.cumsum([0] + lengths), epoch
                n_docs += len(texts)
        if n_docs == 0:
            raise PrepareError(f"the {split} split has no documents ({len(paths)} shards, all empty)")
        epoch += 1


def _replay_small_split(batches):
    """Pass (tokens, offsets, epoch) batches through; when a whole epoch holds
    fewer than BUFFER_DOCS documents, replay it from memory from then on.
    A split that small is walked once per placed document (the buffer wants
    BUFFER_DOCS), and re-reading its shards each time made two one-line files
    take ~10 minutes to pack the validation rows. Same batches, same rows."""
    seen, n_docs = [], 0
    for tokens, offsets, epoch in batches:
        if epoch > 1:
            break
        yield tokens, offsets, epoch
        seen.append((tokens, offsets))
        n_docs += len(offsets) - 1
        if n_docs >= BUFFER_DOCS:
            yield from batches
            return
    for epoch in itertools.count(2):
        for tokens, offsets in seen:
            yield tokens, offsets, epoch


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
        self.batches = _replay_small_split(batches)  # iterator of (tokens, offsets, epoch)
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


def make_dataloader(tokenizer, B, T, split, device=None):
    """Infinite iterator of (inputs, targets, epoch): B x T int64 on device
    (default CUDA when present, else CPU); inputs = row[:-1], targets = row[1:].

    A background thread packs rows into a small pool of host buffers (pinned on
    CUDA) while the model runs. Every yielded tensor is freshly allocated, so a
    caller may keep a batch across next(); a pinned buffer is reused only after
    the CUDA event recorded behind its copy has completed."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    assert B >= 1 and T >= 1, f"B and T must be positive, got B={B}, T={T}"
    paths = list_shards(split)  # fails here, clearly, when nothing is prepared
    device = torch.device(device) if device is not None else _default_device()
    packer = BestFitPacker(_document_batches(tokenizer, paths, split))
    return _prefetch(packer, B, T, device)


def _prefetch(packer, B, T, device):
    cuda = device.type == "cuda"
    buffers = [torch.empty((B, T + 1), dtype=torch.int32, pin_memory=cuda) for _ in range(LOADER_POOL)]
    free, ready = queue.Queue(), queue.Queue()
    for i in range(LOADER_POOL):
        free.put((i, None))
    stop = threading.Event()

    def worker():
        try:
            while not stop.is_set():
                try:
                    i, event = free.get(timeout=0.1)
                except queue.Empty:
                    continue
                if event is not None:
                    event.synchronize()  # the copy out of this buffer has finished
                ready.put((i, packer.fill(buffers[i].numpy())))
        except BaseException as e:  # handed to the consumer, raised there
            ready.put((None, e))

    threading.Thread(target=worker, name="dataloader", daemon=True).start()
    try:
        while True:
            i, epoch = ready.get()
            if i is None:
                raise epoch
            event = None
            if cuda:  # int32 over PCIe, widened on the device; fresh tensors every time
                row = buffers[i].to(device, non_blocking=True)  # (B, T+1)
                event = torch.cuda.Event()
                event.record()
                inputs = row[:, :-1].to(torch.int64, memory_format=torch.contiguous_format)
                targets = row[:, 1:].to(torch.int64, memory_format=torch.contiguous_format)
            else:  # numpy widens a strided view many times faster than torch on few cores
                row = buffers[i].numpy()
                inputs = torch.from_numpy(row[:, :-1].astype(np.int64, order="C"))
                targets = torch.from_numpy(row[:, 1:].astype(np.int64, order="C"))
            free.put((i, event))
            yield inputs, targets, epoch
    finally:
        stop.set()

# =============================================================================
# Evaluation: the metric (DO NOT MODIFY)
# =============================================================================
# val_bpb is computed on the first EVAL_TOKENS // MAX_SEQ_LEN rows the validation
# loader produces at T = MAX_SEQ_LEN, whatever the batch size. prepare.py stores
# those rows (tokens/<id>/val_rows_T{T}_N{N}.npy, with their sha256 in the .json);
# when missing they are packed on the fly: same rows, same number. Before the
# first batch counts, the model must show it is causal; a result that is not a
# finite number is a failure, never a score.


def _val_rows_path(tokenizer, T, N):
    return os.path.join(TOKENS_DIR, tokenizer.id or "none", f"val_rows_T{T}_N{N}.npy")


def build_val_rows(tokenizer, T, N):
    """The first N rows (N, T+1) of the validation loader, packed directly."""
    rows = np.empty((N, T + 1), dtype=np.uint16)
    BestFitPacker(_document_batches(tokenizer, list_shards("val"), "val")).fill(rows)
    return rows


def check_val_rows(tokenizer, T, N):
    """(rows, problem): the cached validation rows when they match the tokenizer,
    the val shard and (T, N) and hash to the sha256 recorded with them; else None
    with NOT_CACHED or one phrase naming the fault. The .json is written after
    the .npy: no json, no trust."""
    path = _val_rows_path(tokenizer, T, N)
    meta = _read_json(path[:-len(".npy")] + ".json")
    if tokenizer.id is None or meta is None or meta.get("val") != _stamp(list_shards("val")[0]):
        return None, NOT_CACHED
    name = os.path.relpath(path, CACHE_DIR)
    try:
        if "sha256" not in meta:
            return None, f"{name[:-len('.npy')]}.json records no sha256"
        if _sha256(path) != meta["sha256"]:
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


def val_rows(tokenizer, T, N, save=True):
    """Validation rows from the cache when valid; else packed now (and cached when save)."""
    rows = cached_val_rows(tokenizer, T, N)
    if rows is not None:
        return rows
    path = _val_rows_path(tokenizer, T, N)
    meta_path = path[:-len(".npy")] + ".json"
    val_stamp = _stamp(list_shards("val")[0])
    rows = build_val_rows(tokenizer, T, N)
    if save and tokenizer.id is not None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_atomic(path, lambda f: np.save(f, rows))
            _write_json(meta_path, {"val": val_stamp, "T": T, "N": N, "sha256": _sha256(path)})
        except OSError:
            pass  # a read-only cache only costs the packing next time
    return rows


class EvaluationFailed(SystemExit):
    """The metric refuses the model. Uncaught, it prints its one line, which
    starts with "FAIL: ", and exits with code 1: a failed run, never a score."""

    def __init__(self, message):
        super().__init__(f"FAIL: {message}")


def _eval_batch(rows, start, batch_size):
    """Rows start, start+1, ... of (N, T+1) rows as (x, y), both (batch_size, T)
    int64, and how many of them are real. Every batch is full: past the last row
    it wraps around to the first, so a model compiled for batch_size never sees
    another shape; the caller drops the padding's losses."""
    index = torch.arange(start, start + batch_size, device=rows.device) % rows.shape[0]
    batch = rows[index].long()  # (B, T+1)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), min(batch_size, rows.shape[0] - start)


def _token_losses(model, x, y):
    """model(x, y, reduction='none') as (B, T) float32 nats, detached: the model
    may return them with gradients (its training graph) or in bf16."""
    loss = model(x, y, reduction="none")
    if not isinstance(loss, torch.Tensor) or loss.numel() != x.numel():
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise EvaluationFailed(f"model(x, y, reduction='none') must return the {x.numel()} per-token losses of "
                               f"x {tuple(x.shape)}, got {got}")
    return loss.detach().float().reshape(x.shape)


def _check_causal(model, x, y, losses, vocab_size):
    """A model may not see the future: change the tokens after position p = T/2 of
    row 0 (inputs and targets), run the same full batch again, and the losses at
    positions <= p of row 0, and everywhere in the other rows, must stay within
    CAUSAL_ATOL + CAUSAL_RTOL * |loss|. A missing causal mask changes every one of
    them; a window that reaches one token ahead changes position p."""
    p = x.shape[1] // 2
    x2, y2 = x.clone(), y.clone()
    x2[0, p + 1:] = (x[0, p + 1:] + 1) % vocab_size  # a different, valid id everywhere after p
    y2[0, p + 1:] = (y[0, p + 1:] + 1) % vocab_size
    change = (_token_losses(model, x2, y2) - losses).abs()  # (B, T)
    change[0, p + 1:] = 0  # these may change: their own inputs did
    # NaN losses are the finiteness check's to report, not this one's.
    excess = (change - (CAUSAL_ATOL + CAUSAL_RTOL * losses.abs())).nan_to_num(nan=0.0)
    worst = int(excess.argmax())
    if excess.view(-1)[worst] > 0:
        row, pos = divmod(worst, x.shape[1])
        where = f"position {pos}" if row == 0 else f"position {pos} of another row of the batch (rows must not mix)"
        raise EvaluationFailed(f"the model is not causal: its loss at {where} changed by "
                               f"{float(change.view(-1)[worst]):.3g} nats when only the tokens after position {p} "
                               f"changed (a missing causal mask, a window that reaches ahead, or dropout?)")


@torch.no_grad()
def _evaluate(model, tokenizer, batch_size, max_batches=None):
    """val_bpb over the first max_batches batches (all when None); see evaluate_bpb."""
    assert batch_size >= 1, f"batch_size must be positive, got {batch_size}"
    device = next(model.parameters()).device
    T, N = MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN
    token_bytes = get_token_bytes(device)
    rows = val_rows(tokenizer, T, N)
    if max_batches is not None:  # the warm-up's check needs only its batches' rows, not all N on the device
        rows = rows[:batch_size * max_batches]
    rows = torch.from_numpy(np.asarray(rows, dtype=np.int32)).to(device)  # (N or fewer, T+1)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for i, start in enumerate(range(0, N, batch_size)[:max_batches]):
        x, y, n = _eval_batch(rows, start, batch_size)
        losses = _token_losses(model, x, y)  # (B, T)
        if i == 0:
            _check_causal(model, x, y, losses, tokenizer.get_vocab_size())
        nbytes = token_bytes[y[:n]]  # (n, T)
        total_nats += torch.where(nbytes > 0, losses[:n], 0.0).sum(dtype=torch.float64)
        total_bytes += nbytes.sum()
    if total_bytes.item() == 0:
        raise EvaluationFailed("the validation rows hold no bytes to measure")
    bpb = total_nats.item() / (math.log(2) * total_bytes.item())
    if not math.isfinite(bpb):
        raise EvaluationFailed(f"val_bpb is {bpb}: the model's losses on the validation rows are not finite")
    return bpb


def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte on the validation rows: the summed loss (nats) over target
    tokens that stand for at least one byte, over ln 2 times their bytes.
    Vocabulary-independent; special tokens (0 bytes) are left out of both sums.

    The model is called as model(x, y, reduction='none') on full batches of
    batch_size rows only. Before the first batch counts, the causality check
    runs once (_check_causal). A model that fails it, or a result that is not
    finite, raises EvaluationFailed: one line starting "FAIL: ", exit code 1."""
    return _evaluate(model, tokenizer, batch_size)


def check_evaluation(model, tokenizer, batch_size):
    """The start of evaluate_bpb, for train.py's untimed warm-up: the causality
    check and the first batch, through the same code with the same shapes (a
    compiled model compiles nothing new later). Returns that batch's bits per
    byte; raises EvaluationFailed like evaluate_bpb.

    The check sees only what the weights let through: at initialisation, with
    zero output projections, attention cannot leak yet. Call it after the first
    optimizer steps; evaluate_bpb checks the trained model again."""
    return _evaluate(model, tokenizer, batch_size, max_batches=1)

# =============================================================================
# Fingerprints and verification (train.py calls verify_data before training)
# =============================================================================
# prepare.py records in manifest.json the sha256 of the validation shard and of
# the harness files, and the tokenizer id; the tokenizer manifest, each token
# cache's .json and the validation rows' .json hold the hashes of their files.
# verify_data() checks every one of them by content, before any training.


def harness_fingerprints():
    """sha256 of each harness file next to prepare.py; None for a missing one."""
    paths = {name: os.path.join(HARNESS_DIR, name) for name in HARNESS_FILES}
    return {name: _sha256(path) if os.path.exists(path) else None for name, path in paths.items()}


def _check_harness(recorded):
    """Compare the harness files with the hashes prepare.py recorded. Returns
    {file: short sha or "missing"}; raises one line naming the changed file."""
    if not isinstance(recorded, dict):
        raise PrepareError(f"prepare.py has recorded no fingerprints of the harness files in {CACHE_DIR}: "
                           f"run `uv run prepare.py`")
    now = harness_fingerprints()
    for name, sha in now.items():
        if sha == recorded.get(name):
            continue
        fix = f"restore it (git checkout {name}), or run `uv run prepare.py` to accept a deliberate change"
        if sha is None:
            raise PrepareError(f"{name} is missing, but prepare.py recorded it: {fix}")
        if recorded.get(name) is None:
            raise PrepareError(f"{name} is new since prepare.py recorded the harness: remove it, "
                               f"or run `uv run prepare.py` to accept a deliberate change")
        raise PrepareError(f"{name} differs from the one prepare.py recorded: {fix}")
    return {name: sha[:12] if sha else "missing" for name, sha in now.items()}


def _fetch_command():
    """The command that fetches a shard again: the import when the data was imported."""
    imported = _read_json(os.path.join(DATA_DIR, "source.json"))
    return f"`uv run prepare.py --source {imported['source']}`" if imported else "`uv run prepare.py`"


def verify_data():
    """Check, by content, everything val_bpb depends on against what prepare.py
    recorded: the validation shard, tokenizer.pkl, token_bytes.pt, every cached
    shard's tokens (structure and sha256), the validation rows; and the harness
    files. Returns the run's fingerprints:
    {"val": short sha, "tokenizer": short id, "train_shards": int, "harness": {file: short sha}}.
    On any failure raises PrepareError: one line naming the file and the command
    that heals it. Cost: one sha256 pass over those files, the token caches in
    parallel threads."""
    manifest = _read_json(os.path.join(CACHE_DIR, "manifest.json"))
    if manifest is None:
        raise PrepareError(f"no manifest.json in {CACHE_DIR}: {RUN_PREPARE}")
    harness = _check_harness(manifest.get("harness"))
    val_path, train_paths = list_shards("val")[0], list_shards("train")
    val_sha = _sha256(val_path)
    if val_sha != (manifest.get("val") or {}).get("sha256"):
        if not _parquet_readable(val_path):
            raise PrepareError(f"the validation shard {val_path} is not a readable parquet file (truncated?): "
                               f"run {_fetch_command()}")
        raise PrepareError(f"the validation shard {val_path} differs from the one prepare.py recorded: to restore "
                           f"it, remove it and run {_fetch_command()}; to accept the change, run `uv run prepare.py`")
    tokenizer = Tokenizer.from_directory()  # checks tokenizer.pkl against its manifest
    if tokenizer.id != manifest.get("tokenizer"):
        raise PrepareError(f"the tokenizer in {TOKENIZER_DIR} is not the one prepare.py recorded: "
                           f"run `uv run prepare.py`")
    get_token_bytes()  # checks token_bytes.pt against the tokenizer manifest
    paths = cached_shards(train_paths)
    for path, (cached, problem) in zip(paths, check_token_caches(tokenizer, paths)):
        if cached is None:
            raise PrepareError(f"token cache of {os.path.basename(path)}: {problem}: "
                               f"run `uv run prepare.py` to rebuild it")
    T, N = MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN
    rows, problem = check_val_rows(tokenizer, T, N)
    if problem == NOT_CACHED:
        val_rows(tokenizer, T, N)  # other constants (a smoke run): packed once, from the caches just checked
    elif problem is not None:
        raise PrepareError(f"validation rows {problem}: run `uv run prepare.py` to rebuild them")
    return {"val": val_sha[:12], "tokenizer": tokenizer.id[:12], "train_shards": len(train_paths),
            "harness": harness}


def _check_val_shard(val_path):
    """The validation shard's sha256, from its content (an mtime can be kept while
    bytes change). When it differs from the one recorded, the token cache and
    rows made from the old shard are dropped, so they are rebuilt from this one."""
    sha = _sha256(val_path)
    old = ((_read_json(os.path.join(CACHE_DIR, "manifest.json")) or {}).get("val") or {}).get("sha256")
    if old is not None and old != sha:
        print(f"data: the validation shard changed since the last prepare ({old[:12]} -> {sha[:12]}); "
              f"rebuilding its token cache and rows", flush=True)
        stem = os.path.join(TOKENS_DIR, "*", "")
        for meta in glob.glob(stem + VAL_FILENAME[:-len(".parquet")] + ".json") + glob.glob(stem + "val_rows_*.json"):
            os.remove(meta)  # no json, no trust
    return sha


def _record_fingerprints(val_path, val_sha, tokenizer, train_paths):
    """Write manifest.json, what verify_data() checks against, when anything in it
    changed; returns True if so. Running prepare.py accepts a changed harness file,
    and says so."""
    path = os.path.join(CACHE_DIR, "manifest.json")
    old = _read_json(path) or {}
    harness = harness_fingerprints()
    if isinstance(old.get("harness"), dict):
        for name, sha in harness.items():
            before = old["harness"].get(name)
            if sha != before:
                print(f"harness: {name} changed since the last prepare ({(before or 'missing')[:12]} -> "
                      f"{(sha or 'missing')[:12]}); recorded", flush=True)
    record = {"val": {"name": VAL_FILENAME, "stamp": _stamp(val_path), "sha256": val_sha}, "tokenizer": tokenizer.id,
              "train_shards": [os.path.basename(p) for p in train_paths], "harness": harness}
    if record == old:
        return False
    _write_json(path, record)
    return True


data_fingerprint = verify_data  # the name train.py imported before verify_data existed

# =============================================================================
# prepare: data -> tokenizer -> token cache -> validation rows
# =============================================================================


def check_val_split(tokenizer, val_path):
    """Refuse a validation split too small for val_bpb to mean anything (below
    MIN_VAL_FRACTION of EVAL_TOKENS, or one row), and say in one line when it is
    smaller than EVAL_TOKENS, i.e. cycled. Counts text tokens (BOS excluded)."""
    cached = load_token_cache(tokenizer, val_path)
    if cached is None:  # ensure_token_cache has just written it; nothing to count otherwise
        return
    tokens, offsets = cached[0], cached[1]
    docs = len(offsets) - 1
    n = len(tokens) - docs
    minimum = max(math.ceil(EVAL_TOKENS * MIN_VAL_FRACTION), MAX_SEQ_LEN + 1)
    size = f"{docs:,} documents, {n:,} tokens"
    if n < minimum:
        raise PrepareError(f"the validation split is too small for val_bpb: {size}; it needs at least {minimum:,} "
                           f"tokens ({MIN_VAL_FRACTION:.0%} of EVAL_TOKENS={EVAL_TOKENS:,}, and one full row); "
                           f"add data (the last parquet file, or the last 10% of documents, is validation)")
    if n < EVAL_TOKENS:
        print(f"val split: {size}, fewer than the {EVAL_TOKENS:,} tokens val_bpb scores: each token counts about "
              f"{EVAL_TOKENS / n:.1f} times (a larger split gives a steadier number)", flush=True)


def prepare(num_shards=10, download_workers=8, source=None, retrain_tokenizer=False, text_ext=()):
    """The whole one-time preparation; returns True when anything changed.
    text_ext: extra extensions --source imports as plain text (".py", ...)."""
    t0 = time.time()
    _make_folder(CACHE_DIR)
    imported = _import_state() if source is None else None  # a re-import heals an unreadable record
    if source is not None:
        changed = import_source(source, text_ext)
    elif imported is not None:
        _check_import_finished()
        print(f"data: using the data imported from {imported['source']} "
              f"(re-import with --source; remove {DATA_DIR} to download instead)", flush=True)
        changed = False
    else:
        changed = download_data(num_shards, download_workers)
    train_paths, val_path = list_shards("train"), list_shards("val")[0]
    for path in train_paths + [val_path]:
        _open_parquet(path)  # a corrupt file is named here, not deep in training
    val_sha = _check_val_shard(val_path)

    changed |= _repair_token_bytes()
    manifest = _tokenizer_state()
    if manifest is None or retrain_tokenizer:
        manifest = train_tokenizer(train_paths)
        changed = True
    else:
        difference = _tokenizer_input_changed(manifest, train_paths)
        if difference:
            print(f"tokenizer: {difference}; keeping it so results stay comparable "
                  f"(retrain: uv run prepare.py --retrain-tokenizer)", flush=True)
        else:
            print(f"tokenizer: up to date ({manifest['id']}, vocab {manifest['vocab_size']})", flush=True)
    tokenizer = Tokenizer.from_directory()

    changed |= ensure_token_cache(tokenizer, cached_shards(train_paths))
    check_val_split(tokenizer, val_path)
    T, N = MAX_SEQ_LEN, EVAL_TOKENS // MAX_SEQ_LEN
    rows, problem = check_val_rows(tokenizer, T, N)
    if problem not in (None, NOT_CACHED):
        print(f"val rows: {problem}; rebuilding them", flush=True)
    if changed or rows is None:
        val_rows(tokenizer, T, N)
        changed = True
    print(f"val rows: {N} rows of {T + 1} tokens cached", flush=True)

    changed |= _record_fingerprints(val_path, val_sha, tokenizer, train_paths)
    if changed:
        print(f"prepare: done in {time.time() - t0:.1f} s  (val {val_sha[:12]}, tokenizer {tokenizer.id[:12]}, "
              f"{len(train_paths)} training shards) in {CACHE_DIR}", flush=True)
    else:
        print(f"prepare: nothing to do, everything is up to date in {CACHE_DIR}", flush=True)
    return changed


@contextlib.contextmanager
def cache_lock():
    """An exclusive lock on the cache root for a whole prepare run: two runs at
    once (say from two sources) would mix their shards. The second one says so
    and waits; the lock goes with the process, however it ends."""
    path = os.path.join(CACHE_DIR, ".prepare.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise PrepareError(f"cannot open the lock file {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"prepare: another prepare.py is working on {CACHE_DIR}; waiting for it to finish "
                  f"(Ctrl-C to give up)", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. a file system without locks
            raise PrepareError(f"cannot lock {path}: {e.strerror}; run one prepare.py at a time") from None
        yield
    finally:
        os.close(fd)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 1, like every other bad input
        raise PrepareError(f"{message} (see uv run prepare.py --help)")


def main(argv=None):
    parser = _ArgumentParser(description="Download (or import) data, train the tokenizer, cache tokens.")
    parser.add_argument("--num-shards", type=int, default=10, help="training shards to download (-1: all 6542)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--source", metavar="PATH", default=None,
                        help="import local data instead: a folder or glob of .parquet (column 'text'; the last "
                             "file is validation), .txt/.md (one document each) or .jsonl ('text' per line)")
    parser.add_argument("--text-ext", metavar="EXT[,EXT]", action="append", default=[],
                        help="with --source: also import files with these extensions as UTF-8 text, one "
                             "document each (e.g. --text-ext py,rs,c); repeatable")
    parser.add_argument("--retrain-tokenizer", action="store_true",
                        help="train the tokenizer again even though one exists")
    args = parser.parse_args(argv)
    if args.download_workers < 1:
        raise PrepareError(f"--download-workers must be at least 1, got {args.download_workers}")
    if args.num_shards < -1:
        raise PrepareError(f"--num-shards must be -1 (all) or >= 0, got {args.num_shards}")
    extensions = text_extensions(args.text_ext)
    if extensions and args.source is None:
        raise PrepareError("--text-ext only applies to an import: add --source PATH")
    try:
        _make_folder(CACHE_DIR)
        with cache_lock():
            _sweep_stale_temporaries()
            prepare(args.num_shards, args.download_workers, args.source, args.retrain_tokenizer, extensions)
    except KeyboardInterrupt:
        # Nothing half-written is trusted later (see the module docstring).
        print("\nprepare: interrupted; run the same command again to finish", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:  # the machine, not the code: permissions, a full disk outside _new_file, ...
        where = str(e.filename or CACHE_DIR)
        if _is_disk_full(e):
            raise _disk_full(os.path.dirname(where), os.path.basename(where), None, 0) from None
        raise PrepareError(f"{where}: {e.strerror or e}") from None
    finally:
        _remove_temporaries(_LIVE_TEMPORARIES.copy())  # those of stopped download workers


if __name__ == "__main__":
    main()

