"""
Helpers the test files share (not fixtures: those are in conftest.py): the tiny
corpus, prepare.py in a subprocess, pointing this process at another cache root,
a tiny model, and what a clean failure looks like. Test files import from here,
never from each other.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# =============================================================================
# A tiny corpus: English-like prose, numbers, code, CJK, kana, emoji
# =============================================================================

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no what up out about into can "
         "model data token train loss value layer batch learning rate network gradient research night agent").split()
CJK = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从"
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコ"
EMOJI = "😀😂🥲😍🤖🚀🌍🔥✨🎉👍🙂🍕🐍📈"
SPECIAL_LITERAL = "<|reserved_0|>"


def _prose(rng, n_words):
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        if i == 0 or out[-1].endswith("."):
            w = w.capitalize()
        if rng.random() < 0.08:
            w += rng.choice([".", ",", "!", "?", ";"])
        out.append(w)
    return " ".join(out) + "."


def _numbers(rng):
    return " ".join(rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 9))), f"{rng.random() * 1000:.3f}",
                                f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"])
                    for _ in range(rng.randint(3, 40)))


def _code(rng):
    name = rng.choice(WORDS)
    lines = [f"def {name}_{rng.randint(0, 99)}(x, y={rng.randint(0, 9)}):"]
    for _ in range(rng.randint(1, 12)):
        lines.append(f"    x = x * {rng.randint(1, 99)} + y  # {rng.choice(WORDS)}")
    lines.append("    return {'a': x, 'b': [1, 2, 3]}\n")
    return "\n".join(lines)


def _cjk(rng):
    s = "".join(rng.choice(CJK) for _ in range(rng.randint(5, 200)))
    return s + "。" + "".join(rng.choice(KANA) for _ in range(rng.randint(0, 40)))


def _emoji(rng):
    return " ".join(rng.choice(WORDS) + rng.choice(EMOJI) * rng.randint(1, 3) for _ in range(rng.randint(2, 30)))


def make_document(rng):
    """One document: a mix of kinds, lengths from a few characters to ~8k."""
    kind = rng.random()
    if kind < 0.15:
        return rng.choice(["ok", "a", "Hi!", "42", "🙂", "你好"])  # very short
    parts = []
    for _ in range(rng.randint(1, 4)):
        pick = rng.random()
        if pick < 0.45:
            parts.append(_prose(rng, rng.randint(5, 300)))
        elif pick < 0.6:
            parts.append(_numbers(rng))
        elif pick < 0.75:
            parts.append(_code(rng))
        elif pick < 0.9:
            parts.append(_cjk(rng))
        else:
            parts.append(_emoji(rng))
    if kind > 0.97:
        parts.append(_prose(rng, 1500))  # long: longer than small T, forces crops
    return "\n\n".join(parts)


def corpus_documents(n, seed):
    rng = random.Random(seed)
    docs = [make_document(rng) for _ in range(n)]
    if seed == 0:
        docs[7] = f"A document that mentions {SPECIAL_LITERAL} as plain text."
    return docs


def write_parquet(path, docs, row_group_size):
    where = path if hasattr(path, "write") else str(path)
    pq.write_table(pa.table({"text": pa.array(docs, type=pa.string())}), where, row_group_size=row_group_size)


def make_parquet_corpus(folder, n_train_files=3, docs_per_file=400, val_docs=300):
    """Training files with row groups of uneven sizes (128-document batches then
    restart mid-way), and a last file that becomes the validation split."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_train_files):
        path = folder / f"part_{i:02d}.parquet"
        write_parquet(path, corpus_documents(docs_per_file, seed=i), row_group_size=[300, 100, 250][i % 3])
        paths.append(path)
    path = folder / "zz_val.parquet"
    write_parquet(path, corpus_documents(val_docs, seed=1000), row_group_size=200)
    paths.append(path)
    return paths

# =============================================================================
# Running the harness
# =============================================================================


def run_prepare(args, cache, extra_env=None, timeout=300):
    """prepare.py in a subprocess with its own cache root; returns CompletedProcess."""
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_SMOKE="1", PYTHONUNBUFFERED="1")
    env.update(extra_env or {})
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *map(str, args)], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def run_python(code, cache):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=120)


def assert_clean_failure(result, *needles):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def use_cache(monkeypatch, root):
    from autoresearch import paths

    """Point this process's cache folders (autoresearch.paths) and subprocesses at another cache root."""
    for name in ("CACHE_DIR", "DATA_DIR", "TOKENIZER_DIR", "TOKENS_DIR"):
        monkeypatch.setattr(paths, name, getattr(paths, name))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(root))
    paths.set_cache_root(str(root))


# =============================================================================
# A tiny model
# =============================================================================


def tiny_model(n_layer=2, n_embd=64, n_head=2, n_kv_head=None, vocab_size=97, sequence_len=32,
               window_pattern="SL", seed=0):
    import torch

    from train import GPT, GPTConfig

    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head or n_head, n_embd=n_embd, window_pattern=window_pattern)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model
