"""
Shared fixtures: a tiny, deterministic corpus, a prepared cache and the CPU
attention backend. Plain helpers are in tests/helpers.py.

    uv run pytest                      # every test
    uv run pytest tests/test_prepare.py

`prepared_cache` (session-scoped) writes the corpus as parquet files, runs
`prepare.py --source` once in a subprocess (in smoke mode, so the cached
validation rows are T=256, N=32) into a temporary cache root, then points
`$AUTORESEARCH_CACHE` and the cache folders of this process (autoresearch.paths,
which prepare and the package read) at it for the rest of the session. Nothing
touches ~/.cache or the network.
"""

import os

import pytest
import torch

from helpers import make_parquet_corpus, run_prepare

# =============================================================================
# Fixtures
# =============================================================================


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    make_parquet_corpus(folder)
    return folder


@pytest.fixture(scope="session")
def prepared_cache(tmp_path_factory, corpus_dir):
    """A cache root with data, tokenizer, token cache and (smoke-sized) val rows."""
    cache = tmp_path_factory.mktemp("cache")
    result = run_prepare(["--source", corpus_dir], cache)
    assert result.returncode == 0, f"prepare failed:\n{result.stdout}\n{result.stderr}"
    from autoresearch import paths

    old_env, old_root = os.environ.get("AUTORESEARCH_CACHE"), paths.CACHE_DIR
    os.environ["AUTORESEARCH_CACHE"] = str(cache)
    paths.set_cache_root(str(cache))
    yield cache
    paths.set_cache_root(old_root)
    if old_env is None:
        os.environ.pop("AUTORESEARCH_CACHE", None)
    else:
        os.environ["AUTORESEARCH_CACHE"] = old_env


@pytest.fixture(autouse=True)
def fresh_ledger():
    """Every test starts with an empty run ledger (autoresearch/ledger.py): what one test's
    verify_data held, or its loader counted, never reaches the next."""
    from autoresearch import ledger

    ledger.reset()
    yield
    ledger.reset()


@pytest.fixture
def middle_choices(monkeypatch):
    """The evaluation's random choices (the checked batch, row and position) pinned to the middle of
    their ranges, so a test knows them; tests/test_guards.py tests that they are random."""
    from autoresearch import ledger

    monkeypatch.setattr(ledger, "choose", lambda n: n // 2)


@pytest.fixture
def small_cache(tmp_path, monkeypatch):
    """A fresh cache root for this process's prepare (and its subprocesses), with small
    constants: rows of T=64 tokens, 8 of them scored."""
    import prepare
    from helpers import use_cache

    root = tmp_path / "cache"
    use_cache(monkeypatch, root)
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 64)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 8 * 64)
    return root


@pytest.fixture
def sdpa_backend():
    """The CPU backend, chosen for the test and restored afterwards."""
    from autoresearch import attention

    saved = attention._backend
    attention.select_attention("cpu", "sdpa")
    yield
    attention._backend = saved


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, and say so, on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
