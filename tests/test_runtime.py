"""
CPU tests for runtime.py, the fixed machinery train.py calls: attention
backends, GPU facts, the parameter-group guard, fitting the micro-batch to
memory, evaluation through the training graphs, and the import boundaries.

    uv run pytest tests/test_runtime.py        # a few seconds
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
import train
from test_train import sdpa_backend, tiny_model  # noqa: F401 (sdpa_backend is a fixture)

REPO = Path(__file__).resolve().parent.parent


def reference_attention(q, k, v, left):
    """Plain masked softmax in float64: query i sees keys j with 0 <= i - j <= left."""
    q, k, v = (t.double() for t in (q, k, v))
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # (B, T, H, D)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~runtime.window_mask(T, left, "cpu"), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)

# =============================================================================
# Attention backends
# =============================================================================


def available_backends():
    backends = [("cpu", "sdpa"), ("cpu", "flex")]  # flex on CPU: forward only, uncompiled
    if torch.cuda.is_available():
        backends += [("cuda", "sdpa"), ("cuda", "flex")]
        saved = runtime._backend
        for name in ("fa4", "fa3"):
            try:
                runtime.select_attention("cuda", name)
                backends.append(("cuda", name))
            except SystemExit:
                pass
        runtime._backend = saved
    return backends


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("device, backend", available_backends())
@pytest.mark.parametrize("T, left, kv_heads", [(40, 7, 4), (40, 39, 4), (40, 1000, 2), (64, 32, 2), (33, 0, 4),
                                                (256, 128, 4)])
def test_attention_backend_matches_reference(device, backend, T, left, kv_heads):
    saved = runtime._backend
    try:
        runtime.select_attention(device, backend)
        torch.manual_seed(0)
        # the flash kernels run in bf16 only, with a head dim they support
        dtype, D = (torch.bfloat16, 64) if backend in ("fa3", "fa4") else (torch.float32, 16)
        q = torch.randn(2, T, 4, D, device=device, dtype=dtype)
        k = torch.randn(2, T, kv_heads, D, device=device, dtype=dtype)
        v = torch.randn(2, T, kv_heads, D, device=device, dtype=dtype)
        y = runtime.attention(q, k, v, (left, 0))
        assert y.shape == q.shape
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(y.double().cpu(), reference_attention(q.cpu(), k.cpu(), v.cpu(), left),
                                   rtol=tol, atol=tol)
    finally:
        runtime._backend = saved


def test_short_window_sees_itself_and_exactly_left_tokens_before(sdpa_backend):
    # perturb key/value at distance left+1 (invisible) and at distance left (visible)
    torch.manual_seed(0)
    T, left, i = 32, 5, 20
    q, k, v = (torch.randn(1, T, 2, 8) for _ in range(3))
    base = runtime.attention(q, k, v, (left, 0))[0, i]
    for j, visible in ((i - left - 1, False), (i - left, True), (i, True), (i + 1, False)):
        k2, v2 = k.clone(), v.clone()
        k2[0, j] += 1.0
        v2[0, j] += 1.0
        changed = not torch.allclose(runtime.attention(q, k2, v2, (left, 0))[0, i], base)
        assert changed == visible, f"key at distance {i - j}"


def test_unknown_attention_backend_is_one_line():
    with pytest.raises(SystemExit, match="AUTORESEARCH_ATTENTION='fa2': use fa4, fa3, flex, sdpa"):
        runtime.select_attention("cpu", "fa2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine may have FA4")
def test_cpu_choice_says_why_each_earlier_backend_was_skipped():
    saved = runtime._backend
    try:
        line = runtime.select_attention("cpu")
        assert line.startswith("sdpa") and "no FA4: no CUDA device" in line and "no FA3: no CUDA device" in line
        with pytest.raises(SystemExit, match="fa4 was asked for, but no CUDA device"):
            runtime.select_attention("cpu", "fa4")
    finally:
        runtime._backend = saved

# =============================================================================
# GPU facts
# =============================================================================


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756.5e12), ("NVIDIA H100 NVL", 835.5e12),
    ("NVIDIA H200", 989.5e12), ("NVIDIA H200 NVL", 835.5e12), ("NVIDIA GH200 480GB", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A10", 125e12), ("NVIDIA A10G", 70e12), ("NVIDIA L40S", 362.05e12), ("NVIDIA L40", 181.05e12),
    ("NVIDIA L4", 121e12), ("NVIDIA B200", 2250e12), ("NVIDIA GB200", 2500e12),
    ("NVIDIA GeForce RTX 3090", 71e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 5090", 209.5e12), ("Tesla T4", None),
])
def test_gpu_peak_flops(name, peak):
    # MFU is against the present GPU's bf16 dense peak; more specific names win over their prefixes
    assert runtime.gpu_peak_flops(name) == peak

# =============================================================================
# Guards
# =============================================================================


def optimizer_for(model):
    return model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, scalar_lr=0.5,
                                 weight_decay=0.2, adam_betas=(0.8, 0.95))


def test_param_groups_guard_passes_the_model_as_built():
    model = tiny_model()
    runtime.check_param_groups(model, optimizer_for(model))


def test_param_groups_guard_names_a_parameter_outside_every_group():
    model = tiny_model()
    model.extra_gain = torch.nn.Parameter(torch.ones(64))  # an agent's new parameter, outside the blocks
    with pytest.raises(SystemExit, match=r"^FAIL: parameter\(s\) in no optimizer group.*: extra_gain \(add them"):
        runtime.check_param_groups(model, optimizer_for(model))
    # frozen on purpose (requires_grad=False) is not an error
    model.extra_gain.requires_grad_(False)
    runtime.check_param_groups(model, optimizer_for(model))


def test_param_groups_guard_names_a_parameter_in_two_groups():
    model = tiny_model()
    optimizer = optimizer_for(model)
    optimizer.param_groups[0]["params"].append(model.x0_lambdas)
    with pytest.raises(SystemExit, match=r"more than one optimizer group: x0_lambdas"):
        runtime.check_param_groups(model, optimizer)


def test_tied_weights_are_one_line_not_a_traceback():
    """Tying lm_head to the embedding puts one tensor in two groups: torch.optim would raise a
    ValueError deep in its constructor; setup_optimizer checks the groups first."""
    model = tiny_model()
    model.lm_head.weight = model.transformer.wte.weight
    with pytest.raises(SystemExit, match=r"^FAIL: parameter\(s\) in more than one optimizer group"):
        optimizer_for(model)


def test_a_vector_inside_the_blocks_is_named_not_an_assert():
    """A bias (1-D) inside a block is no Muon matrix: it is left out, and the guard names it."""
    model = tiny_model()
    model.transformer.h[0].mlp.c_fc.bias = torch.nn.Parameter(torch.zeros(256))
    with pytest.raises(SystemExit, match=r"no optimizer group.*transformer\.h\.0\.mlp\.c_fc\.bias"):
        optimizer_for(model)


def test_a_parameter_without_a_gradient_is_named(sdpa_backend):
    """An unused module inside a block would otherwise sit in a Muon group, and a Muon group with a
    missing gradient is skipped: every matrix of that shape would silently stop training."""
    model = tiny_model()
    model.transformer.h[1].attn.unused = torch.nn.Linear(64, 64, bias=False)  # built, never called
    optimizer_for(model)  # every parameter is in a group: only the gradient check can catch this
    gradients = runtime.track_gradients(model)
    x = torch.randint(0, 97, (2, 32))
    model(x, x).backward()
    with pytest.raises(SystemExit, match=r"got no gradient in step 0.*transformer\.h\.1\.attn\.unused\.weight"):
        gradients.check()
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # the hooks are gone
    del model.transformer.h[1].attn.unused
    gradients = runtime.track_gradients(model)
    model(x, x).backward()
    gradients.check()


def test_negative_window_is_full_causal_attention(sdpa_backend):
    """flash-attn reads a negative left window as "no limit": every backend does the same."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 24, 2, 8) for _ in range(3))
    torch.testing.assert_close(runtime.attention(q, k, v, (-1, 0)), runtime.attention(q, k, v, (23, 0)))
    with pytest.raises(SystemExit, match="use \\(left, 0\\)"):
        runtime.attention(q, k, v, (4, 4))

# =============================================================================
# Fitting the micro-batch to memory
# =============================================================================


@pytest.mark.parametrize("rows, ceiling, expected", [
    (256, 128, [128, 64, 32, 16, 8, 4, 2, 1]),
    (256, 256, [256, 128, 64, 32, 16, 8, 4, 2, 1]),
    (96, 96, [96, 48, 24, 12, 6, 3, 1]),
    (96, 40, [32, 16, 8, 4, 2, 1]),   # a ceiling that does not divide: the largest divisor below it
    (1, 1, [1]),
])
def test_micro_batches_tried_divide_the_step(rows, ceiling, expected):
    sizes = runtime.smaller_micro_batches(rows, ceiling)
    assert sizes == expected and all(rows % s == 0 for s in sizes)


def test_fit_keeps_the_ceiling_when_it_fits_and_probes_nothing():
    calls = []
    result, size, note = runtime.fit_micro_batch(lambda b: calls.append(b) or "ran", 128, 256)
    assert (result, size, note, calls) == ("ran", 128, None, [128])


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("Triton autotuning: out of memory in kernel launch")])
def test_fit_lowers_the_micro_batch_after_an_out_of_memory(error):
    calls = []

    def first_step(b):
        calls.append(b)
        if b > 32:
            raise error
        return f"step at {b}"

    result, size, note = runtime.fit_micro_batch(first_step, 128, 256)
    assert calls == [128, 64, 32] and size == 32 and result == "step at 32"
    assert note == "DEVICE_BATCH_SIZE=128 does not fit this GPU's memory: micro-batch 32, accumulation x8"


def test_fit_raises_other_errors_and_an_out_of_memory_at_one_row():
    def shape_bug(b):
        raise ValueError("shapes do not match")

    with pytest.raises(ValueError):
        runtime.fit_micro_batch(shape_bug, 8, 8)

    def never_fits(b):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        runtime.fit_micro_batch(never_fits, 8, 8)
    assert runtime._micro_batch == 1
    assert "even at a micro-batch of 1" in runtime.out_of_memory_line(1)
    assert runtime.out_of_memory_line(16).startswith("FAIL: CUDA out of memory at a micro-batch of 16. "
                                                     "Lower DEVICE_BATCH_SIZE (to 8 or less)")


def test_out_of_memory_exit_is_one_line(capsys):
    runtime._micro_batch = 64
    with pytest.raises(SystemExit) as exit_info:
        with runtime.out_of_memory_exit():
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert exit_info.value.code == 1
    assert capsys.readouterr().out.strip() == runtime.out_of_memory_line(64)
    with pytest.raises(KeyError):  # anything else passes through untouched
        with runtime.out_of_memory_exit():
            raise KeyError("x")

# =============================================================================
# Evaluation through the training graphs
# =============================================================================


def test_training_graph_eval_equals_plain_evaluation(sdpa_backend):
    """TrainingGraphEval runs the forward with autograd on (to reuse compiled training graphs):
    same per-token losses as a no_grad forward, detached, and no gradient left behind."""
    model = tiny_model(n_layer=2)
    idx, targets = torch.randint(0, 97, (3, 32)), torch.randint(0, 97, (3, 32))
    with torch.no_grad():
        plain = model(idx, targets, reduction="none")
        reused = runtime.TrainingGraphEval(model)(idx, targets, reduction="none")
    assert torch.equal(plain, reused) and not reused.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert runtime.evaluation_model(model) is model  # on a CPU the model is called as it is

# =============================================================================
# Import boundaries: the fixed module never imports train.py; prepare.py never imports runtime.py
# =============================================================================


def test_imports_keep_the_fixed_files_apart():
    code = ("import sys, runtime; assert 'train' not in sys.modules, 'runtime imported train'; "
            "import prepare; assert 'train' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    code = "import sys, prepare; assert 'runtime' not in sys.modules, 'prepare imported runtime'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_train_keeps_no_machinery():
    """train.py is the agent's file: the model, the optimizer's math, hyperparameters, schedules, the loop."""
    source = (REPO / "train.py").read_text()
    for machinery in ("CUDAGraph", "get_kernel", "GPU_PEAK_FLOPS", "create_block_mask", "out of memory"):
        assert machinery not in source, f"{machinery} belongs in runtime.py"
    assert train.attention is runtime.attention  # replaceable in train.py, implemented in runtime.py


def test_fa4_that_fails_at_the_run_shapes_falls_back_with_a_line(monkeypatch, capsys):
    """FA4 is chosen before any of its kernels runs; prepare_attention runs one forward and
    backward at the run's shapes, and a failure there means the next backend, said in a line."""
    def broken_fa4(q, k, v, left):
        raise RuntimeError("DSLRuntimeError: no kernel for head_dim 96\nmore detail")

    monkeypatch.setattr(runtime, "_backend", "fa4")
    monkeypatch.setattr(runtime, "_fa4", broken_fa4)
    monkeypatch.setattr(runtime, "_fa4_failed", None)
    runtime.prepare_attention(16, [(8, 0), (16, 0)], "cpu", heads=2, kv_heads=2, head_dim=8)
    assert runtime._backend == "sdpa"  # the next backend on this CPU
    line = capsys.readouterr().out.strip()
    assert line.startswith("attention:") and "sdpa" in line
    assert "no FA4: FA4 failed at this run's shapes (RuntimeError: DSLRuntimeError: no kernel for head_dim 96)" in line
    with pytest.raises(SystemExit, match="fa4 was asked for, but FA4 failed at this run's shapes"):
        runtime.select_attention("cpu", "fa4")  # forcing it gives the same reason, in one line
