"""
Pretrain a small GPT for a fixed wall-clock budget and report val_bpb.

This is the one file the research agent edits. It reads top to bottom:
model -> optimizer -> hyperparameters -> setup -> training loop -> summary.
The rules of the game (context length, time budget, evaluation size) come
from `constants.py`; data, tokenizer and the metric come from `prepare.py`.

    uv run train.py                         # one experiment: TIME_BUDGET s of training, then eval
    AUTORESEARCH_SMOKE=1 uv run train.py    # preflight on any machine (CPU included), ~1 min

Importing this file builds nothing: the run lives in `main()`.
"""

import os

# Must be set before torch initialises CUDA: fewer allocator stalls and less fragmentation.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import gc
import math
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from constants import EVAL_TOKENS, MAX_SEQ_LEN, SMOKE, TIME_BUDGET
from prepare import Tokenizer, data_fingerprint, evaluate_bpb, list_shards, make_dataloader

# =============================================================================
# Attention: one backend decision, one function
# =============================================================================
#
# Every layer calls `attention(q, k, v, window_size)`. Which kernel computes it
# is decided once, by `select_attention()`:
#   fa3  - Flash Attention 3 from the Hugging Face hub via `kernels` (CUDA; the published setup)
#   flex - PyTorch FlexAttention with the same sliding windows (CUDA, compiled)
#   sdpa - exact masked attention with F.scaled_dot_product_attention (CPU; any device if forced)
# All three compute the same function. AUTORESEARCH_ATTENTION=fa3|flex|sdpa forces one.

_backend = None      # "fa3" | "flex" | "sdpa", set by select_attention()
_fa3 = None          # the flash_attn_interface module when the backend is fa3
_flex = None         # flex_attention, compiled on CUDA
_block_masks = {}    # (T, left window, device type) -> BlockMask, built outside torch.compile


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
    """Pick the attention backend for `device` once; return a one-line description."""
    global _backend, _fa3, _flex
    prefer = prefer or os.environ.get("AUTORESEARCH_ATTENTION", "auto")
    if prefer not in ("auto", "fa3", "flex", "sdpa"):  # a user's setting: one line, not a traceback
        raise SystemExit(f"attention: AUTORESEARCH_ATTENTION={prefer!r}: use fa3, flex or sdpa")
    device = torch.device(device)
    why = None
    if prefer in ("auto", "fa3"):
        if device.type == "cuda":
            _fa3, why = _load_fa3()
        else:
            why = "no CUDA device"
        if _fa3 is not None:
            _backend = "fa3"
            return "fa3 (Flash Attention 3 via kernels)"
        if prefer == "fa3":
            raise SystemExit(f"attention: fa3 was asked for, but {why}")
    if prefer == "flex" or (prefer == "auto" and device.type == "cuda"):
        # Compiled, flex_attention is a fused sliding-window kernel; eager it is a slow reference.
        # (FlexAttention has no backward on CPU: there it is only good for forward checks.)
        _flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
        _backend = "flex"
        return "flex (PyTorch FlexAttention, same windows)" + (f"; no FA3: {why}" if why else "")
    _backend = "sdpa"
    return "sdpa (exact masked attention)" + (f"; no FA3: {why}" if why else "")


def build_attention_masks(seq_len, window_sizes, device):
    """FlexAttention's block masks, built before torch.compile sees the model (no-op otherwise)."""
    if _backend == "flex":
        for window_size in window_sizes:
            _flex_block_mask(seq_len, window_size[0], torch.device(device))


def _flex_block_mask(T, left, device):
    key = (T, left, device.type)  # "cuda", not "cuda:0": main() and the model must hit the same entry
    if key not in _block_masks:
        def sliding_window(b, h, q_idx, kv_idx):
            # query i sees key j when j <= i and i - j <= left: itself and the `left` tokens before it
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= left)

        _block_masks[key] = create_block_mask(sliding_window, None, None, T, T, device=device)
    return _block_masks[key]


def attention(q, k, v, window_size):
    """Causal attention with a sliding window: query i sees keys i-left .. i.

    q: (B, T, H, D); k, v: (B, T, H_kv, D) with H a multiple of H_kv.
    window_size: (left, 0) as in flash-attn; left >= T - 1 means full causal attention.
    Returns (B, T, H, D).
    """
    if _backend is None:
        select_attention(q.device)
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
# Model
# =============================================================================

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


VE_GATE_CHANNELS = 32   # value-embedding gates read only the first 32 channels of x


def norm(x):
    # RMSNorm without a learned weight, everywhere in the model
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer_idx, n_layer):
    # alternating layers, always including the last one
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Per-layer (left, 0) windows: pattern cycled over layers, L = full context, S = half; last layer L."""
    pattern = config.window_pattern.upper()
    assert pattern and set(pattern) <= {"S", "L"}, f"window_pattern {config.window_pattern!r}: use S and L"
    full, half = config.sequence_len, config.sequence_len // 2
    sizes = [(full if pattern[i % len(pattern)] == "L" else half, 0) for i in range(config.n_layer)]
    sizes[-1] = (full, 0)
    return sizes


def apply_rotary(x, cos, sin):
    # x: (B, T, H, D); rotate the first half of each head against the second half
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        assert config.n_head % config.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        use_ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if use_ve else None

    def forward(self, x, ve, cos_sin, window_size):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # ResFormer value embeddings, mixed in through a gate in (0, 2), one per KV head
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, H_kv)
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm, after the rotation
        y = attention(q, k, v, window_size)  # (B, T, H, D)
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU²


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size):
        x = x + self.attn(norm(x), ve, cos_sin, window_size)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    """Build on the meta device, then `to_empty(device=...)` and `init_weights()`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # before layer i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        # rotary tables for 10x the context, so longer evaluations need no rebuild
        self.rotary_seq_len = 10 * config.sequence_len
        cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, base=10000):
        head_dim = self.config.n_embd // self.config.n_head
        device = self.transformer.wte.weight.device
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        t = torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (T, D/2)
        cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self):
        n_embd = self.config.n_embd
        s = 3**0.5 * n_embd**-0.5  # uniform(-s, s) has the std of N(0, 1/n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -s, s)
            # output projections start at zero: every block starts as the identity
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate = 2·sigmoid(0) = 1
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.cos, self.sin = self._rotary_tables()
        if self.transformer.wte.weight.device.type == "cuda":
            # embeddings are lookups, not matmuls: bf16 halves their memory and optimizer traffic
            self.transformer.wte.to(dtype=torch.bfloat16)
            for ve in self.value_embeds.values():
                ve.to(dtype=torch.bfloat16)

    def param_counts(self):
        """Parameters by kind; `total` counts every parameter."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def estimate_flops(self):
        """FLOPs per token for MFU: 6 per matmul weight (forward + backward) plus attention."""
        c = self.param_counts()
        matmul_params = c["total"] - c["wte"] - c["value_embeds"] - c["scalars"]
        h, d, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = sum(12 * h * d * min(left, t) for left, _ in self.window_sizes)
        return 6 * matmul_params + attn_flops

    def setup_optimizer(self, unembedding_lr, embedding_lr, matrix_lr, scalar_lr, weight_decay,
                        adam_betas, mode="eager"):
        """AdamW for embeddings, lm_head and scalars; Muon for every matrix inside the blocks."""
        # AdamW learning rates were tuned at width 768; scale them by 1/sqrt(width/768)
        scale = (self.config.n_embd / 768) ** -0.5
        adamw = dict(kind="adamw", eps=1e-10, weight_decay=0.0)
        groups = [
            dict(adamw, params=list(self.lm_head.parameters()), lr=unembedding_lr * scale, betas=adam_betas),
            dict(adamw, params=list(self.transformer.wte.parameters()), lr=embedding_lr * scale, betas=adam_betas),
            dict(adamw, params=list(self.value_embeds.parameters()), lr=embedding_lr * scale, betas=adam_betas),
            # the scalar groups are not width-scaled (as published)
            dict(adamw, params=[self.resid_lambdas], lr=scalar_lr * 0.01, betas=adam_betas),
            dict(adamw, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({p.shape for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        optimizer = MuonAdamW(groups, mode=mode)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, reduction="mean"):
        """Logits (B, T, vocab) without targets; with targets the mean loss, or with
        reduction='none' the per-token losses (B*T,) in nats, detached (for evaluation:
        train on the mean)."""
        if targets is None:
            return softcapped_logits(self.trunk(idx), self.lm_head.weight)
        assert reduction in ("mean", "none"), f"reduction={reduction!r}: use 'mean' or 'none'"
        mean_loss, per_token = self.losses(idx, targets)
        return mean_loss if reduction == "mean" else per_token

    def losses(self, idx, targets):
        """(mean loss over real targets, per-token losses (B*T,) detached).

        One function, so one compiled graph (compile_model), serves training (the mean)
        and evaluation (per token): the evaluation compiles nothing new. The backward
        starts from the scalar mean, as with F.cross_entropy's own mean.
        """
        per_token = token_losses(self.trunk(idx), self.lm_head.weight, targets)
        return per_token.sum() / (targets != -1).sum(), per_token.detach()

    def trunk(self, idx):
        """Embedding and blocks: the final hidden state (B, T, C), before the last norm."""
        B, T = idx.shape
        assert T <= self.rotary_seq_len, f"sequence of {T} tokens is longer than the rotary tables ({self.rotary_seq_len})"
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))  # (B, T, C)
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i])
        return x


def softcapped_logits(x, lm_head_weight):
    """Final norm, lm_head, float32 logits soft-capped to ±15: (B, T, vocab)."""
    logits = F.linear(norm(x), lm_head_weight).float()
    return 15 * torch.tanh(logits / 15)


def token_losses(x, lm_head_weight, targets):
    """Per-token cross-entropy in nats, flat (B*T,) as F.cross_entropy gives it; 0 where the target is -1.

    Training (mean) and evaluation (per token) both go through this one function inside
    GPT.losses, the graph compile_model() compiles once for both.
    """
    logits = softcapped_logits(x, lm_head_weight)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none")


def compile_model(model):
    """torch.compile the model's loss graph: embedding, blocks, head, cross-entropy (GPT.losses)."""
    model.losses = torch.compile(model.losses, dynamic=False)
    return model


class TrainingGraphEval(nn.Module):
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


# =============================================================================
# Optimizer: MuonAdamW
# =============================================================================

# Polar Express coefficients (a, b, c), one triple per iteration
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(g, steps=5):
    """Approximate the orthogonal polar factor U·Vᵀ of g = U·S·Vᵀ (all singular values -> ~1).

    Polar Express (Amsel et al., 2025, "The Polar Express: Optimal Matrix Sign Methods
    and Their Application to the Muon Algorithm"): like Muon's Newton-Schulz iteration,
    each step is an odd matrix polynomial X <- aX + (bA + cA²)X with A = XXᵀ, but the
    coefficients change per step, chosen to be optimal for the range of singular values
    left after the previous step. Runs in bf16. Scaling by 1.02·‖X‖_F (+1e-6) first puts
    every singular value in (0, 1]. Tall matrices use the XᵀX form (smaller Gram matrix).
    g: (..., rows, cols).
    """
    X = g.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if X.size(-2) > X.size(-1):
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def normuon(update, second_moment, beta2_t, red_dim):
    """NorMuon (Li et al., 2025): equalise the scale of the update's rows (or columns).

    An orthogonalised update has uneven per-neuron magnitudes. Track an EMA (beta2) of
    the update's mean square along `red_dim` (-1: one value per row, used when
    rows >= cols; -2: one per column), divide the update by its square root (EMA
    floored at 1e-10), then rescale so the Frobenius norm is what it was before:
    NorMuon changes the shape of the update, not its size.
    update: (N, rows, cols); second_moment: (N, rows, 1) or (N, 1, cols), updated in place.
    """
    n = update.size(red_dim)
    mean_sq = update.float().square().mean(dim=red_dim, keepdim=True)
    norm_before = (mean_sq.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment.lerp_(mean_sq.to(second_moment.dtype), 1 - beta2_t.to(second_moment.dtype))
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    # ‖update · step_size‖_F, without building the scaled matrix
    norm_after = (mean_sq * n * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    scale = step_size * (norm_before / norm_after.clamp_min(1e-10))
    return update * scale.to(update.dtype)


def cautious_step(params, update, lr, weight_decay):
    """p <- p - lr·update - lr·wd·p, the decay applied only where update and p agree in sign.

    Cautious weight decay: decoupled decay pulls every weight toward zero; here it acts only
    where the update already moves that weight toward zero, so the two never fight.
    """
    mask = (update * params) >= 0
    params.sub_(lr * update + lr * weight_decay * params * mask)


def muon_step(grads, params, momentum_buffer, second_moment, lr_t, momentum_t, wd_t, beta2_t,
              ns_steps: int, red_dim: int):
    """One Muon step for a stack of same-shape matrices: (N, rows, cols) each, updated in place."""
    momentum = momentum_t.to(grads.dtype)
    # Nesterov: the buffer moves toward the gradient; the update looks ahead along the buffer
    momentum_buffer.lerp_(grads, 1 - momentum)
    update = grads.lerp_(momentum_buffer, momentum)
    update = polar_express(update, ns_steps)
    update = normuon(update, second_moment, beta2_t, red_dim)
    cautious_step(params, update.to(params.dtype), lr_t.to(params.dtype), wd_t.to(params.dtype))


def adamw_step(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    """AdamW for one tensor: decoupled decay, moments by lerp, bias correction."""
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t**step_t
    bias2 = 1 - beta2_t**step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    p.add_(exp_avg / denom * (-lr_t / bias1))


class MuonAdamW(torch.optim.Optimizer):
    """Muon (with Polar Express, NorMuon, cautious decay) and AdamW in one optimizer.

    Every group says its kind: "adamw" (lr, betas, eps, weight_decay) or "muon" (lr,
    momentum, ns_steps, beta2, weight_decay; all params of one shape). A Muon group is
    stepped as one stacked (N, rows, cols) tensor with lr scaled by max(1, rows/cols)^0.5.
    AdamW's bias correction counts the steps of its group.

    The per-step numbers (lr, momentum, decay, betas, step count) reach the kernels as 0-d
    views of one tensor on the params' device, refilled by a single copy each step, so no
    kernel bakes a value in. That lets `mode` run the same step three ways:
      "eager"      - plain PyTorch ops (CPU, and the reference for the other two);
      "compiled"   - the two step functions torch.compile'd (the published way; ~17 s of
                     compiling on a cold cache, and they never recompile as the numbers change);
      "cuda_graph" - eager for the first GRAPH_AFTER_STEPS steps (state is created), then the
                     whole step captured once as a CUDA graph and replayed: its few hundred
                     small kernels launch as one, with nothing to compile. Call zero_grad() on
                     the optimizer (it zeroes in place: the graph reads the gradients where
                     they were at capture); gradients found elsewhere are copied there first.
                     It captures again when what the graph baked in changes: which params
                     have gradients, where the params live, ns_steps, a loaded state dict.
    """

    GRAPH_AFTER_STEPS = 2
    ADAMW_FIELDS = ("lr", "beta1", "beta2", "eps", "wd", "step")
    MUON_FIELDS = ("lr", "momentum", "wd", "beta2")

    def __init__(self, param_groups, mode="eager"):
        super().__init__(param_groups, defaults={})
        assert mode in ("eager", "compiled", "cuda_graph"), f"mode={mode!r}: use eager, compiled or cuda_graph"
        for group in self.param_groups:
            assert group.get("kind") in ("adamw", "muon"), "every param group needs kind='adamw' or 'muon'"
            if group["kind"] == "muon":
                assert len({p.shape for p in group["params"]}) == 1, "a muon group holds one shape"
                assert group["params"][0].ndim == 2, "muon is for matrices"
            group.setdefault("step", 0)
        self.mode = mode
        self._params = [p for group in self.param_groups for p in group["params"]]
        device = self._params[0].device
        if mode == "cuda_graph":
            assert device.type == "cuda", "mode='cuda_graph' needs the parameters on a CUDA device"
        # one row of hyperparameters per group, staged on the host, copied to the device once a step
        self._hyper = torch.zeros(len(self.param_groups), len(self.ADAMW_FIELDS), device=device)
        self._hyper_host = torch.zeros(self._hyper.shape, pin_memory=device.type == "cuda")
        self._hyper_copied = None  # CUDA event: the host-to-device copy of _hyper_host is done
        compile_ = lambda fn: torch.compile(fn, dynamic=False, fullgraph=True) if mode == "compiled" else fn
        self._adamw_step = compile_(adamw_step)
        self._muon_step = compile_(muon_step)
        self._graph = None
        self._graph_grads = None  # the gradient tensors the captured graph reads
        self._graph_key_captured = None

    def _stage_hyperparameters(self):
        rows = []
        for group in self.param_groups:
            group["step"] += 1
            if group["kind"] == "adamw":
                row = [group["lr"], *group["betas"], group["eps"], group["weight_decay"], group["step"]]
            else:
                rows_, cols = group["params"][0].shape
                row = [group["lr"] * max(1.0, rows_ / cols) ** 0.5, group["momentum"], group["weight_decay"],
                       group["beta2"], 0.0, 0.0]
            rows.append(row)
        if self._hyper_copied is not None:
            self._hyper_copied.synchronize()  # last step's copy has left the host buffer (normally long ago)
        self._hyper_host.copy_(torch.tensor(rows, dtype=torch.float32))
        self._hyper.copy_(self._hyper_host, non_blocking=True)
        if self._hyper.is_cuda:
            self._hyper_copied = torch.cuda.Event()
            self._hyper_copied.record()

    def _step_adamw(self, index, group):
        t = dict(zip(self.ADAMW_FIELDS, self._hyper[index].unbind()))
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            self._adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                             t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"], t["wd"])

    def _step_muon(self, index, group):
        params = group["params"]
        if any(p.grad is None for p in params):
            return
        rows, cols = params[0].shape
        state = self.state[params[0]]  # the whole stack's state lives on the first param
        # per-row statistics when the matrix is tall or square, per-column when wide
        red_dim = -1 if rows >= cols else -2
        if not state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype, device=params[0].device)
            moment_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_moment"] = torch.zeros(moment_shape, dtype=params[0].dtype, device=params[0].device)
        t = dict(zip(self.MUON_FIELDS, self._hyper[index, :len(self.MUON_FIELDS)].unbind()))
        stacked_params = torch.stack(params)
        self._muon_step(torch.stack([p.grad for p in params]), stacked_params,
                        state["momentum_buffer"], state["second_moment"],
                        t["lr"], t["momentum"], t["wd"], t["beta2"], group["ns_steps"], red_dim)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    def _step_groups(self):
        for index, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                self._step_adamw(index, group)
            else:
                self._step_muon(index, group)

    def _state_ready(self):
        """Every parameter that will be stepped has its state: creating it inside a capture
        would make each replay zero it again."""
        for group in self.param_groups:
            stepped = [p for p in group["params"] if p.grad is not None]
            if group["kind"] == "adamw":
                owners = stepped
            else:  # a Muon group steps only when all its matrices have gradients; its state is on the first
                owners = group["params"][:1] if len(stepped) == len(group["params"]) else []
            if any(not self.state[p] for p in owners):
                return False
        return True

    def _graph_key(self):
        """What a captured graph bakes in besides tensor contents: which parameters have
        gradients, where the parameters live, the Muon iteration counts."""
        return (tuple(p.grad is None for p in self._params), tuple(p.data_ptr() for p in self._params),
                tuple(group.get("ns_steps") for group in self.param_groups))

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        # Captured on the current stream when it is a side stream (main() runs on one): the
        # graph then shares that stream's cuBLAS workspace instead of allocating its own.
        # thread_local: the data loader's thread may call CUDA while this one captures.
        stream = torch.cuda.current_stream()
        stream = None if stream == torch.cuda.default_stream() else stream
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            self._step_groups()
        return graph

    @torch.no_grad()
    def step(self):
        self._stage_hyperparameters()
        if self.mode != "cuda_graph" or self.param_groups[0]["step"] <= self.GRAPH_AFTER_STEPS:
            self._step_groups()
            return
        key = self._graph_key()
        if self._graph is not None and key != self._graph_key_captured:
            self.release_graph()  # something the graph baked in has changed: capture again
        if self._graph is None:
            if not self._state_ready():
                self._step_groups()
                return
            self._graph_grads = [p.grad for p in self._params]
            self._graph_key_captured = key
            self._graph = self._capture()  # records the step; the replay below runs it
        moved = [(kept, p.grad) for kept, p in zip(self._graph_grads, self._params)
                 if p.grad is not None and p.grad is not kept]
        if moved:
            torch._foreach_copy_([kept for kept, _ in moved], [g for _, g in moved])
        self._graph.replay()

    def load_state_dict(self, state_dict):
        self.release_graph()  # the graph points at the state tensors about to be replaced
        super().load_state_dict(state_dict)

    def release_graph(self):
        """Drop the captured graph and its hold on the gradients (after training); the next
        step() in mode 'cuda_graph' captures again."""
        self._graph = self._graph_grads = self._graph_key_captured = None

    def zero_grad(self, set_to_none=True):
        """Like Optimizer.zero_grad; once a CUDA graph is captured, zero in place (it reads them there)."""
        if self._graph is None:
            return super().zero_grad(set_to_none=set_to_none)
        torch._foreach_zero_([p.grad for p in self._params if p.grad is not None])


# =============================================================================
# Hyperparameters (edit these)
# =============================================================================

# Model
ASPECT_RATIO = 64               # width = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128                  # channels per attention head (heads = width / HEAD_DIM)
WINDOW_PATTERN = "SSSL"         # attention windows cycled over layers: S = half context, L = full
DEPTH = 8                       # transformer layers

# Optimization
TOTAL_BATCH_SIZE = 2**19        # tokens per optimizer step (524,288)
DEVICE_BATCH_SIZE = 128         # rows per forward/backward; gradient accumulation does the rest
EMBEDDING_LR = 0.6              # AdamW, token and value embeddings (width-scaled)
UNEMBEDDING_LR = 0.004          # AdamW, lm_head (width-scaled)
MATRIX_LR = 0.04                # Muon, every matrix inside the blocks
SCALAR_LR = 0.5                 # AdamW, x0 lambdas (resid lambdas get 0.01 of it)
WEIGHT_DECAY = 0.2              # Muon's cautious weight decay, decayed linearly to 0
ADAM_BETAS = (0.8, 0.95)        # AdamW betas (x0 lambdas use (0.96, 0.95))
WARMUP_RATIO = 0.0              # fraction of the budget spent warming the LR up
WARMDOWN_RATIO = 0.5            # fraction of the budget spent decaying the LR at the end
FINAL_LR_FRAC = 0.0             # LR multiplier at the very end

# -----------------------------------------------------------------------------
# Smoke run (AUTORESEARCH_SMOKE=1): a tiny model so the whole pipeline runs on a
# CPU in about a minute. constants.py shrinks MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS.
# Numbers from it are not comparable with real runs.
# -----------------------------------------------------------------------------
if SMOKE:
    DEPTH = 2
    ASPECT_RATIO = 32
    HEAD_DIM = 32
    DEVICE_BATCH_SIZE = 4
    TOTAL_BATCH_SIZE = DEVICE_BATCH_SIZE * MAX_SEQ_LEN


def model_config(vocab_size):
    """GPTConfig from the hyperparameters above."""
    width = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    heads = width // HEAD_DIM
    return GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH, n_head=heads,
                     n_kv_head=heads, n_embd=width, window_pattern=WINDOW_PATTERN)


def get_lr_multiplier(progress):
    """1 after warm-up, then linear to FINAL_LR_FRAC over the last WARMDOWN_RATIO of the budget."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1.0 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    """0.85 -> 0.95 over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def get_muon_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


# =============================================================================
# Run: setup -> training loop -> evaluation -> summary
# =============================================================================

UNTIMED_STEPS = 11   # steps 0..10 compile and warm up: not counted in the budget (part of the rules)
OPTIMIZER_MODE = "cuda_graph"   # MuonAdamW on CUDA: "cuda_graph" (no compiling), "compiled" or "eager"

# bf16 dense peak FLOP/s for MFU; first matching substring of the GPU name wins
# (the PCIe H100/H800 run at lower clocks and power than the SXM parts: 756.5, not 989.5)
GPU_PEAK_FLOPS = [
    ("GH200", 989.5e12), ("H200", 989.5e12), ("H100 PCIe", 756.5e12), ("H800 PCIe", 756.5e12),
    ("H100", 989.5e12), ("H800", 989.5e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362.05e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165.2e12), ("RTX 3090", 71e12),
]
H100_PEAK_FLOPS = 989.5e12


def gpu_peak_flops(gpu_name):
    """The bf16 dense peak FLOP/s of the GPU called `gpu_name`, or None if the table lacks it."""
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in gpu_name), None)


def main():
    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not SMOKE:
        print("train.py needs a CUDA GPU; for a CPU preflight run: AUTORESEARCH_SMOKE=1 uv run train.py")
        sys.exit(1)
    use_cuda = device.type == "cuda"
    if use_cuda:
        # All GPU work on one side stream, where MuonAdamW captures its CUDA graph (see there)
        torch.cuda.set_stream(torch.cuda.Stream())
    torch.manual_seed(42)
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)

    # -------------------------------------------------------------------------
    # Setup: identity of the run, model, optimizer, data
    # -------------------------------------------------------------------------
    attention_line = select_attention(device)
    if use_cuda:
        gpu_name = torch.cuda.get_device_name(device)
        peak_flops = gpu_peak_flops(gpu_name)
        if peak_flops is None:
            peak_note = "unknown GPU: MFU is reported against the H100 peak (989.5 TFLOP/s)"
            peak_flops = H100_PEAK_FLOPS
        else:
            peak_note = f"bf16 peak {peak_flops / 1e12:.1f} TFLOP/s"
    else:
        gpu_name, peak_flops, peak_note = f"none (CPU, {torch.get_num_threads()} threads)", None, "MFU not measured"

    tokenizer = Tokenizer.from_directory()
    list_shards("val")  # fail now, not after TIME_BUDGET seconds of training, if val_bpb cannot be measured
    config = model_config(tokenizer.get_vocab_size())
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    build_attention_masks(config.sequence_len, model.window_sizes, device)
    num_params = model.param_counts()["total"]
    flops_per_token = model.estimate_flops()

    tokens_per_micro_batch = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_micro_batch == 0, (
        f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of "
        f"DEVICE_BATCH_SIZE * MAX_SEQ_LEN ({DEVICE_BATCH_SIZE} * {MAX_SEQ_LEN})")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro_batch

    print(f"attention:   {attention_line}")
    print(f"device:      {gpu_name} ({peak_note})")
    fingerprint = data_fingerprint()
    print(f"data:        val={fingerprint['val']} tokenizer={fingerprint['tokenizer']} "
          f"train_shards={fingerprint['train_shards']}")
    print(f"constants:   MAX_SEQ_LEN={MAX_SEQ_LEN} TIME_BUDGET={TIME_BUDGET} EVAL_TOKENS={EVAL_TOKENS:,}"
          + (" (smoke)" if SMOKE else ""))
    print(f"model:       DEPTH={DEPTH} width={config.n_embd} heads={config.n_head}x{config.n_embd // config.n_head} "
          f"windows={[w for w, _ in model.window_sizes]} vocab={config.vocab_size:,} "
          f"params={num_params:,} flops/token={flops_per_token:.3e}")
    print(f"batch:       TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE:,} = DEVICE_BATCH_SIZE={DEVICE_BATCH_SIZE} "
          f"x MAX_SEQ_LEN={MAX_SEQ_LEN} x {grad_accum_steps} accumulation steps", flush=True)

    optimizer = model.setup_optimizer(unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR,
                                      matrix_lr=MATRIX_LR, scalar_lr=SCALAR_LR, weight_decay=WEIGHT_DECAY,
                                      adam_betas=ADAM_BETAS, mode=OPTIMIZER_MODE if use_cuda else "eager")
    if use_cuda:
        compile_model(model)
    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=device)
    x, y, epoch = next(train_loader)
    t_train_start = time.time()

    # -------------------------------------------------------------------------
    # Training loop: runs until TIME_BUDGET seconds of timed steps
    # -------------------------------------------------------------------------
    training_seconds = 0.0
    warmup_seconds = step0_seconds = 0.0
    timed_steps = 0
    smooth_loss = 0.0
    step = 0
    while True:
        sync()
        t0 = time.time()
        for _ in range(grad_accum_steps):
            with autocast:
                loss = model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)  # fetched while the GPU still works on this step
        progress = min(training_seconds / TIME_BUDGET, 1.0)
        lrm = get_lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = get_muon_momentum(step)
                group["weight_decay"] = get_muon_weight_decay(progress)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = train_loss.item()
        if math.isnan(train_loss) or train_loss > 100:
            print(f"\nFAIL: loss {train_loss} at step {step}")
            sys.exit(1)
        sync()
        dt = time.time() - t0
        if step >= UNTIMED_STEPS:
            training_seconds += dt
            timed_steps += 1
        else:
            warmup_seconds += dt
            step0_seconds = step0_seconds or dt

        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased_loss = smooth_loss / (1 - 0.9 ** (step + 1))
        tokens_per_second = TOTAL_BATCH_SIZE / dt
        mfu = 100 * flops_per_token * tokens_per_second / peak_flops if peak_flops else 0.0
        remaining = max(0.0, TIME_BUDGET - training_seconds)
        print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {debiased_loss:.6f} | lrm: {lrm:.2f} | "
              f"dt: {dt * 1000:.0f}ms | tok/sec: {int(tokens_per_second):,} | mfu: {mfu:.1f}% | "
              f"epoch: {epoch} | remaining: {remaining:.0f}s    ", end="", flush=True)

        # Python's GC walks every live object: a pass costs ~0.5 s mid-run. After step 0
        # everything long-lived exists; freeze it and collect by hand, rarely.
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()

        step += 1
        if step > UNTIMED_STEPS and training_seconds >= TIME_BUDGET:
            break
    print()

    # -------------------------------------------------------------------------
    # Evaluation and summary (the block after `---` is read by machines: keep it last)
    # -------------------------------------------------------------------------
    # No model.eval(): there is no dropout or batch norm, and flipping `training` would make
    # torch.compile rebuild every graph before the evaluation.
    # Training is over: free the gradients (the optimizer's CUDA graph holds on to them) so they
    # do not sit on top of the evaluation's activations.
    optimizer.release_graph()
    optimizer.zero_grad(set_to_none=True)
    t_eval = time.time()
    with autocast:
        val_bpb = evaluate_bpb(TrainingGraphEval(model) if use_cuda else model, tokenizer, DEVICE_BATCH_SIZE)
    t_end = time.time()
    print(f"overhead:    startup {t_train_start - t_start:.1f} s, warm-up steps {warmup_seconds:.1f} s "
          f"(step 0: {step0_seconds:.1f} s), evaluation {t_end - t_eval:.1f} s")

    peak_vram_mb = torch.cuda.max_memory_allocated() / 1024 / 1024 if use_cuda else 0.0
    mfu_percent = 0.0
    if peak_flops and training_seconds > 0:
        mfu_percent = 100 * flops_per_token * TOTAL_BATCH_SIZE * timed_steps / training_seconds / peak_flops
    if SMOKE:
        print("smoke run (AUTORESEARCH_SMOKE=1): tiny model and budget; these numbers are not comparable")
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_seconds:.1f}")
    print(f"total_seconds:    {t_end - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
    print(f"mfu_percent:      {mfu_percent:.2f}")
    print(f"total_tokens_M:   {step * TOTAL_BATCH_SIZE / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        # OOM can also surface wrapped, e.g. from inside torch.compile's autotuning
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            print(f"\nFAIL: CUDA out of memory. Lower DEVICE_BATCH_SIZE (now {DEVICE_BATCH_SIZE}); "
                  f"gradient accumulation keeps TOTAL_BATCH_SIZE the same.", flush=True)
            sys.exit(1)
        raise
