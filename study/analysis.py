"""
The study's measures and its report: the paper's section 5 analyses (subspace_similarity, delta_analysis) on each
trained adapter (analysis), the Q4_1 checkpoint's rounding noise (quantisation_steps), and the tables and plot that
summarise every run (report). run.py runs it.
"""
import csv, glob, json, math, os, re, statistics, sys

import torch
from tqdm.auto import tqdm

import eval_gsm8k
import milora
from train_math import FREE_SETTINGS

PHI = ("phi_principal", "phi_minor", "phi_random")  # φ of ΔW's top singular vectors to W's (delta_analysis)
GGUF_MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}  # llama.cpp's tensor names -> transformers' module names

def quantisation_steps(path):
    """{module name: the RMS of its rounding steps d} for every block-quantised Llama weight in a GGUF file. Q4_0,
    Q4_1, Q5_0, Q5_1 and Q8_0 store blocks of 32 weights, each block starting with its step d as a float16;
    rounding to that grid adds noise of variance d²/12 to each weight. Other tensor types are left out."""
    import gguf, numpy as np
    Q = gguf.GGMLQuantizationType
    steps = {}
    for t in gguf.GGUFReader(path).tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if m and m.group(2) in GGUF_MODULES and t.tensor_type in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
            block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
            d = np.asarray(t.data).view(np.uint8).reshape(-1, block_bytes)[:, :2].copy().view(np.float16)
            steps[f"model.layers.{m.group(1)}.{GGUF_MODULES[m.group(2)]}"] = float(np.sqrt(np.mean(d.astype(float) ** 2)))
    return steps

def noise_sigma(step, shape):
    """A noise matrix's typical singular value for rounding to a grid of `step`: √(step²/12)·√max(out, in)."""
    return math.sqrt(step ** 2 / 12) * math.sqrt(max(shape))

# The paper's analyses (section 5 and appendix A.1) ------------------------------------------------------------------

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
    for name, method in (("principal", "pissa"), ("minor", "milora"), ("random", "random")):
        idx = milora.triplet_indices(k, r, method, generator)  # the methods' rule; random: other picks
        out[f"phi_{name}"] = subspace_similarity(U, Uw[:, idx]) if rank_r else math.nan
        out[f"phi_{name}_right"] = subspace_similarity(V, Vhw[idx].T) if rank_r else math.nan
    return out

@torch.no_grad()
def analysis(model, r, steps=None):
    """delta_analysis of every adapted matrix, its adapter loaded onto the untouched model (load_adapter), so that
    (α/r)·B A is its ΔW against the pretrained W: Table 7's figures for the middle layer's q_proj (the paper's
    choice, after Hu et al.) and down_proj (its Table 14); the amplification and φ averaged over every matrix and,
    as in Figure 2's right panel, over each module type; and each matrix's own figures under "layers".
    With `steps` (quantisation_steps of the checkpoint) it also places the chosen triplets against the rounding noise:
    each matrix's noise_sigma = √(d²/12)·√max(out, in), a noise matrix's typical singular value, and
    minor_over_noise, principal_over_noise: W's r-th smallest and r-th largest σ over it (the edges of MiLoRA's and
    PiSSA's r triplets); "noise_floor" holds their median over the layers of each module type."""
    layers = milora.adapter_layers(model)
    if any(m.method in milora.SVD_METHODS for _, m in layers):  # applied in place: B A is not ΔW, W is the residual
        raise ValueError("analysis needs the adapters loaded onto the untouched model: save_adapter, then load_adapter")
    depth = {n: int(m.group(1)) for n, _ in layers if (m := re.search(r"\.(\d+)\.", n))}
    middle = max(depth.values(), default=0) // 2  # index 15 (the 16th) of LLaMA2-7B's 32, 14 of SmolLM2's 30
    generator = torch.Generator().manual_seed(0)  # W's random triplets: the same in every run
    per = {}
    for n, m in tqdm(layers, desc="analysis", unit="matrix"):
        W = milora.linear_weight(m.base_layer)
        per[n] = delta_analysis(m.delta_weight(torch.float64), W, r, generator=generator)
        if steps and n in steps:
            noise = noise_sigma(steps[n], W.shape)
            per[n].update(noise_sigma=noise, minor_over_noise=per[n]["sigma_minor"] / noise,
                          principal_over_noise=per[n]["sigma_principal"] / noise)
    mean = lambda names, k: sum(per[n][k] for n in names) / len(names)
    out = {"analysis_rank": r}
    for kind in ("q_proj", "down_proj"):
        name = next((n for n in per if n.endswith(kind) and depth.get(n, 0) == middle), None)
        if name:
            out[f"{kind}_layer"] = name
            out.update({f"{kind}_{k}": per[name][k] for k in ("w_proj", "dw_proj", "amplification")})
    figures = ("amplification",) + PHI + tuple(f"{k}_right" for k in PHI)
    out["amplification_mean"] = mean(per, "amplification")  # over every matrix, beside the paper's single one
    out.update({k: mean(per, k) for k in figures[1:]})
    kinds = sorted({n.rsplit(".", 1)[-1] for n in per})
    out["by_module"] = {t: {k: mean([n for n in per if n.endswith("." + t)], k) for k in figures} for t in kinds}
    noisy = {t: [v for n, v in per.items() if n.endswith("." + t) and "noise_sigma" in v] for t in kinds}
    if any(noisy.values()):
        out["noise_floor"] = {t: {k: statistics.median(v[k] for v in vs) for k in ("minor_over_noise",
                                                                                   "principal_over_noise")}
                              for t, vs in noisy.items() if vs}
    out["layers"] = per
    return out

FIGURES = {  # what --report tabulates: (column title, number format)
    "accuracy": ("held-out accuracy", ".3f"), "forgetting_kl": ("forgetting KL", ".4f"),
    "forgetting_ce": ("forgetting CE", ".3f"), "q_proj_amplification": ("amplification, mid q_proj", ".3f"),
    "amplification_mean": ("amplification, mean", ".3f"), "phi_principal": ("φ to W's principal", ".3f"),
    "phi_minor": ("φ to W's minor", ".3f"), "phi_random": ("φ to random", ".3f")}
ARM = ("method", "lr", "target_modules")  # what an arm of the study varies; its seeds differ only in `seed`
STUDY_FREE = FREE_SETTINGS | set(ARM) | {"seed"}  # the rest every run of a study shares
STUDY_EVAL = ("model", "data", "rule", "total", "max_new_tokens")  # how every run was scored, the base model's too
STUDY_ADAPTER_EVAL = ("forgetting_text", "forgetting_tokens", "analysis_rank")  # and every adapter's

def mean_std(values):
    """-> (mean, sample standard deviation); no deviation (None) for a single value."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None

def study_runs(folder):
    """-> (rows, settings, scoring, noise): a row per run, from every folder/*.json (run.py's run files), with the arm
    it was trained in (method, lr, target_modules from train_math.py's args.json; method 'base' for the model without
    an adapter), its seed, its FIGURES and its verdicts (each toy problem right or wrong, its completion scored again
    by the run's rule, which must give its count; None without completions, or on data other than toy); the settings
    every run shares; and the noise floor."""
    rows, refs, noise, golds = [], {}, None, None
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            s = json.load(f)
        train = s.get("train") or {}  # train_math.py's args.json, when the adapter came from it
        arm = {k: train.get(k) for k in ARM} if train else {"method": "base"}
        if any({k: r.get(k) for k in ARM} == {k: arm.get(k) for k in ARM} and r["seed"] == train.get("seed")
               for r in rows):
            sys.exit(f"report {folder}: {path} is a second run of {arm} with seed {train.get('seed')}: it would "
                     f"count twice")
        # Means over seeds, and comparisons between arms, mean something only when the runs differ in nothing else:
        # neither in training, but for their arm and seed, nor in scoring. The first run of each kind is the reference.
        checks = [("scored", "all", {k: s.get(k) for k in STUDY_EVAL})]
        if arm["method"] != "base":
            checks += [("trained", "train", {k: v for k, v in train.items() if k not in STUDY_FREE}),
                       ("scored", "adapters", {k: s.get(k) for k in STUDY_ADAPTER_EVAL})]
        for what, kind, mine in checks:
            ref = refs.setdefault(kind, mine)
            if diff := [f"{k} {ref.get(k)} vs {mine.get(k)}" for k in sorted(set(ref) | set(mine))
                        if ref.get(k) != mine.get(k)]:
                sys.exit(f"report {folder}: {path} was {what} differently from the runs before it "
                         f"({', '.join(diff)}): keep each experiment in a folder of its own")
        verdicts = None  # every run is scored alike (checked above): the same problems, the same rule
        if s.get("completions") and s.get("data") == "toy":
            golds = golds or eval_gsm8k.gold_answers(eval_gsm8k.load_data("toy", "test", ("answer",), s["total"]),
                                                     "toy", s["rule"])
            verdicts = [int(eval_gsm8k.RULES[s["rule"]][2](c, g)) for c, g in zip(s["completions"], golds, strict=True)]
            if sum(verdicts) != s.get("correct") or s["accuracy"] != s.get("correct") / s["total"]:
                sys.exit(f"report {folder}: {path} says {s.get('correct')} right (accuracy {s['accuracy']}), but "
                         f"its completions score {sum(verdicts)} of {s['total']} by the {s['rule']} rule on the toy "
                         f"problems")
        rows.append({"run": os.path.relpath(path, folder), **{k: arm.get(k) for k in ARM}, "seed": train.get("seed"),
                     **{k: s.get(k) for k in FIGURES}, "verdicts": verdicts})
        noise = noise or s.get("noise_floor")
    if not rows:
        sys.exit(f"report {folder}: no run files (*.json) in it")
    return rows, refs.get("train", {}), refs["all"], noise

def usual_targets(rows):
    """The target_modules most of a study's runs adapt."""
    return statistics.mode(r["target_modules"] for r in rows if r["method"] != "base") if len(rows) > 1 else None

def arms(rows):
    """-> {arm label: {"method", "lr", "target_modules", "runs", figure: (mean, std)}}: base first, then by method in
    milora.METHODS' order, learning rate and targets. The label names the method, its lr where the study has more
    than one, and its targets where they are not the usual ones."""
    order, usual = ("base",) + milora.METHODS, usual_targets(rows)
    many_lrs = len({r["lr"] for r in rows if r["method"] != "base"}) > 1
    key = lambda r: (order.index(r["method"]) if r["method"] in order else len(order), r["method"],
                     r["lr"] or 0, r["target_modules"] != usual, r["target_modules"] or "")
    table = {}
    for r in sorted(rows, key=key):
        label = r["method"] + (f", lr {r['lr']:g}" if many_lrs and r["lr"] else "") + \
            (f", {r['target_modules']}" if r["method"] != "base" and r["target_modules"] != usual else "")
        table.setdefault(label, {k: r[k] for k in ARM} | {"rows": []})["rows"].append(r)
    for t in table.values():
        runs = t.pop("rows")
        t["runs"] = len(runs)
        t.update({k: mean_std(v) for k in FIGURES if (v := [r[k] for r in runs if r[k] is not None])})
    return table

def curve_kl(points, level):
    """Forgetting KL where a curve of (accuracy, KL) points, in learning-rate order, first climbs to `level` accuracy,
    interpolated linearly between the two points around it. None where it never climbs to it: an accuracy that its
    lowest rate already passes was not measured, and a fall past an over-trained peak is not the cheapest way there."""
    for (a0, k0), (a1, k1) in zip(points, points[1:]):
        if a0 < level <= a1:
            return k0 + (k1 - k0) * (level - a0) / (a1 - a0)
    return None

def matched(rows):
    """Each swept method's forgetting at matched accuracy (Biderman et al. 2024): for every method trained at two
    or more learning rates on the study's usual targets, KL along its accuracy-forgetting curve (curve_kl) at the
    accuracy levels, on a 0.05 grid, that at least two such methods' mean curves climb to; as mean ± std over the
    seeds that ran at every lr. -> {"levels": [...], "targets": ..., method: {level: (mean, std, seeds) or None}}"""
    order, targets = milora.METHODS, usual_targets(rows)
    runs = [r for r in rows if r["method"] in order and r["forgetting_kl"] is not None]
    by = {}  # method -> lr -> seed -> (accuracy, KL), methods in milora.METHODS' order
    for r in sorted(runs, key=lambda r: order.index(r["method"])):
        if r["target_modules"] == targets:
            by.setdefault(r["method"], {}).setdefault(r["lr"], {})[r["seed"]] = (r["accuracy"], r["forgetting_kl"])
    by = {m: lrs for m, lrs in by.items() if len(lrs) > 1}
    means = {m: [tuple(sum(p[i] for p in s.values()) / len(s) for i in (0, 1)) for _, s in sorted(lrs.items())]
             for m, lrs in by.items()}
    levels = [round(0.05 * i, 2) for i in range(21)
              if sum(curve_kl(c, round(0.05 * i, 2)) is not None for c in means.values()) >= 2]
    out = {"levels": levels, "targets": targets}
    for m, lrs in by.items():
        seeds = set.intersection(*(set(s) for s in lrs.values()))
        out[m] = {}
        for level in levels:
            kls = [k for seed in sorted(seeds)
                   if (k := curve_kl([lrs[lr][seed] for lr in sorted(lrs)], level)) is not None]
            out[m][level] = (*mean_std(kls), len(kls)) if kls else None
    return out

def best_rates(rows, total):
    """Each swept method's best learning rate: the one with the highest mean held-out accuracy over its seeds (ties:
    the lower rate), with that mean ± the seeds' std, the binomial error of one score of `total` problems,
    √(p(1 − p)/total), whether the rate is inner (the method also ran below and above it), its ratio to LoRA's, and
    (where the rows have verdicts) its accuracy minus LoRA's best, ± a standard error over problems × seeds. Both score
    the same problems, so the difference is paired: d_i, the difference of problem i's mean verdicts over the seeds,
    gives var(d)/n, which holds the problems' sampling and each seed's flips on single problems. The seeds' variance
    beyond those flips, a shift a seed gives every problem at once, adds max(0, s² − w/n)/seeds for each method (s² the
    variance of its seeds' accuracies, w the mean over problems of each one's variance over the seeds; 0 for a single
    seed). LoRA's own entry is None."""
    usual, by = usual_targets(rows), {}  # method -> lr -> [accuracy]
    for r in rows:
        if r["method"] != "base" and r["target_modules"] == usual:
            by.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r["accuracy"])
    out = {}
    order = lambda m: milora.METHODS.index(m) if m in milora.METHODS else len(milora.METHODS)
    for m, lrs in sorted(by.items(), key=lambda kv: order(kv[0])):
        if len(lrs) > 1:
            means = {lr: mean_std(a) for lr, a in lrs.items()}
            lr = max(sorted(means), key=lambda k: means[k][0])  # max keeps the first (lowest) of equal means
            p = means[lr][0]
            out[m] = {"lr": lr, "accuracy": p, "std": means[lr][1], "seeds": len(lrs[lr]),
                      "binomial": math.sqrt(p * (1 - p) / total), "inner": min(lrs) < lr < max(lrs)}
    at_best = {m: [r.get("verdicts") for r in rows  # each method's verdicts at its best rate, a list per seed
                   if (r["method"], r["lr"], r["target_modules"]) == (m, b["lr"], usual)] for m, b in out.items()}
    def shared_shift(v):  # seeds × problems verdicts -> the variance of their mean that a seed adds to every problem
        if len(v) < 2:
            return 0.0
        flips = statistics.fmean(statistics.variance(p) for p in zip(*v))  # w: each problem's variance over seeds
        return max(0.0, statistics.variance([statistics.fmean(s) for s in v]) - flips / len(v[0])) / len(v)
    for m, b in out.items():
        b["over_lora"] = b["lr"] / out["lora"]["lr"] if "lora" in out else None
        b["minus_lora"] = None
        if "lora" in out and m != "lora" and all(at_best[m] + at_best["lora"]):
            mine, lora = ([statistics.fmean(p) for p in zip(*at_best[k])] for k in (m, "lora"))  # per problem
            d = [x - y for x, y in zip(mine, lora, strict=True)]
            b["minus_lora"] = (statistics.fmean(d), math.sqrt(
                statistics.variance(d) / len(d) + shared_shift(at_best[m]) + shared_shift(at_best["lora"])))
    return out

def cell(v, f):
    return "" if v is None else f"{v[0]:{f}}" + ("" if v[1] is None else f" ± {v[1]:{f}}")

def markdown(table, match=None, noise=None, best=None):
    """The study's tables: each swept method's best rate (and its accuracy minus LoRA's); every arm with every figure;
    each swept method's forgetting at matched accuracy; and where the chosen triplets' σ sit against the quantisation
    noise, by module type."""
    lines = []
    if best:
        lines += ["| method | best lr | held-out accuracy there (± seeds' std, ± binomial) | seeds | inner | best lr / "
                  "LoRA's | minus LoRA's best (± s.e.) |", "|---|---|---|---|---|---|---|"]
        ratio = lambda b: "" if b["over_lora"] is None else f"{b['over_lora']:.2g}×"
        minus = lambda d: "" if d is None else f"{d[0]:+.3f} ± {d[1]:.3f}"
        std = lambda b: "–" if b["std"] is None else f"{b['std']:.3f}"  # one seed: no spread
        lines += [f"| {m} | {b['lr']:g} | {b['accuracy']:.3f} ± {std(b)} ± {b['binomial']:.3f} | {b['seeds']} | "
                  f"{'yes' if b['inner'] else 'no'} | {ratio(b)} | {minus(b.get('minus_lora'))} |"
                  for m, b in best.items()]
        lines += [""]
    lines += ["| arm | runs | " + " | ".join(title for title, _ in FIGURES.values()) + " |",
              "|---" * (len(FIGURES) + 2) + "|"]
    lines += [f"| {a} | {t['runs']} | " + " | ".join(cell(t.get(k), f) for k, (_, f) in FIGURES.items()) + " |"
              for a, t in table.items()]
    if match and match["levels"]:
        methods = [m for m in match if m not in ("levels", "targets")]
        lines += ["", "| forgetting KL at held-out accuracy | " + " | ".join(methods) + " |",
                  "|---" * (len(methods) + 1) + "|"]
        seeds = lambda n: f" ({n} seed)" if n == 1 else f" ({n} seeds)"
        lines += [f"| {level:.2f} | " + " | ".join(cell(match[m][level], ".4f") + (
            seeds(match[m][level][2]) if match[m][level] else "–") for m in methods) + " |"
                  for level in match["levels"]]
    if noise:
        lines += ["", "| module | r-th smallest σ / noise σ (MiLoRA's edge) | r-th largest σ / noise σ (PiSSA's) |",
                  "|---|---|---|"]
        lines += [f"| {t} | {v['minor_over_noise']:.2f} | {v['principal_over_noise']:.1f} |" for t, v in noise.items()]
    return "\n".join(lines)

def plot(rows, table, path, ylabel="held-out accuracy"):
    """Held-out accuracy against forgetting: a curve per method through its learning rates (means, with the seeds'
    std as error bars), lone arms as points, the base model as a dotted line. Needs matplotlib (pip install
    matplotlib), the one package only this step uses: without it, no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: {path} needs matplotlib (pip install matplotlib); the table is written without it")
        return None
    fig, ax = plt.subplots(figsize=(10.5, 5.4), layout="constrained")
    curves = {}  # (method, targets) -> [(lr, arm)]
    for label, t in table.items():
        if t["method"] != "base" and "forgetting_kl" in t:
            curves.setdefault((t["method"], t["target_modules"]), []).append((t["lr"] or 0, label))
    usual = usual_targets(rows)
    for (method, targets), arms_ in curves.items():
        pts = [table[a] for _, a in sorted(arms_)]
        x, y = [p["forgetting_kl"][0] for p in pts], [p["accuracy"][0] for p in pts]
        err = lambda k: [p[k][1] or 0 for p in pts]
        label = method if targets == usual else f"{method} on {targets}"
        color = f"C{milora.METHODS.index(method) % 10}" if method in milora.METHODS else None  # a method's, always
        ax.errorbar(x, y, xerr=err("forgetting_kl"), yerr=err("accuracy"), marker="o" if targets == usual else "^",
                    ls="-" if len(pts) > 1 else "none", capsize=2, label=label, color=color,
                    mfc=None if targets == usual else "none")
        if len(pts) > 1:
            for lr, xi, yi in zip(sorted(lr for lr, _ in arms_), x, y):
                ax.annotate(f"{lr:g}", (xi, yi), textcoords="offset points", xytext=(4, -9), fontsize=7)
    base = next((t["accuracy"][0] for t in table.values() if t["method"] == "base"), None)
    if base is not None:
        ax.axhline(base, ls=":", color="grey", label=f"base model ({base:.3f})")
    ax.set_xscale("log")
    ax.margins(0.08)  # the axes fit the runs, with room for the labels
    ax.set_xlabel("forgetting: KL(p_base || p_ft) on held-out general text (log scale), lower is better")
    ax.set_ylabel(ylabel)
    fig.legend(fontsize=8, loc="outside right upper")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def report(runs, out, plot_path):
    """The study's summary of every run file in `runs`, written to `out`: study.json (settings, every run's figures,
    mean ± std per arm, the best rates, the matched-accuracy table, the noise floor), study.csv (a row per run),
    study.md (printed too), and the plot."""
    rows, settings, scoring, noise = study_runs(runs)
    table, match, best = arms(rows), matched(rows), best_rates(rows, scoring["total"])
    pair = lambda v: dict(zip(("mean", "std", "seeds"), v)) if isinstance(v, tuple) else v
    for r in rows:
        del r["verdicts"]  # one per problem: best_rates' paired error has used them; the run files keep the completions
    result = {"settings": settings, "scoring": scoring, "best_rates": best,
              "arms": {a: {k: pair(v) for k, v in t.items()} for a, t in table.items()},
              "matched_accuracy": {m: {str(l): pair(v) for l, v in c.items()} if isinstance(c, dict) else c
                                   for m, c in match.items()},
              "noise_floor": noise, "runs": rows}
    os.makedirs(out, exist_ok=True)
    milora.write_json(result, os.path.join(out, "study.json"))
    with open(os.path.join(out, "study.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = markdown(table, match, noise, best)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    ylabel = f"held-out accuracy ({scoring['total']} {scoring['data']} problems, {scoring['rule']} rule)"
    written = plot(rows, table, plot_path, ylabel)
    print(f"wrote {out}/study.json, study.csv, study.md{f' and {written}' if written else ''}")
    return result


