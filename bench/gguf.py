"""gguf_io.py against llama.cpp (llama-cpp-python) and transformers' GGUF loader, on SmolLM2-135M-Instruct
(`python gguf_io.py fetch`), in one run, printing Markdown tables:

  1. tokenizer: ids identical to llama.cpp's on varied strings and real documents
  2. perplexity on held-out English (the last lines of pretrain/wiki_demo.txt) and top-1 next-token
     agreement: nanollm, transformers and llama.cpp on the same Q4_1 file
  3. exported files: llama.cpp's perplexity on SmolLM2 written back by save_gguf as f16 and q8_0, beside
     nanollm's own; a small model nanollm trains here (its own bpe.py tokenizer) exported as f32: token ids
     and logits in llama.cpp against nanollm
  4. decode tokens/s (greedy, batch 1, 2 threads each): nanollm fp32 and --weights int4 (sample.py: the file's
     Q4_1 codes through torch's CPU int4 kernel), transformers, llama.cpp, each beside the memory-bandwidth
     bound (bytes of weights read per token over the copy bandwidth measured here); and int4's perplexity and
     top-1 agreement against fp32 on the held-out windows

    python -m bench.gguf [--windows 4] [--window 256] [--tokens 64] [--decode-only] [--compiled]
"""
import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gguf_io
from bpe import Tokenizer
from common import load_model, load_tokenizer
from model import ModelConfig, Transformer
from quant_linear import Int4CPULinear, int4_decode_layers
from sample import generate
from tests.reference import TRANSFORMERS_VERSION, hf_gguf_model  # the transformers side of the comparison

STRINGS = ["Hello world", "  123 4567 89", "The year 2024, 3.14159 and 1,000,000!", "   leading\tand\t\ttabs  \n\n  ",
           "中文字符和日本語のテキスト", "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "def f(x):\n    return x**2  # square\n",
           "café naïve résumé Ångström", "x\u00a0y\u2003z", "don't I'll WE'VE 'LL", "a  1  b   22\n\n 3",
           "control\x04bytes\x06!\x04!", "Ünïcödé 12ab34", "\n\n\n", "    indented\n\tcode {}[]();"]


def llama_cpp_model(path, n_ctx, logits_all=True, f32_cache=False):
    """f32_cache: keys and values kept in fp32 (llama.cpp's default cache is fp16), for exact comparisons."""
    import llama_cpp
    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0: GGML_TYPE_F32
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=logits_all, n_threads=2, n_batch=512, verbose=False,
                           **cache)


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def nll(logits: np.ndarray, ids) -> np.ndarray:
    """Negative log-likelihood of ids[1:] under logits[:-1] (float64)."""
    x = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    return F.cross_entropy(x[:-1], torch.tensor(ids[1:]), reduction="none").numpy()


def windows_of(ids, n, size):
    return [ids[i * size:(i + 1) * size] for i in range(n) if (i + 1) * size <= len(ids)]


def perplexity_rows(models: dict, wins):
    """models: name -> function(ids) -> logits (T, V). Returns {name: (ppl, logits list)}."""
    out = {}
    for name, run in models.items():
        logits = [run(w) for w in wins]
        out[name] = (float(np.exp(np.concatenate([nll(l, w) for l, w in zip(logits, wins)]).mean())), logits)
    return out


def nanollm_logits(model):
    def run(ids):
        with torch.no_grad():
            return model(torch.tensor([list(ids)]))[0][0].numpy()
    return run


def tokenizer_table(tokenizer, llm, data_dir):
    docs = {f"string {i}": s for i, s in enumerate(STRINGS)}
    wiki = (data_dir / "pretrain/wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    docs.update({"wiki_demo.txt (1.0 MB)": "\n".join(wiki), "tinyshakespeare (first 200 KB)":
                 (data_dir / "tinyshakespeare/input.txt").read_text(encoding="utf-8")[:200_000],
                 "gguf_io.py (code)": Path(gguf_io.__file__).read_text(encoding="utf-8"),
                 "Tang poems (one file)": (data_dir / "tang_poems/poet.tang.0.json").read_text(encoding="utf-8")[:100_000]})
    rows, same = [], 0
    for name, text in docs.items():
        ours = tokenizer.encode_ordinary(text)  # llama.cpp's special=False: text spelling a special is text
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        ok = ours == theirs
        same += ok
        if not name.startswith("string") or not ok:
            rows.append(f"| {name} | {len(ours):,} | {'identical' if ok else 'DIFFERENT'} |")
    print(f"\n### Tokenizer: nanollm (bpe.py from the GGUF metadata) vs llama.cpp\n\n{same}/{len(docs)} inputs give "
          f"identical ids ({len(STRINGS)} short strings: digit and whitespace runs, CJK, emoji, code, accented "
          f"Latin, control bytes the vocabulary lacks; and these documents):\n")
    print("| input | tokens | ids |\n|---|---|---|")
    print("\n".join(rows))


def train_small_model(data_dir, steps=300):
    """A bpe.py tokenizer (cl100k split, 1024 ids) and a 2-layer model trained on Tiny Shakespeare."""
    text = (data_dir / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer.train(text[:300_000], 1024, pattern="cl100k", name="shakespeare-1k")
    data = torch.tensor(tokenizer.encode(text[:300_000]))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, tie_embeddings=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        starts = torch.randint(len(data) - 129, (16,))
        batch = torch.stack([data[s:s + 129] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, loss.item(), text[-20_000:]


def export_tables(model, tokenizer, llm_ppl_of, wins, own_ppl, data_dir, tmp):
    rows = []
    for qtype in ("f16", "q8_0"):
        path = gguf_io.save_gguf(model, tokenizer, Path(tmp) / f"smollm2-{qtype}.gguf", qtype, "SmolLM2 re-export")
        ppl = llm_ppl_of(path)
        rows.append(f"| {qtype} | {path.stat().st_size / 2**20:.0f} MiB | {ppl:.4f} | {own_ppl:.4f} | "
                    f"{100 * (ppl / own_ppl - 1):+.2f}% |")
    print("\n### Exported SmolLM2 (save_gguf of the model nanollm loaded) in llama.cpp\n")
    print("| type | file | llama.cpp perplexity | nanollm fp32 perplexity | difference |\n|---|---|---|---|---|")
    print("\n".join(rows))

    small, small_tok, loss, heldout = train_small_model(data_dir)
    path = gguf_io.save_gguf(small, small_tok, Path(tmp) / "shakespeare-f32.gguf", "f32", "shakespeare")
    llm = llama_cpp_model(path, 256, f32_cache=True)
    lines = [line for line in heldout.splitlines() if line.strip()][:200]
    same = sum(small_tok.encode(line) == llm.tokenize(line.encode(), add_bos=False, special=False) for line in lines)
    ids = small_tok.encode(heldout)[:256]
    theirs, ours = llama_logits(llm, ids), nanollm_logits(small)(ids)
    print(f"\n### A model nanollm trained here (tiny preset, 300 steps on Tiny Shakespeare, final loss {loss:.2f}; "
          f"bpe.py tokenizer, 1024 ids, cl100k split -> llama-bpe), exported as f32 (llama.cpp with an fp32 KV cache)\n")
    print("| check | result |\n|---|---|")
    print(f"| token ids, 200 held-out lines | {same}/{len(lines)} identical |")
    print(f"| logits, 256 held-out tokens | max abs difference {np.abs(theirs - ours).max():.2e} "
          f"(logits up to {np.abs(ours).max():.1f}); top-1 agreement {(theirs.argmax(1) == ours.argmax(1)).mean():.1%} |")


def copy_bandwidth_gbs() -> float:
    """Sustained memory bandwidth, bytes read + written per second, of a 256 MiB copy (best of 5)."""
    src = np.ones(64 * 2**20, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def int4_quality(model, int4_model, wins):
    """Perplexity of both models on the held-out windows, and top-1 agreement of int4 with fp32."""
    full, fast = nanollm_logits(model), nanollm_logits(int4_model)
    results = perplexity_rows({"fp32": full, "int4": fast}, wins)
    agree = np.mean(np.concatenate([a.argmax(1) == b.argmax(1) for a, b in zip(results["fp32"][1], results["int4"][1])]))
    (ppl, _), (ppl4, _) = results["fp32"], results["int4"]
    print(f"\nnanollm --weights int4 against fp32 on {len(wins)} held-out windows of {len(wins[0])} tokens: perplexity "
          f"{ppl4:.4f} against {ppl:.4f} ({100 * (ppl4 / ppl - 1):+.2f}%), top-1 agreement {agree:.1%}")


def decode_table(path, model, tokenizer, n_tokens, repeats, wins, with_compiled=False):
    torch.set_num_threads(2)
    prompt = tokenizer.encode("Once upon a time, in a small village by the sea, there lived")
    int4 = copy.deepcopy(model)
    int4_decode_layers(int4)  # what sample.py --weights int4 decodes with
    hf = hf_gguf_model(path)
    llm = llama_cpp_model(path, 512, logits_all=False)

    def run_llama():
        llm.reset()
        llm.eval(prompt)
        for _ in range(n_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    def run_hf():
        with torch.no_grad():
            hf.generate(torch.tensor([prompt]), max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                        top_k=None, top_p=None, temperature=None)

    def run_nanollm(m, compile=False):
        return lambda: generate(m, torch.tensor(prompt), n_tokens, temperature=0, compile=compile)

    c = model.config
    linear = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    head_bytes = 4 * c.vocab_size * c.dim
    fp32_bytes = 4 * linear + head_bytes                # every matrix and the (tied) head, once per token
    int4_bytes = head_bytes + sum(m.storage_bytes() for m in int4.modules() if isinstance(m, Int4CPULinear))
    gguf_file = gguf_io.GGUFFile(path)
    file_bytes = sum(size for name, (_, _, _, size) in gguf_file.tensors.items())  # the Q8_0 table is the head
    cases = {"nanollm fp32 (dequantized on load), KV cache": (run_nanollm(model), fp32_bytes),
             "nanollm --weights int4 (the file's Q4_1 codes, torch's int4 kernel; fp32 head), KV cache":
                 (run_nanollm(int4), int4_bytes)}
    if with_compiled:
        run_nanollm(model, compile=True)()  # compiles the decode step once, outside the timed runs (as gpt-fast times)
        cases["nanollm fp32, KV cache, torch.compile'd decode step"] = (run_nanollm(model, compile=True), fp32_bytes)
    cases["transformers fp32 (its GGUF loader), generate"] = (run_hf, fp32_bytes)
    cases["llama.cpp, the Q4_1 file as stored"] = (run_llama, file_bytes)
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):  # interleaved: background load hits every side alike
        for name, (run, _) in cases.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    bandwidth = copy_bandwidth_gbs()
    tps = {name: n_tokens / seconds for name, seconds in best.items()}
    hf_tps = tps["transformers fp32 (its GGUF loader), generate"]
    print(f"\n### Decode speed: {n_tokens} greedy tokens after a {len(prompt)}-token prompt, batch 1, 2 threads, "
          f"best of {repeats} interleaved runs; copy bandwidth measured {bandwidth:.1f} GB/s\n")
    print("| engine | tokens/s | vs transformers | weights read per token | bandwidth bound, tokens/s | share of bound |")
    print("|---|---|---|---|---|---|")
    for name, value in tps.items():
        nbytes = cases[name][1]
        bound = bandwidth * 1e9 / nbytes
        print(f"| {name} | {value:.1f} | {value / hf_tps:.2f}x | {nbytes / 2**20:.0f} MiB | {bound:.0f} | {value / bound:.0%} |")
    int4_quality(model, int4, wins)


def main(argv=None):
    parser = argparse.ArgumentParser(description="gguf_io.py against llama.cpp and transformers on SmolLM2-135M-Instruct.")
    parser.add_argument("--model", help="the .gguf (default: python gguf_io.py fetch)")
    parser.add_argument("--data", default=os.environ.get("NANOLLM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")),
                        help="shared data folder (default: $NANOLLM_DATA)")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows for perplexity (default: 4)")
    parser.add_argument("--window", type=int, default=256, help="tokens per window (default: 256)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to decode in the speed table (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved decode runs, best kept (default: 3)")
    parser.add_argument("--decode-only", action="store_true", help="only the decode-speed table (and int4's perplexity)")
    parser.add_argument("--compiled", action="store_true", help="add a row for the torch.compile'd fp32 decode step")
    args = parser.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: this benchmark needs llama-cpp-python and transformers ({e})")
    torch.set_num_threads(2)
    path = Path(args.model) if args.model else gguf_io.fetch_smollm2()
    data_dir = Path(args.data)
    load1 = os.getloadavg()
    model, tokenizer = load_model(path), load_tokenizer(path)
    print(f"`python -m bench.gguf`: {path.name}; llama-cpp-python {llama_cpp.__version__}, transformers "
          f"{TRANSFORMERS_VERSION}, torch {torch.__version__}; {os.cpu_count()} CPU cores shared with other jobs, "
          f"load average {load1[0]:.1f} at the start")
    lines = (data_dir / "pretrain/wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    heldout = "\n".join(lines[-200:])
    wins = windows_of(tokenizer.encode(heldout), args.windows, args.window)
    if args.decode_only:
        decode_table(path, model, tokenizer, args.tokens, args.repeats, wins, args.compiled)
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
        return
    tokenizer_table(tokenizer, llama_cpp_model(path, 256, logits_all=False), data_dir)
    hf = hf_gguf_model(path)
    llm = llama_cpp_model(path, args.window)

    def hf_logits(ids):
        with torch.no_grad():
            return hf(torch.tensor([list(ids)])).logits[0].numpy()

    results = perplexity_rows({"nanollm (gguf_io.py, fp32)": nanollm_logits(model), "transformers GGUF loader (fp32)": hf_logits,
                               "llama.cpp": lambda ids: llama_logits(llm, ids)}, wins)
    ref_ppl, ref_logits = results["llama.cpp"]
    print(f"\n### Perplexity on held-out English ({len(wins)} windows of {args.window} tokens, the last 200 lines of "
          f"wiki_demo.txt), same Q4_1 file\n")
    print("| engine | perplexity | vs llama.cpp | top-1 agreement with llama.cpp | max abs logit difference vs nanollm |")
    print("|---|---|---|---|---|")
    ours_logits = results["nanollm (gguf_io.py, fp32)"][1]
    for name, (ppl, logits) in results.items():
        agree = np.mean(np.concatenate([a.argmax(1) == b.argmax(1) for a, b in zip(logits, ref_logits)]))
        diff = max(np.abs(a - b).max() for a, b in zip(logits, ours_logits))
        print(f"| {name} | {ppl:.4f} | {100 * (ppl / ref_ppl - 1):+.2f}% | {agree:.1%} | {diff:.2e} |")

    def llm_ppl_of(file):
        other = llama_cpp_model(file, args.window)
        return float(np.exp(np.concatenate([nll(llama_logits(other, w), w) for w in wins]).mean()))

    with tempfile.TemporaryDirectory() as tmp:
        export_tables(model, tokenizer, llm_ppl_of, wins, results["nanollm (gguf_io.py, fp32)"][0], data_dir, tmp)
    decode_table(path, model, tokenizer, args.tokens, args.repeats, wins, args.compiled)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
