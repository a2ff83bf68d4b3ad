"""
The device and fitting to it: which device runs, what its bf16 peak is (for MFU),
the micro-batch lowered until step 0 fits in memory, one line for an out-of-memory,
the peak memory, and the evaluation through the training graphs. DO NOT MODIFY.

train.py imports it, and so do the package's attention module and the benchmarks;
it imports autoresearch.ledger (a retried step 0 starts its rows again) and nothing
else of the project. Importing it sets the CUDA allocator's options
and nothing else: no GPU is touched until train.py calls `pick_device`.
"""

import contextlib
import gc
import os
import sys
import time
from dataclasses import dataclass

# Read when torch first touches the GPU, so set before: fewer allocator stalls and less fragmentation.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch

from autoresearch import ledger

# =============================================================================
# GPU facts
# =============================================================================

# Dense bf16 tensor-core peak FLOP/s (FP32 accumulate) for MFU. The first key that is a
# substring of torch.cuda.get_device_name() wins, so the more specific names come first.
# Sources: NVIDIA's datasheets (H100/H200, A100, A10, L4, L40/L40S, B200/GB200 as
# DGX/HGX system figures per GPU) and architecture whitepapers (Ampere GA102,
# Ada AD102, Blackwell GB202) for the GeForce cards; sparse figures halved.
GPU_PEAK_FLOPS = [
    ("GH200", 989.5e12),        # H100/H200 datasheet: 989.5 dense (1,979 sparse)
    ("GB200", 2500e12),         # GB200 NVL72: 360 PFLOP/s sparse / 72 GPUs / 2
    ("B200", 2250e12),          # HGX B200: 36 PFLOP/s sparse / 8 GPUs / 2
    ("H200 NVL", 835.5e12),     # H200 NVL datasheet: 1,671 sparse
    ("H200", 989.5e12),         # H200 SXM datasheet
    ("H100 NVL", 835.5e12),     # H100 NVL datasheet: 1,671 sparse
    ("H100 PCIe", 756.5e12),    # H100 PCIe datasheet: 1,513 sparse (lower clocks and power)
    ("H800 PCIe", 756.5e12),
    ("H100", 989.5e12),         # H100 SXM datasheet: 1,979 sparse
    ("H800", 989.5e12),
    ("A100", 312e12),           # A100 datasheet, 40 and 80 GB, SXM and PCIe: 312 dense
    ("A800", 312e12),
    ("L40S", 362.05e12),        # L40S datasheet: 733 sparse
    ("L40", 181.05e12),         # L40 datasheet: 362.1 sparse
    ("L4", 121e12),             # L4 datasheet: 242 sparse
    ("A10G", 70e12),            # AWS A10G: a lower-clocked A10 (AWS G5 documentation)
    ("A10", 125e12),            # A10 datasheet: 250 sparse
    ("RTX 5090", 209.5e12),     # Blackwell GeForce whitepaper: FP16/BF16 with FP32 accumulate
    ("RTX 4090", 165.2e12),     # Ada whitepaper: FP16/BF16 with FP32 accumulate
    ("RTX 3090", 71e12),        # Ampere GA102 whitepaper: FP16/BF16 with FP32 accumulate
]
H100_PEAK_FLOPS = 989.5e12   # the published yardstick, for GPUs the table lacks


def gpu_peak_flops(gpu_name):
    """The bf16 dense peak FLOP/s of the GPU called `gpu_name`, or None if the table lacks it."""
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in gpu_name), None)


def pick_device(smoke):
    """The run's device: CUDA; a CPU only in a smoke run. Else one line and exit 1."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        # All GPU work on one side stream: cuBLAS keeps one workspace for it, and nothing
        # else (the loader's thread) serialises against the default stream.
        torch.cuda.set_stream(torch.cuda.Stream())
        return device
    if not smoke:
        raise SystemExit("train.py needs a CUDA GPU; for a CPU smoke run: AUTORESEARCH_SMOKE=1 uv run train.py")
    return torch.device("cpu")


def describe_device(device):
    """(name, bf16 peak FLOP/s or None, a note for the identity line)."""
    if device.type != "cuda":
        return f"none (CPU, {torch.get_num_threads()} threads)", None, "MFU not measured"
    name = torch.cuda.get_device_name(device)
    peak = gpu_peak_flops(name)
    if peak is None:
        return name, H100_PEAK_FLOPS, "unknown GPU: MFU is reported against the H100 peak (989.5 TFLOP/s)"
    return name, peak, f"bf16 peak {peak / 1e12:.1f} TFLOP/s"


def peak_memory_mib():
    """The CUDA allocator's peak in MiB (0 on a CPU)."""
    return torch.cuda.max_memory_allocated() / 1024 / 1024 if torch.cuda.is_available() else 0.0

# =============================================================================
# Fitting the micro-batch to memory
# =============================================================================


@dataclass
class FirstStep:
    """What train.py's `first_step(micro_batch)` built and measured; `fit_micro_batch`
    fills in the last three fields when it returns it."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: object                     # the training loader, past step 0's micro-batches
    loss: float                         # step 0's training loss
    seconds: float                      # step 0's time: compile and the evaluation check included
    micro_batch: int = 0                # the micro-batch that fit
    fit_note: str | None = None         # why it is below DEVICE_BATCH_SIZE; None when the ceiling fit
    fit_seconds: float | None = None    # the attempts that did not fit; None when the ceiling fit


def is_out_of_memory(error):
    # OOM also surfaces wrapped (torch.compile's autotuning) or in a library's words (cuBLAS, the driver);
    # a CPU's is a MemoryError or the allocator's RuntimeError ("can't allocate memory")
    text = str(error).lower()
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or any(
        words in text for words in ("out of memory", "out_of_memory", "alloc_failed", "allocate memory"))


def _memory_of(error):
    """Whose memory ran out: "CPU" for the host's, else "CUDA"."""
    return "CPU" if isinstance(error, MemoryError) or "allocate memory" in str(error).lower() else "CUDA"


def smaller_micro_batches(rows_per_step, micro_batch):
    """The micro-batches to try, largest first: `micro_batch` (the ceiling), then halves,
    each dividing rows_per_step so gradient accumulation keeps the step's tokens exact."""
    sizes = []
    size = micro_batch
    while size >= 1:
        while rows_per_step % size:
            size -= 1
        if not sizes or size < sizes[-1]:
            sizes.append(size)
        size //= 2
    return sizes


def fit_micro_batch(first_step, micro_batch, rows_per_step):
    """Run `first_step(micro_batch)`, the run's step 0, which allocates all it will hold.

    When it runs out of memory, free everything, and run it again from scratch with the
    next smaller micro-batch (gradient accumulation makes up the rest: the optimizer
    step's tokens and math are the same). When it fits at once nothing is probed.
    Returns first_step's FirstStep with `micro_batch` (the size that fits), and when
    that is below the ceiling `fit_note` (the announcement) and `fit_seconds` (the time
    of the attempts that did not fit) set. An out-of-memory at a micro-batch of 1 is
    raised as it is.
    """
    global _micro_batch
    t_start = time.time()
    sizes = smaller_micro_batches(rows_per_step, micro_batch)
    for size in sizes:
        _micro_batch = size
        try:
            result = first_step(size)
        except Exception as e:
            if not is_out_of_memory(e) or size == sizes[-1]:
                raise
        else:
            result.micro_batch = size
            if size != micro_batch:
                result.fit_note = (f"DEVICE_BATCH_SIZE={micro_batch} does not fit this GPU's memory: "
                                   f"micro-batch {size}, accumulation x{rows_per_step // size}")
                result.fit_seconds = time.time() - t_start - result.seconds
            return result
        # here, after the except block: the exception's traceback no longer holds the attempt's tensors
        release_memory()
        ledger.restart_training()  # the next attempt draws step 0's rows again, from a fresh model and loader
    raise AssertionError("unreachable: the last size raises")


def release_memory():
    """Free what a failed attempt left: compiled graphs, cached blocks, Python garbage."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


_micro_batch = None  # the micro-batch in use, for the out-of-memory line


@contextlib.contextmanager
def out_of_memory_exit():
    """Around main(): an out-of-memory anywhere (the GPU's or the CPU's) is one FAIL line naming
    what to lower, exit 1; Ctrl-C is one FAIL line, exit 130. No traceback for either."""
    try:
        yield
    except KeyboardInterrupt:
        print("\nFAIL: interrupted (Ctrl-C): the run stopped before its result", flush=True)
        sys.exit(130)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        print(f"\n{out_of_memory_line(_micro_batch, _memory_of(e))}", flush=True)
        sys.exit(1)


def out_of_memory_line(micro_batch, memory="CUDA"):
    """The FAIL line for an out-of-memory at micro_batch; memory: "CUDA" or "CPU"."""
    if micro_batch is None:  # before step 0 started
        return f"FAIL: {memory} out of memory while setting up the run. Lower DEPTH or ASPECT_RATIO."
    if micro_batch > 1:
        return (f"FAIL: {memory} out of memory at a micro-batch of {micro_batch}. Lower DEVICE_BATCH_SIZE (to "
                f"{micro_batch // 2} or less); gradient accumulation keeps TOTAL_BATCH_SIZE the same.")
    where = "this GPU" if memory == "CUDA" else "this machine's memory"
    return (f"FAIL: {memory} out of memory, even at a micro-batch of 1: the model does not fit {where}. "
            "Lower DEPTH or ASPECT_RATIO.")

# =============================================================================
# Evaluation through the training graphs
# =============================================================================


class TrainingGraphEval(torch.nn.Module):
    """Evaluate with the compiled training graphs: `model(x, y, reduction)` under autograd.

    evaluate_bpb() runs under no_grad, where torch.compile would build a second,
    inference-only set of graphs (many seconds on a cold cache) for a single pass over
    the validation set. Switching autograd back on for the forward reuses the graphs
    already compiled for training; the result is detached, so each batch's saved
    activations are freed at once. Same function, same numbers.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, reduction="none"):
        with torch.enable_grad():
            return self.model(x, y, reduction=reduction).detach()


def evaluation_model(model):
    """What evaluate_bpb should call: the training graphs on CUDA, the model itself on a CPU."""
    return TrainingGraphEval(model) if next(model.parameters()).is_cuda else model
