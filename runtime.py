"""
The run's machinery: what train.py calls but never researches. DO NOT MODIFY.

Like prepare.py and constants.py this is the fixed harness: agents edit train.py
only, and prepare.py records this file's fingerprint so an edit is caught before
training (see `prepare.verify_data`). It reads top to bottom:

    attention kernels  -> one decision (FA4 / FA3 / FlexAttention / sdpa), one function
    fused kernels      -> rotary_norm, softcapped_cross_entropy: Triton, pinned to their plain versions
    GPU facts          -> the device, its bf16 peak for MFU
    guards             -> an edit that would be silently dropped stops the run
    fitting to memory  -> the micro-batch lowered until the first step fits
    run identity       -> the lines printed before training, the failure lines

train.py makes one call per piece. It never imports train.py; nothing here is
heavy at import: attention kernels load when `select_attention` runs, Triton's on
first use.
"""

import contextlib
import gc
import importlib.util
import math
import os
import socket
import sys
import warnings
from urllib.parse import urlparse

# Read when torch first touches the GPU, so set before: fewer allocator stalls and less fragmentation.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# =============================================================================
# Attention kernels: one backend decision, one function
# =============================================================================
#
# Every layer calls `attention(q, k, v, window_size)`. Which kernel computes it is
# decided once, by `select_attention()`, first choice first:
#   fa4  - FlashAttention-4 (CuTe DSL kernels, PyPI `flash-attn-4`; Hopper and Blackwell),
#          as one custom op that torch.compile treats as opaque
#   fa3  - Flash Attention 3 from the Hugging Face hub via `kernels` (other GPUs)
#   flex - FlexAttention with its Triton kernels, the same sliding windows (any CUDA GPU)
#   sdpa - exact masked attention with F.scaled_dot_product_attention (CPU)
# All four compute the same function. AUTORESEARCH_ATTENTION=fa4|fa3|flex|sdpa forces one.

BACKENDS = ("fa4", "fa3", "flex", "sdpa")

_backend = None      # one of BACKENDS, set by select_attention()
_fa3 = None          # the flash_attn_interface module when the backend is fa3
_flex = None         # flex_attention, compiled on CUDA
_fa4 = None          # the custom op wrapping FA4's kernels when the backend is fa4
_block_masks = {}    # (T, left window, device type) -> BlockMask, built outside torch.compile
_fa4_failed = None   # why FA4's kernels failed at the run's shapes (prepare_attention), if they did


def _hub_reachable(timeout=3.0):
    """A TCP connect to the hub: without network, fail in seconds instead of minutes of retries."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # a direct connect says nothing behind a proxy; let the hub client try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _fa4_unavailable(device):
    """None when FlashAttention-4 can serve `device`, else why not (one phrase)."""
    if _fa4_failed:
        return _fa4_failed
    if device.type != "cuda":
        return "no CUDA device"
    major, _ = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"FA4 serves Hopper and Blackwell (sm_90, sm_100), this GPU is sm_{major}x"
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        return "the `flash-attn-4` package is not installed"
    return None


def _load_fa3():
    """Return (flash_attn_interface module, None) or (None, why it could not be had)."""
    try:
        import kernels
    except ImportError:
        return None, "the `kernels` package is not installed"
    major, _ = torch.cuda.get_device_capability()
    # varunneal's build is the fast one on Hopper; the community build covers other GPUs.
    repo = "varunneal/flash-attention-3" if major == 9 else "kernels-community/flash-attn3"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    if not offline and not _hub_reachable():
        return None, "the Hugging Face hub is unreachable"
    # kernels >= 0.12 needs a version (a v<N> branch) or a revision, and an explicit
    # trust decision for publishers it does not know: we trust exactly this one repo.
    errors = []
    for pin in (dict(version=1), dict(revision="main")):
        try:
            module = kernels.get_kernel(repo, trust_remote_code=[repo], **pin)
            return getattr(module, "flash_attn_interface", module), None
        except Exception as e:  # any failure here just means "no FA3"
            errors.append(f"{pin}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return None, f"{repo} could not be loaded ({'; '.join(errors)})"


def select_attention(device, prefer=None):
    """Pick the attention backend for `device` once; return a one-line description that
    names the backend and why each earlier choice was skipped."""
    global _backend, _fa3, _fa4, _flex
    prefer = prefer or os.environ.get("AUTORESEARCH_ATTENTION", "auto")
    if prefer not in ("auto", *BACKENDS):  # a user's setting: one line, not a traceback
        raise SystemExit(f"attention: AUTORESEARCH_ATTENTION={prefer!r}: use {', '.join(BACKENDS)}")
    device = torch.device(device)
    skipped = []
    if prefer in ("auto", "fa4"):
        why = _fa4_unavailable(device)
        if why is None:
            try:
                _fa4 = _fa4 or _fa4_op()  # an op is registered once per process
                _backend = "fa4"
                return "fa4 (FlashAttention-4, kernels cached on disk)"
            except Exception as e:  # a broken install or driver: say so, take the next backend
                why = f"flash-attn-4 could not be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if prefer == "fa4":
            raise SystemExit(f"attention: fa4 was asked for, but {why}")
        skipped.append(f"no FA4: {why}")
    if prefer in ("auto", "fa3"):
        why = "no CUDA device"
        if device.type == "cuda":
            _fa3, why = _load_fa3()
        if _fa3 is not None:
            _backend = "fa3"
            return "; ".join(["fa3 (Flash Attention 3 via kernels)", *skipped])
        if prefer == "fa3":
            raise SystemExit(f"attention: fa3 was asked for, but {why}")
        skipped.append(f"no FA3: {why}")
    if prefer == "flex" or (prefer == "auto" and device.type == "cuda"):
        # Compiled, flex_attention is a fused sliding-window kernel; eager it is a slow reference.
        # (FlexAttention has no backward on CPU: there it is only good for forward checks.)
        _flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
        _backend = "flex"
        return "; ".join(["flex (PyTorch FlexAttention, Triton kernels, same windows)", *skipped])
    _backend = "sdpa"
    return "; ".join(["sdpa (exact masked attention)", *skipped])


def _fa4_op():
    """FA4's forward and backward kernels as one custom op with its own autograd.

    Called inside the compiled model, FA4's Python entry point breaks the graph 6-10
    times a call (measured: slower than FlexAttention's FLASH backend); as an opaque
    op it is one node. Its window is a runtime argument, so one compiled kernel pair
    serves every window size. Built once, on first use (importing FA4 takes seconds).
    """
    # FA4 compiles its kernels on first use (~7 s each kind); keep them on disk so only a
    # machine's first run pays, and an edit to the model never recompiles attention. Read
    # once, at import, so set before it. The cache is keyed by FA4's sources and versions.
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    # flash-attn-4 4.0.0b36 passes an argument the CuTe DSL warns about at each kernel compile (two
    # screenfuls in run.log, harmless: the kernels match exact attention in the tests)
    warnings.filterwarnings("ignore", message=r"Argument aux_data .* cannot be converted to a JitArgument")

    def left_bound(left, T):
        return None if left >= T - 1 else left  # full causal: FA4's plain causal path

    @torch.library.custom_op("autoresearch::fa4_attention", mutates_args=(), device_types="cuda")
    def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _flash_attn_fwd(q, k, v, causal=True, window_size_left=left_bound(left, q.size(1)),
                                   window_size_right=0, return_lse=True)[:2]
        return out, lse  # (B, T, H, D), (B, H, T) float32

    @fa4_attention.register_fake
    def _(q, k, v, left):
        B, T, H, _ = q.shape
        return torch.empty_like(q), q.new_empty((B, H, T), dtype=torch.float32)

    @torch.library.custom_op("autoresearch::fa4_attention_backward", mutates_args=(), device_types="cuda")
    def fa4_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                               dout: torch.Tensor, lse: torch.Tensor, left: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, causal=True,
                                     window_size_left=left_bound(left, q.size(1)), window_size_right=0)[:3]
        return dq, dk, dv

    @fa4_attention_backward.register_fake
    def _(q, k, v, out, dout, lse, left):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, left = inputs
        ctx.save_for_backward(q, k, v, *output)
        ctx.left = left

    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*fa4_attention_backward(q, k, v, out, dout.contiguous(), lse, ctx.left), None)

    fa4_attention.register_autograd(backward, setup_context=setup_context)
    return fa4_attention


def prepare_attention(seq_len, window_sizes, device, heads, kv_heads, head_dim):
    """Before torch.compile sees the model: FlexAttention's block masks, or for FA4 one
    forward and backward at the run's shapes (a single row). FA4 is chosen without running
    a kernel; one that fails to build here (a GPU or head size its kernels do not cover)
    then falls back to the next backend with an `attention:` line, instead of crashing
    inside step 0 with a traceback."""
    global _fa4_failed
    device = torch.device(device)
    if _backend == "fa4":
        try:
            q = torch.randn(1, seq_len, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(1, seq_len, kv_heads, head_dim, device=device, dtype=torch.bfloat16,
                                requires_grad=True) for _ in range(2))
            for left in sorted({left for left, _ in window_sizes}):
                attention(q, k, v, (left, 0)).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # a kernel's fault shows here, not in step 0
        except Exception as e:  # noqa: BLE001 (any failure: a compile error, an unsupported shape)
            if is_out_of_memory(e):
                raise  # a full GPU says nothing about FA4: fitting the micro-batch deals with it
            _fa4_failed = f"FA4 failed at this run's shapes ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            print_identity([("attention", select_attention(device))])
    if _backend == "flex":
        for left, _ in window_sizes:
            _flex_block_mask(seq_len, left, device)


def _flex_block_mask(T, left, device):
    key = (T, left, device.type)  # "cuda", not "cuda:0": the model and prepare_attention hit one entry
    if key not in _block_masks:
        def sliding_window(b, h, q_idx, kv_idx):
            # query i sees key j when j <= i and i - j <= left: itself and the `left` tokens before it
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= left)

        _block_masks[key] = create_block_mask(sliding_window, None, None, T, T, device=device)
    return _block_masks[key]


def attention(q, k, v, window_size):
    """Causal attention with a sliding window: query i sees keys i-left .. i.

    q: (B, T, H, D); k, v: (B, T, H_kv, D) with H a multiple of H_kv.
    window_size: (left, 0) as in flash-attn; left >= T - 1, or negative (flash-attn's "no
    limit"), means full causal attention. Returns (B, T, H, D).
    """
    if _backend is None:
        select_attention(q.device)
    if window_size[1] != 0:
        raise RunError(f"attention window {window_size}: a causal model sees no later tokens, use (left, 0)")
    if window_size[0] < 0:
        window_size = (q.size(1) - 1, 0)
    if _backend == "fa4":
        return _fa4(q, k, v, window_size[0])[0]
    if _backend == "fa3":
        y = _fa3.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        return y[0] if isinstance(y, tuple) else y  # some FA3 builds also return the softmax LSE
    B, T, H, D = q.shape
    left = window_size[0]
    gqa = k.size(2) != H
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    if _backend == "flex":
        # inside the compiled model the plain op is captured and fused; called eagerly, use the compiled one
        flex = flex_attention if torch.compiler.is_compiling() else _flex
        y = flex(q, k, v, block_mask=_flex_block_mask(T, left, q.device), enable_gqa=gqa)
    elif left >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, left, q.device), enable_gqa=gqa)
    return y.transpose(1, 2)  # (B, T, H, D)


def window_mask(T, left, device):
    """(T, T) bool: query i may see key j when 0 <= i - j <= left."""
    i = torch.arange(T, device=device)
    distance = i[:, None] - i[None, :]  # query index minus key index
    return (distance >= 0) & (distance <= left)

# =============================================================================
# Fused kernels: the rest of the step
# =============================================================================
#
# Two pieces of the model that torch.compile leaves as several memory-bound passes,
# each one Triton kernel pair here, each with its plain PyTorch version beside it: the
# plain one runs where the kernels cannot (a CPU, no Triton, AUTORESEARCH_FUSED=0) and
# the tests pin the kernels to it. The decision is `fused_kernels()`, once per process.
#   rotary_norm               rotary embedding, then RMSNorm, of q or k (QK-norm)
#   softcapped_cross_entropy  lm_head, soft-capped logits, per-token cross-entropy, and
#                             in the same pass the gradient of each token's loss

_fused = None   # (bool, why) once fused_kernels() has decided
_interpret = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: kernels on any device
_kernels = {}   # name -> Triton kernel, defined on first use (importing Triton takes a while)
_tanh = None    # the kernels' tanh, a Triton function: a module global, where Triton looks helpers up


def fused_kernels():
    """(True, what) when the Triton kernels may run, else (False, why not).

    Decided once, when this module is imported (below), so that no compiled graph ever
    traces the decision: torch.compile cannot trace `find_spec` and would split the
    model's graph there. Kernels run on CUDA tensors, and anywhere under Triton's CPU
    interpreter (TRITON_INTERPRET=1, as the tests run them)."""
    global _fused
    if _fused is None:
        setting = os.environ.get("AUTORESEARCH_FUSED", "1")
        if setting not in ("0", "1"):  # a user's setting: one line, not a traceback
            raise SystemExit(f"fused: AUTORESEARCH_FUSED={setting!r}: use 1 (Triton kernels) or 0 (plain PyTorch)")
        if setting == "0":
            _fused = (False, "AUTORESEARCH_FUSED=0")
        elif importlib.util.find_spec("triton") is None:
            _fused = (False, "Triton is not installed")
        else:
            _fused = (True, "Triton kernels")
    return _fused


def fused_line(device):
    """The `fused:` identity line for a run on `device`: which pieces run as kernels, or why none do."""
    on, why = fused_kernels()
    if on and torch.device(device).type != "cuda" and not _interpret:
        on, why = False, "no CUDA device"
    return f"rotary_norm, softcapped_cross_entropy ({why})" if on else f"none, plain PyTorch ({why})"


def _use_kernels(x):
    return _fused[0] and (x.is_cuda or _interpret)


def _compute_dtype(x):
    """The dtype autocast would run a matmul on x in: what the plain version computes in."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _triton_kernels():
    """Define the Triton kernels once, on first use."""
    global _tanh
    if _kernels:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def tanh(u, SERIES: tl.constexpr):
        # 2 / (1 + exp(-2u)) - 1 has an absolute error of ~1e-7, which a large cap magnifies
        # (cap·tanh(logit / cap)); under caps above CE_SERIES_CAP, |u| < 0.02 takes the series
        # to u⁵ instead (error < 1e-13). Both stay under 1e-5 relative, far below bf16 logits'.
        t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0
        if SERIES:
            u2 = u * u
            t = tl.where(tl.abs(u) < 0.02, u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0))), t)
        return t

    _tanh = tanh

    @triton.jit
    def rotary_norm_fwd(x_ptr, cos_ptr, sin_ptr, y_ptr, rstd_ptr, n_rows, heads, T, eps,
                        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
        # rows of x are (token, head) pairs of one head's D = 2·HALF channels
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_H)
        mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
        at = rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
        table = ((rows // heads) % T)[:, None] * HALF + cols[None, :]  # the token's position
        x1 = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + at + HALF, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        r1 = x1 * c + x2 * s
        r2 = x2 * c - x1 * s
        rstd = 1.0 / tl.sqrt((tl.sum(r1 * r1, axis=1) + tl.sum(r2 * r2, axis=1)) / (2 * HALF) + eps)
        tl.store(y_ptr + at, (r1 * rstd[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + at + HALF, (r2 * rstd[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)

    @triton.jit
    def rotary_norm_bwd(dy_ptr, y_ptr, rstd_ptr, cos_ptr, sin_ptr, dx_ptr, n_rows, heads, T,
                        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_H)
        mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
        at = rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
        table = ((rows // heads) % T)[:, None] * HALF + cols[None, :]
        dy1 = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
        dy2 = tl.load(dy_ptr + at + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
        y2 = tl.load(y_ptr + at + HALF, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]
        c = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        # RMSNorm backward from its output y = r·rstd: dr = rstd·(dy - y·mean(dy·y))
        mean_dy_y = ((tl.sum(dy1 * y1, axis=1) + tl.sum(dy2 * y2, axis=1)) / (2 * HALF))[:, None]
        dr1 = rstd * (dy1 - y1 * mean_dy_y)
        dr2 = rstd * (dy2 - y2 * mean_dy_y)
        # the rotation's transpose
        tl.store(dx_ptr + at, (dr1 * c - dr2 * s).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + at + HALF, (dr1 * s + dr2 * c).to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def softcapped_ce(logits_ptr, targets_ptr, losses_ptr, cap, V: tl.constexpr, WITH_GRAD: tl.constexpr,
                      CHUNK: tl.constexpr, SERIES: tl.constexpr):
        # One row of logits per program. A row that fits one CHUNK is held in registers: read
        # once, written once. A longer row takes two passes: a running max and sum over its
        # chunks, then the gradient chunk by chunk.
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(targets_ptr + row)
        valid = (target >= 0) & (target < V)
        # -1 is ignored: loss 0, no gradient. Any other target outside the vocabulary is a NaN
        # loss (the run's loss check stops it) where the plain version raises.
        bad = tl.where(target == -1, 0.0, float("nan"))
        # the target's logit, read before any gradient is written over it
        target_z = cap * _tanh(tl.load(logits_ptr + row * V + tl.where(valid, target, 0)).to(tl.float32) / cap, SERIES)
        cols = tl.arange(0, CHUNK)
        if CHUNK >= V:
            at = logits_ptr + row * V + cols
            t = _tanh(tl.load(at, mask=cols < V, other=0.0).to(tl.float32) / cap, SERIES)
            z = tl.where(cols < V, cap * t, float("-inf"))
            m = tl.max(z, axis=0)
            e = tl.exp(z - m)
            total = tl.sum(e, axis=0)
            lse = m + tl.log(total)
            if WITH_GRAD:
                # d loss / d logit = (softmax - one-hot) · (1 - tanh²), written over the logits
                grad = (e * (1.0 / total) - tl.where(cols == target, 1.0, 0.0)) * (1.0 - t * t)
                tl.store(at, tl.where(valid, grad, 0.0).to(logits_ptr.dtype.element_ty), mask=cols < V)
        else:
            m = tl.max(tl.full((CHUNK,), float("-inf"), tl.float32), axis=0)
            total = tl.sum(tl.zeros((CHUNK,), tl.float32), axis=0)
            for start in range(0, V, CHUNK):
                logits = tl.load(logits_ptr + row * V + start + cols, mask=start + cols < V, other=0.0)
                z = tl.where(start + cols < V, cap * _tanh(logits.to(tl.float32) / cap, SERIES), float("-inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            lse = m + tl.log(total)
            if WITH_GRAD:
                for start in range(0, V, CHUNK):
                    at = logits_ptr + row * V + start + cols
                    t = _tanh(tl.load(at, mask=start + cols < V, other=0.0).to(tl.float32) / cap, SERIES)
                    grad = (tl.exp(cap * t - lse) - tl.where(start + cols == target, 1.0, 0.0)) * (1.0 - t * t)
                    tl.store(at, tl.where(valid, grad, 0.0).to(logits_ptr.dtype.element_ty), mask=start + cols < V)
        tl.store(losses_ptr + row, tl.where(valid, lse - target_z, bad))

    _kernels.update(rotary_norm_fwd=rotary_norm_fwd, rotary_norm_bwd=rotary_norm_bwd, softcapped_ce=softcapped_ce)
    return _kernels


# --- rotary_norm ----------------------------------------------------------------

ROTARY_ROWS = 16   # (token, head) rows per program: 16 x 128 channels keeps 4 warps busy


def rotary_norm_plain(x, cos, sin):
    """Rotary embedding, then RMSNorm over each head: the definition.

    x: (B, T, H, D); cos, sin: (1, T, 1, D/2). The first half of each head's channels is
    rotated against the second half by the position's angles, then the head is scaled to
    unit RMS (no learned weight). Returns (B, T, H, D) in x's dtype.
    """
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    rotated = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)
    return F.rms_norm(rotated, (x.size(-1),))


def _rms_eps(dtype):
    # F.rms_norm's default: the epsilon of the dtype it computes in (float32 for 16-bit inputs)
    return torch.finfo(torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype).eps


def _rotary_norm_grid(n_rows):
    return (-(-n_rows // ROTARY_ROWS),)


@torch.library.custom_op("autoresearch::rotary_norm", mutates_args=())
def _rotary_norm_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, D = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(B * T * H, dtype=torch.float32, device=x.device)
    _triton_kernels()["rotary_norm_fwd"][_rotary_norm_grid(B * T * H)](
        x, cos, sin, y, rstd, B * T * H, H, T, _rms_eps(x.dtype),
        HALF=D // 2, BLOCK_H=1 << (D // 2 - 1).bit_length(), BLOCK_R=ROTARY_ROWS)
    return y, rstd


@_rotary_norm_op.register_fake
def _(x, cos, sin):
    B, T, H, _ = x.shape
    return torch.empty_like(x), x.new_empty(B * T * H, dtype=torch.float32)


@torch.library.custom_op("autoresearch::rotary_norm_backward", mutates_args=())
def _rotary_norm_backward_op(dy: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor) -> torch.Tensor:
    B, T, H, D = y.shape
    dx = torch.empty_like(y)
    _triton_kernels()["rotary_norm_bwd"][_rotary_norm_grid(B * T * H)](
        dy, y, rstd, cos, sin, dx, B * T * H, H, T,
        HALF=D // 2, BLOCK_H=1 << (D // 2 - 1).bit_length(), BLOCK_R=ROTARY_ROWS)
    return dx


@_rotary_norm_backward_op.register_fake
def _(dy, y, rstd, cos, sin):
    return torch.empty_like(y)


def _rotary_norm_setup(ctx, inputs, output):
    _, cos, sin = inputs
    y, rstd = output
    ctx.save_for_backward(y, rstd, cos, sin)  # the output, not the input: attention keeps y anyway
    ctx.set_materialize_grads(False)  # no zeros for rstd's "gradient"


def _rotary_norm_backward(ctx, dy, drstd):
    if dy is None:  # y itself was not used
        return None, None, None
    y, rstd, cos, sin = ctx.saved_tensors
    return _rotary_norm_backward_op(dy.contiguous(), y, rstd, cos, sin), None, None


_rotary_norm_op.register_autograd(_rotary_norm_backward, setup_context=_rotary_norm_setup)


def rotary_norm(x, cos, sin):
    """`rotary_norm_plain(x, cos, sin)` as one kernel each way: read q (or k) once, write once.

    torch.compile makes it a forward pass and a slower backward pass that recomputes the
    rotation; here the backward starts from the saved output (which attention keeps
    anyway), so the input need not be kept. Same shapes and dtype as the plain version.
    """
    B, T, H, D = x.shape
    if (not _use_kernels(x) or D % 2 or cos.requires_grad or sin.requires_grad or cos.device != x.device
            or sin.device != x.device or cos.dtype != x.dtype or sin.dtype != x.dtype):
        return rotary_norm_plain(x, cos, sin)  # what the kernel does not cover: the definition, as written
    assert cos.shape == sin.shape == (1, T, 1, D // 2), f"rotary tables {tuple(cos.shape)}: want (1, {T}, 1, {D // 2})"
    return _rotary_norm_op(x.contiguous(), cos.reshape(T, D // 2).contiguous(), sin.reshape(T, D // 2).contiguous())[0]

# --- softcapped_cross_entropy ---------------------------------------------------

CE_CHUNK = 8192   # logits per row held in registers at once: a vocabulary up to this is one pass
CE_WARPS = 8      # warps per row: 8 x 32 threads hold 8,192 logits at 32 each
CE_SERIES_CAP = 64.0  # above this soft-cap, tanh near 0 by its series (see the kernel); below, not needed


def softcapped_logits(x, weight, cap):
    """lm_head, then float32 logits soft-capped to ±cap: cap·tanh(logits / cap). (..., vocab)"""
    logits = F.linear(x, weight).float()
    return cap * torch.tanh(logits / cap)


def softcapped_cross_entropy_plain(x, weight, targets, cap):
    """Per-token cross-entropy in nats of the soft-capped logits: the definition.

    x: (B, T, C) the final normed hidden state; weight: (vocab, C); targets: (B, T), -1 is
    ignored (loss 0). Returns (B*T,) float32.
    """
    logits = softcapped_logits(x, weight, cap)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none")


@torch.library.custom_op("autoresearch::softcapped_cross_entropy", mutates_args=())
def _softcapped_ce_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                      with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = x @ weight.t()  # (N, V), overwritten by each token's loss gradient when with_grad
    losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    V = logits.size(1)
    _triton_kernels()["softcapped_ce"][(x.size(0),)](
        logits, targets, losses, cap, V=V, WITH_GRAD=with_grad, CHUNK=min(CE_CHUNK, 1 << (V - 1).bit_length()),
        SERIES=cap > CE_SERIES_CAP, num_warps=CE_WARPS)
    return losses, logits if with_grad else logits.new_empty(0)


@_softcapped_ce_op.register_fake
def _(x, weight, targets, cap, with_grad):
    N, V = x.size(0), weight.size(0)
    return x.new_empty(N, dtype=torch.float32), x.new_empty((N, V) if with_grad else (0,))


def _softcapped_ce_setup(ctx, inputs, output):
    x, weight, *_ = inputs
    ctx.save_for_backward(x, weight, output[1])
    # the gradient buffer is internal: autograd must not hand the backward a (B*T, vocab)
    # tensor of zeros as its "gradient" (4 GiB allocated and written for nothing)
    ctx.set_materialize_grads(False)


def _softcapped_ce_backward(ctx, dlosses, _):
    # each token's loss depends on its own row only: dlogits = dlosses[:, None] * grad,
    # with the per-row scale moved onto the small (N, C) sides of the two matmuls
    if dlosses is None:
        return None, None, None, None, None
    x, weight, grad = ctx.saved_tensors
    scale = dlosses[:, None]
    dx = ((grad @ weight).float() * scale).to(x.dtype) if ctx.needs_input_grad[0] else None
    dweight = grad.t() @ (x.float() * scale).to(x.dtype) if ctx.needs_input_grad[1] else None
    return dx, dweight, None, None, None


_softcapped_ce_op.register_autograd(_softcapped_ce_backward, setup_context=_softcapped_ce_setup)


def softcapped_cross_entropy(x, weight, targets, cap):
    """`softcapped_cross_entropy_plain` with the logits made and used in one pass.

    The plain version writes the (B*T, vocab) logits, reads them for the loss, reads them
    again in the backward and writes their gradient: four passes over the largest tensor
    of the step. Here one kernel reads each row once and writes the gradient of that
    token's loss over it (the backward only scales rows), and the backward never holds
    the logits and their gradient at once. Same result, float32 (B*T,).
    """
    if not _use_kernels(x) or targets.device != x.device or weight.device != x.device:
        return softcapped_cross_entropy_plain(x, weight, targets, cap)
    dtype = _compute_dtype(x)
    with_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    x = x.reshape(-1, x.size(-1)).to(dtype)
    targets = targets.reshape(-1).contiguous()
    assert targets.numel() == x.size(0), f"{targets.numel()} targets for {x.size(0)} positions"
    return _softcapped_ce_op(x, weight.to(dtype), targets, float(cap), with_grad)[0]



fused_kernels()  # at import: see its docstring

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

# =============================================================================
# Guards: an agent's edit takes effect or stops the run
# =============================================================================


class RunError(SystemExit):
    """A problem found before training: one line, exit code 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"FAIL: {message}")


def check_param_groups(model, groups):
    """Every trainable parameter of the model is in exactly one optimizer group, and the
    groups hold nothing else: a parameter left out would silently never train.
    `groups`: the param-group dicts, or an optimizer."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    seen = {}
    for group in getattr(groups, "param_groups", groups):
        for p in group["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    missing = [name for key, name in trainable.items() if key not in seen]
    twice = [names.get(key, "a tensor not in the model") for key, n in seen.items() if n > 1]
    foreign = [key for key in seen if key not in names]
    if missing:
        raise RunError(f"parameter(s) in no optimizer group, they would never train: {', '.join(missing)} "
                       f"(add them to a group in setup_optimizer)")
    if twice:
        raise RunError(f"parameter(s) in more than one optimizer group: {', '.join(twice)}")
    if foreign:
        raise RunError(f"{len(foreign)} optimizer parameter(s) are not parameters of the model")


class GradientTracker:
    """Notes which trainable parameters receive a gradient (a hook each, removed by check())."""

    def __init__(self, model):
        self.model, self.seen = model, set()
        self.hooks = [p.register_post_accumulate_grad_hook(lambda p: self.seen.add(id(p)))
                      for p in model.parameters() if p.requires_grad]

    def check(self):
        for hook in self.hooks:
            hook.remove()
        missing = [name for name, p in self.model.named_parameters() if p.requires_grad and id(p) not in self.seen]
        if missing:
            raise RunError(f"parameter(s) that got no gradient in step 0, they would never train: "
                           f"{', '.join(missing)} (unused in the forward pass? freeze them with requires_grad_(False))")


def track_gradients(model):
    """Call before step 0, and .check() after it: every trainable parameter must get a gradient."""
    return GradientTracker(model)


def check_loss(loss, step):
    """A diverged run stops: loss NaN or above 100 prints FAIL and exits 1."""
    if not math.isfinite(loss) or loss > 100:
        print(f"\nFAIL: loss {loss} at step {step}", flush=True)
        sys.exit(1)


def smoke_line(settings, smoke_settings, smoke_steps):
    """What a smoke run replaces, on one line: nobody should mistake it for a test of their edit."""
    from constants import EVAL_TOKENS, MAX_SEQ_LEN
    replaced = ", ".join(f"{name} {settings[name]} -> {value}" for name, value in smoke_settings.items())
    return (f"{replaced}, TIME_BUDGET -> {smoke_steps} steps "
            f"(and from constants.py: MAX_SEQ_LEN={MAX_SEQ_LEN}, EVAL_TOKENS={EVAL_TOKENS:,})")

# =============================================================================
# Fitting the micro-batch to memory
# =============================================================================


def is_out_of_memory(error):
    # OOM also surfaces wrapped (torch.compile's autotuning) or in a library's words (cuBLAS, the driver)
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or any(
        words in text for words in ("out of memory", "out_of_memory", "alloc_failed"))


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
    Returns (first_step's result, the micro-batch that fits, the announcement or None).
    An out-of-memory at a micro-batch of 1 is raised as it is.
    """
    global _micro_batch
    sizes = smaller_micro_batches(rows_per_step, micro_batch)
    for size in sizes:
        _micro_batch = size
        try:
            result = first_step(size)
        except Exception as e:
            if not is_out_of_memory(e) or size == sizes[-1]:
                raise
        else:
            note = None
            if size != micro_batch:
                note = (f"DEVICE_BATCH_SIZE={micro_batch} does not fit this GPU's memory: "
                        f"micro-batch {size}, accumulation x{rows_per_step // size}")
            return result, size, note
        # here, after the except block: the exception's traceback no longer holds the attempt's tensors
        release_memory()
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
    """Around main(): an out-of-memory anywhere is one FAIL line naming what to lower, exit 1."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        print(f"\n{out_of_memory_line(_micro_batch)}", flush=True)
        sys.exit(1)


def out_of_memory_line(micro_batch):
    if micro_batch is None or micro_batch > 1:
        return (f"FAIL: CUDA out of memory at a micro-batch of {micro_batch}. Lower DEVICE_BATCH_SIZE (to "
                f"{micro_batch // 2} or less); gradient accumulation keeps TOTAL_BATCH_SIZE the same.")
    return ("FAIL: CUDA out of memory, even at a micro-batch of 1: the model does not fit this GPU. "
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

# =============================================================================
# Run identity (printed before training: what a reader needs to trust the number)
# =============================================================================


def print_identity(lines):
    """`name: value` lines, names padded to one column, flushed (a crash right after still shows them)."""
    for name, value in lines:
        print(f"{name + ':':<13}{value}")
    sys.stdout.flush()


def print_summary(items):
    """The block a machine reads, the last thing a run prints: `---`, then keys padded to 18 columns."""
    print("---")
    for key, value in items:
        print(f"{key + ':':<18}{value}")
    sys.stdout.flush()


def peak_memory_mib():
    """The CUDA allocator's peak in MiB (0 on a CPU)."""
    return torch.cuda.max_memory_allocated() / 1024 / 1024 if torch.cuda.is_available() else 0.0


def fingerprint_line(fingerprints):
    harness = " ".join(f"{name}={sha}" for name, sha in fingerprints.get("harness", {}).items())
    return (f"val={fingerprints['val']} tokenizer={fingerprints['tokenizer']} "
            f"train_shards={fingerprints['train_shards']}" + (f" | harness {harness}" if harness else ""))
