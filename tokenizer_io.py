"""tokenizer_io.py: the files a bpe.Tokenizer is read from and written to, and the pre-split patterns of the
vocabularies it loads.

  nanollm's own   `name.tiktoken` (one "base64(token) rank" line per token, as tiktoken reads) + `name.json`
                  (pattern, special tokens, the ranks file's name): Tokenizer.save / Tokenizer.load.
  tiktoken        a `.tiktoken` ranks file such as cl100k_base.tiktoken (from_tiktoken), and export to a
                  `tiktoken.Encoding` over the same ranks (to_tiktoken).
  Hugging Face    a byte-level BPE `tokenizer.json` (GPT-2, SmolLM, Llama 3 style): its vocabulary is written in
                  GPT-2's byte-to-unicode alphabet (bytes_to_unicode), its merges must create ids in
                  increasing order so that the ids serve as tiktoken's merge ranks (from_byte_level), and its
                  pre_tokenizer steps map to one regex (hf_pattern). GGUF files store the same (gguf_io.py).

TokenizerFiles holds these as Tokenizer's methods (bpe.Tokenizer inherits them), so bpe.py stays the
algorithm: training the merges and encoding with them.
"""
import base64
import binascii
import json
from pathlib import Path

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
CL100K_SPECIAL_TOKENS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                         "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


class TokenizerFiles:
    """Reading and writing a bpe.Tokenizer (its base class): `cls(ranks, pattern, special_tokens, ...)` builds one."""

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
        pattern = hf_pattern(spec.get("pre_tokenizer"), path)
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
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
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


def bytes_to_unicode():
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


def hf_pattern(pre_tokenizer, path):
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
