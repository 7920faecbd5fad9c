"""
The study: does MiLoRA still win once each method's learning rate is tuned, and which part of W's spectrum forgets
least? docs/study.md has the design, the results and their caveats.

    python study/run.py            # every run not yet in study/runs/, then the report (CPU hours; resumable)
    python study/run.py --report   # only the report: study/study.{json,csv,md} and assets/study.png

LoRA, PiSSA, MiLoRA, middle and MiCA each run on a half-decade grid of learning rates with --seeds; where a method's
best mean accuracy sits at an edge of its grid, the next rate beyond it runs too (up to --extend times), and its best
rate gets --best_seeds seeds. MiSS and random triplets run at --arm_lr, and LoRA and MiLoRA without q_proj too (the
ablation for the checkpoint's quantisation noise). Each run trains with train_math.py, as a user would (in a process
of its own), and is then scored here, on the base model loaded once: eval_gsm8k's held-out accuracy (official rule)
and forgetting KL, and analysis.analysis of ΔW against W. Its results go to --runs/NAME.json, small and committed:
a rerun anywhere skips every run that has one, and the report needs nothing else. Adapters stay in --work.
"""
import argparse, copy, json, math, os, subprocess, sys, time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the project root: milora, train_math, eval_gsm8k
import eval_gsm8k  # noqa: E402
import milora  # noqa: E402
from analysis import analysis, quantisation_steps, report  # noqa: E402

GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # learning rates, half a decade apart
NO_Q = "k_proj,v_proj,up_proj,down_proj"  # the ablation's targets: the paper's without q_proj

def run_name(method, lr, seed, targets=None):
    return f"{method}-{lr:.0e}".replace("e-0", "e-") + ("-noq" if targets else "") + f"-{seed}"

def plan(args, done):
    """-> {name: (method, lr, seed, targets)} of every run the study needs, given the runs `done` ({name: results})."""
    runs = {"base": None}
    for m in args.sweep:
        lrs = sorted(set(args.lrs) | {r["train"]["lr"] for r in done.values() if r["train"] and
                                      r["train"]["method"] == m and r["train"]["target_modules"] == args.targets})
        runs |= {run_name(m, lr, s): (m, lr, s, None) for lr in lrs for s in args.seeds}
        if all(n in done for n in runs if n.startswith(m + "-")):  # its grid is complete: tune it
            mean = {lr: sum(done[run_name(m, lr, s)]["accuracy"] for s in args.seeds) / len(args.seeds) for lr in lrs}
            best = max(lrs, key=lambda lr: mean[lr])  # the lowest of equal means
            edge = +1 if best == lrs[-1] else -1 if best == lrs[0] else 0
            beyond = GRID.index(best) + edge
            if edge and 0 <= beyond < len(GRID) and len(set(lrs) - set(args.lrs)) < args.extend:
                runs |= {run_name(m, GRID[beyond], s): (m, GRID[beyond], s, None) for s in args.seeds}
            else:
                runs |= {run_name(m, best, s): (m, best, s, None) for s in range(1, args.best_seeds + 1)}
    runs |= {run_name(m, args.arm_lr, s): (m, args.arm_lr, s, None) for m in args.arms for s in args.arm_seeds}
    runs |= {run_name(m, args.arm_lr, s, NO_Q): (m, args.arm_lr, s, NO_Q) for m in args.ablate for s in args.arm_seeds}
    return runs

def train(args, name, method, lr, seed, targets):
    """The run's adapter, trained by train_math.py in a process of its own (unless a killed study left it whole)."""
    out = os.path.join(args.work, name)
    if not os.path.isfile(os.path.join(out, "adapter", milora.WEIGHTS)):
        subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "train_math.py"), "--model", args.model,
                        "--method", method, "--lr", str(lr), "--seed", str(seed), "--rank", str(args.rank),
                        "--max_steps", str(args.steps), "--target_modules", targets or args.targets, "--eval_limit",
                        "0", "--output_dir", out, "--overwrite"], check=True)
    return out

def score(args, base, out=None):
    """eval_gsm8k.py's summary of the base model with the adapter in `out` (none: the base itself) and its raw
    completions; for an adapter also the forgetting loss and analysis.analysis's aggregates (without its per-matrix
    figures, which are large)."""
    (model, tok), t0 = copy.deepcopy(base), time.time()
    if out:
        milora.load_adapter(model, os.path.join(out, "adapter"))
    ds = eval_gsm8k.load_data("toy", "test", ("question", "answer"), args.limit)
    rows = eval_gsm8k.score(model, tok, ds["question"], eval_gsm8k.gold_answers(ds, "toy"), 32, args.max_new_tokens)
    correct = sum(r["correct"] for r in rows)
    summary = {"model": args.model, "data": "toy", "train": None, "rule": "official", "correct": correct,
               "total": len(rows), "accuracy": correct / len(rows), "max_new_tokens": args.max_new_tokens,
               "completions": [r["completion"] for r in rows]}  # raw, so that any answer rule can score them again
    if out:
        with open(os.path.join(out, "args.json")) as f:
            summary["train"] = json.load(f)
        text = eval_gsm8k.forgetting_text(None)
        summary.update(forgetting_text="stdlib", forgetting_tokens=8192)
        summary["forgetting_kl"], summary["forgetting_ce"] = eval_gsm8k.forgetting_loss(model, tok, text)
        gguf = os.path.join(*eval_gsm8k.smollm2()) if args.model == eval_gsm8k.SMOLLM2 else None
        summary.update({k: v for k, v in analysis(model, args.rank, gguf and quantisation_steps(gguf)).items()
                        if k != "layers"})
    summary["seconds"] = time.time() - t0
    return summary

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=eval_gsm8k.Help)
    floats = lambda s: [float(x) for x in s.split()]
    ints = lambda s: [int(x) for x in s.split()]
    p.add_argument("--sweep", type=str.split, default="lora pissa milora middle mica".split(), help="tuned methods")
    p.add_argument("--lrs", type=floats, default=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3], help="their first grid")
    p.add_argument("--seeds", type=ints, default=[1, 2], help="seeds at every rate")
    p.add_argument("--extend", type=int, default=3, help="rates a method's grid may grow by, to put its best inside")
    p.add_argument("--best_seeds", type=int, default=3, help="seeds 1..N at each method's best rate")
    p.add_argument("--arms", type=str.split, default=["miss", "random"], help="methods run at --arm_lr only")
    p.add_argument("--ablate", type=str.split, default=["lora", "milora"], help="run without q_proj at --arm_lr")
    p.add_argument("--arm_lr", type=float, default=3e-4)
    p.add_argument("--arm_seeds", type=ints, default=[1, 2, 3])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of global batch 8 (train_math's default)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,up_proj,down_proj")
    p.add_argument("--limit", type=int, default=200, help="held-out toy problems scored")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--runs", default=os.path.join(HERE, "runs"), help="the run files (committed)")
    p.add_argument("--work", default="out-study", help="the runs' adapters and checkpoints (not committed)")
    p.add_argument("--out", default=HERE, help="where the report's study.json, .csv and .md go")
    p.add_argument("--plot", default=os.path.join(os.path.dirname(HERE), "assets", "study.png"))
    p.add_argument("--report", action="store_true", help="only the report, from --runs")
    return p.parse_args(argv)

def main(argv=None):
    args = parse_args(argv)
    if bad := [m for m in args.sweep + args.arms + args.ablate if m not in milora.METHODS]:
        sys.exit(f"unknown method(s) {bad}; choose from {', '.join(milora.METHODS)}")
    if bad := [lr for lr in args.lrs if lr not in GRID]:  # a tuned method's grid grows by GRID's next rate
        sys.exit(f"learning rate(s) {bad} not on the half-decade grid; choose from {' '.join(f'{g:g}' for g in GRID)}")
    os.makedirs(args.runs, exist_ok=True)
    base, t0 = None, time.time()
    while not args.report:
        done = {}
        for f in sorted(os.listdir(args.runs)):
            if f.endswith(".json"):
                with open(os.path.join(args.runs, f)) as fh:
                    done[f[:-5]] = json.load(fh)
        todo = [n for n in plan(args, done) if n not in done]
        if not todo:
            break
        name, spec = todo[0], plan(args, done)[todo[0]]
        print(f"study: run {len(done) + 1} ({len(todo)} to go in this plan): {name}, {(time.time() - t0) / 60:.1f} min",
              flush=True)
        out = spec and train(args, name, *spec)
        base = base or eval_gsm8k.load_model(args.model)
        milora.write_json(score(args, base, out), os.path.join(args.runs, name + ".json"))
    return report(args.runs, args.out, args.plot)

if __name__ == "__main__":
    main()
