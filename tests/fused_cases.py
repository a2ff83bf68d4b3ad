"""
The cases that pin autoresearch/kernels.py's fused kernels to their plain PyTorch definitions.

tests/test_fused.py runs them twice: on a CPU through Triton's interpreter (in a
subprocess, `TRITON_INTERPRET=1 python tests/fused_cases.py` prints them as JSON),
and on CUDA in-process. Each case returns the largest differences between the fused
piece and its plain version (forward and gradients), the scale they are measured
against, and whether the fused kernels really ran.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autoresearch import kernels  # noqa: E402


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


class KernelLaunches:
    """Counts the fused kernels' launches (so a test knows the kernels, not the plain
    version, produced what it checks) and keeps each launch's keyword arguments (the
    settings it compiled with), restoring the kernels on exit."""

    def __enter__(self):
        self.kernels = kernels._triton_kernels()
        self.saved = dict(self.kernels)
        self.counts = dict.fromkeys(self.saved, 0)
        self.settings = {name: [] for name in self.saved}
        for name, kernel in self.saved.items():
            self.kernels[name] = self._counted(name, kernel)
        return self

    def _counted(self, name, kernel):
        launches = self

        class Counted:
            def __getitem__(self, grid):
                launches.counts[name] += 1
                launcher = kernel[grid]

                def launch(*args, **settings):
                    launches.settings[name].append(settings)
                    return launcher(*args, **settings)
                return launch
        return Counted()

    def __exit__(self, *exc):
        self.kernels.update(self.saved)


def rotary_case(device, dtype, B, T, H, D, scale=1.0, strided_tables=False, table_dtype=None, seed=0):
    """rotary_norm against rotary_norm_plain on one (B, T, H, D) input, forward and backward.
    `scale` 1e-4 makes rows whose mean square is near RMSNorm's eps; `strided_tables` passes
    cos and sin as views into a wider table; `table_dtype` other than x's must fall back."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, H, D, generator=g) * scale).to(device, dtype)
    angles = torch.randn(T, D, generator=g) if strided_tables else torch.randn(T, D // 2, generator=g)
    cos, sin = (a.to(device, table_dtype or dtype)[None, :, None, :] for a in (angles.cos(), angles.sin()))
    if strided_tables:
        cos, sin = cos[..., : D // 2], sin[..., : D // 2]  # (1, T, 1, D/2) with rows D apart
    upstream = torch.randn(B, T, H, D, generator=g).to(device, dtype)
    results = []
    for f in (kernels.rotary_norm, kernels.rotary_norm_plain):
        xi = x.clone().requires_grad_()
        y = f(xi, cos, sin)
        y.backward(upstream)
        results.append((y, xi.grad, type(y.grad_fn).__name__))
    (y, dx, node), (y0, dx0, _) = results
    return dict(fused="autoresearch_rotary_norm" in node, dtype_same=y.dtype == y0.dtype,
                forward=_max_diff(y, y0), backward=_max_diff(dx, dx0), scale=dx0.abs().max().item(),
                forward_scale=y0.abs().max().item())


def cross_entropy_case(device, dtype, N, C, V, cap, ignored=(), per_token_grad=True, chunk=None, seed=0):
    """softcapped_cross_entropy against the plain version: losses, and the gradients of
    sum(losses · u) for random per-token weights u (or of the mean, as training uses it).
    `chunk` below V takes the kernel's two-pass path, as a vocabulary above CE_CHUNK would."""
    saved_chunk = kernels.CE_CHUNK
    kernels.CE_CHUNK = chunk or saved_chunk
    try:
        return _cross_entropy_case(device, dtype, N, C, V, cap, ignored, per_token_grad, seed)
    finally:
        kernels.CE_CHUNK = saved_chunk


def _cross_entropy_case(device, dtype, N, C, V, cap, ignored, per_token_grad, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, N, C, generator=g).to(device, dtype)
    weight = (torch.randn(V, C, generator=g) * 0.5).to(device)  # float32, as lm_head is
    targets = torch.randint(0, V, (2, N), generator=g).to(device)
    for i in ignored:
        targets.view(-1)[i] = -1
    u = torch.rand(2 * N, generator=g).to(device) if per_token_grad else None
    results = []
    for f in (kernels.softcapped_cross_entropy, kernels.softcapped_cross_entropy_plain):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        losses = f(xi, wi.to(dtype), targets, cap)
        objective = (losses * u).sum() if per_token_grad else losses.sum() / (targets != -1).sum()
        objective.backward()
        results.append((losses, xi.grad, wi.grad, type(losses.grad_fn).__name__))
    (loss, dx, dw, node), (loss0, dx0, dw0, _) = results
    with torch.no_grad():  # the evaluation's path: losses only, no gradient written
        loss_nograd = kernels.softcapped_cross_entropy(x, weight.to(dtype), targets, cap)
    return dict(fused="autoresearch_softcapped_cross_entropy" in node, dtype_same=loss.dtype == loss0.dtype,
                losses=_max_diff(loss, loss0), losses_nograd=_max_diff(loss_nograd, loss0), ignored_zero=bool(
                    (loss.view(-1)[list(ignored)] == 0).all()) if ignored else True,
                dx=_max_diff(dx, dx0), dw=_max_diff(dw, dw0), scale=max(dx0.abs().max().item(), dw0.abs().max().item()))


def out_of_vocabulary_case(device, dtype, N, C, V, cap, target, seed=0):
    """A target that is neither -1 nor in the vocabulary: the plain version raises; the
    kernel (which cannot raise) must make that token's loss NaN, which stops a run."""
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(1, N, C, generator=g).to(device, dtype), torch.randn(V, C, generator=g).to(device, dtype)
    targets = torch.randint(0, V, (1, N), generator=g).to(device)
    targets[0, 0] = target
    with KernelLaunches() as launches:
        losses = kernels.softcapped_cross_entropy(x, weight, targets, cap)
    return dict(fused=launches.counts["softcapped_ce"] == 1, first_is_nan=bool(losses[0].isnan()),
                others_finite=bool(losses[1:].isfinite().all()))


def mlp_case(device, dtype, B, T, C, blocks=None, group=None, tiles_fit=True, subtile=True, prefetch=False, seed=0):
    """relu_square_mlp against relu_square_mlp_plain: output and the gradients of x and both
    weights, and the no-grad (evaluation) output. `blocks` (M, N, K) smaller than the
    matrices take several tiles with ragged edges (the interpreter's 3 programs walk them, the
    last tiles past the matrix); `group` row tiles walk the columns together; `subtile` False
    stores each output tile whole; `prefetch` loads the backward's post before its K loop;
    `tiles_fit` False is a GPU whose shared memory the tiles do not fit (the ops' PyTorch path)."""
    saved = (kernels.MLP_BLOCK_M, kernels.MLP_BLOCK_N, kernels.MLP_BLOCK_K, kernels.MLP_GROUP_M, kernels.MLP_SUBTILE,
             kernels.MLP_PREFETCH)
    kernels.MLP_BLOCK_M, kernels.MLP_BLOCK_N, kernels.MLP_BLOCK_K = blocks or saved[:3]
    kernels.MLP_GROUP_M = group or saved[3]
    kernels.MLP_SUBTILE, kernels.MLP_PREFETCH = subtile, prefetch
    programs_saved = kernels._programs
    if blocks:  # 3 programs on a GPU too (one an SM would give each a single tile): each walks several
        kernels._programs = lambda device: 3
    tiles_fit_saved, fits_saved = kernels._mlp_tiles_fit, kernels._mlp_fits
    if not tiles_fit:
        kernels._mlp_tiles_fit = lambda device: False
    kernels.prepare(device)  # as train.py does before its first step
    try:
        return _mlp_case(device, dtype, B, T, C, seed)
    finally:
        (kernels.MLP_BLOCK_M, kernels.MLP_BLOCK_N, kernels.MLP_BLOCK_K, kernels.MLP_GROUP_M, kernels.MLP_SUBTILE,
         kernels.MLP_PREFETCH) = saved
        kernels._programs = programs_saved
        kernels._mlp_tiles_fit, kernels._mlp_fits = tiles_fit_saved, fits_saved


def _mlp_case(device, dtype, B, T, C, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g).to(device, dtype)
    w_fc = (torch.randn(4 * C, C, generator=g) / C**0.5).to(device, dtype)
    w_proj = (torch.randn(C, 4 * C, generator=g) / (4 * C) ** 0.5).to(device, dtype)
    upstream = torch.randn(B, T, C, generator=g).to(device, dtype)
    results = []
    for f in (kernels.relu_square_mlp, kernels.relu_square_mlp_plain):
        inputs = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
        with KernelLaunches() as launches:
            y = f(*inputs)
            y.backward(upstream)
        results.append((y, *(t.grad for t in inputs), launches.counts["relu_square_matmul"]))
        if f is kernels.relu_square_mlp:  # the backward's early read of post, as its launches asked
            prefetch = sorted({s["PREFETCH"] for s in launches.settings["relu_square_matmul"] if s["BACKWARD"]})
    (y, dx, dw_fc, dw_proj, launched), (y0, dx0, dw_fc0, dw_proj0, _) = results
    with torch.no_grad(), KernelLaunches() as launches:
        y_nograd = kernels.relu_square_mlp(x, w_fc, w_proj)
    grads = ((dx, dx0), (dw_fc, dw_fc0), (dw_proj, dw_proj0))
    nograd = launches.counts["relu_square_matmul"]
    return dict(fused=launched == 2 and nograd == 1, launches=launched + nograd,  # forward, backward; no-grad
                prefetch=prefetch, dtype_same=y.dtype == y0.dtype,
                forward=max(_max_diff(y, y0), _max_diff(y_nograd, y0)),
                forward_scale=y0.abs().max().item(),
                backward=max(_max_diff(a, b) / b.abs().max().item() for a, b in grads))


# (name, function, kwargs): small shapes with the awkward edges the kernels must handle
CASES = [
    ("rotary_fp32", rotary_case, dict(dtype=torch.float32, B=2, T=5, H=3, D=8)),
    ("rotary_fp32_rows_not_a_multiple", rotary_case, dict(dtype=torch.float32, B=1, T=7, H=5, D=16)),
    ("rotary_fp32_half_not_a_power_of_2", rotary_case, dict(dtype=torch.float32, B=2, T=3, H=2, D=12)),
    ("rotary_bf16", rotary_case, dict(dtype=torch.bfloat16, B=2, T=9, H=2, D=32)),
    ("rotary_fp32_rows_near_eps", rotary_case, dict(dtype=torch.float32, B=1, T=4, H=2, D=8, scale=1e-4)),
    ("rotary_fp32_strided_tables", rotary_case, dict(dtype=torch.float32, B=1, T=5, H=2, D=8, strided_tables=True)),
    ("ce_fp32_ignored", cross_entropy_case, dict(dtype=torch.float32, N=9, C=16, V=50, cap=15.0, ignored=(3, 11))),
    ("ce_fp32_small_cap", cross_entropy_case, dict(dtype=torch.float32, N=8, C=8, V=64, cap=2.0)),
    ("ce_fp32_mean", cross_entropy_case, dict(dtype=torch.float32, N=6, C=8, V=33, cap=15.0, ignored=(0,),
                                              per_token_grad=False)),
    ("ce_fp32_two_pass", cross_entropy_case, dict(dtype=torch.float32, N=7, C=8, V=100, cap=15.0, ignored=(2,),
                                                  chunk=32)),
    ("ce_bf16_two_pass_small_cap", cross_entropy_case, dict(dtype=torch.bfloat16, N=5, C=16, V=70, cap=3.0,
                                                            chunk=16)),
    ("ce_fp32_large_cap", cross_entropy_case, dict(dtype=torch.float32, N=8, C=8, V=40, cap=1e6)),
    ("ce_fp32_cap_3000", cross_entropy_case, dict(dtype=torch.float32, N=8, C=8, V=40, cap=3e3)),
    ("ce_fp32_out_of_vocabulary", out_of_vocabulary_case, dict(dtype=torch.float32, N=4, C=8, V=40, cap=15.0,
                                                               target=40)),
    ("ce_fp32_negative_target", out_of_vocabulary_case, dict(dtype=torch.float32, N=4, C=8, V=40, cap=15.0,
                                                             target=-100)),
    ("ce_bf16", cross_entropy_case, dict(dtype=torch.bfloat16, N=8, C=32, V=100, cap=15.0, ignored=(5,))),
    # 50 rows in tiles of 16 (the last one ragged), 128 columns in 8 (float32 takes half of 32's columns), K in 2
    # steps, 4 row tiles in groups of 3: 32 tiles for 3 programs, the last slot past the matrix
    ("mlp_fp32_ragged_tiles", mlp_case, dict(dtype=torch.float32, B=2, T=25, C=32, blocks=(16, 32, 16), group=3)),
    # K = 24 in steps of 16 (the last one ragged); 96 columns in one tile of 128 (float32 halves 256), whose
    # second half tile, stored on its own, is ragged
    ("mlp_fp32_ragged_k_and_columns", mlp_case, dict(dtype=torch.float32, B=1, T=37, C=24, blocks=(16, 256, 16),
                                                     group=2)),
    ("mlp_fp32_whole_tile_epilogue", mlp_case, dict(dtype=torch.float32, B=2, T=25, C=32, blocks=(16, 32, 16),
                                                    group=3, subtile=False)),
    ("mlp_fp32_post_before_k_loop", mlp_case, dict(dtype=torch.float32, B=2, T=25, C=32, blocks=(16, 32, 16),
                                                   group=3, prefetch=True)),
    # 16 whole tiles for 3 programs: each program reads post early for several tiles
    ("mlp_fp32_whole_post_before_k_loop", mlp_case, dict(dtype=torch.float32, B=2, T=25, C=32, blocks=(16, 64, 16),
                                                         group=3, subtile=False, prefetch=True)),
    ("mlp_fp32_one_tile", mlp_case, dict(dtype=torch.float32, B=1, T=9, C=16)),  # the default tiles, mostly outside
    ("mlp_bf16", mlp_case, dict(dtype=torch.bfloat16, B=2, T=12, C=32, blocks=(16, 64, 16), group=2)),
    ("mlp_fp32_unaligned_width", mlp_case, dict(dtype=torch.float32, B=1, T=5, C=12)),  # rows not 16-byte aligned
    ("mlp_fp32_tiles_do_not_fit", mlp_case, dict(dtype=torch.float32, B=2, T=7, C=16, tiles_fit=False)),
]


def run_cases(device):
    return {name: f(device, **kwargs) for name, f, kwargs in CASES}


def compiled_whole(device):
    """The three pieces inside one torch.compile'd function with fullgraph=True (no graph break
    allowed), through AOTAutograd (the ops' shape functions, their autograd): the compiled
    loss and gradient equal the eager ones."""
    kernels.prepare(device)
    g = torch.Generator().manual_seed(0)
    B, T, H, D, V = 2, 6, 2, 8, 40
    x = torch.randn(B, T, H, D, generator=g).to(device).requires_grad_()
    angles = torch.randn(T, D // 2, generator=g)
    cos, sin = (a.to(device)[None, :, None, :] for a in (angles.cos(), angles.sin()))
    weight = torch.randn(V, H * D, generator=g).to(device).requires_grad_()
    w_fc = (torch.randn(4 * H * D, H * D, generator=g) / (H * D) ** 0.5).to(device).requires_grad_()
    w_proj = (torch.randn(H * D, 4 * H * D, generator=g) / (4 * H * D) ** 0.5).to(device).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g).to(device)

    def loss(x, weight, w_fc, w_proj):
        h = kernels.rotary_norm(x, cos, sin).reshape(B, T, H * D)
        h = h + kernels.relu_square_mlp(h, w_fc, w_proj)
        return kernels.softcapped_cross_entropy(h, weight, targets, 15.0).mean()

    def plain(x, weight, w_fc, w_proj):
        h = kernels.rotary_norm_plain(x, cos, sin).reshape(B, T, H * D)
        h = h + kernels.relu_square_mlp_plain(h, w_fc, w_proj)
        return kernels.softcapped_cross_entropy_plain(h, weight, targets, 15.0).mean()

    results = []
    for f in (torch.compile(loss, backend="aot_eager", fullgraph=True), plain):
        with KernelLaunches() as launches:
            value = f(x, weight, w_fc, w_proj)
            grads = torch.autograd.grad(value, (x, weight, w_fc, w_proj))
        results.append((value, grads, launches.counts))
    (v, grads, launches), (v0, grads0, launches0) = results
    return dict(loss=_max_diff(v, v0), grads=max(_max_diff(a, b) for a, b in zip(grads, grads0)),
                launches=launches, launches_plain=sum(launches0.values()))


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (Triton's CPU interpreter)"
    cases, compiled = run_cases("cpu"), compiled_whole("cpu")
    print(json.dumps(dict(fused_line=kernels.fused_line("cpu"), cases=cases, compiled=compiled)))
