"""The Hugging Face side of the benchmarks: transformers is the reference nanollm is compared with, never
part of the implementation, so the code that builds and runs it lives here beside the tests.

    from tests.reference import hf_llama_like, hf_copy     # bench/model.py, bench/decode.py
"""
import tempfile

import torch
import transformers

from hf_io import config_to_hf, save_hf
from model import Transformer


def hf_llama_like(model: Transformer, attn_implementation: str = "sdpa") -> transformers.LlamaForCausalLM:
    """A transformers LlamaForCausalLM with `model`'s config and weights (fp32), built in memory."""
    hf_config = transformers.LlamaConfig(**config_to_hf(model.config, torch.float32))
    hf_config._attn_implementation = attn_implementation
    hf_model = transformers.LlamaForCausalLM(hf_config)
    state = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in model.state_dict().items()}
    hf_model.load_state_dict(state, strict=False)  # a tied lm_head has no key of its own
    return hf_model


def hf_copy(model: Transformer) -> torch.nn.Module:
    """`model` saved with save_hf and loaded back by transformers' AutoModelForCausalLM (eval mode)."""
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as hf_dir:
        save_hf(model, hf_dir)
        return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def hf_gguf_model(path) -> torch.nn.Module:
    """transformers' own GGUF loader on `path` (fp32, eval mode): bench.gguf's reference."""
    from pathlib import Path
    path = Path(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


TRANSFORMERS_VERSION = transformers.__version__
