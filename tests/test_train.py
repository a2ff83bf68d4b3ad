"""
CPU tests for train.py: the model, MuonAdamW, the schedules, the attention
backends and the smoke run end to end. Hermetic: no network, no ~/.cache.

    uv run pytest tests/test_train.py          # about 2-3 minutes on 2 cores
    uv run pytest tests/test_train.py -k "not smoke"   # the fast part only
"""

import copy
import math
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from train import GPT, GPTConfig, MuonAdamW

REPO = Path(__file__).resolve().parent.parent


# =============================================================================
# Helpers
# =============================================================================

def tiny_model(n_layer=2, n_embd=64, n_head=2, n_kv_head=None, vocab_size=97, sequence_len=32,
               window_pattern="SL", seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head or n_head, n_embd=n_embd, window_pattern=window_pattern)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


@pytest.fixture
def sdpa_backend():
    """The CPU backend, chosen for the test and restored afterwards."""
    saved = train._backend
    train.select_attention("cpu", "sdpa")
    yield
    train._backend = saved


def reference_attention(q, k, v, left):
    """Plain masked softmax in float64: query i sees keys j with 0 <= i - j <= left."""
    q, k, v = (t.double() for t in (q, k, v))
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # (B, T, H, D)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    i = torch.arange(T)
    distance = i[:, None] - i[None, :]
    scores = scores.masked_fill(~((distance >= 0) & (distance <= left)), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


# =============================================================================
# Model
# =============================================================================

def test_param_counts_at_defaults_match_spec():
    config = train.model_config(8192)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (8, 512, 4, 4)
    with torch.device("meta"):
        model = GPT(config)
    assert model.param_counts() == {
        "wte": 4_194_304,
        "value_embeds": 16_777_216,
        "lm_head": 4_194_304,
        "transformer_matrices": 25_166_336,
        "scalars": 16,
        "total": 50_332_176,
    }
    # 6 * (total - wte - value embeds - scalars) + sum over layers 12 * heads * head_dim * min(window, T)
    attn = 12 * 4 * 128 * (6 * 1024 + 2 * 2048)
    assert model.estimate_flops() == 6 * (50_332_176 - 4_194_304 - 16_777_216 - 16) + attn


def test_width_rounds_up_to_head_dim(monkeypatch):
    monkeypatch.setattr(train, "DEPTH", 3)  # 3 * 64 = 192 -> 256
    config = train.model_config(100)
    assert (config.n_embd, config.n_head) == (256, 2)


@pytest.mark.parametrize("n_layer, pattern, expected", [
    (8, "SSSL", "SSSLSSSL"),
    (6, "SSSL", "SSSLSL"),
    (5, "SSSL", "SSSLL"),   # the last layer is always full
    (3, "S", "SSL"),
    (4, "L", "LLLL"),
    (1, "S", "L"),
    (7, "sl", "SLSLSLL"),
])
def test_window_sizes(n_layer, pattern, expected):
    config = GPTConfig(sequence_len=2048, n_layer=n_layer, window_pattern=pattern)
    windows = train.window_sizes(config)
    assert windows == [((2048 if c == "L" else 1024), 0) for c in expected]


@pytest.mark.parametrize("n_layer, expected", [
    (8, [1, 3, 5, 7]),
    (7, [0, 2, 4, 6]),
    (2, [1]),
    (1, [0]),
    (12, [1, 3, 5, 7, 9, 11]),
])
def test_value_embedding_layers(n_layer, expected):
    assert [i for i in range(n_layer) if train.has_value_embedding(i, n_layer)] == expected
    config = GPTConfig(sequence_len=64, vocab_size=11, n_layer=n_layer, n_head=1, n_kv_head=1, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    assert sorted(int(k) for k in model.value_embeds) == expected
    gated = [i for i, block in enumerate(model.transformer.h) if block.attn.ve_gate is not None]
    assert gated == expected


def test_init_table():
    model = tiny_model(n_layer=3, n_embd=128, n_head=2)
    s = 3**0.5 / 128**0.5
    assert torch.all(model.resid_lambdas == 1.0) and torch.allclose(model.x0_lambdas, torch.full((3,), 0.1))
    for block in model.transformer.h:
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
        for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.c_fc.weight):
            assert w.abs().max() <= s and w.abs().max() > 0.9 * s
        if block.attn.ve_gate is not None:
            assert torch.all(block.attn.ve_gate.weight == 0)
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.05
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.0001
    assert model.cos.dtype == torch.bfloat16 and model.cos.shape == (1, 10 * 32, 1, 32)


def test_forward_shapes_loss_and_softcap(sdpa_backend):
    model = tiny_model(n_layer=3, n_kv_head=1)
    model.lm_head.weight.data.normal_(0, 5.0)  # large logits, to exercise the soft cap
    idx = torch.randint(0, 97, (3, 32))
    logits = model(idx)
    assert logits.shape == (3, 32, 97) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0
    loss = model(idx, idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    per_token = model(idx, idx, reduction="none")
    assert per_token.shape == (3 * 32,)
    assert torch.allclose(per_token.mean(), loss)


def test_initial_loss_is_uniform(sdpa_backend):
    # lm_head ~ N(0, 0.001): the model starts by predicting nearly uniformly
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 32))
    assert abs(model(idx, idx).item() - math.log(97)) < 0.01


def test_tiny_model_drives_loss_down(sdpa_backend):
    model = tiny_model(n_layer=2, n_embd=64, n_head=2, sequence_len=32)
    optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, scalar_lr=0.5,
                                      weight_decay=0.2, adam_betas=(0.8, 0.95))
    x = torch.randint(0, 97, (4, 32))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for step in range(40):
        loss = model(x, y)
        loss.backward()
        for group in optimizer.param_groups:
            if group["kind"] == "muon":
                group["momentum"] = train.get_muon_momentum(step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


# =============================================================================
# Optimizer
# =============================================================================

@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_groups_match_torch_adamw(weight_decay):
    torch.manual_seed(0)
    shapes = [(5, 7), (13,), (3, 4, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    settings = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    opt = MuonAdamW([dict(kind="adamw", params=ours[:2], **settings),
                     dict(kind="adamw", params=ours[2:], **dict(settings, betas=(0.96, 0.95)))])
    ref = torch.optim.AdamW([dict(params=theirs[:2]), dict(params=theirs[2:], betas=(0.96, 0.95))],
                            lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    for step in range(10):
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 512), (512, 128), (4, 32), (96, 160)])
def test_polar_express_is_nearly_orthogonal(shape):
    torch.manual_seed(0)
    g = torch.randn(3, *shape)
    X = train.polar_express(g, steps=5)
    assert X.dtype == torch.bfloat16 and X.shape == g.shape
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.75 and s.max() < 1.2, (s.min().item(), s.max().item())
    # same singular vectors as g: X is close to U·Vᵀ
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    cos = (X.float() * (U @ Vh)).sum() / (X.float().norm() * (U @ Vh).norm())
    assert cos > 0.98


def test_polar_express_square_matrix_bulk():
    # a random square matrix has singular values near 0, which 5 steps cannot lift; the bulk must be ~1
    torch.manual_seed(0)
    s = torch.linalg.svdvals(train.polar_express(torch.randn(256, 256)).float())
    inside = ((s > 0.75) & (s < 1.2)).float().mean()
    assert inside > 0.95 and s.max() < 1.2


@pytest.mark.parametrize("shape, red_dim", [((3, 64, 16), -1), ((3, 16, 64), -2), ((2, 32, 32), -1)])
def test_normuon_keeps_frobenius_norm_and_state_shape(shape, red_dim):
    torch.manual_seed(0)
    state_shape = (shape[0], shape[1], 1) if red_dim == -1 else (shape[0], 1, shape[2])
    second_moment = torch.zeros(state_shape)
    beta2 = torch.tensor(0.95)
    for _ in range(3):
        # rows (or columns) of very different scales
        update = torch.randn(shape) * torch.logspace(-2, 1, shape[-1 if red_dim == -2 else -2]).reshape(
            (1, 1, -1) if red_dim == -2 else (1, -1, 1))
        out = train.normuon(update, second_moment, beta2, red_dim)
        torch.testing.assert_close(out.norm(dim=(-2, -1)), update.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    assert second_moment.shape == state_shape and torch.all(second_moment > 0)
    # it evens out the scales: the per-row (per-column) RMS spread shrinks
    spread = lambda t: (lambda r: r.max() / r.min())(t.square().mean(dim=red_dim).sqrt())
    assert spread(out) < spread(update) / 10


def test_normuon_ema():
    second_moment = torch.zeros(1, 2, 1)
    update = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])  # row mean squares 1 and 4
    train.normuon(update, second_moment, torch.tensor(0.95), -1)
    torch.testing.assert_close(second_moment.flatten(), torch.tensor([0.05, 0.2]))


def test_cautious_decay_touches_only_same_sign_entries():
    torch.manual_seed(0)
    p = torch.randn(50, 40)
    update = torch.randn(50, 40)
    lr, wd = torch.tensor(0.1), torch.tensor(0.5)
    new = p.clone()
    train.cautious_step(new, update, lr, wd)
    same = (p * update) > 0
    assert 0.3 < same.float().mean() < 0.7
    torch.testing.assert_close(new[~same], (p - 0.1 * update)[~same])
    torch.testing.assert_close(new[same], (p - 0.1 * update - 0.1 * 0.5 * p)[same])


def test_muon_groups_learning_rates_and_stack():
    model = tiny_model(n_layer=2, n_embd=64, n_head=2)
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, scalar_lr=0.5,
                                weight_decay=0.2, adam_betas=(0.8, 0.95))
    scale = (64 / 768) ** -0.5
    adamw = [g for g in opt.param_groups if g["kind"] == "adamw"]
    assert [round(g["lr"], 10) for g in adamw] == [round(x, 10) for x in
                                                   (0.004 * scale, 0.6 * scale, 0.6 * scale, 0.005, 0.5)]
    assert [g["betas"] for g in adamw] == [(0.8, 0.95)] * 4 + [(0.96, 0.95)]
    assert all(g["eps"] == 1e-10 and g["weight_decay"] == 0.0 for g in adamw)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    block_params = {id(p) for p in model.transformer.h.parameters()}
    assert {id(p) for g in muon for p in g["params"]} == block_params
    assert sorted(tuple(g["params"][0].shape) for g in muon) == [(2, 32), (64, 64), (64, 256), (256, 64)]
    assert all(g["lr"] == 0.04 and g["weight_decay"] == 0.2 and g["beta2"] == 0.95 and g["ns_steps"] == 5
               for g in muon)
    # two steps move every block matrix (in the first, the gradient is zero everywhere before the
    # zero-initialised output projections: only weight decay moves those); tall matrices get lr * sqrt(rows / cols)
    seen = {}
    step = opt._muon_step
    def spy(grads, params, *args):
        seen[tuple(params.shape[1:])] = (args[2].item(), len(params))
        return step(grads, params, *args)
    opt._muon_step = spy
    x = torch.randint(0, 97, (2, 32))
    before = [p.detach().clone() for p in model.transformer.h.parameters()]
    for _ in range(2):
        model(x, x).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.transformer.h.parameters()))
    assert seen == {(64, 64): (pytest.approx(0.04), 8), (256, 64): (pytest.approx(0.08), 2),
                    (64, 256): (pytest.approx(0.04), 2), (2, 32): (pytest.approx(0.04), 1)}


def test_muon_step_matches_its_parts():
    torch.manual_seed(0)
    grads, params = torch.randn(2, 48, 16), torch.randn(2, 48, 16)
    buf, moment = torch.randn(2, 48, 16), torch.zeros(2, 48, 1)
    lr, mom, wd, beta2 = (torch.tensor(v) for v in (0.03, 0.9, 0.1, 0.95))
    # expected, by hand
    exp_buf = buf + (grads - buf) * 0.1
    nesterov = grads + (exp_buf - grads) * 0.9
    upd = train.normuon(train.polar_express(nesterov), moment.clone(), beta2, -1).float()
    exp_params = params - 0.03 * upd - 0.03 * 0.1 * params * ((upd * params) >= 0)
    train.muon_step(grads.clone(), params, buf, moment, lr, mom, wd, beta2, 5, -1)
    torch.testing.assert_close(buf, exp_buf)
    torch.testing.assert_close(params, exp_params, rtol=1e-5, atol=1e-6)


def small_optimizer(mode, device="cpu", cls=MuonAdamW, vector=False):
    """An 8x4 AdamW matrix (with vector=True also a 5-vector, its own AdamW group) and two 16x8
    Muon matrices, seeded, in a `cls` (MuonAdamW or a subclass) of `mode`."""
    torch.manual_seed(0)
    adamw = dict(kind="adamw", betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    a = torch.nn.Parameter(torch.randn(8, 4, device=device))
    ms = [torch.nn.Parameter(torch.randn(16, 8, device=device)) for _ in range(2)]
    b = [torch.nn.Parameter(torch.randn(5, device=device))] if vector else []
    groups = [dict(adamw, params=[a], lr=0.01)]
    if vector:
        groups.append(dict(adamw, params=b, lr=0.02))
    groups.append(dict(kind="muon", params=ms, lr=0.02, momentum=0.85, ns_steps=5, beta2=0.95, weight_decay=0.2))
    return [a, *b, *ms], cls(groups, mode=mode)


def set_schedule(opt, step, steps):
    """lr, Muon momentum and weight decay as train.py moves them, `step` of `steps`."""
    for group in opt.param_groups:
        group["lr"] = 0.01 * (1 - step / (2 * steps)) if group["kind"] == "adamw" else 0.02 * (1 - step / (2 * steps))
        if group["kind"] == "muon":
            group["momentum"] = train.get_muon_momentum(step * 300 // steps)
            group["weight_decay"] = train.get_muon_weight_decay(step / steps)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_steps_match_eager_and_never_recompile():
    """The compiled step kernels: same numbers as eager, one graph each while lr/momentum/decay change."""
    from torch._dynamo.utils import counters

    runs = [small_optimizer("eager"), small_optimizer("compiled")]
    graphs_before = counters["stats"]["unique_graphs"]
    for step in range(4):
        grads = [torch.randn(8, 4), torch.randn(16, 8), torch.randn(16, 8)]
        for params, opt in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            set_schedule(opt, step, 4)
            opt.step()
    (a_eager, *m_eager), (a_compiled, *m_compiled) = (params for params, _ in runs)
    torch.testing.assert_close(a_compiled, a_eager, rtol=1e-5, atol=1e-6)
    # Muon: Polar Express runs in bf16 and inductor keeps some intermediates in fp32, so the
    # iterations round differently; the updates agree to bf16-iteration noise, not bit for bit
    start = small_optimizer("eager")[0][1:]  # the matrices as they were before the 4 steps
    for s, e, c in zip(start, m_eager, m_compiled):
        assert (c - e).norm() < 0.2 * (e - s).norm()
    assert counters["stats"]["unique_graphs"] - graphs_before == 2  # adamw_step, muon_step: compiled once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("side_stream", [False, True])
def test_cuda_graph_steps_match_eager_steps(side_stream):
    """mode='cuda_graph' (eager steps, then one captured graph replayed) against mode='eager' on
    the same GPU: same parameters after steps whose lr/momentum/decay change, with gradients
    zeroed in place by the optimizer and, later, replaced by new tensors (copied in); from the
    default stream (capture on a private stream) and from a side stream (as main() runs)."""
    with torch.cuda.stream(torch.cuda.Stream()) if side_stream else nullcontext():
        check_cuda_graph_steps()


def check_cuda_graph_steps():
    runs = [small_optimizer("eager", "cuda"), small_optimizer("cuda_graph", "cuda")]
    for step in range(8):
        grads = [torch.randn(8, 4, device="cuda"), torch.randn(16, 8, device="cuda"), torch.randn(16, 8, device="cuda")]
        for params, opt in runs:
            for p, g in zip(params, grads):
                if step < 5 and p.grad is not None:
                    p.grad.add_(g)  # accumulate into the zeroed gradient, as backward does
                else:
                    p.grad = g.clone()
            set_schedule(opt, step, 8)
            opt.step()
            opt.zero_grad()
        for a, b in zip(*(params for params, _ in runs)):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"step {step}")
    graphed = runs[1][1]
    assert graphed._graph is not None  # the graph was captured and replayed
    graphed.zero_grad()
    assert all(p.grad is not None for p in runs[1][0])  # zeroed in place: the graph reads them there
    graphed.release_graph()
    graphed.zero_grad()
    assert graphed._graph is None and all(p.grad is None for p in runs[1][0])  # now they can be freed


class ReplayByRerun(MuonAdamW):
    """MuonAdamW in mode 'cuda_graph' whose "graph" reruns the eager step on replay: on a CPU
    it shows when step() captures, captures again, or steps eagerly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode, self.captures = "cuda_graph", []

    def _capture(self):
        self.captures.append(self.param_groups[0]["step"])
        optimizer = self

        class Graph:
            def replay(self):
                optimizer._step_groups()
        return Graph()


def test_cuda_graph_mode_captures_when_ready_and_again_when_its_inputs_change():
    (params, opt), (ref_params, ref) = (small_optimizer("eager", cls=cls, vector=True)
                                        for cls in (ReplayByRerun, MuonAdamW))
    saved = None
    for step in range(1, 10):
        grads = [torch.randn(8, 4), torch.randn(5), torch.randn(16, 8), torch.randn(16, 8)]
        if step < 3 or step == 7:
            grads[1] = None  # b: no gradient in the eager steps (its state is created at step 3), none at 7
        if step == 6:
            for o in (opt, ref):
                o.param_groups[2]["ns_steps"] = 3
        if step == 8:  # each loads its own copy (load_state_dict keeps the tensors it is given)
            opt.load_state_dict(copy.deepcopy(saved))
            ref.load_state_dict(copy.deepcopy(saved))
        for ps, o in ((params, opt), (ref_params, ref)):
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g.clone()
            o.step()
            o.zero_grad()
        saved = ref.state_dict()
        for x, y in zip(params, ref_params):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"step {step}")
    # 1-2 eager; 3: b's state does not exist yet, eager; 4: capture; 6: ns_steps changed;
    # 7: b has no gradient; 8: b has one again and a state dict was loaded (one capture)
    assert opt.captures == [4, 6, 7, 8]


# =============================================================================
# Schedules
# =============================================================================

@pytest.mark.parametrize("progress, expected", [
    (0.0, 1.0), (0.3, 1.0), (0.5, 1.0), (0.6, 0.8), (0.75, 0.5), (0.9, 0.2), (1.0, 0.0),
])
def test_lr_multiplier(progress, expected):
    assert train.get_lr_multiplier(progress) == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [(0, 0.85), (150, 0.90), (300, 0.95), (1000, 0.95)])
def test_muon_momentum(step, expected):
    assert train.get_muon_momentum(step) == pytest.approx(expected)


@pytest.mark.parametrize("progress, expected", [(0.0, 0.2), (0.5, 0.1), (1.0, 0.0)])
def test_muon_weight_decay(progress, expected):
    assert train.get_muon_weight_decay(progress) == pytest.approx(expected)


def test_hyperparameters_at_defaults():
    if train.SMOKE:
        pytest.skip("AUTORESEARCH_SMOKE is set in this environment")
    assert (train.ASPECT_RATIO, train.HEAD_DIM, train.WINDOW_PATTERN, train.DEPTH) == (64, 128, "SSSL", 8)
    assert (train.TOTAL_BATCH_SIZE, train.DEVICE_BATCH_SIZE) == (2**19, 128)
    assert train.TOTAL_BATCH_SIZE // (train.DEVICE_BATCH_SIZE * train.MAX_SEQ_LEN) == 2
    assert (train.EMBEDDING_LR, train.UNEMBEDDING_LR, train.MATRIX_LR, train.SCALAR_LR) == (0.6, 0.004, 0.04, 0.5)
    assert (train.WEIGHT_DECAY, train.ADAM_BETAS) == (0.2, (0.8, 0.95))
    assert (train.WARMUP_RATIO, train.WARMDOWN_RATIO, train.FINAL_LR_FRAC) == (0.0, 0.5, 0.0)


# =============================================================================
# Attention backends
# =============================================================================

def available_backends():
    backends = [("cpu", "sdpa"), ("cpu", "flex")]  # flex on CPU: forward only, uncompiled
    if torch.cuda.is_available():
        backends += [("cuda", "sdpa"), ("cuda", "flex")]
        saved = train._backend
        try:
            train.select_attention("cuda", "fa3")
            backends.append(("cuda", "fa3"))
        except SystemExit:
            pass
        train._backend = saved
    return backends


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("device, backend", available_backends())
@pytest.mark.parametrize("T, left, kv_heads", [(40, 7, 4), (40, 39, 4), (40, 1000, 2), (64, 32, 2), (33, 0, 4)])
def test_attention_backend_matches_reference(device, backend, T, left, kv_heads):
    saved = train._backend
    try:
        train.select_attention(device, backend)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if backend == "fa3" else torch.float32
        q = torch.randn(2, T, 4, 16, device=device, dtype=dtype)
        k = torch.randn(2, T, kv_heads, 16, device=device, dtype=dtype)
        v = torch.randn(2, T, kv_heads, 16, device=device, dtype=dtype)
        y = train.attention(q, k, v, (left, 0))
        assert y.shape == q.shape
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(y.double().cpu(), reference_attention(q.cpu(), k.cpu(), v.cpu(), left),
                                   rtol=tol, atol=tol)
    finally:
        train._backend = saved


def test_short_window_sees_itself_and_exactly_left_tokens_before(sdpa_backend):
    # perturb key/value at distance left+1 (invisible) and at distance left (visible)
    torch.manual_seed(0)
    T, left, i = 32, 5, 20
    q, k, v = (torch.randn(1, T, 2, 8) for _ in range(3))
    base = train.attention(q, k, v, (left, 0))[0, i]
    for j, visible in ((i - left - 1, False), (i - left, True), (i, True), (i + 1, False)):
        k2, v2 = k.clone(), v.clone()
        k2[0, j] += 1.0
        v2[0, j] += 1.0
        changed = not torch.allclose(train.attention(q, k2, v2, (left, 0))[0, i], base)
        assert changed == visible, f"key at distance {i - j}"


def test_model_window_is_half_the_context():
    config = GPTConfig(sequence_len=2048, n_layer=4, window_pattern="SSSL")
    windows = train.window_sizes(config)
    assert windows[0] == (1024, 0) and windows[-1] == (2048, 0)


def test_unknown_attention_backend_is_one_line():
    with pytest.raises(SystemExit, match="AUTORESEARCH_ATTENTION='fa2': use fa3, flex or sdpa"):
        train.select_attention("cpu", "fa2")


# =============================================================================
# The script: import, refusal without a GPU, smoke run
# =============================================================================

def run_script(env_extra, timeout, code=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(env_extra)
    args = [sys.executable, "-c", code] if code else [sys.executable, "train.py"]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_import_builds_nothing():
    code = ("import sys, train, torch; "
            "assert train._backend is None and not train._block_masks; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    result = run_script({}, timeout=120, code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine trains for real")
def test_without_cuda_and_without_smoke_exits_with_one_line():
    result = run_script({}, timeout=120)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "AUTORESEARCH_SMOKE=1" in lines[0]


SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"]


def parse_summary(stdout):
    """Return (the line before `---`, {key: value}) for the block after the last `---`."""
    lines = stdout.rstrip("\n").split("\n")
    assert "---" in lines, stdout[-2000:]
    start = len(lines) - 1 - lines[::-1].index("---")
    summary = {}
    for line in lines[start + 1:]:
        key = line.split(":")[0]
        assert line[:18] == f"{key}:".ljust(18) and line[18] != " ", f"not padded to 18 columns: {line!r}"
        summary[key] = line[18:]
    return lines[start - 1], summary


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756.5e12), ("NVIDIA H200", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10", 125e12), ("NVIDIA L40S", 362.05e12),
    ("NVIDIA L4", 121e12), ("Tesla T4", None),
])
def test_gpu_peak_flops(name, peak):
    # MFU is against the present GPU's bf16 dense peak; an H100 PCIe is not an SXM part
    assert train.gpu_peak_flops(name) == peak


def test_missing_data_names_the_prepare_command(tmp_path):
    result = run_script({"AUTORESEARCH_SMOKE": "1", "AUTORESEARCH_CACHE": str(tmp_path)}, timeout=120)
    assert result.returncode != 0
    assert "prepare.py" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_smoke_run_end_to_end(prepared_cache):
    """The agents' preflight: the whole script on this machine, tiny model, smoke budget."""
    result = run_script({"AUTORESEARCH_SMOKE": "1", "AUTORESEARCH_CACHE": str(prepared_cache),
                         "PYTHONUNBUFFERED": "1"}, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    out = result.stdout
    assert re.search(r"^attention: +(fa3|flex|sdpa)", out, re.M), out[:2000]
    assert re.search(r"^data: +val=\w+ tokenizer=\w+", out, re.M), out[:2000]
    # the progress line, one `\r` update per step (text mode turns each `\r` into a newline)
    assert re.search(r"^step 00011 \(\d+\.\d%\) \| loss: \d+\.\d+ \| lrm: ", out, re.M), out[:3000]
    smoke_line, summary = parse_summary(out)
    assert smoke_line.startswith("smoke run")
    assert list(summary) == SUMMARY_KEYS
    val_bpb = float(summary["val_bpb"])
    assert math.isfinite(val_bpb) and 0 < val_bpb < 20
    assert float(summary["training_seconds"]) >= 10  # the smoke TIME_BUDGET
    assert float(summary["total_seconds"]) > float(summary["training_seconds"])
    num_steps = int(summary["num_steps"])
    assert num_steps > train.UNTIMED_STEPS
    assert summary["depth"] == "2" and summary["mfu_percent"] == "0.00" or torch.cuda.is_available()
    assert float(summary["total_tokens_M"]) == pytest.approx(num_steps * 4 * 256 / 1e6, abs=0.05)


def test_loss_graph_gives_the_plain_mean_and_per_token_losses(sdpa_backend):
    """GPT.losses (the one compiled graph) against a plain cross-entropy of the soft-capped logits."""
    model = tiny_model(n_layer=2)
    model.lm_head.weight.data.normal_(0, 1.0)
    idx = torch.randint(0, 97, (2, 32))
    targets = torch.randint(0, 97, (2, 32))
    targets[0, :5] = -1  # ignored targets count in neither the sum nor the mean
    logits = model(idx)
    ref_tokens = F.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-1, reduction="none")
    ref_mean = F.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-1)
    mean_loss, per_token = model.losses(idx, targets)
    assert torch.allclose(mean_loss, ref_mean, atol=1e-6) and torch.allclose(per_token, ref_tokens, atol=1e-6)
    assert mean_loss.requires_grad and not per_token.requires_grad
    assert torch.allclose(model(idx, targets), ref_mean, atol=1e-6)
    assert torch.allclose(model(idx, targets, reduction="none"), ref_tokens, atol=1e-6)


def test_training_graph_eval_equals_plain_evaluation(sdpa_backend):
    """TrainingGraphEval runs the forward with autograd on (to reuse compiled training graphs):
    same per-token losses as a no_grad forward, detached, and no gradient left behind."""
    model = tiny_model(n_layer=2)
    idx, targets = torch.randint(0, 97, (3, 32)), torch.randint(0, 97, (3, 32))
    with torch.no_grad():
        plain = model(idx, targets, reduction="none")
        reused = train.TrainingGraphEval(model)(idx, targets, reduction="none")
    assert torch.equal(plain, reused) and not reused.requires_grad
    assert all(p.grad is None for p in model.parameters())
