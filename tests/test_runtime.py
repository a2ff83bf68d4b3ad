"""
CPU tests for the run's machinery in autoresearch/, what train.py calls: the
attention backends (attention.py), GPU facts, fitting the micro-batch to memory
and evaluation through the training graphs (gpu.py), the guards (guards.py),
the lines a run prints (report.py), and the import boundaries.

    uv run pytest tests/test_runtime.py        # a few seconds
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from autoresearch import attention, gpu, guards, report
from helpers import tiny_model

REPO = Path(__file__).resolve().parent.parent


def reference_attention(q, k, v, left):
    """Plain masked softmax in float64: query i sees keys j with 0 <= i - j <= left."""
    q, k, v = (t.double() for t in (q, k, v))
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # (B, T, H, D)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~attention.window_mask(T, left, "cpu"), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)

# =============================================================================
# Attention backends
# =============================================================================


def available_backends():
    backends = [("cpu", "sdpa"), ("cpu", "flex")]  # flex on CPU: forward only, uncompiled
    if torch.cuda.is_available():
        backends += [("cuda", "sdpa"), ("cuda", "flex")]
        saved = attention._backend
        for name in ("fa4", "fa3"):
            try:
                attention.select_attention("cuda", name)
                backends.append(("cuda", name))
            except SystemExit:
                pass
        attention._backend = saved
    return backends


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("device, backend", available_backends())
@pytest.mark.parametrize("T, left, kv_heads", [(40, 7, 4), (40, 39, 4), (40, 1000, 2), (64, 32, 2), (33, 0, 4),
                                                (256, 128, 4)])
def test_attention_backend_matches_reference(device, backend, T, left, kv_heads):
    saved = attention._backend
    try:
        attention.select_attention(device, backend)
        torch.manual_seed(0)
        # the flash kernels run in bf16 only, with a head dim they support
        dtype, D = (torch.bfloat16, 64) if backend in ("fa3", "fa4") else (torch.float32, 16)
        q = torch.randn(2, T, 4, D, device=device, dtype=dtype)
        k = torch.randn(2, T, kv_heads, D, device=device, dtype=dtype)
        v = torch.randn(2, T, kv_heads, D, device=device, dtype=dtype)
        y = attention.attention(q, k, v, (left, 0))
        assert y.shape == q.shape
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(y.double().cpu(), reference_attention(q.cpu(), k.cpu(), v.cpu(), left),
                                   rtol=tol, atol=tol)
    finally:
        attention._backend = saved


def test_short_window_sees_itself_and_exactly_left_tokens_before(sdpa_backend):
    # perturb key/value at distance left+1 (invisible) and at distance left (visible)
    torch.manual_seed(0)
    T, left, i = 32, 5, 20
    q, k, v = (torch.randn(1, T, 2, 8) for _ in range(3))
    base = attention.attention(q, k, v, (left, 0))[0, i]
    for j, visible in ((i - left - 1, False), (i - left, True), (i, True), (i + 1, False)):
        k2, v2 = k.clone(), v.clone()
        k2[0, j] += 1.0
        v2[0, j] += 1.0
        changed = not torch.allclose(attention.attention(q, k2, v2, (left, 0))[0, i], base)
        assert changed == visible, f"key at distance {i - j}"


def test_unknown_attention_backend_is_one_line():
    with pytest.raises(SystemExit, match="AUTORESEARCH_ATTENTION='fa2': use fa4, fa3, flex, sdpa"):
        attention.select_attention("cpu", "fa2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine may have FA4")
def test_cpu_choice_says_why_each_earlier_backend_was_skipped():
    saved = attention._backend
    try:
        line = attention.select_attention("cpu")
        assert line.startswith("sdpa") and "no FA4: no CUDA device" in line and "no FA3: no CUDA device" in line
        with pytest.raises(SystemExit, match="fa4 was asked for, but no CUDA device"):
            attention.select_attention("cpu", "fa4")
    finally:
        attention._backend = saved

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
    assert gpu.gpu_peak_flops(name) == peak

# =============================================================================
# Guards
# =============================================================================


def optimizer_for(model):
    return model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, scalar_lr=0.5,
                                 weight_decay=0.2, adam_betas=(0.8, 0.95))


@pytest.mark.parametrize("total, micro_batch", [(4 * 256, 3), (4 * 256, 0), (1000, 4)])
def test_a_batch_that_does_not_split_into_micro_batches_is_one_line(total, micro_batch):
    guards.check_batch_size(4 * 256, 4, 256)  # the smoke run's sizes pass
    with pytest.raises(SystemExit, match=rf"^FAIL: TOTAL_BATCH_SIZE \({total}\) must be a multiple of "
                                         rf"DEVICE_BATCH_SIZE \* MAX_SEQ_LEN \({micro_batch} \* 256\)"):
        guards.check_batch_size(total, micro_batch, 256)


def test_param_groups_guard_passes_the_model_as_built():
    model = tiny_model()
    guards.check_param_groups(model, optimizer_for(model))


def test_param_groups_guard_names_a_parameter_outside_every_group():
    model = tiny_model()
    model.extra_gain = torch.nn.Parameter(torch.ones(64))  # an agent's new parameter, outside the blocks
    with pytest.raises(SystemExit, match=r"^FAIL: parameter\(s\) in no optimizer group.*: extra_gain \(add them"):
        guards.check_param_groups(model, optimizer_for(model))
    # frozen on purpose (requires_grad=False) is not an error
    model.extra_gain.requires_grad_(False)
    guards.check_param_groups(model, optimizer_for(model))


def test_param_groups_guard_names_a_parameter_in_two_groups():
    model = tiny_model()
    optimizer = optimizer_for(model)
    optimizer.param_groups[0]["params"].append(model.x0_lambdas)
    with pytest.raises(SystemExit, match=r"more than one optimizer group: x0_lambdas"):
        guards.check_param_groups(model, optimizer)


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
    gradients = guards.track_gradients(model)
    x = torch.randint(0, 97, (2, 32))
    model(x, x).backward()
    with pytest.raises(SystemExit, match=r"got no gradient in step 0.*transformer\.h\.1\.attn\.unused\.weight"):
        gradients.check()
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # the hooks are gone
    del model.transformer.h[1].attn.unused
    gradients = guards.track_gradients(model)
    model(x, x).backward()
    gradients.check()


def test_negative_window_is_full_causal_attention(sdpa_backend):
    """flash-attn reads a negative left window as "no limit": every backend does the same."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 24, 2, 8) for _ in range(3))
    torch.testing.assert_close(attention.attention(q, k, v, (-1, 0)), attention.attention(q, k, v, (23, 0)))
    with pytest.raises(SystemExit, match="use \\(left, 0\\)"):
        attention.attention(q, k, v, (4, 4))

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
    sizes = gpu.smaller_micro_batches(rows, ceiling)
    assert sizes == expected and all(rows % s == 0 for s in sizes)


def step_at(micro_batch, seconds=0.0):
    """A first step's result, as train.py's first_step returns it (nothing built)."""
    return gpu.FirstStep(model=None, optimizer=None, batches=None, loss=float(micro_batch), seconds=seconds)


def test_fit_keeps_the_ceiling_when_it_fits_and_probes_nothing():
    calls = []
    result = gpu.fit_micro_batch(lambda b: calls.append(b) or step_at(b), 128, 256)
    assert (result.loss, result.micro_batch, result.fit_note, result.fit_seconds, calls) == (128, 128, None, None,
                                                                                             [128])


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("Triton autotuning: out of memory in kernel launch")])
def test_fit_lowers_the_micro_batch_after_an_out_of_memory(error):
    calls = []

    def first_step(b):
        calls.append(b)
        if b > 32:
            raise error
        return step_at(b)

    result = gpu.fit_micro_batch(first_step, 128, 256)
    assert calls == [128, 64, 32] and result.micro_batch == 32 and result.loss == 32
    assert result.fit_note == "DEVICE_BATCH_SIZE=128 does not fit this GPU's memory: micro-batch 32, accumulation x8"
    assert result.fit_seconds >= 0  # the two attempts that did not fit, for the overhead line


def test_fit_raises_other_errors_and_an_out_of_memory_at_one_row():
    def shape_bug(b):
        raise ValueError("shapes do not match")

    with pytest.raises(ValueError):
        gpu.fit_micro_batch(shape_bug, 8, 8)

    def never_fits(b):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        gpu.fit_micro_batch(never_fits, 8, 8)
    assert gpu._micro_batch == 1
    assert "even at a micro-batch of 1" in gpu.out_of_memory_line(1)
    assert gpu.out_of_memory_line(16).startswith("FAIL: CUDA out of memory at a micro-batch of 16. "
                                                 "Lower DEVICE_BATCH_SIZE (to 8 or less)")


def test_out_of_memory_exit_is_one_line(capsys):
    gpu._micro_batch = 64
    with pytest.raises(SystemExit) as exit_info:
        with gpu.out_of_memory_exit():
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert exit_info.value.code == 1
    assert capsys.readouterr().out.strip() == gpu.out_of_memory_line(64)
    with pytest.raises(KeyError):  # anything else passes through untouched
        with gpu.out_of_memory_exit():
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
        reused = gpu.TrainingGraphEval(model)(idx, targets, reduction="none")
    assert torch.equal(plain, reused) and not reused.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert gpu.evaluation_model(model) is model  # on a CPU the model is called as it is

# =============================================================================
# What a run prints
# =============================================================================


def test_smoke_line_names_each_replaced_setting_in_order():
    line = report.smoke_line(dict(DEPTH=8, HEAD_DIM=128), dict(DEPTH=2, HEAD_DIM=32, ASPECT_RATIO=64), 20)
    assert line.startswith("DEPTH 8 -> 2, HEAD_DIM 128 -> 32, TIME_BUDGET -> 20 steps (and from constants.py: ")


def test_overhead_line_mentions_fitting_only_when_it_happened(capsys):
    report.print_overhead(startup=6.94, fitting=None, warmup=25.6, step0=3.3, evaluation=3.2)
    report.print_overhead(startup=1.0, fitting=12.3, warmup=2.0, step0=0.5, evaluation=0.2)
    assert capsys.readouterr().out.splitlines() == [
        "overhead:    startup 6.9 s, warm-up steps 25.6 s (step 0 with the evaluation check: 3.3 s), evaluation 3.2 s",
        "overhead:    startup 1.0 s, fitting to memory 12.3 s, warm-up steps 2.0 s (step 0 with the evaluation "
        "check: 0.5 s), evaluation 0.2 s",
    ]


def test_batch_line_adds_the_fitting_note():
    line = report.batch_line(2**19, 64, 4, None)
    assert line == f"TOTAL_BATCH_SIZE=524,288 = micro-batch 64 x MAX_SEQ_LEN={train.MAX_SEQ_LEN} x 4 accumulation steps"
    assert report.batch_line(2**19, 64, 4, "lowered") == line + " (lowered)"

# =============================================================================
# Import boundaries: the package never imports train.py; prepare.py never imports the run's machinery
# =============================================================================

RUN_MODULES = ("autoresearch.attention", "autoresearch.gpu", "autoresearch.guards", "autoresearch.kernels",
               "autoresearch.report")


@pytest.mark.slow
def test_imports_keep_the_fixed_files_apart():
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {RUN_MODULES}]; "
            "assert 'train' not in sys.modules, 'the package imported train'; "
            "import prepare; assert 'train' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    code = (f"import sys, prepare; loaded = [m for m in {RUN_MODULES} if m in sys.modules]; "
            "assert not loaded, f'prepare imported {loaded}'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_train_keeps_no_machinery():
    """train.py is the agent's file: the model, the optimizer's math, hyperparameters, schedules, the loop."""
    source = (REPO / "train.py").read_text()
    for machinery in ("CUDAGraph", "get_kernel", "GPU_PEAK_FLOPS", "create_block_mask", "out of memory",
                      "globals().update", "triton"):
        assert machinery not in source, f"{machinery} belongs in the autoresearch package"
    assert train.attention is attention.attention  # replaceable in train.py, implemented in the package


def test_fa4_that_fails_at_the_run_shapes_falls_back_with_a_line(monkeypatch, capsys):
    """FA4 is chosen before any of its kernels runs; prepare_attention runs one forward and
    backward at the run's shapes, and a failure there means the next backend, said in a line."""
    def broken_fa4(q, k, v, left):
        raise RuntimeError("DSLRuntimeError: no kernel for head_dim 96\nmore detail")

    monkeypatch.setattr(attention, "_backend", "fa4")
    monkeypatch.setattr(attention, "_fa4", broken_fa4)
    monkeypatch.setattr(attention, "_fa4_failed", None)
    config = train.GPTConfig(sequence_len=16, n_head=2, n_kv_head=2, n_embd=16)  # heads of 8 channels
    attention.prepare_attention(config, [(8, 0), (16, 0)], "cpu")
    assert attention._backend == "sdpa"  # the next backend on this CPU
    line = capsys.readouterr().out.strip()
    assert line.startswith("attention:") and "sdpa" in line
    assert "no FA4: FA4 failed at this run's shapes (RuntimeError: DSLRuntimeError: no kernel for head_dim 96)" in line
    with pytest.raises(SystemExit, match="fa4 was asked for, but FA4 failed at this run's shapes"):
        attention.select_attention("cpu", "fa4")  # forcing it gives the same reason, in one line
