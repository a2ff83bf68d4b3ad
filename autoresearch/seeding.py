"""
The run's seed and what makes two runs comparable: the seed from the environment,
a random stream per parameter for the initial weights (common random numbers), and
the fingerprints of the initial weights and of the training data. DO NOT MODIFY.

train.py imports it (main() reads the seed, GPT.init_weights draws through it, the
identity line and the summary print the fingerprints); it imports
autoresearch.environment, through which every AUTORESEARCH_* variable is read.

Common random numbers: each parameter draws its initial values from its own
generator, seeded from sha256(seed, the parameter's name). Its values then depend
only on the seed, its name and its shape, not on what else the model holds or in
which order init_weights visits it: an edit that adds a block, adds a module or
changes one tensor's init leaves every other tensor bit-identical at step 0, so the
edit is judged against the same starting point, not a re-rolled one. The draws
are made in float32 on the CPU and copied to the parameter's device and dtype, so
they are the same whatever the GPU (CUDA's generators depend on the device).

Not adopted: counter-based draws keyed by (seed, name, row, column), under which a
wider tensor would extend a narrower one's values and a width edit might pair too.
Whether that pairs width edits has to be measured on a GPU; until it is, a reshaped
tensor simply gets new values.
"""

import hashlib
import re

import torch

from autoresearch import environment

DEFAULT_SEED = 42
MAX_SEED = 2**64 - 1  # torch.manual_seed's range


def parse_seed(value):
    """AUTORESEARCH_SEED's value as a seed: a whole number from 0 to 2**64 - 1; empty or blank
    means DEFAULT_SEED. Anything else stops with one line, since a typo must not pick another seed."""
    text = value.strip()
    if not text:
        return DEFAULT_SEED
    if not re.fullmatch(r"[0-9]+", text) or int(text) > MAX_SEED:
        raise SystemExit(f"error: AUTORESEARCH_SEED={value!r} is not a seed: use a whole number from 0 to "
                         f"2**64 - 1 (or leave it unset for {DEFAULT_SEED})")
    return int(text)


def seed_from_env():
    """The run's seed: AUTORESEARCH_SEED, default 42."""
    return parse_seed(environment.text("AUTORESEARCH_SEED", ""))


def stream_seed(seed, name):
    """The 64-bit seed of `name`'s own stream: a stable hash (not Python's hash(), which varies by process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


class ParameterDraws:
    """`draw(p, nn.init.normal_, std=0.02)`: run an nn.init function on parameter p's own stream.

    The stream is a fresh CPU generator seeded from (seed, p's name in `model`), so the
    values depend only on those and p's shape. Drawn in float32 on the CPU, then copied
    into p (its device and dtype). Any nn.init function that takes `generator=` works.
    """

    def __init__(self, model, seed):
        self.seed = seed
        self.names = {id(p): name for name, p in model.named_parameters()}

    def generator(self, name):
        return torch.Generator().manual_seed(stream_seed(self.seed, name))

    @torch.no_grad()
    def __call__(self, param, init_fn, *args, **kwargs):
        name = self.names.get(id(param))
        assert name is not None, f"draw: a tensor of shape {tuple(param.shape)} that is not a parameter of the model"
        values = torch.empty(param.shape, dtype=torch.float32)
        init_fn(values, *args, generator=self.generator(name), **kwargs)
        param.copy_(values)
        return param


def weights_fingerprint(model):
    """12 hex digits of sha256 over the parameters in name order (each name, dtype, shape and
    bytes): equal fingerprints, equal initial weights. train.py takes it at step 0, before the
    first optimizer step."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        h.update(f"{name} {p.dtype} {tuple(p.shape)}\n".encode())
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes: bf16 has no numpy dtype
    return h.hexdigest()[:12]


def data_fingerprint(fingerprints):
    """12 hex digits over what verify_data() returns of the data: the validation shard, the
    tokenizer and the training shards. The training order is fixed (the loader is
    deterministic), so runs with equal data fingerprints see the same batches."""
    text = " ".join(f"{key}={fingerprints[key]}" for key in ("val", "tokenizer", "train_shards"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
