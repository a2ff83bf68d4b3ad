"""
Where the shards come from: the local import (`uv run prepare.py --source
PATH`), or else the download (autoresearch/download.py); ensure_data picks.
The import copies your own parquet, .txt/.md/.jsonl or other UTF-8 text files
into the cache as shards, so that everything after it runs exactly as on
downloaded data. It never reads the cache itself, never mixes with downloaded
shards, and a killed import is redone, never trusted. DO NOT MODIFY (fixed
harness).

What it reads (docs/data.md says the same for users): every form of --source
visits each file once, never entering a symlinked folder nor taking a second
link to a file; an unreadable folder or file is skipped and counted. Text is
UTF-8, a BOM dropped; a file holding NUL bytes (binary, UTF-16) is no text.
JSON lines end at "\n" only. No validation document is an exact copy of a
training document. Whatever gives no document is counted on one line that
names the first place of each kind; a file that stops the import is named.

Imported by prepare.py (and its tests) and autoresearch.command_line; it
imports autoresearch.files, autoresearch.paths and autoresearch.download.
"""

import collections
import contextlib
import fnmatch
import glob
import json
import os
import re
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from autoresearch import paths
from autoresearch.download import download_data
from autoresearch.files import CHUNK_BYTES, PrepareError, parquet_readable, stamp, write_atomic, write_json

DOCUMENT_EXTENSIONS = (".txt", ".md", ".jsonl")  # more with --text-ext (code, ...)
IMPORT_VAL_FRACTION = 0.1             # the last 10% of documents become validation
IMPORT_SHARD_DOCS = 65536             # documents per written shard
IMPORT_ROW_GROUP = 1024               # documents per parquet row group
SHOWN_EXTENSIONS = 5                  # the import line names the commonest skipped extensions, counts the rest


# =============================================================================
# Finding the files: each one once
# =============================================================================


class _Found:
    """What a walk of --source found: the files (sorted, each once) and what it passed over."""

    def __init__(self):
        self.files = []
        self.unreadable = []    # folders it could not list
        self.repeats = 0        # links (or hard links) to a file already found


def _shown(text):
    """text as it can be printed: bytes of a file name that are not UTF-8 as \\xNN."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _say(line):
    print(_shown(line), flush=True)


def _refuse(message):
    return PrepareError(_shown(message))


def _entry_is(entry, kind):
    """entry.is_file() (links followed) or is_dir(follow_symlinks=False); False when it cannot be told."""
    try:
        return entry.is_file() if kind == "file" else entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _walk(root, parts, hidden_too, found):
    """Add to found.files the files below the folder root whose path under it matches
    parts, the components of a glob ('**': any number of folders). An explicit stack,
    not recursion: a tree 1,100 folders deep is fine. A symlinked folder is never
    entered (a link to '.' would repeat the whole tree); a link to a file is taken.
    Names starting with '.' match only a component that starts with '.', unless
    hidden_too. Folders it cannot list go to found.unreadable."""
    stack, seen = [(root, 0)], set()
    while stack:
        folder, i = stack.pop()
        if (folder, i) in seen:
            continue
        seen.add((folder, i))
        part, last = parts[i], i == len(parts) - 1
        if part == "**" and not last:
            stack.append((folder, i + 1))  # '**' standing for no folder at all
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            found.unreadable.append(folder)
            continue
        for entry in entries:
            if entry.name.startswith(".") and not (hidden_too or part.startswith(".")):
                continue
            if part == "**":
                if _entry_is(entry, "folder"):
                    stack.append((entry.path, i))
                elif last and _entry_is(entry, "file"):
                    found.files.append(entry.path)
            elif fnmatch.fnmatchcase(entry.name, part):
                if last and _entry_is(entry, "file"):
                    found.files.append(entry.path)
                elif not last and _entry_is(entry, "folder"):
                    stack.append((entry.path, i + 1))


def _source_files(source):
    """A folder (walked, hidden files included), a single file, or a glob ('**' for any
    folders below its fixed part); sorted by path, each file once however many links
    lead to it. Returns a _Found."""
    path, found = os.path.expanduser(source), _Found()
    if os.path.isdir(path):
        _walk(path, ["**"], True, found)
    elif os.path.isfile(path):
        found.files.append(path)
    elif glob.has_magic(path):
        parts = path.split(os.sep)
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = os.sep.join(parts[:fixed]) or (os.sep if path.startswith(os.sep) else os.curdir)
        pattern = [part for part in parts[fixed:] if part]
        if pattern and os.path.isdir(root):
            _walk(root, pattern, False, found)
    files, seen = [], set()
    for f in sorted(os.path.abspath(f) for f in found.files):
        try:
            st = os.stat(f)
        except OSError:  # gone since the walk
            continue
        if (st.st_dev, st.st_ino) in seen:
            found.repeats += 1
        else:
            seen.add((st.st_dev, st.st_ino))
            files.append(f)
    found.files = files
    return found


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
    """'576 .py, 2 .csv, 1 with no extension' (most first), or ''. Past the
    SHOWN_EXTENSIONS commonest, one count: '..., 40 more of 12 other extensions'."""
    counts = collections.Counter(_extension(f) or "with no extension" for f in files)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = [f"{n} {ext}" for ext, n in ranked[:SHOWN_EXTENSIONS]]
    rest = ranked[SHOWN_EXTENSIONS:]
    if rest:
        shown.append(f"{sum(n for _, n in rest)} more of {len(rest)} other extensions")
    return ", ".join(shown)


def _passed_over(found, unused, in_cache):
    """The import line's note on what the walk passed over: ' (skipped files: ...)', or ''."""
    notes = [_skipped_by_extension(unused)]
    if found.unreadable:
        n = len(found.unreadable)
        notes.append(f"{n} unreadable folder{'s' if n > 1 else ''} ({found.unreadable[0]}{', ...' if n > 1 else ''})")
    if found.repeats:
        notes.append(f"{found.repeats} repeats (links to files already found)")
    if in_cache:
        notes.append(f"{len(in_cache)} inside the cache root")
    note = ", ".join(filter(None, notes))
    return f" (skipped files: {note})" if note else ""

# =============================================================================
# Documents: text files and JSON lines
# =============================================================================
# Reasons a file or a line gives no document; each is counted, with its first place.
UNREADABLE = "unreadable files"
NOT_UTF8 = "files that are not valid UTF-8"
NUL_BYTES = "files with NUL bytes (binary, or UTF-16)"
NO_TEXT = "jsonl lines without a text string"
SURROGATE = "jsonl lines whose text holds a lone surrogate (not valid Unicode)"
EMPTY = "empty documents"


class _Skipped:
    """Files and lines that gave no document: a count per reason, and where each reason was first met."""

    def __init__(self):
        self.reasons = {}  # reason -> [count, first place]

    def add(self, reason, where):
        self.reasons.setdefault(reason, [0, where])[0] += 1

    def __str__(self):
        return ", ".join(f"{n} {reason} (first: {where})" for reason, (n, where) in self.reasons.items())


def _decode(raw):
    """(text, None), or (None, the reason it is no text): UTF-8, a leading BOM dropped
    (it is no character of the document; left in, it breaks a JSON line). Text never
    holds NUL: a file that does is binary, or UTF-16, which for ASCII text without a
    BOM is valid UTF-8 with a NUL after every letter."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, NOT_UTF8
    return (None, NUL_BYTES) if "\x00" in text else (text, None)


def _is_unicode(text):
    """False for a string holding a lone surrogate (JSON can escape one: "\ud800"); UTF-8 cannot store it."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _jsonl_documents(text, path, docs, skipped):
    """One document per line with a "text" string. Lines end at "\n" only: U+2028,
    U+0085 and the like are characters inside the strings, not line ends."""
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            doc = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError, RecursionError):
            doc = None
        if not isinstance(doc, str):
            skipped.add(NO_TEXT, where)
        elif not _is_unicode(doc):
            skipped.add(SURROGATE, where)
        elif doc:
            docs.append(doc)
        else:
            skipped.add(EMPTY, where)


def _read_documents(files):
    """Documents from .jsonl (one per line with a "text" string) and every other
    text file (one per file). Files and lines that give none are skipped and
    counted by reason (a _Skipped)."""
    docs, skipped = [], _Skipped()
    for path in files:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            skipped.add(UNREADABLE, path)
            continue
        text, problem = _decode(raw)
        if problem:
            skipped.add(problem, path)
        elif path.endswith(".jsonl"):
            _jsonl_documents(text, path, docs, skipped)
        elif text:
            docs.append(text)
        else:
            skipped.add(EMPTY, path)
    return docs, skipped


def _write_docs(path, docs):
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    write_atomic(path, lambda f: pq.write_table(table, f, row_group_size=IMPORT_ROW_GROUP))

# =============================================================================
# Parquet files
# =============================================================================


@contextlib.contextmanager
def _parquet(path):
    """A source parquet file, opened by name; a name holding bytes that are not UTF-8
    (pyarrow takes only UTF-8 names) through /dev/fd. One line naming the file when it
    does not read. (Not through a Python file object: pyarrow may drop its last page
    reader in a thread at exit, and one that must take the GIL then aborts the process.)"""
    with open(path, "rb") as f:
        name = path if _is_unicode(path) else f"/dev/fd/{f.fileno()}"
        try:
            pf = pq.ParquetFile(name)
        except Exception as e:
            raise _refuse(f"corrupt parquet file {path} ({type(e).__name__}: {e})") from None
        try:
            yield pf
        except pa.ArrowException as e:  # a page that does not decode
            raise _refuse(f"corrupt parquet file {path} ({type(e).__name__}: {e})") from None


def _is_text_type(t):
    """A string column, plain, large, a view, or dictionary-encoded."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _texts(table):
    """The 'text' column of table as large strings (a dictionary decoded)."""
    return table.column("text").cast(pa.large_string())


def _check_parquet(path):
    """One line unless the file's 'text' column holds strings, and at least one non-empty."""
    with _parquet(path) as pf:
        schema = pf.schema_arrow
        if "text" not in schema.names:
            raise _refuse(f"{path} has no string column 'text' (its columns: {', '.join(schema.names[:8]) or 'none'})")
        if not _is_text_type(schema.field("text").type):
            raise _refuse(f"{path} has no string column 'text' (its 'text' holds {schema.field('text').type})")
        for rg in range(pf.num_row_groups):
            column = _texts(pf.read_row_group(rg, columns=["text"]))
            if column.null_count < len(column) and (pc.max(pc.utf8_length(column)).as_py() or 0) > 0:
                return
        raise _refuse(f"{path}: its column 'text' holds no documents (all {pf.metadata.num_rows} values are "
                      f"null or empty); remove the file or fill it")


def _documents(texts):
    """The distinct non-empty strings of a text column, as an array."""
    values = pc.unique(pc.drop_null(texts))
    return values.filter(pc.greater(pc.utf8_length(values), 0))


def _shared_documents(val_texts, train_files):
    """The validation documents (a text column) that a training file also holds (exact copies)."""
    values, shared = _documents(val_texts), set()
    for path in train_files:
        with _parquet(path) as pf:
            for rg in range(pf.num_row_groups):
                column = _texts(pf.read_row_group(rg, columns=["text"]))
                shared.update(pc.filter(column, pc.is_in(column, value_set=values)).to_pylist())
    return shared


def _copy_without(src, dst, shared):
    """Copy the parquet file src to dst, row groups kept, without the rows whose text is in shared."""
    values = pa.array(list(shared), type=pa.large_string())

    def write(f):
        with _parquet(src) as pf, pq.ParquetWriter(f, pf.schema_arrow) as writer:
            for rg in range(pf.num_row_groups):
                table = pf.read_row_group(rg)
                table = table.filter(pc.invert(pc.is_in(_texts(table), value_set=values)))
                if table.num_rows:
                    writer.write_table(table, row_group_size=table.num_rows)

    write_atomic(dst, write)


def _copy(src, dst):
    with open(src, "rb") as f:
        write_atomic(dst, lambda out: shutil.copyfileobj(f, out, CHUNK_BYTES), size=os.path.getsize(src))

# =============================================================================
# The import
# =============================================================================


def _shared_line(n_shared, n_val):
    """The one line for validation documents that are also training documents, or a refusal when none is left."""
    if n_shared == n_val:
        raise _refuse(f"all {n_val} validation documents are exact copies of training documents, so val_bpb would "
                      f"score text the model trained on: import a validation split of documents of its own")
    return (f"data: {n_shared} validation documents are exact copies of training documents; dropped from "
            f"validation (val_bpb must not score text the model trained on)")


def _plan_parquet(source, parquet, note):
    """[(shard name, write(dst)), ...] for a parquet import: files copied as they are, the last
    one the validation shard, without the documents a training file also holds."""
    for f in parquet:
        _check_parquet(f)
    if len(parquet) < 2:
        raise _refuse(f"--source {source}: one parquet file only; the last file is the validation "
                      f"split, so the training split would be empty (add training files)")
    if len(parquet) - 1 > paths.MAX_SHARD:
        raise _refuse(f"--source {source}: at most {paths.MAX_SHARD} training files")
    _say(f"data: importing {len(parquet)} parquet files from {source}{note}; validation: {parquet[-1]}")
    with _parquet(parquet[-1]) as pf:
        val = _texts(pf.read(columns=["text"]))
    shared = _shared_documents(val, parquet[:-1])
    if shared:
        n_shared = pc.sum(pc.is_in(val, value_set=pa.array(list(shared), type=pa.large_string()))).as_py()
        _say(_shared_line(n_shared, pc.sum(pc.greater(pc.utf8_length(val), 0)).as_py()))
    val = ((lambda dst: _copy_without(parquet[-1], dst, shared)) if shared
           else (lambda dst: _copy(parquet[-1], dst)))
    return ([(f"shard_{i:05d}.parquet", lambda dst, f=f: _copy(f, dst)) for i, f in enumerate(parquet[:-1])]
            + [(paths.VAL_FILENAME, val)])


def _plan_documents(source, documents, note, hint):
    """[(shard name, write(dst)), ...] for a text import: the documents in file order, the
    last 10% the validation split, without those that are also training documents."""
    docs, skipped = _read_documents(documents)
    if skipped.reasons:
        _say(f"data: skipped {skipped}")
    if len(docs) < 2:
        raise _refuse(f"--source {source}: {len(docs)} usable documents, need at least 2 "
                      f"(one for training, one for validation){'; skipped ' + str(skipped) if skipped.reasons else ''}")
    n_val = min(len(docs) - 1, max(1, round(len(docs) * IMPORT_VAL_FRACTION)))
    train_docs, val_docs = docs[:-n_val], docs[-n_val:]
    _say(f"data: importing {len(docs)} documents from {len(documents)} files in {source}{note}; "
         f"validation: the last {n_val}{hint}")
    shared = set(val_docs).intersection(train_docs)
    if shared:
        kept = [d for d in val_docs if d not in shared]
        _say(_shared_line(n_val - len(kept), n_val))
        val_docs = kept
    groups = [train_docs[i:i + IMPORT_SHARD_DOCS] for i in range(0, len(train_docs), IMPORT_SHARD_DOCS)]
    return ([(f"shard_{i:05d}.parquet", lambda dst, g=g: _write_docs(dst, g)) for i, g in enumerate(groups)]
            + [(paths.VAL_FILENAME, lambda dst: _write_docs(dst, val_docs))])


def import_source(source, extra_extensions=()):
    """Copy local data into DATA_DIR so the rest of the pipeline is identical.

    Parquet files (column "text"): copied as they are (row groups kept); the
    last in sorted order becomes the validation shard. .txt/.md/.jsonl, and
    files with extra_extensions as plain text: the documents in sorted file
    order are written into parquet shards; the last 10% of them (at least one)
    become the validation shard. Either way, validation documents that are exact
    copies of training documents are dropped from it. Each file is read once,
    however many links lead to it; files inside the cache root are never read."""
    _check_source_outside_cache(source)
    found = _source_files(source)
    if not found.files and not found.unreadable and not glob.has_magic(source) \
            and not os.path.exists(os.path.expanduser(source)):
        raise _refuse(f"--source {source}: no such file or folder")
    in_cache = {f for f in found.files if _within(f, paths.CACHE_DIR)}  # the source holds the cache
    files = [f for f in found.files if f not in in_cache]
    parquet = [f for f in files if _extension(f) == ".parquet"]
    documents = [f for f in files if _extension(f) in DOCUMENT_EXTENSIONS + tuple(extra_extensions)]
    used = parquet or documents
    unused = sorted(set(files) - set(used))
    note = _passed_over(found, unused, in_cache)
    if not used:
        raise _refuse(f"--source {source}: no usable files (.parquet, or text: "
                      f"{', '.join(DOCUMENT_EXTENSIONS + tuple(extra_extensions))}) found{note}; "
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
        raise _refuse(f"{paths.DATA_DIR} holds downloaded shards; to import --source {source}, "
                      f"use another cache root (AUTORESEARCH_CACHE=DIR) or remove {paths.DATA_DIR}")
    if state and state.get("complete") and {k: state.get(k) for k in record} == record and all(
            parquet_readable(os.path.join(paths.DATA_DIR, n)) for n in state["shards"]):
        _say(f"data: already imported from {source} ({len(state['shards'])} shards)")
        return False

    if parquet:
        plan = _plan_parquet(source, parquet, note)
    else:
        hint = "; import skipped UTF-8 text files with --text-ext EXT" if unused else ""
        plan = _plan_documents(source, documents, note, hint)

    paths.make_folder(paths.DATA_DIR)
    # Marked as ours but unfinished first: a killed import is redone, never trusted.
    write_json(state_path, {**record, "shards": [], "complete": False})
    for name in existing:  # a previous import: ours to replace
        os.remove(os.path.join(paths.DATA_DIR, name))
    for name, write in plan:
        dst = os.path.join(paths.DATA_DIR, name)
        write(dst)
        print(f"  {name}  {os.path.getsize(dst) / 1e6:.1f} MB", flush=True)
    write_json(state_path, {**record, "shards": [name for name, _ in plan], "complete": True})
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
