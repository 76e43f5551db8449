"""Shared fixtures: a tokenizer and tiny real models (Qwen2 and Llama), built offline once per session."""
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Triton fixes interpreter mode when its JIT decorators run, i.e. at the first import of any Triton
# code (ours, or another library's pulled in by an earlier test). Without a GPU every Triton kernel
# in the session must be interpreted, so say so before anything is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from fastdadpo.demo.synthetic import build_tokenizer, task_corpus

    path = str(tmp_path_factory.mktemp("tokenizer"))
    build_tokenizer(task_corpus(400, seed=0), vocab_size=320).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _save(tmp_path_factory, name, tokenizer, **kwargs):
    from fastdadpo.demo.synthetic import save_model_dir, tiny_causal_lm

    model = tiny_causal_lm(kwargs.pop("vocab_size", len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, **kwargs)
    return save_model_dir(model, tokenizer, str(tmp_path_factory.mktemp(name)))


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer):
    """A tiny Qwen2 student (hidden 32, 2 layers)."""
    return _save(tmp_path_factory, "student", tokenizer, hidden_size=32, layers=2, heads=4, kv_heads=2, seed=1)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer):
    """A tiny Qwen2 teacher, wider than the student, with an LM head padded past the tokenizer's
    vocabulary (as Qwen2.5-7B's 152,064 rows against 151,936)."""
    return _save(tmp_path_factory, "teacher", tokenizer, vocab_size=len(tokenizer) + 64, hidden_size=48, layers=2,
                 heads=4, kv_heads=2, seed=2)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    """A tiny Llama with tied embeddings."""
    return _save(tmp_path_factory, "llama", tokenizer, arch="llama", hidden_size=32, layers=2, heads=4, kv_heads=4,
                 tie_word_embeddings=True, seed=3)
