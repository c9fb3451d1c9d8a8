"""Plumbing shared by the nanollm scripts: devices, atomic checkpoint files, loading a model and its tokenizer.
(What the training loops share beyond this, from the config CLI to the run directory, is training.py.)

A nanollm checkpoint is a directory holding `ckpt.pt`: a dict with at least `model` (the state dict)
and `model_config` (ModelConfig as a dict); training scripts add optimizer, step, RNG and sampler
state, and save the tokenizer they used into the same directory. A model with quantized layers
(quant.py) is saved the same way plus a `quant_config` entry naming its QuantLinear layers
(quant_linear.py), which load_model puts back before loading the weights. A Hugging Face directory
(`config.json` + safetensors) and a GGUF file (gguf_io.py: weights, tokenizer and chat template in one file)
are accepted wherever a checkpoint is.
"""
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from hf_io import load_hf
from model import ModelConfig, Transformer
from quant_linear import quant_layout, replace_with_quant_layers

CHECKPOINT_FILE = "ckpt.pt"


class UsageError(ValueError):
    """A flag or an input the user can fix: one line, exit status 2 (as argparse's own errors)."""


class WriteError(ValueError):
    """An output that could not be written (read-only, a file in the way, disk full); what was there is intact."""


def exit_on_error(error: Exception, prog: str = "error") -> None:
    """The one line a script prints for an expected error, and its exit: 2 for usage errors, else 1."""
    if isinstance(error, UsageError):
        print(f"{prog}: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(f"{prog}: {error}")


def resolve_device(name: str = "auto") -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps asked for, but MPS is not available")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N or mps)")
    return name


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, else the peak resident set size."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def atomic_write(path, write) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: a crash at any moment leaves either the old
    file or the new one, never a torn one."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # torch.save reports a full disk as a RuntimeError from its zip writer or its stream, in several wordings
        failed_write = isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(
            word in str(e).lower() for word in ("write", "inline_container", "iostream")))
        reason = describe_os_error(e, path) if failed_write else ""  # before the partial file frees its space
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if failed_write:
            kept = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
            raise WriteError(f"cannot write {path} ({reason}); {kept}") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


DISK_FULL_MB = 100  # a write that fails with less free than this failed for want of space (measured with the
#                    partial file still there: a full disk here read 57 MB free, torch's error "unexpected pos")


def describe_os_error(error: Exception, path: Path) -> str:
    """Why a write under path failed, in words (errno's text is terse: 'Not a directory')."""
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None and blocker != path:
        return f"{blocker} is a file, in the way of the directory"
    if getattr(error, "errno", None) == errno.ENOSPC or "space" in str(error).lower():
        return "the disk is full"
    if isinstance(error, PermissionError) or getattr(error, "errno", None) in (errno.EACCES, errno.EROFS):
        return "the directory is not writable"
    existing = next(p for p in [path, *path.parents] if p.exists())
    free_mb = shutil.disk_usage(existing).free / 2**20  # torch's zip writer hides ENOSPC behind its own message
    if free_mb < DISK_FULL_MB:
        return f"the disk is full: {free_mb:,.0f} MB free"
    return f"{getattr(error, 'strerror', None) or str(error).split(': ')[-1]}; {free_mb:,.0f} MB free on that disk"


def check_writable_dir(out_dir, flag: str = "--out-dir") -> Path:
    """Create out_dir if needed and prove a file can be written there, before any work: a UsageError
    naming the flag and the reason otherwise."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({describe_os_error(e, path / 'x')})") from None
    return path


def save_checkpoint(ckpt_dir, model: Transformer, **state) -> Path:
    """Write ckpt_dir/ckpt.pt atomically: the model's weights and config plus any extra state; a model
    with QuantLinear layers also gets quant_config["layers"] (their shapes, for load_model)."""
    path = Path(ckpt_dir) / CHECKPOINT_FILE
    payload = {"model": model.state_dict(), "model_config": asdict(model.config), **state}
    if state.get("tokenizer") and "tokenizer_identity" not in state:  # the name of the tokenizer saved beside it
        tokenizer_json = tokenizer_file(ckpt_dir, Path(ckpt_dir) / state["tokenizer"])
        payload["tokenizer_identity"] = saved_tokenizer_identity(tokenizer_json)
    layout = quant_layout(model)
    if layout:
        payload["quant_config"] = {**payload.get("quant_config", {}), "layers": layout}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def read_checkpoint(ckpt_dir, map_location="cpu") -> dict:
    path = Path(ckpt_dir)
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no nanollm checkpoint here (expected {CHECKPOINT_FILE} in the directory)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    for key in ("model", "model_config"):
        if key not in ckpt:
            raise ValueError(f"{path}: checkpoint has no {key!r} entry")
    return ckpt


def load_model(path, device="cpu", dtype: torch.dtype | None = None, attn_backend: str | None = None) -> Transformer:
    """A model from a nanollm checkpoint directory (or ckpt.pt file), a quantized one (quant.py: its
    QuantLinear layers in place), a Hugging Face directory or a .gguf file (dequantized to float). dtype
    casts the float weights; a quantized layer keeps its packed codes and fp16 scales."""
    path = Path(path)
    if path.suffix == ".gguf":
        from gguf_io import load_gguf
        return load_gguf(path, dtype=dtype, device=device, attn_backend=attn_backend or "sdpa").eval()
    if (path / "config.json").exists() and not (path / CHECKPOINT_FILE).exists():
        return load_hf(path, dtype=dtype, device=device, attn_backend=attn_backend or "sdpa").eval()
    ckpt = read_checkpoint(path)
    config = ckpt["model_config"]
    if attn_backend:
        config = {**config, "attn_backend": attn_backend}
    model = Transformer(ModelConfig(**config))
    if "quant_config" in ckpt:
        if "layers" not in ckpt["quant_config"]:
            raise ValueError(f"{path}: quant_config has no 'layers' entry (which layers are quantized)")
        replace_with_quant_layers(model, ckpt["quant_config"]["layers"])
    model.load_state_dict(ckpt["model"])
    return model.to(device=device, dtype=dtype).eval()


def check_trainable(model, path, lora_rank: int,
                    hint: str = "fine-tune it with --lora-rank R (QLoRA: adapters on the frozen quantized layers)") -> None:
    """Refuse to fully fine-tune a quantized model (quant.py): its packed layers have no gradients, so the
    run would silently train the embeddings and norms alone. Through LoRA adapters (QLoRA) it is fine."""
    if not lora_rank and quant_layout(model):
        raise ValueError(f"--init {path} is quantized (quant.py): its linear layers cannot be trained; {hint}")


def tokenizer_file(model_path, tokenizer_path=None) -> Path:
    """The tokenizer .json to use with a model directory (what load_tokenizer reads), or a .gguf file.

    tokenizer_path, if given: a bpe.py tokenizer (the prefix given to save(), or its .json), a Hugging
    Face tokenizer.json or a .gguf. Otherwise a .gguf model is its own tokenizer, else the one train.py saves beside ckpt.pt (named by the
    checkpoint's "tokenizer" entry), else the directory's tokenizer.json (a Hugging Face model).
    """
    if tokenizer_path is None and Path(model_path).suffix == ".gguf":
        return Path(model_path)
    if tokenizer_path is None:
        model_path = Path(model_path)
        directory = model_path if model_path.is_dir() else model_path.parent
        ckpt_file = directory / CHECKPOINT_FILE if model_path.is_dir() else model_path
        name = None
        if ckpt_file.exists():  # mmap: the name only, without reading the weights
            name = torch.load(ckpt_file, map_location="cpu", mmap=True, weights_only=False).get("tokenizer")
        tokenizer_path = directory / (name or "tokenizer.json")
    path = Path(tokenizer_path)
    return path if path.suffix in (".json", ".gguf") else path.with_name(path.name + ".json")


def load_tokenizer(model_path, tokenizer_path=None):
    """The tokenizer of a model directory or .gguf, or tokenizer_path (see tokenizer_file): bpe.py's, Hugging
    Face's or a GGUF file's."""
    from bpe import Tokenizer
    json_path = tokenizer_file(model_path, tokenizer_path)
    if not json_path.exists():
        raise FileNotFoundError(f"{json_path}: no tokenizer there (give one with --tokenizer)")
    if json_path.suffix == ".gguf":
        from gguf_io import load_gguf_tokenizer
        return load_gguf_tokenizer(json_path)
    try:
        is_ours = json.loads(json_path.read_text(encoding="utf-8")).get("format") == "nanollm-bpe"
    except (ValueError, AttributeError):
        raise ValueError(f"{json_path}: not a tokenizer file (expected JSON from bpe.py or Hugging Face)") from None
    return Tokenizer.load(json_path) if is_ours else Tokenizer.from_hf(json_path)


def tokenizer_identity(tokenizer) -> str:
    """sha256 of everything that decides a text's ids: every id's bytes, the special tokens and the pre-split
    pattern. Two tokenizers with equal identities encode every text to the same ids; equal vocabulary sizes
    prove nothing (a 300-id tokenizer trained on other text gives other ids)."""
    digest = hashlib.sha256(tokenizer.pattern.encode())
    for text, i in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1]):
        digest.update(f"\0special {i} ".encode() + text.encode())
    for token, i in sorted(tokenizer.ranks.items(), key=lambda item: item[1]):
        digest.update(f"\0{i} ".encode() + token)
    return digest.hexdigest()


_identities = {}  # (path, size, mtime) -> identity: a training run saves the same tokenizer at every checkpoint


def saved_tokenizer_identity(json_path) -> str | None:
    """The identity of the tokenizer file json_path (see load_tokenizer), None where there is none."""
    path = Path(json_path)
    if not path.is_file():
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _identities:
        try:
            _identities[key] = tokenizer_identity(load_tokenizer(path.parent, path))
        except (ValueError, OSError, KeyError):  # not a tokenizer we read: nothing to compare against
            _identities[key] = None
    return _identities[key]


def check_tokenizer(model_path, tokenizer, tokenizer_path=None) -> None:
    """Refuse `tokenizer` for the model at model_path unless it is the one the model was trained with.

    The reference is the identity save_checkpoint recorded in ckpt.pt, else the tokenizer saved beside
    the model (a Hugging Face directory's tokenizer.json); with neither there is nothing to check
    against. Ids beyond the model's vocabulary are refused too; a model vocabulary padded above the
    tokenizer's (50,304 rows for GPT-2's 50,257 ids) is fine."""
    path = Path(model_path)
    directory = path if path.is_dir() else path.parent
    ckpt_file = path / CHECKPOINT_FILE if path.is_dir() else path
    given = f"tokenizer {tokenizer_path}" if tokenizer_path else "the tokenizer"
    expected, vocab_size = None, None
    if ckpt_file.is_file() and ckpt_file.suffix == ".pt":
        ckpt = torch.load(ckpt_file, map_location="cpu", mmap=True, weights_only=False)  # mmap: no weights read
        vocab_size = ckpt.get("model_config", {}).get("vocab_size")
        expected = ckpt.get("tokenizer_identity")
    elif (directory / "config.json").exists():
        vocab_size = json.loads((directory / "config.json").read_text()).get("vocab_size")
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{given} has {tokenizer.vocab_size} ids, the model {model_path} only {vocab_size}: "
                         "they do not belong together")
    if expected is None and (path.is_dir() or path.suffix == ".pt"):  # (a .gguf file carries its own tokenizer)
        expected = saved_tokenizer_identity(tokenizer_file(model_path))
    if expected is not None and tokenizer_identity(tokenizer) != expected:
        raise ValueError(f"{given} is not the tokenizer the model {model_path} was trained with (its ids mean "
                         f"other text); use the one saved with the checkpoint (leave out --tokenizer)")

