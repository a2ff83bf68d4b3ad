"""
The published dataloader, line by line: the plain reference the fast loader in
prepare.py must match row for row (tests/test_prepare.py) and beat
(bench/loader.py). Documents are tokenized on the fly in batches of 128 with
BOS in front; every placement scans the whole buffer. Kept deliberately plain:
no caching, no numpy, no threads.
"""

import os
import sys

import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402


def document_batches(split, tokenizer_batch_size=128):
    """(list of texts, epoch): shard -> row group -> batches of 128 documents, forever."""
    paths = prepare.list_shards(split)
    epoch = 1
    while True:
        for path in paths:
            pf = pq.ParquetFile(path)
            for rg_idx in range(pf.num_row_groups):
                texts = prepare.read_texts(pf, rg_idx)
                for i in range(0, len(texts), tokenizer_batch_size):
                    yield texts[i:i + tokenizer_batch_size], epoch
        epoch += 1


def reference_dataloader(tokenizer, B, T, split, buffer_size=1000):
    """Yields (inputs, targets, epoch), B x T int64 on the CPU."""
    row_capacity = T + 1
    batches = document_batches(split)
    bos_token = tokenizer.get_bos_token_id()
    doc_buffer = []
    epoch = 1

    def refill_buffer():
        nonlocal epoch
        doc_batch, epoch = next(batches)
        doc_buffer.extend(tokenizer.encode(doc_batch, prepend=bos_token))

    while True:
        row_buffer = torch.empty((B, row_capacity), dtype=torch.long)
        for row_idx in range(B):
            pos = 0
            while pos < row_capacity:
                while len(doc_buffer) < buffer_size:
                    refill_buffer()
                remaining = row_capacity - pos
                # Largest document that fits (first one wins ties).
                best_idx, best_len = -1, 0
                for i, doc in enumerate(doc_buffer):
                    doc_len = len(doc)
                    if doc_len <= remaining and doc_len > best_len:
                        best_idx, best_len = i, doc_len
                if best_idx >= 0:
                    doc = doc_buffer.pop(best_idx)
                    row_buffer[row_idx, pos:pos + len(doc)] = torch.tensor(doc, dtype=torch.long)
                    pos += len(doc)
                else:
                    # Nothing fits: crop the shortest document (first one wins ties).
                    shortest_idx = min(range(len(doc_buffer)), key=lambda i: len(doc_buffer[i]))
                    doc = doc_buffer.pop(shortest_idx)
                    row_buffer[row_idx, pos:pos + remaining] = torch.tensor(doc[:remaining], dtype=torch.long)
                    pos += remaining
        yield row_buffer[:, :-1].clone(), row_buffer[:, 1:].clone(), epoch
