"""milora.py: MiLoRA, PiSSA, LoRA, MiSS and MiCA adapters for any PyTorch model, in one file.

MiLoRA (Wang et al., NAACL 2025) splits each target weight by SVD, W = U Σ Vᵀ, freezes the residual
and trains only the r *smallest* singular triplets, B = U_m √Σ_m and A = √Σ_m V_mᵀ. The model is
unchanged at step 0, and learning starts where the pretrained weight does least, so it forgets less.
PiSSA trains the r *largest* triplets instead; LoRA starts from a random A and B = 0; MiSS trains a
zero-initialised r×out matrix shared by the input's r-sized shards; MiCA (Rüdiger & Raschka, 2026)
freezes B = U_m and trains A from 0. Read 1. the method, 2. the layers, 3. the model; the appendices
A-C (checks, a faster SVD, machinery) can wait. Needs torch, safetensors, tqdm. Demo: python milora.py
"""
import contextlib, json, math, numbers, os, pathlib, re, signal, threading, warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

METHODS = ("lora", "pissa", "milora", "miss", "mica", "middle", "random")  # the last two: ablations
SVD_METHODS = ("pissa", "milora", "middle", "random")  # train r of W's triplets, on the residual
DECOMPOSING = (*SVD_METHODS, "mica")  # the methods whose init takes an SVD of W
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # MiLoRA paper, Table 10
EPS = torch.finfo(torch.float32).eps

# 1. The method: which singular triplets, then B and A from them -----------------------------------

def triplet_indices(m, r, method, generator=None):
    """Which r of W's m singular triplets the method takes (MiCA: for its frozen B), σ descending."""
    if method == "pissa":  # the r largest
        return torch.arange(r)
    if method in ("milora", "mica"):  # the r smallest
        return torch.arange(m - r, m)
    if method == "middle":  # the official code's "mid" ablation
        return torch.arange((m - r) // 2, (m - r) // 2 + r)
    if method == "random":  # the paper's Table 6 ablation
        return torch.randperm(m, generator=generator)[:r].sort().values
    raise ValueError(f"{method!r} trains no singular triplets; choose one of {', '.join(DECOMPOSING)}")

def full_svd_triplets(W, idx):
    """The reference route, PEFT's and the official code's: a full SVD. -> U, S, Vh of idx, σmax."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, idx], S[idx], Vh[idx], S[0]

@torch.no_grad()
def singular_triplets(weight, r, method="milora", generator=None, fast=True):
    """The method's r triplets of W (out×in): U (out×r), S (r), Vh (r×in), float32, on W's device.
    fast=True takes appendix B's route, fast=False a full SVD: the same triplets, to rounding."""
    device = "cuda" if torch.cuda.is_available() and not weight.is_cuda else weight.device
    W = weight.detach().to(device, torch.float32)  # float32 whatever W's dtype; a GPU if there is one
    m = min(W.shape)
    if not 1 <= r < m:
        raise ValueError(f"r must be in [1, min(out, in)) = [1, {m}), got {r}")
    if not W.abs().max().isfinite():  # max propagates NaN: one pass, and no mask the size of W
        raise ValueError("weight contains NaN or Inf: it has no SVD to split")
    idx = triplet_indices(m, r, method, generator)
    U, S, Vh, smax = fast_triplets(W, idx)[:4] if fast else full_svd_triplets(W, idx)
    S = torch.where(S > 2 * EPS * smax, S, 0)  # float32 can't tell σ below this from 0
    # A pair's sign is arbitrary: fix it (u's largest entry > 0, as svd_flip), so runs and routes agree.
    sign = U.gather(0, U.abs().argmax(0, keepdim=True)).sign()  # 1×r
    return (U * sign).to(weight.device), S.to(weight.device), (Vh * sign.T).to(weight.device)

def svd_factors(weight, r, method="milora", scale=1.0, generator=None, fast=True):
    """B = U √(Σ/scale) (out×r) and A = √(Σ/scale) Vᵀ (r×in) from the method's r triplets. The adapter
    adds scale·B A (scale = α/r): the chosen part of W exactly, for any α, as PEFT divides Σ too."""
    U, S, Vh = singular_triplets(weight, r, method, generator, fast)
    sqrt_s = (S / scale).sqrt()  # r
    return (U * sqrt_s).contiguous(), (sqrt_s[:, None] * Vh).contiguous()  # out×r, r×in

# 2. The adapter layers ----------------------------------------------------------------------------

def is_conv1d(layer):
    """transformers' Conv1D (GPT-2 and other older models): a linear layer, its weight stored in×out."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")

def linear_weight(layer):
    """W of y = W x + b, out×in: nn.Linear's weight, or a transposed view of Conv1D's."""
    return layer.weight.T if is_conv1d(layer) else layer.weight

def linear_shape(layer):
    """(out, in), from the layer's sizes: under ZeRO-3 its weight may be an empty shard."""
    return (layer.nf, layer.nx) if is_conv1d(layer) else (layer.out_features, layer.in_features)

class AdapterLayer(nn.Module):
    """A frozen linear layer with an adapter beside it: y = W x + b + update(dropout(x))."""

    def __init__(self, base, r, dropout, method):
        super().__init__()
        self.base_layer = base  # nn.Linear, or transformers' Conv1D
        self.r, self.method = r, method
        self.out_features, self.in_features = linear_shape(base)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # disable_adapters sets it

    @torch.no_grad()
    def initialize(self, state=None, generator=None, fast=True):
        """Copy in `state`, the layer's part of an adapter_state_dict; without one, MiSS's D stays 0."""
        for k, tensor in (state or {}).items():
            getattr(self, k).copy_(tensor)

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (tokens, in): 2-D, so the update can add into y in place
        y = self.base_layer(x)  # (tokens, out); the layer keeps no output for backward: y may change
        if not self.disabled:
            self.add_update_(y, x)
        return y.view(*lead, -1)

class LoraLinear(AdapterLayer):
    """y = W x + b + (α/r)·B A dropout(x), B out×r, A r×in. W is frozen: the pretrained weight for LoRA
    and MiCA; for SVD methods the residual W₀ − (α/r)·B₀A₀, and B, A start at B₀, A₀: y is as it was."""

    def __init__(self, base, r, alpha, dropout=0.0, method="lora"):
        super().__init__(base, r, dropout, method)
        self.alpha, self.scaling = alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=device))  # r×in, float32
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))  # out×r, as PEFT
        self.lora_B.requires_grad_(method != "mica")  # MiCA trains A only
        if method in SVD_METHODS:  # B₀ and A₀, kept for subtract_init_ and save_adapter's BA − B₀A₀
            self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
            self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))

    @torch.no_grad()
    def initialize(self, state=None, generator=None, fast=True):
        """Fill A, B (B₀, A₀) by the method, or from `state`, the layer's adapter_state_dict part."""
        W = linear_weight(self.base_layer)
        if state is None and self.method in SVD_METHODS:  # training starts at B₀, A₀
            B0, A0 = svd_factors(W, self.r, self.method, self.scaling, generator, fast)
            state = {"lora_A": A0, "lora_B": B0, "lora_A0": A0, "lora_B0": B0}
        if state is None and self.method == "mica":  # B = U_m, W's r minor left vectors; A = 0
            state = {"lora_B": singular_triplets(W, self.r, "mica", fast=fast)[0]}
        if state is None:  # LoRA: A as nn.Linear's default init (as PEFT and loralib), B = 0
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        super().initialize(state)

    @torch.no_grad()
    def subtract_init_(self, buffer):
        """W ← W − (α/r)·B₀A₀ in place, computed in `buffer` (float32, or float64 for a float64 W) and
        stored in W's dtype: it allocates nothing (but B₀, A₀ as float64), so it can't fail half-way."""
        W = linear_weight(self.base_layer)
        tmp = buffer[:W.numel()].view(W.shape).copy_(W)
        W.copy_(tmp.addmm_(self.lora_B0.to(tmp), self.lora_A0.to(tmp), alpha=-self.scaling))

    def add_update_(self, y, x):
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (tokens, r) = A x
        _add_matmul_(y, h, self.lora_B.T, self.scaling)  # y += (α/r)·h Bᵀ

    def delta_weight(self, dtype=torch.float32):
        """What the adapter adds to W now, (α/r)·B A: out×in."""
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

class MissLinear(AdapterLayer):
    """y = W x + b + Dᵀ Σₖ xₖ: the input's r-sized shards xₖ, summed; D (r×out) starts at 0."""

    def __init__(self, base, r, dropout=0.0):
        super().__init__(base, r, dropout, "miss")
        self.miss_block = nn.Parameter(torch.zeros(r, self.out_features, device=base.weight.device))

    def add_update_(self, y, x):
        x = self.dropout(x.to(self.miss_block.dtype))
        if x.shape[-1] % self.r:  # like PEFT: in_features padded up to a multiple of r
            x = F.pad(x, (0, -x.shape[-1] % self.r))
        shard_sum = x.view(len(x), -1, self.r).sum(1)  # (tokens, r)
        _add_matmul_(y, shard_sum, self.miss_block)  # y += (Σₖ xₖ) D

    def delta_weight(self, dtype=torch.float32):
        """Input column j is summed into shard slot j mod r, so ΔW[o, j] = D[j mod r, o]: out×in."""
        shards = -(-self.in_features // self.r)
        return self.miss_block.T.to(dtype).repeat(1, shards)[:, :self.in_features]

ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_A0", "lora_B0", "miss_block")

# 3. The model: adapting, saving for the untouched model, loading, merging -------------------------

def apply_adapters(model, method="milora", r=64, alpha=None, dropout=0.0,
                   target_modules=PAPER_TARGETS, init_state=None, fast=True,
                   gather=contextlib.nullcontext):
    """Put an adapter beside every linear layer that target_modules names, in place; only the
    adapters train. All or nothing: everything is checked and initialised before the model changes.
    method: lora, pissa, milora, miss, mica, or the paper's ablations middle and random.
    alpha: scaling = alpha/r; default 2r for LoRA, else r (the paper's, and PEFT's MiCA example).
    target_modules: names or name suffixes, or a regex on the full name (PEFT's rule); or
        "all-linear": every nn.Linear and Conv1D but the output head. Appendix A says what is refused.
    init_state: an adapter_state_dict() of a run with the same settings: resumes it, with no new SVD.
    fast=False: a full SVD per layer (the reference route) instead of appendix B's.
    gather: under ZeRO-3, gather(weight) is a context in which the weight is whole and changes stay."""
    alpha = check_args(method, r, alpha, dropout, target_modules)
    targets = find_targets(model, method, r, target_modules, init_state is None, gather)
    names = [name for name, _ in targets]
    if method == "miss":
        adapters = [MissLinear(layer, r, dropout) for _, layer in targets]
    else:
        adapters = [LoraLinear(layer, r, alpha, dropout, method) for _, layer in targets]
    states = [None] * len(adapters) if init_state is None else split_state(names, adapters, init_state)
    initialize_all(adapters, names, states, fast, gather)  # the slow part: the SVDs
    swap_in(model, targets, adapters, gather)  # the model changes here, all at once
    return model

def adapter_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."

def save_adapter(model, path):
    """Write a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) for the untouched
    model. An SVD method trains on the residual W₀ − (α/r)B₀A₀, so for W₀ its update is (α/r)(BA − B₀A₀)
    = (α/r)[B | −B₀]·[A ; A₀]: a LoRA of rank 2r, α doubled to keep α/r (PEFT's conversion)."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to save")
    tensors = {}
    for name, layer in layers:
        key = PREFIX + name
        if isinstance(layer, MissLinear):
            tensors[f"{key}.miss_block"] = layer.miss_block
        elif layer.method in SVD_METHODS:
            tensors[f"{key}.lora_A.weight"] = torch.cat([layer.lora_A, layer.lora_A0])  # 2r×in
            tensors[f"{key}.lora_B.weight"] = torch.cat([layer.lora_B, -layer.lora_B0], 1)  # out×2r
        else:  # LoRA and MiCA leave W₀ as it is: their A and B as they are
            tensors[f"{key}.lora_A.weight"] = layer.lora_A
            tensors[f"{key}.lora_B.weight"] = layer.lora_B
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    first = layers[0][1]  # every layer has the same method, rank and dropout
    p = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {"target_modules": _saved_targets(model, layers), "bias": "none",
              "modules_to_save": None, "inference_mode": True, "task_type": _task_type(model),
              "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)}
    if isinstance(first, MissLinear):
        config.update(peft_type="MISS", r=first.r, miss_dropout=p, init_weights=True, mini_r=1)
    else:
        k = 2 if first.method in SVD_METHODS else 1  # an SVD method's update has rank 2r
        conv1d = any(is_conv1d(layer.base_layer) for _, layer in layers)  # PEFT's flag for Conv1D
        config.update(peft_type="LORA", r=k * first.r, lora_alpha=k * first.alpha, lora_dropout=p,
                      init_lora_weights=True, use_rslora=False, use_dora=False, fan_in_fan_out=conv1d)
    os.makedirs(path, exist_ok=True)
    write_atomically(os.path.join(path, WEIGHTS), lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    write_json(config, os.path.join(path, CONFIG))

def load_adapter(model, path):
    """Load a PEFT LoRA or MiSS adapter directory (ours or PEFT's) onto the untouched model."""
    config, state = read_adapter(path)  # only what apply_adapters can rebuild, or a one-line error
    state = {k.removeprefix(PREFIX).removesuffix(".weight"): v for k, v in state.items()}
    r, targets = config["r"], config["target_modules"]
    if config["peft_type"] == "MISS":
        return apply_adapters(model, "miss", r, None, config.get("miss_dropout", 0.0), targets, state)
    alpha = config.get("lora_alpha", 8)
    if config.get("use_rslora") and isinstance(r, int) and isinstance(alpha, numbers.Real):
        alpha *= math.sqrt(r)  # rsLoRA scales by α/√r, which is α·√r / r in our α/r
    return apply_adapters(model, "lora", r, alpha, config.get("lora_dropout", 0.0), targets, state)

@torch.no_grad()
def merge_adapters(model):
    """Fold every adapter into its weight and put the plain layer back. A merged model stays so."""
    for name, layer in adapter_layers(model):
        W = linear_weight(layer.base_layer)
        W.copy_(W.to(_wide(W)) + layer.delta_weight(_wide(W)).to(W.device))  # wide: one rounding
        _replace(model, name, layer.base_layer)
    return model

@contextlib.contextmanager
def disable_adapters(model):
    """In this block the adapters are off: the model is the frozen one, the residual for SVD methods."""
    layers = [m for _, m in adapter_layers(model)]
    before = [m.disabled for m in layers]  # restored on exit: a nested block keeps the outer's state
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, disabled in zip(layers, before):
            m.disabled = disabled

def adapter_state_dict(model):
    """Every adapter tensor, trained or saved init factor, by module path: what a checkpoint keeps."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_TENSORS}

# Appendix A: the checks, before anything changes: an error names the culprit and the remedy -------

def check_args(method, r, alpha, dropout, target_modules):
    """-> alpha, defaulted; or a clear error for the first argument that is out of range."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if method == "miss" and alpha is not None:
        raise ValueError("MiSS has no alpha; leave alpha=None")
    if alpha is not None and not (_is_real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number (scale alpha/r), got {alpha!r}")
    if not (_is_real(dropout) and 0 <= dropout < 1):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    names = [target_modules] if isinstance(target_modules, str) else target_modules
    listed = isinstance(names, (list, tuple, set)) and len(names) > 0
    if not listed or not all(isinstance(t, str) and len(t) > 0 for t in names):
        raise ValueError("target_modules must be a regex string, 'all-linear' or a non-empty list "
                         f"of names, got {target_modules!r}")
    default = 2 * r if method == "lora" else r
    return default if alpha is None else alpha

def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)

def find_targets(model, method, r, target_modules, fresh, gather):
    """-> [(name, layer)]: the linear layers target_modules names, each checked to take an adapter
    (a fresh one of rank r, if fresh); or an error that names the first that can't, and why."""
    if adapter_layers(model):
        raise ValueError("model already has adapters: merge_adapters() it first, or start afresh")
    targets = _targets(model, target_modules)
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} match nothing in the model; its "
                         f"linear layers are named: {_linear_names(model)}")
    params = list(model.named_parameters(remove_duplicate=False))  # a tied weight, under each name
    for name, target in targets:
        _check_target(model, name, target, method, r, fresh, gather, params)
    for t in [] if isinstance(target_modules, str) else target_modules:  # a list of names
        if not any(_matches(n, [t]) for n, _ in targets):
            warnings.warn(f"target_modules names {t!r}, which is not in the model, so it gets no "
                          f"adapter; its linear layers are named: {_linear_names(model)}", stacklevel=3)
    return targets

def _matches(name, targets):
    """PEFT's rule: a string is a regex on the full name, a list holds names or name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)

def _is_linear(module):
    return isinstance(module, nn.Linear) or is_conv1d(module)

def _linear_names(model):
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)}
    return ", ".join(sorted(names)) or "(none)"

def _targets(model, target_modules):
    """What target_modules names: modules, and parameters outside a linear layer (fused experts'
    weights); for "all-linear", every nn.Linear and Conv1D but the output head."""
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        transformers = hasattr(model, "get_output_embeddings")
        head = model.get_output_embeddings() if transformers else getattr(model, "lm_head", None)
        left = [n for n, p in model.named_parameters() if p.dim() > 2]  # experts, convolutions
        if left:
            warnings.warn(f"target_modules 'all-linear' adapts no weight of 3 or more dimensions: "
                          f"not {left[0]}, nor {len(left) - 1} more", stacklevel=4)
        return [(n, m) for n, m in model.named_modules() if _is_linear(m) and m is not head]
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
    layers = {n for n, m in model.named_modules() if _is_linear(m)} | {n for n, _ in found}
    found += [(n, p) for n, p in model.named_parameters()
              if _matches(n, target_modules) and n.rpartition(".")[0] not in layers]
    return found

def _check_target(model, name, target, method, r, fresh, gather, params):
    """An error naming `target`, its kind and shape and the remedy, if it can't take an adapter."""
    parent = model.get_submodule(name.rpartition(".")[0])
    W = target if isinstance(target, torch.Tensor) else getattr(target, "weight", None)
    kind = type(parent if W is target else target).__name__
    what = f"{name} ({kind})" if W is None else f"{name} ({kind}, {W.dtype} {tuple(W.shape)})"
    leave_out = f"leave {name.rsplit('.', 1)[-1]} out of target_modules"
    if W is target:  # a parameter of a module that is no layer
        raise TypeError(f"{what} is a {W.dim()}-D parameter, no layer (fused MoE experts are out "
                        f"of scope): {leave_out}")
    if W is not None and (type(W) is not nn.Parameter  # bitsandbytes' Params4bit, Int8Params
                          or W.dtype.itemsize < 2 or not W.dtype.is_floating_point):  # int8, float8
        raise TypeError(f"{what} is a quantized layer: load the model unquantized, or {leave_out}")
    if not _is_linear(target):
        raise TypeError(f"{what} is not a linear layer (nn.Linear or Conv1D): {leave_out}")
    own_forward = not is_conv1d(target) and type(target).forward is not nn.Linear.forward
    if own_forward or isinstance(parent, nn.MultiheadAttention):  # MHA reads its weight directly
        raise TypeError(f"{what} need not compute W x + b where it is used: {leave_out}")
    if method == "miss" and is_conv1d(target):
        raise TypeError(f"{what}: PEFT's MiSS has no Conv1D layer; pick a LoRA method, or {leave_out}")
    tied = [n for n, p in params if p is W and n != f"{name}.weight"]
    if tied:  # as lm_head's and embed_tokens' often are
        raise ValueError(f"{name}.weight is tied to {', '.join(tied)}, which an adapter would "
                         f"change too: leave {name} out of target_modules, or untie them")
    shape = linear_shape(target)
    if fresh and not r < min(shape):  # a restored adapter is checked by its tensors' shapes
        raise ValueError(f"r={r} is too large for {name} (weight {shape[0]}×{shape[1]})")
    with gather(W):  # ZeRO-3: whole while it is read
        if tuple(linear_weight(target).shape) != shape:  # packed, as 4-bit data in a float tensor
            raise TypeError(f"{what} is a quantized layer: load the model unquantized, or {leave_out}")
        if not W.abs().max().isfinite():  # as in singular_triplets
            raise ValueError(f"{name}: weight contains NaN or Inf")

def split_state(names, adapters, state):
    """-> each adapter's part of `state`, or an error naming the first tensor that doesn't fit."""
    parts = [{} for _ in adapters]
    for name, adapter, part in zip(names, adapters, parts):
        for k, tensor in _own_tensors(adapter).items():
            key = f"{name}.{k}"
            if key not in state:
                raise ValueError(f"adapter has no tensor for {key} ({tuple(tensor.shape)})")
            if state[key].shape != tensor.shape:
                raise ValueError(f"{key}: adapter shape {tuple(state[key].shape)} does not fit "
                                 f"the model's {tuple(tensor.shape)}")
            if not state[key].is_floating_point() or not state[key].isfinite().all():
                raise ValueError(f"{key}: adapter tensor is not finite floating point")
            part[k] = state[key]
    extra = set(state) - {f"{name}.{k}" for name, part in zip(names, parts) for k in part}
    if extra:
        raise ValueError(f"adapter tensor {min(extra)} matches no target module of this model")
    return parts

UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias",
               "layers_to_transform", "exclude_modules", "trainable_token_indices",
               "layer_replication", "target_parameters", "alora_invocation_tokens", "use_qalora",
               "use_bdlora", "arrow_config", "kasa_config")  # PEFT options apply_adapters lacks
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")  # PEFT saves these for a residual model

def read_adapter(path):
    """-> (config, tensors) of a PEFT directory with a plain LoRA or MiSS adapter, or an error."""
    config_file, weights_file = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    if not (os.path.isfile(config_file) and os.path.isfile(weights_file)):
        raise FileNotFoundError(f"{path}: an adapter directory needs {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads(pathlib.Path(config_file).read_text())
        state = load_file(weights_file)
    except Exception as e:  # json's and safetensors' own errors: a truncated or corrupt file
        raise ValueError(f"{path}: cannot read the adapter ({type(e).__name__}: {e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: a PEFT config is a JSON object, not {type(config).__name__}")
    bad = [k for k in UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        bad.append("bias")
    if str(config.get("init_lora_weights")).lower().startswith(RESIDUAL_INITS):
        bad.append("init_lora_weights")  # PEFT rebuilds the residual model as it loads
    if config.get("peft_type") == "MISS" and config.get("init_weights", True) is not True:
        bad.append("init_weights")  # MiSS's "bat" and "mini" variants
    if config.get("peft_type") not in ("LORA", "MISS") or bad:
        raise ValueError(f"{config_file}: only plain LoRA and MiSS adapters load here (peft_type="
                         f"{config.get('peft_type')!r}, unsupported options: "
                         f"{', '.join(bad) or 'none'})")
    missing = [k for k in ("r", "target_modules") if k not in config]
    if missing:
        raise ValueError(f"{config_file}: no {' and no '.join(missing)}")
    return config, state

def _task_type(model):
    """CAUSAL_LM for a transformers causal LM, whose PEFT class needs it; else None, for any model."""
    decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", True) is False
    return "CAUSAL_LM" if decoder and hasattr(model, "prepare_inputs_for_generation") else None

def _saved_targets(model, layers):
    """The adapted modules' names for the config: short where those pick no other module, else full."""
    names = sorted(n for n, _ in layers)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    picked = sorted(n for n, _ in model.named_modules() if _matches(n, short))
    return short if picked == names else names

# Appendix B: the same triplets, faster than a full SVD --------------------------------------------
# The Gram W Wᵀ's eigenvectors are W's left singular vectors, and eigh costs less than svd, but the
# Gram squares σ: float32 resolves only σ above √eps·σmax = 3.5e-4·σmax, and real weights reach
# 1e-6·σmax. So the Gram only starts: Rayleigh–Ritz on W makes triplets of its eigenvectors, a Newton
# step squares their error, a check follows; where it fails, inverse iteration (minor side); last, svd.

MARGIN = 16  # Gram eigenvectors taken beyond each end of the chosen ones: near-ties stay in the block
MAX_ANGLE = 1e-3  # Rayleigh–Ritz's estimated angle (rad) to the true span under which Newton is enough
TOL = 2e-5  # the estimated angle asked of the others, after Newton or inverse iteration
MAX_ITERS = 8  # inverse-iteration steps before giving up for a full SVD

def fast_triplets(W, idx):
    """full_svd_triplets' (U, S, Vh, σmax) by the route above, and which check accepted them."""
    if W.shape[0] > W.shape[1]:  # the SVD of Wᵀ is W's with U and V swapped
        U, S, Vh, smax, route = fast_triplets(W.T, idx)
        return Vh.T, S, U.T, smax, route
    top, r = W.abs().max(), len(idx)
    if top == 0:  # any orthonormal vectors, with σ = 0
        return torch.eye(len(W), r).to(W), W.new_zeros(r), torch.eye(r, W.shape[1]).to(W), top, "zero"
    # A power of two scales exactly: it keeps the Gram from overflowing or underflowing at 1e±18.
    step = 1.0 if 2 ** -16 <= top <= 2 ** 16 else 2.0 ** -math.floor(math.log2(top))
    U, S, Vh, smax, route = _block_triplets(W * step if step != 1 else W, idx)
    return U.float(), S.float() / step, Vh.float(), smax / step, route

def _block_triplets(W, idx):
    m = W.shape[0]  # W is m×n, m ≤ n
    if int(idx.max()) - int(idx.min()) >= m // 2:  # random's picks, or r > m/2: the block would be
        return (*full_svd_triplets(W, idx), "full svd")  # most of the spectrum, and save nothing
    h = m // 2  # eigh reads only the lower triangle of W Wᵀ: skip its top-right quarter
    gram = torch.cat([F.pad(W[:h] @ W[:h].T, (0, m - h)), W[h:] @ W.T])  # m×m
    lam, Q = torch.linalg.eigh(gram)  # ascending
    sigma, Q = lam.flip(0).clamp_min(0).sqrt(), Q.flip(1)  # σ estimates, descending as idx
    lo, hi = max(0, int(idx.min()) - MARGIN), min(m, int(idx.max()) + 1 + MARGIN)  # the block
    outside = torch.cat([sigma[lo - 1:lo] if lo else sigma[:0], sigma[hi:hi + 1]])  # neighbours
    W64 = W.double()  # Rayleigh–Ritz and the check in float64: their products add no rounding
    U, S, Vh = _rayleigh_ritz(W64, Q[:, lo:hi].double(), idx.to(W.device) - lo)
    res, angle = _check(W64, U, S, Vh, outside)
    # Newton: W Wᵀu − σ²u = σ·res, so u's error along q_j outside the block is σ q_jᵀres/(σ_j² − σ²)
    D = (S / (sigma[:, None].double() ** 2 - S * S)).float()  # m×r
    D[lo:hi] = 0  # inside the block Rayleigh–Ritz is exact already
    C = Q @ (D * (Q.T @ res.float()))  # m×r, the correction to U: float32 is precise enough
    U = U - C
    Vh = Vh - (C.T @ W) / S.clamp_min(EPS * sigma[0])[:, None]  # and v follows, v = Wᵀu / σ
    nu, nv = U.norm(dim=0), Vh.norm(dim=1)
    U, S, Vh = U / nu, S * nv / nu, Vh / nv[:, None]  # unit vectors again
    if angle <= MAX_ANGLE:  # Rayleigh–Ritz's estimate, and the Newton step on top
        return U, S, Vh, sigma[0], "rayleigh-ritz"
    if _check(W64, U, S, Vh, outside)[1] <= TOL:
        return U, S, Vh, sigma[0], "newton"
    if int(idx[0]) == m - len(idx):  # the r smallest: inverse iteration converges to these
        triplets = _inverse_iteration(W, Q, sigma, max(0, lo - MARGIN), len(idx))
        if triplets is not None:
            return (*triplets, sigma[0], "inverse iteration")
    return (*full_svd_triplets(W, idx), "full svd")  # the last resort

def _rayleigh_ritz(W, X, pick):
    """W's exact SVD on span(X) (X m×k, both float64), and its triplets `pick`: U, S, Vh. eigh's X
    is orthonormal only to ~√m·eps, which would scale σ as much: a Cholesky QR makes it so."""
    X = torch.linalg.solve_triangular(torch.linalg.cholesky(X.T @ X), X.T, upper=False).T  # X L⁻ᵀ
    P = X.T @ W  # k×n: W on the block
    C = torch.linalg.eigh(P @ P.T).eigenvectors.flip(1)[:, pick]
    Vh = C.T @ P  # PPᵀ squares only the block's spread of σ, which float64 resolves
    S = Vh.norm(dim=1)
    return X @ C, S, Vh / S[:, None]  # Pᵀc = σv; a σ of 0 leaves NaN in v, which fails the check

def _check(W, U, S, Vh, outside):
    """The residuals W v − σu (m×r), and the largest ‖W v − σu‖ over its σ's gap to the block's
    neighbours: by Wedin's theorem an estimate of u's angle to the true span (not a bound: the
    Gram's gaps are estimates too). test_milora.py measures the accuracy itself, against float64."""
    res = W @ Vh.T - U * S  # m×r
    gap = (S[:, None] - outside.double()[None, :]).abs().min(1).values if len(outside) else torch.inf
    return res, float((res.norm(dim=0) / gap).max())

def _inverse_iteration(W, Q, sigma, lo, r):
    """The r smallest triplets by inverse subspace iteration with R of Wᵀ = Q_w R (W Wᵀ = RᵀR):
    solves with R never square σ. W = Rᵀ Q_wᵀ, so Rᵀ's triplets (u, σ, z) are W's with v = Q_w z."""
    m, n = W.shape
    a, tau = torch.geqrf(W.T.double())  # n×m: R in its upper triangle, Q_w as reflectors below
    R = a[:m].triu()  # m×m
    X, outside, smax = Q[:, lo:].double(), sigma[lo - 1:lo], sigma[0]  # the Gram's from lo on
    pivots = R.diagonal()  # rank deficiency gives (near-)zero pivots: lift them to float32's noise
    lifted = EPS * smax * torch.where(pivots < 0, -1.0, 1.0)
    pivots.copy_(torch.where(pivots.abs() < EPS * smax, lifted, pivots))
    for _ in range(MAX_ITERS):
        X = torch.linalg.solve_triangular(R.T, X, upper=False)  # (Rᵀ)⁻¹X, then R⁻¹ of it:
        X = torch.linalg.qr(torch.linalg.solve_triangular(R, X, upper=True)).Q  # (W Wᵀ)⁻¹ X
        RX = R @ X  # R = Z Σ Uᵀ, so RX = Z Σ (UᵀX): the eigh of (RX)ᵀRX gives Ritz triplets
        lam, C = torch.linalg.eigh(RX.T @ RX)  # ascending
        C, S = C[:, :r].flip(1), lam[:r].flip(0).clamp_min(0).sqrt()  # the r smallest, descending
        U, Z = X @ C, RX @ C / S  # S > 0 as R is invertible (lifted pivots); a 0's NaN fails
        if _check(R.T, U, S, Z.T, outside)[1] <= TOL:
            V = torch.ormqr(a, tau, F.pad(Z, (0, 0, 0, n - m)))  # V = Q_w [Z; 0], n×r
            return U, S, V.T
    return None

# Appendix C: machinery: the init over processes, the swap, Ctrl-C, the fused forward, files -------

def initialize_all(adapters, names, states, fast, gather):
    """Every adapter's init. Under torch.distributed every process calls apply_adapters with the same
    RNG state: each decomposes its share of the layers, and sends what it made to the others."""
    method = adapters[0].method
    fresh = method in DECOMPOSING and states[0] is None  # an SVD per layer to do
    mine = process_share(len(adapters)) if fresh else range(len(adapters))
    # "random" draws each layer's seed here, in order: the same whichever process decomposes it.
    seeds = torch.randint(2 ** 62, (len(adapters),)) if method == "random" else [0] * len(adapters)
    for i in tqdm(range(len(adapters)), desc=f"{method} init", unit="layer", leave=False):
        with gather(adapters[i].base_layer.weight):  # ZeRO-3: all gather, layer i's owner decomposes
            if i in mine:
                adapters[i].initialize(states[i], torch.Generator().manual_seed(int(seeds[i])), fast)
    if fresh and dist.is_available() and dist.is_initialized():
        for i, adapter in enumerate(adapters):
            for tensor in _own_tensors(adapter).values():  # from layer i's decomposer to the rest
                dist.broadcast(tensor, src=i % dist.get_world_size())
    for name, adapter in zip(names, adapters):
        zeros = int((adapter.lora_B0.abs().amax(0) == 0).sum()) if method in SVD_METHODS else 0
        if zeros:
            warnings.warn(f"{name}: {zeros} of the {adapter.r} singular values {method} chose are "
                          f"0: those columns of B and rows of A are 0 and can't train", stacklevel=3)

def _own_tensors(adapter):
    """The adapter's own tensors by name (lora_A, lora_B, ...): views of their storage."""
    return {k: v for k, v in adapter.state_dict().items() if k in ADAPTER_TENSORS}

def process_share(n):
    """Which of n layers this process decomposes: all, or every N-th from its rank on (N processes)."""
    if dist.is_available() and dist.is_initialized():
        return range(dist.get_rank(), n, dist.get_world_size())
    return range(n)

def swap_in(model, targets, adapters, gather):
    """Freeze the model, write the residuals and put the adapters in place, in a step that allocates
    nothing (but ZeRO-3's gathers) and holds Ctrl-C: the model is never left half-changed."""
    svd = adapters[0].method in SVD_METHODS  # their residuals go through a scratch buffer,
    keys = {(layer.weight.device, _wide(layer.weight)) for _, layer in targets} if svd else ()
    size = max(math.prod(linear_shape(layer)) for _, layer in targets)  # one per device and dtype
    buffers = {key: torch.empty(size, device=key[0], dtype=key[1]) for key in keys}
    with _holding_interrupts():
        for p in model.parameters():
            p.requires_grad_(False)
        for (name, layer), adapter in zip(targets, adapters):
            if svd:
                with gather(layer.weight):
                    adapter.subtract_init_(buffers[layer.weight.device, _wide(layer.weight)])
            _replace(model, name, adapter.train(layer.training))  # eval mode stays eval mode

def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)

def _wide(W):
    return torch.promote_types(W.dtype, torch.float32)  # float32, or float64 for a float64 weight

@contextlib.contextmanager
def _holding_interrupts():
    """Ctrl-C in the block takes effect at its end (in the main thread, which gets the signals)."""
    caught = []
    main = threading.current_thread() is threading.main_thread()
    if main:
        previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt

def _add_matmul_(y, h, M, alpha=1.0):
    """y += alpha·h@M, in place, in the GEMM where the dtypes allow (PEFT's y + h@M reads y again)."""
    if y.dtype == h.dtype:  # under autocast h is bf16 while M, an adapter, stays float32
        return y.addmm_(h, M.to(h.dtype), alpha=alpha)
    return y.add_((alpha * (h @ M)).to(y.dtype))

def write_atomically(path, write):
    """write(tmp_path), then rename it over path: a crash never leaves a half-written file."""
    try:
        write(f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    finally:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")

def write_json(obj, path):
    write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=2)))

# Demo: python milora.py ---------------------------------------------------------------------------

if __name__ == "__main__":  # a toy model: four blocks of the five linear maps the paper adapts
    import collections, copy, time
    torch.manual_seed(0)
    d, ff = 512, 1536
    base = nn.Sequential(*[nn.Sequential(collections.OrderedDict(
        q_proj=nn.Linear(d, d), k_proj=nn.Linear(d, d), v_proj=nn.Linear(d, d),
        up_proj=nn.Linear(d, ff), down_proj=nn.Linear(ff, d))) for _ in range(4)])
    x = torch.randn(8, d)
    y0 = base(x).detach()
    for method in METHODS:
        model, t = copy.deepcopy(base), time.perf_counter()
        apply_adapters(model, method, r=64)
        seconds, err = time.perf_counter() - t, ((model(x) - y0).abs().max() / y0.abs().max()).item()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{method:6} r=64: init {seconds:4.2f} s, max |Δy|/|y| {err:.0e}, trainable {trainable:,}")
