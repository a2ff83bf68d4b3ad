"""
Where the prepared data lives: the cache root and its folders, the shard files
in data/, which of them form each split, and whether a --source import that
wrote them finished. DO NOT MODIFY (fixed harness).

The cache root (~/.cache/autoresearch, or $AUTORESEARCH_CACHE) holds:

    data/shard_NNNNN.parquet      documents (column "text"); shard_06542 is validation
    data/source.json              only for --source imports: where the data came from
    tokenizer/tokenizer.pkl       pickled tiktoken.Encoding (BPE trained with rustbpe)
    tokenizer/token_bytes.pt      int32 [vocab]: raw bytes per token, 0 for special tokens
    tokenizer/manifest.json       written last: hashes, and the shards it was trained on
    tokens/<tokenizer id>/        token cache: every cached shard tokenized once, and
                                  the validation rows behind val_bpb
    manifest.json                 written last: fingerprints of the prepared data
    .prepare.lock                 held by the one prepare run working on the cache

A run killed at any moment leaves nothing a later run trusts: files are
written to a fresh temporary name and renamed, manifests are written last.
A second run with nothing to do says so and changes nothing. One run at a
time holds the cache (.prepare.lock); another one waits.

The folders are module attributes that set_cache_root moves together (the
import reads $AUTORESEARCH_CACHE; tests call it), so always read them as
paths.DATA_DIR at call time, never copy them. Imported by prepare.py and the
other autoresearch modules; it imports only autoresearch.files and .environment.
"""

import os
import re

from autoresearch import environment
from autoresearch.files import RUN_PREPARE, PrepareError, read_json

MAX_SHARD = 6542                      # shards are shard_00000 ... shard_06542
VAL_SHARD = MAX_SHARD                 # pinned validation shard, always fetched
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"
SHARD_RE = re.compile(r"shard_\d{5}\.parquet")


def set_cache_root(root):
    """Point every folder at a cache root."""
    global CACHE_DIR, DATA_DIR, TOKENIZER_DIR, TOKENS_DIR
    CACHE_DIR = os.path.abspath(os.path.expanduser(root))
    DATA_DIR = os.path.join(CACHE_DIR, "data")
    TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
    TOKENS_DIR = os.path.join(CACHE_DIR, "tokens")


set_cache_root(environment.text("AUTORESEARCH_CACHE", "~/.cache/autoresearch"))


def make_folder(path):
    """os.makedirs with one clear line when a file stands where a folder must be."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        what = "the cache root" if path == CACHE_DIR else "the cache folder"
        raise PrepareError(f"{what} {path} is (or lies under) a file, not a folder: move that file away "
                           f"or set AUTORESEARCH_CACHE to another folder") from None

# =============================================================================
# The shards in data/ and the two splits
# =============================================================================


def import_state():
    """data/source.json: None when the data was downloaded. An import whose
    record cannot be read is still an import: treating it as downloaded data
    would mix downloads into it, so it stops here with one line."""
    path = os.path.join(DATA_DIR, "source.json")
    if not os.path.lexists(path):
        return None
    state = read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("source"), str) \
            or not isinstance(state.get("shards"), list):
        raise PrepareError(f"{path} is unreadable, so the data in {DATA_DIR} (imported with --source) cannot "
                           f"be trusted: import it again with `uv run prepare.py --source PATH`, or remove "
                           f"{DATA_DIR} to download instead")
    return state


def check_import_finished():
    """A --source import that was killed half-way leaves shards no run may use."""
    imported = import_state()
    if imported is not None and not imported.get("complete"):
        raise PrepareError(f"the import from {imported['source']} did not finish: "
                           f"run `uv run prepare.py --source {imported['source']}` again")


def shard_path(index):
    return os.path.join(DATA_DIR, f"shard_{index:05d}.parquet")


def existing_shards():
    if not os.path.isdir(DATA_DIR):
        return []
    return sorted(f for f in os.listdir(DATA_DIR) if SHARD_RE.fullmatch(f))


def list_shards(split):
    """Parquet files of a split: 'val' is the pinned shard, 'train' every other shard."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    names = existing_shards()
    if not names:
        raise PrepareError(f"no data in {DATA_DIR}: {RUN_PREPARE}")
    check_import_finished()
    if split == "val":
        if VAL_FILENAME not in names:
            raise PrepareError(f"validation shard {VAL_FILENAME} missing in {DATA_DIR}: {RUN_PREPARE}")
        return [os.path.join(DATA_DIR, VAL_FILENAME)]
    train = [os.path.join(DATA_DIR, n) for n in names if n != VAL_FILENAME]
    if not train:
        raise PrepareError(f"the training split is empty: {DATA_DIR} holds only the validation shard; {RUN_PREPARE}")
    return train
