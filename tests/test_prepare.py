"""
Tests for prepare.py and the data machinery behind it (autoresearch/): tokenizer,
token cache, dataloader, val_bpb, downloads, local import and error messages.
CPU only, no network, temporary cache roots.

    uv run pytest tests/test_prepare.py          # about a minute on 2 cores
    uv run pytest tests/test_prepare.py -k loader

The shared corpus and prepared cache come from tests/conftest.py.
"""

import collections
import hashlib
import http.server
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from helpers import (ROOT, assert_clean_failure, corpus_documents, make_parquet_corpus, run_prepare, run_python,
                     use_cache, write_parquet)

import prepare
from autoresearch import download, paths, prefetch, tokencache, tokenizer_training
from reference import reference_dataloader

MIXED_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "1234567890 3.14159 2024-06-01 007",
    "你好，世界。今天天气很好。こんにちは、カタカナ",
    "emoji: 😀🚀🌍 family: 👨‍👩‍👧 flags: 🇫🇷",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\ttabs\r\n",
    "mixed 混合 text 123 🙂 café naïve Ωμέγα Привет مرحبا",
    "rare characters 龘 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width",
]


@pytest.fixture(scope="module")
def tok(prepared_cache):
    return prepare.Tokenizer.from_directory()


def cached_documents(tokenizer, split):
    """Every document of a split as a tuple of ids (BOS first), from the token cache."""
    docs = []
    for path in prepare.list_shards(split):
        cached = tokencache.load_token_cache(tokenizer, path)
        assert cached is not None, f"{path} is not cached"
        tokens, offsets, _ = cached
        docs += [tuple(tokens[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
    return docs


def split_tokens(tokenizer, split):
    return sum(len(d) for d in cached_documents(tokenizer, split))

# =============================================================================
# Tokenizer
# =============================================================================


def test_tokenizer_round_trip_mixed_scripts(tok):
    for text in MIXED_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, f"round trip failed for {text!r}"
        assert all(0 <= i < tok.get_vocab_size() for i in ids)
    batch = tok.encode(MIXED_TEXTS, prepend=tok.get_bos_token_id())
    assert batch == [[tok.get_bos_token_id()] + tok.encode(t) for t in MIXED_TEXTS]
    assert tok.encode("abc", prepend=prepare.BOS_TOKEN) == tok.encode("abc", prepend=tok.get_bos_token_id())


def test_tokenizer_vocab_and_special_tokens_at_the_end(tok):
    assert tok.get_vocab_size() == prepare.VOCAB_SIZE, "the corpus is big enough to learn every merge"
    n = tok.get_vocab_size()
    specials = [tok.enc.encode_single_token(s) for s in prepare.SPECIAL_TOKENS]
    assert specials == list(range(n - len(specials), n)), "special ids must follow the learned merges"
    assert tok.get_bos_token_id() == specials[0]
    # A special token's text inside a document is ordinary text, never BOS.
    assert tok.get_bos_token_id() not in tok.encode("see <|reserved_0|> here")


def test_split_pattern_groups_digits_in_pairs(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567 89 0")]
    digit_runs = [p.strip() for p in pieces if p.strip().isdigit()]
    assert digit_runs and max(len(p) for p in digit_runs) <= 2, pieces
    assert "".join(digit_runs) == "123456789" + "0"


def test_token_bytes_add_up_to_utf8_length(tok, prepared_cache):
    token_bytes = prepare.get_token_bytes("cpu")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (tok.get_vocab_size(),)
    for text in MIXED_TEXTS + corpus_documents(30, seed=5):
        ids = tok.encode(text)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8")), text[:40]
    for s in prepare.SPECIAL_TOKENS:
        assert token_bytes[tok.enc.encode_single_token(s)] == 0


def test_token_bytes_count_raw_bytes_of_partial_characters(tok):
    """A token that is part of a multi-byte character counts its own bytes, not
    the 3 bytes of the U+FFFD it decodes to."""
    token_bytes = prepare.get_token_bytes("cpu")
    ids = tok.encode("龘")  # not in the corpus: byte-level tokens
    partial = [i for i in ids if tok.decode([i]) == "\ufffd"]
    assert partial, f"expected a token that is part of a character, got {ids}"
    for i in partial:
        raw = tok.enc.decode_single_token_bytes(i)
        assert token_bytes[i] == len(raw) < 3
    assert int(token_bytes[ids].sum()) == 3


def test_tokenizer_manifest_records_training_shards(prepared_cache):
    manifest = json.loads((prepared_cache / "tokenizer" / "manifest.json").read_text())
    names = [name for name, _ in manifest["trained_on"]]
    assert names == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"], "train shards only"
    assert manifest["capped"] is False and manifest["chars"] > 100_000

# =============================================================================
# Token cache
# =============================================================================


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_cache_equals_tokenizer_encode(tok, split):
    """The cache (encode_to_numpy in threads) holds exactly what Tokenizer.encode gives."""
    bos = tok.get_bos_token_id()
    for path in prepare.list_shards(split):
        tokens, offsets, row_groups = tokencache.load_token_cache(tok, path)
        pf = pq.ParquetFile(path)
        assert row_groups == [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        texts = [t for rg in range(pf.num_row_groups) for t in prepare.read_texts(pf, rg)]
        expected = tok.encode(texts, prepend=bos)
        got = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        assert got == expected


def test_token_cache_is_ignored_when_the_shard_changes(tok, prepared_cache, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(prepared_cache, cache)
    use_cache(monkeypatch, cache)
    path = prepare.list_shards("train")[0]
    assert tokencache.load_token_cache(tok, path) is not None
    write_parquet(path, corpus_documents(10, seed=77), row_group_size=5)
    assert tokencache.load_token_cache(tok, path) is None
    assert tokencache.load_token_cache(prepare.Tokenizer(tok.enc), path) is None, "no id: no cache"

# =============================================================================
# Dataloader
# =============================================================================


def packed_rows(tok, B, T, split):
    """The training loader, or for "val" its uncounted insides (make_dataloader refuses "val")."""
    if split == "train":
        return prepare.make_dataloader(tok, B, T, split, device="cpu")
    return prepare._packed_rows(tok, B, T, split, device="cpu")


def take_until(loader, n_tokens, min_epoch):
    batches, seen = [], 0
    while seen < n_tokens or batches[-1][2] < min_epoch:
        x, y, epoch = next(loader)
        batches.append((x, y, epoch))
        seen += x.numel()
    return batches


@pytest.mark.slow
@pytest.mark.parametrize("split,B,T", [("val", 4, 64), ("val", 3, 200), ("train", 8, 256)])
def test_loader_matches_reference_row_for_row(tok, split, B, T):
    """Several epochs of the fast loader equal the published algorithm's rows."""
    total = split_tokens(tok, split)
    fast = packed_rows(tok, B, T, split)
    ref = reference_dataloader(tok, B, T, split)
    batches = take_until(fast, 3 * total, min_epoch=4)
    epochs = set()
    for n, (x, y, epoch) in enumerate(batches):
        rx, ry, repoch = next(ref)
        assert torch.equal(x, rx) and torch.equal(y, ry), f"batch {n} differs"
        assert epoch == repoch, f"batch {n}: epoch {epoch} != {repoch}"
        epochs.add(epoch)
    assert len(epochs) >= 3, f"covered only epochs {epochs}"


def test_loader_without_cache_gives_the_same_rows(tok):
    """The on-the-fly path (shards not in the token cache) packs the same rows."""
    uncached = prepare.Tokenizer(tok.enc)  # no id: the cache is never used
    a = prepare.make_dataloader(tok, 4, 96, "train", device="cpu")
    b = prepare.make_dataloader(uncached, 4, 96, "train", device="cpu")
    for _ in range(60):
        (xa, ya, ea), (xb, yb, eb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ea == eb


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val"])
def test_loader_invariants(tok, split):
    """BOS first, targets shifted by one, full rows of real tokens, and every
    row is whole documents followed by at most one document prefix."""
    B, T = 4, 128
    bos = tok.get_bos_token_id()
    docs = set(cached_documents(tok, split))
    prefixes = {d[:k] for d in docs for k in range(1, len(d) + 1)}
    loader = packed_rows(tok, B, T, split)
    crops = 0
    for _ in range(80):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert epoch >= 1
        assert torch.all(x[:, 0] == bos), "every row starts with BOS"
        assert torch.equal(x[:, 1:], y[:, :-1]), "targets are inputs shifted by one"
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            assert all(0 <= t < tok.get_vocab_size() for t in row), "no padding, only real tokens"
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            segments = [tuple(row[a:b]) for a, b in zip(starts[:-1], starts[1:])]
            assert all(s in docs for s in segments[:-1]), "only the last document of a row may be cropped"
            assert segments[-1] in prefixes
            crops += segments[-1] not in docs
    assert crops > 0, "the check covered no cropped rows"


class CheckedPacker(prepare.BestFitPacker):
    """Checks every choice against a brute-force scan of the buffer."""

    fits = crops = 0

    def _select(self, remaining):
        i, take = super()._select(remaining)
        lengths = [length for length, _ in self.keys]
        arrivals = [arrival for _, arrival in self.keys]
        fitting = [(length, -arrival) for length, arrival in self.keys if length <= remaining]
        if fitting:
            best = max(fitting)
            assert (lengths[i], -arrivals[i]) == best and take == lengths[i], "largest fit, earliest first"
            self.fits += 1
        else:
            assert min(lengths) > remaining, "crop only when nothing fits"
            assert (lengths[i], arrivals[i]) == min(self.keys) and take == remaining, "shortest, earliest first"
            self.crops += 1
        return i, take


def test_packer_choices_match_brute_force(tok):
    packer = CheckedPacker(prepare._document_batches(tok, prepare.list_shards("train"), "train"))
    rows = np.empty((300, 129), dtype=np.int32)
    packer.fill(rows)
    assert packer.fits > 100 and packer.crops > 20, (packer.fits, packer.crops)
    assert len(packer.keys) >= prepare.BUFFER_DOCS - prepare.DOC_BATCH


def test_keeping_a_batch_across_next_is_safe(tok):
    loader = prepare.make_dataloader(tok, 4, 64, "train", device="cpu")
    kept = [next(loader) for _ in range(3)]
    copies = [(x.clone(), y.clone()) for x, y, _ in kept]
    for _ in range(3 * prefetch.LOADER_POOL + 5):
        next(loader)
    for (x, y, _), (cx, cy) in zip(kept, copies):
        assert torch.equal(x, cx) and torch.equal(y, cy), "a kept batch was overwritten"
    assert kept[0][0].data_ptr() != kept[1][0].data_ptr()


@pytest.mark.cuda
def test_cuda_loader_matches_cpu_and_kept_batches_survive(tok):
    """Pinned buffers, non-blocking copies: the rows equal the CPU loader's, and
    batches kept while the pool of pinned buffers cycles are left intact."""
    gpu = prepare.make_dataloader(tok, 16, 512, "train", device="cuda")
    cpu = prepare.make_dataloader(tok, 16, 512, "train", device="cpu")
    kept = []
    for _ in range(4 * prefetch.LOADER_POOL):
        (x, y, e), (cx, cy, ce) = next(gpu), next(cpu)
        assert x.is_cuda and x.dtype == torch.int64 and x.is_contiguous() and e == ce
        kept.append((x, y, cx, cy))
    torch.cuda.synchronize()
    for x, y, cx, cy in kept:
        assert torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy)


def test_loader_raises_worker_errors_naming_the_file(tok, prepared_cache, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(prepared_cache, cache)
    use_cache(monkeypatch, cache)
    bad = prepare.list_shards("train")[1]
    with open(bad, "wb") as f:
        f.write(b"not a parquet file")
    loader = prepare.make_dataloader(tok, 8, 256, "train", device="cpu")
    with pytest.raises(SystemExit) as err:
        for _ in range(200):
            next(loader)
    assert os.path.basename(bad) in str(err.value) and "corrupt" in str(err.value)


def test_empty_training_split_is_a_clear_error(tok, prepared_cache, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    shutil.copy(prepared_cache / "data" / paths.VAL_FILENAME, cache / "data")
    use_cache(monkeypatch, cache)
    with pytest.raises(SystemExit, match="training split is empty"):
        prepare.make_dataloader(tok, 2, 32, "train", device="cpu")
    # Shards with no documents at all: an error, not an endless loop.
    write_parquet(cache / "data" / "shard_00000.parquet", [], row_group_size=10)
    loader = prepare.make_dataloader(tok, 2, 32, "train", device="cpu")
    with pytest.raises(SystemExit, match="no documents"):
        next(loader)

# =============================================================================
# Evaluation
# =============================================================================


class Bigram(torch.nn.Module):
    """logits = table[token]: each position's loss depends on its own token only."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)
        torch.nn.init.normal_(self.table.weight, std=2.0, generator=torch.Generator().manual_seed(0))
        self.shapes = []

    def forward(self, x, y, reduction="mean"):
        self.shapes.append(tuple(x.shape))
        logits = self.table(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction=reduction).view(y.shape)


@pytest.fixture
def small_eval(monkeypatch, prepared_cache):
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 64)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 10 * 64 + 17)  # 10 rows
    yield 64, 10
    path = tokencache.val_rows_path(prepare.Tokenizer.from_directory(), 64, 10)
    for p in (path, path[:-4] + ".json"):
        if os.path.exists(p):
            os.remove(p)


@pytest.mark.slow
def test_evaluate_bpb_equals_hand_computation(tok, small_eval):
    T, N = small_eval
    model = Bigram(tok.get_vocab_size())
    # By hand: rows from the reference loader, bytes from the raw token bytes.
    x, y, _ = next(reference_dataloader(tok, N, T, "val"))
    raw = torch.tensor([0 if i >= tok.get_vocab_size() - len(prepare.SPECIAL_TOKENS)
                        else len(tok.enc.decode_single_token_bytes(i)) for i in range(tok.get_vocab_size())])
    with torch.no_grad():
        logp = torch.log_softmax(model.table(x).double(), dim=-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    nbytes = raw[y]
    expected = float(nll[nbytes > 0].sum()) / (math.log(2) * float(nbytes.sum()))
    results = {}
    for batch_size in (3, 10, 64):
        model.shapes = []
        results[batch_size] = prepare.evaluate_bpb(model, tok, batch_size)
        # Full batches only (the last one padded), plus four for the checks (later tokens changed twice,
        # targets changed, the checked batch scored again).
        assert model.shapes == [(batch_size, T)] * (-(-N // batch_size) + 4), (batch_size, model.shapes)
    for batch_size, bpb in results.items():
        assert bpb == pytest.approx(expected, rel=1e-6), batch_size
    assert results[3] == pytest.approx(results[10], rel=1e-12)


@pytest.mark.slow
def test_evaluate_bpb_cached_equals_uncached(tok, small_eval):
    T, N = small_eval
    model = Bigram(tok.get_vocab_size())
    path = tokencache.val_rows_path(tok, T, N)
    assert not os.path.exists(path)
    first = prepare.evaluate_bpb(model, tok, 4)  # packs the rows, then caches them
    assert os.path.exists(path)
    second = prepare.evaluate_bpb(model, tok, 4)  # from the cache
    assert first == second
    assert np.array_equal(np.load(path), prepare.build_val_rows(tok, T, N))
    # The rows prepare cached (smoke constants) are the validation loader's first rows.
    smoke = prepare.val_rows(tok, 256, 32, save=False)
    x, y, _ = next(prepare._packed_rows(tok, 32, 256, "val", device="cpu"))
    assert np.array_equal(smoke[:, :-1], x.numpy()) and np.array_equal(smoke[:, 1:], y.numpy())


def test_stale_val_rows_are_rebuilt(tok, prepared_cache, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(prepared_cache, cache)
    use_cache(monkeypatch, cache)
    before = np.array(prepare.val_rows(tok, 256, 32))
    write_parquet(cache / "data" / paths.VAL_FILENAME, corpus_documents(50, seed=99), row_group_size=20)
    after = prepare.val_rows(tok, 256, 32)
    assert not np.array_equal(before, after), "a changed val shard must not reuse old rows"
    assert np.array_equal(after, prepare.build_val_rows(tok, 256, 32))

# =============================================================================
# Downloads against a local HTTP server
# =============================================================================


def parquet_bytes(docs):
    buf = io.BytesIO()
    write_parquet(buf, docs, row_group_size=50)
    return buf.getvalue()


class FaultyServer:
    """Serves NAME.parquet from memory on 127.0.0.1. faults[name] is a list of
    faults used one per request: '503', 'drop' (close without answering),
    'truncate' (half the body, full Content-Length), 'truncate_nolen' (half the
    body, no Content-Length, then close)."""

    def __init__(self, files, faults=None, delay=0.0):
        self.files, self.faults, self.delay = files, {k: list(v) for k, v in (faults or {}).items()}, delay
        self.requests = collections.Counter()
        self.active = self.max_active = 0
        lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with lock:
                    server.requests[name] += 1
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                    fault = server.faults[name].pop(0) if server.faults.get(name) else None
                try:
                    time.sleep(server.delay)
                    body = server.files.get(name)
                    if body is None:
                        self.send_error(404)
                    elif fault == "503":
                        self.send_error(503)
                    elif fault == "drop":
                        self.close_connection = True
                    elif fault in ("truncate", "truncate_nolen"):
                        self.send_response(200)
                        if fault == "truncate":
                            self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[:len(body) // 2])
                        self.close_connection = True
                    else:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                finally:
                    with lock:
                        server.active -= 1

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/x/resolve/main"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shard_files():
    names = [f"shard_{i:05d}.parquet" for i in range(6)] + [paths.VAL_FILENAME]
    return {name: parquet_bytes(corpus_documents(40, seed=100 + k)) for k, name in enumerate(names)}


@pytest.fixture
def download_env(tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "cache")
    monkeypatch.setattr(download, "BACKOFF_BASE", 0.01)
    servers = []

    def start(files, faults=None, delay=0.0):
        server = FaultyServer(files, faults, delay)
        servers.append(server)
        monkeypatch.setattr(download, "BASE_URL", server.url)
        return server

    yield start
    for server in servers:
        server.close()


def test_download_retries_faults_and_fetches_val(download_env, shard_files, capsys):
    faults = {"shard_00000.parquet": ["503", "503"], "shard_00001.parquet": ["drop"],
              "shard_00002.parquet": ["truncate"], paths.VAL_FILENAME: ["truncate_nolen", "503"]}
    server = download_env(shard_files, faults)
    assert download.download_data(3, workers=2) is True
    expected = ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", paths.VAL_FILENAME]
    assert sorted(os.listdir(paths.DATA_DIR)) == expected, "no .tmp or partial file left behind"
    for name in expected:
        with open(os.path.join(paths.DATA_DIR, name), "rb") as f:
            assert f.read() == shard_files[name], name
    assert server.requests == {"shard_00000.parquet": 3, "shard_00001.parquet": 2, "shard_00002.parquet": 2,
                               paths.VAL_FILENAME: 3}
    out = capsys.readouterr().out
    assert out.count("retrying in") == 6 and "[4/4]" in out
    # Present shards are not fetched again.
    assert download.download_data(3, workers=2) is False
    assert sum(server.requests.values()) == 10


def test_partial_files_never_count_as_present(download_env, shard_files):
    server = download_env(shard_files, {"shard_00000.parquet": ["truncate_nolen"] * 5})
    os.makedirs(paths.DATA_DIR)
    with open(os.path.join(paths.DATA_DIR, paths.VAL_FILENAME), "wb") as f:
        f.write(shard_files[paths.VAL_FILENAME][:1000])  # left by an interrupted run
    with open(os.path.join(paths.DATA_DIR, paths.VAL_FILENAME + ".tmp"), "wb") as f:
        f.write(b"partial")
    with pytest.raises(SystemExit, match="shard_00000.parquet after 5 attempts"):
        download.download_data(1, workers=1)
    assert server.requests["shard_00000.parquet"] == 5
    assert server.requests[paths.VAL_FILENAME] == 1, "a partial file is fetched again"
    # No temporary of this run is left; the old one is never written through
    # (prepare.py's main sweeps those of killed runs: test_prepare_faults.py).
    assert sorted(os.listdir(paths.DATA_DIR)) == [paths.VAL_FILENAME, paths.VAL_FILENAME + ".tmp"]
    with open(os.path.join(paths.DATA_DIR, paths.VAL_FILENAME + ".tmp"), "rb") as f:
        assert f.read() == b"partial"


def test_client_errors_are_not_retried(download_env, shard_files):
    files = {k: v for k, v in shard_files.items() if k != "shard_00001.parquet"}
    server = download_env(files)
    with pytest.raises(SystemExit, match=r"shard_00001.parquet: HTTP 404 .*--source"):
        download.download_data(2, workers=1)
    assert server.requests["shard_00001.parquet"] == 1


@pytest.mark.parametrize("workers", [1, 3])
def test_download_worker_count_is_honoured(download_env, shard_files, workers):
    server = download_env(shard_files, delay=0.25)
    download.download_data(6, workers=workers)
    assert sum(server.requests.values()) == 7
    assert server.max_active == workers


def test_num_shards_zero_fetches_only_val(download_env, shard_files):
    server = download_env(shard_files)
    download.download_data(0, workers=4)
    assert set(server.requests) == {paths.VAL_FILENAME}
    with pytest.raises(SystemExit, match="training split is empty"):
        prepare.list_shards("train")


def test_offline_errors_are_recognised():
    import requests
    import urllib3

    resolve = urllib3.exceptions.NameResolutionError("huggingface.co", None, socket.gaierror(-2, "Name unknown"))
    wrapped = requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/x", resolve))
    assert download.is_offline(wrapped)
    dropped = requests.exceptions.ConnectionError(urllib3.exceptions.ProtocolError(
        "Connection aborted.", http.client.RemoteDisconnected("closed")))
    assert not download.is_offline(dropped)
    assert not download.is_offline(requests.exceptions.ChunkedEncodingError("incomplete"))


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_no_network_fails_fast_naming_source(tmp_path):
    t0 = time.time()
    result = run_prepare([], tmp_path / "cache",
                         {"AUTORESEARCH_BASE_URL": f"http://127.0.0.1:{closed_port()}/x"})
    assert result.returncode == 1
    assert "--source" in result.stderr and "Traceback" not in result.stderr
    assert time.time() - t0 < 30  # torch import included; no 30 s of back-off
    assert "retrying" not in result.stdout

# =============================================================================
# Local import (--source) and prepare end to end
# =============================================================================


@pytest.fixture
def small_constants(monkeypatch):
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 64)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 8 * 64)


def shard_texts(path):
    return pq.read_table(path).column("text").to_pylist()


def test_source_parquet_glob(tmp_path, monkeypatch, small_constants, corpus_dir):
    use_cache(monkeypatch, tmp_path / "cache")
    prepare.prepare(source=str(corpus_dir / "*.parquet"))
    sources = sorted(corpus_dir.glob("*.parquet"))
    data = [os.path.join(paths.DATA_DIR, n) for n in
            ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", paths.VAL_FILENAME]]
    for src, dst in zip(sources, data):
        assert open(src, "rb").read() == open(dst, "rb").read(), "copied as is, the last file is validation"
    assert prepare.list_shards("val") == [data[-1]]


def test_source_text_and_markdown(tmp_path, monkeypatch, small_constants, capsys):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    docs = corpus_documents(40, seed=3)
    for i, doc in enumerate(docs):
        (src / ("nested" if i % 2 else "") / f"doc_{i:03d}.{'md' if i % 3 else 'txt'}").write_text(doc)
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (src / "notes.csv").write_text("ignored")
    use_cache(monkeypatch, tmp_path / "cache")
    prepare.prepare(source=str(src))
    out = capsys.readouterr().out
    assert "skipped 1 files that are not valid UTF-8" in out
    files = sorted(p for p in src.rglob("*") if p.suffix in (".txt", ".md") and p.name != "latin1.txt")
    ordered = [p.read_text() for p in files]
    train = shard_texts(os.path.join(paths.DATA_DIR, "shard_00000.parquet"))
    val = shard_texts(os.path.join(paths.DATA_DIR, paths.VAL_FILENAME))
    assert train + val == ordered and len(val) == 4, "the last 10% of documents are validation"
    x, y, _ = next(prepare.make_dataloader(prepare.Tokenizer.from_directory(), 2, 32, "train", device="cpu"))
    assert x.shape == (2, 32)


def test_source_jsonl(tmp_path, monkeypatch, small_constants, capsys):
    src = tmp_path / "src"
    src.mkdir()
    docs = corpus_documents(60, seed=4)
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    (src / "a.jsonl").write_text("\n".join(lines[:30] + ['{"no_text": 1}', "not json"]) + "\n")
    (src / "b.jsonl").write_text("\n".join(lines[30:] + [json.dumps({"text": 5})]) + "\n\n")
    use_cache(monkeypatch, tmp_path / "cache")
    prepare.prepare(source=str(src))
    assert "skipped 3 jsonl lines without a text string" in capsys.readouterr().out
    train = shard_texts(os.path.join(paths.DATA_DIR, "shard_00000.parquet"))
    val = shard_texts(os.path.join(paths.DATA_DIR, paths.VAL_FILENAME))
    assert train + val == docs and len(val) == 6


def test_prepare_twice_is_a_noop_and_notices_changed_shards(tmp_path, monkeypatch, small_constants, capsys):
    src = tmp_path / "src"
    make_parquet_corpus(src, n_train_files=2, docs_per_file=150, val_docs=60)
    use_cache(monkeypatch, tmp_path / "cache")
    assert prepare.prepare(source=str(src)) is True
    snapshot = {p: os.stat(p).st_mtime_ns for p in map(str, (tmp_path / "cache").rglob("*"))}
    capsys.readouterr()
    assert prepare.prepare(source=str(src)) is False
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot == {p: os.stat(p).st_mtime_ns for p in map(str, (tmp_path / "cache").rglob("*"))}
    old_id = prepare.Tokenizer.from_directory().id
    # Killed between the validation rows and their .json: rebuilt, not trusted.
    rows = tokencache.val_rows_path(prepare.Tokenizer.from_directory(), 64, 8)
    os.remove(rows[:-len(".npy")] + ".json")
    assert prepare.prepare(source=str(src)) is True and os.path.exists(rows[:-len(".npy")] + ".json")
    # New training data: prepare says the tokenizer was trained on other shards and keeps it...
    write_parquet(src / "part_00.parquet", corpus_documents(150, seed=42), row_group_size=64)
    prepare.prepare(source=str(src))
    out = capsys.readouterr().out
    assert "now 2 training shards differ" in out and "--retrain-tokenizer" in out
    assert prepare.Tokenizer.from_directory().id == old_id
    # ... and the token cache follows the new data.
    tok = prepare.Tokenizer.from_directory()
    path = prepare.list_shards("train")[0]
    tokens, offsets, _ = tokencache.load_token_cache(tok, path)
    assert tokens[offsets[0]:offsets[1]].tolist() == tok.encode(shard_texts(path)[0], prepend=tok.get_bos_token_id())
    # Retraining on request.
    prepare.prepare(source=str(src), retrain_tokenizer=True)
    assert prepare.Tokenizer.from_directory().id != old_id
    assert os.listdir(paths.TOKENS_DIR) == [prepare.Tokenizer.from_directory().id], "old token caches dropped"


def test_killed_import_is_redone(tmp_path, monkeypatch, small_constants, corpus_dir):
    use_cache(monkeypatch, tmp_path / "cache")
    prepare.prepare(source=str(corpus_dir))
    state_path = os.path.join(paths.DATA_DIR, "source.json")
    state = json.load(open(state_path))
    # As if killed while copying: the pending record and one shard cut short.
    json.dump({**state, "shards": [], "complete": False}, open(state_path, "w"))
    val = os.path.join(paths.DATA_DIR, paths.VAL_FILENAME)
    open(val, "wb").write(open(val, "rb").read()[:500])
    with pytest.raises(SystemExit, match="did not finish"):
        prepare.prepare()
    tok = prepare.Tokenizer.from_directory()  # the tokenizer survived: train.py must still refuse the data
    with pytest.raises(SystemExit, match="did not finish"):
        prepare.make_dataloader(tok, 2, 32, "train", device="cpu")
    prepare.prepare(source=str(corpus_dir))
    assert json.load(open(state_path))["complete"] is True
    assert open(val, "rb").read() == open(corpus_dir / "zz_val.parquet", "rb").read()


def test_half_written_tokenizer_is_never_trusted(tok, prepared_cache, tmp_path, monkeypatch, small_constants):
    cache = tmp_path / "cache"
    shutil.copytree(prepared_cache, cache)
    use_cache(monkeypatch, cache)
    manifest = cache / "tokenizer" / "manifest.json"
    manifest.unlink()  # killed before the manifest was written
    with pytest.raises(SystemExit, match="uv run prepare.py"):
        prepare.Tokenizer.from_directory()
    with pytest.raises(SystemExit, match="uv run prepare.py"):
        prepare.get_token_bytes()
    prepare.prepare()
    assert manifest.exists() and prepare.Tokenizer.from_directory().id == tok.id  # same data, same tokenizer
    # A tokenizer.pkl that does not match its manifest (killed mid-rewrite) is not trusted either.
    (cache / "tokenizer" / "tokenizer.pkl").write_bytes(b"partial")
    with pytest.raises(SystemExit, match="does not match"):
        prepare.Tokenizer.from_directory()
    assert tokenizer_training.tokenizer_state() is None


def test_data_fingerprint(tok, prepared_cache):
    fp = prepare.data_fingerprint()
    with open(prepared_cache / "data" / paths.VAL_FILENAME, "rb") as f:
        assert fp["val"] == hashlib.sha256(f.read()).hexdigest()[:12]
    assert fp["tokenizer"] == tok.id[:12] and fp["train_shards"] == 3

# =============================================================================
# Bad input: one clear line on stderr, exit code 1, no traceback
# =============================================================================


@pytest.mark.slow
def test_nothing_prepared_is_a_clear_error_for_train_py(tmp_path, prepared_cache):
    result = run_python("import prepare; prepare.Tokenizer.from_directory()", tmp_path / "empty")
    assert_clean_failure(result, "no tokenizer", "uv run prepare.py")
    only_tokenizer = tmp_path / "only_tokenizer"
    shutil.copytree(prepared_cache / "tokenizer", only_tokenizer / "tokenizer")
    result = run_python("import prepare; t = prepare.Tokenizer.from_directory(); "
                        "prepare.make_dataloader(t, 2, 16, 'train', device='cpu')", only_tokenizer)
    assert_clean_failure(result, "no data in", "uv run prepare.py")


@pytest.mark.slow
def test_bad_source_inputs(tmp_path, corpus_dir, monkeypatch):
    cache = tmp_path / "cache"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(corpus_dir, corrupt)
    (corrupt / "part_01.parquet").write_bytes(b"PAR1 garbage")
    # End to end once (one line on stderr, exit 1, no traceback); the rest in
    # process: every message is a PrepareError, i.e. a SystemExit with that line.
    assert_clean_failure(run_prepare(["--source", corrupt], cache), "corrupt parquet file", "part_01.parquet")
    use_cache(monkeypatch, cache)

    def fails(source, *needles):
        with pytest.raises(prepare.PrepareError) as err:
            prepare.main(["--source", str(source)])
        assert all(n in str(err.value) for n in needles), (needles, str(err.value))

    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(corpus_dir / "part_00.parquet", single)
    fails(single, "training split would be empty")

    unusable = tmp_path / "unusable"
    unusable.mkdir()
    (unusable / "data.csv").write_text("a,b\n")
    fails(unusable, "no usable files")
    fails(unusable / "*.txt", "no usable files")
    fails(tmp_path / "does_not_exist", "does_not_exist: no such file or folder")

    undecodable = tmp_path / "undecodable"
    undecodable.mkdir()
    (undecodable / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    (undecodable / "b.md").write_bytes(b"\xc3\x28")
    fails(undecodable, "0 usable documents", "2 files that are not valid UTF-8")
    assert not (cache / "data").exists() or not os.listdir(cache / "data"), "nothing half-imported"


def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "prepare", interrupted)
    with pytest.raises(SystemExit) as err:
        prepare.main([])
    assert err.value.code == 130
    assert capsys.readouterr().err.strip() == "prepare: interrupted; run the same command again to finish"


@pytest.mark.slow
def test_source_refuses_to_mix_with_downloaded_data(tmp_path, corpus_dir, shard_files):
    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    (cache / "data" / "shard_00000.parquet").write_bytes(shard_files["shard_00000.parquet"])
    assert_clean_failure(run_prepare(["--source", corpus_dir], cache), "holds downloaded shards", "AUTORESEARCH_CACHE")


@pytest.mark.slow
def test_bad_cli_values(tmp_path):
    assert_clean_failure(run_prepare(["--download-workers", "0"], tmp_path / "c"), "--download-workers")

# =============================================================================
# Import arrows: prepare.py imports the package, never the other way round
# =============================================================================


@pytest.mark.slow
def test_the_package_never_imports_prepare_or_train():
    modules = sorted(f"autoresearch.{p.stem}" for p in (ROOT / "autoresearch").glob("*.py") if p.stem != "__init__")
    assert "autoresearch.tokencache" in modules and "autoresearch.manifest" in modules
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {modules}]; "
            "loaded = [m for m in ('prepare', 'train') if m in sys.modules]; "
            "assert not loaded, f'the package imported {loaded}'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
