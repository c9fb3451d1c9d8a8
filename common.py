"""Plumbing shared by the nanollm scripts: devices, atomic checkpoint files, loading a model and its tokenizer,
and the command line of the training scripts (their config dataclasses, on the shared RunConfig).

A nanollm checkpoint is a directory holding `ckpt.pt`: a dict with at least `model` (the state dict)
and `model_config` (ModelConfig as a dict); training scripts add optimizer, step, RNG and sampler
state, and save the tokenizer they used into the same directory. A model with quantized layers
(quant.py) is saved the same way plus a `quant_config` entry naming its QuantLinear layers
(quant_linear.py), which load_model puts back before loading the weights. A Hugging Face directory
(`config.json` + safetensors) and a GGUF file (gguf_io.py: weights, tokenizer and chat template in one file)
are accepted wherever a checkpoint is.
"""
import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from model import ModelConfig, Transformer, load_hf
from quant_linear import quant_layout, replace_with_quant_layers

CHECKPOINT_FILE = "ckpt.pt"


def resolve_device(name: str = "auto") -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps asked for, but MPS is not available")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(ckpt_dir, model: Transformer, **state) -> Path:
    """Write ckpt_dir/ckpt.pt atomically: the model's weights and config plus any extra state; a model
    with QuantLinear layers also gets quant_config["layers"] (their shapes, for load_model)."""
    path = Path(ckpt_dir) / CHECKPOINT_FILE
    payload = {"model": model.state_dict(), "model_config": asdict(model.config), **state}
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


def truncate_metrics(metrics_file, step: int) -> None:
    """Keep the rows of a metrics.jsonl logged up to `step`: a resumed run is about to log the later ones again."""
    path = Path(metrics_file)
    rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(row + "\n" for row in rows))


def append_jsonl(path, row: dict) -> None:
    """One more row of a metrics.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


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


# ----------------------------------------------------------------------------------------------------------
# Config parsing for the training scripts: a dataclass of every hyperparameter becomes the CLI.
# Precedence: dataclass defaults < --preset < --config FILE (JSON) < flags given on the command line.

def opt(default, help, **meta):
    """A config field: its default, its --help text, and optional `choices`, `type`, `append` for the CLI."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class RunConfig:
    """The options every training script shares (train, sft, dpo, rlhf, distill): the budget, AdamW with
    warmup + cosine (train.learning_rate), evaluation and logging cadence, device, seed and resume. The
    defaults are pretraining's (train.py); the fine-tuning scripts lower lr, steps and weight decay.

    A script's config inherits it and changes a default by declaring the field again without opt():
    `lr: float = 1e-4` keeps the help text given here (parse_config reads it through the MRO)."""
    max_steps: int = opt(2000, "optimizer steps (the cosine schedule ends here)")
    max_time: float = opt(0.0, "wall-clock budget in seconds (0: none); stops cleanly, then the final eval")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(100, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices (not on norms, biases)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    eval_interval: int = opt(250, "evaluate and checkpoint every N steps (and once at the end)")
    log_interval: int = opt(10, "print a progress line every N steps")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    seed: int = opt(1337, "random seed (every random draw of the run follows from it)")
    resume: bool = opt(False, "continue from out_dir/ckpt.pt if it exists")


def field_metadata(config_class, name: str) -> dict:
    """The help, choices and type of a field: from the nearest class in the MRO that gives any (a subclass
    that only changes a default declares the field without them)."""
    for cls in config_class.__mro__:
        f = getattr(cls, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata:
            return f.metadata
    raise TypeError(f"{config_class.__name__}.{name}: no help text (declare it with opt(default, help))")


def _flag_type(default):
    if isinstance(default, bool):
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    return type(default) if default is not None else str


def parse_config(config_class, presets: dict, description: str, argv=None):
    """Build an argparse CLI from `config_class`'s fields (help text from field metadata["help"]),
    apply --preset, --config and the flags, and return the config instance.

    --help lists the script's own options first, then RunConfig's shared ones in a group of their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(presets), help="a named set of hyperparameters")
    parser.add_argument("--config", help="JSON file of hyperparameters (flags override it)")
    shared = {f.name for f in fields(RunConfig)} if issubclass(config_class, RunConfig) else set()
    shared_group = parser.add_argument_group("optimisation and run (shared by every training script: common.RunConfig)")
    for f in sorted(fields(config_class), key=lambda f: f.name in shared):  # stable: the script's own first
        group = shared_group if f.name in shared else parser
        meta = field_metadata(config_class, f.name)
        flag = "--" + f.name.replace("_", "-")
        if meta.get("append"):  # a list field: the flag may be given several times
            group.add_argument(flag, action="append", default=argparse.SUPPRESS,
                               help=f"{meta.get('help', '')} (repeatable)")
            continue
        kind = meta.get("type") or _flag_type(f.default)
        is_bool = isinstance(f.default, bool)  # `--compile` alone means true; `--compile false` also works
        group.add_argument(flag, type=kind, default=argparse.SUPPRESS, **({"nargs": "?", "const": True} if is_bool else {}),
                           help=f"{meta.get('help', '')} (default: {f.default})",
                           **({"choices": meta["choices"]} if "choices" in meta else {}))
    args = vars(parser.parse_args(argv))
    values = dict(presets[args.pop("preset")]) if args.get("preset") else {}
    args.pop("preset", None)
    config_file = args.pop("config", None)
    if config_file:
        try:
            from_file = json.loads(open(config_file, encoding="utf-8").read())
        except (OSError, ValueError) as e:
            parser.error(f"--config {config_file}: {e}")
        known = {f.name for f in fields(config_class)}
        unknown = sorted(set(from_file) - known)
        if unknown:
            parser.error(f"--config {config_file}: unknown keys {unknown}")
        values.update(from_file)
    values.update(args)
    return config_class(**values)
