"""Tests for the study: its measures (analysis.py) against hand-computed cases, its report, and run.py itself at toy
size, resumed. Run with the rest: pytest -q test_milora.py study/
"""
import json
import math
import re
import os
import statistics
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import analysis
import eval_gsm8k
import milora
import run
import spectrum
from test_milora import llama, spectrum_matrix, train_a_little  # helpers; the fixtures come from ../conftest.py

HERE = os.path.dirname(os.path.abspath(__file__))


def test_subspace_similarity():
    Q = torch.linalg.qr(torch.randn(50, 10))[0]
    assert analysis.subspace_similarity(Q, Q) == pytest.approx(1.0)
    rot = torch.linalg.qr(torch.randn(10, 10))[0]
    assert analysis.subspace_similarity(Q, Q @ rot) == pytest.approx(1.0)  # a basis of the same subspace
    assert analysis.subspace_similarity(Q[:, :5], Q[:, 5:]) == pytest.approx(0.0, abs=1e-12)
    assert analysis.subspace_similarity(Q[:, :4], Q[:, :8]) == pytest.approx(1.0)  # normalised by the smaller r


def test_amplification_factor():
    W = spectrum_matrix(40, 30)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    # A ΔW along W's 10th triplet: UᵀΔWV = c, UᵀWV = σ₁₀, so the factor is c/σ₁₀.
    dW = 2.5 * torch.outer(U[:, 9], Vh[9])
    assert analysis.delta_analysis(dW, W, r=1)["amplification"] == pytest.approx(2.5 / S[9].item(), rel=1e-9)
    # Along W's own principal directions the factor is |ΔW| / |W restricted there|.
    dW = 0.1 * (U[:, :3] * S[:3]) @ Vh[:3]
    assert analysis.delta_analysis(dW, W, r=3)["amplification"] == pytest.approx(0.1, rel=1e-9)


def test_delta_analysis_by_hand():
    # W = diag(4, 3, 2, 1) in a 4×6 matrix; a ΔW along W's smallest triplet, then along its largest.
    W = torch.zeros(4, 6, dtype=torch.float64)
    W[range(4), range(4)] = torch.tensor([4.0, 3, 2, 1], dtype=torch.float64)
    e = lambda n, i: torch.eye(n, dtype=torch.float64)[i]
    minor = analysis.delta_analysis(0.5 * torch.outer(e(4, 3), e(6, 3)), W, r=1)
    assert minor["w_proj"] == pytest.approx(1.0) and minor["dw_proj"] == pytest.approx(0.5)  # UᵀWV = W[3, 3]
    assert minor["amplification"] == pytest.approx(0.5)
    assert minor["phi_minor"] == pytest.approx(1.0) and minor["phi_principal"] == pytest.approx(0.0, abs=1e-12)
    principal = analysis.delta_analysis(2 * torch.outer(e(4, 0), e(6, 0)), W, r=1)
    assert principal["amplification"] == pytest.approx(2 / 4)
    assert principal["phi_principal"] == pytest.approx(1.0) and principal["phi_minor"] == pytest.approx(0.0, abs=1e-12)
    # Only ΔW's top r count: with r = 1, 3·e0e0ᵀ + e3e3ᵀ gives 3/4, not ‖ΔW‖_F / 4.
    assert analysis.delta_analysis(3 * torch.outer(e(4, 0), e(6, 0)) + torch.outer(e(4, 3), e(6, 3)), W, 1)[
        "amplification"] == pytest.approx(3 / 4)
    # Half in each: ΔW's top direction (e0 + e3)/√2 on both sides, so φ = ½ to the largest and to the smallest.
    half = analysis.delta_analysis(torch.outer(e(4, 0) + e(4, 3), e(6, 0) + e(6, 3)), W, r=1)
    assert half["phi_principal"] == pytest.approx(0.5) and half["phi_minor"] == pytest.approx(0.5)
    assert half["w_proj"] == pytest.approx((4 + 1) / 2)  # uᵀWv with u = v = (e0 + e3)/√2
    # The sides apart: left along W's smallest, right along its largest. φ is the left side's (appendix A.1);
    # UᵀWV = W[3, 0] = 0, so the factor is infinite.
    split = analysis.delta_analysis(torch.outer(e(4, 3), e(6, 0)), W, r=1)
    assert split["phi_minor"] == pytest.approx(1.0) and split["phi_principal"] == pytest.approx(0.0, abs=1e-12)
    assert split["phi_principal_right"] == pytest.approx(1.0) and split["phi_minor_right"] == pytest.approx(0.0, abs=1e-12)
    assert split["amplification"] == math.inf
    # r random triplets of W meet a random r-subspace with φ = r/d on average (r = 2: 2/4 left, 2/6 right).
    g = torch.Generator().manual_seed(0)
    rand = [analysis.delta_analysis(torch.randn(4, 6, dtype=torch.float64, generator=g), W, 2, generator=g)
            for _ in range(400)]
    assert sum(x["phi_random"] for x in rand) / len(rand) == pytest.approx(2 / 4, abs=0.03)
    assert sum(x["phi_random_right"] for x in rand) / len(rand) == pytest.approx(2 / 6, abs=0.03)
    # ΔW of rank below r has arbitrary singular vectors: no φ. An r beyond W's triplets is an error.
    zero = analysis.delta_analysis(torch.zeros(4, 6), W, 1)
    assert all(math.isnan(zero[k]) for k in ("phi_principal", "phi_minor", "phi_random", "phi_minor_right"))
    with pytest.raises(ValueError, match=r"r must be in \[1, 4\] for a 4×6 weight, got 5"):
        analysis.delta_analysis(torch.ones(4, 6), W, 5)


def test_study_tables_by_hand():
    assert analysis.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert analysis.mean_std([5.0]) == (5.0, None)  # one seed: no deviation
    row = lambda method, lr, seed, acc, kl, targets="q_proj,v_proj": {
        "method": method, "lr": lr, "target_modules": targets, "seed": seed,
        **{k: None for k in analysis.FIGURES}, "accuracy": acc, "forgetting_kl": kl}
    rows = [row("milora", 3e-4, 1, 0.5, 0.1), row("base", None, None, 0.1, None, None),
            row("pissa", 3e-4, 1, 0.3, 0.2), row("milora", 3e-4, 2, 0.7, 0.3), row("lora", 3e-4, 1, 0.4, 0.05)]
    table = analysis.arms(rows)
    assert list(table) == ["base", "lora", "pissa", "milora"]  # base first, then milora.METHODS' order
    assert table["milora"]["runs"] == 2 and table["milora"]["accuracy"] == pytest.approx((0.6, 0.02 ** 0.5))
    assert "forgetting_kl" not in table["base"]  # no figure, no cell
    lines = analysis.markdown(table).splitlines()
    assert lines[5].startswith("| milora | 2 | 0.600 ± 0.141 | 0.2000 ± 0.1414 |"), lines[5]
    assert lines[2].startswith("| base | 1 | 0.100 |  |"), lines[2]
    # Two learning rates and other targets: each is an arm of its own, named by what differs.
    rows += [row("lora", 1e-3, 1, 0.8, 0.25), row("milora", 1e-3, 1, 0.9, 0.5), row("milora", 1e-3, 2, 0.8, 0.4),
             row("milora", 3e-4, 3, 0.6, 0.2, targets="v_proj")]
    table = analysis.arms(rows)
    assert list(table) == ["base", "lora, lr 0.0003", "lora, lr 0.001", "pissa, lr 0.0003", "milora, lr 0.0003",
                           "milora, lr 0.0003, v_proj", "milora, lr 0.001"]  # targets named where unusual
    # Matched accuracy: the curves (0.4, 0.05) -> (0.8, 0.25) for LoRA, and per seed (0.5, 0.1) -> (0.9, 0.5) and
    # (0.7, 0.3) -> (0.8, 0.4) for MiLoRA, whose mean curve (0.6, 0.2) -> (0.85, 0.45) climbs through (0.6, 0.85]:
    # both methods there. At 0.65: LoRA 0.05 + 0.2 * 0.25/0.4 = 0.175; MiLoRA seed 1 0.1 + 0.4 * 0.15/0.4 = 0.25,
    # while seed 2 starts above 0.65 (not measured).
    match = analysis.matched(rows)
    assert match["levels"] == [0.65, 0.7, 0.75, 0.8] and match["targets"] == "q_proj,v_proj"
    assert set(match) == {"levels", "targets", "lora", "milora"}  # PiSSA ran at one lr: no curve
    assert match["lora"][0.65] == pytest.approx((0.175, None, 1))
    assert match["milora"][0.65] == pytest.approx((0.25, None, 1))
    assert match["milora"][0.8][:2] == pytest.approx(((0.4 + 0.4) / 2, 0.0), abs=1e-12)  # both seeds: 0.4
    assert analysis.matched(rows[::-1]) == match  # each curve runs in learning-rate order, whatever the runs' order
    assert analysis.curve_kl([(0.2, 1.0), (0.6, 3.0), (0.4, 5.0)], 0.5) == pytest.approx(2.5)  # climbing, not falling
    assert analysis.curve_kl([(0.2, 1.0), (0.6, 3.0), (0.4, 5.0), (0.7, 6.0)], 0.65) == pytest.approx(5 + 0.25 / 0.3)
    assert analysis.curve_kl([(0.2, 1.0), (0.6, 3.0)], 0.7) is None
    assert analysis.curve_kl([(0.6, 1.0), (0.8, 3.0)], 0.5) is None  # passed at the lowest rate: not measured
    assert analysis.curve_kl([(0.5, 0.01), (0.7, 0.02), (0.3, 0.05)], 0.4) is None  # reached only on the way down
    lines = analysis.markdown(table, match)
    assert "| 0.65 | 0.1750 (1 seed) | 0.2500 (1 seed) |" in lines
    assert "| 0.80 | 0.2500 (1 seed) | 0.4000 ± 0.0000 (2 seeds) |" in lines


def test_quantisation_steps_read_from_a_gguf_file(tmp_path):
    import gguf
    import numpy as np
    # Two Q4_1 weights and an F32 one, in llama.cpp's names. Each Q4_1 block of 32 stores its step d = (max − min)/15.
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    x = np.random.RandomState(0).randn(8, 64).astype(np.float32)
    x[:, :32] *= 3  # blocks of two different steps
    steps = {}
    for name, w in (("blk.0.attn_q.weight", x), ("blk.3.ffn_down.weight", 2 * x)):
        blocks = w.reshape(-1, 32)
        d = ((blocks.max(1) - blocks.min(1)) / 15).astype(np.float16).astype(float)
        steps[name] = float(np.sqrt(np.mean(d ** 2)))
        writer.add_tensor(name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1),
                          raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got = analysis.quantisation_steps(str(tmp_path / "m.gguf"))
    assert got == pytest.approx({"model.layers.0.self_attn.q_proj": steps["blk.0.attn_q.weight"],
                                 "model.layers.3.mlp.down_proj": steps["blk.3.ffn_down.weight"]}, rel=1e-6)
    assert got["model.layers.3.mlp.down_proj"] == pytest.approx(2 * got["model.layers.0.self_attn.q_proj"], rel=1e-3)


def test_noise_floor_of_an_analysis_by_hand():
    # A trained adapter on the tiny model, with a known rounding step for two of its matrices: the noise's typical
    # singular value is √(d²/12)·√max(out, in), and the ratios are W's r-th smallest and largest σ over it. (LoRA leaves
    # W as it was, as a loaded adapter does.)
    torch.manual_seed(0)
    model = train_a_little(milora.apply_adapters(llama(num_hidden_layers=3), "lora", r=4))
    steps = {"model.layers.0.self_attn.q_proj": 0.01, "model.layers.1.mlp.down_proj": 0.02,
             "model.layers.1.self_attn.q_proj": 0.03, "model.layers.2.self_attn.q_proj": 0.1}
    out = analysis.analysis(model, 4, steps)
    for name, d in steps.items():
        W = model.get_submodule(name).base_layer.weight.double()
        S = torch.linalg.svdvals(W)
        noise = math.sqrt(d ** 2 / 12) * math.sqrt(max(W.shape))
        got = out["layers"][name]
        assert got["noise_sigma"] == pytest.approx(noise)
        assert got["minor_over_noise"] == pytest.approx(S[-4].item() / noise, rel=1e-9)
        assert got["principal_over_noise"] == pytest.approx(S[3].item() / noise, rel=1e-9)
    q = sorted(out["layers"][f"model.layers.{i}.self_attn.q_proj"]["minor_over_noise"] for i in range(3))
    assert out["noise_floor"]["q_proj"]["minor_over_noise"] == q[1] != sum(q) / 3  # the median over layers
    assert out["noise_floor"]["down_proj"]["minor_over_noise"] == out["layers"][
        "model.layers.1.mlp.down_proj"]["minor_over_noise"]  # the median of one
    assert "noise_sigma" not in out["layers"]["model.layers.0.self_attn.k_proj"]  # no step, no noise figure
    assert "noise_floor" not in analysis.analysis(model, 4)


def test_analysis_refuses_adapters_applied_in_place_by_an_svd_method():
    """In place, an SVD method's (α/r)·B A is the whole trained block, B₀A₀ included, and the frozen weight the
    residual: delta_analysis would compare the wrong pair, so analysis asks for the adapter loaded onto the base."""
    model = milora.apply_adapters(llama(), "milora", r=4)
    with pytest.raises(ValueError, match="analysis needs the adapters loaded onto the untouched model"):
        analysis.analysis(model, 4)


def test_analysis_of_a_trained_adapter(trained, tiny_dir):
    out, _ = trained
    model = milora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), os.path.join(out, "adapter"))
    summary = analysis.analysis(model, 4)
    assert summary["q_proj_layer"] == "model.layers.0.self_attn.q_proj"  # the tiny model's 2 layers: the first
    assert len(summary["layers"]) == 10 and summary["analysis_rank"] == 4
    assert set(summary["by_module"]) == set(milora.PAPER_TARGETS)
    # Against the paper's own ΔW, finetuned minus pretrained weight: the merged model's minus the base's.
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        dW = merged[name + ".weight"].double() - base[name + ".weight"].double()
        want = analysis.delta_analysis(dW, base[name + ".weight"], 4, generator=torch.Generator().manual_seed(0))
        got = summary["layers"][name]
        assert got["amplification"] == pytest.approx(want["amplification"], rel=1e-3)
        assert got["phi_minor"] == pytest.approx(want["phi_minor"], abs=1e-3)
    assert summary["q_proj_amplification"] == summary["layers"]["model.layers.0.self_attn.q_proj"]["amplification"]


def run_file(path, method, lr=3e-4, seed=1, **figures):
    """A run file as run.py writes it, with the figures given and the rest of FIGURES at 0.5."""
    summary = {"model": "m", "data": "toy", "rule": "official", "total": 200, "max_new_tokens": 64, "accuracy": 0.25,
               "train": method and {"method": method, "seed": seed, "lr": lr, "target_modules": "q_proj,v_proj"}}
    summary.update({} if method is None else {k: 0.5 for k in analysis.FIGURES if k != "accuracy"})
    milora.write_json({**summary, **figures}, path)


def test_report_refuses_runs_of_another_experiment_and_plots_without_matplotlib(tmp_path, monkeypatch, capsys):
    run_file(tmp_path / "base.json", None)
    run_file(tmp_path / "lora-3e-4-1.json", "lora")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = analysis.report(str(tmp_path), str(tmp_path / "out"), str(tmp_path / "plot.png"))
    assert "no plot" in capsys.readouterr().out and not (tmp_path / "plot.png").exists()
    assert result["arms"]["lora"]["phi_minor"] == {"mean": 0.5, "std": None}
    assert (tmp_path / "out" / "study.json").exists() and (tmp_path / "out" / "study.md").exists()
    with pytest.raises(SystemExit, match="no run files"):
        analysis.report(str(tmp_path / "out" / "nothing"), str(tmp_path / "out"), str(tmp_path / "plot.png"))
    # Runs that differ in more than their arm (method, lr, targets) and seed would average, or compare, two
    # experiments: refused, whether trained or scored differently. Another lr is another arm.
    second = tmp_path / "lora-3e-4-2.json"
    for change, error in (({"train": {"method": "lora", "seed": 2, "lr": 3e-4, "max_steps": 60}},
                           "lora-3e-4-2.json was trained differently .*max_steps None vs 60"),
                          ({"total": 50}, "lora-3e-4-2.json was scored differently .*total 200 vs 50"),
                          ({"max_new_tokens": 128}, "scored differently .*max_new_tokens 64 vs 128"),
                          ({"rule": "strict"}, "scored differently .*rule official vs strict"),
                          ({"train": {"method": "lora", "seed": 1, "lr": 3e-4, "target_modules": "q_proj,v_proj"}},
                           "a second run of .*lora.* seed 1")):
        run_file(second, "lora", seed=2)
        summary = json.loads(second.read_text())
        milora.write_json({**summary, **change}, second)
        with pytest.raises(SystemExit, match=error):
            analysis.report(str(tmp_path), str(tmp_path / "out"), str(tmp_path / "plot.png"))
    run_file(second, "lora", lr=1e-3)
    assert set(analysis.report(str(tmp_path), str(tmp_path / "out"), str(tmp_path / "p.png"))["arms"]) == {
        "base", "lora, lr 0.0003", "lora, lr 0.001"}


def test_best_rates_by_hand():
    row = lambda method, lr, seed, acc: {"method": method, "lr": lr, "seed": seed, "accuracy": acc,
                                         "target_modules": "q_proj"}
    rows = [row("lora", lr, s, a) for lr, s, a in ((1e-4, 1, 0.2), (1e-4, 2, 0.4), (3e-4, 1, 0.5), (3e-4, 2, 0.7),
                                                   (3e-4, 3, 0.6), (1e-3, 1, 0.6), (1e-3, 2, 0.5))]
    rows += [row("milora", lr, 1, a) for lr, a in ((1e-4, 0.8), (3e-4, 0.8), (1e-3, 0.1))]  # a tie: the lower rate
    rows += [row("base", None, None, 0.1) | {"target_modules": None}]
    best = analysis.best_rates(rows, total=100)
    assert best["lora"] == pytest.approx({"lr": 3e-4, "accuracy": 0.6, "std": 0.1, "seeds": 3, "inner": True,
                                          "binomial": math.sqrt(0.6 * 0.4 / 100), "over_lora": 1.0,
                                          "minus_lora": None})  # no verdicts, no paired difference
    assert best["milora"]["lr"] == 1e-4 and not best["milora"]["inner"] and best["milora"]["over_lora"] == pytest.approx(1 / 3)
    assert list(best) == ["lora", "milora"]  # milora.METHODS' order
    # With each problem's verdict (4 problems): LoRA's best, 3e-4, has per-problem means (1, .5, .5, .5) over its two
    # seeds (0.5 and 0.75), MiLoRA's, 1e-4, (1, 1, 1, 0) from one seed: d = (0, .5, .5, -.5), mean 0.125, s.e.² =
    # var(d)/4. LoRA's seeds add no shared shift: their accuracies' variance, 0.03125, is below what the flips on
    # single problems give, w/n = mean(0, .5, .5, .5)/4. PiSSA's two seeds, all right and all wrong, are one shift:
    # s² = 0.5, w = 0.5, so (0.5 - 0.5/4)/2 joins the s.e.² of d = (-.5, 0, 0, 0).
    verdict = lambda method, lr, seed, v: row(method, lr, seed, sum(v) / 4) | {"verdicts": v}
    rows = [verdict("lora", 1e-4, 1, [0, 0, 0, 0]), verdict("lora", 3e-4, 1, [1, 1, 0, 0]),
            verdict("lora", 3e-4, 2, [1, 0, 1, 1]), verdict("lora", 1e-3, 1, [1, 0, 0, 0]),
            verdict("milora", 1e-4, 1, [1, 1, 1, 0]), verdict("milora", 3e-4, 1, [0, 0, 0, 0]),
            verdict("pissa", 1e-4, 1, [1, 1, 1, 1]), verdict("pissa", 1e-4, 2, [0, 0, 0, 0]),
            verdict("pissa", 3e-4, 1, [0, 0, 0, 0])]
    best = analysis.best_rates(rows, total=4)
    var = lambda d: statistics.variance(d)
    assert best["milora"]["minus_lora"] == pytest.approx((0.125, math.sqrt(var([0, 0.5, 0.5, -0.5]) / 4)))
    assert best["pissa"]["minus_lora"] == pytest.approx(
        (-0.125, math.sqrt(var([-0.5, 0, 0, 0]) / 4 + (0.5 - 0.5 / 4) / 2)))
    assert best["lora"]["minus_lora"] is None  # LoRA against itself: no comparison
    table = analysis.markdown({}, best=best)
    assert "| milora | 0.0001 | 0.750 ± – ± 0.217 | 1 | no | 0.33× | +0.125 ± 0.239 |" in table  # one seed: no std
    assert "| lora | 0.0003 | 0.625 ± 0.177 ± 0.242 | 2 | yes | 1× |  |" in table


def test_report_scores_every_completion_again_by_the_official_rule(tmp_path):
    """The verdicts behind the paired error are the run's own: its completions, scored again, give its count."""
    golds = eval_gsm8k.gold_answers(eval_gsm8k.load_data("toy", "test", ("answer",), 200), "toy")
    right = [f"So it is {g}.\nThe answer is: {g}" for g in golds]
    said = [f"The answer is {g}." for g in golds[:10]] + right[10:]  # no colon: strict reads it, official not
    report = lambda: analysis.report(str(tmp_path), str(tmp_path / "out"), str(tmp_path / "p.png"))
    for method, lr, completions, correct in (("lora", 3e-4, said, 190), ("lora", 1e-3, said, 190),
                                             ("milora", 3e-4, right, 200),
                                             ("milora", 1e-3, said, 190)):
        run_file(tmp_path / (run.run_name(method, lr, 1) + ".json"), method, lr=lr, completions=completions,
                 correct=correct, accuracy=correct / 200)
    best = report()["best_rates"]
    # MiLoRA at 3e-4 gets the 10 problems LoRA (3e-4, the lower of two equal rates) misses: d is 1 on 10 of 200.
    d = [1] * 10 + [0] * 190
    assert best["milora"]["minus_lora"] == pytest.approx((0.05, math.sqrt(statistics.variance(d) / 200)))
    assert best["lora"]["lr"] == 3e-4 and best["lora"]["minus_lora"] is None
    for correct, accuracy in ((200, 1.0), (190, 0.25)):  # a count, or an accuracy, that the completions don't give
        run_file(tmp_path / "lora-3e-4-1.json", "lora", completions=said, correct=correct, accuracy=accuracy)
        with pytest.raises(SystemExit, match=rf"lora-3e-4-1.json says {correct} right \(accuracy {accuracy}\), but "
                                             "its completions score 190 of 200 by the official rule"):
            report()
    for method, lr in (("lora", 3e-4), ("lora", 1e-3), ("milora", 3e-4), ("milora", 1e-3)):
        run_file(tmp_path / (run.run_name(method, lr, 1) + ".json"), method, lr=lr, completions=said, correct=200,
                 accuracy=1.0, rule="strict")  # scored by the strict rule, they are scored again by it: all right
    assert report()["best_rates"]["milora"]["minus_lora"] == (0.0, 0.0)


def test_rates_off_the_grid_and_unknown_methods_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"learning rate\(s\) \[0.0002\] not on the half-decade grid; choose from 1e-05"):
        run.main(["--lrs", "1e-4 2e-4", "--runs", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"unknown method\(s\) \['dora'\]"):
        run.main(["--sweep", "lora dora", "--runs", str(tmp_path)])
    assert not os.listdir(tmp_path)


def test_plan_tunes_each_method_until_its_best_rate_is_inside_its_grid():
    args = run.parse_args(["--sweep", "lora", "--lrs", "1e-4 3e-4", "--seeds", "1 2", "--best_seeds", "3",
                           "--extend", "1", "--arms", "miss", "--ablate", "milora", "--arm_seeds", "1"])
    train = lambda lr: {"method": "lora", "lr": lr, "target_modules": args.targets}
    done = lambda accuracy: {run.run_name("lora", lr, s): {"train": train(lr), "accuracy": a}
                             for lr, a in accuracy.items() for s in (1, 2)}
    first = set(run.plan(args, {}))
    assert first == {"base", "lora-1e-4-1", "lora-1e-4-2", "lora-3e-4-1", "lora-3e-4-2", "miss-3e-4-1",
                     "milora-3e-4-noq-1"}
    # The best is the grid's top rate: the next one up runs, with both seeds.
    assert set(run.plan(args, done({1e-4: 0.2, 3e-4: 0.5}))) - first == {"lora-1e-3-1", "lora-1e-3-2"}
    # Inside now: a third seed at the best rate.
    assert set(run.plan(args, done({1e-4: 0.2, 3e-4: 0.5, 1e-3: 0.4}))) - first == {
        "lora-1e-3-1", "lora-1e-3-2", "lora-3e-4-3"}
    # At the edge again, with no extension left (--extend 1): the best gets its seeds where it is.
    assert set(run.plan(args, done({1e-4: 0.2, 3e-4: 0.5, 1e-3: 0.6}))) - first == {
        "lora-1e-3-1", "lora-1e-3-2", "lora-1e-3-3"}


def test_a_run_is_trained_again_unless_its_adapter_was_saved_whole(tmp_path, monkeypatch):
    """A study killed while train_math.py wrote an adapter leaves adapter/ without its weights: that run trains
    again. One whose weights were saved (the last thing a run writes) is kept."""
    calls = []
    monkeypatch.setattr(run.subprocess, "run", lambda command, check: calls.append(command))
    args = run.parse_args(["--work", str(tmp_path)])
    (tmp_path / "lora-1e-3-1" / "adapter").mkdir(parents=True)  # killed mid-save
    run.train(args, "lora-1e-3-1", "lora", 1e-3, 1, None)
    assert len(calls) == 1 and calls[0][calls[0].index("--output_dir") + 1] == str(tmp_path / "lora-1e-3-1")
    (tmp_path / "lora-1e-3-1" / "adapter" / milora.WEIGHTS).write_bytes(b"saved")
    run.train(args, "lora-1e-3-1", "lora", 1e-3, 1, None)
    assert len(calls) == 1


def test_study_runs_end_to_end_resumes_and_redoes_only_what_was_lost(tiny_dir, tmp_path, monkeypatch):
    """run.py at toy size: the tiny model, 2 steps, 1 seed: LoRA tuned on two rates, and MiLoRA with and without
    q_proj as arms at one. A rerun redoes nothing, and after a lost run file only that run is scored again (its
    adapter is kept)."""
    flags = ["--model", tiny_dir, "--sweep", "lora", "--lrs", "3e-4 1e-2", "--seeds", "1", "--extend", "0",
             "--best_seeds", "1", "--arms", "milora", "--ablate", "milora", "--arm_seeds", "1", "--rank", "4",
             "--steps", "2", "--limit", "4", "--max_new_tokens", "8", "--runs", "runs", "--work", "work", "--out", ".",
             "--plot", "study.png"]
    done = subprocess.run([sys.executable, os.path.join(HERE, "run.py"), *flags], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)  # as a user runs it; the reruns below run in this process
    assert done.returncode == 0, done.stderr[-3000:]
    study = json.load(open(tmp_path / "study.json"))
    assert sorted(r["run"] for r in study["runs"]) == [
        "base.json", "lora-1e-2-1.json", "lora-3e-4-1.json", "milora-3e-4-1.json", "milora-3e-4-noq-1.json"]
    assert list(study["arms"]) == ["base", "lora, lr 0.0003", "lora, lr 0.01", "milora, lr 0.0003",
                                   "milora, lr 0.0003, k_proj,v_proj,up_proj,down_proj"]
    assert study["settings"]["rank"] == 4 and study["settings"]["max_steps"] == 2
    assert study["scoring"]["rule"] == "official" and study["scoring"]["total"] == 4
    for r in study["runs"]:
        figures = ["accuracy"] if r["method"] == "base" else list(analysis.FIGURES)
        if "q_proj" not in (r["target_modules"] or "q_proj"):  # the ablation has no q_proj to take Table 7's from
            figures.remove("q_proj_amplification")
            assert r["q_proj_amplification"] is None
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in figures), r
    by = {r["run"]: r for r in study["runs"]}
    assert by["lora-3e-4-1.json"]["forgetting_kl"] > 0 and by["milora-3e-4-1.json"]["forgetting_kl"] > 0
    # MiLoRA's update starts in W's minor subspace and is still there after 2 steps; LoRA's is near chance.
    assert by["milora-3e-4-1.json"]["phi_minor"] > 0.3 > by["milora-3e-4-1.json"]["phi_principal"]
    assert by["lora-3e-4-1.json"]["phi_minor"] < 0.2
    assert set(study["best_rates"]) == {"lora"}  # the arms are not tuned
    assert (tmp_path / "study.md").read_text() in done.stdout
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A run file holds what a retrained run must match: its settings and figures, not its adapter.
    saved = json.load(open(tmp_path / "runs" / "lora-3e-4-1.json"))
    assert saved["train"]["lr"] == 3e-4 and "layers" not in saved and not list((tmp_path / "runs").glob("*/"))
    # Rerun: every run file is there, so nothing trains or scores again.
    monkeypatch.chdir(tmp_path)
    files = sorted((tmp_path / "work").glob("*/adapter/adapter_model.safetensors")) + sorted((tmp_path / "runs").glob("*"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    run.main(flags)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert json.load(open(tmp_path / "study.json")) == study
    # One run file lost (killed while scoring): only it is scored again, from its kept adapter, to the same figures.
    (tmp_path / "runs" / "lora-1e-2-1.json").unlink()
    run.main(flags)
    assert [f for f in files if f.stat().st_mtime_ns != stamps[f]] == [tmp_path / "runs" / "lora-1e-2-1.json"]
    assert json.load(open(tmp_path / "study.json"))["arms"] == study["arms"]


@pytest.mark.slow
def test_the_gpu_script_runs_every_step_at_toy_size_on_a_cpu(tmp_path):
    """study/gpu.sh, as it runs on a GPU but at toy size (MILORA_GPU_TINY=1): the benchmark's init, train and generate
    measures, train_math.py with bf16 and checkpointing, and a few tests, one of them skipped with its reason; each
    step's output lands in one report, and every step ends well."""
    proc = subprocess.run(["bash", os.path.join(HERE, "gpu.sh"), str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, MILORA_GPU_TINY="1"))
    report = (tmp_path / "gpu.txt").read_text()
    assert proc.returncode == 0, report[-3000:]
    assert report.splitlines()[0] == "packages: all there"
    assert re.search(r"^device: .+; torch ", report, re.M)
    for method in ("pissa", "milora", "middle", "random"):
        assert re.search(rf"^  {method} *: [\d.]+ s -> [\d.]+x the full SVD's speed over \d+ matrices; routes: "
                         rf"rayleigh-ritz \d+, newton \d+, inverse iteration \d+, full svd \d+", report, re.M), method
    assert re.search(r"PEFT pissa_niter_16 \(approximate, principal side only\): .* block error vs float64 \d", report)
    for name in ("milora", "peft lora"):
        assert re.search(rf"^train tiny .*, {name}: [\d,]+ tokens/s", report, re.M)
    assert re.search(r"^generate, adapters: [\d,]+ new tokens/s", report, re.M)
    assert re.search(r"^generate, merged: [\d,]+ new tokens/s", report, re.M)
    assert "bf16 True, gradient checkpointing True" in report and re.search(r"^accuracy: ", report, re.M)
    assert re.search(r"^SKIPPED .*needs two GPUs", report, re.M)
    assert re.search(r"^\d+ passed, 1 skipped", report, re.M)
    assert report.rstrip().splitlines()[-1].startswith("gpu.sh: 0 step(s) failed")


def test_the_spectrum_figure_shades_each_methods_triplets(tmp_path):
    """study/spectrum.py's bands are the triplets the SVD methods train (milora.triplet_indices), at both ranks, and
    its levels are float32's and the float32 Gram's resolution; the plot of a made-up spectrum is a PNG."""
    band = spectrum.bands(576)
    assert band["pissa", 16] == (0, 15) and band["pissa", 64] == (0, 63)
    assert band["milora", 16] == (560, 575) and band["milora", 64] == (512, 575)
    assert band["middle", 16] == (280, 295) and band["middle", 64] == (256, 319)
    lines = spectrum.levels(2.0, noise=0.01)
    assert list(lines.values()) == [pytest.approx(2 * 2.0 * 2**-23), pytest.approx(2.0 * 2**-11.5), 0.01]
    sigma = [10 ** (-6 * i / 575) for i in range(576)]
    spectrum.plot(sigma, band, lines, "a made-up spectrum", tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

