"""Fused pieces vs compiled plain on the GPU: errors, time (fwd+bwd), memory. python3 fbench.py OUT"""
import sys, json, torch
sys.path.insert(0, ".")
import runtime
dev = "cuda"
out = {}
def timeit(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]
torch.manual_seed(0)
print(runtime.fused_line("cuda"))
# ---- rotary_norm at train.py's shapes
B, T, H, D = 128, 2048, 4, 128
x = (torch.randn(B, T, H, D, device=dev) * 0.5).bfloat16().requires_grad_()
ang = torch.arange(T, device=dev)[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2, device=dev) / D))[None]
cos, sin = ang.cos().bfloat16()[None, :, None], ang.sin().bfloat16()[None, :, None]
g = torch.randn_like(x)
plain_c = torch.compile(runtime.rotary_norm_plain, dynamic=False)
def ref64():
    x64 = x.detach().double().requires_grad_()
    y = runtime.rotary_norm_plain(x64, cos.double(), sin.double()); (y * g.double()).sum().backward()
    return y, x64.grad
y64, gx64 = ref64()
def err(f):
    x.grad = None
    y = f(x, cos, sin); (y * g).sum().backward()
    return dict(dtype=str(y.dtype), fwd=(y.double() - y64).abs().max().item(), bwd=(x.grad.double() - gx64).abs().max().item())
with torch.autocast("cuda", torch.bfloat16):
    out["rotary_err_fused"] = err(runtime.rotary_norm)
    out["rotary_err_compiled_plain"] = err(plain_c)
print(out)
def step(f):
    def run():
        x.grad = None
        y = f(x, cos, sin); y.backward(g)
    return run
out["rotary_ms_compiled_plain"] = timeit(step(plain_c))
for rows in (4, 8, 16, 32, 64):
    runtime.ROTARY_ROWS = rows
    out[f"rotary_ms_fused_rows{rows}"] = timeit(step(runtime.rotary_norm))
runtime.ROTARY_ROWS = 16
print(out)
del x, g, y64, gx64
# ---- cross-entropy at train.py's shapes (one micro-batch of 128 x 2048)
N, C, V = 128 * 2048, 512, 8192
torch.manual_seed(1)
xc = torch.nn.functional.rms_norm(torch.randn(N, C, device=dev), (C,)).bfloat16().requires_grad_()
w = (torch.randn(V, C, device=dev) * 0.05).requires_grad_()
tg = torch.randint(0, V, (N,), device=dev); tg[:100] = -1
ce_c = torch.compile(runtime.softcapped_cross_entropy_plain, dynamic=False)
def ce_step(f):
    def run():
        xc.grad = None; w.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            l = f(xc, w, tg, 15.0)
        (l.sum() / (tg != -1).sum()).backward()
        return l
    return run
# errors against float64 on a slice
n = 4096
x64, w64 = xc[:n].detach().double().requires_grad_(), w.detach().double().requires_grad_()
l64 = runtime.softcapped_cross_entropy_plain(x64, w64, tg[:n], 15.0); (l64.sum() / (tg[:n] != -1).sum()).backward()
for name, f in (("fused", runtime.softcapped_cross_entropy), ("compiled_plain", ce_c)):
    xs = xc[:n].detach().requires_grad_(); ws = w.detach().clone().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16):
        l = f(xs, ws, tg[:n], 15.0)
    (l.sum() / (tg[:n] != -1).sum()).backward()
    out[f"ce_err_{name}"] = dict(loss=(l.double() - l64).abs().max().item(), dx=(xs.grad.double() - x64.grad).abs().max().item(),
                                 dw=(ws.grad.double() - w64.grad).abs().max().item(), dx_scale=x64.grad.abs().max().item(),
                                 dw_scale=w64.grad.abs().max().item())
print(out)
for name, f in (("compiled_plain", ce_c), ("fused", runtime.softcapped_cross_entropy)):
    run = ce_step(f)
    run(); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    run(); torch.cuda.synchronize()
    out[f"ce_peak_extra_mib_{name}"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out[f"ce_ms_{name}"] = timeit(run, 10)
for chunk in (8192, 4096, 2048, 1024):
    for warps in (4, 8, 16):
        runtime.CE_CHUNK, runtime.CE_WARPS = chunk, warps
        out[f"ce_ms_fused_c{chunk}_w{warps}"] = timeit(ce_step(runtime.softcapped_cross_entropy), 10)
runtime.CE_CHUNK, runtime.CE_WARPS = 8192, 8
xb, wb = xc.detach(), w.detach().bfloat16()
out["ce_ms_matmul_only"] = timeit(lambda: xb @ wb.t(), 10)
# the forward alone (evaluation-like, no grad)
with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
    out["ce_ms_nograd_fused"] = timeit(lambda: runtime.softcapped_cross_entropy(xc, w, tg, 15.0), 10)
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[1], "w"), indent=1)
