"""
FlexAttention at train.py's shapes: compile time, forward+backward time, error (CUDA only).

    python3 bench/attention.py                                   # PyTorch's default kernel options
    python3 bench/attention.py --options '{"USE_TMA": true}'     # a variant (JSON)
    python3 bench/attention.py --autotune                        # inductor's own search, its table logged

Times the sliding-window attention of one micro-batch (B=128, H=4, T=2048, D=128,
bf16) for the short (T/2) and full windows, each as its own compiled function as in
the model: the first call's time (compile, with a cold cache), then the median of
timed forward+backward calls. Checks the output and gradients against exact masked
attention (PyTorch SDPA) on a few rows. Use a fresh TORCHINDUCTOR_CACHE_DIR for
cold-cache compile times (bench/gpu.sh attention does).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

import train  # noqa: E402


def masked_reference(q, k, v, left):
    """Exact sliding-window attention in float32: (B, H, T, D) in, (B, H, T, D) out."""
    mask = train.window_mask(q.size(2), left, q.device)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--options", default="{}", help="FlexAttention kernel options (JSON); {}: PyTorch's defaults")
    parser.add_argument("--B", type=int, default=train.DEVICE_BATCH_SIZE)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--autotune", action="store_true",
                        help="let inductor benchmark its FlexAttention configs (max_autotune) and log the table")
    args = parser.parse_args()
    if args.autotune:
        torch._inductor.config.max_autotune = True
    options = json.loads(args.options)
    print(f"kernel options: {options}")
    device = torch.device("cuda")
    train.select_attention(device, "flex")
    B, T = args.B, train.MAX_SEQ_LEN
    H, D = 4, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16)
    medians = {}
    for left in (T // 2, T):
        q.grad = k.grad = v.grad = None
        block_mask = train._flex_block_mask(T, left, device)
        fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask, kernel_options=options),
                           dynamic=False)

        def fwd_bwd():
            out = fn(q, k, v)
            out.backward(grad_out)
            return out

        torch.cuda.synchronize()
        t0 = time.time()
        out = fwd_bwd()
        torch.cuda.synchronize()
        compile_s = time.time() - t0
        rows = slice(0, 2)  # the error check on two rows of the batch
        ref = masked_reference(q[rows].detach(), k[rows].detach(), v[rows].detach(), left)
        out_err = (out[rows].float() - ref).abs().max().item()
        qr, kr, vr = (t[rows].detach().float().requires_grad_() for t in (q, k, v))
        masked_reference(qr, kr, vr, left).backward(grad_out[rows].float())
        grad_err = max((t.grad[rows].float() - r.grad).abs().max().item() for t, r in ((q, qr), (k, kr), (v, vr)))
        times = []
        for _ in range(args.iters):
            q.grad = k.grad = v.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fwd_bwd()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        median = sorted(times)[len(times) // 2]
        medians[left] = median
        print(f"window {left:5d}: first call (compile) {compile_s:5.1f} s, fwd+bwd {median:6.3f} ms, "
              f"max error vs exact: out {out_err:.2e}, grads {grad_err:.2e}", flush=True)
    windows = [w for w, _ in train.window_sizes(train.model_config(8192))]
    per_micro_batch = sum(medians[min(w, T)] for w in windows)
    print(f"attention per micro-batch ({len(windows)} layers, windows {windows}): {per_micro_batch:.1f} ms")


if __name__ == "__main__":
    main()
