"""
Tests for what protects val_bpb: verify_data() against damaged caches and an
edited harness, prepare.py healing what it can, and evaluate_bpb's own checks
(causality, full batches, finite results). CPU only, temporary cache roots.

    uv run pytest tests/test_integrity.py        # about a minute on 2 cores
    uv run pytest tests/test_integrity.py -k causal

Each corruption is made on a copy of the session's prepared cache (smoke
constants: validation rows of T=256, N=32), with the file's mtime kept where
that matters, so nothing but the content can give it away.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import (ROOT, SMOKE_N, SMOKE_T, assert_clean_failure, corpus_documents, private_cache, run_python,
                     stops_with_one_line, write_parquet)

import prepare
from autoresearch import files, ledger, manifest, paths, tokencache

T, N = SMOKE_T, SMOKE_N  # the validation rows prepared_cache holds (smoke constants)

# =============================================================================
# Fixtures and helpers
# =============================================================================


@pytest.fixture
def cache(prepared_cache, tmp_path, monkeypatch):
    """A private copy of the prepared cache, with prepare pointed at it."""
    return private_cache(prepared_cache, tmp_path / "cache", monkeypatch)


@pytest.fixture
def tok(cache):
    return prepare.Tokenizer.from_directory()


def keeping_mtime(path, change):
    """Run change() on a file, then set its times back: only the content differs."""
    st = os.stat(path)
    change()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def refused(needle, *needles):
    """verify_data() must raise one line naming the problem and the command."""
    with pytest.raises(prepare.PrepareError) as err:
        prepare.verify_data()
    message = str(err.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for n in (needle,) + needles:
        assert n in message, (n, message)
    return message


def healed(capsys):
    """Plain `prepare.py` notices the damage, rebuilds, and leaves a cache that verifies."""
    capsys.readouterr()
    assert prepare.prepare() is True
    out = capsys.readouterr().out
    assert "nothing to do" not in out
    prepare.verify_data()
    assert prepare.prepare() is False, "a second run has nothing left to heal"
    return out


def train_cache_base(tok, index=0):
    return os.path.join(paths.TOKENS_DIR, tok.id, f"shard_{index:05d}")


def npy_body(path):
    """Offset of the data after a .npy header."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()

# =============================================================================
# Tiny models (CPU, sdpa)
# =============================================================================


class TinyAttention(torch.nn.Module):
    """The smallest language model whose causality is decided by its attention
    mask: one sdpa attention layer with uniform weights over the keys the mask
    allows (q = k = 0, v = the embedding), a residual, and a head tied to the
    embedding, so it predicts the tokens it sees, as a trained model that could
    see the next token would. mask: "causal" (a query sees itself and the
    WINDOW-1 tokens before it), "next" (the same window one token further: it
    sees the next token), "none" (no mask), "late" (causal in the first half of
    a row, no mask in the second), "rows" (causal, but mixes the rows of a batch)."""

    WINDOW, D = 4, 32

    def __init__(self, vocab, mask):
        super().__init__()
        self.mask = mask
        self.emb = torch.nn.Embedding(vocab, self.D)
        torch.nn.init.normal_(self.emb.weight, std=0.5, generator=torch.Generator().manual_seed(0))
        self.shapes = []

    def forward(self, x, y, reduction="mean"):
        self.shapes.append(tuple(x.shape))
        B, T = x.shape
        e = self.emb(x)  # (B, T, D)
        query, key = torch.arange(T)[:, None], torch.arange(T)[None, :]
        reach = 1 if self.mask == "next" else 0
        allowed = (key <= query + reach) & (key > query - self.WINDOW + reach)  # (T, T)
        if self.mask == "none":
            allowed = torch.ones_like(allowed)
        if self.mask == "late":
            allowed = allowed | (query >= T // 2)
        qk = torch.zeros(B, 1, T, self.D)  # (B, H=1, T, D): equal scores for every allowed key
        h = e + F.scaled_dot_product_attention(qk, qk, e.unsqueeze(1), attn_mask=allowed)[:, 0]  # (B, T, D)
        if self.mask == "rows":
            h = h + h.mean(dim=0, keepdim=True)
        logits = h @ self.emb.weight.T  # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction=reduction)


class BF16Noise(TinyAttention):
    """Causal, but its losses differ from call to call by bf16 rounding: a tiny
    perturbation, then rounded to bf16 (one or two units in the last place)."""

    def forward(self, x, y, reduction="mean"):
        loss = super().forward(x, y, reduction)
        return (loss * (1 + 1e-3 * torch.randn(loss.shape))).bfloat16()


class Constant(TinyAttention):
    """Every loss replaced by one value."""

    def __init__(self, vocab, value):
        super().__init__(vocab, "causal")
        self.value = value

    def forward(self, x, y, reduction="mean"):
        return super().forward(x, y, reduction) * 0 + self.value


class MeanOnly(TinyAttention):
    """Ignores reduction='none': one mean loss instead of the per-token losses."""

    def forward(self, x, y, reduction="mean"):
        return super().forward(x, y, "none").mean()

# =============================================================================
# verify_data on an intact cache
# =============================================================================


def test_intact_cache_verifies_with_its_fingerprints(cache, tok):
    fp = prepare.verify_data()
    val = cache / "data" / paths.VAL_FILENAME
    assert fp["val"] == files.sha256(val)[:12]
    assert fp["tokenizer"] == tok.id[:12] and fp["train_shards"] == 3
    package = sorted(f"autoresearch/{p.name}" for p in (ROOT / "autoresearch").glob("*.py"))
    assert list(fp["harness"]) == ["constants.py", "prepare.py", *package], "every fixed file, the package too"
    for name, short in fp["harness"].items():
        path = ROOT / name
        assert short == (files.sha256(path)[:12] if path.exists() else "missing"), name
    assert prepare.data_fingerprint() == fp, "the old name gives the same answer"

# =============================================================================
# Damaged files: caught by verify_data, healed by prepare.py
# =============================================================================


def test_overwritten_val_rows_are_caught_and_healed(cache, tok, capsys):
    path = tokencache.val_rows_path(tok, T, N)
    original = np.load(path)
    model = TinyAttention(tok.get_vocab_size(), "causal")
    expected = prepare.evaluate_bpb(model, tok, 8)
    forged = np.random.default_rng(0).integers(0, tok.get_vocab_size(), size=original.shape, dtype=np.uint16)

    def forge():
        keeping_mtime(path, lambda: overwrite(path, npy_body(path), forged.tobytes()))
        assert np.load(path).shape == original.shape and not np.array_equal(np.load(path), original)

    forge()
    refused(f"val_rows_T{T}_N{N}.npy differs from the sha256 recorded", "uv run prepare.py")
    assert f"val_rows_T{T}_N{N}.npy differs from the sha256 recorded; rebuilding them" in healed(capsys)
    assert np.array_equal(np.load(path), original)
    forge()
    assert prepare.evaluate_bpb(model, tok, 8) == expected, "the rows verify_data checked, held in memory"
    ledger.reset()  # nothing held (no verify_data): the metric reads the cache
    assert prepare.evaluate_bpb(model, tok, 8) == expected, "the metric packs the true rows, never the forged ones"
    assert np.array_equal(np.load(path), original)


def test_token_bytes_changed_with_mtime_kept_is_caught_and_rebuilt_without_retraining(cache, tok, capsys):
    path = cache / "tokenizer" / "token_bytes.pt"
    original = path.read_bytes()
    size = len(original)
    keeping_mtime(path, lambda: overwrite(path, size // 2 - 32, bytes(64)))
    assert path.read_bytes() != original and path.stat().st_size == size
    refused("token_bytes.pt differs from the one prepare.py recorded", "uv run prepare.py")
    with pytest.raises(prepare.PrepareError, match="token_bytes.pt differs"):
        prepare.evaluate_bpb(TinyAttention(tok.get_vocab_size(), "causal"), tok, 8)
    out = healed(capsys)
    assert "rebuilt it from tokenizer.pkl" in out and "tokenizer: vocab" not in out, "not trained again"
    assert prepare.Tokenizer.from_directory().id == tok.id
    raw = [0 if i >= tok.get_vocab_size() - len(prepare.SPECIAL_TOKENS) else len(tok.enc.decode_single_token_bytes(i))
           for i in range(tok.get_vocab_size())]
    assert prepare.get_token_bytes().tolist() == raw


def test_truncated_token_bytes_is_one_line_before_training(cache, tok, capsys):
    path = cache / "tokenizer" / "token_bytes.pt"
    truncate(path)
    refused("token_bytes.pt differs from the one prepare.py recorded")
    with pytest.raises(prepare.PrepareError):  # one line, not a raw OSError from torch.load
        prepare.get_token_bytes()
    healed(capsys)


def test_garbled_tokens_body_is_caught_and_the_loader_does_not_crash(cache, tok, capsys):
    path = train_cache_base(tok) + ".tokens.npy"
    x0, y0, _ = next(prepare.make_dataloader(tok, 4, 64, "train", device="cpu"))
    garbage = np.random.default_rng(1).bytes(os.path.getsize(path) - npy_body(path))
    keeping_mtime(path, lambda: overwrite(path, npy_body(path), garbage))
    refused("token cache of shard_00000.parquet", "shard_00000.tokens.npy holds ids beyond the vocabulary",
            "uv run prepare.py")
    assert tokencache.load_token_cache(tok, prepare.list_shards("train")[0]) is None
    x, y, _ = next(prepare.make_dataloader(tok, 4, 64, "train", device="cpu"))  # tokenized on the fly instead
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert "shard_00000.tokens.npy holds ids beyond the vocabulary (8192); rebuilding it" in healed(capsys)


def test_half_of_tokens_overwritten_with_a_valid_id_is_caught_by_content(cache, tok, capsys):
    """Structure intact (ids below the vocabulary, BOS where documents start):
    only the recorded sha256 can tell."""
    path, shard = train_cache_base(tok) + ".tokens.npy", prepare.list_shards("train")[0]
    tokens_before, offsets, _ = tokencache.load_token_cache(tok, shard)
    tokens_before = np.array(tokens_before)

    def forge():
        tokens = np.load(path, mmap_mode="r+")
        half = np.arange(len(tokens) // 2, len(tokens))
        half = half[~np.isin(half, offsets)]  # keep every document's BOS
        tokens[half] = 100
        tokens.flush()

    keeping_mtime(path, forge)
    cached, problem = tokencache.check_token_cache(tok, shard)
    assert cached is not None and problem is None, "the cheap structural check cannot see this one"
    refused("shard_00000.tokens.npy differs from the sha256 recorded", "uv run prepare.py")
    healed(capsys)
    assert np.array_equal(tokencache.load_token_cache(tok, shard)[0], tokens_before)


def test_garbled_offsets_are_caught_and_healed(cache, tok, capsys):
    path, shard = train_cache_base(tok, 1) + ".offsets.npy", prepare.list_shards("train")[1]
    offsets_before = np.array(tokencache.load_token_cache(tok, shard)[1])
    body = npy_body(path)
    garbage = np.random.default_rng(2).bytes(os.path.getsize(path) - body)
    keeping_mtime(path, lambda: overwrite(path, body, garbage))
    refused("shard_00001.offsets.npy", "uv run prepare.py")
    loader = prepare.make_dataloader(tok, 4, 64, "train", device="cpu")
    for _ in range(20):  # through shard 1: no raw ValueError, the shard is tokenized on the fly
        next(loader)
    healed(capsys)
    assert np.array_equal(tokencache.load_token_cache(tok, shard)[1], offsets_before)


def test_garbled_offsets_header_is_caught(cache, tok, capsys):
    path = train_cache_base(tok, 2) + ".offsets.npy"
    keeping_mtime(path, lambda: overwrite(path, 0, b"\x93NUMPY garbage"))
    refused("shard_00002.*: unreadable")
    healed(capsys)


def test_truncated_val_shard_is_found_before_training(cache, tok, corpus_dir):
    val = cache / "data" / paths.VAL_FILENAME
    truncate(val)
    refused(f"validation shard {val} is not a readable parquet file", f"uv run prepare.py --source {corpus_dir}")
    prepare.prepare(source=str(corpus_dir))  # the command the line names
    prepare.verify_data()


def test_changed_val_shard_is_refused_then_accepted_with_what_depends_on_it(cache, tok, capsys):
    val = cache / "data" / paths.VAL_FILENAME
    keeping_mtime(val, lambda: write_parquet(val, corpus_documents(300, seed=5), row_group_size=200))
    refused("differs from the one prepare.py recorded", "to accept the change, run `uv run prepare.py`")
    assert "validation shard changed since the last prepare" in healed(capsys)
    assert prepare.verify_data()["val"] == files.sha256(val)[:12]
    assert np.array_equal(prepare.val_rows(tok, T, N), prepare.build_val_rows(tok, T, N))
    tokens, offsets, _ = tokencache.load_token_cache(tok, str(val))
    docs = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert docs == tok.encode(corpus_documents(300, seed=5), prepend=tok.get_bos_token_id())


@pytest.mark.slow
def test_verify_data_failure_is_one_line_and_exit_1_for_train_py(cache):
    overwrite(cache / "tokenizer" / "token_bytes.pt", 100, b"\x00" * 8)
    result = run_python("import prepare; prepare.verify_data()", cache)  # smoke-sized checks are not reached
    assert_clean_failure(result, "error: ", "token_bytes.pt differs", "uv run prepare.py")

# =============================================================================
# The harness: constants.py, prepare.py and autoresearch/*.py
# =============================================================================


@pytest.fixture
def harness(cache, tmp_path, monkeypatch):
    """A copy of the harness files, recorded by a prepare run that reads them there."""
    folder = tmp_path / "harness"
    (folder / "autoresearch").mkdir(parents=True)
    for name in manifest.harness_files():
        shutil.copy(ROOT / name, folder / name)
    monkeypatch.setattr(manifest, "HARNESS_DIR", str(folder))
    prepare.prepare()
    return folder


@pytest.mark.parametrize("name", ["constants.py", "prepare.py", "autoresearch/files.py"])
def test_edited_harness_file_is_refused_until_prepare_accepts_it(harness, name, capsys):
    with open(harness / name, "a") as f:
        f.write("\nEVAL_TOKENS = 1  # an edit\n")
    refused(f"{name} differs from the one prepare.py recorded: restore it (git checkout {name}), "
            f"or run `uv run prepare.py` to accept a deliberate change")
    assert f"harness: {name} changed since the last prepare" in healed(capsys)
    assert prepare.verify_data()["harness"][name] == files.sha256(harness / name)[:12]


def test_missing_and_new_harness_files_are_compared_too(harness, capsys):
    (harness / "constants.py").unlink()
    refused("constants.py is missing, but prepare.py recorded it: restore it (git checkout constants.py)")
    healed(capsys)
    assert prepare.verify_data()["harness"]["constants.py"] == "missing", "recorded as missing"
    shutil.copy(ROOT / "constants.py", harness / "constants.py")
    refused("constants.py is new since prepare.py recorded the harness", "uv run prepare.py")
    healed(capsys)
    (harness / "autoresearch" / "extra.py").write_text("# a new fixed module\n")
    refused("autoresearch/extra.py is new since prepare.py recorded the harness", "uv run prepare.py")
    healed(capsys)
    (harness / "autoresearch" / "extra.py").unlink()
    refused("autoresearch/extra.py is missing, but prepare.py recorded it: restore it "
            "(git checkout autoresearch/extra.py)")
    assert "harness: autoresearch/extra.py changed since the last prepare" in healed(capsys)
    assert "autoresearch/extra.py" not in prepare.verify_data()["harness"]


def test_cache_without_harness_fingerprints_is_refused(cache, capsys):
    manifest = files.read_json(str(cache / "manifest.json"))
    del manifest["harness"]
    files.write_json(str(cache / "manifest.json"), manifest)
    refused("recorded no fingerprints of the harness files", "uv run prepare.py")
    healed(capsys)

# =============================================================================
# evaluate_bpb: causality, full batches, finite results
# =============================================================================


def failed(call, *needles):
    """call() must raise EvaluationFailed: a SystemExit whose one line starts with FAIL."""
    return stops_with_one_line(call, prepare.EvaluationFailed, *needles)


@pytest.mark.parametrize("mask", ["none", "next"])
def test_a_model_that_sees_the_future_fails_the_causality_check(cache, tok, mask, middle_choices):
    model = TinyAttention(tok.get_vocab_size(), mask)
    first_p = ((T - 1) // 2) // 2  # the middle of the first half: the first of the two changed copies
    failed(lambda: prepare.check_evaluation(model, tok, 4), "FAIL: the model is not causal",
           f"after position {first_p} changed")
    assert model.shapes == [(4, T)] * 3, "the batch, its changed copy, and the batch again (is it the model's state?)"
    failed(lambda: prepare.evaluate_bpb(model, tok, 4), "not causal")


def test_a_missing_mask_is_caught_at_any_position_drawn(cache, tok, monkeypatch):
    """With p at the end of a row one token changes, and a model without a mask, averaging over
    the whole row, moves too little to show; the first half's p changes half the row's tokens."""
    monkeypatch.setattr(ledger, "choose", lambda n: n - 1)  # every choice at the end of its range
    failed(lambda: prepare.check_evaluation(TinyAttention(tok.get_vocab_size(), "none"), tok, 4), "not causal")


def test_a_mask_that_goes_wrong_late_in_the_row_is_caught(cache, tok, middle_choices):
    late_p = (T - 1) // 2 + (T - 1 - (T - 1) // 2) // 2  # the middle of the second half: the second changed copy
    failed(lambda: prepare.check_evaluation(TinyAttention(tok.get_vocab_size(), "late"), tok, 4),
           f"after position {late_p} changed")


def test_a_causal_model_passes_and_its_result_is_unchanged(cache, tok, middle_choices):
    model = TinyAttention(tok.get_vocab_size(), "causal")
    first = prepare.check_evaluation(model, tok, 4)  # the batch in the middle: rows 16..19
    assert model.shapes == [(4, T)] * 4, "the checked batch, later tokens changed twice, targets changed"
    model.shapes = []
    bpb = prepare.evaluate_bpb(model, tok, 4)
    assert model.shapes == [(4, T)] * (N // 4 + 4), "and the checked batch scored again at the end"
    rows = torch.from_numpy(np.asarray(prepare.val_rows(tok, T, N), dtype=np.int64))
    token_bytes = prepare.get_token_bytes()
    with torch.no_grad():
        nats = model(rows[:, :-1], rows[:, 1:], reduction="none").double()
    nbytes = token_bytes[rows[:, 1:]].reshape(-1)
    assert bpb == pytest.approx(float(nats[nbytes > 0].sum()) / (np.log(2) * float(nbytes.sum())), rel=1e-6)
    nats4 = nats.view(N, T)[16:20].reshape(-1)
    nbytes4 = token_bytes[rows[16:20, 1:]].reshape(-1)
    assert first == pytest.approx(float(nats4[nbytes4 > 0].sum()) / (np.log(2) * float(nbytes4.sum())), rel=1e-6)


def test_bf16_noise_does_not_trip_the_causality_check(cache, tok, middle_choices):
    torch.manual_seed(0)
    model = BF16Noise(tok.get_vocab_size(), "causal")
    first = prepare.check_evaluation(model, tok, 4)
    assert first == pytest.approx(prepare.check_evaluation(TinyAttention(tok.get_vocab_size(), "causal"), tok, 4),
                                  rel=1e-2)


def test_a_model_that_mixes_the_rows_of_a_batch_fails(cache, tok):
    failed(lambda: prepare.evaluate_bpb(TinyAttention(tok.get_vocab_size(), "rows"), tok, 4),
           "not causal", "another row of the batch")


@pytest.mark.parametrize("batch_size", [3, 5, 40])
def test_every_batch_is_full_and_the_padding_is_dropped(cache, tok, batch_size):
    model = TinyAttention(tok.get_vocab_size(), "causal")
    reference = prepare.evaluate_bpb(model, tok, N)
    model.shapes = []
    assert prepare.evaluate_bpb(model, tok, batch_size) == pytest.approx(reference, rel=1e-12)
    assert set(model.shapes) == {(batch_size, T)}, model.shapes


def test_losses_that_carry_gradients_are_detached_here(cache, tok, middle_choices):
    class WithGrad(torch.nn.Module):
        """A caller's wrapper that runs the model with autograd on (its training graph)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, y, reduction="none"):
            with torch.enable_grad():
                return self.model(x, y, reduction=reduction)

    model = TinyAttention(tok.get_vocab_size(), "causal")
    assert prepare.evaluate_bpb(WithGrad(model), tok, 8) == prepare.evaluate_bpb(model, tok, 8)
    assert prepare.check_evaluation(WithGrad(model), tok, 8) == prepare.check_evaluation(model, tok, 8)


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_a_non_finite_val_bpb_is_fail(cache, tok, value, shown):
    model = Constant(tok.get_vocab_size(), value)
    failed(lambda: prepare.evaluate_bpb(model, tok, 8), f"val_bpb is {shown}", "not finite")
    failed(lambda: prepare.check_evaluation(model, tok, 8), f"val_bpb is {shown}")


def test_losses_of_the_wrong_shape_are_fail(cache, tok):
    failed(lambda: prepare.evaluate_bpb(MeanOnly(tok.get_vocab_size(), "causal"), tok, 8),
           f"must return the {8 * T} per-token losses", "got ()")


@pytest.mark.slow
def test_fail_exits_1_with_one_line_and_no_traceback(cache):
    code = ("import torch, prepare\n"
            "class NaN(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            "        self.w = torch.nn.Parameter(torch.zeros(()))\n"
            "    def forward(self, x, y, reduction='mean'):\n"
            "        return torch.full(x.shape, float('nan')) + self.w\n"
            "prepare.evaluate_bpb(NaN(), prepare.Tokenizer.from_directory(), 8)\n"
            "print('val_bpb printed')\n")
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_SMOKE="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True,
                            timeout=120)
    assert_clean_failure(result, "FAIL: val_bpb is nan")
    assert "val_bpb printed" not in result.stdout
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], "one line"
