"""AWQ and SmoothQuant against RTN, GPTQ and fp32: perplexity, size and calibration time, in one run.

    python -m bench.awq --model out/q-shakespeare --data data/shakespeare            # a nanollm model: its val split
    python -m bench.awq --model smollm2 --calib-text ../shared/data/pretrain/c4_demo.jsonl \\
        --eval-text ../shared/data/pretrain/wiki_demo.txt --group-size 64          # SmolLM2-135M-Instruct

--model: a nanollm checkpoint, a Hugging Face directory or a .gguf file (common.load_model), or smollm2 for
SmolLM2-135M-Instruct's Q4_1 GGUF as `python gguf_io.py fetch` gets it (dequantized to float here).

Rows: fp32; RTN, GPTQ, AWQ and AWQ+GPTQ at int4 per channel and with groups of --group-size; W8A8 not
smoothed and SmoothQuant W8A8 (--alpha, 0.5 by default). Columns: perplexity on the held-out tokens (the
same tokens for every row), its change against fp32 (measured in every run, a row or not), the block
linears' storage, and the quantization time (calibration forward passes and searches included). Then the
activation outliers that W8A8 meets: for the linear input with the largest max/median ratio of per-channel
activation maxima, the top channels before and after smoothing, and a plot of all its channels (--out-dir).

With --calib-text / --eval-text (raw text: .txt one document a line, or .jsonl with a "text" field) the
token ids come from the model's own tokenizer (common.load_tokenizer: bpe.py's reading of the .gguf, the
Hugging Face tokenizer.json or the checkpoint's tokenizer), each document followed by the end-of-text id.
"""
import argparse
import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from activation_quant import awq_quantize, input_absmax, quantize_w8a8, scaling_pairs, smooth
from common import load_model, load_tokenizer
from gguf_io import fetch_smollm2
from quant import QuantSpec, calibration_tokens, linear_bytes, quantize_model, target_names
from quant_linear import QuantError, int8_backend
from train import evaluate

METHODS = ("fp32", "rtn", "gptq", "awq", "awq-gptq", "w8a8", "smoothquant")
LABELS = {"rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "awq-gptq": "AWQ+GPTQ"}


def end_of_text_id(tokenizer, model_path: Path) -> int:
    """The id that ends a document: a GGUF tokenizer's eos, a Hugging Face directory's config.json
    eos_token_id, else bpe.py's <|endoftext|>."""
    eos = getattr(tokenizer, "eos_id", None)
    config = model_path / "config.json"
    if eos is None and config.is_file():
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
    return tokenizer.special_tokens["<|endoftext|>"] if eos is None else eos


def text_tokens(path: Path, tokenizer, eos: int) -> np.ndarray:
    """A text file's documents as one token stream, each document followed by eos."""
    lines = path.read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line)["text"] for line in lines if line.strip()] if path.suffix == ".jsonl" \
        else [line for line in lines if line.strip()]
    ids = []
    for doc in docs:
        ids += tokenizer.encode_ordinary(doc) + [eos]
    return np.array(ids, dtype=np.int64)


def random_windows(tokens: np.ndarray, n: int, seq_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - seq_len, (n,), generator=g).tolist()
    return torch.from_numpy(np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64))


def perplexity(model, tokens: np.ndarray, seq_len: int, max_tokens: int) -> float:
    """train.evaluate's perplexity over consecutive windows of the held-out tokens."""
    with torch.no_grad():
        no_bytes = torch.ones(model.config.vocab_size, dtype=torch.long)  # bpb unused here
        return evaluate(model, tokens, seq_len, 8, next(model.parameters()).device, nullcontext(), no_bytes,
                        max_tokens)["val_ppl"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="a nanollm checkpoint, Hugging Face directory or .gguf; smollm2: `gguf_io.py fetch`'s SmolLM2-135M-Instruct")
    p.add_argument("--data", help="prepared data directory: calibration from train, perplexity on val")
    p.add_argument("--calib-text", help="raw text for calibration (.txt or .jsonl, tokenized with the model's tokenizer)")
    p.add_argument("--eval-text", help="raw held-out text for perplexity (same tokenizer)")
    p.add_argument("--group-size", type=int, default=128, help="the grouped int4 rows (must divide every layer's width)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens (0: all)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength in [0, 1]")
    p.add_argument("--search-tokens", type=int, default=4096, help="calibration tokens AWQ's alpha search measures on")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--out-dir", help="write rows.json and the outlier plot here")
    args = p.parse_args(argv)
    if bool(args.data) == bool(args.calib_text and args.eval_text):
        p.error("give either --data or both --calib-text and --eval-text")
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        p.error(f"--methods: unknown {sorted(set(methods) - set(METHODS))} (choose from {','.join(METHODS)})")
    if not 0 <= args.alpha <= 1:
        p.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.calib_samples < 1:
        p.error(f"--calib-samples must be at least 1, got {args.calib_samples}")
    for flag, value in (("--data", args.data), ("--calib-text", args.calib_text), ("--eval-text", args.eval_text)):
        if value and not Path(value).exists():
            p.error(f"{flag} {value}: no such file or directory")
    model_path = fetch_smollm2() if args.model == "smollm2" else Path(args.model)
    if not model_path.exists():
        p.error(f"--model {args.model}: no such file or directory")
    torch.manual_seed(0)

    base = load_model(model_path)
    seq_len = min(args.eval_seq_len, base.config.max_seq_len)
    calib_len = min(args.calib_seq_len, base.config.max_seq_len)
    if args.data:
        from train import load_split, read_meta
        held_out = load_split(Path(args.data), "val", read_meta(Path(args.data))).astype(np.int64)
        calib = calibration_tokens(args.data, args.calib_samples, calib_len, args.seed)
    else:
        tokenizer = load_tokenizer(model_path)
        eos = end_of_text_id(tokenizer, model_path)
        held_out = text_tokens(Path(args.eval_text), tokenizer, eos)
        calib = random_windows(text_tokens(Path(args.calib_text), tokenizer, eos), args.calib_samples, calib_len,
                               args.seed)
    names = target_names(base, False)
    fp_bytes = sum(base.get_submodule(n).weight.numel() * 4 for n in names)
    g = args.group_size
    int4 = [(f"{LABELS[method]} int4 {label}", method, group)
            for group, label in ((0, "pc"), (g, f"g{g}"))
            for method in ("rtn", "awq", "gptq", "awq-gptq") if method in methods]
    try:  # a group size that does not divide a layer fails here, not after the first rows' work
        for name in names if int4 else []:
            QuantSpec("rtn", 4, g).groups_of(base.get_submodule(name).in_features, name)
    except QuantError as e:
        p.error(str(e))
    rows = []

    def add(label, model, seconds):
        ppl = perplexity(model, held_out, seq_len, args.eval_tokens)
        stored = linear_bytes(model, names)[0]
        rows.append({"method": label, "ppl": ppl, "linear_mb": stored / 1e6, "quant_time_s": seconds})
        print(f"{label:26s} ppl {ppl:9.3f} | linear layers {stored / 1e6:7.2f} MB | {seconds:6.1f} s", flush=True)

    fp = perplexity(base, held_out, seq_len, args.eval_tokens)  # every row's reference, a row or not
    if "fp32" in methods:
        rows.append({"method": "fp32", "ppl": fp, "linear_mb": fp_bytes / 1e6, "quant_time_s": 0.0})
    print(f"{'fp32':26s} ppl {fp:9.3f} | linear layers {fp_bytes / 1e6:7.2f} MB |", flush=True)
    if "w8a8" in methods:
        naive = copy.deepcopy(base)
        t0 = time.time()
        quantize_w8a8(naive, log=None)
        add("W8A8 (not smoothed)", naive, time.time() - t0)
    if "smoothquant" in methods:
        smoothed = copy.deepcopy(base)
        t0 = time.time()
        smooth_rows = smooth(smoothed, calib, args.alpha, log=None)
        float_smoothed = copy.deepcopy(smoothed)
        quantize_w8a8(smoothed, log=None)
        add(f"SmoothQuant W8A8 a{args.alpha}", smoothed, time.time() - t0)
    for label, method, group in int4:
        model = copy.deepcopy(base)
        t0 = time.time()
        if method in ("rtn", "gptq"):
            quantize_model(model, QuantSpec(method, 4, group), calib if method == "gptq" else None, log=None)
        else:
            awq_quantize(model, QuantSpec("awq", 4, group), calib, gptq=method == "awq-gptq",
                         search_tokens=args.search_tokens, log=None)
        add(label, model, time.time() - t0)

    by = {r["method"]: r["ppl"] for r in rows}
    print(f"\nfp32 perplexity {fp:.3f} (the reference of the vs fp32 column)")
    print("| method | ppl | vs fp32 | block linears (MB) | quantization time (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ppl']:.3f} | {(r['ppl'] / fp - 1) * 100:+.2f}% | {r['linear_mb']:.2f} | "
              f"{r['quant_time_s']:.1f} |")
    for label in ("pc", f"g{g}"):
        if f"AWQ int4 {label}" not in by or f"RTN int4 {label}" not in by:
            continue
        print(f"AWQ int4 {label} vs RTN int4 {label}: {by[f'AWQ int4 {label}'] - fp:+.3f} vs {by[f'RTN int4 {label}'] - fp:+.3f}"
              f" perplexity ({'better' if by[f'AWQ int4 {label}'] < by[f'RTN int4 {label}'] else 'NOT better'})")
    k, n = base.config.dim, base.config.hidden_dim
    windows = min(8, (len(held_out) - 1) // seq_len, max(1, args.eval_tokens // seq_len) if args.eval_tokens else 8)
    device = next(base.parameters()).device
    print(f"W8A8 matmul: {int8_backend(device, windows * seq_len, k, n)} on {device} ({windows * seq_len} rows per call)")

    if "smoothquant" not in methods:
        return write_rows(args, rows, None, None)
    # the outliers: per-channel activation maxima of every smoothed linear input, before and after
    readers = [f"layers.{i}.{readers[0]}" for i, block in enumerate(base.layers) for _, readers in scaling_pairs(block)]
    before = input_absmax(base, calib, readers)
    after = input_absmax(float_smoothed, calib, readers)
    ratio = {name: (m.max() / m.median()).item() for name, m in before.items()}
    worst = max(ratio, key=ratio.get)
    top = torch.argsort(before[worst], descending=True)[:8]
    print(f"\nlargest outliers: input of {worst} (max/median of the per-channel maxima: {ratio[worst]:.0f}x before, "
          f"{(after[worst].max() / after[worst].median()).item():.1f}x after smoothing)")
    print("| channel | max abs activation | after smoothing |\n|---|---|---|")
    for c in top.tolist():
        print(f"| {c} | {before[worst][c]:.2f} | {after[worst][c]:.2f} |")
    print(f"median channel: {before[worst].median():.3f} before, {after[worst].median():.3f} after")
    print("max/median per smoothed input (largest 5): " + ", ".join(
        f"{n} {r:.0f}x" for n, r in sorted(ratio.items(), key=lambda kv: -kv[1])[:5]))

    write_rows(args, rows, smooth_rows, worst)
    if args.out_dir:
        out = Path(args.out_dir)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(9, 3.5))
        ax.plot(before[worst].numpy(), lw=0.8, label="before smoothing")
        ax.plot(after[worst].numpy(), lw=0.8, label=f"after smoothing (alpha {args.alpha})")
        ax.set_yscale("log")
        ax.set_xlabel("input channel")
        ax.set_ylabel("max |activation| (calibration)")
        ax.set_title(f"{model_path.name}: input of {worst}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "channel_maxima.png", dpi=120)
        print(f"wrote {out / 'channel_maxima.png'}")


def write_rows(args, rows, smooth_rows, worst) -> None:
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.json").write_text(json.dumps({"args": vars(args), "rows": rows, "smoothing": smooth_rows,
                                                   "outlier_layer": worst}, indent=2))
        print(f"wrote {out / 'rows.json'}")


if __name__ == "__main__":
    main()
