"""milora.py: MiLoRA, PiSSA, LoRA, MiSS and MiCA adapters for any PyTorch model, in one file.

MiLoRA (Wang et al., NAACL 2025) splits each target weight by SVD, W = U Σ Vᵀ, freezes the principal part and trains
only the r *smallest* singular triplets, B = U_m √Σ_m and A = √Σ_m V_mᵀ. At step 0 the model is unchanged; learning
starts in the subspace the pretrained weight uses least, so it forgets less. PiSSA is the same with the r *largest*
triplets, LoRA starts from a random A and B = 0, and MiSS trains one zero-initialised r×out matrix shared by the
input's r-sized shards. MiCA (Rüdiger & Raschka, 2026; PEFT's "mica") freezes B = U_m, W's r minor left singular
vectors, and trains only A, from 0; it leaves W untouched.

Read top to bottom: 1. the method (which triplets, B and A, the residual), 2. the adapter layers, 3. the model
(apply_adapters, save_adapter's rank-2r export for the untouched base, load, merge), 4. the paper's analyses. The
appendices hold what a reader may skip: A. the checks that make a bad call fail before anything changes, B. the same
triplets faster than a full SVD (the default route), C. machinery. `python milora.py` runs a 5-second demo.
Needs torch, safetensors and tqdm; nothing else."""
import contextlib, json, math, numbers, os, pathlib, re, signal, threading, warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

METHODS = ("lora", "pissa", "milora", "miss", "mica", "middle", "random")  # the last two: the paper's ablations
PARTS = {"pissa": "principal", "milora": "minor", "middle": "middle", "random": "random"}  # SVD init -> its triplets
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # MiLoRA paper, Table 10
EPS = torch.finfo(torch.float32).eps

# 1. The method: which singular triplets, B and A from them, and the residual ------------------------------------------

def triplet_indices(m, r, part, generator=None):
    """Which r of W's m singular triplets a method trains, as indices into σ sorted descending."""
    if part == "principal":  # PiSSA: the r largest
        return torch.arange(r)
    if part == "minor":  # MiLoRA: the r smallest
        return torch.arange(m - r, m)
    if part == "middle":  # the official code's "mid" ablation
        return torch.arange((m - r) // 2, (m - r) // 2 + r)
    if part == "random":  # the paper's Table 6 ablation
        return torch.randperm(m, generator=generator)[:r].sort().values
    raise ValueError(f"part must be one of {', '.join(PARTS.values())}, got {part!r}")

def svd_triplets(W, idx):
    """The reference route (PEFT's and the official code's): a full SVD, then U, S, Vh of the triplets idx, and σmax."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, idx], S[idx], Vh[idx], S[0]

@torch.no_grad()
def svd_factors(weight, r, part="minor", scale=1.0, generator=None, fast=True):
    """B (out×r) and A (r×in), float32, from r singular triplets of W = U Σ Vᵀ: B = U √(Σ/scale), A = √(Σ/scale) Vᵀ.
    part: "minor" takes the r smallest (MiLoRA), "principal" the r largest (PiSSA), "middle" or "random" (ablations).
    The adapter adds scale·B A (scale = α/r), so Σ is divided by scale, as PEFT does: scale·B A is then exactly the
    chosen part of W (but σ zeroed below), for any α. fast=True takes appendix B's route: its block B·A, subspaces and
    σ within 2× of float32 torch.linalg.svd's error (tested; study/bench.py measures both routes); fast=False: SVD."""
    device = "cuda" if torch.cuda.is_available() and not weight.is_cuda else weight.device  # a GPU, if there is one
    W = weight.detach().to(device, torch.float32)  # float32 whatever the weight's dtype; one layer at a time
    m = min(W.shape)
    if not 1 <= r < m:
        raise ValueError(f"r must satisfy 1 <= r < min(out, in) = {m} for a weight of shape {tuple(W.shape)}, got {r}")
    if not W.abs().max().isfinite():  # max propagates NaN: one pass, and no mask the size of W
        raise ValueError("weight contains NaN or Inf: it has no SVD to split")
    idx = triplet_indices(m, r, part, generator)
    U, S, Vh, smax = (fast_triplets if fast else svd_triplets)(W, idx)
    S = torch.where(S > 2 * EPS * smax, S, 0)  # float32 can't tell σ below this from 0: their vectors are noise
    # Each pair's sign is arbitrary: fix it (u's largest entry > 0, as svd_flip) so runs agree, and routes to rounding.
    sign = U.gather(0, U.abs().argmax(0, keepdim=True)).sign()  # 1×r
    sqrt_s = (S / scale).sqrt() if scale else torch.ones_like(S)  # r; scale=None: B = U, A = Vᵀ (MiCA's frozen B)
    B, A = U * sign * sqrt_s, sqrt_s[:, None] * Vh * sign.T  # out×r, r×in
    return B.contiguous().to(weight.device), A.contiguous().to(weight.device)  # back where the weight is

def svd_split(weight, r, part="minor", scale=1.0, generator=None, fast=True):
    """B, A as svd_factors gives them, and the residual W − scale·B A that stays frozen, all float32 and on the
    weight's device: W = residual + scale·B A. (apply_adapters writes the same into the weight.)"""
    B, A = svd_factors(weight, r, part, scale, generator, fast)
    return B, A, torch.addmm(weight.detach().to(B.device, torch.float32), B, A, alpha=-scale)

# 2. The adapter layers ------------------------------------------------------------------------------------------------

class AdapterLayer(nn.Module):
    """A frozen nn.Linear with an adapter beside it: y = W x + update(dropout(x)); disable_adapters turns it off."""

    def __init__(self, base: nn.Linear, r, dropout):
        super().__init__()
        self.base_layer, self.r, self.disabled = base, r, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (tokens, in): 2-D, so that the update can add into y in place
        y = self.base_layer(x)  # (tokens, out) = W x; nn.Linear keeps no output for backward, so y may change
        if not self.disabled:
            self.add_update_(y, x)
        return y.view(*lead, -1)

class LoraLinear(AdapterLayer):
    """y = W x + (α/r)·B A dropout(x). W is frozen: the pretrained weight for LoRA and MiCA; for the SVD inits it is
    the residual W₀ − (α/r)·B₀A₀, and B and A start at B₀ and A₀, so that y is unchanged at step 0."""

    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0, init="lora"):
        super().__init__(base, r, dropout)
        self.alpha, self.scaling, self.init = alpha, alpha / r, init
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, device=base.weight.device))  # r×in, float32 (PEFT)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))  # out×r
        self.lora_B.requires_grad_(init != "mica")  # MiCA trains A only: its B stays W's minor left singular vectors

    @torch.no_grad()
    def initialize(self, state=None, generator=None):
        """Fill A and B by the layer's init, or from `state` (its part of an adapter_state_dict); W stays as it is."""
        if self.init in PARTS:  # B₀, A₀ from the SVD, or the saved ones (resume: no new SVD, the same residual)
            B0, A0 = (state["lora_B0"], state["lora_A0"]) if state else \
                svd_factors(self.base_layer.weight, self.r, PARTS[self.init], self.scaling, generator)
            # Kept: subtract_init_ needs them, and save_adapter, to give ΔW = BA − B₀A₀ for the untouched base.
            self.register_buffer("lora_B0", B0.to(self.lora_B))
            self.register_buffer("lora_A0", A0.to(self.lora_A))
            state = {"lora_A": A0, "lora_B": B0, **(state or {})}  # training starts at B₀, A₀ unless resumed
        elif self.init == "mica" and state is None:  # MiCA: B = U_m, W's r minor left singular vectors; A stays 0
            state = {"lora_A": self.lora_A, "lora_B": svd_factors(self.base_layer.weight, self.r, scale=None)[0]}
        if state is None:  # LoRA: A as nn.Linear's default init (as PEFT and loralib), B = 0
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            self.lora_A.copy_(state["lora_A"])
            self.lora_B.copy_(state["lora_B"])

    @torch.no_grad()
    def subtract_init_(self, buffer):
        """W ← W − (α/r)·B₀A₀, in place: computed in `buffer` (float32, or float64 for a float64 W; at least W's size)
        and stored in W's dtype. It allocates nothing (but float64 B₀, A₀), so once started it can't fail half-way."""
        W = self.base_layer.weight
        tmp = buffer[:W.numel()].view(W.shape).copy_(W)
        W.copy_(tmp.addmm_(self.lora_B0.to(tmp), self.lora_A0.to(tmp), alpha=-self.scaling))

    def add_update_(self, y, x):
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (tokens, r) = A x
        _add_matmul_(y, h, self.lora_B.T, self.scaling)  # y += (α/r)·h Bᵀ

    def delta_weight(self, dtype=torch.float32):
        """What the adapter adds to W now, (α/r)·B A: out×in."""
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

class MissLinear(AdapterLayer):
    """y = W x + Dᵀ·Σₖ xₖ, where xₖ are the input's r-sized shards (zero-padded) and D (r×out) starts at 0."""

    def __init__(self, base: nn.Linear, r, dropout=0.0):
        super().__init__(base, r, dropout)
        self.miss_block = nn.Parameter(torch.zeros(r, base.out_features, device=base.weight.device))  # r×out

    @torch.no_grad()
    def initialize(self, state=None, generator=None):
        if state is not None:
            self.miss_block.copy_(state["miss_block"])

    def add_update_(self, y, x):
        x = self.dropout(x.to(self.miss_block.dtype))
        if pad := -x.shape[-1] % self.r:  # like PEFT: in_features padded up to a multiple of r
            x = F.pad(x, (0, pad))
        _add_matmul_(y, x.view(len(x), -1, self.r).sum(1), self.miss_block)  # y += (Σₖ xₖ) D; Σₖ xₖ: (tokens, r)

    def delta_weight(self, dtype=torch.float32):
        """Column j of the input is summed into shard slot j mod r, so ΔW[o, j] = D[j mod r, o] (out×in)."""
        in_f = self.base_layer.in_features
        return self.miss_block.T.to(dtype).repeat(1, -(-in_f // self.r))[:, :in_f]

ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_A0", "lora_B0", "miss_block")

# 3. The model: patching, saving for the untouched base, loading, merging ----------------------------------------------

def apply_adapters(model, method="milora", r=64, alpha=None, dropout=0.0, target_modules=PAPER_TARGETS,
                   init_state=None, gather=lambda weight: contextlib.nullcontext()):
    """Wrap every nn.Linear named in target_modules with an adapter, in place; only adapters stay trainable.
    method: "lora", "pissa", "milora", "miss", "mica", or the paper's ablations "middle" and "random" (triplet_indices).
    alpha: scaling = alpha/r; default 2r for LoRA, r for the SVD inits (paper) and MiCA (PEFT's example); MiSS: none.
    target_modules: module names or name suffixes, or a regex on the full name (PEFT's rule).
    init_state: an adapter_state_dict() of an earlier run with the same settings, to resume it exactly: its tensors
        are restored and the residual is rebuilt from its saved B₀, A₀, with no new SVD.
    gather: for weights split across processes (DeepSpeed ZeRO-3), gather(weight) gives a context in which the
        weight is whole and changes that every process makes alike are kept.
    All or nothing: every argument, weight and state is checked (appendix A) and every layer initialised before the
    model changes, so an error or Ctrl-C leaves it as it was. Under torch.distributed, every process calls this on
    the same model with the same RNG state (torch.manual_seed): each decomposes its share of the layers (appendix C),
    and all get the same factors."""
    alpha = check_args(method, r, alpha, dropout, target_modules)
    targets = _find_targets(model, method, r, target_modules, init_state, gather)  # [(name, nn.Linear)]
    layers = [(MissLinear(mod, r, dropout) if method == "miss" else LoraLinear(mod, r, alpha, dropout, method))
              .train(mod.training) for _, mod in targets]  # a model in eval mode stays in eval mode
    state = lambda name: None if init_state is None else {k: init_state[f"{name}.{k}"] for k in ADAPTER_TENSORS
                                                          if f"{name}.{k}" in init_state}  # one layer's part of it
    # "random" picks each layer's triplets with a seed drawn here, in order: the same whichever process decomposes it.
    seeds = torch.randint(2 ** 62, (len(targets),)).tolist() if method == "random" else [0] * len(targets)
    # 1. The slow part, which changes nothing in the model: every layer's init, an SVD for PiSSA, MiLoRA and MiCA.
    mine = process_share(len(targets)) if method in (*PARTS, "mica") and init_state is None else range(len(targets))
    for i in tqdm(range(len(targets)), desc=f"{method} init", unit="layer", leave=False):
        with gather(targets[i][1].weight):  # ZeRO-3: every process gathers, the owner of layer i decomposes it
            if i in mine:
                layers[i].initialize(state(targets[i][0]), torch.Generator().manual_seed(seeds[i]))
    if method in (*PARTS, "mica") and init_state is None and dist.is_available() and dist.is_initialized():
        _share_factors(layers, mine)  # each layer's factors, from the process that decomposed it to all the others
    _warn_zero_singular_values(targets, layers, method, r)
    # 2. The model changes here, in a step that allocates nothing (but ZeRO-3's gathers) and holds Ctrl-C until done.
    largest = max(m.in_features * m.out_features for _, m in targets)  # SVD inits write residuals through a buffer
    buffers = {k: torch.empty(largest, device=k[0], dtype=k[1])  # of that size, one per device and dtype
               for k in {(m.weight.device, _wide(m.weight)) for _, m in targets}} if method in PARTS else {}
    with _holding_interrupts():
        for p in model.parameters():
            p.requires_grad_(False)
        for (name, mod), layer in zip(targets, layers):
            if method in PARTS:
                with gather(mod.weight):
                    layer.subtract_init_(buffers[mod.weight.device, _wide(mod.weight)])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model

def adapter_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."

def save_adapter(model, path):
    """Write a PEFT adapter directory (adapter_config.json and adapter_model.safetensors, never a pickle) that
    applies to the original, untouched base model. PiSSA and MiLoRA train on the residual W₀ − (α/r)B₀A₀, so for the
    untouched W₀ their update is ΔW = (α/r)(BA − B₀A₀) = (α/r)[B | −B₀]·[A ; A₀]: a plain LoRA of rank 2r, saved with
    α doubled to keep α/r (PEFT's conversion; the same for every SVD init). Nobody has to ship the residual model."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to save")
    tensors = {}
    for name, m in layers:
        key = PREFIX + name
        if isinstance(m, MissLinear):
            tensors[f"{key}.miss_block"] = m.miss_block
        elif m.init not in PARTS:  # LoRA and MiCA leave W₀ untouched: their A and B as they are
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = m.lora_A, m.lora_B
        else:
            tensors[f"{key}.lora_A.weight"] = torch.cat([m.lora_A, m.lora_A0])  # 2r×in
            tensors[f"{key}.lora_B.weight"] = torch.cat([m.lora_B, -m.lora_B0], 1)  # out×2r
    first = layers[0][1]
    p = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = dict(target_modules=_saved_targets(model, layers), bias="none", modules_to_save=None,
                  inference_mode=True, task_type="CAUSAL_LM" if hasattr(model, "generate") else None,
                  base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None))
    if isinstance(first, MissLinear):
        config.update(peft_type="MISS", r=first.r, miss_dropout=p, init_weights=True, mini_r=1)
    else:
        k = 2 if first.init in PARTS else 1
        config.update(peft_type="LORA", r=k * first.r, lora_alpha=k * first.alpha, lora_dropout=p,
                      init_lora_weights=True, use_rslora=False, use_dora=False, fan_in_fan_out=False)
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(os.path.join(path, WEIGHTS), lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    write_json(config, os.path.join(path, CONFIG))

def load_adapter(model, path):
    """Load a PEFT LoRA or MiSS adapter directory (ours or PEFT's) onto an untouched base model, in place."""
    cfg, state = _read_adapter(path)  # only what apply_adapters can rebuild, or a one-line error
    state = {k.removeprefix(PREFIX).removesuffix(".weight"): v for k, v in state.items()}  # our keys: <module>.lora_A
    if cfg["peft_type"] == "MISS":
        return apply_adapters(model, "miss", cfg["r"], None, cfg.get("miss_dropout", 0.0), cfg["target_modules"], state)
    r, alpha = cfg["r"], cfg.get("lora_alpha", 8)
    if cfg.get("use_rslora") and isinstance(r, int) and isinstance(alpha, numbers.Real):
        alpha *= math.sqrt(r)  # rsLoRA scales by α/√r; α·√r / r says the same in our α/r
    return apply_adapters(model, "lora", r, alpha, cfg.get("lora_dropout", 0.0), cfg["target_modules"], state)

@torch.no_grad()
def merge_adapters(model):
    """Fold every adapter into its weight and put the plain nn.Linear back. Merging a merged model is a no-op."""
    for name, layer in adapter_layers(model):
        W = layer.base_layer.weight
        W.copy_(W.to(_wide(W)) + layer.delta_weight(_wide(W)).to(W.device))  # add in float32 (or 64), round once
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    return model

@contextlib.contextmanager
def disable_adapters(model):
    """Inside this block each adapter layer gives its frozen base only: the untouched model for LoRA, MiCA and loaded
    adapters, the residual for the SVD inits."""
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

# 4. The paper's analyses (section 5 and appendix A.1) -----------------------------------------------------------------

def subspace_similarity(U1, U2):
    """φ = ‖U1ᵀU2‖²_F / r for column-orthonormal d×r bases, r the smaller (appendix A.1): 1 = same span, 0 = none."""
    return ((U1.double().T @ U2.double()).square().sum() / min(U1.shape[1], U2.shape[1])).item()

def delta_analysis(delta_w, w, r, generator=None):
    """The paper's section 5 on one update ΔW of a pretrained W (both out×in), in float64 on the CPU:
      w_proj, dw_proj, amplification   Table 7: ‖UᵀW V‖_F, ‖UᵀΔW V‖_F and their ratio, U and V ΔW's top r
      phi_principal, phi_minor, phi_random   Figure 2: φ of ΔW's top-r left singular vectors to W's r largest,
        r smallest and r random ones (appendix A.1; NaN if ΔW's rank is below r), and phi_..._right of the right ones
      sigma_principal, sigma_minor     W's r-th largest and r-th smallest σ: where PiSSA's and MiLoRA's r end"""
    dW, W = delta_w.detach().double().cpu(), w.detach().double().cpu()
    k = min(W.shape)  # how many singular triplets W has
    if not 1 <= r <= k:
        raise ValueError(f"r must be in [1, {k}] for a {W.shape[0]}×{W.shape[1]} weight, got {r}")
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    U, S, V = U[:, :r], S[:r], Vh[:r].T  # out×r, r, in×r
    out = {"w_proj": (U.T @ W @ V).norm().item(), "dw_proj": S.norm().item()}  # ‖UᵀΔW V‖_F = ‖diag(S)‖_F
    out["amplification"] = out["dw_proj"] / out["w_proj"] if out["w_proj"] else math.inf
    Uw, Sw, Vhw = torch.linalg.svd(W, full_matrices=False)  # W's triplets, σ descending
    out["sigma_principal"], out["sigma_minor"] = Sw[r - 1].item(), Sw[k - r].item()
    rank_r = S[-1] > S[0] * k * torch.finfo(torch.float64).eps
    for name in ("principal", "minor", "random"):
        idx = triplet_indices(k, r, name, generator)  # the inits' rule; random: other picks
        out[f"phi_{name}"] = subspace_similarity(U, Uw[:, idx]) if rank_r else math.nan
        out[f"phi_{name}_right"] = subspace_similarity(V, Vhw[idx].T) if rank_r else math.nan
    return out

# Appendix A: the checks, run before anything changes: a bad call ends in one error that names the culprit -----------

def check_args(method, r, alpha, dropout, target_modules):
    """-> alpha, defaulted; or a clear error for the first argument that is out of range."""
    real = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if method == "miss" and alpha is not None:
        raise ValueError("MiSS has no alpha; leave alpha=None")
    if alpha is not None and not (real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number (the adapter is scaled by alpha/r), got {alpha!r}")
    if not (real(dropout) and 0 <= dropout < 1):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not target_modules or not isinstance(target_modules, str) and not all(isinstance(t, str) and t
                                                                            for t in target_modules):
        raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    return alpha if alpha is not None else (2 * r if method == "lora" else r)

def _matches(name, targets):
    """PEFT's rule: a string is a regex on the full module name, a list matches names or name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)

def _find_targets(model, method, r, target_modules, init_state, gather):
    """-> [(name, nn.Linear)] to adapt, each checked to take an adapter, and init_state checked to fit them all."""
    if adapter_layers(model):
        raise ValueError("model already has adapters: merge_adapters() it first, or start from a fresh model")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [(n, m) for n, m in linears.items() if _matches(n, target_modules)]
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} match no nn.Linear in the model; its linear layers are "
                         f"named: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in linears})) or '(none)'}")
    params = list(model.named_parameters(remove_duplicate=False))  # a tied weight is here under each of its names
    for name, mod in targets:
        W, shape = mod.weight, (mod.out_features, mod.in_features)
        if tied := [n for n, p in params if p is W and n != f"{name}.weight"]:  # as lm_head's and embed_tokens' often
            raise ValueError(f"{name}.weight is tied to {', '.join(tied)}: an adapter would change that too (SVD "
                             f"inits and merging rewrite it). Leave {name} out of target_modules, or untie them")
        if W.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name}: weight dtype {W.dtype} is not a plain float; quantized or integer weights "
                            f"are not supported (apply adapters before quantizing)")
        if init_state is None and not r < min(shape):  # a restored adapter is checked by its shapes instead
            raise ValueError(f"r={r} is too large for {name} (weight {shape[0]}×{shape[1]}): "
                             f"r must be < min(out, in) = {min(shape)}")
        with gather(W):
            if not W.abs().max().isfinite():  # as in svd_factors
                raise ValueError(f"{name}: weight contains NaN or Inf")
    if init_state is not None:
        _check_state(targets, method, r, init_state)
    return targets

def _check_state(targets, method, r, state):
    """Name the first key, shape or value in `state` that doesn't fit the adapters these targets will get."""
    want = {}
    for name, mod in targets:
        o, i = mod.out_features, mod.in_features
        shapes = dict(miss_block=(r, o)) if method == "miss" else dict(lora_A=(r, i), lora_B=(o, r))
        shapes |= dict(lora_A0=(r, i), lora_B0=(o, r)) if method in PARTS else {}  # the SVD inits' B₀, A₀ too
        want.update({f"{name}.{k}": s for k, s in shapes.items()})
    for key, shape in want.items():
        if key not in state:
            raise ValueError(f"adapter has no tensor for {key} (the model expects one of shape {shape})")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{key}: adapter shape {tuple(state[key].shape)} does not fit the model's {shape}")
        if not state[key].is_floating_point() or not torch.isfinite(state[key]).all():
            raise ValueError(f"{key}: adapter tensor is not finite floating point ({state[key].dtype}, or NaN/Inf)")
    if extra := next((key for key in state if key not in want), None):
        raise ValueError(f"adapter tensor {extra} matches no target module of this model")

def _read_adapter(path):
    """-> (config, tensors) of a PEFT directory holding a plain LoRA or MiSS adapter, or a one-line error."""
    files = [os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)]
    if not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"{path} is not an adapter directory: it needs {CONFIG} and {WEIGHTS}")
    try:
        with open(files[0]) as f:
            cfg = json.load(f)
        state = load_file(files[1])
    except Exception as e:  # json's and safetensors' own errors: a truncated or corrupt file
        raise ValueError(f"{path}: cannot read the adapter ({type(e).__name__}: {e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{files[0]}: a PEFT config is a JSON object, not a {type(cfg).__name__}")
    bad = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias",
                       "layers_to_transform", "exclude_modules", "trainable_token_indices", "layer_replication",
                       "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config",
                       "kasa_config") if cfg.get(k)] + (["bias"] if cfg.get("bias", "none") != "none" else [])
    if str(cfg.get("init_lora_weights")).lower().startswith(("pissa", "olora", "corda", "loftq")):
        bad.append("init_lora_weights")  # saved for a residual base, which PEFT rebuilds on load: convert it first
    if cfg.get("peft_type") == "MISS" and cfg.get("init_weights", True) is not True:
        bad.append("init_weights")  # MiSS's "bat" and "mini" variants
    if cfg.get("peft_type") not in ("LORA", "MISS") or bad:
        raise ValueError(f"{files[0]}: only plain LoRA and MiSS adapters load here (peft_type="
                         f"{cfg.get('peft_type')!r}, unsupported options: {', '.join(bad) or 'none'})")
    if missing := [k for k in ("r", "target_modules") if k not in cfg]:
        raise ValueError(f"{files[0]}: no {' and no '.join(missing)}")
    return cfg, state

def _saved_targets(model, layers):
    """target_modules for the config, naming exactly the adapted modules: the last parts of their names when those
    pick no other module; else (the targets were a subset) every adapted module's full name. PEFT reads both."""
    names = sorted(n for n, _ in layers)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return short if sorted(n for n, _ in model.named_modules() if _matches(n, short)) == names else names

def _warn_zero_singular_values(targets, layers, method, r):
    for (name, _), layer in zip(targets, layers):
        if zeros := int((layer.lora_B0.abs().amax(0) == 0).sum()) if hasattr(layer, "lora_B0") else 0:
            warnings.warn(f"{name}: {zeros} of the {r} singular values {method} chose are 0, so those columns of B "
                          f"and rows of A are 0 and get no gradient: they can't train", stacklevel=3)

# Appendix B: the same triplets, faster than a full SVD ----------------------------------------------------------------
# The eigenvectors of the Gram matrix W Wᵀ (m×m, m = min(out, in)) are W's left singular vectors, and eigh costs less
# than svd. But the Gram squares σ: in float32 it resolves only σ above about √eps·σmax = 3.5e-4·σmax, and real
# SmolLM2-135M's q_proj and o_proj reach 1e-6·σmax, where its eigenvectors are a rotated mix. So the Gram only starts:
# Rayleigh–Ritz on W makes triplets of them, a Newton step (the Gram's other eigenpairs as the inverse) squares their
# error, a check follows; where it fails on the minor side, inverse iteration on a float64 QR of W; a full SVD last.

MARGIN = 16  # Gram eigenvectors taken beyond each end of the chosen ones, so near-ties at the ends stay in the block
MAX_ANGLE = 1e-3  # Rayleigh–Ritz's estimated angle (rad) to the block's true span under which Newton is trusted
TOL = 2e-5  # the estimated angle asked of the others, after Newton or inverse iteration
MAX_ITERS = 8  # inverse-iteration steps before giving up for a full SVD

def fast_triplets(W, idx):
    """svd_triplets' (U, S, Vh, σmax) for the triplets idx of W, by the route above."""
    Wm = W.T if W.shape[0] > W.shape[1] else W  # m×n, m ≤ n: the SVD of Wᵀ is W's with U and V swapped
    top = W.abs().max()
    if top == 0:  # any orthonormal vectors, with σ = 0
        return torch.eye(len(W), len(idx)).to(W), W.new_zeros(len(idx)), torch.eye(len(idx), W.shape[1]).to(W), top
    # A power of two scales exactly: it keeps the Gram from overflowing or underflowing, even at 1e±18.
    step = 1.0 if 2 ** -16 <= top <= 2 ** 16 else 2.0 ** -math.floor(math.log2(top))
    U, S, Vh, smax = _block_triplets(Wm * step if step != 1 else Wm, idx)
    U, S, Vh, smax = U.float(), S.float() / step, Vh.float(), smax / step
    return (Vh.T, S, U.T, smax) if Wm is not W else (U, S, Vh, smax)

def _block_triplets(Wm, idx):
    m = Wm.shape[0]
    if int(idx.max()) - int(idx.min()) >= m // 2:  # scattered picks ("random") would make the block most of the
        return svd_triplets(Wm, idx)  # spectrum, and the Gram route would save nothing
    h = m // 2  # eigh reads only the lower triangle of Wm Wmᵀ: skip its top-right block, a quarter of the work
    gram = torch.cat([F.pad(Wm[:h] @ Wm[:h].T, (0, m - h)), Wm[h:] @ Wm.T])  # m×m
    lam, Q = torch.linalg.eigh(gram)  # ascending
    sigma, Q = lam.flip(0).clamp_min(0).sqrt(), Q.flip(1)  # σ estimates, descending as idx
    lo, hi = max(0, int(idx.min()) - MARGIN), min(m, int(idx.max()) + 1 + MARGIN)  # the block: chosen ± MARGIN
    outside = torch.cat([sigma[lo - 1:lo] if lo else sigma[:0], sigma[hi:hi + 1]])  # its nearest neighbours
    W64 = Wm.double()  # Rayleigh–Ritz and the check in float64: their products add no rounding (float32: eps·σmax)
    U, S, Vh = _rayleigh_ritz(W64, Q[:, lo:hi].double(), idx.to(Wm.device) - lo)  # the chosen block Ritz triplets
    res, angle = _check(W64, U, S, Vh, outside)
    # Newton: Wm Wmᵀu − σ²u = σ·res, so u's error along q_j outside the block is σ q_jᵀres / (σ_j² − σ²); V follows u.
    D = (S / (sigma[:, None].double() ** 2 - S * S)).float()  # m×r
    D[lo:hi] = 0  # inside the block Rayleigh–Ritz is exact already
    C = Q @ (D * (Q.T @ res.float()))  # m×r, a correction: float32 is precise enough
    U, Vh = U - C, Vh - (C.T @ Wm) / S.clamp_min(EPS * sigma[0])[:, None]
    U, S, Vh = U / (nu := U.norm(dim=0)), S * (nv := Vh.norm(dim=1)) / nu, Vh / nv[:, None]  # unit vectors again
    if angle <= MAX_ANGLE or _check(W64, U, S, Vh, outside)[1] <= TOL:
        return U, S, Vh, sigma[0]
    if int(idx[0]) == m - len(idx):  # the r smallest: inverse iteration (from twice the margin) converges to these
        if (triplets := _inverse_iteration(Wm, Q, sigma, max(0, lo - MARGIN), len(idx))) is not None:
            return (*triplets, sigma[0])
    return svd_triplets(Wm, idx)  # the last resort

def _rayleigh_ritz(Wm, X, pick):
    """Wm's exact SVD (m×n) on span(X), X m×k (k descending triplets; both float64), then its triplets `pick`: U (m×r),
    S (r), Vh (r×n). eigh's X is orthonormal only to ~√m·eps, which would scale σ as much: Cholesky QR makes it so."""
    X = torch.linalg.solve_triangular(torch.linalg.cholesky(X.T @ X), X.T, upper=False).T  # X L⁻ᵀ, as X ≈ orthonormal
    C = torch.linalg.eigh((P := X.T @ Wm) @ P.T).eigenvectors.flip(1)[:, pick]  # P (k×n): Wm on the block
    S = (Vh := C.T @ P).norm(dim=1)  # PPᵀ squares only the block's spread of σ, which float64 resolves (docs/method.md)
    return X @ C, S, Vh / S[:, None]  # Pᵀc = σv; a σ of 0 leaves noise or NaN in v, which fails the check

def _check(Wm, U, S, Vh, outside):
    """The residuals Wm v − σu (m×r), and the largest ‖Wm v − σu‖ over its σ's gap to the block's outside neighbours:
    were Wmᵀu = σv (so it is, to rounding) and the Gram's gap exact, Wedin's theorem would bound u's angle to the
    block's true singular span by it. Mixing inside the block is not checked (real weights have neighbours closer than
    float32 resolves). So it is an estimate; test_milora.py measures the accuracy itself, against float64."""
    res = Wm @ Vh.T - U * S  # m×r
    gap = (S[:, None] - outside.double()[None, :]).abs().min(1).values if len(outside) else torch.inf
    return res, float((res.norm(dim=0) / gap).max())

def _inverse_iteration(Wm, Q, sigma, lo, r):
    """Refine the r smallest triplets by inverse subspace iteration with R from Wmᵀ = Q_w R, so that Wm Wmᵀ = RᵀR: the
    solves with R never square σ, and in float64 one step amplifies the smallest direction 1/σ² times without
    drowning the others. Wm = Rᵀ Q_wᵀ, so Rᵀ's triplets (u, σ, z) are Wm's with v = Q_w z: checked on Rᵀ."""
    m, n = Wm.shape
    a, tau = torch.geqrf(Wm.T.double())  # n×m: R in its upper triangle, Q_w as Householder reflectors below
    R = a[:m].triu()  # m×m
    X, outside, smax = Q[:, lo:].double(), sigma[lo - 1:lo], sigma[0]  # the Gram's eigenvectors lo:, their neighbour
    pivots = R.diagonal()  # rank deficiency gives (near-)zero pivots: lift them to float32's noise level
    pivots.copy_(torch.where(pivots.abs() < EPS * smax, EPS * smax * torch.where(pivots < 0, -1.0, 1.0), pivots))
    for _ in range(MAX_ITERS):
        X = torch.linalg.solve_triangular(R.T, X, upper=False)  # (Rᵀ)⁻¹X, then R⁻¹ of that: one step with (W Wᵀ)⁻¹
        X = torch.linalg.qr(torch.linalg.solve_triangular(R, X, upper=True)).Q
        RX = R @ X  # R = Z Σ Uᵀ, so RX = Z Σ (UᵀX): the k×k eigh of (RX)ᵀRX gives its Ritz triplets (to √eps64·σ_k)
        lam, C = torch.linalg.eigh(RX.T @ RX)  # ascending
        C, S = C[:, :r].flip(1), lam[:r].flip(0).clamp_min(0).sqrt()  # the r smallest, descending as idx
        U, Z = X @ C, RX @ C / S  # S > 0 as R is invertible (lifted pivots); if it rounds to 0, NaN fails the check
        if _check(R.T, U, S, Z.T, outside)[1] <= TOL:
            return U, S, torch.ormqr(a, tau, F.pad(Z, (0, 0, 0, n - m))).T  # V = Q_w [Z; 0] (n×r), so Vh is r×n
    return None

# Appendix C: machinery. The fused forward, Ctrl-C, several processes, atomic files ------------------------------------

def _wide(W):
    return torch.promote_types(W.dtype, torch.float32)  # float32, or float64 for a float64 weight

def _add_matmul_(y, h, M, alpha=1.0):
    """y += alpha·h@M, in place and fused into the GEMM when the dtypes allow (PEFT adds y + h@M, one more pass over
    y), else computed in h's dtype. study/bench.py step times a training step against PEFT LoRA's, side by side."""
    if y.dtype == h.dtype:  # under autocast h is bf16 while M (an adapter) stays float32: addmm_ must get one dtype
        return y.addmm_(h, M.to(h.dtype), alpha=alpha)
    return y.add_((alpha * (h @ M)).to(y.dtype))

@contextlib.contextmanager
def _holding_interrupts():
    """Ctrl-C inside the block takes effect at its end, so the model is never left half-changed (main thread only)."""
    caught, main = [], threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a)) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt

def process_share(n):
    """Which of n layers this process decomposes: all, or under torch.distributed with N processes every N-th from
    its rank on. Each layer is decomposed once: with a device per process, the time falls as 1/N."""
    if dist.is_available() and dist.is_initialized():
        return range(dist.get_rank(), n, dist.get_world_size())
    return range(n)

def _share_factors(layers, mine):
    """Each layer's B₀, A₀ (MiCA: B, A), from the process that decomposed it to the others: all initialise alike."""
    for i, layer in enumerate(layers):
        keys = ("lora_B0", "lora_A0") if layer.init in PARTS else ("lora_B", "lora_A")  # MiCA: its B, and A = 0
        state = {k: getattr(layer, k) if i in mine else torch.empty_like(getattr(layer, k.rstrip("0"))) for k in keys}
        for factor in state.values():
            dist.broadcast(factor, src=i % dist.get_world_size())
        if i not in mine:
            layer.initialize(state)

def write_atomically(path, write):
    """write(tmp_path), then rename it over path: a crash never leaves a half-written file where a whole one was."""
    try:
        write(f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    finally:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")

def write_json(obj, path):
    """obj as JSON to path, atomically."""
    write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=2)))

# Demo: python milora.py -----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import collections, copy, time
    torch.manual_seed(0)
    d, ff, r = 512, 1536, 64  # a toy model: four blocks of the five linear maps the paper adapts
    block = lambda: nn.Sequential(collections.OrderedDict(q_proj=nn.Linear(d, d), k_proj=nn.Linear(d, d),
                                  v_proj=nn.Linear(d, d), up_proj=nn.Linear(d, ff), down_proj=nn.Linear(ff, d)))
    base, x = nn.Sequential(*[block() for _ in range(4)]), torch.randn(8, d)
    y0, t = base(x).detach(), time.perf_counter()
    for m in base.modules():
        if isinstance(m, nn.Linear):
            svd_triplets(m.weight.detach(), torch.arange(r))
    t_svd = time.perf_counter() - t
    print(f"4 blocks, r={r}; a full torch.linalg.svd of every target: {t_svd:.2f}s")
    print(f"{'method':8} {'init s':>7} {'SVD/init':>9} {'max |Δy|/|y|':>13} {'trainable':>10}")
    for method in METHODS:
        model, t = copy.deepcopy(base), time.perf_counter()
        apply_adapters(model, method, r=r)
        t_init, err = time.perf_counter() - t, ((model(x) - y0).abs().max() / y0.abs().max()).item()
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        speedup = f"{t_svd / t_init:8.1f}x" if method in (*PARTS, "mica") else f"{'-':>9}"  # LoRA, MiSS: no SVD
        print(f"{method:8} {t_init:7.2f} {speedup} {err:13.1e} {n_train:10,}")
