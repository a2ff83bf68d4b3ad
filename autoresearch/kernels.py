"""
The model's fused pieces: their plain PyTorch definitions, then Triton kernels that
compute the same in fewer passes over memory. DO NOT MODIFY.

    rotary_norm               rotary embedding, then RMSNorm, of q or k (QK-norm)
    softcapped_cross_entropy  lm_head, soft-capped logits, per-token cross-entropy, and
                              in the same pass the gradient of each token's loss
    relu_square_mlp           the MLP, c_proj(ReLU(c_fc(x))²), with ReLU² made inside c_fc's
                              matmul and its gradient inside the backward's matmul

Read this file down to the banner "Below: the kernels": what is above it, the plain
definitions, is what the model computes. Below it is machinery an experiment need not
read: the Triton kernels as custom ops, pinned to the plain definitions by the tests,
and the decisions: `fused_kernels()` (kernels or plain), made once, at import, and
`prepare(device)` (which kernels the GPU takes), before compile. The plain versions run
where the kernels cannot (a CPU, no Triton, AUTORESEARCH_FUSED=0, a GPU or shape a
kernel does not cover).
train.py imports the pieces and may replace any of them with its own; this module
imports only autoresearch.environment of the project.
"""

import importlib.util
import os

import torch
import torch.nn.functional as F

from autoresearch import environment


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


def relu_square_mlp_plain(x, w_fc, w_proj):
    """The MLP: c_proj(ReLU(c_fc(x))²), the definition. x: (..., C); w_fc: (H, C); w_proj: (C, H)."""
    return F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj)

# =============================================================================
# Below: the kernels (machinery: the plain definitions above say what they compute)
# =============================================================================

_fused = None   # (bool, why) once fused_kernels() has decided
_interpret = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: kernels on any device
_kernels = {}   # name -> Triton kernel, defined on first use (importing Triton takes a while)
PIECES = ("rotary_norm", "softcapped_cross_entropy", "relu_square_mlp")
_ran = set()    # the pieces that ran as kernels: recorded by each op, and by its fake when compile traces it
_plain_why = {}  # piece -> why it ran as plain PyTorch where train.py called it (the GPU, not the code)
_mlp_fits = None  # whether the MLP kernel's tiles fit the run's GPU: set by prepare(), before compile
_tanh = None    # the kernels' tanh, a Triton function: a module global, where Triton looks helpers up


def fused_kernels():
    """(True, what) when the Triton kernels may run, else (False, why not).

    Decided once, when this module is imported (below), so that no compiled graph ever
    traces the decision: torch.compile cannot trace `find_spec` and would split the
    model's graph there. Kernels run on CUDA tensors, and anywhere under Triton's CPU
    interpreter (TRITON_INTERPRET=1, as the tests run them)."""
    global _fused
    if _fused is None:
        if not environment.switch("AUTORESEARCH_FUSED", True):  # a bad value: one line, not a traceback
            _fused = (False, "AUTORESEARCH_FUSED=0")
        elif importlib.util.find_spec("triton") is None:
            _fused = (False, "Triton is not installed")
        else:
            _fused = (True, "Triton kernels")
    return _fused


def prepare(device):
    """Decide, before torch.compile sees the model, which kernels the run's device takes.

    The MLP's kernel needs TMA and ~210 KiB of shared memory per block; on a GPU without
    them `relu_square_mlp` runs its plain definition, which compile fuses as it always has.
    Asked here, once, so that no compiled graph traces the question; until it is asked,
    `relu_square_mlp` is its plain definition."""
    global _mlp_fits
    device = torch.device(device)
    if device.type == "cuda" or _interpret:  # a CPU without the interpreter runs no kernel anyway
        _mlp_fits = _mlp_tiles_fit(device)
        if not _mlp_fits:
            _plain_why["relu_square_mlp"] = "this GPU: its kernel needs TMA and 210 KiB of shared memory"


def fused_line(device):
    """The `fused:` identity line for a run on `device`, once the model has run: which pieces
    ran as kernels, which ran as plain PyTorch and why (the GPU, or train.py computes them its
    own way or where their kernels do not apply), or why none can."""
    on, why = fused_kernels()
    if on and torch.device(device).type != "cuda" and not _interpret:
        on, why = False, "no CUDA device"
    if not on:
        return f"none, plain PyTorch ({why})"
    ran = [piece for piece in PIECES if piece in _ran]
    plain = [f"{piece} ({_plain_why.get(piece, 'not called as a kernel')})" for piece in PIECES if piece not in _ran]
    line = f"{', '.join(ran)} ({why})" if ran else "no piece ran as a kernel"
    return line + (f"; plain PyTorch: {', '.join(plain)}" if plain else "")


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

    @triton.jit
    def relu_square_matmul(a_desc, b_desc, out_desc, post_desc, M, N, K: tl.constexpr, BACKWARD: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, TILES: tl.constexpr,
                           SUBTILE: tl.constexpr, PREFETCH: tl.constexpr):
        # out = a @ bᵀ (a: M x K, b: N x K), then in the same tile: forward, out = ReLU(out)²;
        # backward, out · 2·sqrt(post), ReLU²'s derivative 2·ReLU(h) read from its saved output
        # post = ReLU(h)² (zero where h <= 0, as the derivative is), so h is never stored.
        # Persistent: PROGRAMS programs (one an SM) take TILES tiles each, in one flattened loop, so
        # the next tile's loads are in flight while this one's epilogue writes (the model's K loop is
        # short: 8 steps at width 512). The trip count is a constant, not the tile count: Triton's
        # CPU interpreter takes no tensor as a loop bound.
        tiles_m = tl.cdiv(M, BLOCK_M)
        per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        for i in tl.range(0, TILES, flatten=True):
            # GROUP_M row tiles walk the columns together: their b tiles stay in L2. A tile past
            # the last lies beyond N (in the last group) or beyond M: TMA loads zeros, stores nothing.
            tile = pid + i * PROGRAMS
            first_m = (tile // per_group) * GROUP_M
            rows = tl.maximum(tl.minimum(tiles_m - first_m, GROUP_M), 1)
            m = (first_m + (tile % per_group) % rows) * BLOCK_M
            n = ((tile % per_group) // rows) * BLOCK_N
            if BACKWARD and PREFETCH:  # post's tile asked for before the K loop: its load overlaps the products
                p0 = post_desc.load([m, n])
                if SUBTILE:
                    p1 = post_desc.load([m, n + BLOCK_N // 2])
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a = a_desc.load([m, k])
                b = b_desc.load([n, k])
                if UPCAST:  # Triton's CPU interpreter multiplies 16-bit tiles wrongly (numpy has no bfloat16)
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
            # the epilogue's tile again, from its own index: the loads of the next tile need not
            # wait on these values (as Triton's persistent matmul does it)
            tile_out = pid + i * PROGRAMS
            first_m = (tile_out // per_group) * GROUP_M
            rows = tl.maximum(tl.minimum(tiles_m - first_m, GROUP_M), 1)
            m = (first_m + (tile_out % per_group) % rows) * BLOCK_M
            n = ((tile_out % per_group) // rows) * BLOCK_N
            if SUBTILE:  # two (BLOCK_M, BLOCK_N / 2) halves: half the epilogue's shared memory
                acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                acc0, acc1 = tl.split(acc)
                if BACKWARD:
                    if not PREFETCH:
                        p0 = post_desc.load([m, n])
                        p1 = post_desc.load([m, n + BLOCK_N // 2])
                    acc0 = acc0 * 2.0 * tl.sqrt(p0.to(tl.float32))
                    acc1 = acc1 * 2.0 * tl.sqrt(p1.to(tl.float32))
                else:
                    acc0 = tl.maximum(acc0, 0.0)
                    acc0 = acc0 * acc0
                    acc1 = tl.maximum(acc1, 0.0)
                    acc1 = acc1 * acc1
                out_desc.store([m, n], acc0.to(out_desc.dtype))
                out_desc.store([m, n + BLOCK_N // 2], acc1.to(out_desc.dtype))
            else:
                if BACKWARD:
                    if not PREFETCH:
                        p0 = post_desc.load([m, n])
                    acc = acc * 2.0 * tl.sqrt(p0.to(tl.float32))
                else:
                    acc = tl.maximum(acc, 0.0)
                    acc = acc * acc
                out_desc.store([m, n], acc.to(out_desc.dtype))

    _kernels.update(rotary_norm_fwd=rotary_norm_fwd, rotary_norm_bwd=rotary_norm_bwd, softcapped_ce=softcapped_ce,
                    relu_square_matmul=relu_square_matmul)
    return _kernels


# --- rotary_norm ----------------------------------------------------------------

ROTARY_ROWS = 16   # (token, head) rows per program: 16 x 128 channels keeps 4 warps busy


def _rms_eps(dtype):
    # F.rms_norm's default: the epsilon of the dtype it computes in (float32 for 16-bit inputs)
    return torch.finfo(torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype).eps


def _rotary_norm_grid(n_rows):
    return (-(-n_rows // ROTARY_ROWS),)


@torch.library.custom_op("autoresearch::rotary_norm", mutates_args=())
def _rotary_norm_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _ran.add("rotary_norm")
    B, T, H, D = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(B * T * H, dtype=torch.float32, device=x.device)
    _triton_kernels()["rotary_norm_fwd"][_rotary_norm_grid(B * T * H)](
        x, cos, sin, y, rstd, B * T * H, H, T, _rms_eps(x.dtype),
        HALF=D // 2, BLOCK_H=1 << (D // 2 - 1).bit_length(), BLOCK_R=ROTARY_ROWS)
    return y, rstd


@_rotary_norm_op.register_fake
def _(x, cos, sin):
    _ran.add("rotary_norm")
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


@torch.library.custom_op("autoresearch::softcapped_cross_entropy", mutates_args=())
def _softcapped_ce_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                      with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _ran.add("softcapped_cross_entropy")
    logits = x @ weight.t()  # (N, V), overwritten by each token's loss gradient when with_grad
    losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    V = logits.size(1)
    _triton_kernels()["softcapped_ce"][(x.size(0),)](
        logits, targets, losses, cap, V=V, WITH_GRAD=with_grad, CHUNK=min(CE_CHUNK, 1 << (V - 1).bit_length()),
        SERIES=cap > CE_SERIES_CAP, num_warps=CE_WARPS)
    return losses, logits if with_grad else logits.new_empty(0)


@_softcapped_ce_op.register_fake
def _(x, weight, targets, cap, with_grad):
    _ran.add("softcapped_cross_entropy")
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


# --- relu_square_mlp ------------------------------------------------------------

# Tiles of relu_square_matmul, read at every call (bench/fused.py times the alternatives)
MLP_BLOCK_M, MLP_BLOCK_N, MLP_BLOCK_K = 128, 256, 64
MLP_GROUP_M = 8   # row tiles that walk the columns together (L2 reuse of the weight's tiles)
MLP_STAGES = 3    # tiles of a and b in flight, 3 x 48 KiB in bf16
MLP_WARPS = 8
MLP_SUBTILE = True  # the epilogue stores two half tiles: what lets 3 stages fit beside it
MLP_PREFETCH = False  # the backward asks for post's tile before its K loop: off until a GPU has timed it
                      # (bench/fused.py). Built for sm_90 it holds post in registers: at 128 x 256 ptxas spills
MLP_SHARED_MEMORY = 210 * 1024  # what a block of these tiles may need, asked of the GPU (tests build it for sm_90)


def _mlp_tiles_fit(device):
    """The MLP's kernel loads its tiles by TMA (compute capability 9 or more) into ~210 KiB of
    shared memory, which Hopper and datacenter Blackwell have (227 KiB). Asked by prepare()."""
    if _interpret:
        return True
    props = torch.cuda.get_device_properties(device)
    return props.major >= 9 and props.shared_memory_per_block_optin >= MLP_SHARED_MEMORY


def _aligned(t):
    """t, or a copy where its data does not start on 16 bytes, as TMA needs (a view into a larger tensor)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _relu_square_matmul(a, b, post=None):
    """ReLU(a @ bᵀ)², or with `post` the backward's (a @ bᵀ) · 2·sqrt(post). a: (M, K), b: (N, K)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    M, K = a.shape
    N = b.size(0)
    backward = post is not None
    out = a.new_empty(M, N)
    settings = _mlp_settings(M, N, K, a.dtype, backward, _programs(a.device))
    bm, bn, bk = settings["BLOCK_M"], settings["BLOCK_N"], settings["BLOCK_K"]
    on = [bm, bn // 2] if settings["SUBTILE"] else [bm, bn]
    a, b = _aligned(a), _aligned(b)
    post = _aligned(post) if backward else out  # forward: a placeholder the kernel never reads
    _triton_kernels()["relu_square_matmul"][(settings["PROGRAMS"],)](
        TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]),
        TensorDescriptor.from_tensor(out, on), TensorDescriptor.from_tensor(post, on), M, N, **settings)
    return out


def _mlp_settings(M, N, K, dtype, backward, programs):
    """The kernel's compile-time arguments (num_stages and num_warps among them) for an (M, K) @ (N, K)ᵀ
    product in `dtype` on `programs` SMs: what _relu_square_matmul launches (tests build them for an H100).

    float32 takes a quarter of the K-step and half the columns: its tiles are twice bf16's bytes,
    and its output and `post` tiles too, which sit in shared memory beside the next tile's
    stages. The step is a power of 2 from 16 (the tensor cores' smallest); TMA reads zeros
    past the matrix's edge. A half tile's rows must hold 16 bytes (TMA's least)."""
    wide = dtype.itemsize > 2
    step = MLP_BLOCK_K // 4 if wide else MLP_BLOCK_K
    bk = max(16, min(step, 1 << (K - 1).bit_length()))
    bm, bn = MLP_BLOCK_M, max(16, MLP_BLOCK_N // 2) if wide else MLP_BLOCK_N
    tiles = -(-M // bm) * -(-N // bn)
    programs = min(tiles, programs)
    # float32 multiplies as the plain version's matmul would: TF32 unless the run asked for "highest"
    precision = "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"
    return dict(K=K, BACKWARD=backward, UPCAST=_interpret and dtype.itemsize < 4, PRECISION=precision,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=MLP_GROUP_M, PROGRAMS=programs,
                TILES=-(-tiles // programs), SUBTILE=MLP_SUBTILE and bn // 2 * dtype.itemsize >= 16,
                PREFETCH=MLP_PREFETCH, num_stages=MLP_STAGES, num_warps=MLP_WARPS)


def _programs(device):
    """The persistent MLP kernel's programs: one an SM (3 under the interpreter, so tests walk several tiles).
    PyTorch keeps each device's properties once read: asking again costs nothing."""
    return 3 if _interpret else torch.cuda.get_device_properties(device).multi_processor_count


@torch.library.custom_op("autoresearch::relu_square_mlp", mutates_args=())
def _relu_square_mlp_op(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _ran.add("relu_square_mlp")
    post = _relu_square_matmul(x, w_fc)  # (N, H): ReLU(x @ w_fcᵀ)², the only (N, H) tensor kept
    return post @ w_proj.t(), post


@_relu_square_mlp_op.register_fake
def _(x, w_fc, w_proj):
    _ran.add("relu_square_mlp")
    return x.new_empty(x.size(0), w_proj.size(0)), x.new_empty(x.size(0), w_fc.size(0))


@torch.library.custom_op("autoresearch::relu_square_mlp_backward", mutates_args=())
def _relu_square_grad_op(dout: torch.Tensor, w_proj: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    return _relu_square_matmul(dout, w_proj.t().contiguous(), post)  # d loss / d h, (N, H)


@_relu_square_grad_op.register_fake
def _(dout, w_proj, post):
    return torch.empty_like(post)


def _relu_square_mlp_setup(ctx, inputs, output):
    x, w_fc, w_proj = inputs
    ctx.save_for_backward(x, w_fc, w_proj, output[1])
    ctx.set_materialize_grads(False)  # no zeros for post's "gradient"


def _relu_square_mlp_backward(ctx, dout, _):
    if dout is None:
        return None, None, None
    x, w_fc, w_proj, post = ctx.saved_tensors
    dout = dout.contiguous()
    dx = dw_fc = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        dh = _relu_square_grad_op(dout, w_proj, post)
        dx = dh @ w_fc if ctx.needs_input_grad[0] else None
        dw_fc = dh.t() @ x if ctx.needs_input_grad[1] else None
    dw_proj = dout.t() @ post if ctx.needs_input_grad[2] else None
    return dx, dw_fc, dw_proj


_relu_square_mlp_op.register_autograd(_relu_square_mlp_backward, setup_context=_relu_square_mlp_setup)


def relu_square_mlp(x, w_fc, w_proj):
    """`relu_square_mlp_plain(x, w_fc, w_proj)` without ReLU²'s own passes over memory.

    The plain version writes c_fc's (B*T, 4C) output h, reads it to write ReLU(h)², and in
    the backward reads h again beside the incoming gradient: each pass moves the widest
    activation of the step. Here c_fc's matmul writes ReLU(h)² from its tile, and the
    backward's matmul (the gradient into ReLU²) multiplies by the derivative from that
    same saved output as it writes. Same shapes and dtype as the plain version.
    """
    H, C = w_fc.shape
    dtype = _compute_dtype(x)
    if (not _use_kernels(x) or w_fc.device != x.device or w_proj.device != x.device or tuple(w_proj.shape) != (C, H)
            or not _mlp_fits or C % 8 or H % 8  # the GPU (prepare()); TMA's rows must start 16 bytes apart
            or x.numel() == 0 or dtype not in (torch.bfloat16, torch.float32)  # float16: sqrt(post) under/overflows
            or (not torch.is_autocast_enabled(x.device.type) and not x.dtype == w_fc.dtype == w_proj.dtype)):
        return relu_square_mlp_plain(x, w_fc, w_proj)  # the definition, as written (mixed dtypes raise there)
    out = _relu_square_mlp_op(x.reshape(-1, C).to(dtype).contiguous(), w_fc.to(dtype).contiguous(),
                              w_proj.to(dtype).contiguous())[0]
    return out.view(*x.shape[:-1], C)


fused_kernels()  # at import: see its docstring
