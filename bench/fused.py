"""
The fused kernels against torch.compile's version of their plain definitions (CUDA only).

    uv run bench/fused.py                     # the three pieces at train.py's shapes
    uv run bench/fused.py fused.json          # the same, figures also written as JSON
    bash bench/gpu.sh fused                   # the same, with a fresh Triton cache

For each piece of autoresearch/kernels.py, at train.py's default shapes:
  - the error of the fused kernel and of the compiled plain definition against the plain
    definition in float64 (forward and gradients, under bf16 autocast as in a run);
  - the median time of forward + backward;
  - for the cross-entropy and the MLP, the extra memory a call holds at its peak;
  - the tile settings the kernels read at each call (ROTARY_ROWS; CE_CHUNK x CE_WARPS;
    the MLP's tiles, group, stages, warps, halved epilogue and the backward's early
    read of post, with each half's TFLOP/s against cuBLAS's plain matmul),
    each timed, so a new GPU can show whether another setting is faster.
The plain definitions are what the tests pin the kernels to; this measures what the
kernels buy. No data needed: random tensors.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autoresearch import kernels  # noqa: E402

SOFTCAP = 15.0                          # train.py's default
B, T, H, D = 128, 2048, 4, 128          # one micro-batch of q (or k): train.py's defaults
N, C, V = 128 * 2048, 512, 8192         # tokens of one micro-batch, model width, vocabulary


def median_ms(fn, repeats=20):
    """Median CUDA time of fn() in ms, after 3 untimed calls (compile, autotune, caches)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_and_time(out, piece, name, run):
    """out[{piece}_peak_extra_mib_{name}]: the memory one call of run() holds beyond what it
    leaves allocated; out[{piece}_ms_{name}]: its median time."""
    run()  # compile, and leave the gradients allocated: the peak below is the call's own
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    out[f"{piece}_peak_extra_mib_{name}"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out[f"{piece}_ms_{name}"] = median_ms(run, repeats=10)


def rotary_norm_figures(out):
    torch.manual_seed(0)
    x = (torch.randn(B, T, H, D, device="cuda") * 0.5).bfloat16().requires_grad_()  # (B, T, H, D)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, device="cuda") / D)
    angles = torch.arange(T, device="cuda")[:, None] * inv_freq[None]             # (T, D/2)
    cos, sin = angles.cos().bfloat16()[None, :, None], angles.sin().bfloat16()[None, :, None]
    grad = torch.randn_like(x)
    compiled_plain = torch.compile(kernels.rotary_norm_plain, dynamic=False)

    x64 = x.detach().double().requires_grad_()
    y64 = kernels.rotary_norm_plain(x64, cos.double(), sin.double())
    (y64 * grad.double()).sum().backward()

    def error(fn):
        x.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            y = fn(x, cos, sin)
        (y * grad).sum().backward()
        return dict(forward=(y.double() - y64).abs().max().item(),
                    backward=(x.grad.double() - x64.grad).abs().max().item())

    out["rotary_error_fused"] = error(kernels.rotary_norm)
    out["rotary_error_compiled_plain"] = error(compiled_plain)

    def step(fn):
        def run():
            x.grad = None
            fn(x, cos, sin).backward(grad)
        return run

    out["rotary_ms_compiled_plain"] = median_ms(step(compiled_plain))
    default_rows = kernels.ROTARY_ROWS
    for rows in (4, 8, 16, 32, 64):
        kernels.ROTARY_ROWS = rows
        out[f"rotary_ms_fused_rows{rows}"] = median_ms(step(kernels.rotary_norm))
    kernels.ROTARY_ROWS = default_rows


def cross_entropy_figures(out):
    torch.manual_seed(1)
    x = F.rms_norm(torch.randn(N, C, device="cuda"), (C,)).bfloat16().requires_grad_()  # (N, C)
    weight = (torch.randn(V, C, device="cuda") * 0.05).requires_grad_()               # (V, C)
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[:100] = -1  # ignored targets, which the kernel must skip
    compiled_plain = torch.compile(kernels.softcapped_cross_entropy_plain, dynamic=False)

    # errors against float64, on the first n tokens (the whole batch in float64 is 16 GiB of logits)
    n = 4096
    x64, w64 = x[:n].detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    counted = (targets[:n] != -1).sum()
    loss64 = kernels.softcapped_cross_entropy_plain(x64, w64, targets[:n], SOFTCAP)
    (loss64.sum() / counted).backward()
    for name, fn in (("fused", kernels.softcapped_cross_entropy), ("compiled_plain", compiled_plain)):
        xs, ws = x[:n].detach().requires_grad_(), weight.detach().clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            loss = fn(xs, ws, targets[:n], SOFTCAP)
        (loss.sum() / counted).backward()
        out[f"ce_error_{name}"] = dict(
            loss=(loss.double() - loss64).abs().max().item(),
            dx=(xs.grad.double() - x64.grad).abs().max().item(), dx_scale=x64.grad.abs().max().item(),
            dw=(ws.grad.double() - w64.grad).abs().max().item(), dw_scale=w64.grad.abs().max().item())

    def step(fn):
        def run():
            x.grad = weight.grad = None
            with torch.autocast("cuda", torch.bfloat16):
                loss = fn(x, weight, targets, SOFTCAP)
            (loss.sum() / (targets != -1).sum()).backward()
        return run

    for name, fn in (("compiled_plain", compiled_plain), ("fused", kernels.softcapped_cross_entropy)):
        peak_and_time(out, "ce", name, step(fn))

    default_tiles = kernels.CE_CHUNK, kernels.CE_WARPS
    for chunk in (8192, 4096, 2048, 1024):
        for warps in (4, 8, 16):
            kernels.CE_CHUNK, kernels.CE_WARPS = chunk, warps
            out[f"ce_ms_fused_chunk{chunk}_warps{warps}"] = median_ms(step(kernels.softcapped_cross_entropy), 10)
    kernels.CE_CHUNK, kernels.CE_WARPS = default_tiles

    # what the cross-entropy costs beyond its one unavoidable matmul, and the forward alone (as in evaluation)
    xb, wb = x.detach(), weight.detach().bfloat16()
    out["ce_ms_matmul_only"] = median_ms(lambda: xb @ wb.t(), 10)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        out["ce_ms_forward_only_fused"] = median_ms(
            lambda: kernels.softcapped_cross_entropy(x, weight, targets, SOFTCAP), 10)


def mlp_figures(out):
    torch.manual_seed(2)
    H = 4 * C
    x = torch.randn(N, C, device="cuda").bfloat16().requires_grad_()                  # (N, C), as the norm gives it
    w_fc = (torch.randn(H, C, device="cuda") * C**-0.5).requires_grad_()              # float32, as the weights are
    w_proj = (torch.randn(C, H, device="cuda") * H**-0.5).requires_grad_()
    grad = torch.randn(N, C, device="cuda").bfloat16()
    compiled_plain = torch.compile(kernels.relu_square_mlp_plain, dynamic=False)
    weights = (w_fc, w_proj)
    kernels.prepare("cuda")  # as train.py does: whether this GPU takes the MLP's kernel

    n = 4096  # errors against float64 on the first n tokens
    x64, w64 = x[:n].detach().double().requires_grad_(), [w.detach().double().requires_grad_() for w in weights]
    (kernels.relu_square_mlp_plain(x64, *w64) * grad[:n].double()).sum().backward()
    for name, fn in (("fused", kernels.relu_square_mlp), ("compiled_plain", compiled_plain)):
        xs, ws = x[:n].detach().requires_grad_(), [w.detach().clone().requires_grad_() for w in weights]
        with torch.autocast("cuda", torch.bfloat16):
            y = fn(xs, *ws)
        (y * grad[:n]).sum().backward()
        y64 = kernels.relu_square_mlp_plain(x64, *w64)
        out[f"mlp_error_{name}"] = dict(
            forward=(y.double() - y64).abs().max().item(), forward_scale=y64.abs().max().item(),
            **{f"d{k}": (a.grad.double() - b.grad).abs().max().item() / b.grad.abs().max().item()
               for k, a, b in (("x", xs, x64), ("w_fc", ws[0], w64[0]), ("w_proj", ws[1], w64[1]))})

    def step(fn):
        def run():
            x.grad = w_fc.grad = w_proj.grad = None
            with torch.autocast("cuda", torch.bfloat16):
                y = fn(x, w_fc, w_proj)
            y.backward(grad)
        return run

    for name, fn in (("compiled_plain", compiled_plain), ("fused", kernels.relu_square_mlp)):
        peak_and_time(out, "mlp", name, step(fn))

    # each half alone: cuBLAS's plain matmul against the kernel's matmul with ReLU² (forward) or its
    # derivative (backward, reading post) in its tiles, at each tile setting the kernel reads
    xb, wb = x.detach(), w_fc.detach().bfloat16()
    gb, wpt = grad, w_proj.detach().bfloat16().t().contiguous()  # the backward's operands: (N, C), (H, C)
    flops = 2 * N * C * H
    out["mlp_tflops_cublas_matmul"] = flops / median_ms(lambda: xb @ wb.t()) / 1e9
    names = ("MLP_BLOCK_M", "MLP_BLOCK_N", "MLP_BLOCK_K", "MLP_GROUP_M", "MLP_STAGES", "MLP_WARPS", "MLP_SUBTILE",
             "MLP_PREFETCH")
    saved = tuple(getattr(kernels, name) for name in names)
    post = kernels._relu_square_matmul(xb, wb)
    for tiles in ((128, 256, 64, 8, 3, 8, True, False), (128, 256, 64, 8, 2, 8, True, False),
                  (128, 256, 64, 8, 2, 8, True, True),
                  (128, 256, 64, 8, 3, 8, True, True), (128, 128, 64, 8, 4, 8, True, False),
                  (128, 128, 64, 8, 4, 8, True, True),
                  (128, 128, 64, 8, 4, 4, False, True), (64, 256, 64, 8, 4, 4, True, True)):
        for name, value in zip(names, tiles):
            setattr(kernels, name, value)
        key = "x".join(map(str, tiles[:6])) + "".join(f"_{n}" for n, on in zip(("subtile", "prefetch"), tiles[6:])
                                                      if on)
        try:
            forward_ms = median_ms(lambda: kernels._relu_square_matmul(xb, wb))
            backward_ms = median_ms(lambda: kernels._relu_square_matmul(gb, wpt, post))
            out[f"mlp_tflops_kernel_forward_{key}"] = flops / forward_ms / 1e9
            out[f"mlp_tflops_kernel_backward_{key}"] = flops / backward_ms / 1e9
            out[f"mlp_ms_fused_{key}"] = median_ms(step(kernels.relu_square_mlp), repeats=10)
        except Exception as e:  # a tile the card's shared memory cannot hold
            out[f"mlp_tiles_{key}"] = f"{type(e).__name__}: {str(e)[:200]}"
    for name, value in zip(names, saved):
        setattr(kernels, name, value)


def main(json_path=None):
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device: the fused kernels run on a GPU")
    on, why = kernels.fused_kernels()
    if not on:
        sys.exit(f"error: the fused kernels are off ({why}): nothing to compare")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    out = {}
    rotary_norm_figures(out)
    cross_entropy_figures(out)
    mlp_figures(out)
    print(json.dumps(out, indent=1))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
