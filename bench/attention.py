"""
Attention kernels at train.py's shapes: compile time, forward+backward time, error (CUDA only).

    python3 bench/attention.py                                   # FlexAttention, PyTorch's default kernel options
    python3 bench/attention.py --options '{"USE_TMA": true}'     # a FlexAttention variant (JSON kernel options)
    python3 bench/attention.py --options '{"BACKEND": "FLASH"}'  # FlexAttention through FA4's CuTe kernel
    python3 bench/attention.py --autotune                        # inductor's own search, its table logged
    python3 bench/attention.py --backend fa4                     # FlashAttention-4 as train.py runs it

Times the sliding-window attention of one micro-batch (B=128, T=2048, train.py's heads,
bf16, in the model's (B, T, H, D) layout) for the short (T/2) and full windows, each as
its own compiled function as in the model: the first call's time (compile, with a cold
cache), then the median of timed forward+backward calls. The flex variants call
flex_attention on the transposed views with autoresearch/attention.py's block masks; the
fa4 variant calls its attention() after select_attention(device, "fa4") (FA4's kernels as
one custom op). Checks the output and gradients against exact masked attention (PyTorch
SDPA in float32) on a few rows. Use fresh TORCHINDUCTOR_CACHE_DIR (and, for fa4,
FLASH_ATTENTION_CUTE_DSL_CACHE_DIR) for cold-cache compile times (bench/gpu.sh attention does).
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

from autoresearch import attention  # noqa: E402
import train  # noqa: E402


def masked_reference(q, k, v, left):
    """Exact sliding-window attention in float32: (B, T, H, D) in, (B, T, H, D) out."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    mask = attention.window_mask(q.size(2), left, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def flex_variant(T, left, device, options):
    """flex_attention as the compiled model runs it, with these kernel options."""
    block_mask = attention._flex_block_mask(T, left, device)

    def fn(q, k, v):
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                           kernel_options=options)  # (B, H, T, D)
        return y.transpose(1, 2)

    return torch.compile(fn, dynamic=False)


def fa4_variant(left):
    """attention.attention on the fa4 backend (set by select_attention), compiled as in the model."""
    return torch.compile(lambda q, k, v: attention.attention(q, k, v, (left, 0)), dynamic=False)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["flex", "fa4"], default="flex",
                        help="flex: FlexAttention with --options; fa4: autoresearch/attention.py's FlashAttention-4 op")
    parser.add_argument("--options", default="{}", help="FlexAttention kernel options (JSON); {}: PyTorch's defaults")
    parser.add_argument("--B", type=int, default=train.DEVICE_BATCH_SIZE)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--autotune", action="store_true",
                        help="let inductor benchmark its FlexAttention configs (max_autotune) and log the table")
    args = parser.parse_args()
    try:
        args.options = json.loads(args.options)
    except json.JSONDecodeError as e:
        parser.error(f"--options {args.options!r} is not JSON ({e})")
    if not isinstance(args.options, dict):
        parser.error(f"--options must be a JSON object, e.g. '{{\"USE_TMA\": true}}', not {args.options!r}")
    if args.backend == "fa4" and (args.options or args.autotune):
        parser.error("--options and --autotune are FlexAttention's: not with --backend fa4")
    if args.B < 2 or args.iters < 1:
        parser.error(f"--B {args.B} --iters {args.iters}: need B >= 2 (the error check reads two rows), iters >= 1")
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark needs a GPU")
    return args


def main():
    args = parse_args()
    if args.autotune:
        torch._inductor.config.max_autotune = True
    print(f"backend: {args.backend}" + (f", kernel options: {args.options}" if args.backend == "flex" else ""))
    device = torch.device("cuda")
    print("attention:", attention.select_attention(device, args.backend))  # fa4 unavailable: one line, exit 1
    config = train.model_config(8192)
    B, T = args.B, config.sequence_len
    H, D = config.n_head, config.n_embd // config.n_head
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    medians = {}
    for left in (T // 2, T):
        q.grad = k.grad = v.grad = None
        fn = fa4_variant(left) if args.backend == "fa4" else flex_variant(T, left, device, args.options)

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
    windows = [w for w, _ in train.window_sizes(config)]
    per_micro_batch = sum(medians[min(w, T)] for w in windows)
    print(f"attention per micro-batch ({len(windows)} layers, windows {windows}): {per_micro_batch:.1f} ms")


if __name__ == "__main__":
    main()
