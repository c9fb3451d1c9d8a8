"""Turn a text corpus into training shards: train.bin / val.bin token streams plus meta.json.

    python data/prepare.py --source ../shared/data/tinyshakespeare/input.txt --out-dir data/shakespeare
    python data/prepare.py --source ../shared/data/tang_poems --out-dir data/tang --vocab-size 8192
    python data/prepare.py --source ../shared/data/pretrain/c4_demo.jsonl --out-dir data/c4 --tokenizer data/tang/tokenizer

Formats (inferred from the source when --format is not given):
  txt    plain text. `--txt-docs file` (default) treats the file as one document and holds out its last
         10% as validation, as nanoGPT does for Tiny Shakespeare; `line` / `blank` split documents at
         newlines / blank lines.
  jsonl  one JSON object per line with a `text` field; `<s>` / `</s>` in the text become the
         tokenizer's special tokens rather than literal characters.
  tang   the chinese-poetry JSON (a file or a directory of poet.tang.*.json): each poem is one
         document, `title\\nline\\nline...`.
Files are read by data/corpus.py (the reader bpe.py and data/curate.py share); `--curate` runs
data/curate.py's pipeline (PII scrubbing, language, quality rules, exact and near dedup) first.
Documents are separated by `<|endoftext|>`; other corpora than a single txt file are split into
train/val by document with a seeded shuffle. The tokenizer is `--tokenizer FILE` (a bpe.py
tokenizer) or trained here on the training split only (`--vocab-size`). Tokens are stored as uint16
when the vocabulary fits, else uint32. Re-running with the same inputs does nothing.
"""
import argparse
import hashlib
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bpe import DEFAULT_SPECIAL_TOKENS, Tokenizer  # noqa: E402
from data.corpus import EOT, CorpusError, fetch, files_of, infer_format, read_documents, tokenize  # noqa: E402

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
PREPARE_VERSION = 1  # bump when the output format changes, so old directories are rebuilt


class PrepareError(ValueError):
    """Bad input: reported as one clear line naming the file (and line) at fault."""


def load_documents(source: Path, fmt: str | None, txt_docs: str, skip_bad_lines: bool, val_fraction: float,
                   seed: int, curate_out: Path | None = None):
    """-> (train documents, val documents, number of skipped bad lines).

    A corpus that is a single document (a txt file read whole) is split by characters, its last
    val_fraction held out (nanoGPT's Tiny Shakespeare split); otherwise documents are shuffled with
    `seed` and the last val_fraction of them held out. With curate_out, data/curate.py's pipeline
    (PII, language, quality, dedup) runs first and writes its report there.
    """
    bad_lines = Counter()
    docs = [doc["text"] for doc in read_documents(source, fmt, txt_docs, skip_bad_lines, bad_lines)]
    if curate_out is not None:
        from data.curate import curate, write_report
        docs, report = curate(docs)
        curate_out.mkdir(parents=True, exist_ok=True)
        write_report(report, curate_out)
        print(f"curated {report['documents_in']:,} -> {report['documents_out']:,} documents "
              f"(report in {curate_out / 'curation_report.md'})")
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]], 0
    if len(docs) < 2:
        raise PrepareError(f"{source}: no documents to split into train and val")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(docs) * val_fraction))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]], sum(bad_lines.values())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    for f in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]):
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def write_bin(path: Path, tokens: np.ndarray, dtype: str) -> None:
    tmp = path.with_suffix(".tmp")
    tokens.astype(dtype).tofile(tmp)
    os.replace(tmp, path)


def prepare(args) -> dict:
    out = Path(args.out_dir)
    source = fetch(args.source, out / "raw")
    fmt = args.format or infer_format(files_of(source)[0])
    fingerprint = {"version": PREPARE_VERSION, "source_sha256": sha256_of(source), "format": fmt,
                   "txt_docs": args.txt_docs, "curate": args.curate, "val_fraction": args.val_fraction, "seed": args.seed,
                   "vocab_size_requested": None if args.tokenizer else args.vocab_size,
                   "tokenizer_sha256": sha256_of(Path(args.tokenizer).with_suffix(".json")) if args.tokenizer else None,
                   "dtype_requested": args.dtype}
    meta_path = out / "meta.json"
    if meta_path.exists() and (out / "train.bin").exists() and (out / "val.bin").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint:
            print(f"{out} is up to date with {source}: nothing to do")
            return meta

    train_docs, val_docs, bad = load_documents(source, args.format, args.txt_docs, args.skip_bad_lines,
                                               args.val_fraction, args.seed, out if args.curate else None)
    if bad:
        print(f"skipped {bad} bad line(s) of {source}")
    out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    else:
        print(f"training a {args.vocab_size}-token BPE on the training split ({len(train_docs):,} documents)")
        tokenizer = Tokenizer.train(train_docs, args.vocab_size)
    if EOT not in tokenizer.special_tokens:
        raise PrepareError(f"tokenizer {args.tokenizer or '(trained)'} has no {EOT} special token to separate documents")
    tokenizer.save(out / "tokenizer")

    dtype = args.dtype or ("uint16" if tokenizer.vocab_size <= 2**16 else "uint32")
    if tokenizer.vocab_size > np.iinfo(dtype).max + 1:
        raise PrepareError(f"vocabulary of {tokenizer.vocab_size} tokens does not fit --dtype {dtype}")
    meta = {"tokenizer": "tokenizer", "vocab_size": tokenizer.vocab_size, "dtype": dtype, "format": fmt,
            "source": args.source, "eot_id": tokenizer.special_tokens[EOT], "skipped_bad_lines": bad,
            "fingerprint": fingerprint}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        tokens = tokenize(docs, tokenizer, fmt, split)
        write_bin(out / f"{split}.bin", tokens, dtype)
        meta[f"{split}_documents"] = len(docs)
        meta[f"{split}_tokens"] = int(len(tokens))
        meta[f"{split}_bytes"] = sum(len(d.encode("utf-8")) for d in docs)
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    print(f"wrote {out}: train {meta['train_tokens']:,} tokens ({meta['train_bytes'] / meta['train_tokens']:.2f} "
          f"bytes/token), val {meta['val_tokens']:,} tokens, vocab {tokenizer.vocab_size}, {dtype}")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=TINY_SHAKESPEARE_URL, help="local file/directory or URL of the corpus")
    parser.add_argument("--out-dir", "--out", dest="out_dir", required=True, help="output directory")
    parser.add_argument("--format", choices=["txt", "jsonl", "tang"], help="input format (default: from the source)")
    parser.add_argument("--txt-docs", choices=["file", "line", "blank"], default="file",
                        help="txt: whole file (last 10%% is val), one document per line, or per blank-line block")
    parser.add_argument("--tokenizer", help="a bpe.py tokenizer (the path given to Tokenizer.save); default: train one")
    parser.add_argument("--vocab-size", type=int, default=2048,
                        help="vocabulary size when training the tokenizer (2048 suits a 1 MB corpus such as Tiny "
                             "Shakespeare; the Tang poems want 8192)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the corpus held out for validation")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the train/val document shuffle")
    parser.add_argument("--dtype", choices=["uint16", "uint32"], help="token storage (default: smallest that fits)")
    parser.add_argument("--curate", action="store_true", help="run data/curate.py's pipeline (PII scrubbing, "
                        "language, quality, exact and near dedup) before splitting; its report goes to --out")
    parser.add_argument("--skip-bad-lines", action="store_true", help="jsonl: skip and count lines that are not "
                                                                      "JSON objects with a 'text' field")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    smallest = 256 + len(DEFAULT_SPECIAL_TOKENS)
    if not args.tokenizer and args.vocab_size < smallest:
        parser.error(f"--vocab-size must be at least the 256 byte tokens + {len(DEFAULT_SPECIAL_TOKENS)} special "
                     f"tokens = {smallest}, got {args.vocab_size}")
    try:
        prepare(args)
    except (PrepareError, CorpusError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
