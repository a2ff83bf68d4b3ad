"""
Pretrain a small GPT for a fixed wall-clock budget and report val_bpb.

This is the one file the research agent edits. It reads top to bottom:
model -> optimizer -> hyperparameters -> schedules -> the run (setup, training
loop, evaluation, summary). The rules of the game come from `constants.py`;
data, tokenizer and the metric from `prepare.py`; the machinery an experiment
does not research (attention backends, fused kernels, GPU facts and fitting to
memory, guards, the run's identity) from the `autoresearch/` package. Those are
fixed: do not edit them.

    uv run train.py                         # one experiment: TIME_BUDGET s of training, then eval
    AUTORESEARCH_SMOKE=1 uv run train.py    # a tiny model on any machine (CPU included), ~1 min

Importing this file builds nothing: the run lives in `main()`.
"""

if __name__ == "__main__":  # a run: when a fork server is up, it goes on there, its libraries imported already
    from autoresearch import forkserver  # (autoresearch/forkserver.py; the run's `imports:` line says which)
    forkserver.hand_off(__file__)

import gc
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoresearch import gpu, guards, kernels, report, seeding  # gpu first: it sets the CUDA allocator's options
from autoresearch.attention import prepare_attention, select_attention
from constants import MAX_SEQ_LEN, SMOKE, SMOKE_STEPS, TIME_BUDGET, UNTIMED_STEPS
from prepare import Tokenizer, check_evaluation, evaluate_bpb, make_dataloader, verify_data
# the model's pieces, each replaceable here; on CUDA they run as fused kernels where those apply (the `fused:`
# line says which), with plain PyTorch definitions opening autoresearch/kernels.py (read those, not the kernels)
from autoresearch.attention import attention  # causal sliding-window attention
from autoresearch.kernels import rotary_norm  # rotary embedding, then RMSNorm per head (QK-norm)
from autoresearch.kernels import softcapped_cross_entropy, softcapped_logits  # lm_head, cap·tanh(logits/cap), CE
from autoresearch.kernels import relu_square_mlp  # the MLP: c_proj(ReLU(c_fc(x))²)

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
SOFTCAP = 15            # logits are soft-capped to ±15: 15·tanh(logits / 15)


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
        cos, sin = cos_sin  # (1, T, 1, D/2): rotate each head's first half against its second half
        q, k = rotary_norm(q, cos, sin), rotary_norm(k, cos, sin)  # QK-norm, after the rotation
        y = attention(q, k, v, window_size)  # (B, T, H, D)
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        # c_proj(ReLU(c_fc(x))²), from the layers' weights only. Another activation, a bias or another
        # layer: write the MLP out, e.g. self.c_proj(F.gelu(self.c_fc(x))), and it runs as plain PyTorch
        return relu_square_mlp(x, self.c_fc.weight, self.c_proj.weight)


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
    """Build on the meta device, then `to_empty(device=...)` and `init_weights(seed)`."""

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
    def init_weights(self, seed):
        """Every parameter draws from its own random stream, keyed by the seed and its name: an edit
        leaves the initial values of every parameter it does not touch as they were (common random numbers)."""
        draw = seeding.ParameterDraws(self, seed)  # draw(p, nn.init.X, ...): nn.init.X on p's own stream
        n_embd = self.config.n_embd
        s = 3**0.5 * n_embd**-0.5  # uniform(-s, s) has the std of N(0, 1/n_embd)
        draw(self.transformer.wte.weight, nn.init.normal_, mean=0.0, std=1.0)
        draw(self.lm_head.weight, nn.init.normal_, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                draw(linear.weight, nn.init.uniform_, -s, s)
            # output projections start at zero: every block starts as the identity
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate = 2·sigmoid(0) = 1
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            draw(ve.weight, nn.init.uniform_, -s, s)
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

    def setup_optimizer(self, unembedding_lr, embedding_lr, matrix_lr, scalar_lr, weight_decay, adam_betas):
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
        # trainable matrices only: anything else inside the blocks is named by the guard below
        matrices = [p for p in self.transformer.h.parameters() if p.requires_grad and p.ndim == 2]
        for shape in sorted({p.shape for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        guards.check_param_groups(self, groups)  # every trainable parameter in exactly one group, or one FAIL line
        optimizer = MuonAdamW(groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, reduction="mean"):
        """Logits (B, T, vocab) without targets; with targets the mean loss, or with
        reduction='none' the per-token losses (B*T,) in nats. Both carry gradients."""
        if targets is None:
            return softcapped_logits(norm(self.trunk(idx)), self.lm_head.weight, SOFTCAP)
        assert reduction in ("mean", "none"), f"reduction={reduction!r}: use 'mean' or 'none'"
        mean_loss, per_token = self.losses(idx, targets)
        return mean_loss if reduction == "mean" else per_token

    def losses(self, idx, targets):
        """(mean loss over real targets, per-token losses (B*T,)).

        One function, so one compiled graph (main() compiles it) serves training (the
        mean) and evaluation (per token): the evaluation compiles nothing new.
        """
        per_token = softcapped_cross_entropy(norm(self.trunk(idx)), self.lm_head.weight, targets, SOFTCAP)
        return per_token.sum() / (targets != -1).sum(), per_token

    def trunk(self, idx):
        """Embedding and blocks: the final hidden state (B, T, C), before the last norm."""
        B, T = idx.shape
        assert T <= self.rotary_seq_len, (f"sequence of {T} tokens is longer than the rotary tables "
                                          f"({self.rotary_seq_len})")
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))  # (B, T, C)
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i])
        return x


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


def normuon(update, second_moment, beta2, red_dim):
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
    second_moment.lerp_(mean_sq.to(second_moment.dtype), 1 - beta2)
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


def muon_step(grads, params, momentum_buffer, second_moment, lr, momentum, weight_decay, beta2, ns_steps, red_dim):
    """One Muon step for a stack of same-shape matrices: (N, rows, cols) each, updated in place."""
    # Nesterov: the buffer moves toward the gradient; the update looks ahead along the buffer
    momentum_buffer.lerp_(grads, 1 - momentum)
    update = grads.lerp_(momentum_buffer, momentum)
    update = polar_express(update, ns_steps)
    update = normuon(update, second_moment, beta2, red_dim)
    cautious_step(params, update.to(params.dtype), lr, weight_decay)


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """AdamW for one tensor: decoupled decay, moments by lerp, bias correction."""
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = (exp_avg_sq / bias2).sqrt() + eps
    p.add_(exp_avg / denom * (-lr / bias1))


class MuonAdamW(torch.optim.Optimizer):
    """Muon (with Polar Express, NorMuon, cautious decay) and AdamW in one optimizer.

    Every group says its kind: "adamw" (lr, betas, eps, weight_decay) or "muon" (lr,
    momentum, ns_steps, beta2, weight_decay; all params of one shape). A Muon group is
    stepped as one stacked (N, rows, cols) tensor with lr scaled by max(1, rows/cols)^0.5.
    AdamW's bias correction counts the steps of its group. The step runs eagerly, so an
    edit here takes effect as written: measured on an H100, a CUDA graph or torch.compile
    of the step trains no faster inside the loop (the launches overlap the backward's tail).
    """

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            assert group.get("kind") in ("adamw", "muon"), "every param group needs kind='adamw' or 'muon'"
            if group["kind"] == "muon":
                assert len({p.shape for p in group["params"]}) == 1, "a muon group holds one shape"
                assert group["params"][0].ndim == 2, "muon is for matrices"
            group.setdefault("step", 0)
            # State up front (the zeros a first step would make): step 0 then holds all the memory
            # the run ever will, which is what fitting the micro-batch to memory measures.
            for p in group["params"] if group["kind"] == "adamw" else group["params"][:1]:
                self._state(group, p)

    def _state(self, group, p):
        """The state of an AdamW param, or of a Muon group's stack (kept on its first param)."""
        state = self.state[p]
        if not state and group["kind"] == "adamw":
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        elif not state:
            n, (rows, cols) = len(group["params"]), p.shape
            state["momentum_buffer"] = torch.zeros(n, rows, cols, dtype=p.dtype, device=p.device)
            # NorMuon's statistics: per row when the matrix is tall or square, per column when wide
            state["second_moment"] = torch.zeros((n, rows, 1) if rows >= cols else (n, 1, cols), dtype=p.dtype,
                                                 device=p.device)
        return state

    def _step_adamw(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._state(group, p)
            adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], group["step"], group["lr"], beta1, beta2,
                       group["eps"], group["weight_decay"])

    def _step_muon(self, group):
        params = group["params"]
        if any(p.grad is None for p in params):
            return
        rows, cols = params[0].shape
        state = self._state(group, params[0])
        red_dim = -1 if rows >= cols else -2
        stacked_params = torch.stack(params)
        muon_step(torch.stack([p.grad for p in params]), stacked_params, state["momentum_buffer"],
                  state["second_moment"], group["lr"] * max(1.0, rows / cols) ** 0.5, group["momentum"],
                  group["weight_decay"], group["beta2"], group["ns_steps"], red_dim)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] += 1
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)


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
DEVICE_BATCH_SIZE = 128         # rows per forward/backward at most (lowered to fit the GPU); accumulation does the rest
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
# Smoke run (AUTORESEARCH_SMOKE=1): a tiny model for a fixed number of steps, so the
# whole pipeline runs on a CPU in a minute and gives the same numbers on any machine.
# constants.py shrinks MAX_SEQ_LEN and EVAL_TOKENS; the block below replaces a few settings
# (and says so): it tests the pipeline, not your edit, and its numbers are not comparable.
# It trains SMOKE_STEPS steps (constants.py), not TIME_BUDGET seconds.
# -----------------------------------------------------------------------------
if SMOKE:
    REPLACED = dict(DEPTH=DEPTH, ASPECT_RATIO=ASPECT_RATIO, HEAD_DIM=HEAD_DIM, DEVICE_BATCH_SIZE=DEVICE_BATCH_SIZE,
                    TOTAL_BATCH_SIZE=TOTAL_BATCH_SIZE)  # the settings the next two lines replace
    DEPTH, ASPECT_RATIO, HEAD_DIM = 2, 32, 32
    DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 4, 4 * MAX_SEQ_LEN
    SMOKE_LINE = report.smoke_line(REPLACED, globals(), SMOKE_STEPS)  # "DEPTH 8 -> 2, ...", for the log


def model_config(vocab_size):
    """GPTConfig from the hyperparameters above."""
    width = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    heads = width // HEAD_DIM
    return GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH, n_head=heads,
                     n_kv_head=heads, n_embd=width, window_pattern=WINDOW_PATTERN)


def training_progress(step, training_seconds):
    """How much of the run is done, 0..1: the share of TIME_BUDGET trained (a smoke run counts steps)."""
    if SMOKE:
        return min(step / SMOKE_STEPS, 1.0)
    return min(training_seconds / TIME_BUDGET, 1.0)


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
# The run: setup -> step 0 -> training loop -> evaluation -> summary
# =============================================================================

def build_model(config, device, seed):
    """The model, initialised from `seed`, and its optimizer."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(seed)
    optimizer = model.setup_optimizer(unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR,
                                      matrix_lr=MATRIX_LR, scalar_lr=SCALAR_LR, weight_decay=WEIGHT_DECAY,
                                      adam_betas=ADAM_BETAS)
    return model, optimizer


def train_step(model, optimizer, batches, grad_accum_steps, step, progress, autocast):
    """One optimizer step over grad_accum_steps micro-batches. Returns (last loss, epoch)."""
    for _ in range(grad_accum_steps):
        x, y, epoch = next(batches)
        with autocast:
            loss = model(x, y)
        (loss / grad_accum_steps).backward()
    lrm = get_lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = get_muon_momentum(step)
            group["weight_decay"] = get_muon_weight_decay(progress)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), epoch


def main():
    t_start = time.time()
    seed = seeding.seed_from_env()  # AUTORESEARCH_SEED (default 42): one error line for a bad value, before the work
    torch.manual_seed(seed)  # any randomness outside the initial weights, which draw through `seed` themselves
    device = gpu.pick_device(SMOKE)  # CUDA; a CPU only in a smoke run
    use_cuda = device.type == "cuda"
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)

    # -------------------------------------------------------------------------
    # Setup: check data and harness, say what runs, then step 0 (it fits itself to memory)
    # -------------------------------------------------------------------------
    fingerprints = verify_data()  # data and fixed files, by content: one line and exit 1 if anything changed
    tokenizer = Tokenizer.from_directory()
    guards.check_model_settings(DEPTH, ASPECT_RATIO, HEAD_DIM)  # positive sizes, or FAIL
    config = model_config(tokenizer.get_vocab_size())
    rows_per_step = TOTAL_BATCH_SIZE // MAX_SEQ_LEN
    guards.check_batch_size(TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE, MAX_SEQ_LEN)  # whole micro-batches, or FAIL
    gpu_name, peak_flops, peak_note = gpu.describe_device(device)
    kernels.prepare(device)  # which fused kernels this GPU takes, decided before anything compiles
    with torch.device("meta"):
        shape = GPT(config)  # sizes only, nothing allocated
    num_params, flops_per_token = shape.param_counts()["total"], shape.estimate_flops()
    report.print_identity([
        ("attention", select_attention(device)),
        ("device", f"{gpu_name} ({peak_note})"),
        ("data", report.fingerprint_line(fingerprints)),
        ("constants", report.constants_line()),
        *([("smoke", SMOKE_LINE)] if SMOKE else []),
        ("model", f"DEPTH={DEPTH} width={config.n_embd} heads={config.n_head}x{config.n_embd // config.n_head} "
                  f"windows={[w for w, _ in shape.window_sizes]} vocab={config.vocab_size:,} "
                  f"params={num_params:,} flops/token={flops_per_token:.3e}"),
    ])

    init_fingerprint = None  # the weights first_step starts from, before their first update

    def first_step(micro_batch):
        """Build everything at this micro-batch and run step 0: it allocates all the run holds,
        and it runs the evaluation's path, so a crash there shows now, not after the budget."""
        nonlocal init_fingerprint
        t0 = time.time()
        model, optimizer = build_model(config, device, seed)
        init_fingerprint = seeding.weights_fingerprint(model)
        prepare_attention(config, model.window_sizes, device)  # flex block masks or the FA4 probe, before compile
        if use_cuda:
            # one compiled graph for the loss: training takes its mean, evaluation its per-token values
            model.losses = torch.compile(model.losses, dynamic=False)
        # the harness's loader: it counts the rows each step draws, and when (the budget is the harness's)
        batches = make_dataloader(tokenizer, micro_batch, MAX_SEQ_LEN, "train", device=device,
                                  total_batch_size=TOTAL_BATCH_SIZE)
        with autocast:  # before any training: the weights must be the code's, and the evaluation's path runs now
            check_evaluation(gpu.evaluation_model(model), tokenizer, micro_batch)
        gradients = guards.track_gradients(model)
        loss, epoch = train_step(model, optimizer, batches, rows_per_step // micro_batch, 0, 0.0, autocast)
        gradients.check()  # a trainable parameter that got no gradient would silently never train
        loss = loss.item()
        sync()
        return gpu.FirstStep(model, optimizer, batches, loss, time.time() - t0)

    startup_seconds = time.time() - t_start
    step0 = gpu.fit_micro_batch(first_step, DEVICE_BATCH_SIZE, rows_per_step)  # step 0, at a micro-batch that fits
    model, optimizer, batches, micro_batch = step0.model, step0.optimizer, step0.batches, step0.micro_batch
    grad_accum_steps = rows_per_step // micro_batch
    data_fingerprint = seeding.data_fingerprint(fingerprints)
    report.print_identity([
        ("fused", kernels.fused_line(device)),  # after step 0: the pieces that ran as kernels
        ("batch", report.batch_line(TOTAL_BATCH_SIZE, micro_batch, grad_accum_steps, step0.fit_note)),
        ("seed", f"{seed} init={init_fingerprint} data={data_fingerprint} (equal seed and data: paired runs)"),
    ])
    guards.check_loss(step0.loss, 0)  # a diverged run (NaN or above 100) prints FAIL and exits 1

    # Python's GC walks every live object: a pass costs ~0.5 s mid-run. After step 0
    # everything long-lived exists; freeze it and collect by hand, rarely.
    gc.collect()
    gc.freeze()
    gc.disable()

    # -------------------------------------------------------------------------
    # Training loop: steps 1, 2, ... until TIME_BUDGET seconds of timed steps
    # -------------------------------------------------------------------------
    training_seconds, warmup_seconds, timed_steps, smooth_loss = 0.0, step0.seconds, 0, 0.1 * step0.loss
    step = 1
    while step <= UNTIMED_STEPS or training_progress(step, training_seconds) < 1.0:
        sync()
        t0 = time.time()
        progress = training_progress(step, training_seconds)
        train_loss, epoch = train_step(model, optimizer, batches, grad_accum_steps, step, progress, autocast)
        if step == UNTIMED_STEPS - 1:  # again, now that the model has learned a little: a leak of future tokens shows
            with autocast:
                check_evaluation(gpu.evaluation_model(model), tokenizer, micro_batch)
        train_loss = train_loss.item()  # waits for the step
        guards.check_loss(train_loss, step)
        dt = time.time() - t0
        if step >= UNTIMED_STEPS:
            training_seconds += dt
            timed_steps += 1
        else:
            warmup_seconds += dt

        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased_loss = smooth_loss / (1 - 0.9 ** (step + 1))
        tokens_per_second = TOTAL_BATCH_SIZE / dt
        mfu = 100 * flops_per_token * tokens_per_second / peak_flops if peak_flops else 0.0
        remaining = max(0.0, TIME_BUDGET - training_seconds)
        print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {debiased_loss:.6f} | "
              f"lrm: {get_lr_multiplier(progress):.2f} | dt: {dt * 1000:.0f}ms | tok/sec: {int(tokens_per_second):,} | "
              f"mfu: {mfu:.1f}% | epoch: {epoch} | remaining: {remaining:.0f}s    ", end="", flush=True)
        if step % 5000 == 0:
            gc.collect()
        step += 1
    print()

    # -------------------------------------------------------------------------
    # Evaluation and summary (the block after `---` is read by machines: keep it last)
    # -------------------------------------------------------------------------
    # No model.eval(): there is no dropout or batch norm, and flipping `training` would make
    # torch.compile rebuild every graph before the evaluation.
    optimizer.zero_grad(set_to_none=True)
    t_eval = time.time()
    with autocast:
        val_bpb = evaluate_bpb(gpu.evaluation_model(model), tokenizer, micro_batch)
    t_end = time.time()
    report.print_overhead(startup=startup_seconds, fitting=step0.fit_seconds, warmup=warmup_seconds,
                          step0=step0.seconds, evaluation=t_end - t_eval)
    mfu_percent = (100 * flops_per_token * TOTAL_BATCH_SIZE * timed_steps / training_seconds / peak_flops
                   if peak_flops and training_seconds > 0 else 0.0)
    report.print_summary([  # the last thing printed: `key: value` lines after `---`, read by machines
        ("val_bpb", f"{val_bpb:.6f}"), ("training_seconds", f"{training_seconds:.1f}"),
        ("total_seconds", f"{t_end - t_start:.1f}"), ("peak_vram_mb", f"{gpu.peak_memory_mib():.1f}"),
        ("mfu_percent", f"{mfu_percent:.2f}"), ("total_tokens_M", f"{step * TOTAL_BATCH_SIZE / 1e6:.1f}"),
        ("num_steps", step), ("num_params_M", f"{num_params / 1e6:.1f}"), ("depth", DEPTH),
        ("seed", seed), ("init", init_fingerprint), ("data", data_fingerprint),
    ])


if __name__ == "__main__":
    with gpu.out_of_memory_exit():  # memory full or Ctrl-C: one FAIL line, not a traceback
        main()
