"""
Attention: one backend decision, one function. DO NOT MODIFY.

Every layer of train.py's model calls `attention(q, k, v, window_size)`. Which kernel
computes it is decided once, by `select_attention()`, first choice first:
  fa4  - FlashAttention-4 (CuTe DSL kernels, PyPI `flash-attn-4`; Hopper and Blackwell),
         as one custom op that torch.compile treats as opaque
  fa3  - Flash Attention 3 from the Hugging Face hub via `kernels` (other GPUs)
  flex - FlexAttention with its Triton kernels, the same sliding windows (any CUDA GPU)
  sdpa - exact masked attention with F.scaled_dot_product_attention (CPU)
All four compute the same function. AUTORESEARCH_ATTENTION=fa4|fa3|flex|sdpa forces one.
`prepare_attention(config, window_sizes, device)` runs before torch.compile sees the model.

train.py imports it (and the tests and benchmarks); it imports the package's environment,
gpu, guards and report modules, never train.py. Nothing loads at import: the kernels load
when `select_attention` runs.
"""

import importlib.util
import os
import socket
import warnings
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from autoresearch import environment
from autoresearch.gpu import is_out_of_memory
from autoresearch.guards import RunError
from autoresearch.report import print_identity

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


def _error_line(error):
    """`ErrorType: the message's first line`: an exception as a reason inside one line."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


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
            errors.append(f"{pin}: {_error_line(e)}")
    return None, f"{repo} could not be loaded ({'; '.join(errors)})"


def select_attention(device, prefer=None):
    """Pick the attention backend for `device` once; return a one-line description that
    names the backend and why each earlier choice was skipped."""
    global _backend, _fa3, _fa4, _flex
    prefer = prefer or environment.choice("AUTORESEARCH_ATTENTION", ("auto", *BACKENDS), "auto")
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
                why = f"flash-attn-4 could not be loaded ({_error_line(e)})"
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
    def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      left: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def prepare_attention(config, window_sizes, device):
    """Before torch.compile sees the model: FlexAttention's block masks, or for FA4 one
    forward and backward at the run's shapes (a single row); FlexAttention forced on a CPU,
    where it cannot train, is one FAIL line. FA4 is chosen without running
    a kernel; one that fails to build here (a GPU or head size its kernels do not cover)
    then falls back to the next backend with an `attention:` line, instead of crashing
    inside step 0 with a traceback.

    config: the model's GPTConfig (sequence_len, n_head, n_kv_head, n_embd: heads of
    n_embd // n_head channels); window_sizes: the layers' (left, 0) windows.
    """
    global _fa4_failed
    device = torch.device(device)
    if _backend == "flex" and device.type != "cuda":  # only a forward check may use it there
        raise RunError("attention: flex was asked for (AUTORESEARCH_ATTENTION=flex), but FlexAttention has no "
                       "backward on a CPU: use sdpa there, or leave AUTORESEARCH_ATTENTION unset")
    seq_len, head_dim = config.sequence_len, config.n_embd // config.n_head
    if _backend == "fa4":
        try:
            q = torch.randn(1, seq_len, config.n_head, head_dim, device=device, dtype=torch.bfloat16,
                            requires_grad=True)
            k, v = (torch.randn(1, seq_len, config.n_kv_head, head_dim, device=device, dtype=torch.bfloat16,
                                requires_grad=True) for _ in range(2))
            for left in sorted({left for left, _ in window_sizes}):
                attention(q, k, v, (left, 0)).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # a kernel's fault shows here, not in step 0
        except Exception as e:  # noqa: BLE001 (any failure: a compile error, an unsupported shape)
            if is_out_of_memory(e):
                raise  # a full GPU says nothing about FA4: fitting the micro-batch deals with it
            _fa4_failed = f"FA4 failed at this run's shapes ({_error_line(e)})"
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

