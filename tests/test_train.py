"""
CPU tests for train.py: the model, MuonAdamW, the schedules, the training step,
and the run end to end in smoke mode, also with the edits an agent makes that
must stop the run (or work). Hermetic: no network, no ~/.cache. The run's
machinery in autoresearch/ has its own files, tests/test_runtime.py and
tests/test_fused.py.

    uv run pytest tests/test_train.py          # about 2-3 minutes on 2 cores
    uv run pytest tests/test_train.py -k "not smoke"   # the fast part only
"""

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
from autoresearch import seeding
from train import GPT, GPTConfig, MuonAdamW

from helpers import run_edited, tiny_model

REPO = Path(__file__).resolve().parent.parent


# =============================================================================
# Helpers
# =============================================================================

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
    beta2 = 0.95
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
    train.normuon(update, second_moment, 0.95, -1)
    torch.testing.assert_close(second_moment.flatten(), torch.tensor([0.05, 0.2]))


def test_cautious_decay_touches_only_same_sign_entries():
    torch.manual_seed(0)
    p = torch.randn(50, 40)
    update = torch.randn(50, 40)
    lr, wd = 0.1, 0.5
    new = p.clone()
    train.cautious_step(new, update, lr, wd)
    same = (p * update) > 0
    assert 0.3 < same.float().mean() < 0.7
    torch.testing.assert_close(new[~same], (p - 0.1 * update)[~same])
    torch.testing.assert_close(new[same], (p - 0.1 * update - 0.1 * 0.5 * p)[same])


def test_muon_groups_learning_rates_and_stack(monkeypatch):
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
    step = train.muon_step
    def spy(grads, params, *args):
        seen[tuple(params.shape[1:])] = (float(args[2]), len(params))
        return step(grads, params, *args)
    monkeypatch.setattr(train, "muon_step", spy)
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
    lr, mom, wd, beta2 = 0.03, 0.9, 0.1, 0.95
    # expected, by hand
    exp_buf = buf + (grads - buf) * 0.1
    nesterov = grads + (exp_buf - grads) * 0.9
    upd = train.normuon(train.polar_express(nesterov), moment.clone(), beta2, -1).float()
    exp_params = params - 0.03 * upd - 0.03 * 0.1 * params * ((upd * params) >= 0)
    train.muon_step(grads.clone(), params, buf, moment, lr, mom, wd, beta2, 5, -1)
    torch.testing.assert_close(buf, exp_buf)
    torch.testing.assert_close(params, exp_params, rtol=1e-5, atol=1e-6)


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


def test_model_window_is_half_the_context():
    config = GPTConfig(sequence_len=2048, n_layer=4, window_pattern="SSSL")
    windows = train.window_sizes(config)
    assert windows[0] == (1024, 0) and windows[-1] == (2048, 0)


# =============================================================================
# The script: import, refusal without a GPU, smoke run
# =============================================================================

def run_script(env_extra, timeout, code=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(env_extra)
    args = [sys.executable, "-c", code] if code else [sys.executable, "train.py"]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_import_builds_nothing():
    code = ("import sys, train, torch; from autoresearch import attention; "
            "assert attention._backend is None and not attention._block_masks; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    result = run_script({}, timeout=120, code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine trains for real")
def test_without_cuda_and_without_smoke_exits_with_one_line():
    result = run_script({}, timeout=120)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "AUTORESEARCH_SMOKE=1" in lines[0]


SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth", "seed", "init", "data"]


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


def expected_init(out, seed):
    """The fingerprint of the weights a run with this output starts from: its model rebuilt here
    from the `model:` and `constants:` lines, initialised from `seed`."""
    model_line = re.search(r"^model: +DEPTH=(\d+) width=(\d+) heads=(\d+)x\d+ .* vocab=([\d,]+) ", out, re.M)
    depth, width, heads, vocab = (int(g.replace(",", "")) for g in model_line.groups())
    config = GPTConfig(sequence_len=int(re.search(r"MAX_SEQ_LEN=(\d+)", out).group(1)), vocab_size=vocab,
                       n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=width, window_pattern=train.WINDOW_PATTERN)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cuda" if torch.cuda.is_available() else "cpu")  # the run's device
    model.init_weights(seed)
    return seeding.weights_fingerprint(model)


@pytest.mark.slow
def test_missing_data_names_the_prepare_command(tmp_path):
    result = run_script({"AUTORESEARCH_SMOKE": "1", "AUTORESEARCH_CACHE": str(tmp_path)}, timeout=120)
    assert result.returncode != 0
    assert "prepare.py" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_smoke_run_end_to_end(prepared_cache):
    """The whole script on this machine: tiny model, a fixed number of steps."""
    result = run_script({"AUTORESEARCH_SMOKE": "1", "AUTORESEARCH_CACHE": str(prepared_cache),
                         "PYTHONUNBUFFERED": "1"}, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    out = result.stdout
    assert re.search(r"^attention: +(fa4|fa3|flex|sdpa)", out, re.M), out[:2000]
    assert re.search(r"^data: +val=\w+ tokenizer=\w+ train_shards=\d+", out, re.M), out[:2000]
    # smoke mode names every setting it replaces, so nobody mistakes it for a test of their edit
    smoke = re.search(r"^smoke: +(.*)$", out, re.M).group(1)
    names = [change.split()[0] for change in smoke.split(" (and from")[0].split(", ")]
    assert names == ["DEPTH", "ASPECT_RATIO", "HEAD_DIM", "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE", "TIME_BUDGET"]
    assert "DEPTH 8 -> 2" in smoke and "DEVICE_BATCH_SIZE 128 -> 4" in smoke
    # the progress line, one `\r` update per step (text mode turns each `\r` into a newline)
    assert re.search(r"^step 00011 \(\d+\.\d%\) \| loss: \d+\.\d+ \| lrm: ", out, re.M), out[:3000]
    smoke_line, summary = parse_summary(out)
    assert smoke_line.startswith("smoke run")
    assert list(summary) == SUMMARY_KEYS
    val_bpb = float(summary["val_bpb"])
    assert math.isfinite(val_bpb) and 0 < val_bpb < 20
    assert float(summary["total_seconds"]) > float(summary["training_seconds"]) > 0
    assert int(summary["num_steps"]) == train.SMOKE_STEPS  # steps, not seconds: the same on any machine
    assert summary["depth"] == "2" and (summary["mfu_percent"] == "0.00" or torch.cuda.is_available())
    assert float(summary["total_tokens_M"]) == pytest.approx(train.SMOKE_STEPS * 4 * 256 / 1e6, abs=0.05)
    # what the run was compared on: the seed line and the summary agree, `data` condenses the data line,
    # and `init` is the fingerprint of this model's weights at the default seed, before any update
    seed_line = re.search(r"^seed: +(\d+) init=([0-9a-f]{12}) data=([0-9a-f]{12}) ", out, re.M)
    assert seed_line and seed_line.groups() == (summary["seed"], summary["init"], summary["data"]), out[-3000:]
    assert summary["seed"] == str(seeding.DEFAULT_SEED) and summary["init"] == expected_init(out, seeding.DEFAULT_SEED)
    data = dict(re.findall(r"(val|tokenizer|train_shards)=(\w+)", re.search(r"^data: +(.*)$", out, re.M).group(1)))
    assert summary["data"] == seeding.data_fingerprint({**data, "train_shards": int(data["train_shards"])})


@pytest.mark.slow
def test_smoke_runs_are_repeatable(prepared_cache):
    """A fixed number of steps: two smoke runs of one commit give the same val_bpb on a CPU, from the
    same initial weights (AUTORESEARCH_SEED=7 here, not the default)."""
    env = {"AUTORESEARCH_SMOKE": "1", "AUTORESEARCH_CACHE": str(prepared_cache), "AUTORESEARCH_SEED": "7"}
    results = [run_script(env, timeout=600) for _ in range(2)]
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    runs = [parse_summary(r.stdout)[1] for r in results]
    assert [run["seed"] for run in runs] == ["7", "7"] and runs[0]["init"] == runs[1]["init"]
    assert runs[0]["val_bpb"] == runs[1]["val_bpb"]


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
    # both carry gradients: agents build custom losses on the per-token values (the published contract)
    assert mean_loss.requires_grad and per_token.requires_grad
    assert torch.allclose(model(idx, targets), ref_mean, atol=1e-6)
    assert torch.allclose(model(idx, targets, reduction="none"), ref_tokens, atol=1e-6)


# =============================================================================
# The training step: what fitting to memory and the optimizer's edits rely on
# =============================================================================

def fixed_batches(rows, micro_batch):
    """The same rows, micro_batch at a time, as the loader would hand them out."""
    for start in range(0, len(rows), micro_batch):
        x = rows[start:start + micro_batch]
        yield x[:, :-1], x[:, 1:], 1


@pytest.mark.parametrize("micro_batch, accumulation", [(2, 2), (1, 4)])
def test_a_smaller_micro_batch_with_more_accumulation_gives_the_same_update(sdpa_backend, micro_batch, accumulation):
    """What fit_micro_batch relies on: the loss scaling makes the step's gradient the same."""
    torch.manual_seed(1)
    rows = torch.randint(0, 97, (4, 33))
    grads, updated = [], []
    for b, accum in ((4, 1), (micro_batch, accumulation)):
        model = tiny_model(n_layer=2)
        optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, scalar_lr=0.5,
                                          weight_decay=0.2, adam_betas=(0.8, 0.95))
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        step = optimizer.step
        optimizer.step = lambda: (grads.append([p.grad.clone() for p in model.parameters()]), step())
        train.train_step(model, optimizer, fixed_batches(rows, b), accum, 0, 0.0, nullcontext())
        updated.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*grads):  # the gradient the optimizer sees: the same, to float rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and the update. Muon orthogonalises in bf16, and AdamW's first step is lr * g / (|g| + 1e-10),
    # which turns rounding noise in a near-zero gradient into a full step: compare where |g| is real.
    for g, a, b in zip(grads[0], *updated):
        if g.abs().max() > 1e-4:
            torch.testing.assert_close(a, b, rtol=0, atol=5e-3)
    assert not torch.equal(updated[0][0], tiny_model(n_layer=2).transformer.wte.weight)  # the step moved things


def test_an_optimizer_edit_with_a_step_dependent_branch_takes_effect(sdpa_backend):
    """An agent's Python decision inside the optimizer's step is made every step, never frozen."""

    class FreezeHeadAfterTwoSteps(MuonAdamW):
        def _step_adamw(self, group):
            if group["params"][0].ndim == 2 and group["params"][0].shape[0] == 97 and group["step"] > 2:
                return  # an edit: stop training lm_head after step 2
            super()._step_adamw(group)

    model = tiny_model(n_layer=2)
    optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, scalar_lr=0.5,
                                      weight_decay=0.2, adam_betas=(0.8, 0.95))
    optimizer.__class__ = FreezeHeadAfterTwoSteps
    rows = torch.randint(0, 97, (2 * 6, 33))
    batches = fixed_batches(rows, 2)
    heads = [model.lm_head.weight.detach().clone()]
    for step in range(6):
        train.train_step(model, optimizer, batches, 1, step, step / 6, nullcontext())
        heads.append(model.lm_head.weight.detach().clone())
    moved = [not torch.equal(a, b) for a, b in zip(heads, heads[1:])]
    assert moved == [True, True, False, False, False, False]

# =============================================================================
# Edits an agent makes, run end to end in smoke mode: each stops the run with its line, or works
# =============================================================================

def first_timed_step(stdout):
    return f"step {train.UNTIMED_STEPS:05d}" in stdout


@pytest.mark.slow
def test_a_parameter_outside_the_optimizer_stops_the_run(tmp_path, prepared_cache):
    result = run_edited(tmp_path, prepared_cache, {"train.py": [(
        "        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))\n",
        "        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))\n"
        "        self.logit_scale = nn.Parameter(torch.ones(1))\n")]})
    assert result.returncode == 1
    assert "FAIL: parameter(s) in no optimizer group, they would never train: logit_scale" in result.stderr
    assert "Traceback" not in result.stderr and not first_timed_step(result.stdout)


@pytest.mark.slow
def test_a_crash_in_the_evaluation_path_shows_before_the_first_timed_step(tmp_path, prepared_cache):
    result = run_edited(tmp_path, prepared_cache, {"train.py": [(
        '        return mean_loss if reduction == "mean" else per_token\n',
        '        return mean_loss if reduction == "mean" else per_token.view(-1, 7)  # an eval-only bug\n')]})
    assert result.returncode == 1 and "view" in result.stderr
    assert not first_timed_step(result.stdout) and "step 00001" not in result.stdout


@pytest.mark.slow
def test_attention_without_its_causal_mask_stops_the_run(tmp_path, prepared_cache):
    """A model that sees the future would report a much better val_bpb: it must FAIL instead."""
    result = run_edited(tmp_path, prepared_cache, {"train.py": [(
        "from autoresearch.attention import attention  #",
        "def attention(q, k, v, window_size):  # an agent's attention that forgot the mask\n"
        "    q, k, v = (t.transpose(1, 2) for t in (q, k, v))\n"
        "    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)\n#")]})
    assert result.returncode == 1, result.stdout[-2000:]
    fail = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and "causal" in fail[0], result.stderr[-2000:]
    assert not first_timed_step(result.stdout) and "val_bpb:" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["constants.py", "prepare.py", "autoresearch/kernels.py"])
def test_an_edited_harness_file_stops_the_run(tmp_path, prepared_cache, name):
    result = run_edited(tmp_path, prepared_cache, {name: [('"""', '"""\n# an innocent-looking edit\n')]})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if name in line]
    assert lines and "uv run prepare.py" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "step 00000" not in result.stdout


@pytest.mark.slow
def test_a_micro_batch_that_does_not_fit_is_lowered_and_the_run_completes(tmp_path, prepared_cache):
    """A simulated out-of-memory above 2 rows: the run fits itself, says so, and trains the same tokens."""
    result = run_edited(tmp_path, prepared_cache, {"train.py": [(
        "        x, y, epoch = next(batches)\n",
        "        x, y, epoch = next(batches)\n"
        "        if x.size(0) > 2:\n"
        "            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 9.00 GiB (simulated)')\n")]})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"^batch: +TOTAL_BATCH_SIZE=1,024 = micro-batch 2 x MAX_SEQ_LEN=256 x 2 accumulation steps "
                     r"\(DEVICE_BATCH_SIZE=4 does not fit this GPU's memory: micro-batch 2, accumulation x2\)",
                     result.stdout, re.M), result.stdout[:3000]
    assert "fitting to memory" in result.stdout
    _, summary = parse_summary(result.stdout)
    assert float(summary["total_tokens_M"]) == pytest.approx(train.SMOKE_STEPS * 4 * 256 / 1e6, abs=0.05)
    assert summary["init"] == expected_init(result.stdout, seeding.DEFAULT_SEED), "the rebuilt model starts the same"
