"""
The cache manifest and the fingerprints verify_data() checks: the validation
shard's sha256, the tokenizer id, the training shards, and the sha256 of every
fixed harness file (constants.py, prepare.py and this package). prepare.py
records them in manifest.json, written last; the checks here compare them by
content and name the file and the command that heals it. DO NOT MODIFY (fixed
harness).

Imported by prepare.py (and its tests) and autoresearch/live.py; it imports
autoresearch.files, autoresearch.paths and autoresearch.tokencache.
"""

import glob
import os

from autoresearch import paths
from autoresearch.files import RUN_PREPARE, PrepareError, parquet_readable, read_json, sha256, stamp, write_json
from autoresearch.tokencache import check_token_caches, read_through

# The fixed harness: prepare.py records these files' sha256 in the cache manifest,
# verify_data() refuses a run when one differs (a missing file is recorded as missing).
HARNESS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def _manifest_path():
    return os.path.join(paths.CACHE_DIR, "manifest.json")


def read_manifest():
    """manifest.json, or one line saying that prepare.py has not run."""
    manifest = read_json(_manifest_path())
    if manifest is None:
        raise PrepareError(f"no manifest.json in {paths.CACHE_DIR}: {RUN_PREPARE}")
    return manifest

# =============================================================================
# The harness files
# =============================================================================


def harness_files():
    """constants.py, prepare.py and every module of autoresearch/ (sorted), as
    paths relative to HARNESS_DIR, the names the fingerprints are kept under."""
    package = glob.glob(os.path.join(HARNESS_DIR, "autoresearch", "*.py"))
    return ("constants.py", "prepare.py", *sorted(os.path.relpath(p, HARNESS_DIR) for p in package))


def harness_fingerprints():
    """sha256 of each harness file under HARNESS_DIR; None for a missing one."""
    files = {name: os.path.join(HARNESS_DIR, name) for name in harness_files()}
    return {name: sha256(path) if os.path.exists(path) else None for name, path in files.items()}


def check_harness(recorded):
    """Compare the harness files with the hashes prepare.py recorded. Returns
    {file: short sha or "missing"}; raises one line naming the changed file."""
    if not isinstance(recorded, dict):
        raise PrepareError(f"prepare.py has recorded no fingerprints of the harness files in {paths.CACHE_DIR}: "
                           f"run `uv run prepare.py`")
    now = harness_fingerprints()
    for name in dict.fromkeys([*now, *recorded]):  # a recorded module that is gone counts as missing
        sha = now.get(name)
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

# =============================================================================
# The checks verify_data() runs
# =============================================================================


def _fetch_command():
    """The command that fetches a shard again: the import when the data was imported."""
    imported = read_json(os.path.join(paths.DATA_DIR, "source.json"))
    return f"`uv run prepare.py --source {imported['source']}`" if imported else "`uv run prepare.py`"


def check_val_shard(val_path, manifest):
    """The validation shard's sha256 when it is the one manifest records; else
    one line saying whether to fetch it again or accept the change."""
    val_sha = sha256(val_path)
    if val_sha != (manifest.get("val") or {}).get("sha256"):
        if not parquet_readable(val_path):
            raise PrepareError(f"the validation shard {val_path} is not a readable parquet file (truncated?): "
                               f"run {_fetch_command()}")
        raise PrepareError(f"the validation shard {val_path} differs from the one prepare.py recorded: to restore "
                           f"it, remove it and run {_fetch_command()}; to accept the change, run `uv run prepare.py`")
    return val_sha


def check_val_not_training(val_path, val_sha, train_paths):
    """The validation shard may not also be a training shard, under any name: a model trained on
    it would be scored on what it saw. Sizes first; a sha256 only for a shard of the same size."""
    size = os.path.getsize(val_path)
    for path in train_paths:
        if os.path.getsize(path) == size and sha256(path) == val_sha:
            raise PrepareError(f"the training shard {path} is a copy of the validation shard: a model trained on it "
                               f"would be scored on data it has seen; remove it and run {_fetch_command()}")


def check_token_cache_files(tokenizer, shards):
    """Every cached shard's tokens, by structure and sha256 (in threads); one
    line naming the first that fails."""
    for path, (cached, problem) in zip(shards, check_token_caches(tokenizer, shards)):
        if cached is None:
            raise PrepareError(f"token cache of {os.path.basename(path)}: {problem}: "
                               f"run `uv run prepare.py` to rebuild it")

# =============================================================================
# Recording (prepare.py)
# =============================================================================


def fingerprint_val_shard(val_path):
    """The validation shard's sha256, from its content (an mtime can be kept while
    bytes change). When it differs from the one recorded, the token cache and
    rows made from the old shard are dropped, so they are rebuilt from this one."""
    sha = sha256(val_path)
    old = ((read_json(_manifest_path()) or {}).get("val") or {}).get("sha256")
    if old is not None and old != sha:
        print(f"data: the validation shard changed since the last prepare ({old[:12]} -> {sha[:12]}); "
              f"rebuilding its token cache and rows", flush=True)
        stem = os.path.join(paths.TOKENS_DIR, "*", "")
        val_meta = stem + paths.VAL_FILENAME[:-len(".parquet")] + ".json"
        for meta in glob.glob(val_meta) + glob.glob(stem + "val_rows_*.json"):
            os.remove(meta)  # no json, no trust
    return sha


def record_fingerprints(val_path, val_sha, tokenizer, train_paths):
    """Write manifest.json, what verify_data() checks against, when anything in it
    changed; returns True if so. Running prepare.py accepts a changed harness file,
    and says so."""
    path = _manifest_path()
    old = read_json(path) or {}
    harness = harness_fingerprints()
    if isinstance(old.get("harness"), dict):
        for name in dict.fromkeys([*harness, *old["harness"]]):
            sha, before = harness.get(name), old["harness"].get(name)
            if sha != before:
                print(f"harness: {name} changed since the last prepare ({(before or 'missing')[:12]} -> "
                      f"{(sha or 'missing')[:12]}); recorded", flush=True)
    record = {"val": {"name": paths.VAL_FILENAME, "stamp": stamp(val_path), "sha256": val_sha},
              "tokenizer": tokenizer.id, "train_shards": [os.path.basename(p) for p in train_paths],
              "read_through": read_through(train_paths, old.get("read_through")),  # the shards past the cache
              "harness": harness}
    if record == old:
        return False
    write_json(path, record)
    return True
