"""
Where the shards come from: the local import (`uv run prepare.py --source
PATH`), or else the download (autoresearch/download.py); ensure_data picks.
The import copies your own parquet, .txt/.md/.jsonl or other UTF-8 text files
into the cache as shards, so that everything after it runs exactly as on
downloaded data. It never reads the cache itself, never mixes with downloaded
shards, and a killed import is redone, never trusted. DO NOT MODIFY (fixed
harness).

Imported by prepare.py (and its tests); it imports autoresearch.files,
autoresearch.paths and autoresearch.download.
"""

import collections
import glob
import json
import os
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from autoresearch import paths
from autoresearch.download import download_data
from autoresearch.files import (CHUNK_BYTES, PrepareError, open_parquet, parquet_readable, stamp, write_atomic,
                                write_json)

DOCUMENT_EXTENSIONS = (".txt", ".md", ".jsonl")  # more with --text-ext (code, ...)
IMPORT_VAL_FRACTION = 0.1             # the last 10% of documents become validation
IMPORT_SHARD_DOCS = 65536             # documents per written shard
IMPORT_ROW_GROUP = 1024               # documents per parquet row group


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
    if _within(path or ".", paths.CACHE_DIR):
        raise PrepareError(f"--source {source} lies inside the cache root {paths.CACHE_DIR}, which the import "
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
    write_atomic(path, lambda f: pq.write_table(table, f, row_group_size=IMPORT_ROW_GROUP))


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
    in_cache = {f for f in files if _within(f, paths.CACHE_DIR)}  # the source holds the cache
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
              "files": [[f] + stamp(f) for f in used]}
    state_path = os.path.join(paths.DATA_DIR, "source.json")
    existing = paths.existing_shards()
    try:
        state = paths.import_state()
    except PrepareError:
        state = {}  # an import with an unreadable record: ours to redo
    if existing and state is None:
        raise PrepareError(f"{paths.DATA_DIR} holds downloaded shards; to import --source {source}, "
                           f"use another cache root (AUTORESEARCH_CACHE=DIR) or remove {paths.DATA_DIR}")
    if state and state.get("complete") and {k: state.get(k) for k in record} == record and all(
            parquet_readable(os.path.join(paths.DATA_DIR, n)) for n in state["shards"]):
        print(f"data: already imported from {source} ({len(state['shards'])} shards)", flush=True)
        return False

    if parquet:
        for f in parquet:
            pf = open_parquet(f)
            field = pf.schema_arrow.field("text") if "text" in pf.schema_arrow.names else None
            if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
                raise PrepareError(f"{f} has no string column 'text'")
            if not _has_documents(pf):
                raise PrepareError(f"{f}: its column 'text' holds no documents (all {pf.metadata.num_rows} "
                                   f"values are null or empty); remove the file or fill it")
        if len(parquet) < 2:
            raise PrepareError(f"--source {source}: one parquet file only; the last file is the validation "
                               f"split, so the training split would be empty (add training files)")
        if len(parquet) - 1 > paths.MAX_SHARD:
            raise PrepareError(f"--source {source}: at most {paths.MAX_SHARD} training files")
        plan = ([(f, f"shard_{i:05d}.parquet") for i, f in enumerate(parquet[:-1])]
                + [(parquet[-1], paths.VAL_FILENAME)])
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
        plan = [(g, f"shard_{i:05d}.parquet") for i, g in enumerate(groups)] + [(val_docs, paths.VAL_FILENAME)]
        hint = "; import skipped UTF-8 text files with --text-ext EXT" if by_extension else ""
        print(f"data: importing {len(docs)} documents from {len(documents)} files in {source}{skipped}; "
              f"validation: the last {n_val}{hint}", flush=True)

    paths.make_folder(paths.DATA_DIR)
    # Marked as ours but unfinished first: a killed import is redone, never trusted.
    write_json(state_path, {**record, "shards": [], "complete": False})
    for name in existing:  # a previous import: ours to replace
        os.remove(os.path.join(paths.DATA_DIR, name))
    for what, name in plan:
        dst = os.path.join(paths.DATA_DIR, name)
        if isinstance(what, str):
            with open(what, "rb") as src:
                write_atomic(dst, lambda f: shutil.copyfileobj(src, f, CHUNK_BYTES), size=os.path.getsize(what))
        else:
            _write_docs(dst, what)
        print(f"  {name}  {os.path.getsize(dst) / 1e6:.1f} MB", flush=True)
    write_json(state_path, {**record, "shards": [name for _, name in plan], "complete": True})
    return True


def ensure_data(num_shards, workers, source=None, extra_extensions=()):
    """prepare's data step: import source when one is given; else keep what an
    earlier import left; else download num_shards training shards (-1: all) and
    the validation shard with workers threads. Returns True when the data changed."""
    imported = paths.import_state() if source is None else None  # a re-import heals an unreadable record
    if source is not None:
        return import_source(source, extra_extensions)
    if imported is not None:
        paths.check_import_finished()
        print(f"data: using the data imported from {imported['source']} "
              f"(re-import with --source; remove {paths.DATA_DIR} to download instead)", flush=True)
        return False
    return download_data(num_shards, workers)
