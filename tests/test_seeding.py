"""
CPU tests for common random numbers (autoresearch/seeding.py and GPT.init_weights):
each parameter's initial values depend only on the seed, its name and its shape, so
an edit leaves every parameter it does not touch bit-identical; the seed from
AUTORESEARCH_SEED; the fingerprints of the initial weights and of the data. The
summary's seed/init/data keys are checked by the smoke runs in tests/test_train.py.

    uv run pytest tests/test_seeding.py        # a few seconds
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from autoresearch import seeding
from helpers import assert_clean_failure, tiny_model
from train import GPT

REPO = Path(__file__).resolve().parent.parent


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_shared_identical(a, b, expect_shared):
    """Every parameter both models hold (same name and shape) is bit-identical; `expect_shared`
    must be among them, so the check covers the model, not an empty set."""
    a, b = params(a), params(b)
    shared = [name for name in a if name in b and a[name].shape == b[name].shape]
    assert set(expect_shared) <= set(shared), sorted(set(expect_shared) - set(shared))
    for name in shared:
        assert torch.equal(a[name], b[name]), f"{name} changed although the edit did not touch it"
    return shared


DRAWN = ["transformer.wte.weight", "lm_head.weight", "transformer.h.0.attn.c_q.weight",
         "transformer.h.0.attn.c_k.weight", "transformer.h.0.attn.c_v.weight", "transformer.h.0.mlp.c_fc.weight",
         "transformer.h.1.attn.c_q.weight", "transformer.h.1.mlp.c_fc.weight", "value_embeds.1.weight"]

# =============================================================================
# Common random numbers
# =============================================================================


def test_the_same_seed_gives_the_same_init_every_time():
    a, b = tiny_model(seed=42), tiny_model(seed=42)
    assert_shared_identical(a, b, [name for name, _ in a.named_parameters()])
    assert seeding.weights_fingerprint(a) == seeding.weights_fingerprint(b)


def test_two_seeds_give_different_inits():
    a, b = params(tiny_model(seed=42)), params(tiny_model(seed=43))
    for name in DRAWN:
        assert not torch.equal(a[name], b[name]), f"{name} is the same under seeds 42 and 43"
    assert seeding.weights_fingerprint(tiny_model(seed=42)) != seeding.weights_fingerprint(tiny_model(seed=43))


def test_the_init_is_the_published_distribution():
    """The draws keep init_weights' scales: N(0, 1) embeddings, U(-s, s) matrices, zero projections."""
    model = tiny_model(n_embd=128)
    s = 3**0.5 * 128**-0.5
    wte = model.transformer.wte.weight
    assert abs(wte.std().item() - 1.0) < 0.05 and abs(model.lm_head.weight.std().item() - 0.001) < 0.0001
    c_q = model.transformer.h[0].attn.c_q.weight
    assert c_q.abs().max() <= s and c_q.abs().max() > 0.95 * s
    assert not model.transformer.h[0].attn.c_proj.weight.any() and not model.transformer.h[0].mlp.c_proj.weight.any()
    assert not torch.equal(model.transformer.h[0].attn.c_q.weight, model.transformer.h[1].attn.c_q.weight)
    assert not torch.equal(model.transformer.h[0].attn.c_q.weight, model.transformer.h[0].attn.c_k.weight)


def test_adding_blocks_leaves_the_other_parameters_as_they_were():
    """DEPTH 2 -> 4 (value embeddings stay on the odd layers): blocks 0-1, the embeddings, lm_head
    and value embedding 1 start where they did; only the new parameters are new."""
    shared = assert_shared_identical(tiny_model(n_layer=2), tiny_model(n_layer=4), DRAWN)
    assert "transformer.h.3.attn.c_q.weight" not in shared


class GPTWithExtra(GPT):
    """An agent's edit: a new module, registered last and drawn first."""

    def __init__(self, config):
        super().__init__(config)
        self.extra = nn.Linear(config.n_embd, config.n_embd, bias=False)

    @torch.no_grad()
    def init_weights(self, seed):
        seeding.ParameterDraws(self, seed)(self.extra.weight, nn.init.normal_, std=0.02)
        super().init_weights(seed)


def test_adding_a_module_leaves_the_other_parameters_as_they_were():
    edited = tiny_model(model_class=GPTWithExtra)
    assert edited.extra.weight.std() > 0.01, "the new module was drawn"
    assert_shared_identical(tiny_model(), edited, [name for name, _ in tiny_model().named_parameters()])


@pytest.mark.parametrize("edit", ["normal", "zeros"])
def test_changing_one_tensors_init_leaves_the_others_as_they_were(monkeypatch, edit):
    """init_weights with one line edited: block 0's c_q drawn as N(0, 0.02), or zeroed (no draw at all)."""
    target = "transformer.h.0.attn.c_q.weight"

    class EditedDraws(seeding.ParameterDraws):
        def __call__(self, param, init_fn, *args, **kwargs):
            if self.names[id(param)] != target:
                return super().__call__(param, init_fn, *args, **kwargs)
            return super().__call__(param, nn.init.normal_, std=0.02) if edit == "normal" else param.zero_()

    before = params(tiny_model())
    monkeypatch.setattr(seeding, "ParameterDraws", EditedDraws)
    after = params(tiny_model())
    assert not torch.equal(before[target], after[target]), "the edit took effect"
    for name in before:
        assert name == target or torch.equal(before[name], after[name]), f"{name} changed with {target}'s init"


def test_the_global_random_stream_does_not_change_the_init():
    """The init draws only from its own streams: what ran before it does not matter."""
    model = tiny_model()
    fingerprint = seeding.weights_fingerprint(model)
    torch.rand(1000)
    model.init_weights(0)
    assert seeding.weights_fingerprint(model) == fingerprint


def test_a_draw_on_a_tensor_outside_the_model_names_the_problem():
    model = tiny_model()
    with pytest.raises(AssertionError, match="not a parameter of the model"):
        seeding.ParameterDraws(model, 0)(torch.empty(3, 4), nn.init.normal_)


def test_draws_keep_the_parameter_dtype():
    """A bf16 parameter (the embeddings on CUDA) gets the float32 draws, rounded."""
    model = tiny_model()
    model.lm_head.to(dtype=torch.bfloat16)
    seeding.ParameterDraws(model, 0)(model.lm_head.weight, nn.init.normal_)
    assert model.lm_head.weight.dtype == torch.bfloat16
    generator = seeding.ParameterDraws(model, 0).generator("lm_head.weight")
    reference = torch.empty(model.lm_head.weight.shape).normal_(generator=generator)
    assert torch.equal(model.lm_head.weight, reference.bfloat16())

# =============================================================================
# Fingerprints
# =============================================================================


def test_the_weights_fingerprint_sees_one_changed_value():
    model = tiny_model()
    fingerprint = seeding.weights_fingerprint(model)
    assert len(fingerprint) == 12 and int(fingerprint, 16) >= 0
    with torch.no_grad():
        model.x0_lambdas[1] += 1e-6
    assert seeding.weights_fingerprint(model) != fingerprint


def test_the_data_fingerprint_covers_val_tokenizer_and_shards():
    fingerprints = {"val": "5bfae8c2891e", "tokenizer": "341f357d3fcb", "train_shards": 7, "harness": {"a": "b"}}
    base = seeding.data_fingerprint(fingerprints)
    assert len(base) == 12
    assert seeding.data_fingerprint({**fingerprints, "harness": {}}) == base, "the harness is not the data"
    for key, other in (("val", "000000000000"), ("tokenizer", "000000000000"), ("train_shards", 8)):
        assert seeding.data_fingerprint({**fingerprints, key: other}) != base, key

# =============================================================================
# The seed from the environment
# =============================================================================


@pytest.mark.parametrize("value, seed", [("42", 42), ("0", 0), (" 7 ", 7), ("", seeding.DEFAULT_SEED),
                                         (str(2**64 - 1), 2**64 - 1)])
def test_seed_values(value, seed):
    assert seeding.parse_seed(value) == seed


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "4_2", "+3", "0x2a", "1e3", str(2**64)])
def test_bad_seeds_are_refused(value):
    with pytest.raises(SystemExit, match="AUTORESEARCH_SEED") as refused:
        seeding.parse_seed(value)
    assert "\n" not in str(refused.value)


def test_seed_from_env(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_SEED", raising=False)
    assert seeding.seed_from_env() == 42
    monkeypatch.setenv("AUTORESEARCH_SEED", "137")
    assert seeding.seed_from_env() == 137


@pytest.mark.slow
def test_train_py_refuses_a_bad_seed_before_anything_else(tmp_path):
    """One line and exit 1, before the data is even looked at (the cache here is empty)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_SMOKE="1", AUTORESEARCH_CACHE=str(tmp_path), AUTORESEARCH_SEED="-1")
    result = subprocess.run([sys.executable, "train.py"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert_clean_failure(result, "AUTORESEARCH_SEED='-1'")
    assert result.stderr.strip().count("\n") == 0 and "prepare.py" not in result.stderr
