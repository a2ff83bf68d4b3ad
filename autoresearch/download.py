"""
Downloading the data shards: the Hugging Face dataset
karpathy/climbmix-400b-shuffle, fetched in parallel with retries and
back-off, each shard written through a temporary and kept only when its
parquet footer reads. DO NOT MODIFY (fixed harness).

Imported by prepare.py (and its tests); it imports autoresearch.environment,
.files and .paths, and requests only when a download starts.
"""

import os
import queue
import re
import socket
import threading
import time

from autoresearch import environment, paths
from autoresearch.files import CHUNK_BYTES, PrepareError, new_file, parquet_readable

BASE_URL = environment.text("AUTORESEARCH_BASE_URL",
                            "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main")
DOWNLOAD_ATTEMPTS = 5                 # back-off between them: 2, 4, 8, 16 s
BACKOFF_BASE = environment.number("AUTORESEARCH_BACKOFF", 2.0)  # tests shrink it
CONNECT_TIMEOUT, READ_TIMEOUT = 5, 60 # seconds


def is_offline(exc):
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

    path = paths.shard_path(index)
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
                with new_file(path, size=expected if expected >= 0 else None) as f:
                    nbytes = 0
                    for chunk in r.iter_content(CHUNK_BYTES):
                        if stop.is_set():
                            raise InterruptedError("stopped")
                        f.write(chunk)
                        nbytes += len(chunk)
                    f.flush()
                    if expected >= 0 and nbytes != expected:
                        raise IOError(f"truncated: {nbytes} of {expected} bytes")
                    if not parquet_readable(f.path):
                        raise IOError("not a readable parquet file (truncated body?)")
            return nbytes
        except Exception as e:
            if stop.is_set():
                return 0
            if is_offline(e) and not reached.is_set():
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
    worker's temporary is removed by files.one_line_errors."""
    n_train = paths.MAX_SHARD if num_shards == -1 else min(num_shards, paths.MAX_SHARD)
    wanted = [paths.VAL_SHARD] + list(range(n_train))
    paths.make_folder(paths.DATA_DIR)
    todo = [i for i in wanted if not parquet_readable(paths.shard_path(i))]
    print(f"data: {len(wanted) - len(todo)} of {len(wanted)} shards present in {paths.DATA_DIR}", flush=True)
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
            name = os.path.basename(paths.shard_path(index))
            print(f"  [{done}/{len(todo)}] {name}  {nbytes / 1e6:.1f} MB  {time.time() - t0:.1f} s", flush=True)
    finally:
        stop.set()
    return True
