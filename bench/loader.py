"""
Loader benchmark: the fast loader (prepare.make_dataloader, reading the token
cache) against the plain published algorithm (tests/reference.py, tokenizing
on the fly, scanning the buffer), side by side on the same prepared data.

    uv run bench/loader.py                                    # B=16, T=2048, 10 s each
    uv run bench/loader.py --B 128 --T 2048 --seconds 20 --device cuda
    uv run bench/loader.py --fast-only --B 128 --T 2048       # the fast loader alone

It reads the prepared cache ($AUTORESEARCH_CACHE or ~/.cache/autoresearch; run
prepare.py first). The first batch of each loader (thread start, first buffer
fill) is not timed; on CUDA the clock stops after a device sync. Before timing,
it checks that both loaders give the same first batches.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402
from autoresearch import paths, tokencache  # noqa: E402
from tests.reference import reference_dataloader  # noqa: E402


def on_device(loader, device):
    """The reference yields CPU tensors; move them so both loaders deliver alike."""
    for x, y, epoch in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), epoch


def measure(loader, device, seconds, batches):
    """(tokens/s, batches, seconds) over a time or batch budget, after one warm-up batch."""
    next(loader)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n = tokens = 0
    t0 = time.perf_counter()
    while (n < batches) if batches else (time.perf_counter() - t0 < seconds):
        x, y, _ = next(loader)
        n += 1
        tokens += x.numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return tokens / dt, n, dt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--B", type=int, default=16, help="rows per batch")
    parser.add_argument("--T", type=int, default=2048, help="tokens per row (inputs)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per loader")
    parser.add_argument("--batches", type=int, default=0, help="time this many batches instead (0: use --seconds)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--fast-only", action="store_true", help="skip the reference loader")
    args = parser.parse_args()

    device = torch.device(args.device) if args.device else prepare._default_device()
    tokenizer = prepare.Tokenizer.from_directory()
    cached = sum(tokencache.load_token_cache(tokenizer, p) is not None for p in prepare.list_shards(args.split))
    print(f"loader benchmark: split {args.split}, B={args.B}, T={args.T}, device {device}, "
          f"{os.cpu_count()} CPU cores, {cached} of {len(prepare.list_shards(args.split))} shards in the "
          f"token cache, cache {paths.CACHE_DIR}", flush=True)

    def fast():  # the training loader; for "val" its insides (make_dataloader trains on "train" only)
        loader = prepare.make_dataloader if args.split == "train" else prepare._packed_rows
        return loader(tokenizer, args.B, args.T, args.split, device=device)

    def reference():
        return on_device(reference_dataloader(tokenizer, args.B, args.T, args.split), device)

    if not args.fast_only:
        a, b = fast(), reference()
        for i in range(2):
            (xa, ya, ea), (xb, yb, eb) = next(a), next(b)
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and ea == eb, f"batch {i} differs from the reference"
        print("check: the first 2 batches are identical to the reference's", flush=True)

    results = {}
    for name, make in [("reference", reference), ("fast", fast)]:
        if name == "reference" and args.fast_only:
            continue
        rate, n, dt = measure(make(), device, args.seconds, args.batches)
        results[name] = rate
        label = {"reference": "reference (published algorithm, tokenizing on the fly)",
                 "fast": "fast (prepare.make_dataloader, token cache)"}[name]
        print(f"{label:<56} {rate / 1e6:8.2f} M tokens/s  ({n} batches in {dt:.1f} s)", flush=True)
    if len(results) == 2:
        print(f"ratio fast / reference: {results['fast'] / results['reference']:.1f}x", flush=True)


if __name__ == "__main__":
    main()
