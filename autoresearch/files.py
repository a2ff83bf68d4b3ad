"""
File safety for everything prepare.py writes into the cache, and the one-line
errors it raises. DO NOT MODIFY (fixed harness).

It holds: PrepareError (a problem the user can fix: one line, exit 1); writes
through exclusive temporaries renamed into place; a full disk turned into one
line; json, sha256 and size/mtime stamps; reading parquet documents; the cache
lock that gives one prepare run the cache; the guard that turns Ctrl-C and OS
errors into one line. Imported by prepare.py and the other autoresearch
modules; it imports nothing of the project.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import sys

import pyarrow.parquet as pq

CHUNK_BYTES = 1 << 20                 # streaming chunk for downloads and copies

# =============================================================================
# Errors
# =============================================================================


class PrepareError(SystemExit):
    """A problem the user can fix. Uncaught, it prints its one-line message and
    exits with code 1, no traceback: train.py gets the same clear message."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


RUN_PREPARE = "run `uv run prepare.py` (or `uv run prepare.py --source PATH` for local data)"


def _size(nbytes):
    return f"{nbytes:,} bytes" if nbytes < 10_000 else f"{nbytes / 1e6:,.1f} MB"


def disk_full(folder, name, needed, written):
    """The one line for a full disk: where, and how much the write needed."""
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    need = _size(needed) if needed else f"more than {_size(written)}" if written else "more space"
    return PrepareError(f"disk full in {folder}: writing {name} needs {need} ({free}); free some space there "
                        f"(or set AUTORESEARCH_CACHE to a disk with room) and run the same command again")


def is_disk_full(exc):
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)

# =============================================================================
# Writing: exclusive temporaries, renamed into place
# =============================================================================
# Temporaries are NAME.<random>.tmp next to NAME, created exclusively (O_EXCL,
# O_NOFOLLOW): a file or symlink planted at a predictable name is never written
# through. The ones being written are remembered so that an interrupted run
# removes them (one_line_errors), and a prepare run sweeps any a killed run left.

LIVE_TEMPORARIES = set()
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
            self.disk_full |= is_disk_full(e)
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
def new_file(path, size=None):
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
            if is_disk_full(e):
                raise disk_full(folder, name, size, 0) from None
            raise
    LIVE_TEMPORARIES.add(tmp)
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
        if f.disk_full or is_disk_full(e):
            raise disk_full(folder, name, size, written) from None
        raise
    finally:
        LIVE_TEMPORARIES.discard(tmp)


def remove_temporaries(paths):
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)


def sweep_stale_temporaries(root):
    """Temporaries a killed run left under root (only under the cache lock)."""
    for folder, _, names in os.walk(root):
        remove_temporaries(os.path.join(folder, n) for n in names if _TEMPORARY_RE.fullmatch(n))


def write_atomic(path, write, size=None):
    """write(f) into a fresh temporary, then rename (see new_file)."""
    with new_file(path, size) as f:
        write(f)


def write_json(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))

# =============================================================================
# Reading: json, hashes, parquet documents
# =============================================================================


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stamp(path):
    """Cheap identity of a file: size and modification time."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def parquet_readable(path):
    """A file counts as present only if its parquet footer reads."""
    try:
        pq.ParquetFile(path)
        return True
    except Exception:
        return False


def open_parquet(path):
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise PrepareError(f"corrupt parquet file {path} ({type(e).__name__}: {e})") from None
    pf.source_path = path  # for read_texts' message
    return pf


def read_texts(pf, row_group):
    """The documents of one row group, in order (nulls read as empty documents).
    A page that does not decode is one line naming the file, not a traceback."""
    try:
        texts = pf.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    except Exception as e:
        where = getattr(pf, "source_path", "a parquet file")
        raise PrepareError(f"corrupt parquet file {where}, row group {row_group} ({type(e).__name__}: {e}): "
                           f"{RUN_PREPARE}") from None
    return [t if t is not None else "" for t in texts]

# =============================================================================
# One prepare run at a time
# =============================================================================


@contextlib.contextmanager
def cache_lock(root):
    """An exclusive lock on the cache root for a whole prepare run: two runs at
    once (say from two sources) would mix their shards. The second one says so
    and waits; the lock goes with the process, however it ends."""
    path = os.path.join(root, ".prepare.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise PrepareError(f"cannot open the lock file {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"prepare: another prepare.py is working on {root}; waiting for it to finish "
                  f"(Ctrl-C to give up)", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. a file system without locks
            raise PrepareError(f"cannot lock {path}: {e.strerror}; run one prepare.py at a time") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def one_line_errors(root):
    """Around a whole prepare run: Ctrl-C exits 130 with one line, an OS error
    (permissions, a full disk outside new_file, ...) becomes one PrepareError
    line, and the temporaries still being written (those of stopped download
    workers) are removed however the run ends. Nothing half-written is trusted
    later: a killed run is finished by running the same command again."""
    try:
        yield
    except KeyboardInterrupt:
        print("\nprepare: interrupted; run the same command again to finish", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:  # the machine, not the code
        where = str(e.filename or root)
        if is_disk_full(e):
            raise disk_full(os.path.dirname(where), os.path.basename(where), None, 0) from None
        raise PrepareError(f"{where}: {e.strerror or e}") from None
    finally:
        remove_temporaries(LIVE_TEMPORARIES.copy())
