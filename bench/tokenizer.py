"""bpe.py's tokenizer against tiktoken and SentencePiece on Tiny Shakespeare and the Tang poems, in one run:

    python -m bench.tokenizer                  # both corpora (a few minutes)
    python -m bench.tokenizer --skip-tang      # Tiny Shakespeare only (quick)

Three tables: training time (bpe.py's pure-Python trainer against SentencePiece's C++ BPE trainer,
one thread), encode throughput in MB/s (bpe.py cold and warm cache, the same ranks through tiktoken,
SentencePiece), and compression in UTF-8 bytes per token on a held-out 10% (against SentencePiece at
the same vocabulary size, and cl100k's 100k vocabulary); for the Tang poems also a sweep over
vocabulary sizes and both pre-split patterns. Times are CPU seconds of this process (process_time):
the machine may be shared, and wall time would time the neighbours too.
"""
import argparse
import glob
import os
import re
import sys
import time
from pathlib import Path

import regex

from bpe import CL100K_SPECIAL_TOKENS, DEFAULT_SPECIAL_TOKENS, Tokenizer, iter_documents

def _timed(fn, *args, **kwargs):
    """(result, CPU seconds of this process): the machine is shared, so wall time would time the
    neighbours too; every timed call here runs on one thread."""
    t0 = time.process_time()
    result = fn(*args, **kwargs)
    return result, time.process_time() - t0


def _sentences(docs):
    """The corpus text ("\n".join(docs)) cut after each document and each blank line, newlines
    kept, so SentencePiece sees and encodes exactly the same bytes as bpe.py."""
    ends = [doc + "\n" for doc in docs[:-1]] + docs[-1:]
    return [piece for doc in ends for piece in re.split(r"(?<=\n\n)", doc) if piece]


def _train_sentencepiece(sentences, vocab_size):
    import io
    import sentencepiece as spm
    model = io.BytesIO()
    # lossless settings: no normalization, whitespace and newlines kept, rare characters as bytes
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, character_coverage=0.9995, num_threads=1, max_sentence_length=1 << 20,
        minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _partial_share(tokenizer, ids):
    """Share of `ids` that are not whole characters: bpe.py tokens that are not valid UTF-8 on their
    own, SentencePiece byte-fallback pieces."""
    if isinstance(tokenizer, Tokenizer):
        partial = set()
        for token, i in tokenizer.ranks.items():
            try:
                token.decode("utf-8")
            except UnicodeDecodeError:
                partial.add(i)
        return sum(i in partial for i in ids) / len(ids)
    return sum(map(tokenizer.is_byte, ids)) / len(ids)


def _han_notes(vocab_size, tokenizer, ids, sp):
    """Where the vocabularies spend their ids on Chinese text."""
    han = regex.compile(r"^\p{Han}$")
    ours_whole = sum(bool(han.match(token.decode("utf-8", "replace"))) for token in tokenizer.ranks)
    sp_whole = sum(bool(han.match(sp.id_to_piece(i))) for i in range(sp.get_piece_size()))
    has_han, has_other = regex.compile(r"\p{Han}").search, regex.compile(r"[^\p{L}\p{N}]").search
    joined = {i for i in set(ids) if has_han(tokenizer.decode([i])) and has_other(tokenizer.decode([i]))}
    share = sum(i in joined for i in ids) / len(ids)
    return (f"At vocab {vocab_size}: single Han characters with their own token: bpe.py {ours_whole}, "
            f"SentencePiece {sp_whole}; bpe.py tokens joining punctuation or a newline to Han "
            f"characters: {len(joined)} distinct, {share:.1%} of the held-out tokens.")


def compare(data_dir, skip_tang=False):
    """Train and encode Tiny Shakespeare and the Tang poems with bpe.py, tiktoken and SentencePiece;
    print markdown tables."""
    import tiktoken
    data_dir = Path(data_dir)
    cl100k = Tokenizer.from_tiktoken(data_dir / "tokenizers/cl100k_base.tiktoken", "cl100k", CL100K_SPECIAL_TOKENS)
    shakespeare = (data_dir / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    corpora = [("Tiny Shakespeare", [shakespeare], 4096)]
    if not skip_tang:
        files = sorted(glob.glob(str(data_dir / "tang_poems/poet.tang.*.json")),
                       key=lambda f: int(f.split(".")[-2]))
        corpora.append(("Tang poems", [doc for f in files for doc in iter_documents(f)], 8192))
    train_rows, speed_rows, size_rows, sweep_rows, notes = [], [], [], [], []
    for corpus, docs, vocab_size in corpora:
        text = "\n".join(docs)
        mb = len(text.encode("utf-8")) / 1e6
        print(f"{corpus}: {len(docs)} documents, {mb:.1f} MB: training...", file=sys.stderr)
        ours, t_ours = _timed(Tokenizer.train, docs, vocab_size)
        sp, t_sp = _timed(_train_sentencepiece, _sentences(docs), vocab_size)
        train_rows.append(f"| {corpus} ({mb:.1f} MB) | {vocab_size} | {t_ours:.2f} | {t_sp:.2f} |")

        print(f"{corpus}: encoding...", file=sys.stderr)
        for vocab_name, tok, sp_model in ((f"trained {vocab_size}", ours, sp), ("cl100k", cl100k, None)):
            tok._cache.clear()
            _, t_cold = _timed(tok.encode_ordinary, text)
            _, t_warm = _timed(tok.encode_ordinary, text)
            _, t_tiktoken = _timed(tok.to_tiktoken().encode_ordinary, text)
            sp_speed = "-"
            if sp_model:
                sp_speed = f"{mb / _timed(sp_model.encode, _sentences(docs), num_threads=1)[1]:.2f}"
            speed_rows.append(f"| {corpus} | {vocab_name} | {mb / t_cold:.2f} | {mb / t_warm:.2f} | "
                              f"{mb / t_tiktoken:.2f} | {sp_speed} |")

        # compression: trained on the first 90%, measured on the last 10% (of the characters of a
        # single document, of the documents otherwise)
        if len(docs) == 1:
            cut = int(0.9 * len(text))
            train_docs, heldout_docs = [text[:cut]], [text[cut:]]
        else:
            cut = int(0.9 * len(docs))
            train_docs, heldout_docs = docs[:cut], docs[cut:]
        heldout = "\n".join(heldout_docs)
        heldout_bytes = len(heldout.encode("utf-8"))
        sweep_sizes = [vocab_size] + ([12288, 16384, 24576, 32768] if len(docs) > 1 else [])
        patterns = ["cl100k"] + (["r50k"] if len(docs) > 1 else [])
        print(f"{corpus}: training on the first 90% (vocab {', '.join(map(str, sweep_sizes))}; "
              f"split {', '.join(patterns)})...", file=sys.stderr)
        # BPE is greedy, so the first n merges of a longer run are exactly the n-merge vocabulary
        longest = {pattern: Tokenizer.train(train_docs, max(sweep_sizes), pattern) for pattern in patterns}
        cl_bpt = heldout_bytes / len(cl100k.encode_ordinary(heldout))
        for size in sweep_sizes:
            n_ranks = size - len(DEFAULT_SPECIAL_TOKENS)
            ours_n = {pattern: Tokenizer({t: r for t, r in tok.ranks.items() if r < n_ranks}, pattern)
                      for pattern, tok in longest.items()}
            ids = {pattern: tok.encode_ordinary(heldout) for pattern, tok in ours_n.items()}
            bpt = {pattern: heldout_bytes / len(pattern_ids) for pattern, pattern_ids in ids.items()}
            sp_n = _train_sentencepiece(_sentences(train_docs), size)
            sp_ids = [i for s in sp_n.encode(_sentences(heldout_docs)) for i in s]
            sp_bpt = heldout_bytes / len(sp_ids)
            if size == vocab_size and len(sweep_sizes) > 1:
                notes.append(_han_notes(size, ours_n["cl100k"], ids["cl100k"], sp_n))
            if size == vocab_size:
                size_rows.append(f"| {corpus} | {vocab_size} | {bpt['cl100k']:.3f} | {sp_bpt:.3f} | "
                                 f"{100 * (bpt['cl100k'] / sp_bpt - 1):+.1f}% | {cl_bpt:.3f} |")
            if len(sweep_sizes) > 1:
                sweep_rows.append(
                    f"| {size} | {bpt['cl100k']:.3f} ({100 * (bpt['cl100k'] / sp_bpt - 1):+.1f}%) | "
                    f"{bpt['r50k']:.3f} ({100 * (bpt['r50k'] / sp_bpt - 1):+.1f}%) | {sp_bpt:.3f} | "
                    f"{_partial_share(ours_n['cl100k'], ids['cl100k']):.1%} | {_partial_share(sp_n, sp_ids):.1%} |")

    print(f"\n`python -m bench.tokenizer`: {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, "
          f"tiktoken {tiktoken.__version__}; times are CPU seconds of one thread (process_time).\n")
    print("Training time, seconds (bpe.py: pure Python; SentencePiece BPE: C++, num_threads=1):\n")
    print("| corpus | vocab | bpe.py | SentencePiece |\n|---|---|---|---|")
    print("\n".join(train_rows))
    print("\nEncode throughput, MB/s of UTF-8 (cold = empty chunk cache; tiktoken via to_tiktoken()):\n")
    print("| corpus | vocabulary | bpe.py cold | bpe.py warm | tiktoken | SentencePiece |\n|---|---|---|---|---|---|")
    print("\n".join(speed_rows))
    print("\nCompression, UTF-8 bytes per token on the held-out last 10%, trained on the first 90% "
          "(higher is better):\n")
    print("| corpus | vocab | bpe.py | SentencePiece | bpe.py vs SP | cl100k (100k) |\n|---|---|---|---|---|---|")
    print("\n".join(size_rows))
    if sweep_rows:
        print("\nTang poems, bytes per token by vocab size (in brackets: vs SentencePiece at the same size); "
              "partial = share of held-out tokens that are a piece of a character (bpe.py, cl100k split) "
              "or a byte-fallback token (SentencePiece):\n")
        print("| vocab | bpe.py, cl100k split | bpe.py, GPT-2 split | SentencePiece | bpe.py partial | SP partial |\n"
              "|---|---|---|---|---|---|")
        print("\n".join(sweep_rows))
        print("\n" + "\n".join(notes))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = os.environ.get("NANOLLM_DATA", str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    parser.add_argument("--data", default=default_data, help="shared data folder (default: %(default)s)")
    parser.add_argument("--skip-tang", action="store_true", help="Tiny Shakespeare only (quick)")
    args = parser.parse_args(argv)
    compare(args.data, args.skip_tang)


if __name__ == "__main__":
    main()
