"""
Where a training step's GPU time goes, and what compiling costs (CUDA only).

    python3 bench/step_profile.py

Builds train.py's model and optimizer at the default hyperparameters as main() does
(train.build_model, attention.prepare_attention, model.losses compiled), feeds random
tokens (no data needed), and times what a run pays besides training: start-up, the
model's compile (first forward+backward), the first optimizer step (eager), an
evaluation-sized forward pass through the training graphs; then the steady step, and
a profile of two steps listing the kernels that take the most GPU time. The attention
backend is attention.select_attention's choice (AUTORESEARCH_ATTENTION=fa4|fa3|flex
forces one). Use a fresh TORCHINDUCTOR_CACHE_DIR for cold-cache figures.
"""

import time

T_START = time.time()

import argparse  # noqa: E402
import ast  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402

from autoresearch import gpu  # noqa: E402  (first: it sets the CUDA allocator's options, as in a run)
from autoresearch import attention, kernels, seeding  # noqa: E402
import constants  # noqa: E402
import train  # noqa: E402


def window_as_tensor_masks():
    """Variant: sliding-window block masks whose window is a captured tensor, not a
    constant, so S and L layers share one FlexAttention kernel (fewer compiles)."""
    from torch.nn.attention.flex_attention import create_block_mask
    masks = {}

    def block_mask(T, left, device):
        key = (T, left, device.type)
        if key not in masks:
            left_t = torch.tensor(left, device=device, dtype=torch.int32)

            def sliding_window(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx - kv_idx <= left_t)

            masks[key] = create_block_mask(sliding_window, None, None, T, T, device=device)
        return masks[key]

    attention._flex_block_mask = block_mask  # attention.attention and prepare_attention look it up at each call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="steps before profiling (step 0 compiles)")
    parser.add_argument("--top", type=int, default=30, help="kernels to list (0: no profile)")
    parser.add_argument("--compile", choices=["losses", "whole"], default="losses",
                        help="losses: model.losses compiled (as train.py's main); whole: torch.compile(model), "
                             "the published way")
    parser.add_argument("--mask", choices=["constant", "tensor"], default="constant",
                        help="flex window baked into the kernel (as autoresearch/attention.py) or a captured tensor")
    parser.add_argument("--no-grad-eval", action="store_true", help="also time evaluation under no_grad")
    parser.add_argument("--nested", action="store_true",
                        help="Block.forward as a torch.compiler.nested_compile_region (compiled once per block kind)")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config.KEY (a Python literal), e.g. triton.autotune_pointwise=False")
    parser.add_argument("--warm-pool", action="store_true",
                        help="start inductor's compile workers at once, not at the first compile")
    parser.add_argument("--compile-rows", type=int, default=45, help="rows of the compile-time table")
    args = parser.parse_args()
    if args.steps <= 5:
        parser.error(f"--steps {args.steps}: the steady step is the median after the first 5, use at least 6")
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark needs a GPU")
    print(f"variant: {vars(args)}")
    if args.mask == "tensor":
        window_as_tensor_masks()
    if args.warm_pool:
        from torch._inductor.async_compile import maybe_warm_pool
        maybe_warm_pool()
    if args.nested:
        train.Block.forward = torch.compiler.nested_compile_region(train.Block.forward)
    for setting in args.inductor:
        key, _, value = setting.partition("=")
        obj = torch._inductor.config
        *path, last = key.split(".")
        try:
            for part in path:
                obj = getattr(obj, part)
            getattr(obj, last)  # an unknown key would otherwise be set silently and change nothing
            setattr(obj, last, ast.literal_eval(value))
        except (AttributeError, ValueError, SyntaxError) as e:
            parser.error(f"--inductor {setting!r}: {type(e).__name__}: {e} (use KEY=VALUE, VALUE a Python literal)")

    print(f"import torch + train: {time.time() - T_START:.1f} s")
    t0 = time.time()
    device = torch.device("cuda")
    torch.zeros(1, device=device)
    print(f"CUDA init: {time.time() - t0:.1f} s")
    _, peak_flops, _ = gpu.describe_device(device)  # the H100 figure for a GPU the table lacks
    torch.set_float32_matmul_precision("high")
    print("attention:", attention.select_attention(device))
    kernels.prepare(device)  # as main(): which fused kernels this GPU takes (the MLP's), before anything compiles
    config = train.model_config(8192)
    model, optimizer = train.build_model(config, device, seeding.DEFAULT_SEED)  # seed 42, as a run
    attention.prepare_attention(config, model.window_sizes, device)  # flex block masks or the FA4 probe, before compile
    print(f"model + optimizer built: {time.time() - T_START:.1f} s since start", flush=True)
    if args.compile == "losses":
        model.losses = torch.compile(model.losses, dynamic=False)  # as main(): one graph for training and eval
        run = model
    else:
        run = torch.compile(model, dynamic=False)
    torch.manual_seed(0)
    B, T = train.DEVICE_BATCH_SIZE, train.MAX_SEQ_LEN
    accum = train.TOTAL_BATCH_SIZE // (B * T)
    batches = [torch.randint(0, 8192, (B, T + 1), device=device) for _ in range(4)]
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    optimizer_seconds = []

    def step(i):
        for k in range(accum):
            row = batches[(i * accum + k) % len(batches)]
            with autocast:
                loss = run(row[:, :-1], row[:, 1:])
            (loss / accum).backward()
        torch.cuda.synchronize()
        t0 = time.time()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        optimizer_seconds.append(time.time() - t0)

    from torch._dynamo.utils import compile_times
    t0 = time.time()
    with autocast:
        loss = run(batches[0][:, :-1], batches[0][:, 1:])
    loss.backward()
    torch.cuda.synchronize()
    t1 = time.time()
    names, values = compile_times(repr="csv", aggregate=True)
    rows = sorted(zip(names, values), key=lambda nv: -float(nv[1]))[:args.compile_rows]
    print(f"model compile, by phase (s, summed over its graphs; phases nest; of {t1 - t0:.1f} s):")
    for name, value in rows:
        print(f"  {float(value):8.2f}  {name}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    print(f"first forward+backward (model compile): {t1 - t0:.1f} s; first optimizer step: {time.time() - t1:.1f} s",
          flush=True)
    print("fused:", kernels.fused_line(device))  # the pieces that ran as kernels, as a run's `fused:` line
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.time()
        step(i)
        torch.cuda.synchronize()
        times.append(time.time() - t0)
    steady = sorted(times[5:])[len(times[5:]) // 2]
    opt = sorted(optimizer_seconds[5:])[len(optimizer_seconds[5:]) // 2]
    print(f"steady step: {steady * 1000:.1f} ms  ({train.TOTAL_BATCH_SIZE / steady / 1e6:.3f} M tokens/s, "
          f"MFU {100 * model.estimate_flops() * train.TOTAL_BATCH_SIZE / steady / peak_flops:.1f}%), "
          f"of which optimizer step (synced) {opt * 1000:.1f} ms")
    print(f"peak memory, training steps: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", flush=True)

    # one evaluation-sized forward pass: 80 batches of B x T, per-token losses
    variants = [("training graphs", gpu.evaluation_model(model))] if args.compile == "losses" else []
    if args.no_grad_eval or args.compile == "whole":
        variants += [("no_grad (compiles inference graphs)", run), ("no_grad, again", run)]
    for label, evaluator in variants:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.time()
        with torch.no_grad(), autocast:
            for i in range(constants.EVAL_TOKENS // (B * T)):
                row = batches[i % len(batches)]
                evaluator(row[:, :-1], row[:, 1:], reduction="none")
        torch.cuda.synchronize()
        print(f"evaluation forward, {label}: {time.time() - t0:.1f} s, "
              f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", flush=True)

    if args.top:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(2):
                step(i)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
