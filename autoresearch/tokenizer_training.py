"""
Training the tokenizer and keeping its files: BPE trained with rustbpe on the
training shards, saved as a pickled tiktoken.Encoding (tokenizer.pkl) with its
bytes-per-token table (token_bytes.pt) and the manifest that vouches for both,
written last. The settings (vocabulary size, special tokens, split pattern,
character caps) are prepare.py's, passed in; so is the Tokenizer class that
reads the files back. DO NOT MODIFY (fixed harness).

Imported by prepare.py (and its tests); it imports autoresearch.files and
autoresearch.paths, and rustbpe and tiktoken only when it trains.
"""

import os
import pickle
import time

import torch

from autoresearch import paths
from autoresearch.files import PrepareError, open_parquet, read_json, read_texts, sha256, write_atomic, write_json

SANITY_TEXT = "Hello world! 12345 67 + 3.14 = ok\n\tdef f(x): return x**2  # 你好，世界 こんにちは 🙂🚀 café"


def _file(name):
    return os.path.join(paths.TOKENIZER_DIR, name)


def _training_texts(train_paths, stats, doc_chars, max_chars):
    """Training documents for the tokenizer: capped at doc_chars each, max_chars
    in all. Records in stats the [name, size] of every shard it reads, the
    characters and whether the total cap cut it short."""
    for path in train_paths:
        pf = open_parquet(path)
        stats["trained_on"].append([os.path.basename(path), os.path.getsize(path)])
        for rg in range(pf.num_row_groups):
            for text in read_texts(pf, rg):
                doc = text[:doc_chars]
                stats["chars"] += len(doc)
                yield doc
                if stats["chars"] >= max_chars:
                    stats["capped"] = True
                    return


def _save_token_bytes(enc, path):
    """Write the bytes-per-token table of enc; returns its short hash for the manifest.
    Raw bytes (decode_single_token_bytes): a token that is part of a multi-byte
    character counts its own bytes, not the 3 bytes of U+FFFD."""
    specials = {enc.encode_single_token(name) for name in enc.special_tokens_set}
    token_bytes = torch.tensor([0 if i in specials else len(enc.decode_single_token_bytes(i))
                                for i in range(enc.n_vocab)], dtype=torch.int32)
    write_atomic(path, lambda f: torch.save(token_bytes, f))
    return sha256(path)[:16]


def train_tokenizer(train_paths, vocab_size, special_tokens, pattern, doc_chars, max_chars):
    """BPE with rustbpe on the training shards; saved as a pickled tiktoken.Encoding."""
    import rustbpe
    import tiktoken

    os.makedirs(paths.TOKENIZER_DIR, exist_ok=True)
    manifest_path = _file("manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # from here on, no half-written state is trusted
    t0 = time.time()
    stats = {"trained_on": [], "chars": 0, "capped": False}
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_training_texts(train_paths, stats, doc_chars, max_chars),
                            vocab_size - len(special_tokens), pattern=pattern)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    # A tiny corpus may not fill the vocabulary: keep what was learned.
    specials = {name: len(ranks) + i for i, name in enumerate(special_tokens)}
    enc = tiktoken.Encoding(name="autoresearch", pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                            special_tokens=specials)
    assert enc.n_vocab <= 1 << 16, "token cache stores uint16 ids"
    if enc.decode(enc.encode_ordinary(SANITY_TEXT)) != SANITY_TEXT:
        raise PrepareError("tokenizer round trip failed on the sanity text")
    pkl_path = _file("tokenizer.pkl")
    write_atomic(pkl_path, lambda f: pickle.dump(enc, f))
    tb_hash = _save_token_bytes(enc, _file("token_bytes.pt"))
    manifest = {"id": sha256(pkl_path)[:16], "token_bytes": tb_hash, "vocab_size": enc.n_vocab,
                **stats, "seconds": round(time.time() - t0, 1)}
    write_json(manifest_path, manifest)
    print(f"tokenizer: vocab {enc.n_vocab} ({len(ranks)} merges+bytes, {len(specials)} special) trained on "
          f"{stats['chars'] / 1e6:.1f} M chars of {len(stats['trained_on'])} shards in {time.time() - t0:.1f} s", flush=True)
    return manifest


def _repair_token_bytes():
    """token_bytes.pt is derived from tokenizer.pkl: when only it fails its hash,
    rebuild it from the pickle instead of training the tokenizer again.
    Returns True when it was rebuilt."""
    manifest_path = _file("manifest.json")
    manifest = read_json(manifest_path)
    pkl_path, tb_path = _file("tokenizer.pkl"), _file("token_bytes.pt")
    try:
        if manifest is None or sha256(pkl_path)[:16] != manifest["id"]:
            return False  # no trusted tokenizer: it is trained again anyway
        if os.path.exists(tb_path) and sha256(tb_path)[:16] == manifest["token_bytes"]:
            return False
        with open(pkl_path, "rb") as f:
            enc = pickle.load(f)
    except (OSError, KeyError, TypeError):
        return False
    manifest["token_bytes"] = _save_token_bytes(enc, tb_path)
    write_json(manifest_path, manifest)
    print(f"tokenizer: {tb_path} did not match the manifest; rebuilt it from tokenizer.pkl", flush=True)
    return True


def tokenizer_state():
    """The tokenizer manifest, if the files it vouches for are there and match."""
    manifest = read_json(_file("manifest.json"))
    if manifest is None:
        return None
    try:
        pkl_ok = sha256(_file("tokenizer.pkl"))[:16] == manifest["id"]
        tb_ok = sha256(_file("token_bytes.pt"))[:16] == manifest["token_bytes"]
    except (OSError, KeyError):
        return None
    return manifest if pkl_ok and tb_ok else None


def _tokenizer_input_changed(manifest, train_paths):
    """Compare the shards the tokenizer read with the training shards now present.
    Returns a description of the change, or None."""
    now = [[os.path.basename(p), os.path.getsize(p)] for p in train_paths]
    before = manifest["trained_on"]
    # Capped: only the shards it read matter; else every training shard.
    if (now[:len(before)] if manifest["capped"] else now) == before:
        return None
    return f"trained on {len(before)} shards ({before[0][0]} ... {before[-1][0]}), now {len(now)} training shards differ"


def ensure_tokenizer(train_paths, retrain, **settings):
    """prepare's tokenizer step: rebuild token_bytes.pt when only it is damaged;
    train (with settings, see train_tokenizer) when no trusted tokenizer is there
    or retrain asks; else keep it, saying whether the training shards changed
    since (results stay comparable). Only a tokenizer that a finished prepare run
    recorded in manifest.json is kept: one from a failed run is trained again.
    Returns True when anything changed."""
    changed = _repair_token_bytes()
    manifest = tokenizer_state()
    recorded = (read_json(os.path.join(paths.CACHE_DIR, "manifest.json")) or {}).get("tokenizer")
    if manifest is not None and not retrain and manifest["id"] != recorded:
        # Trained by a prepare run that did not finish (an import refused, say, for a small
        # validation split): no result was measured with it, so there is nothing to compare.
        print("tokenizer: the one there is from a prepare run that did not finish; training it again", flush=True)
        manifest = None
    if manifest is None or retrain:
        train_tokenizer(train_paths, **settings)
        return True
    difference = _tokenizer_input_changed(manifest, train_paths)
    if difference:
        print(f"tokenizer: {difference}; keeping it so results stay comparable "
              f"(retrain: uv run prepare.py --retrain-tokenizer)", flush=True)
    else:
        print(f"tokenizer: up to date ({manifest['id']}, vocab {manifest['vocab_size']})", flush=True)
    return changed
