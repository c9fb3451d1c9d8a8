"""What GPTQ's result depends on besides the algorithm: calibration size, act-order and dampening, each row
against RTN at the same grid, perplexity on held-out text, in one run.

    python -m bench.gptq_inputs --ckpt SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib-text ../shared/data/pretrain/c4_demo.jsonl --eval-text ../shared/data/pretrain/wiki_demo.txt \\
        --group-size 64 --out-dir runs/gptq-inputs
    python -m bench.gptq_inputs --ckpt ... --rows fp32,rtn:64,gptq:64:n=128:T=512:act=1:damp=0.001

quant.py's GPTQ matches the IST-DASLab reference bit for bit given the same Hessian (tests/test_quant.py),
so when GPTQ barely beats RTN the inputs are what to look at: the GPTQ paper calibrates on 128 x 2048
tokens of C4 (a Hessian of a 1,536-wide down_proj from 2,048 tokens is barely full rank: GPTQ overfits it
and does worse than RTN on held-out inputs, docs/pipeline_real_model.md), act-order puts the columns with
the largest input energy first (SmolLM2's down_proj inputs carry outlier channels a million times the
median channel's energy: act-order is what lets GPTQ compensate their error), and the dampening
(percdamp x the mean Hessian diagonal, added to every diagonal entry) keeps a thin Hessian honest. Quantization
is sequential, as in the reference: each layer calibrated on inputs that went through the already
quantized layers (quant.quantize_model).

A row is METHOD:GROUP[:key=value...], METHOD fp32 | rtn | gptq | nf4, GROUP 0 (per channel) or a group
size; keys: n (calibration windows, default 8), T (tokens a window, 256), act (1: act-order), damp
(percdamp, 0.01), bits (4). Calibration windows are drawn from the first nine tenths of --calib-text's
tokens, perplexity is on the first --eval-tokens of the last tenth of --eval-text (never calibrated on):
the same tokens for every row. Each finished row is appended to OUT/rows.jsonl at once (a rerun skips
the rows already there), then the table: perplexity, its increase over fp32, and for GPTQ the share of
RTN's increase at the same grid it removes (the GPTQ paper's OPT-125M: 64%).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import load_model, load_tokenizer
from evaluate import encode_documents, perplexity, token_byte_lengths
from quant import QuantSpec, quantize_model

KEYS = {"n": 8, "T": 256, "act": 0, "damp": 0.01, "bits": 4}


def parse_row(row: str) -> dict:
    """'gptq:64:n=128:act=1' -> {"method": "gptq", "group": 64, "n": 128, "T": 256, "act": 1, ...}."""
    method, *rest = row.split(":")
    if method not in ("fp32", "rtn", "gptq", "nf4") or (method != "fp32" and not rest):
        raise SystemExit(f"error: --rows {row!r}: expected fp32 or METHOD:GROUP[:key=value...], METHOD rtn|gptq|nf4")
    out = {"method": method, "group": int(rest[0]) if rest else 0, **KEYS}
    for item in rest[1:]:
        key, _, value = item.partition("=")
        if key not in KEYS:
            raise SystemExit(f"error: --rows {row!r}: unknown key {key!r} (one of {', '.join(KEYS)})")
        out[key] = type(KEYS[key])(float(value)) if isinstance(KEYS[key], int) else float(value)
    return out


def windows(tokens: np.ndarray, n: int, seq_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - seq_len, (n,), generator=g).tolist()
    return torch.from_numpy(np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a .gguf, Hugging Face or nanollm model directory")
    p.add_argument("--calib-text", required=True, help="raw text (.txt a document a line, or .jsonl) for calibration")
    p.add_argument("--eval-text", required=True, help="raw text whose last tenth is the held-out perplexity text")
    p.add_argument("--group-size", type=int, default=64, help="the grid of the default rows' grouped int4")
    p.add_argument("--rows", help="comma-separated rows (default: fp32, RTN and GPTQ variants per channel and "
                                  "with --group-size groups)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens (windows of --eval-seq-len)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--out-dir", required=True, help="rows.jsonl goes here (rows already in it are skipped)")
    args = p.parse_args(argv)
    g = args.group_size
    rows = args.rows.split(",") if args.rows else [
        "fp32", "rtn:0", f"rtn:{g}", f"gptq:0", f"gptq:{g}", f"gptq:{g}:n=128:T=512", f"gptq:{g}:n=128:T=512:act=1",
        f"gptq:{g}:n=128:T=512:act=1:damp=0.001", "gptq:0:n=128:T=512:act=1:damp=0.001", f"nf4:{g}"]
    specs = {row: parse_row(row) for row in rows}
    for path in (args.ckpt, args.calib_text, args.eval_text):
        if not Path(path).exists():
            raise SystemExit(f"error: {path}: no such file or directory")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["row"]: json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()} \
        if (out / "rows.jsonl").exists() else {}

    tokenizer = load_tokenizer(args.ckpt)
    calib_tokens = encode_documents(tokenizer, args.calib_text, "line")
    calib_tokens = calib_tokens[:len(calib_tokens) * 9 // 10]
    eval_tokens = encode_documents(tokenizer, args.eval_text, "line")
    eval_tokens = eval_tokens[len(eval_tokens) * 9 // 10:]
    print(f"calibration pool {len(calib_tokens):,} tokens; held-out {min(len(eval_tokens), args.eval_tokens):,} "
          f"tokens of {len(eval_tokens):,}", flush=True)
    for i, row in enumerate(rows):
        if row in done:
            continue
        s = specs[row]
        model = load_model(args.ckpt)
        t0 = time.time()
        if s["method"] != "fp32":
            spec = QuantSpec(s["method"], s["bits"], s["group"], act_order=bool(s["act"]), percdamp=s["damp"])
            calib = windows(calib_tokens, s["n"], s["T"], args.seed) if s["method"] == "gptq" else None
            quantize_model(model, spec, calib, log=None)
        quant_s = time.time() - t0
        metrics = perplexity(model, eval_tokens, token_byte_lengths(tokenizer, model.config.vocab_size),
                             seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, dtype="float32")
        done[row] = {"row": row, **s, "ppl": metrics["ppl"], "bpb": metrics["bpb"], "tokens": metrics["tokens"],
                     "quant_s": quant_s, "eval_s": time.time() - t0 - quant_s}
        with open(out / "rows.jsonl", "a") as fh:
            fh.write(json.dumps(done[row]) + "\n")
        print(f"[{i + 1}/{len(rows)}] {row}: perplexity {metrics['ppl']:.3f} (quantized in {quant_s:.0f} s)", flush=True)

    fp32 = done.get("fp32", {}).get("ppl")
    print("\n| row | perplexity | vs fp32 | share of RTN's increase removed | quantization s |\n|---|---:|---:|---:|---:|")
    for row in rows:
        r = done[row]
        rtn = done.get(f"rtn:{r['group']}" + ("" if r["bits"] == 4 else f":bits={r['bits']}"), {}).get("ppl")
        removed = f"{(rtn - r['ppl']) / (rtn - fp32):.0%}" if r["method"] == "gptq" and rtn and fp32 and rtn > fp32 \
            else ""
        vs = f"{r['ppl'] / fp32 - 1:+.1%}" if fp32 and row != "fp32" else ""
        print(f"| {row} | {r['ppl']:.3f} | {vs} | {removed} | {r['quant_s']:.0f} |")


if __name__ == "__main__":
    main()
