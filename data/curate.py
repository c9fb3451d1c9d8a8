"""Data curation before tokenization: PII scrubbing, language selection, quality filters, exact and
near-duplicate removal, with a report of what was removed and why.

    python data/curate.py --source ../shared/data/pretrain/c4_demo.jsonl --out-dir out/c4_curated
    python data/curate.py --source ../shared/data/tang_poems --out-dir out/tang_curated --lang zh
    python data/curate.py --source a.txt b.jsonl --out-dir DIR --disable stop_words --set en.min_words=50
    python -m bench.curate                 # synthetic recall check, speed, and the real-corpus table

Writes DIR/curated.jsonl (one {"text", "source"} object per kept document, in input order) and
DIR/curation_report.json / .md: documents in and out, documents removed by each rule with three
examples per rule, PII replaced, and the MinHash estimate checked against the exact Jaccard.
From Python (what `data/prepare.py --curate` calls): `kept_texts, report = curate(texts, CurateConfig())`,
or `curate_files(paths, out_dir, config)` to stream files into out_dir as the CLI does.

Every document goes through these stages, in this order (the first rule that fires removes it):
  1. PII scrubbing: e-mail addresses, phone numbers (international, Chinese mobile, North American, local 7-digit),
     IPv4 addresses, Chinese resident ID numbers (valid date and ISO 7064 check digit) and
     credit-card-like numbers (Luhn check) become <EMAIL>, <PHONE>, <IP_ADDRESS>, <ID_NUMBER>,
     <CREDIT_CARD>. Everything after sees the scrubbed text, so curating curated output changes nothing.
  2. language: script ratios (no model download) label a document zh (Han characters are at least
     half of Han characters + Latin words), en (Latin letters >= 90% of letters) or other;
     `--lang zh|en` keeps one label, `--lang any` (default) keeps all.
  3. quality heuristics after Gopher (Rae et al. 2021, "Scaling Language Models", appendix A) and C4
     (Raffel et al. 2020, section 2.2), each named and switchable (RULES below), with thresholds per
     language (DEFAULT_THRESHOLDS): lengths count words in English and characters in Chinese, and the
     ratio rules only judge documents long enough for a ratio to mean something (50 words / 100 chars).
  4. exact duplicates: blake2b of the normalised text (NFKC, casefolded, whitespace collapsed);
     the first occurrence is kept. Needs only the set of hashes in memory.
  5. near duplicates: MinHash (Broder 1997) over character (or word) n-grams of the normalised text
     with `num_perm` random hash functions h(x) = ((a*x + b) mod 2^64) >> 32, then locality-sensitive
     hashing: the signature is cut into `bands` bands of `rows` values, documents sharing a band are
     candidates (probability 1 - (1 - J^rows)^bands at Jaccard J), and a candidate pair is a duplicate
     when its estimated Jaccard (the share of equal signature values) reaches `jaccard`. Duplicate
     pairs are joined with union-find; each cluster keeps its earliest document. Defaults: character
     5-grams, 128 hash functions, 20 bands x 6 rows (P(candidate) = 0.998 at J = 0.8, 0.27 at J = 0.5),
     duplicate at estimated J >= 0.7 (the estimate's standard deviation is sqrt(J(1-J)/128) ~ 0.04).
Stages 1-4 stream (documents are analysed in batches, in several processes with --workers); the
survivors wait in a spool file while the signatures (num_perm x 4 bytes a document) are in memory.

Inputs (as data/prepare.py reads them; several files or directories may be given):
  txt    `--txt-docs line`: a document per line; `blank`: per blank-line-separated block; `file`: the
         whole file; `auto` (default): `blank` when the file has a blank line, else `line`.
  jsonl  one JSON object per line with a string `text` field (--skip-bad-lines counts bad lines instead).
  tang   chinese-poetry JSON: every object with a `paragraphs` list is a poem, `title\\nline\\nline...`.
  A directory stands for its *.txt, *.jsonl and *.json files, sorted.
"""
import argparse
import copy
import hashlib
import json
import os
import random
import re
import sys
import time
import unicodedata
import zlib
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.corpus import CorpusError, read_documents  # noqa: E402


class CurateError(ValueError):
    """Bad configuration: reported as one clear line naming the option at fault."""


# ----------------------------------------------------------------------------------------------------
# PII scrubbing

def luhn_valid(digits: str) -> bool:
    """Luhn (mod 10) check used by payment card numbers: double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def cn_id_check_digit(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of a Chinese resident ID (GB 11643-1999)."""
    return "10X98765432"[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS)) % 11]


def cn_id_valid(number: str) -> bool:
    try:
        date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    return cn_id_check_digit(number[:17]) == number[17].upper()


# A match must not continue a longer run of digits (or digit groups): fixed-width lookbehinds, since
# Python's re has no variable-width ones. Boundaries are ASCII: Chinese text runs into numbers unspaced.
_NOT_AFTER_DIGITS = r"(?<![\d.])(?<!\d[ -])"
_NOT_BEFORE_DIGITS = r"(?![ -]?\d)"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

# an 18-digit number shaped like a resident ID is judged by the ID check alone, never as a card number
_ID_SHAPE = re.compile(r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]")

# (placeholder, pattern, validator): applied in this order, each to the output of the previous one.
PII_PATTERNS = [
    ("EMAIL", re.compile(r"(?<![A-Za-z0-9.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
                         r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9-])"), None),
    ("ID_NUMBER", re.compile(r"(?<![0-9A-Za-z])" + _ID_SHAPE.pattern + r"(?![0-9A-Za-z])"), cn_id_valid),
    ("CREDIT_CARD", re.compile(_NOT_AFTER_DIGITS + r"(?<![A-Za-z])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?"
                               r"|\d{4}([ -]?)\d{6}\2\d{5}|\d{13,19})" + _NOT_BEFORE_DIGITS + r"(?![A-Za-z])"),
     lambda m: luhn_valid(re.sub(r"\D", "", m)) and not _ID_SHAPE.fullmatch(m)),
    # a dotted quad right after a letter or the word version/release (v1.2.3.4, version 10.0.0.1) is a version
    ("IP_ADDRESS", re.compile(r"(?<![\d.A-Za-z])(?<![Vv]ersion )(?<![Rr]elease )" + _OCTET + r"(?:\." + _OCTET
                              + r"){3}(?!\.?\d)"), None),
    ("PHONE", re.compile(
        _NOT_AFTER_DIGITS + r"(?<![A-Za-z0-9+])(?:"
        r"\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{1,4}){1,4}"  # international, +CC ...
        r"|1[3-9]\d(?:[ -]?\d{4}){2}"                                             # Chinese mobile, 11 digits
        r"|(?:\(\d{3}\)[ .-]?|\d{3}[.-])\d{3}[.-]\d{4}"                            # North American
        r"|[2-9]\d{2}-\d{4}"                                                       # local, 7 digits: 555-0132
        r")" + _NOT_BEFORE_DIGITS),
     lambda m: 7 <= sum(ch.isdigit() for ch in m) <= 15),  # E.164: at most 15 digits
]
PII_KINDS = [kind for kind, _, _ in PII_PATTERNS]


def scrub_pii(text: str) -> tuple[str, Counter, list[tuple[str, str]]]:
    """-> (text with PII replaced by <KIND> placeholders, count per kind, [(kind, original string)])."""
    counts, found = Counter(), []
    for kind, pattern, valid in PII_PATTERNS:
        def replace(m, kind=kind, valid=valid):
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            found.append((kind, m.group(0)))
            return f"<{kind}>"
        text = pattern.sub(replace, text)
    return text, counts, found


def mask(s: str) -> str:
    """Letters and digits hidden except the first and last two: what the report shows of a PII match."""
    return s[:2] + re.sub(r"[^\W_]", "*", s[2:-2]) + s[-2:] if len(s) > 4 else "*" * len(s)


# ----------------------------------------------------------------------------------------------------
# Language by script

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]")
_LATIN_WORD = re.compile(_LATIN.pattern + "+")
_KANA_HANGUL = re.compile(r"[\u3040-\u30ff\u1100-\u11ff\uac00-\ud7af]")
_LETTER = re.compile(r"[^\W\d_]")


def _count(pattern: re.Pattern, text: str) -> int:
    return len(text) - len(pattern.sub("", text))


def script_shares(text: str) -> dict:
    """Shares of Han, Latin and kana/hangul characters among all letters (digits and punctuation are
    not letters), and `han_units`: Han characters among Han characters plus Latin words. A Han
    character carries about what an English word does, so mixed text (Chinese with English terms or
    code) is judged by units rather than by letters, which would favour the five-letter English word."""
    letters = _count(_LETTER, text)
    han = _count(_HAN, text)
    units = han + len(_LATIN_WORD.findall(text))
    if letters == 0:
        return {"letters": 0, "han": 0.0, "latin": 0.0, "kana_hangul": 0.0, "han_units": 0.0}
    return {"letters": letters, "han": han / letters, "latin": _count(_LATIN, text) / letters,
            "kana_hangul": _count(_KANA_HANGUL, text) / letters, "han_units": han / units if units else 0.0}


def detect_language(text: str, min_han_units: float = 0.5, min_latin: float = 0.9, max_kana: float = 0.05) -> str:
    """'zh' when Han characters are at least half of the units (Han characters + Latin words) and
    kana/hangul, which mark Japanese and Korean, are rare; 'en' when Latin letters are >= 90% of the
    letters (script alone cannot tell English from French: the stop_words rule does); else 'other'."""
    shares = script_shares(text)
    if shares["han_units"] >= min_han_units and shares["kana_hangul"] <= max_kana:
        return "zh"
    if shares["latin"] >= min_latin:
        return "en"
    return "other"


# ----------------------------------------------------------------------------------------------------
# Quality rules

RULES = {
    "language": "script ratio does not match --lang",
    "min_length": "fewer words (en) / characters (zh) than min_words / min_chars",
    "max_length": "more words (en) / characters (zh) than max_words / max_chars",
    "mean_word_length": "mean word length outside [min_mean_word_length, max_mean_word_length] (Gopher: 3..10)",
    "symbol_ratio": "'#' and ellipses per word (zh: per character) above max_symbol_ratio (Gopher: 0.1)",
    "alpha_words": "share of words with a letter below min_alpha_word_share (Gopher: 0.8)",
    "stop_words": "fewer than min_stop_words of the, be, to, of, and, that, have, with (Gopher: 2)",
    "line_punctuation": "share of lines ending in terminal punctuation below min_punct_line_share (after C4)",
    "repeated_lines": "duplicate lines above max_dup_line_share of lines or max_dup_line_char_share of characters",
    "repeated_ngrams": "most frequent 2/3/4-gram or duplicated 5..10-grams cover too many characters (Gopher)",
    "boilerplate": ("'lorem ipsum', or C4's boilerplate lines (javascript, cookies, terms of use...) above "
                    "max_boilerplate_line_share"),
    "exact_dup": "same normalised text (NFKC, casefold, whitespace collapsed) as an earlier document",
    "near_dup": "MinHash/LSH estimated Jaccard >= jaccard with an earlier document",
}
QUALITY_RULES = ["min_length", "max_length", "mean_word_length", "symbol_ratio", "alpha_words", "stop_words",
                 "line_punctuation", "repeated_lines", "repeated_ngrams", "boilerplate"]

# Gopher's repetition limits: top n-gram character share for n = 2, 3, 4 and duplicated n-gram
# character share for n = 5..10.
_GOPHER_TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
_GOPHER_DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
# Chinese tokens are single characters and a word is about two of them: the same limits on n-grams
# twice as long.
_ZH_TOP_NGRAM = {2 * n: share for n, share in _GOPHER_TOP_NGRAM.items()}
_ZH_DUP_NGRAM = {2 * n: share for n, share in _GOPHER_DUP_NGRAM.items()}

# A rule whose parameters are missing for a language does not apply to it (None switches one off).
# Ratios are noise on short texts (one repeated phrase in ten words is 20%), and Gopher computed them
# only on documents of >= 50 words: the ratio rules judge documents of at least `ratio_min_units` words
# (zh, other: characters) and the line rules documents of at least `ratio_min_lines` lines.
DEFAULT_THRESHOLDS = {
    "en": {"min_words": 5, "max_words": 100_000, "ratio_min_units": 50, "ratio_min_lines": 3,
           "min_mean_word_length": 3.0, "max_mean_word_length": 10.0, "max_symbol_ratio": 0.1,
           "min_alpha_word_share": 0.8, "min_stop_words": 2, "min_punct_line_share": 0.1,
           "max_dup_line_share": 0.3, "max_dup_line_char_share": 0.2,
           "top_ngram_char_share": _GOPHER_TOP_NGRAM, "dup_ngram_char_share": _GOPHER_DUP_NGRAM,
           "max_boilerplate_line_share": 0.3},
    "zh": {"min_chars": 10, "max_chars": 200_000, "ratio_min_units": 100, "ratio_min_lines": 3,
           "max_symbol_ratio": 0.1, "min_punct_line_share": 0.1,
           "max_dup_line_share": 0.3, "max_dup_line_char_share": 0.2,
           "top_ngram_char_share": _ZH_TOP_NGRAM, "dup_ngram_char_share": _ZH_DUP_NGRAM,
           "max_boilerplate_line_share": 0.3},
    "other": {"min_chars": 10, "max_chars": 500_000, "ratio_min_units": 50, "ratio_min_lines": 3,
              "max_dup_line_share": 0.3, "max_dup_line_char_share": 0.2, "max_boilerplate_line_share": 0.3},
}

STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
# C4's line blocklist (Raffel et al. 2020) and a few Chinese equivalents
BOILERPLATE = re.compile("|".join(["javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies",
                                   "use of cookies", "use cookies", "版权所有", "免责声明", "隐私政策"]))
_TERMINAL = tuple('.!?;"\'”’…)。！？；」』）')  # closing brackets: a note after the full stop
_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]|[^\W_]+")


def _repetition(tokens: list[str], top: dict, dup: dict) -> str | None:
    """Gopher's n-gram repetition: character share of the most frequent n-gram (n in `top`) and of all
    tokens inside an n-gram that occurs more than once (n in `dup`)."""
    total = sum(map(len, tokens))
    if total == 0:
        return None
    top = {int(n): limit for n, limit in top.items()}  # keys are strings after a JSON round trip
    dup = {int(n): limit for n, limit in dup.items()}
    for n, limit in top.items():
        grams = Counter(zip(*(tokens[i:] for i in range(n))))
        if grams:
            gram, count = grams.most_common(1)[0]
            share = count * sum(map(len, gram)) / total
            if count > 1 and share > limit:
                return f"top {n}-gram {' '.join(gram)!r} x{count} covers {share:.2f} of characters > {limit}"
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    for k, (n, limit) in enumerate(dup.items()):
        if len(tokens) < 2 * n:
            break
        grams = list(zip(*(tokens[i:] for i in range(n))))
        counts = Counter(grams)
        starts = np.flatnonzero(np.fromiter(map(counts.__getitem__, grams), dtype=np.int64, count=len(grams)) > 1)
        edges = np.zeros(len(tokens) + 1, dtype=np.int64)  # +1 where a duplicated n-gram starts, -1 after it
        edges[starts] += 1
        np.subtract.at(edges, starts + n, 1)
        share = lengths[np.cumsum(edges[:-1]) > 0].sum() / total
        if share > limit:
            return f"duplicated {n}-grams cover {share:.2f} of characters > {limit}"
        if share <= min(list(dup.values())[k:]):
            break  # longer duplicated n-grams cover no more than this: none can fail
    return None


def quality_failure(text: str, lang: str, thresholds: dict, disabled=frozenset()) -> tuple[str, str] | None:
    """The first quality rule that `text` fails as (rule, measured detail), or None when it passes."""
    t = thresholds.get(lang, thresholds["other"])
    words = text.split()
    chars = len(text) - sum(map(text.count, " \n\t\r"))
    by_words = t.get("min_words") is not None or t.get("max_words") is not None  # en counts words, zh characters
    units, unit_name = (len(words), "words") if by_words else (chars, "characters")
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    long_enough = units >= (t.get("ratio_min_units") or 0)
    many_lines = len(lines) >= (t.get("ratio_min_lines") or 0)

    def on(rule, *keys, gate=True):
        return gate and rule not in disabled and all(t.get(k) is not None for k in keys)

    if on("min_length", "min_words") and len(words) < t["min_words"]:
        return "min_length", f"{len(words)} words < {t['min_words']}"
    if on("min_length", "min_chars") and chars < t["min_chars"]:
        return "min_length", f"{chars} characters < {t['min_chars']}"
    if on("max_length", "max_words") and len(words) > t["max_words"]:
        return "max_length", f"{len(words)} words > {t['max_words']}"
    if on("max_length", "max_chars") and chars > t["max_chars"]:
        return "max_length", f"{chars} characters > {t['max_chars']}"
    if on("mean_word_length", "min_mean_word_length", "max_mean_word_length", gate=long_enough and words):
        mean = sum(map(len, words)) / len(words)
        if not t["min_mean_word_length"] <= mean <= t["max_mean_word_length"]:
            return "mean_word_length", (f"mean word length {mean:.2f} outside "
                                        f"[{t['min_mean_word_length']}, {t['max_mean_word_length']}]")
    if on("symbol_ratio", "max_symbol_ratio", gate=long_enough and units):
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / units > t["max_symbol_ratio"]:
            return "symbol_ratio", (f"{symbols} '#'/ellipses per {units} {unit_name} = {symbols / units:.3f} "
                                    f"> {t['max_symbol_ratio']}")
    if on("alpha_words", "min_alpha_word_share", gate=long_enough and words):
        share = sum(1 for w in words if _LETTER.search(w)) / len(words)
        if share < t["min_alpha_word_share"]:
            return "alpha_words", f"{share:.2f} of words contain a letter < {t['min_alpha_word_share']}"
    if on("stop_words", "min_stop_words", gate=long_enough):
        found = {w for w in (w.strip(".,;:!?\"'()").lower() for w in words) if w in STOP_WORDS}
        if len(found) < t["min_stop_words"]:
            return "stop_words", f"{len(found)} distinct stop words {sorted(found)} < {t['min_stop_words']}"
    if on("line_punctuation", "min_punct_line_share", gate=many_lines and lines):
        share = sum(line.endswith(_TERMINAL) for line in lines) / len(lines)
        if share < t["min_punct_line_share"]:
            return "line_punctuation", (f"{share:.2f} of {len(lines)} lines end in punctuation "
                                        f"< {t['min_punct_line_share']}")
    if on("repeated_lines", "max_dup_line_share", "max_dup_line_char_share", gate=many_lines and lines):
        counts = Counter(lines)
        dup_lines = sum(c - 1 for c in counts.values())  # every copy after a line's first
        dup_chars = sum((c - 1) * len(line) for line, c in counts.items()) / sum(map(len, lines))
        if dup_lines / len(lines) > t["max_dup_line_share"]:
            return "repeated_lines", (f"{dup_lines}/{len(lines)} lines repeat an earlier line "
                                      f"> {t['max_dup_line_share']}")
        if dup_chars > t["max_dup_line_char_share"]:
            return "repeated_lines", (f"repeated lines hold {dup_chars:.2f} of characters "
                                      f"> {t['max_dup_line_char_share']}")
    if on("repeated_ngrams", "top_ngram_char_share", "dup_ngram_char_share", gate=long_enough):
        detail = _repetition(_TOKEN.findall(text.lower()), t["top_ngram_char_share"], t["dup_ngram_char_share"])
        if detail:
            return "repeated_ngrams", detail
    if on("boilerplate", "max_boilerplate_line_share"):
        if "lorem ipsum" in text.lower():
            return "boilerplate", "contains 'lorem ipsum'"
        hits = [line for line in lines if BOILERPLATE.search(line.lower())] if many_lines else []
        if hits and len(hits) / len(lines) > t["max_boilerplate_line_share"]:
            return "boilerplate", (f"{len(hits)}/{len(lines)} boilerplate lines > {t['max_boilerplate_line_share']}, "
                                   f"e.g. {hits[0][:80]!r}")
    return None


# ----------------------------------------------------------------------------------------------------
# Exact and near duplicates

_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """What two documents must share to be exact duplicates: NFKC, casefolded, whitespace collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(normalized: str) -> bytes:
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def shingles(normalized: str, ngram: int = 5, unit: str = "char") -> set:
    """The exact n-gram set that MinHash estimates Jaccard over (used to check the estimate)."""
    items = normalized if unit == "char" else _TOKEN.findall(normalized)  # n-grams: substrings or word tuples
    if len(items) < ngram:
        return {items if unit == "char" else tuple(items)}
    if unit == "char":
        return {items[i:i + ngram] for i in range(len(items) - ngram + 1)}
    return {tuple(items[i:i + ngram]) for i in range(len(items) - ngram + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_POLY = np.uint64(0x100000001B3)     # rolling polynomial over code points (FNV prime), mod 2^64
_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiplier: fold 64 bits into a well-mixed 32


class MinHasher:
    """MinHash signatures of many documents at once, vectorised with numpy.

    Each n-gram becomes a 32-bit value x (a polynomial hash of its code points or word hashes); hash
    function k is the multiply-add-shift h_k(x) = ((a_k * x + b_k) mod 2^64) >> 32, a strongly
    universal family, with a_k odd. signature[d, k] = min over the n-grams of document d of h_k, and
    P(signature[d, k] == signature[e, k]) equals the Jaccard similarity of the two n-gram sets.
    """

    def __init__(self, num_perm: int = 128, ngram: int = 5, unit: str = "char", seed: int = 0,
                 chunk: int = 1 << 15):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self.b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
        self.num_perm, self.ngram, self.unit, self.chunk = num_perm, ngram, unit, chunk

    def _items(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (one uint64 per character or word of all texts, padded to >= ngram each; lengths)."""
        n = self.ngram
        if self.unit == "char":
            padded = [t + "\0" * (n - len(t)) if len(t) < n else t for t in texts]
            lengths = np.fromiter(map(len, padded), dtype=np.int64, count=len(padded))
            items = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
            return items, lengths
        words = [[zlib.crc32(w.encode("utf-8")) + 1 for w in _TOKEN.findall(t)] for t in texts]
        words = [w + [0] * (n - len(w)) if len(w) < n else w for w in words]
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        return np.fromiter((x for w in words for x in w), dtype=np.uint64, count=int(lengths.sum())), lengths

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures of normalised texts."""
        if not texts:
            return np.zeros((0, self.num_perm), dtype=np.uint32)
        n = self.ngram
        items, lengths = self._items(texts)
        # hash of the n-gram starting at every position of the concatenation (some straddle two documents)
        windows = len(items) - n + 1
        h = np.zeros(windows, dtype=np.uint64)
        for k in range(n):
            h = h * _POLY + items[k:k + windows]
        x = (h * _MIX) >> np.uint64(32)
        # keep only the n-grams inside one document: document d has lengths[d] - n + 1 of them
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        counts = lengths - n + 1
        doc_of = np.repeat(np.arange(len(texts)), counts)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        x = x[np.arange(len(doc_of)) - first[doc_of] + starts[doc_of]]

        sig = np.full((self.num_perm, len(texts)), np.iinfo(np.uint64).max, dtype=np.uint64)
        a, b = self.a[:, None], self.b[:, None]
        for lo in range(0, len(x), self.chunk):
            xs, docs = x[lo:lo + self.chunk], doc_of[lo:lo + self.chunk]
            values = a * xs[None, :]  # (num_perm, chunk)
            values += b
            values >>= np.uint64(32)
            seg = np.flatnonzero(np.diff(docs, prepend=-1))  # where each document's run starts
            mins = np.minimum.reduceat(values, seg, axis=1)  # (num_perm, documents in chunk)
            ids = docs[seg]
            sig[:, ids] = np.minimum(sig[:, ids], mins)
        return sig.T.astype(np.uint32)


def p_candidate(j: float, bands: int, rows: int) -> float:
    """Probability that two documents at Jaccard j share at least one LSH band: 1 - (1 - j^rows)^bands."""
    return 1.0 - (1.0 - j ** rows) ** bands


def lsh_candidates(sig: np.ndarray, bands: int, rows: int, max_bucket: int = 200) -> np.ndarray:
    """(P, 2) int64 pairs i < j of documents that share a band of their signatures.

    Within a bucket every pair is a candidate; a bucket larger than max_bucket (many copies of one
    text) pairs each member with the bucket's first only, which union-find still joins into one cluster.
    """
    n = len(sig)
    pairs = []
    for band in range(bands):
        block = sig[:, band * rows:(band + 1) * rows].astype(np.uint64)
        key = np.zeros(n, dtype=np.uint64)
        for r in range(rows):
            key = key * _POLY + block[:, r]
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        new = np.concatenate([[True], sorted_key[1:] != sorted_key[:-1]])
        group_start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
        size = np.bincount(group_start, minlength=n)[group_start]
        star = (~new) & ((size == 2) | (size > max_bucket))
        pairs.append(np.stack([order[group_start[star]], order[star]], axis=1))
        for start in np.unique(group_start[(size > 2) & (size <= max_bucket)]):
            members = np.sort(order[start:start + size[start]])
            i, j = np.triu_indices(len(members), k=1)
            pairs.append(np.stack([members[i], members[j]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(pairs).astype(np.int64)
    keys = np.unique(np.minimum(pairs[:, 0], pairs[:, 1]) * n + np.maximum(pairs[:, 0], pairs[:, 1]))
    return np.stack([keys // n, keys % n], axis=1)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty(len(pairs))
    for lo in range(0, len(pairs), chunk):
        p = pairs[lo:lo + chunk]
        out[lo:lo + chunk] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def near_duplicates(sig: np.ndarray, bands: int, rows: int, threshold: float):
    """-> (removed: {doc: (kept doc of its cluster, linking pair partner, estimated Jaccard)},
    candidate pair count, verified pairs (P, 2), their estimated Jaccard)."""
    pairs = lsh_candidates(sig, bands, rows)
    est = estimated_jaccard(sig, pairs)
    keep = est >= threshold
    verified, verified_est = pairs[keep], est[keep]
    parent = list(range(len(sig)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    partner = {}
    for (i, j), e in zip(verified.tolist(), verified_est.tolist()):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the root is the cluster's earliest document
        if j not in partner or e > partner[j][1]:
            partner[j] = (i, e)
    removed = {}
    for doc in sorted({d for pair in verified.tolist() for d in pair}):
        root = find(doc)
        if root != doc:
            i, e = partner.get(doc, (root, float("nan")))
            removed[doc] = (root, i, e)
    return removed, len(pairs), verified, verified_est


# ----------------------------------------------------------------------------------------------------
# The pipeline

@dataclass
class CurateConfig:
    lang: str = "any"                    # zh | en | any
    pii: bool = True
    exact_dedup: bool = True
    near_dedup: bool = True
    disabled: tuple = ()                 # rule names switched off
    thresholds: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_THRESHOLDS))
    ngram: int = 5
    unit: str = "char"                   # char | word n-grams for MinHash
    num_perm: int = 128
    bands: int = 20
    rows: int = 6
    jaccard: float = 0.7                 # estimated Jaccard at or above which a candidate pair is a duplicate
    seed: int = 0
    examples: int = 3                    # per rule in the report
    jaccard_check_pairs: int = 200       # flagged pairs whose exact Jaccard the report computes

    def validate(self) -> None:
        if self.lang not in ("zh", "en", "any"):
            raise CurateError(f"lang must be zh, en or any, got {self.lang!r}")
        unknown = [r for r in self.disabled if r not in RULES]
        if unknown:
            raise CurateError(f"unknown rule(s) {unknown}; rules are {', '.join(RULES)}")
        if self.unit not in ("char", "word"):
            raise CurateError(f"unit must be char or word, got {self.unit!r}")
        if self.ngram < 1 or self.num_perm < 1 or self.bands < 1 or self.rows < 1:
            raise CurateError(f"ngram, num_perm, bands and rows must be >= 1 (got {self.ngram}, {self.num_perm}, "
                              f"{self.bands}, {self.rows})")
        if self.bands * self.rows > self.num_perm:
            raise CurateError(f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        if not 0 < self.jaccard <= 1:
            raise CurateError(f"jaccard must be in (0, 1], got {self.jaccard}")
        for lang in ("en", "zh", "other"):
            if lang not in self.thresholds:
                raise CurateError(f"thresholds have no entry for language {lang!r}")

    def set_threshold(self, assignment: str) -> None:
        """`en.min_words=50`, `zh.min_punct_line_share=none` (none switches the parameter off)."""
        try:
            key, value = assignment.split("=", 1)
            lang, name = key.split(".", 1)
        except ValueError:
            raise CurateError(f"--set {assignment!r}: expected LANG.NAME=VALUE, e.g. en.min_words=50") from None
        known = {n for t in DEFAULT_THRESHOLDS.values() for n in t}
        if lang not in self.thresholds or name not in known:
            raise CurateError(f"--set {assignment!r}: unknown language or parameter; languages: en, zh, other; "
                              f"parameters: {', '.join(sorted(known))}")
        try:
            self.thresholds[lang][name] = None if value.lower() == "none" else json.loads(value)
        except json.JSONDecodeError:
            raise CurateError(f"--set {assignment!r}: {value!r} is not a number, JSON object or none") from None


_HASHER_CACHE = {}


def _hasher(cfg: CurateConfig) -> MinHasher:
    key = (cfg.num_perm, cfg.ngram, cfg.unit, cfg.seed)
    if key not in _HASHER_CACHE:
        _HASHER_CACHE[key] = MinHasher(cfg.num_perm, cfg.ngram, cfg.unit, cfg.seed)
    return _HASHER_CACHE[key]


def analyse_batch(texts: list[str], cfg: CurateConfig):
    """Stages 1-3 and the hashes of stages 4-5 for a batch (run in worker processes).

    -> (per document: (scrubbed text or None when unchanged, language, (rule, detail) or None, exact key,
        pii counts, pii found), MinHash signatures of the documents that passed the filters, in order)."""
    results, survivors = [], []
    disabled = frozenset(cfg.disabled)
    for original in texts:
        text, counts, found = original, Counter(), []
        if cfg.pii:
            text, counts, found = scrub_pii(original)
        lang = detect_language(text)
        failure = None
        if cfg.lang != "any" and lang != cfg.lang and "language" not in disabled:
            shares = script_shares(text)
            failure = ("language", f"detected {lang} (Han {shares['han_units']:.2f} of units, Latin "
                                   f"{shares['latin']:.2f} of {shares['letters']} letters), want {cfg.lang}")
        if failure is None:
            failure = quality_failure(text, lang, cfg.thresholds, disabled)
        norm = normalize(text)
        if failure is None:
            survivors.append(norm)
        results.append((None if text == original else text, lang, failure, exact_key(norm), counts, found))
    sig = _hasher(cfg).signatures(survivors) if cfg.near_dedup and "near_dup" not in disabled else None
    return results, sig


class _Spool:
    """Survivors of stages 1-4, in memory or in a JSONL file (with byte offsets for random access)."""

    def __init__(self, path: Path | None):
        self.path, self.items, self.offsets = path, [], []
        self.file = open(path, "w+b") if path else None

    def append(self, entry: dict) -> None:
        if self.file is None:
            self.items.append(entry)
        else:
            self.offsets.append(self.file.tell())
            self.file.write(json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n")

    def __len__(self):
        return len(self.offsets) if self.file else len(self.items)

    def __getitem__(self, i: int) -> dict:
        if self.file is None:
            return self.items[i]
        self.file.seek(self.offsets[i])
        entry = json.loads(self.file.readline())
        self.file.seek(0, os.SEEK_END)
        return entry

    def __iter__(self):
        if self.file is None:
            yield from self.items
            return
        self.file.flush()
        self.file.seek(0)
        for line in self.file:
            yield json.loads(line)
        self.file.seek(0, os.SEEK_END)

    def close(self):
        if self.file:
            self.file.close()
            self.path.unlink(missing_ok=True)


def _snippet(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


class _Examples:
    """Up to k examples per rule, a seeded reservoir sample (Algorithm R) so they are spread over the corpus."""

    def __init__(self, k: int, seed: int):
        self.k, self.rng, self.seen, self.kept = k, random.Random(seed), Counter(), {}

    def offer(self, rule: str, make) -> None:
        self.seen[rule] += 1
        slot = self.seen[rule] - 1 if self.seen[rule] <= self.k else self.rng.randrange(self.seen[rule])
        if slot < self.k:
            bucket = self.kept.setdefault(rule, [])
            example = make()
            if slot < len(bucket):
                bucket[slot] = example
            else:
                bucket.append(example)


class Curator:
    """Runs the stages over a stream of {"text", "source"} documents; see the module docstring."""

    def __init__(self, config: CurateConfig | None = None, workers: int = 1, batch_size: int = 512,
                 spool_path: Path | None = None, progress: bool = False):
        self.cfg = config or CurateConfig()
        self.cfg.validate()
        self.workers, self.batch_size, self.progress = workers, batch_size, progress
        self.spool = _Spool(spool_path)
        self.examples = _Examples(self.cfg.examples, self.cfg.seed)
        self.removed = Counter({rule: 0 for rule in RULES})
        self.across_files = Counter()  # duplicates whose kept twin comes from another input file
        self.file_ids, self.spool_file = {}, []  # spool index -> id of its file (`a.jsonl` of `a.jsonl:17`)
        self.languages = Counter()
        self.docs_in = self.chars_in = 0
        self.docs_out = self.chars_out = 0  # counted while kept() yields the output
        self.pii = Counter({kind: 0 for kind in PII_KINDS})
        self.seen_keys = {}
        self.signatures = []
        self.near_removed = {}
        self.near_report = {}
        self.seconds = {}

    def _batches(self, documents):
        batch = []
        for i, doc in enumerate(documents):
            if isinstance(doc, str):
                doc = {"text": doc, "source": f"#{i + 1}"}
            batch.append(doc)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _analysed(self, documents):
        """(batch, analysis) pairs in input order; with workers > 1 at most 2 x workers batches in flight."""
        if self.workers <= 1:
            for batch in self._batches(documents):
                yield batch, analyse_batch([d["text"] for d in batch], self.cfg)
            return
        with get_context("spawn" if sys.platform == "darwin" else "fork").Pool(self.workers) as pool:
            pending = deque()
            for batch in self._batches(documents):
                pending.append((batch, pool.apply_async(analyse_batch, ([d["text"] for d in batch], self.cfg))))
                if len(pending) >= 2 * self.workers:
                    b, result = pending.popleft()
                    yield b, result.get()
            while pending:
                b, result = pending.popleft()
                yield b, result.get()

    def run(self, documents) -> None:
        """Stages 1-4 (streaming), then near-duplicate detection over the kept signatures."""
        t0 = last = time.perf_counter()
        for batch, (results, sig) in self._analysed(documents):
            survivor = 0
            for doc, (scrubbed, lang, failure, key, counts, found) in zip(batch, results):
                text = doc["text"] if scrubbed is None else scrubbed
                self.docs_in += 1
                self.chars_in += len(doc["text"])
                self.languages[lang] += 1
                if failure is not None:
                    rule, detail = failure
                    self.removed[rule] += 1
                    self.examples.offer(rule, lambda: {"source": doc["source"], "detail": detail,
                                                       "text": _snippet(text)})
                    continue
                row = survivor
                survivor += 1
                if self.cfg.exact_dedup and "exact_dup" not in self.cfg.disabled:
                    if key in self.seen_keys:
                        self.removed["exact_dup"] += 1
                        first = self.seen_keys[key]
                        self.across_files["exact_dup"] += self.spool_file[first] != self._file_id(doc["source"])
                        self.examples.offer("exact_dup", lambda: {
                            "source": doc["source"], "text": _snippet(text),
                            "detail": f"same normalised text as {self.spool[first]['source']}"})
                        continue
                    self.seen_keys[key] = len(self.spool)
                for kind, original in found:
                    self.examples.offer(kind, lambda: {"source": doc["source"], "detail": f"{kind}: {mask(original)}",
                                                       "text": _snippet(_around(text, f"<{kind}>"))})
                self.spool.append({"text": text, "source": doc["source"], "pii": dict(counts)})
                self.spool_file.append(self._file_id(doc["source"]))
                if sig is not None:
                    self.signatures.append(sig[row])
            now = time.perf_counter()
            if self.progress and now - last > 1:
                last = now
                print(f"\rcurate: {self.docs_in:,} documents read, {len(self.spool):,} kept so far, "
                      f"{self.docs_in / (now - t0):,.0f} docs/s", end="", file=sys.stderr, flush=True)
        if self.progress:
            print(file=sys.stderr)
        self.seconds["filter_and_exact_dedup"] = time.perf_counter() - t0
        if self.signatures:
            t1 = time.perf_counter()
            self._near_dedup(np.stack(self.signatures))
            self.seconds["near_dedup_lsh"] = time.perf_counter() - t1

    def _file_id(self, source: str) -> int:
        return self.file_ids.setdefault(re.sub(r"[:#]\d+$", "", source), len(self.file_ids))

    def _near_dedup(self, sig: np.ndarray) -> None:
        cfg = self.cfg
        removed, n_candidates, verified, verified_est = near_duplicates(sig, cfg.bands, cfg.rows, cfg.jaccard)
        self.near_removed = removed
        self.removed["near_dup"] = len(removed)
        self.across_files["near_dup"] = sum(self.spool_file[doc] != self.spool_file[root]
                                            for doc, (root, _, _) in removed.items())
        rng = random.Random(cfg.seed)
        sample = sorted(rng.sample(range(len(verified)), min(cfg.jaccard_check_pairs, len(verified))))
        checks = []
        for p in sample:
            i, j = verified[p].tolist()
            a = shingles(normalize(self.spool[i]["text"]), cfg.ngram, cfg.unit)
            b = shingles(normalize(self.spool[j]["text"]), cfg.ngram, cfg.unit)
            checks.append({"a": self.spool[i]["source"], "b": self.spool[j]["source"],
                           "estimated": round(float(verified_est[p]), 4), "exact": round(jaccard(a, b), 4)})
        for doc, (root, partner, est) in removed.items():
            def make(doc=doc, root=root, partner=partner, est=est):
                a, b = self.spool[doc], self.spool[partner]
                exact = jaccard(shingles(normalize(a["text"]), cfg.ngram, cfg.unit),
                                shingles(normalize(b["text"]), cfg.ngram, cfg.unit))
                return {"source": a["source"], "text": _snippet(a["text"]),
                        "detail": f"estimated Jaccard {est:.2f} (exact {exact:.2f}) with {b['source']}; "
                                  f"cluster keeps {self.spool[root]['source']}",
                        "kept_text": _snippet(b["text"])}
            self.examples.offer("near_dup", make)
        errors = [abs(c["estimated"] - c["exact"]) for c in checks]
        self.near_report = {
            "ngram": cfg.ngram, "unit": cfg.unit, "num_perm": cfg.num_perm, "bands": cfg.bands, "rows": cfg.rows,
            "jaccard_threshold": cfg.jaccard, "documents": len(sig), "candidate_pairs": n_candidates,
            "duplicate_pairs": len(verified),
            "p_candidate": {f"{j:.1f}": round(p_candidate(j, cfg.bands, cfg.rows), 4)
                            for j in (0.3, 0.5, 0.7, 0.8, 0.9)},
            "jaccard_check": {"pairs": len(checks),
                              "mean_abs_error": round(float(np.mean(errors)), 4) if errors else None,
                              "max_abs_error": round(float(np.max(errors)), 4) if errors else None,
                              "sample": checks[:10]},
        }

    def kept(self):
        """The surviving {"text", "source"} documents, in input order (counting characters and PII for the report)."""
        self.pii = Counter({kind: 0 for kind in PII_KINDS})
        self.docs_out = self.chars_out = 0
        for i, entry in enumerate(self.spool):
            if i in self.near_removed:
                continue
            self.pii.update(entry["pii"])
            self.docs_out += 1
            self.chars_out += len(entry["text"])
            yield {"text": entry["text"], "source": entry["source"]}

    def report(self, sources=None, bad_lines: Counter | None = None) -> dict:
        cfg = json.loads(json.dumps(asdict(self.cfg)))  # as written to curation_report.json
        active = [r for r in RULES if r not in self.cfg.disabled
                  and not (r == "language" and self.cfg.lang == "any")
                  and not (r == "exact_dup" and not self.cfg.exact_dedup)
                  and not (r == "near_dup" and not self.cfg.near_dedup)]
        return {
            "sources": [str(s) for s in sources or []],
            "config": cfg,
            "documents_in": self.docs_in, "documents_out": self.docs_out,
            "characters_in": self.chars_in, "characters_out": self.chars_out,
            "bad_lines_skipped": dict(bad_lines or {}),
            "removed": {r: self.removed[r] for r in active},
            "duplicates_across_files": {r: self.across_files[r] for r in ("exact_dup", "near_dup") if r in active},
            "rule_descriptions": {r: RULES[r] for r in active},
            "languages_in": dict(self.languages),
            "pii_replaced": dict(self.pii) if self.cfg.pii else {},
            "near_dup": self.near_report,
            "examples": {rule: self.examples.kept.get(rule, []) for rule in [*active, *PII_KINDS]
                         if rule in self.examples.kept},
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def close(self):
        self.spool.close()


def _around(text: str, needle: str, width: int = 100) -> str:
    at = max(text.find(needle), 0)
    start = max(0, at - width)
    return ("…" if start else "") + text[start:at + len(needle) + width]


def curate(documents, config: CurateConfig | None = None, workers: int = 1) -> tuple[list[str], dict]:
    """Curate in memory: documents (strings or {"text", "source"} dicts) -> (kept texts, report dict)."""
    curator = Curator(config, workers=workers)
    try:
        curator.run(documents)
        kept = [doc["text"] for doc in curator.kept()]
        return kept, curator.report()
    finally:
        curator.close()


def curate_files(sources, out_dir, config: CurateConfig | None = None, fmt: str | None = None,
                 txt_docs: str = "auto", skip_bad_lines: bool = False, workers: int = 1,
                 progress: bool = True) -> dict:
    """Stream the source files through the pipeline into out_dir/curated.jsonl and the reports."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad_lines = Counter()
    curator = Curator(config, workers=workers, spool_path=out / ".curate_spool.jsonl", progress=progress)
    try:
        t0 = time.perf_counter()
        curator.run(read_documents(sources, fmt, txt_docs, skip_bad_lines, bad_lines))
        tmp = out / "curated.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in curator.kept():
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, out / "curated.jsonl")
        report = curator.report(sources, bad_lines)
        report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    finally:
        curator.close()
    write_report(report, out)
    return report


# ----------------------------------------------------------------------------------------------------
# Report

def _md_text(text: str) -> str:
    return "> " + text.replace("\n", "⏎ ").replace("|", "\\|")


def report_markdown(report: dict) -> str:
    lines = ["# Curation report", ""]
    if report["sources"]:
        lines += ["Sources: " + ", ".join(f"`{s}`" for s in report["sources"]), ""]
    d_in, d_out = report["documents_in"], report["documents_out"]
    lines += ["| stage | documents | share of input |", "|---|---:|---:|", f"| in | {d_in:,} | 100% |"]
    for rule, n in report["removed"].items():
        lines.append(f"| removed by `{rule}` | {n:,} | {100 * n / max(d_in, 1):.2f}% |")
    lines += [f"| out | {d_out:,} | {100 * d_out / max(d_in, 1):.2f}% |", "",
              f"Characters: {report['characters_in']:,} in, {report['characters_out']:,} out. "
              f"Languages detected in the input: "
              + ", ".join(f"{k} {v:,}" for k, v in sorted(report["languages_in"].items())) + "."]
    across = report["duplicates_across_files"]
    if across:
        lines.append("Duplicates whose kept twin is in another input file: "
                     + ", ".join(f"`{r}` {n:,} of {report['removed'][r]:,}" for r, n in across.items()) + ".")
    if any(report["bad_lines_skipped"].values()):
        lines.append("Bad lines skipped: " + ", ".join(f"{k}: {v}" for k, v in report["bad_lines_skipped"].items()))
    if report["pii_replaced"]:
        lines += ["", "PII replaced in the kept documents: "
                  + ", ".join(f"`<{k}>` {v:,}" for k, v in report["pii_replaced"].items()) + "."]
    near = report["near_dup"]
    if near:
        check = near["jaccard_check"]
        lines += ["", f"Near duplicates: MinHash over {near['unit']} {near['ngram']}-grams, {near['num_perm']} hash "
                  f"functions, LSH {near['bands']} bands x {near['rows']} rows, duplicate at estimated Jaccard >= "
                  f"{near['jaccard_threshold']}. {near['candidate_pairs']:,} candidate pairs, "
                  f"{near['duplicate_pairs']:,} duplicate pairs. P(candidate | J): "
                  + ", ".join(f"{j}: {p:.3f}" for j, p in near["p_candidate"].items()) + "."]
        if check["pairs"]:
            lines.append(f"Estimated vs exact Jaccard on {check['pairs']} flagged pairs: mean |error| "
                         f"{check['mean_abs_error']:.3f}, max {check['max_abs_error']:.3f}.")
    lines += ["", "## Examples", ""]
    for rule, examples in report["examples"].items():
        description = report["rule_descriptions"].get(rule, f"PII replaced by `<{rule}>`")
        lines += [f"### `{rule}`: {description}", ""]
        for ex in examples:
            lines += [f"- `{ex['source']}`: {ex['detail']}", "", "  " + _md_text(ex["text"]), ""]
            if "kept_text" in ex:
                lines += ["  kept:", "", "  " + _md_text(ex["kept_text"]), ""]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir) -> None:
    out = Path(out_dir)
    (out / "curation_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "curation_report.md").write_text(report_markdown(report), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# CLI

def config_from_args(args) -> CurateConfig:
    cfg = CurateConfig(lang=args.lang, pii=not args.no_pii, exact_dedup=not args.no_dedup,
                       near_dedup=not args.no_near_dup, disabled=tuple(args.disable), ngram=args.ngram,
                       unit=args.unit, num_perm=args.num_perm, bands=args.bands, rows=args.rows,
                       jaccard=args.jaccard, seed=args.seed)
    for assignment in args.set:
        cfg.set_threshold(assignment)
    cfg.validate()
    return cfg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=f"rules: {', '.join(RULES)}")
    parser.add_argument("--source", nargs="+", help="input files or directories (txt, jsonl, tang JSON)")
    parser.add_argument("--out-dir", "--out", dest="out_dir", help="output directory: curated.jsonl, curation_report.json/.md")
    parser.add_argument("--format", choices=["txt", "jsonl", "tang"], help="input format (default: from the suffix)")
    parser.add_argument("--txt-docs", choices=["auto", "file", "line", "blank"], default="auto",
                        help="txt documents: per line, per blank-line block, whole file; auto: blank if any")
    parser.add_argument("--skip-bad-lines", action="store_true", help="jsonl: count and skip lines without 'text'")
    parser.add_argument("--lang", choices=["zh", "en", "any"], default="any",
                        help="keep only this script-detected language")
    parser.add_argument("--disable", nargs="*", default=[], metavar="RULE", help="switch these rules off")
    parser.add_argument("--set", action="append", default=[], metavar="LANG.NAME=VALUE",
                        help="override a threshold, e.g. en.min_words=50 or zh.min_punct_line_share=none")
    parser.add_argument("--no-pii", action="store_true", help="do not scrub PII")
    parser.add_argument("--no-dedup", action="store_true", help="no exact deduplication")
    parser.add_argument("--no-near-dup", action="store_true", help="no MinHash near-duplicate removal")
    parser.add_argument("--ngram", type=int, default=5, help="MinHash n-gram size")
    parser.add_argument("--unit", choices=["char", "word"], default="char",
                        help="MinHash n-grams of characters or words")
    parser.add_argument("--num-perm", type=int, default=128, help="MinHash hash functions")
    parser.add_argument("--bands", type=int, default=20, help="LSH bands")
    parser.add_argument("--rows", type=int, default=6, help="signature values per LSH band")
    parser.add_argument("--jaccard", type=float, default=0.7, help="estimated Jaccard that makes a near duplicate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hash functions and the report's samples")
    parser.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 1) - 1)),
                        help="analysis processes (default: CPUs - 1, at most 4; 1 analyses in this process)")
    args = parser.parse_args(argv)
    try:
        if not args.source or not args.out_dir:
            parser.error("--source and --out-dir are required")
        report = curate_files(args.source, args.out_dir, config_from_args(args), args.format, args.txt_docs,
                              args.skip_bad_lines, args.workers)
    except (CurateError, CorpusError) as e:
        sys.exit(f"error: {e}")
    removed = ", ".join(f"{r} {n:,}" for r, n in report["removed"].items() if n)
    print(f"curated {report['documents_in']:,} -> {report['documents_out']:,} documents ({removed or 'none removed'}) "
          f"in {report['seconds']['total']:.1f}s; wrote {Path(args.out_dir) / 'curated.jsonl'} and curation_report.md")


if __name__ == "__main__":
    main()
