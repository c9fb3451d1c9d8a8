"""bpe.py: a byte-level BPE tokenizer that trains fast, handles any language, and gives exactly the
same ids as tiktoken for the GPT-2 and GPT-4 (cl100k) vocabularies.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units") starts from the 256 byte values and repeatedly merges the most frequent adjacent pair into a
new token. GPT-2 (Radford et al. 2019) made it byte-level and first splits text with a regex, so that
merges never cross a word/number/punctuation boundary; tiktoken encodes a chunk by repeatedly merging
the adjacent pair whose concatenation has the lowest rank (= token id). This file implements:

  training   `naive_merges` below is the algorithm in 20 lines; `Tokenizer.train(texts, vocab_size)`
             learns the same merges with `learn_merges`, where each merge costs time in proportion to its own
             occurrences (an implicit linked list over the bytes of the unique pre-split chunks,
             weighted by chunk frequency; pair counts and positions updated only around each merged
             occurrence; a lazy max-heap picks the next pair), so 12.5 MB of Chinese trains in ~25 s.
  encoding   tiktoken's rule, chunk by chunk, with a chunk cache; special tokens with tiktoken's
             `allowed_special` / `disallowed_special` semantics.
  formats    tokenizer_io.py (Tokenizer's base class): `.tiktoken` ranks (+ a small JSON with pattern and
             special tokens), cl100k_base.tiktoken, Hugging Face byte-level `tokenizer.json`, export to
             `tiktoken.Encoding`; and the pre-split PATTERNS of the vocabularies it loads.

Run:
  python bpe.py train --input ../shared/data/tinyshakespeare/input.txt --vocab-size 4096 --out-dir out/bpe
  python bpe.py encode --tokenizer out/bpe/tokenizer --text "To be, or not to be"
  python bpe.py decode --tokenizer out/bpe/tokenizer 1722 387 11 ...
  python -m bench.tokenizer      # training time, encode MB/s and bytes/token vs tiktoken and SentencePiece
"""
import argparse
import functools
import gc
import heapq
import os
import re
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from itertools import chain
from pathlib import Path

import regex  # the `regex` module (a tiktoken dependency): \p{L}, \p{N} and possessive quantifiers

from data.corpus import read_documents
from tokenizer_io import CL100K_SPECIAL_TOKENS, PATTERNS, TokenizerFiles

# What becomes of a byte that the vocabulary has no token for (SmolLM2 lacks 21 of the 256), as the two
# reference tokenizers do it: both drop it from the output, llama.cpp after merging (the byte sits between
# its neighbours, which cannot merge across it), Hugging Face's BPE before (its neighbours may merge).
MISSING_BYTES = ("separate", "skip")
# Specials appended after the merges of a trained vocabulary, in this order (pad has its own id).
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|pad|>")

SEP = 0xFF  # never occurs in UTF-8 text, so it marks chunk boundaries in the training buffer
CACHE_LIMIT = 1_000_000  # encode() chunk cache entries kept between calls (~200 MB at most)
NO_RANK = sys.maxsize  # the "rank" of a pair that is not a token: larger than every real rank


# ----------------------------------------------------------------------------------------------
# The algorithm, as the paper states it (every merge recounts every pair: fine for a test, hours for 12 MB)

def naive_merges(chunk_counts, n_new_tokens):
    """Learn up to `n_new_tokens` tokens from `chunk_counts` ({chunk bytes: frequency}): count every
    adjacent pair of every chunk, weighted by the chunk's frequency; merge the most frequent pair (ties:
    the smallest (left id, right id)) into a new token everywhere; repeat. Returns the new tokens' bytes
    in merge order (ids 256, 257, ...). Example: "aaabdaaabac" merges aa (4), then ab, then aaab."""
    words = {tuple(chunk): freq for chunk, freq in chunk_counts.items()}  # each chunk as ids: bytes at first
    vocab = [bytes([i]) for i in range(256)]
    while len(vocab) - 256 < n_new_tokens:
        counts = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] += freq
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        vocab.append(vocab[best[0]] + vocab[best[1]])
        words = {merge(word, best, len(vocab) - 1): freq for word, freq in words.items()}
    return vocab[256:]


def merge(ids, pair, new_id):
    """`ids` with every occurrence of `pair` replaced by new_id, left to right: (a, a, a) -> (aa, a)."""
    out, i = [], 0
    while i < len(ids):
        if ids[i:i + 2] == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Reading corpora

def iter_documents(path, txt_docs="file"):
    """Yield the documents (str) of a corpus file or directory, read by data/corpus.py (the reader
    shared with data/prepare.py and data/curate.py): .txt is one document (`txt_docs="file"`; or
    "line", "blank", "auto"), .jsonl gives each line's "text" field, .json (chinese-poetry) gives each
    poem as `title\nline\nline...`. Errors (a ValueError) name the file and line at fault."""
    for doc in read_documents(path, txt_docs=txt_docs):
        yield doc["text"]


# ----------------------------------------------------------------------------------------------
# Training: the same merges as naive_merges, at a cost proportional to each merge's occurrences

def _without_gc(fn):
    """Run `fn` with the cyclic garbage collector paused. Training builds millions of small tuples
    and lists but no reference cycles; every full collection would rescan them all (that doubled
    the Tang-poem training time)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()
    return wrapper


@_without_gc
def learn_merges(chunk_counts, n_new_tokens, verbose=False):
    """naive_merges(chunk_counts, n_new_tokens), the same tokens in the same order, but a merge costs time
    in proportion to its own occurrences instead of a pass over the corpus: pair counts and positions are
    updated only around each merged occurrence, and a lazy max-heap picks the next pair.

    Layout: all unique chunks back to back in one buffer, separated by SEP. `sym[p]` is the id of
    the token starting at byte p; a token of length L spans p..p+L-1, so the next token starts at
    p + length[id]. The slots inside a token hold -start (its last slot always does), which is how
    the token to the left is found. `where[pair]` lists the left positions of the pair (stale ones
    are skipped when checked), so a merge only visits its own occurrences."""
    chunks = list(chunk_counts)
    buf = bytes([SEP]) + bytes([SEP]).join(chunks) + bytes([SEP])
    sym = list(buf)
    weight = [1] * len(buf)  # frequency of the chunk each byte belongs to

    where = defaultdict(list)  # (left id, right id) -> left positions
    for p, pair in enumerate(zip(buf, buf[1:])):
        where[pair].append(p)
    for pair in [pair for pair in where if SEP in pair]:
        del where[pair]
    counts = defaultdict(int, {pair: len(positions) for pair, positions in where.items()})
    start = 1
    for chunk in chunks:
        freq = chunk_counts[chunk]
        if freq != 1:
            weight[start:start + len(chunk)] = [freq] * len(chunk)
            for pair in zip(chunk, chunk[1:]):
                counts[pair] += freq - 1
        start += len(chunk) + 1

    vocab = [bytes([i]) for i in range(256)]
    length = [1] * 256
    new_tokens = []
    # lazy max-heap of (-count, left, right): every pair with count > 0 has an entry whose count is
    # >= its current count; an entry that disagrees with `counts` when popped is stale.
    heap = [(-count, a, b) for (a, b), count in counts.items()]
    heapq.heapify(heap)
    t0 = last_report = time.time()
    while len(new_tokens) < n_new_tokens and heap:
        neg_count, a, b = heapq.heappop(heap)
        count = counts.get((a, b), 0)
        if count != -neg_count:
            if count > 0:
                heapq.heappush(heap, (-count, a, b))
            continue
        # always a new token: all occurrences of a token appear at its own merge and later merges
        # only join neighbours, so no later pair spells the same bytes
        token = vocab[a] + vocab[b]
        c = len(vocab)
        vocab.append(token)
        length.append(len(token))
        new_tokens.append(token)
        positions = where.pop((a, b))
        if a == b:  # overlapping occurrences (a a a) must be merged left to right
            positions = sorted(set(positions))
        la, lb = length[a], length[b]
        created = defaultdict(list)  # new pairs (x, c) / (c, y) -> their left positions
        for p in positions:
            if sym[p] != a:
                continue
            q = p + la
            if sym[q] != b:
                continue
            f = weight[p]
            left = sym[p - 1]
            if left != SEP:  # the token x before a: pair (x, a) becomes (x, c)
                x_start = -left if left < 0 else p - 1
                x = sym[x_start]
                counts[x, a] -= f
                pair = x, c
                counts[pair] += f
                created[pair].append(x_start)
            r = q + lb
            y = sym[r]
            if y != SEP:  # the token y after b: pair (b, y) becomes (c, y)
                counts[b, y] -= f
                pair = c, y
                counts[pair] += f
                created[pair].append(p)
            sym[p] = c
            sym[q] = -p
            sym[r - 1] = -p
        del counts[a, b]
        for pair, pair_positions in created.items():
            where[pair] = pair_positions
            if counts[pair] > 0:
                heapq.heappush(heap, (-counts[pair], *pair))
        if verbose and (time.time() - last_report > 1 or len(new_tokens) == n_new_tokens):
            last_report = time.time()
            rate = len(new_tokens) / (last_report - t0)
            eta = (n_new_tokens - len(new_tokens)) / max(rate, 1e-9)
            print(f"\rmerges {len(new_tokens)}/{n_new_tokens}  {rate:.0f} merges/s  ETA {eta:.0f}s  "
                  f"last {token!r:.40} x{count}", end="", file=sys.stderr, flush=True)
    if verbose:
        print(file=sys.stderr)
    return new_tokens


# ----------------------------------------------------------------------------------------------
# The tokenizer

class Tokenizer(TokenizerFiles):
    """Byte-level BPE over `ranks` ({token bytes: id}, the 256 single bytes included), a pre-split
    `pattern` (a name in PATTERNS or a regex) and `special_tokens` ({text: id}).

    A published vocabulary may lack some single bytes; `missing_bytes` (one of MISSING_BYTES) then says
    how encoding drops them, as llama.cpp ("separate") or Hugging Face ("skip") does."""

    def __init__(self, ranks, pattern="cl100k", special_tokens=None, name="bpe", missing_bytes=None,
                 chat_template=None):
        self.name = name
        self.chat_template = chat_template  # a model's own Jinja chat template (a GGUF file's), kept by save()
        self.pattern = PATTERNS.get(pattern, pattern)
        self.ranks = dict(ranks)
        self.special_tokens = dict(special_tokens or {})
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing and missing_bytes is None:
            raise ValueError(f"vocabulary lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}); "
                             "a byte-level BPE needs all 256 (or missing_bytes='separate' / 'skip')")
        if missing_bytes is not None and missing_bytes not in MISSING_BYTES:
            raise ValueError(f"missing_bytes must be one of {MISSING_BYTES}, got {missing_bytes!r}")
        self.missing_bytes = missing_bytes if missing else None
        self._missing = bytes(missing)
        self._bytes_of = {i: token for token, i in self.ranks.items()}
        if len(self._bytes_of) != len(self.ranks):
            raise ValueError("two tokens share an id in the vocabulary")
        for text, i in self.special_tokens.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"special token {text!r} must be a non-empty string")
            if i in self._bytes_of:
                owner = self._bytes_of[i]
                raise ValueError(f"special token {text!r} has id {i}, which is already the id of "
                                 f"{owner.decode('utf-8', 'replace') if isinstance(owner, bytes) else owner!r}")
            self._bytes_of[i] = text.encode("utf-8")
        self._vocab_size = max(self._bytes_of) + 1
        self._compile()

    def _compile(self):
        try:
            self._split = regex.compile(self.pattern).findall
        except regex.error as e:
            raise ValueError(f"bad pre-split pattern {self.pattern!r}: {e}") from None
        # longest first, so that a special token never loses to one of its prefixes
        by_length = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        self._cache = {}
        self._tiktoken = None

    def __getstate__(self):  # pickled for encode_batch's workers: the inputs only, caches are rebuilt
        return {"ranks": self.ranks, "pattern": self.pattern, "special_tokens": self.special_tokens,
                "name": self.name, "missing_bytes": self.missing_bytes}

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self):
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"special_tokens={len(self.special_tokens)})")

    @property
    def vocab_size(self):
        """Largest id + 1 (ids may have gaps, as in cl100k: 100261..100275 are unused)."""
        return self._vocab_size

    # ---- training -----------------------------------------------------------------------------

    @classmethod
    def train(cls, texts, vocab_size, pattern="cl100k", special_tokens=DEFAULT_SPECIAL_TOKENS,
              verbose=False, name="bpe"):
        """Learn a vocabulary of `vocab_size` ids: 256 bytes + merges + `special_tokens` (names; they
        get the last ids, in order). `texts` is a string or an iterable of documents (a generator
        streams: only the counts of the unique pre-split chunks are kept). Text that spells a
        special token is cut there, so no merge learns a piece of one. If the corpus runs out of
        pairs first, the vocabulary is smaller."""
        if isinstance(special_tokens, dict):
            raise TypeError("train(special_tokens=...) takes the names only; ids are assigned after the merges")
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens):
            dupes = sorted({s for s in special_tokens if special_tokens.count(s) > 1})
            raise ValueError(f"duplicate special tokens: {dupes}")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size={vocab_size!r} is too small: need at least 256 bytes + "
                             f"{len(special_tokens)} special tokens = {256 + len(special_tokens)}")
        split = regex.compile(PATTERNS.get(pattern, pattern)).findall
        cut = re.compile("|".join(map(re.escape, special_tokens))).split if special_tokens else None
        chunk_counts = Counter()
        t0 = time.time()
        n_bytes = 0
        for n_docs, doc in enumerate([texts] if isinstance(texts, str) else texts, 1):
            if not isinstance(doc, str):
                raise TypeError(f"train(): document {n_docs} is {type(doc).__name__}, expected str")
            n_bytes += len(doc)
            for piece in cut(doc) if cut else (doc,):
                chunk_counts.update(split(piece))
            if verbose and n_docs % 10_000 == 0:
                print(f"\rpre-split {n_docs} documents, {n_bytes / 1e6:.1f} M chars, "
                      f"{len(chunk_counts)} unique chunks, {time.time() - t0:.1f}s",
                      end="", file=sys.stderr, flush=True)
        if not chunk_counts:
            raise ValueError("cannot train on an empty corpus")
        if verbose:
            print(f"\rpre-split {n_bytes / 1e6:.1f} M chars into {len(chunk_counts)} unique chunks "
                  f"in {time.time() - t0:.1f}s", file=sys.stderr)
        byte_counts = {chunk.encode("utf-8"): n for chunk, n in chunk_counts.items()}
        new_tokens = learn_merges(byte_counts, vocab_size - 256 - len(special_tokens), verbose)
        ranks = {bytes([i]): i for i in range(256)}
        ranks.update((token, 256 + i) for i, token in enumerate(new_tokens))
        specials = {text: len(ranks) + i for i, text in enumerate(special_tokens)}
        return cls(ranks, pattern, specials, name=name)

    # ---- encoding -----------------------------------------------------------------------------

    def _bpe(self, piece):
        """tiktoken's rule for one chunk: merge the adjacent pair whose concatenation has the lowest
        rank (leftmost on ties) until none is in the vocabulary. A byte with no token of its own (see
        missing_bytes) is dropped: before merging ("skip") or after ("separate": no pair holds it)."""
        ranks = self.ranks
        if self.missing_bytes == "skip":
            piece = piece.translate(None, self._missing)
        rank = ranks.get(piece)
        if rank is not None:
            return (rank,)
        parts = [piece[i:i + 1] for i in range(len(piece))]
        never = NO_RANK
        pair_ranks = [ranks.get(piece[i:i + 2], never) for i in range(len(piece) - 1)]
        while len(parts) > 1:
            best = min(pair_ranks)
            if best == never:
                break
            i = pair_ranks.index(best)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]  # pair_ranks[j] is the rank of parts[j] + parts[j + 1]
            if i > 0:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], never)
            if i < len(parts) - 1:
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], never)
        if self.missing_bytes:
            return tuple(ranks[part] for part in parts if part in ranks)
        return tuple(map(ranks.__getitem__, parts))

    def _encode_chunks(self, text):
        chunks = self._split(text)
        cache = self._cache
        if len(cache) > CACHE_LIMIT:
            cache.clear()
        for chunk in set(chunks).difference(cache):
            cache[chunk] = self._bpe(chunk.encode("utf-8"))
        return list(chain.from_iterable(map(cache.__getitem__, chunks)))

    def encode_ordinary(self, text):
        """Encode `text` with no special-token handling (text that spells one is ordinary text)."""
        try:
            return self._encode_chunks(text)
        except UnicodeEncodeError:  # lone surrogates: tiktoken's fix-up, so ids stay identical
            return self._encode_chunks(_fix_surrogates(text))

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Encode `text` with tiktoken's special-token semantics: text spelling a special token in
        `allowed_special` ("all" or a set of names) becomes that token; text spelling one in
        `disallowed_special` (default: every special not allowed) raises ValueError; any other is
        encoded as ordinary text (e.g. `disallowed_special=()`)."""
        names = set(self.special_tokens)
        allowed = names if allowed_special == "all" else set(allowed_special)
        disallowed = names - allowed if disallowed_special == "all" else set(disallowed_special)
        unknown = (allowed | disallowed) - names
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)} "
                             f"(it has {sorted(names)})")
        if disallowed:
            found = re.search("|".join(map(re.escape, disallowed)), text)
            if found:
                raise ValueError(
                    f"text contains the special token {found.group()!r} at character {found.start()}; "
                    f"pass allowed_special={{{found.group()!r}}} (or 'all') to encode it as that token, "
                    "or disallowed_special=() to encode it as ordinary text")
        if not allowed:
            return self.encode_ordinary(text)
        try:
            return self._encode_with_specials(text, allowed)
        except UnicodeEncodeError:
            return self._encode_with_specials(_fix_surrogates(text), allowed)

    def _encode_with_specials(self, text, allowed):
        ids, start = [], 0
        while True:
            # the next allowed special token; like tiktoken, a non-allowed match resumes one char later
            find_from = start
            while (match := self._special_re.search(text, find_from)) and match.group() not in allowed:
                find_from = match.start() + 1
            end = match.start() if match else len(text)
            ids += self._encode_chunks(text[start:end])
            if match is None:
                return ids
            ids.append(self.special_tokens[match.group()])
            start = match.end()

    def encode_batch(self, texts, allowed_special=frozenset(), disallowed_special="all", num_workers=None):
        """encode() each text, in `num_workers` processes. The default is one per CPU when the batch
        holds over a million characters (worth starting processes for), else this process only."""
        texts = list(texts)
        if num_workers is None:
            num_workers = (os.cpu_count() or 1) if sum(map(len, texts)) > 1_000_000 else 1
        if num_workers <= 1 or len(texts) < 2:
            return [self.encode(text, allowed_special, disallowed_special) for text in texts]
        encode = functools.partial(_encode_in_worker, allowed_special=allowed_special,
                                   disallowed_special=disallowed_special)
        # the tokenizer travels once per worker (initargs), not once per task
        with ProcessPoolExecutor(num_workers, initializer=_start_worker, initargs=(self,)) as pool:
            return list(pool.map(encode, texts, chunksize=max(1, len(texts) // (4 * num_workers))))

    # ---- decoding -----------------------------------------------------------------------------

    def decode_bytes(self, ids):
        """The bytes of `ids` (special tokens as their text)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, torch tensors
        try:
            return b"".join(map(self._bytes_of.__getitem__, ids))
        except (KeyError, TypeError):
            for position, i in enumerate(ids):
                if not isinstance(i, int) or i not in self._bytes_of:
                    raise ValueError(f"decode: id {i!r} at position {position} is not in the vocabulary "
                                     f"(ids 0..{self.vocab_size - 1})") from None
            raise

    def decode(self, ids):
        """The text of `ids`; bytes that are not valid UTF-8 (a partial character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

_worker_tokenizer = None  # encode_batch's tokenizer, inside a worker process


def _start_worker(tokenizer):
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(text, allowed_special, disallowed_special):
    return _worker_tokenizer.encode(text, allowed_special, disallowed_special)


def _fix_surrogates(text):
    # tiktoken's fix-up: join surrogate pairs, replace lone surrogates with U+FFFD
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ----------------------------------------------------------------------------------------------
# CLI

def _load_any(path, pattern):
    """A saved bpe.py tokenizer, a .tiktoken ranks file (cl100k specials if pattern is cl100k), or
    a Hugging Face tokenizer.json."""
    path = Path(path)
    if path.suffix == ".tiktoken":
        return Tokenizer.from_tiktoken(path, pattern, CL100K_SPECIAL_TOKENS if pattern == "cl100k" else None)
    if path.suffix == ".json" and path.exists():
        with open(path, encoding="utf-8") as f:
            if "nanollm-bpe" not in f.read(200):  # save() writes the format first
                return Tokenizer.from_hf(path)
    return Tokenizer.load(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Byte-level BPE tokenizer: train, encode, decode.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="learn a vocabulary from corpus files")
    train.add_argument("--input", nargs="+", required=True,
                       help="corpus files or directories: .txt (one document), .jsonl ('text' field), "
                            ".json (Tang poems)")
    train.add_argument("--vocab-size", type=int, required=True, help="ids in all: 256 bytes + merges + specials")
    where = train.add_mutually_exclusive_group(required=True)
    where.add_argument("--out-dir", help="output directory: writes OUT_DIR/tokenizer.tiktoken and .json")
    where.add_argument("--out", help="output prefix instead: writes OUT.tiktoken and OUT.json")
    train.add_argument("--pattern", default="cl100k", help="pre-split regex or a name: cl100k (default), r50k")
    train.add_argument("--special-tokens", nargs="*", default=list(DEFAULT_SPECIAL_TOKENS),
                       help="special token names, given the last ids (default: %(default)s)")

    tokenizer_help = "a saved tokenizer (prefix or .json), a .tiktoken file, or a HF tokenizer.json"
    encode = commands.add_parser("encode", help="print the ids of a text")
    encode.add_argument("--tokenizer", required=True, help=tokenizer_help)
    encode.add_argument("--pattern", default="cl100k", help="pre-split pattern for a .tiktoken file")
    source = encode.add_mutually_exclusive_group()
    source.add_argument("--text", help="text to encode (default: read stdin)")
    source.add_argument("--input", help="file to encode")
    encode.add_argument("--allowed-special", default="none", choices=["none", "all"],
                        help="'all': text spelling a special token becomes it; 'none' (default): it is an error")

    decode = commands.add_parser("decode", help="print the text of ids")
    decode.add_argument("--tokenizer", required=True, help=tokenizer_help)
    decode.add_argument("--pattern", default="cl100k", help="pre-split pattern for a .tiktoken file")
    decode.add_argument("ids", nargs="*", type=int, help="ids (default: read whitespace-separated ids from stdin)")

    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            docs = chain.from_iterable(map(iter_documents, args.input))
            tok = Tokenizer.train(docs, args.vocab_size, args.pattern, args.special_tokens, verbose=True,
                                  name=Path(args.out or args.out_dir).name)
            prefix = args.out or Path(args.out_dir) / "tokenizer"
            print(f"saved {tok} to {tok.save(prefix)}", file=sys.stderr)
        elif args.command == "encode":
            tok = _load_any(args.tokenizer, args.pattern)
            if args.input:
                text = Path(args.input).read_text(encoding="utf-8")
            else:
                text = args.text if args.text is not None else sys.stdin.read()
            allowed = "all" if args.allowed_special == "all" else set()
            print(" ".join(map(str, tok.encode(text, allowed_special=allowed))))
        elif args.command == "decode":
            tok = _load_any(args.tokenizer, args.pattern)
            ids = args.ids or [int(i) for i in sys.stdin.read().split()]
            sys.stdout.write(tok.decode(ids))
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
