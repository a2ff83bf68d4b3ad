"""
The --source import under input that is not what it seems, and the data checks
around it: every form of --source visits a file once; the validation split
shares no document with training; JSON lines end at "\\n" only; imports that
crashed (a lone surrogate, a tree 1,100 folders deep, a parquet name that is
not UTF-8) are one line or imported; NUL bytes, UTF-16, unreadable folders, a
JSONL BOM and dictionary-encoded text are named, counted or imported; a new
user's first hour (a small validation split refused before any tokenizer
trains, no tokenizer kept from a failed prepare, a short skipped-files note);
training shards past the token cache read through by prepare and checked by
verify_data. CPU only, temporary cache roots.

    uv run pytest tests/test_import.py      # about a minute on 2 cores
"""

import codecs
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import assert_clean_failure, corpus_documents, run_prepare, text_source, texts, write_parquet

import prepare
from autoresearch import files, tokencache
from autoresearch.source import import_source


def imported():
    """Every document the import wrote: the training shards in order, then validation."""
    return sum((texts(p) for p in prepare.list_shards("train") + prepare.list_shards("val")), [])


def split():
    """(training documents, validation documents) as the import wrote them."""
    return sum((texts(p) for p in prepare.list_shards("train")), []), texts(prepare.list_shards("val")[0])


def refuses(run, *needles):
    with pytest.raises(prepare.PrepareError) as err:
        run()
    assert all(n in str(err.value) for n in needles), (needles, str(err.value))

# =============================================================================
# Each file once; no document in both splits
# =============================================================================


def test_every_form_of_source_visits_a_file_once(tmp_path, small_cache, capsys):
    src = tmp_path / "src"
    docs = text_source(src / "sub", n_docs=30)
    (src / "loop").symlink_to(".")  # a glob through it imported every file 41 times
    (src / "sub" / "up").symlink_to("..")
    (src / "alias.txt").symlink_to(src / "sub" / "doc_000.txt")  # another name for a file already there
    os.link(src / "sub" / "doc_001.txt", src / "hard.txt")
    for source, repeats in [(src, 2), (f"{src}/**/*.txt", 2), (f"{src}/*/*.txt", 0), (f"{src}/loop/**", 2)]:
        import_source(str(source))
        out = capsys.readouterr().out
        assert sorted(imported()) == sorted(docs), source
        assert "importing 30 documents from 30 files" in out, out
        assert (f"{repeats} repeats (links to files already found)" in out) == (repeats > 0), out


def test_validation_never_shares_a_document_with_training(tmp_path, small_cache, capsys):
    src = tmp_path / "text"
    docs = text_source(src / "a", n_docs=36)
    for i in range(2):  # copies, sorted last: they fall into the validation split
        (src / "z").mkdir(exist_ok=True)
        (src / "z" / f"copy_{i}.txt").write_text(docs[i])
    import_source(str(src))
    out = capsys.readouterr().out
    assert ("data: 2 validation documents are exact copies of training documents; dropped from validation"
            in out), out
    train, val = split()
    assert val == docs[-2:] and not set(val) & set(train)

    pq_src = tmp_path / "parquet"
    pq_src.mkdir()
    own = corpus_documents(60, seed=6)
    write_parquet(pq_src / "a.parquet", own[:40], row_group_size=16)
    write_parquet(pq_src / "zz_val.parquet", own[40:] + own[:5], row_group_size=8)
    import_source(str(pq_src))
    assert "data: 5 validation documents are exact copies of training documents" in capsys.readouterr().out
    train, val = split()
    assert val == own[40:] and train == own[:40]
    assert pq.ParquetFile(prepare.list_shards("val")[0]).metadata.row_group(0).num_rows == 8, "row groups kept"

    write_parquet(pq_src / "zz_val.parquet", own[:10], row_group_size=8)  # nothing of its own
    refuses(lambda: import_source(str(pq_src)), "all 10 validation documents are exact copies of training documents")

# =============================================================================
# JSON lines
# =============================================================================


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_json_lines_end_at_newline_only(tmp_path, small_cache, newline):
    """ensure_ascii=False writes U+2028, U+2029 and U+0085 raw inside strings: they are characters, not line ends."""
    src = tmp_path / "src"
    src.mkdir()
    docs = [f"part one {i}{sep}part two {i} with more words" for i, sep in enumerate("\u2028\u2029\x85" * 10)]
    with open(src / "data.jsonl", "w", encoding="utf-8", newline="") as f:
        f.writelines(json.dumps({"text": doc}, ensure_ascii=False) + newline for doc in docs)
    import_source(str(src))
    assert imported() == docs

# =============================================================================
# Imports that crashed: one line, or imported
# =============================================================================


def remove_deep(folder):
    """Remove a tree too deep for shutil.rmtree's recursion, deepest folder first."""
    chain = [folder]
    while (chain[-1] / "d").is_dir():
        chain.append(chain[-1] / "d")
    for path in reversed(chain):
        for f in path.iterdir():
            if not f.is_dir():
                f.unlink()
        path.rmdir()


@pytest.mark.slow
def test_a_lone_surrogate_a_deep_tree_and_a_name_that_is_not_utf8(tmp_path, small_cache, capsys):
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    docs = corpus_documents(30, seed=8)
    lines = [json.dumps({"text": doc}) for doc in docs]
    lines.insert(12, '{"text": "half of a pair \\ud83d, escaped"}')  # valid JSON, not Unicode
    (jsonl / "a.jsonl").write_text("\n".join(lines) + "\n")
    import_source(str(jsonl))
    assert "1 jsonl lines whose text holds a lone surrogate (not valid Unicode) (first: " \
           f"{jsonl / 'a.jsonl'} line 13)" in capsys.readouterr().out
    assert imported() == docs

    deep = tmp_path / "deep"
    docs = text_source(deep, n_docs=30)
    folder = deep
    for _ in range(1100):
        folder = folder / "d"
        folder.mkdir()
    (folder / "bottom.txt").write_text("the document at the bottom of 1,100 folders")
    try:
        for source in (deep, f"{deep}/**/*.txt"):
            import_source(str(source))
            assert sorted(imported()) == sorted(docs + ["the document at the bottom of 1,100 folders"])
    finally:
        remove_deep(deep / "d")

    named = os.fsencode(tmp_path / "named")
    os.mkdir(named)
    for name, part in [(b"a.parquet", docs[:20]), (b"caf\xe9.parquet", docs[20:])]:
        with open(os.path.join(named, name), "wb") as f:  # pyarrow takes only UTF-8 names: write through Python
            write_parquet(f, part, row_group_size=8)
    import_source(os.fsdecode(named))
    assert f"validation: {tmp_path / 'named'}/caf\\xe9.parquet" in capsys.readouterr().out
    assert imported() == docs
    with open(os.path.join(named, b"a.parquet"), "wb") as f:
        f.write(b"PAR1 not parquet")
    os.rename(os.path.join(named, b"a.parquet"), os.path.join(named, b"\xff.parquet"))
    result = run_prepare(["--source", os.fsdecode(named)], small_cache)
    assert_clean_failure(result, "corrupt parquet file", "named/\\xff.parquet")

# =============================================================================
# Input that is not what it seems
# =============================================================================


def test_nul_bytes_utf16_unreadable_folders_and_a_bom_are_named_or_read(tmp_path, small_cache, capsys, monkeypatch):
    src = tmp_path / "src"
    docs = text_source(src, n_docs=30)
    (src / "zeros.txt").write_bytes(b"\0" * 4096)
    (src / "utf16.txt").write_bytes("Plain ASCII text, saved as UTF-16 without a BOM".encode("utf-16-le"))
    (src / "with_bom.jsonl").write_bytes(codecs.BOM_UTF8 + b'{"text": "the first line, after a BOM"}\n'
                                                           b'{"text": "the second line"}\n')
    (src / "locked").mkdir()
    (src / "locked" / "inside.txt").write_text("never read")
    scandir = os.scandir

    def locked_scandir(path):  # tests run as root, which reads any folder: refuse this one
        if os.fspath(path) == str(src / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked_scandir)
    import_source(str(src))
    out = capsys.readouterr().out
    assert f"data: skipped 2 files with NUL bytes (binary, or UTF-16) (first: {src / 'utf16.txt'})" in out, out
    assert f"1 unreadable folder ({src / 'locked'})" in out, out
    assert sorted(imported()) == sorted(docs + ["the first line, after a BOM", "the second line"])


def test_a_dictionary_encoded_text_column_is_imported_and_prepared(tmp_path, small_cache):
    src = tmp_path / "src"
    src.mkdir()
    docs = corpus_documents(120, seed=9)
    for name, part in [("a.parquet", docs[:50]), ("b.parquet", docs[50:100]), ("c.parquet", docs[100:])]:
        table = pa.table({"text": pa.array(part, type=pa.string()).dictionary_encode()})
        pq.write_table(table, src / name, row_group_size=16)
    prepare.prepare(source=str(src))
    assert imported() == docs
    assert prepare.verify_data()["train_shards"] == 2

# =============================================================================
# A new user's first hour
# =============================================================================


def test_a_small_validation_split_is_refused_before_any_tokenizer_trains(tmp_path, small_cache):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"{i}.txt").write_text(f"document {i}: " + "words enough for training. " * 20)
    (src / "z.txt").write_text("hello there")  # the validation split: 11 bytes, 65 tokens needed
    refuses(lambda: prepare.prepare(source=str(src)), "validation split is too small", "11 bytes of text")
    assert not (small_cache / "tokenizer").exists(), "no tokenizer is trained on a refused import"


def test_a_tokenizer_from_a_failed_prepare_is_not_kept(tmp_path, small_cache, capsys):
    small = tmp_path / "small"
    small.mkdir()
    for i in range(10):  # the tokenizer learns this sentence: its 150 bytes become a handful of tokens
        (small / f"{i}.txt").write_text(f"{i}: " + "the quick brown fox jumps over the lazy dog. " * 3)
    refuses(lambda: prepare.prepare(source=str(small)), "validation split is too small", "tokens")
    assert (small_cache / "tokenizer" / "manifest.json").exists(), "the exact count needed a tokenizer"
    good = tmp_path / "good"
    text_source(good, n_docs=60)
    capsys.readouterr()
    prepare.prepare(source=str(good))
    out = capsys.readouterr().out
    assert "tokenizer: the one there is from a prepare run that did not finish; training it again" in out
    assert "keeping it so results stay comparable" not in out


def test_the_skipped_files_note_shows_the_commonest_extensions_and_a_count(tmp_path, small_cache, capsys):
    src = tmp_path / "src"
    text_source(src, n_docs=30)
    for k in range(40):
        for i in range(k % 3 + 1):
            (src / f"file_{k}_{i}.ext{k:02d}").write_text("x")
    (src / "a.py").write_text("x")
    for i in range(5):
        (src / f"b{i}.csv").write_text("x")
    import_source(str(src))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data: importing"))
    assert "(skipped files: 5 .csv, 3 .ext02, 3 .ext05, 3 .ext08, 3 .ext11, 68 more of 37 other extensions)" in line
    assert len(line) < 300, line

# =============================================================================
# Training shards past the token cache's span
# =============================================================================


def test_training_shards_past_the_token_cache_are_read_through_and_checked(tmp_path, small_cache, monkeypatch):
    monkeypatch.setattr(tokencache, "TOKEN_CACHE_SHARDS", 1)  # shards 1 and 2 are tokenized on the fly
    src = tmp_path / "src"
    src.mkdir()
    docs = corpus_documents(200, seed=11)
    for i in range(4):
        write_parquet(src / f"part_{i}.parquet", docs[50 * i:50 * i + 50], row_group_size=10)
    prepare.prepare(source=str(src))
    prepare.verify_data()
    shard = prepare.list_shards("train")[2]
    data = bytearray(open(shard, "rb").read())
    data[4:204] = b"\xff" * 200  # the first page's header: it no longer decodes, the footer still reads
    open(shard, "wb").write(data)
    refuses(prepare.verify_data, f"training shard {shard} is new or changed since prepare.py read it through")
    refuses(lambda: prepare.prepare(), f"training shard {shard} does not read", "then import again")
    pf = files.open_parquet(shard)  # what the loader reads during training: one line, not a traceback
    refuses(lambda: files.read_texts(pf, 0), f"corrupt parquet file {shard}, row group 0")
