"""
milora.py: MiLoRA, PiSSA, LoRA and MiSS adapters for any PyTorch model, in one file.

MiLoRA (Wang et al., NAACL 2025) splits each target weight by SVD, W = U Σ Vᵀ, keeps the principal part
frozen and trains only the r *smallest* singular triplets, B = U_m √Σ_m and A = √Σ_m V_mᵀ. At step 0 the model
is unchanged; learning starts in the subspace the pretrained weight uses least, so it forgets less. PiSSA is the
same with the r *largest* triplets, LoRA starts from a random A and B = 0, and MiSS trains one zero-initialised
r×out matrix shared by the input's r-sized shards.

Read top to bottom, small to large:
  1. svd_split            the minor/principal split, as accurate as a full SVD and faster
  2. LoraLinear, MissLinear  the two adapter layers
  3. apply_adapters, merge_adapters, disable_adapters, adapter_state_dict   model patching
  4. save_adapter, load_adapter   PEFT-format adapters that apply to the untouched base model
  5. subspace_similarity, amplification_factor, delta_analysis   the paper's analyses (section 5, appendix A.1)
  6. __main__            a one-minute demo:  python milora.py

Needs torch, safetensors and tqdm; nothing else.
"""
import contextlib
import copy
import json
import math
import numbers
import os
import re
import signal
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

METHODS = ("lora", "pissa", "milora", "miss", "middle", "random")  # the last two: the paper's ablations
PARTS = {"pissa": "principal", "milora": "minor", "middle": "middle", "random": "random"}  # SVD init -> triplets
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # MiLoRA paper, Table 10
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# -----------------------------------------------------------------------------
# 1. SVD splitting


def _decomposition_device(weight):
    """Decompose on a GPU when there is one, even for a CPU model: one layer at a time travels there and back."""
    if weight.is_cuda or not torch.cuda.is_available():
        return weight.device
    return torch.device("cuda", torch.cuda.current_device())


def _residual(W, B, A, scale):
    """W − scale·B@A in one fused kernel: svd_split's residual. (apply_adapters writes it into the weight in place,
    with LoraLinear.subtract_init_, the same way at init and on resume, so the two agree to the bit.)"""
    return torch.addmm(W, B, A, alpha=-scale)


EPS = torch.finfo(torch.float32).eps
MARGIN = 16  # Gram eigenvectors taken beyond each end of the chosen ones, so that Rayleigh–Ritz settles near-ties
MAX_ANGLE = 1e-3  # accept a split when a residual bound puts every chosen vector within this angle (rad)
MAX_ITERS = 8  # inverse-iteration steps before giving up and taking a full SVD


def _triplet_indices(m, r, part, generator=None):
    """Which r of the m singular triplets a part takes, as indices into σ sorted descending (torch.linalg.svd's order)."""
    if part == "principal":
        return torch.arange(r)
    if part == "minor":
        return torch.arange(m - r, m)
    if part == "middle":  # the official code's "mid" ablation
        return torch.arange((m - r) // 2, (m - r) // 2 + r)
    return torch.randperm(m, generator=generator)[:r].sort().values  # "random": the paper's Table 6 ablation


def _rayleigh_ritz(Wm, X):
    """The exact SVD of Wm (m×n) restricted to span(X), X m×k orthonormal: U (m×k), S (k, descending), Vh (k×n).

    The singular values come from Wm itself, not from σ² (which squares tiny σ away). Via QR of XᵀWm's transpose the
    SVD is only k×k, ~4× faster than LAPACK's direct route at these shapes."""
    # In float64: a float32 product would put ~√m·eps·σmax of rounding into every σ, 3× a float32 SVD's error.
    X = torch.linalg.qr(X.double()).Q  # eigh's vectors are orthonormal only to ~√m·eps, which would scale σ as much
    Qn, R = torch.linalg.qr((X.T @ Wm.double()).T)  # (n×k) = (n×k)(k×k), so XᵀWm = Rᵀ Qnᵀ (Xᵀ·Wm: the fast layout)
    Ur, S, Vrh = torch.linalg.svd(R.T)  # k×k each
    return (X @ Ur).float(), S.float(), (Vrh @ Qn.T).float()


def _max_angle(Wm, U, S, Vh, outside):
    """Bound on the angle between each Ritz vector and the true singular vector (Wedin): ‖Wm v − σu‖ over the distance
    from σ to the nearest singular value outside the block (`outside`, from the Gram: accurate enough for a gap)."""
    residual = (Wm @ Vh.T.to(Wm.dtype) - U.to(Wm.dtype) * S.to(Wm.dtype)).norm(dim=0)  # k
    gap = (S.to(Wm.dtype)[:, None] - outside[None, :]).abs().min(1).values if len(outside) else torch.inf
    return (residual / gap).max().item()


def _inverse_iteration(Wm, X, r, smax, outside):
    """Refine the r smallest triplets by inverse subspace iteration with R from Wmᵀ = Q_w R, so W Wᵀ = RᵀR.

    Solves with R and Rᵀ never form W Wᵀ, so they don't square the condition number: R is as accurate as a float32
    SVD (backward stable), and float64 solves let one step amplify the smallest direction 1/σ² times without drowning
    the others. V comes as Q_w·z from the SVD of Rᵀ, never as Wᵀu/σ (which is noise when σ is tiny)."""
    m, n = Wm.shape
    a, tau = torch.geqrf(Wm.T)  # n×m: R in its upper triangle, Q_w as Householder reflectors below
    a, tau = a.double(), tau.double()
    R = a[:m].triu()  # m×m
    pivots = R.diagonal()  # a zero σ gives a zero pivot: lift it to float32's noise level, as a float32 SVD would see
    pivots.copy_(torch.where(pivots.abs() < EPS * smax, EPS * smax * torch.where(pivots < 0, -1.0, 1.0), pivots))
    X = X.double()
    for _ in range(MAX_ITERS):
        X = torch.linalg.qr(torch.linalg.solve_triangular(R.T, X, upper=False)).Q  # (Rᵀ)⁻¹X, then R⁻¹ of that:
        X = torch.linalg.qr(torch.linalg.solve_triangular(R, X, upper=True)).Q  # one step with (W Wᵀ)⁻¹
        # R = Z Σ Uᵀ, so R X = Z Σ (UᵀX): its SVD gives the Ritz triplets. Via the k×k eigh of (RX)ᵀRX: squaring
        # in float64 still resolves σ down to ~1e-8 of the block's largest, and is ~3× cheaper than svd(R X).
        RX = R @ X
        lam, C = torch.linalg.eigh(RX.T @ RX)  # ascending
        C, S = C[:, :r].flip(1), lam[:r].flip(0).clamp_min(0).sqrt()  # the r smallest, descending as idx
        U, Z = X @ C, RX @ C / S  # S > 0: the pivots were lifted, so R is invertible
        Vh = torch.ormqr(a, tau, F.pad(Z, (0, 0, 0, n - m))).T  # V = Q_w [Z; 0], r×n
        if _max_angle(Wm, U, S, Vh, outside) <= MAX_ANGLE:
            return U.float(), S.float(), Vh.float()
    return None


def _singular_triplets(Wm, idx):
    """U (m×r), S (r), Vh (r×n): the singular triplets idx of Wm (m ≤ n), as accurate as a float32 SVD's, checked.

    The eigenvectors of the Gram matrix Wm Wmᵀ are Wm's singular vectors, and eigh is ~2–3× cheaper than svd. But in
    float32 the Gram only resolves σ above ~3e-4·σmax: below that its eigenvectors are a rotated mix (real q_proj and
    o_proj weights reach 1e-6·σmax). So every split is checked by its residuals, refined by inverse iteration where
    the check fails on the minor side, and a full SVD is the last resort (also for a failing middle or random pick).
    Singular values below float32's resolution (2·eps·σmax) come back as exactly 0."""
    m = Wm.shape[0]
    if int(idx.max()) - int(idx.min()) >= m // 2:  # scattered picks ("random"): the block would be most of the
        U, S, Vh = torch.linalg.svd(Wm, full_matrices=False)  # spectrum, and the Gram route would save nothing
        return U[:, idx], torch.where(S[idx] > 2 * EPS * S[0], S[idx], 0), Vh[idx]
    h = m // 2  # eigh reads only the lower triangle of Wm Wmᵀ: skip its top-right block, a quarter of the work
    gram = torch.cat([F.pad(Wm[:h] @ Wm[:h].T, (0, m - h)), Wm[h:] @ Wm.T])  # m×m
    lam, Q = torch.linalg.eigh(gram)  # ascending
    sigma, Q = lam.flip(0).clamp_min(0).sqrt(), Q.flip(1)  # σ estimates, descending as idx
    lo, hi = max(0, int(idx.min()) - MARGIN), min(m, int(idx.max()) + 1 + MARGIN)  # the block: chosen ± MARGIN
    outside = torch.cat([sigma[lo - 1:lo] if lo else sigma[:0], sigma[hi:hi + 1]])  # its nearest neighbours
    minor = int(idx[0]) == m - len(idx)  # the r smallest: inverse iteration converges to exactly these
    triplets = None
    if not (minor and sigma[idx].min() < 1e-2 * sigma[0]):  # else the Gram can't resolve them: go straight on
        U, S, Vh = _rayleigh_ritz(Wm, Q[:, lo:hi])
        pick = idx.to(U.device) - lo
        if _max_angle(Wm, U[:, pick], S[pick], Vh[pick], outside) <= MAX_ANGLE:
            triplets = U[:, pick], S[pick], Vh[pick]
    if triplets is None and minor:
        triplets = _inverse_iteration(Wm, Q[:, lo:], len(idx), sigma[0].item(), outside)
    if triplets is None:  # last resort
        U, S, Vh = torch.linalg.svd(Wm, full_matrices=False)
        triplets = U[:, idx], S[idx], Vh[idx]
    U, S, Vh = triplets
    return U, torch.where(S > 2 * EPS * sigma[0], S, 0), Vh


@torch.no_grad()
def _svd_factors(weight, r, part="minor", scale=1.0, generator=None):
    """svd_split without the residual: B (out×r) and A (r×in) on the decomposition device."""
    if part not in PARTS.values():
        raise ValueError(f"part must be one of {', '.join(PARTS.values())}, got {part!r}")
    W = weight.detach().to(_decomposition_device(weight), torch.float32)  # float32 whatever the weight's dtype
    m = min(W.shape)
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or Inf: it has no SVD to split")
    if not 1 <= r < m:
        raise ValueError(f"r must satisfy 1 <= r < min(out, in) = {m} for a weight of shape {tuple(W.shape)}, got {r}")
    idx = _triplet_indices(m, r, part, generator)
    tall = W.shape[0] > W.shape[1]
    Wm = W.T if tall else W  # m×n, m ≤ n: the SVD of Wᵀ is the SVD of W with U and V swapped
    # Scale by a power of two (exact) so that the Gram can't overflow or underflow, even at 1e±18.
    top = W.abs().max()  # on W, not its transpose Wm: 3× faster on the contiguous layout
    if top == 0:
        return W.new_zeros(W.shape[0], r), W.new_zeros(r, W.shape[1])
    scaled = not 2 ** -16 <= top <= 2 ** 16  # e.g. weights ×1e±18; ordinary ones skip the copy
    step = torch.exp2(-torch.floor(torch.log2(top))) if scaled else 1.0
    U, S, Vh = _singular_triplets(Wm * step if scaled else Wm, idx)
    S = S / step
    if tall:
        U, Vh = Vh.T, U.T  # out×r, r×in
    # An eigensolver may return any sign per vector; fix it (largest |entry| of each u positive, as sklearn's
    # svd_flip) so every run, device and rank gets the same factors.
    sign = U.gather(0, U.abs().argmax(0, keepdim=True)).sign()  # 1×r
    U, Vh = U * sign, Vh * sign.T
    sqrt_s = (S / scale).sqrt()  # r
    return U * sqrt_s, sqrt_s[:, None] * Vh  # B out×r, A r×in


@torch.no_grad()
def svd_split(weight, r, part="minor", scale=1.0, generator=None):
    """Split W (out×in) into B (out×r), A (r×in) and residual = W − scale·B@A, all float32.

    B = U_r·√(S_r/scale) and A = √(S_r/scale)·V_rᵀ are true singular factors of W for r of its triplets:
    part="minor" takes the r smallest (MiLoRA), "principal" the r largest (PiSSA), "middle" the r from index
    (m − r) // 2 and "random" r random ones (the paper's ablations). Dividing S by scale = α/r, as PEFT does, keeps
    W = residual + scale·B@A for any α.

    Accuracy contract: each triplet is as accurate as float32 torch.linalg.svd's (σ to ~2e-7·σmax, vectors checked
    within 1e-3 rad by their residual on W) at any condition number, scale and dtype, with σ below float32's
    resolution (2·eps·σmax) returned as exactly 0.
    """
    B, A = _svd_factors(weight, r, part, scale, generator)
    W = weight.detach().to(B.device, torch.float32)
    return B, A, _residual(W, B, A, scale)


# -----------------------------------------------------------------------------
# 2. Adapter layers


def _add_matmul_(y, h, M, alpha=1.0):
    """y += alpha·h@M, in place and fused into the GEMM when dtypes allow, else computed in h's dtype."""
    if y.dtype == h.dtype:  # under autocast h is bf16 while M (an adapter) stays float32: addmm_ must get one dtype
        return y.addmm_(h, M.to(h.dtype), alpha=alpha)
    return y.add_((alpha * (h @ M)).to(y.dtype))


class LoraLinear(nn.Module):
    """y = W x + (α/r)·B A dropout(x); W is frozen, and for the SVD inits it is the residual W₀ − (α/r)·B₀A₀."""

    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0, init="lora"):
        super().__init__()
        if init != "lora" and init not in PARTS:
            raise ValueError(f"init must be 'lora' or one of {', '.join(PARTS)}, got {init!r}")
        self.base_layer, self.r, self.alpha, self.scaling, self.init = base, r, alpha, alpha / r, init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        out_f, in_f = base.weight.shape
        # Adapters train in float32 whatever the base dtype, as PEFT does by default.
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, in_f, **kw))  # r×in
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, **kw))  # out×r
        self.disabled = False

    @torch.no_grad()
    def initialize(self, state=None, generator=None):
        """Fill A and B: from `state` (an adapter_state_dict slice) if given, else by the layer's init. The base
        weight is not touched yet: subtract_init_ does that, once every layer of the model has initialised."""
        W = self.base_layer.weight
        if self.init == "lora":
            if state is None:  # A as nn.Linear's default init (as PEFT and loralib), B = 0
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                self.lora_A.copy_(state["lora_A"]), self.lora_B.copy_(state["lora_B"])
            return
        if state is None:
            B0, A0 = _svd_factors(W, self.r, PARTS[self.init], self.scaling, generator)
        else:  # resume: the saved factors, so the residual is rebuilt bit for bit without a new SVD
            B0, A0 = state["lora_B0"], state["lora_A0"]
        # B0, A0 are kept so that save_adapter can express the trained ΔW = BA − B0A0 for the untouched base.
        self.register_buffer("lora_B0", B0.to(W.device, torch.float32))
        self.register_buffer("lora_A0", A0.to(W.device, torch.float32))
        self.lora_B.copy_(B0 if state is None else state["lora_B"])
        self.lora_A.copy_(A0 if state is None else state["lora_A"])

    @torch.no_grad()
    def subtract_init_(self, buffer):
        """W ← W − (α/r)·B₀A₀ in place, in W's own dtype, through a float32 `buffer` of at least W's size: this
        allocates nothing, so once apply_adapters starts changing the model it can't fail half-way."""
        W = self.base_layer.weight
        tmp = buffer[:W.numel()].view(W.shape).copy_(W)
        W.copy_(tmp.addmm_(self.lora_B0, self.lora_A0, alpha=-self.scaling))

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (tokens, in): 2-D, so that the adapter can add into y in place
        y = self.base_layer(x)  # (tokens, out); nn.Linear keeps no output for backward, so y may change
        if not self.disabled:
            h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (tokens, r)
            _add_matmul_(y, h, self.lora_B.T, self.scaling)
        return y.view(*lead, -1)

    def delta_weight(self, dtype=torch.float32):
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))  # out×in


class MissLinear(nn.Module):
    """y = W x + Dᵀ·Σₖ xₖ, where xₖ are the input's r-sized shards (zero-padded) and D (r×out) starts at 0."""

    def __init__(self, base: nn.Linear, r, dropout=0.0):
        super().__init__()
        self.base_layer, self.r = base, r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        out_f = base.weight.shape[0]
        self.miss_block = nn.Parameter(torch.zeros(r, out_f, device=base.weight.device, dtype=torch.float32))
        self.disabled = False

    @torch.no_grad()
    def initialize(self, state=None, generator=None):
        if state is not None:
            self.miss_block.copy_(state["miss_block"])

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (tokens, in), as in LoraLinear
        y = self.base_layer(x)  # (tokens, out)
        if not self.disabled:
            x = self.dropout(x.to(self.miss_block.dtype))
            pad = -x.shape[-1] % self.r  # like PEFT: pad in_features up to a multiple of r
            if pad:
                x = F.pad(x, (0, pad))
            shard_sum = x.view(len(x), -1, self.r).sum(1)  # (tokens, in/r, r) -> (tokens, r)
            _add_matmul_(y, shard_sum, self.miss_block)
        return y.view(*lead, -1)

    def delta_weight(self, dtype=torch.float32):
        # Column j of the input is summed into shard slot j mod r, so ΔW[o, j] = D[j mod r, o].
        in_f = self.base_layer.weight.shape[1]
        return self.miss_block.T.to(dtype).repeat(1, -(-in_f // self.r))[:, :in_f]  # out×in


ADAPTER_LAYERS = (LoraLinear, MissLinear)
ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_A0", "lora_B0", "miss_block")

# -----------------------------------------------------------------------------
# 3. Model patching


def _matches(name, targets):
    """PEFT's rule: a string is a regex on the full module name, a list matches names or name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def adapter_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)]


def _check_state(targets, method, r, state):
    """Name the first key or shape in `state` that doesn't fit the adapters these targets will get."""
    want = {}
    for name, mod in targets:
        out_f, in_f = mod.weight.shape
        shapes = {"miss_block": (r, out_f)} if method == "miss" else {"lora_A": (r, in_f), "lora_B": (out_f, r)}
        if method in PARTS:  # the SVD inits also restore their factors, to rebuild the residual
            shapes.update(lora_A0=(r, in_f), lora_B0=(out_f, r))
        want.update({f"{name}.{k}": s for k, s in shapes.items()})
    for key, shape in want.items():
        if key not in state:
            raise ValueError(f"adapter has no tensor for {key} (the model expects one of shape {tuple(shape)})")
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"{key}: adapter shape {tuple(state[key].shape)} does not fit the model's "
                             f"{tuple(shape)}")
        if not state[key].is_floating_point() or not torch.isfinite(state[key]).all():
            raise ValueError(f"{key}: adapter tensor is not finite floating point (dtype {state[key].dtype}, or "
                             f"it holds NaN or Inf)")
    for key in state:
        if key not in want:
            raise ValueError(f"adapter tensor {key} matches no target module of this model")


def _check_args(method, r, alpha, dropout, target_modules):
    """-> alpha, defaulted; or a clear error for the first argument that is out of range."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if method == "miss" and alpha is not None:
        raise ValueError("MiSS has no alpha; leave alpha=None")
    real = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool)
    if alpha is not None and not (real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number (the adapter is scaled by alpha/r), got {alpha!r}")
    if not (real(dropout) and 0 <= dropout < 1):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not target_modules or not (isinstance(target_modules, str) or
                                  all(isinstance(t, str) and t for t in target_modules)):
        raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    return alpha if alpha is not None else (2 * r if method == "lora" else r)


def _find_targets(model, method, r, target_modules, init_state):
    """Every check runs here, before anything changes, so a bad call leaves the model exactly as it was."""
    if adapter_layers(model):
        raise ValueError("model already has adapters: merge_adapters() it first, or start from a fresh model")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [(n, m) for n, m in linears.items() if _matches(n, target_modules)]
    if not targets:
        have = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"target_modules {target_modules!r} match no nn.Linear in the model; its linear layers "
                         f"are named: {', '.join(have) or '(none)'}")
    owners = {}  # storage -> every parameter name that uses it: tied weights share one
    for n, prm in model.named_parameters(remove_duplicate=False):
        owners.setdefault(prm.data_ptr(), []).append(n)
    for name, mod in targets:
        W = mod.weight
        tied = [n for n in owners.get(W.data_ptr(), []) if n != f"{name}.weight"]
        if tied:
            raise ValueError(f"{name}.weight is tied to {', '.join(tied)}: an adapter would change that too (the SVD "
                             f"inits and merging rewrite the weight in place). Leave {name} out of target_modules, "
                             f"or untie the weights first")
        if W.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: weight dtype {W.dtype} is not a plain float; quantized or integer weights "
                            f"are not supported (apply adapters before quantizing)")
        if init_state is None and not r < min(W.shape):  # a restored adapter is checked by its shapes instead
            raise ValueError(f"r={r} is too large for {name} (weight {W.shape[0]}×{W.shape[1]}): "
                             f"r must be < min(out, in) = {min(W.shape)}")
        if not torch.isfinite(W).all():
            raise ValueError(f"{name}: weight contains NaN or Inf")
    if init_state is not None:
        _check_state(targets, method, r, init_state)
    return targets


def _make_layer(mod, method, r, alpha, dropout):
    if method == "miss":
        return MissLinear(mod, r, dropout)
    return LoraLinear(mod, r, alpha, dropout, init=method)


def _for_each(fn, items, parallel, desc):
    """fn over items with a progress bar. On a CPU, `parallel` runs one item per core, each on one thread: LAPACK's
    eigh keeps two cores only half busy, so this makes the SVD init ~20% faster than one layer on all cores."""
    threads = torch.get_num_threads()
    if not parallel or threads == 1 or torch.cuda.is_available():
        return [fn(x) for x in tqdm(items, desc=desc, unit="layer", leave=False)]
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(threads)
    try:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="layer", leave=False))
    finally:  # on an error or Ctrl-C, don't decompose the layers still queued
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _holding_interrupts():
    """Ctrl-C inside the block takes effect when it ends, so the model is never left half-changed. (Signals only
    reach the main thread; elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def apply_adapters(model, method="milora", r=64, alpha=None, dropout=0.0, target_modules=PAPER_TARGETS,
                   init_state=None):
    """Wrap every nn.Linear named in target_modules with an adapter, in place; only adapters stay trainable.

    method: "lora" (random A, B = 0), "pissa" (top-r SVD), "milora" (bottom-r SVD), "miss", or the paper's
        ablations "middle" (the r triplets from index (m − r) // 2) and "random" (r random triplets).
    alpha: LoRA-family scale numerator; scaling = alpha/r. Defaults as in the paper: 2r for LoRA, r for the SVD
        inits (scaling 1). MiSS has no alpha.
    init_state: an adapter_state_dict() of an earlier run with the same settings. Its tensors are restored and the
        residual is rebuilt from its saved SVD factors instead of a new SVD, so a resumed run is exact.

    All or nothing: every argument, weight and state is checked and every layer decomposed before the model changes
    at all, so an error or Ctrl-C leaves it exactly as it was.
    """
    alpha = _check_args(method, r, alpha, dropout, target_modules)
    targets = _find_targets(model, method, r, target_modules, init_state)
    layers = [_make_layer(mod, method, r, alpha, dropout).train(mod.training) for _, mod in targets]  # eval stays eval
    # "random" draws each layer's triplets from its own generator, seeded in order here, so that the parallel
    # decomposition below gives the same picks on every run.
    seeds = torch.randint(2 ** 62, (len(targets),)).tolist() if method == "random" else [0] * len(targets)

    def init(i):
        name = targets[i][0]
        state = None if init_state is None else \
            {k: init_state[f"{name}.{k}"] for k in ADAPTER_TENSORS if f"{name}.{k}" in init_state}
        layers[i].initialize(state, torch.Generator().manual_seed(seeds[i]))

    # 1. The slow part, which changes nothing in the model: the SVD inits are pure functions of each weight, so they
    #    may run one layer per core (LoRA's A comes from the global RNG and stays in order).
    _for_each(init, range(len(targets)), parallel=method in PARTS and init_state is None, desc=f"{method} init")
    for (name, _), layer in zip(targets, layers):
        zeros = int((layer.lora_B0.abs().amax(0) == 0).sum()) if hasattr(layer, "lora_B0") else 0
        if zeros:
            warnings.warn(f"{name}: {zeros} of the {r} singular values {method} chose are 0, so those columns of B "
                          f"and rows of A are 0 and get no gradient: they can't train", stacklevel=2)
    # 2. The model changes here, in a step that allocates nothing and holds Ctrl-C until it is done.
    sizes = {}  # the SVD inits write residuals through one float32 scratch buffer per device, of the largest size
    for _, mod in (targets if method in PARTS else []):
        sizes[mod.weight.device] = max(sizes.get(mod.weight.device, 0), mod.weight.numel())
    buffers = {d: torch.empty(n, device=d, dtype=torch.float32) for d, n in sizes.items()}
    with _holding_interrupts():
        for p in model.parameters():
            p.requires_grad_(False)
        for (name, mod), layer in zip(targets, layers):
            if method in PARTS:
                layer.subtract_init_(buffers[mod.weight.device])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model


@torch.no_grad()
def merge_adapters(model):
    """Fold every adapter into its weight and put the plain nn.Linear back. Merging a merged model is a no-op."""
    for name, layer in adapter_layers(model):
        W = layer.base_layer.weight
        W.copy_(W.float() + layer.delta_weight().to(W.device))  # add in float32, store in W's dtype
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    return model


@contextlib.contextmanager
def disable_adapters(model):
    """Inside this block every adapter layer returns its frozen base only (the untouched model for loaded adapters)."""
    layers = [m for _, m in adapter_layers(model)]
    before = [m.disabled for m in layers]  # restored on exit, so that nested blocks keep the outer one's state
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


def adapter_state_dict(model):
    """Every adapter tensor, trainable or saved init factor, keyed by module path: what a checkpoint must keep."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_TENSORS}


# -----------------------------------------------------------------------------
# 4. PEFT-format adapters: safetensors + JSON, never pickle

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


def write_atomically(path, write):
    """write(tmp_path), then rename it over path: a crash mid-save never leaves a half-written file where a
    complete one was."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    """obj as JSON to path, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    write_atomically(path, write)


def save_adapter(model, path):
    """Write a PEFT adapter directory that applies to the original, untouched base model.

    PiSSA and MiLoRA trained on the residual W₀ − B₀A₀, so for the untouched W₀ their update is
    ΔW = BA − B₀A₀ = [B | −B₀]·[A ; A₀]: a plain LoRA of rank 2r, saved with α doubled to keep α/r (PEFT's
    conversion). Nobody then has to ship the residual model.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to save")
    first = layers[0][1]
    tensors = {}
    for name, m in layers:
        if isinstance(m, MissLinear):
            tensors[f"{PREFIX}{name}.miss_block"] = m.miss_block
        elif hasattr(m, "lora_A0"):
            tensors[f"{PREFIX}{name}.lora_A.weight"] = torch.cat([m.lora_A, m.lora_A0], 0)  # 2r×in
            tensors[f"{PREFIX}{name}.lora_B.weight"] = torch.cat([m.lora_B, -m.lora_B0], 1)  # out×2r
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_A, m.lora_B
    common = dict(target_modules=sorted({n.rsplit(".", 1)[-1] for n, _ in layers}), bias="none",
                  modules_to_save=None, inference_mode=True,
                  task_type="CAUSAL_LM" if hasattr(model, "generate") else None,
                  base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None))
    p = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    if isinstance(first, MissLinear):
        config = dict(peft_type="MISS", r=first.r, miss_dropout=p, init_weights=True, mini_r=1, **common)
    else:
        k = 2 if hasattr(first, "lora_A0") else 1
        config = dict(peft_type="LORA", r=k * first.r, lora_alpha=k * first.alpha, lora_dropout=p,
                      init_lora_weights=True, use_rslora=False, use_dora=False, fan_in_fan_out=False, **common)
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(os.path.join(path, WEIGHTS), lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    write_json(config, os.path.join(path, CONFIG))


def load_adapter(model, path):
    """Load a PEFT LoRA or MiSS adapter directory (ours or PEFT's) onto an untouched base model, in place."""
    files = [os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)]
    if not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"{path} is not an adapter directory: it needs {CONFIG} and {WEIGHTS}")
    try:
        with open(files[0]) as f:
            cfg = json.load(f)
        state = load_file(files[1])
    except Exception as e:  # json's and safetensors' own errors: a truncated or corrupt file
        raise ValueError(f"{path}: cannot read the adapter ({type(e).__name__}: {e})") from e
    kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
    unsupported = {"use_dora": True, "fan_in_fan_out": True, "rank_pattern": True, "alpha_pattern": True,
                   "modules_to_save": True, "layers_to_transform": True}
    bad = [k for k in unsupported if cfg.get(k)] + (["bias"] if cfg.get("bias", "none") != "none" else [])
    if kind == "MISS" and cfg.get("init_weights", True) is not True:
        bad.append("init_weights")  # the "bat" and "mini" variants
    if kind not in ("LORA", "MISS") or bad:
        raise ValueError(f"{files[0]}: only plain LoRA and MiSS adapters load here (peft_type={kind!r}, "
                         f"unsupported options: {', '.join(bad) or 'none'})")
    # PEFT keys read base_model.model.<module>.lora_A.weight; ours are <module>.lora_A.
    state = {k.removeprefix(PREFIX).removesuffix(".weight"): v for k, v in state.items()}
    r = cfg.get("r")
    if "target_modules" not in cfg:
        raise ValueError(f"{files[0]}: no target_modules")
    if kind == "MISS":
        return apply_adapters(model, "miss", r, None, cfg.get("miss_dropout", 0.0), cfg["target_modules"], state)
    alpha = cfg.get("lora_alpha", 8)
    if cfg.get("use_rslora") and isinstance(r, int) and isinstance(alpha, numbers.Real):
        alpha *= math.sqrt(r)  # rsLoRA scales by α/√r; α·√r / r says the same in our α/r
    return apply_adapters(model, "lora", r, alpha, cfg.get("lora_dropout", 0.0), cfg["target_modules"], state)


# -----------------------------------------------------------------------------
# 5. The paper's analyses


def subspace_similarity(U1, U2):
    """φ = ‖U1ᵀU2‖²_F / r for column-orthonormal d×r bases (appendix A.1): 1 = the same subspace, 0 = orthogonal."""
    return ((U1.double().T @ U2.double()).square().sum() / min(U1.shape[1], U2.shape[1])).item()


def amplification_factor(delta_w, w, r):
    """‖UᵀΔW V‖_F / ‖UᵀW V‖_F, U and V the top-r singular vectors of ΔW (Table 7): how much ΔW amplifies
    directions that W itself barely uses."""
    return delta_analysis(delta_w, w, r, similarity=False)["amplification"]


def delta_analysis(delta_w, w, r, similarity=True, generator=None):
    """The paper's section 5 on one update ΔW of a pretrained W (both out×in), in float64 on the CPU:
      w_proj, dw_proj, amplification   Table 7: ‖UᵀW V‖_F, ‖UᵀΔW V‖_F and their ratio, U and V ΔW's top r
      phi_principal, phi_minor, phi_random   Figure 2: φ of ΔW's top-r left singular vectors to W's r largest,
                                       r smallest and r random ones (appendix A.1 compares left vectors)
      phi_principal_right, ...         the same for the right singular vectors
    φ is NaN where ΔW has rank below r: its top r singular vectors are then partly arbitrary."""
    dW, W = delta_w.detach().double().cpu(), w.detach().double().cpu()
    k = min(W.shape)  # how many singular triplets W has
    if not 1 <= r <= k:
        raise ValueError(f"r must be in [1, {k}] for a {W.shape[0]}×{W.shape[1]} weight, got {r}")
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    U, S, V = U[:, :r], S[:r], Vh[:r].T  # out×r, r, in×r
    out = {"w_proj": (U.T @ W @ V).norm().item(), "dw_proj": S.norm().item()}  # ‖UᵀΔW V‖_F = ‖diag(S)‖_F
    out["amplification"] = out["dw_proj"] / out["w_proj"] if out["w_proj"] else math.inf
    if similarity:
        Uw, _, Vhw = torch.linalg.svd(W, full_matrices=False)  # W's triplets, σ descending
        rank_r = S[-1] > S[0] * k * torch.finfo(torch.float64).eps
        for name in ("principal", "minor", "random"):
            idx = _triplet_indices(k, r, name, generator)  # the same picks as the inits'
            out[f"phi_{name}"] = subspace_similarity(U, Uw[:, idx]) if rank_r else math.nan
            out[f"phi_{name}_right"] = subspace_similarity(V, Vhw[idx].T) if rank_r else math.nan
    return out


# -----------------------------------------------------------------------------
# 6. Demo: python milora.py

if __name__ == "__main__":
    torch.manual_seed(0)
    d, ff, layers, r = 512, 1536, 4, 64

    class Block(nn.Module):  # the five linear maps the paper adapts, in a toy residual MLP
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d // 4), nn.Linear(d, d // 4)
            self.up_proj, self.down_proj = nn.Linear(d, ff), nn.Linear(ff, d)

        def forward(self, x):
            x = x + self.down_proj(F.silu(self.up_proj(x)))
            return x + self.q_proj(x) + F.pad(self.k_proj(x) * self.v_proj(x), (0, d - d // 4))

    base = nn.Sequential(*[Block() for _ in range(layers)])
    x = torch.randn(8, d)
    with torch.no_grad():
        y0 = base(x)
    t = time.perf_counter()
    for m in base.modules():
        if isinstance(m, nn.Linear):
            torch.linalg.svd(m.weight.detach(), full_matrices=False)
    t_svd = time.perf_counter() - t
    print(f"{layers} blocks, r={r}; full torch.linalg.svd of every target: {t_svd:.2f}s")
    print(f"{'method':8} {'init s':>7} {'SVD/init':>9} {'max |Δy|/|y|':>13} {'trainable':>10} {'of total':>9}")
    for method in METHODS:
        model = copy.deepcopy(base)
        t = time.perf_counter()
        apply_adapters(model, method, r=r)
        t_init = time.perf_counter() - t
        with torch.no_grad():
            err = ((model(x) - y0).abs().max() / y0.abs().max()).item()
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        speedup = f"{t_svd / t_init:8.1f}x" if method in PARTS else f"{'-':>9}"  # LoRA and MiSS need no SVD
        print(f"{method:8} {t_init:7.2f} {speedup} {err:13.1e} {n_train:10,} {n_train / n_all:8.1%}")
