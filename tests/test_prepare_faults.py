"""
prepare.py under faults and odd input: data never lost or mixed (source inside
the cache, two runs at once, an unreadable source.json, planted symlinks, a
full disk, Ctrl-C on a silent server), small or odd corpora, the SMOKE switch.
CPU only, no network beyond 127.0.0.1, temporary cache roots.

    uv run pytest tests/test_prepare_faults.py      # about 1.5 minutes on 2 cores
    uv run pytest tests/test_prepare_faults.py -k disk

The disk-full test mounts a small tmpfs when it runs as root and mounting
works; elsewhere (a container that forbids mount) it simulates ENOSPC.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import ROOT, corpus_documents, run_prepare, text_source, texts, write_parquet

import prepare
from autoresearch import download, files, paths, tokencache
from autoresearch.source import import_source, text_extensions

# =============================================================================
# Helpers
# =============================================================================


@pytest.fixture
def cache(small_cache):
    """A fresh cache root for the in-process prepare module, with small constants (conftest.py)."""
    return small_cache


def temporaries(root):
    return sorted(str(p) for p in root.rglob("*.tmp"))


def assert_clean_failure(result, *needles):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def fails(*needles, run):
    with pytest.raises(prepare.PrepareError) as err:
        run()
    assert all(n in str(err.value) for n in needles), (needles, str(err.value))
    return str(err.value)

# =============================================================================
# AUTORESEARCH_SMOKE
# =============================================================================


@pytest.mark.parametrize("value, smoke", [("1", True), ("true", True), ("YES", True), (" on ", True),
                                          ("0", False), ("false", False), ("No", False), ("off", False),
                                          ("", False)])
def test_smoke_switch_takes_the_usual_words(value, smoke):
    result = subprocess.run([sys.executable, "-c", "import constants; print(constants.SMOKE, constants.MAX_SEQ_LEN)"],
                            env=dict(os.environ, AUTORESEARCH_SMOKE=value), cwd=str(ROOT), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(smoke), "256" if smoke else "2048"]


@pytest.mark.parametrize("value", ["2", "maybe", "ture", "-1"])
def test_smoke_switch_refuses_anything_else(value):
    result = subprocess.run([sys.executable, "-c", "import constants"], env=dict(os.environ, AUTORESEARCH_SMOKE=value),
                            cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert_clean_failure(result, f"AUTORESEARCH_SMOKE='{value}'", "1/true/yes/on")

# =============================================================================
# Data must never be lost or mixed
# =============================================================================


@pytest.mark.slow
def test_source_inside_the_cache_is_refused_and_nothing_is_lost(prepared_cache, tmp_path, cache):
    shutil.copytree(prepared_cache, cache)
    before = {p.name: p.read_bytes() for p in (cache / "data").iterdir()}
    assert_clean_failure(run_prepare(["--source", cache / "data"], cache), "inside the cache root")
    link = tmp_path / "link"
    link.symlink_to(cache / "data")  # the same folder under another name
    for source in [f"{cache}/data/*.parquet", link, cache]:
        fails("inside the cache root", run=lambda: prepare.main(["--source", str(source)]))
    assert {p.name: p.read_bytes() for p in (cache / "data").iterdir()} == before


def test_a_source_holding_the_cache_skips_the_cache(tmp_path, cache, capsys):
    src = tmp_path / "home"
    docs = text_source(src)
    paths.set_cache_root(str(src / ".cache" / "autoresearch"))  # the usual ~/.cache under a source of ~
    os.makedirs(paths.TOKENIZER_DIR)
    (src / ".cache" / "autoresearch" / "tokenizer" / "notes.txt").write_text("a file in the cache")
    import_source(str(src))
    assert "(skipped files: 1 inside the cache root)" in capsys.readouterr().out
    shards = prepare.list_shards("train") + prepare.list_shards("val")
    assert sum((texts(p) for p in shards), []) == docs
    assert import_source(str(src)) is False, "its own shards are not new source files"


@pytest.mark.slow
def test_second_run_waits_for_the_lock(tmp_path, corpus_dir):
    cache = tmp_path / "cache"
    cache.mkdir()
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_SMOKE="1", PYTHONUNBUFFERED="1")
    with open(cache / ".prepare.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a first prepare.py run would
        proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--source", str(corpus_dir)], env=env,
                                cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert "waiting for it to finish" in line and str(cache) in line, line
            time.sleep(1.0)
            assert proc.poll() is None and not (cache / "data").exists(), "nothing touched while waiting"
        except BaseException:
            proc.kill()
            raise
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, (out, err)
    assert "nothing to do" not in out and (cache / "manifest.json").exists()


@pytest.mark.slow
def test_two_runs_from_two_sources_never_mix(tmp_path):
    sources = []
    for k in range(2):
        src = tmp_path / f"src{k}"
        src.mkdir()
        for i in range(3):
            write_parquet(src / f"part_{i}.parquet", corpus_documents(60, seed=10 * k + i), row_group_size=30)
        sources.append(src)
    cache = tmp_path / "cache"
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_SMOKE="1")
    runs = [subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--source", str(src)], env=env,
                             cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for src in sources]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    data = sorted((cache / "data").glob("*.parquet"))
    contents = [p.read_bytes() for p in data]
    assert any(contents == [p.read_bytes() for p in sorted(src.glob("*.parquet"))] for src in sources), \
        "every shard comes from one source"
    assert json.loads((cache / "data" / "source.json").read_text())["complete"] is True


class SilentServer:
    """Accepts connections on 127.0.0.1 (the kernel does) and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/x"

    def connections(self):
        self.sock.setblocking(False)
        count = 0
        with contextlib.suppress(BlockingIOError):
            while self.sock.accept():
                count += 1
        return count

    def close(self):
        self.sock.close()


@pytest.mark.slow
def test_unreadable_source_json_never_leads_to_downloads(prepared_cache, corpus_dir, cache, monkeypatch):
    shutil.copytree(prepared_cache, cache)
    state = cache / "data" / "source.json"
    shards = sorted(p.name for p in (cache / "data").glob("*.parquet"))
    server = SilentServer()
    monkeypatch.setattr(download, "BASE_URL", server.url)
    try:
        state.write_text("{not json")
        assert_clean_failure(run_prepare([], cache, {"AUTORESEARCH_BASE_URL": server.url}, timeout=60),
                             "source.json is unreadable", "--source")
        for garbled in ["[]", '{"source": 3}', '{"source": "/x", "complete": true}']:
            state.write_text(garbled)
            fails("source.json is unreadable", run=lambda: prepare.main([]))
            fails("source.json is unreadable", run=lambda: prepare.list_shards("train"))  # train.py too
        assert server.connections() == 0
    finally:
        server.close()
    assert sorted(p.name for p in (cache / "data").glob("*.parquet")) == shards
    prepare.main(["--source", str(corpus_dir)])  # a new import heals it
    assert json.loads(state.read_text())["complete"] is True


def test_planted_symlinks_are_never_written_through(tmp_path, cache, monkeypatch):
    src = tmp_path / "src"
    docs = text_source(src)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    data = cache / "data"
    data.mkdir(parents=True)
    for name in ["shard_00000.parquet.tmp", f"{paths.VAL_FILENAME}.tmp", "source.json.tmp"]:
        (data / name).symlink_to(outside)  # the old fixed temporary names
    prepare.main(["--source", str(src)])
    assert outside.read_text() == "keep me"
    assert texts(data / "shard_00000.parquet") + texts(data / paths.VAL_FILENAME) == docs
    assert temporaries(cache) == [], "links left at temporary names are swept, not followed"
    # A link planted at the very name drawn: created exclusively, so another name is drawn.
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    (data / "x.json.aaaa.tmp").symlink_to(outside)
    files.write_json(str(data / "x.json"), {"ok": 1})
    assert outside.read_text() == "keep me" and json.loads((data / "x.json").read_text()) == {"ok": 1}
    assert os.path.islink(data / "x.json.aaaa.tmp") and not os.path.lexists(data / "x.json.bbbb.tmp")


class FullDisk:
    """Simulated ENOSPC: the cache's temporaries (autoresearch/files.py) get
    `free` bytes in all, or none at all when their name contains `only`."""

    def __init__(self, free=None, only=None):
        self.free, self.only = free, only

    def open(self, file, *args, **kwargs):
        f = open(file, *args, **kwargs)
        if not isinstance(file, int):
            return f
        name = os.readlink(f"/proc/self/fd/{file}")
        if self.only is not None and self.only not in name:
            return f
        disk = self

        class Quota:
            def write(self, data):
                n = memoryview(data).nbytes
                if disk.free is not None and n <= disk.free:
                    disk.free -= n
                    return f.write(data)
                raise OSError(errno.ENOSPC, "No space left on device")

            def __getattr__(self, attr):
                return getattr(f, attr)

        return Quota()


def small_filesystem(folder, size):
    """Mount a tmpfs of `size` bytes at folder; False when this machine does not allow it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_disk_full_is_one_line_with_the_space_needed_and_leaves_nothing(tmp_path, corpus_dir, cache, monkeypatch):
    mounted = small_filesystem(cache, 400 * 1024)  # room for one or two shards of the ~1 MB corpus
    try:
        if not mounted:
            monkeypatch.setattr(files, "open", FullDisk(free=400 * 1024).open, raising=False)
        message = fails(f"disk full in {cache / 'data'}: writing shard_0000", "MB free", run=lambda: prepare.main(
            ["--source", str(corpus_dir)]))
        assert "needs 0.3 MB" in message or "needs 0.2 MB" in message, message
        assert temporaries(cache) == []
        with pytest.raises(prepare.PrepareError, match="did not finish"):
            prepare.list_shards("train")  # the half import is never trusted
    finally:
        if mounted:
            subprocess.run(["umount", str(cache)], check=True)


@pytest.mark.parametrize("only, folder", [("source.json", "data"), ("tokenizer.pkl", "tokenizer"),
                                          ("tokens.npy", "tokens"), ("val_rows", "tokens")])
def test_disk_full_at_any_step_stops_the_run(tmp_path, cache, monkeypatch, only, folder):
    src = tmp_path / "src"
    text_source(src)
    with monkeypatch.context() as m:
        m.setattr(files, "open", FullDisk(only=only).open, raising=False)
        message = fails("disk full in", only, "needs more space", run=lambda: prepare.main(["--source", str(src)]))
    assert f"in {cache / folder}" in message, message
    assert temporaries(cache) == []
    prepare.main(["--source", str(src)])  # space again: the same command finishes the job
    assert tokencache.cached_val_rows(prepare.Tokenizer.from_directory(), 64, 8) is not None


@pytest.mark.slow
def test_ctrl_c_on_a_silent_server_exits_at_once(tmp_path):
    server = SilentServer()
    cache = tmp_path / "cache"
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_BASE_URL=server.url, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), "--num-shards", "3"], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "downloading" not in proc.stdout.readline():
            assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.5)  # the requests are out; the server never answers
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        elapsed = time.time() - t0
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert elapsed < 3, f"took {elapsed:.1f} s"
    assert temporaries(cache) == []


@pytest.mark.slow
def test_cache_root_that_is_a_file(tmp_path, cache):
    cache.write_text("not a folder")
    assert_clean_failure(run_prepare([], cache), f"cache root {cache} is (or lies under) a file")
    paths.set_cache_root(str(cache / "below"))
    fails("lies under) a file", run=lambda: prepare.main([]))
    paths.set_cache_root(str(tmp_path / "ok"))
    os.makedirs(tmp_path / "ok")
    (tmp_path / "ok" / "data").write_text("a file where data/ goes")
    fails(f"cache folder {tmp_path / 'ok' / 'data'} is (or lies under) a file", run=lambda: prepare.main([]))
    assert cache.read_text() == "not a folder"


def test_command_line_errors_are_one_line(tmp_path, cache):
    fails("--num-shards", "invalid int", run=lambda: prepare.main(["--num-shards", "many"]))
    fails("unrecognized arguments", run=lambda: prepare.main(["--sauce", "x"]))
    fails("--text-ext 'a/b'", run=lambda: prepare.main(["--source", str(tmp_path), "--text-ext", "a/b"]))
    fails("--text-ext only applies to an import", run=lambda: prepare.main(["--text-ext", "py"]))
    fails("--num-shards must be -1 (all) or >= 0", run=lambda: prepare.main(["--num-shards", "-2"]))
    assert not cache.exists(), "nothing created for a bad command line"

# =============================================================================
# Small or odd corpora
# =============================================================================


def test_two_one_line_files_are_refused_in_seconds(tmp_path, cache, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello there world\n")
    (src / "b.txt").write_text("goodbye cruel world\n")
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 2048)  # the real contract
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 40 * 524288)
    t0 = time.time()
    fails("validation split is too small", "1 documents", "209,716 tokens", run=lambda: prepare.main(
        ["--source", str(src)]))
    assert time.time() - t0 < 30


def test_a_tiny_split_is_read_from_disk_once_and_packs_the_same_rows(tmp_path, cache, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"{i:02d}.txt").write_text(f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 5)
    prepare.prepare(source=str(src))
    tok = prepare.Tokenizer.from_directory()
    reads = []
    load = tokencache.load_token_cache
    monkeypatch.setattr(tokencache, "load_token_cache", lambda *a: reads.append(1) or load(*a))
    rows = prepare.build_val_rows(tok, 64, 200)  # 2 documents, cycled
    assert len(reads) <= 2, f"the split was read {len(reads)} times"
    monkeypatch.setattr(tokencache, "replay_small_split", lambda batches, min_docs: batches)  # the plain walk
    assert (prepare.build_val_rows(tok, 64, 200) == rows).all()
    assert len(reads) > 100


def test_all_null_parquet_text_is_refused(tmp_path, cache):
    src = tmp_path / "src"
    src.mkdir()
    write_parquet(src / "a.parquet", corpus_documents(50, seed=1), row_group_size=20)
    for name, values in [("b.parquet", [None] * 30), ("c.parquet", ["", None, ""])]:
        pq.write_table(pa.table({"text": pa.array(values, type=pa.string())}), src / name, row_group_size=10)
        fails(f"{src / name}: its column 'text' holds no documents", run=lambda: import_source(str(src)))
        (src / name).unlink()


def test_small_validation_split_is_named_and_tiny_ones_refused(tmp_path, cache, monkeypatch, capsys):
    src = tmp_path / "src"
    text_source(src, n_docs=60)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 65)  # one row
    prepare.prepare(source=str(src))
    tokens, offsets, _ = tokencache.load_token_cache(prepare.Tokenizer.from_directory(), prepare.list_shards("val")[0])
    docs, n = len(offsets) - 1, len(tokens) - (len(offsets) - 1)
    assert "val split:" not in capsys.readouterr().out, "a split of EVAL_TOKENS or more is not mentioned"
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 4 * n)
    prepare.prepare(source=str(src))
    out = capsys.readouterr().out
    assert f"val split: {docs} documents, {n:,} tokens, fewer than the {4 * n:,} tokens" in out
    assert "each token counts about 4.0 times" in out
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 101 * n)  # each token would count 101 times
    fails("validation split is too small", f"{docs} documents, {n:,} tokens", run=lambda: prepare.prepare(
        source=str(src)))
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 8 * 64)
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", n)  # shorter than one row
    fails("validation split is too small", f"at least {n + 1:,} tokens", run=lambda: prepare.prepare(
        source=str(src)))


def test_skipped_files_are_counted_by_extension_and_code_can_be_imported(tmp_path, cache, capsys):
    src = tmp_path / "src"
    docs = text_source(src, n_docs=30)
    code = {f"m{i}.py": f"def f{i}(x):\n    return x * {i}\n" for i in range(3)}
    for name, text in code.items():
        (src / name).write_text(text)
    (src / "table.csv").write_text("a,b\n")
    (src / "Makefile").write_text("all:\n")
    import_source(str(src))
    out = capsys.readouterr().out
    assert f"in {src} (skipped files: 3 .py, 1 .csv, 1 with no extension)" in out and "--text-ext" in out
    import_source(str(src), text_extensions(["PY"]))
    out = capsys.readouterr().out
    assert "importing 33 documents from 33 files" in out and "(skipped files: 1 .csv, 1 with no extension)" in out
    imported = sum((texts(p) for p in prepare.list_shards("train") + prepare.list_shards("val")), [])
    assert sorted(imported) == sorted(docs + list(code.values()))
    assert text_extensions(["py,.RS", "c", "py"]) == (".py", ".rs", ".c")
