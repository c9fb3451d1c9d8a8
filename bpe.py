"""bpe.py: a byte-level BPE tokenizer that trains fast, handles any language, and gives exactly the
same ids as tiktoken for the GPT-2 and GPT-4 (cl100k) vocabularies.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units") starts from the 256 byte values and repeatedly merges the most frequent adjacent pair into a
new token. GPT-2 (Radford et al. 2019) made it byte-level and first splits text with a regex, so that
merges never cross a word/number/punctuation boundary; tiktoken encodes a chunk by repeatedly merging
the adjacent pair whose concatenation has the lowest rank (= token id). This file implements:

  training   `Tokenizer.train(texts, vocab_size)`: each merge costs time in proportion to its own
             occurrences (an implicit linked list over the bytes of the unique pre-split chunks,
             weighted by chunk frequency; pair counts and positions updated only around each merged
             occurrence; a lazy max-heap picks the next pair), so 12.5 MB of Chinese trains in ~25 s.
  encoding   tiktoken's rule, chunk by chunk, with a chunk cache; special tokens with tiktoken's
             `allowed_special` / `disallowed_special` semantics.
  formats    `.tiktoken` ranks (+ a small JSON with pattern and special tokens), cl100k_base.tiktoken,
             Hugging Face byte-level `tokenizer.json` (GPT-2), export to `tiktoken.Encoding`.

Run:
  python bpe.py train --input ../shared/data/tinyshakespeare/input.txt --vocab-size 4096 --out out/shakespeare
  python bpe.py encode --tokenizer out/shakespeare --text "To be, or not to be"
  python bpe.py decode --tokenizer out/shakespeare 1722 387 11 ...
  python bpe.py compare          # training time, encode MB/s and bytes/token vs tiktoken and SentencePiece
"""
import argparse
import base64
import binascii
import functools
import gc
import glob
import heapq
import json
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

# Pre-split patterns, as in tiktoken_ext/openai_public.py. r50k is GPT-2's (written the fast way).
PATTERNS = {
    "r50k": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    # Qwen2: cl100k with every digit alone
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # SmolLM: every digit alone first, then GPT-2's regex on the text between digits, as one regex: a digit
    # ends a piece, so trailing whitespace may stop before a digit as it would at the end of the text
    "smollm": r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""",
}
# What becomes of a byte that the vocabulary has no token for (SmolLM2 lacks 21 of the 256), as the two
# reference tokenizers do it: both drop it from the output, llama.cpp after merging (the byte sits between
# its neighbours, which cannot merge across it), Hugging Face's BPE before (its neighbours may merge).
MISSING_BYTES = ("separate", "skip")
CL100K_SPECIAL_TOKENS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                         "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
# Specials appended after the merges of a trained vocabulary, in this order (pad has its own id).
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|pad|>")

SEP = 0xFF  # never occurs in UTF-8 text, so it marks chunk boundaries in the training buffer
CACHE_LIMIT = 1_000_000  # encode() chunk cache entries kept between calls (~200 MB at most)
NO_RANK = sys.maxsize  # the "rank" of a pair that is not a token: larger than every real rank


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
# Training: incremental BPE over the unique pre-split chunks

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
    """Learn up to `n_new_tokens` merged tokens from `chunk_counts` ({chunk bytes: frequency}).

    Returns the new tokens' bytes in merge order (their ranks are 256, 257, ...). The pair to merge
    is the one with the highest frequency-weighted count, ties to the smallest (left id, right id).

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

class Tokenizer:
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

    # ---- formats ------------------------------------------------------------------------------

    def save(self, path):
        """Write `path`.tiktoken (base64 token, rank per line, as tiktoken reads) and `path`.json
        (pattern, special tokens, the ranks file's name). Returns the JSON's path."""
        path = Path(path)
        if path.suffix in (".json", ".tiktoken"):
            path = path.with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        ranks_path, meta_path = path.with_name(path.name + ".tiktoken"), path.with_name(path.name + ".json")
        with open(ranks_path, "wb") as f:
            for token, rank in sorted(self.ranks.items(), key=lambda item: item[1]):
                f.write(base64.b64encode(token) + b" %d\n" % rank)
        meta = {"format": "nanollm-bpe", "version": 1, "name": self.name, "pattern": self.pattern,
                "special_tokens": self.special_tokens, "ranks_file": ranks_path.name}
        for field in ("missing_bytes", "chat_template"):
            if getattr(self, field):
                meta[field] = getattr(self, field)
        meta_path.write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return meta_path

    @classmethod
    def load(cls, path):
        """Load what save() wrote; `path` is the prefix given to save() or the .json."""
        path = Path(path)
        meta_path = path if path.suffix == ".json" else path.with_name(path.name + ".json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(meta, dict) or meta.get("format") != "nanollm-bpe":
            raise ValueError(f"{meta_path}: not a bpe.py tokenizer file (no \"format\": \"nanollm-bpe\")")
        for field, kind in (("pattern", str), ("special_tokens", dict), ("ranks_file", str)):
            if not isinstance(meta.get(field), kind):
                raise ValueError(f"{meta_path}: field {field!r} missing or not a {kind.__name__}")
        ranks = read_tiktoken_ranks(meta_path.parent / meta["ranks_file"])
        return cls(ranks, meta["pattern"], meta["special_tokens"], name=meta.get("name", "bpe"),
                   missing_bytes=meta.get("missing_bytes"), chat_template=meta.get("chat_template"))

    @classmethod
    def from_tiktoken(cls, path, pattern="cl100k", special_tokens=None, name=None):
        """Load a `.tiktoken` ranks file, e.g. cl100k_base.tiktoken with
        `pattern="cl100k", special_tokens=CL100K_SPECIAL_TOKENS`."""
        return cls(read_tiktoken_ranks(path), pattern, special_tokens, name=name or Path(path).stem)

    @classmethod
    def from_hf(cls, path):
        """Load a Hugging Face byte-level BPE `tokenizer.json` (GPT-2's): vocab strings are mapped back
        from the byte-to-unicode alphabet to bytes, added tokens become special tokens, and the
        pattern is GPT-2's (or the regex of a `Split` pre-tokenizer before a regex-free ByteLevel)."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ValueError(f"{path}: not a BPE tokenizer.json (needs model.type 'BPE' and a model.vocab object)")
        pattern = _hf_pattern(spec.get("pre_tokenizer"), path)
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        vocab = {text: i for text, i in model["vocab"].items() if text not in specials}
        try:
            return cls.from_byte_level(vocab, model.get("merges") or [], specials, pattern, path.stem, "skip")
        except ValueError as e:
            raise ValueError(f"{path}: model.vocab/merges: {e}") from None

    @classmethod
    def from_byte_level(cls, vocab, merges, special_tokens, pattern, name="bpe", missing_bytes=None):
        """From a GPT-2-style vocabulary ({token in the byte-to-unicode alphabet: id}, as tokenizer.json and
        GGUF store it) and its merges ("left right" in merge order), which must create ids in increasing
        order: tiktoken's rule then merges exactly as the merge list does, with the ids as ranks."""
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        ranks = {}
        for text, i in vocab.items():
            try:
                ranks[bytes(byte_of[ch] for ch in text)] = i
            except KeyError:
                raise ValueError(f"vocabulary entry {text!r} is not in the byte-level alphabet") from None
        merged_ids = []
        for merge in merges:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            merged_ids.append(vocab.get(left + right))
        if any(i is None for i in merged_ids) or merged_ids != sorted(merged_ids):
            raise ValueError("merges do not produce ids in increasing order, so the ids cannot serve as "
                             "tiktoken merge ranks")
        return cls(ranks, pattern, special_tokens, name=name, missing_bytes=missing_bytes)

    def to_tiktoken(self):
        """A `tiktoken.Encoding` over the same ranks, pattern and special tokens (the fast path).

        tiktoken needs all 256 bytes: a byte the vocabulary lacks gets a placeholder id from vocab_size
        up, which merges with nothing (llama.cpp's "separate") and must be dropped from its output
        (`ids[ids < vocab_size]`). Hugging Face's "skip" merges across it, which tiktoken cannot do."""
        if self.missing_bytes == "skip":
            raise ValueError(f"tokenizer {self.name!r}: tiktoken cannot skip the {len(self._missing)} bytes the "
                             "vocabulary lacks before merging (Hugging Face's rule); use encode()")
        if self._tiktoken is None:
            import tiktoken
            placeholders = {bytes([b]): self.vocab_size + k for k, b in enumerate(self._missing)}
            self._tiktoken = tiktoken.Encoding(self.name, pat_str=self.pattern,
                                               mergeable_ranks={**self.ranks, **placeholders},
                                               special_tokens=self.special_tokens)
        return self._tiktoken


_worker_tokenizer = None  # encode_batch's tokenizer, inside a worker process


def _start_worker(tokenizer):
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(text, allowed_special, disallowed_special):
    return _worker_tokenizer.encode(text, allowed_special, disallowed_special)


def _fix_surrogates(text):
    # tiktoken's fix-up: join surrogate pairs, replace lone surrogates with U+FFFD
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def read_tiktoken_ranks(path):
    """{token bytes: rank} from a `.tiktoken` file; errors name the file and line."""
    ranks, seen_ranks = {}, set()
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', "
                                 f"got {line.strip()[:60]!r}") from None
            if token in ranks or rank in seen_ranks:
                raise ValueError(f"{path}:{lineno}: duplicate {'token' if token in ranks else 'rank'} "
                                 f"({fields[0].decode()} {rank})")
            ranks[token] = rank
            seen_ranks.add(rank)
    if not ranks:
        raise ValueError(f"{path}: no tokens")
    return ranks


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _hf_pattern(pre_tokenizer, path):
    """The pre-split regex of a byte-level tokenizer.json: ByteLevel alone (GPT-2's pattern), single
    Digits before it (SmolLM's), or a Split regex before a regex-free ByteLevel (Llama 3 style). Other
    steps change the splitting in ways one regex may not express, so they are refused, not approximated."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if isinstance(pre_tokenizer, dict) else []
    kinds = [step.get("type") for step in steps]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if len(byte_level) != 1:
        raise ValueError(f"{path}: pre_tokenizer {kinds} has no ByteLevel step; not a byte-level BPE")
    if byte_level[0].get("add_prefix_space"):
        raise ValueError(f"{path}: ByteLevel add_prefix_space=true is not supported")
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return PATTERNS["r50k"]
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and byte_level[0].get("use_regex", True)):
        return PATTERNS["smollm"]
    split = steps[0]
    if (kinds == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True)
            and "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated"
            and not split.get("invert")):
        return split["pattern"]["Regex"]
    raise ValueError(f"{path}: unsupported pre_tokenizer steps {kinds}: bpe.py supports ByteLevel alone "
                     "Digits(individual_digits=true) then ByteLevel, or an isolating Split regex followed by "
                     "ByteLevel(use_regex=false)")


# ----------------------------------------------------------------------------------------------
# Benchmark: python bpe.py compare

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

    print(f"\n`python bpe.py compare`: {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, "
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
    parser = argparse.ArgumentParser(description="Byte-level BPE tokenizer: train, encode, decode, compare.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="learn a vocabulary from corpus files")
    train.add_argument("--input", nargs="+", required=True,
                       help="corpus files or directories: .txt (one document), .jsonl ('text' field), "
                            ".json (Tang poems)")
    train.add_argument("--vocab-size", type=int, required=True, help="ids in all: 256 bytes + merges + specials")
    train.add_argument("--out", required=True, help="output prefix: writes OUT.tiktoken and OUT.json")
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

    bench = commands.add_parser("compare", help="benchmark against tiktoken and SentencePiece")
    default_data = os.environ.get("NANOLLM_DATA", str(Path(__file__).resolve().parent.parent / "shared" / "data"))
    bench.add_argument("--data", default=default_data, help="shared data folder (default: %(default)s)")
    bench.add_argument("--skip-tang", action="store_true", help="Tiny Shakespeare only (quick)")

    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            docs = chain.from_iterable(map(iter_documents, args.input))
            tok = Tokenizer.train(docs, args.vocab_size, args.pattern, args.special_tokens, verbose=True,
                                  name=Path(args.out).name)
            print(f"saved {tok} to {tok.save(args.out)}", file=sys.stderr)
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
        elif args.command == "compare":
            compare(args.data, args.skip_tang)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
