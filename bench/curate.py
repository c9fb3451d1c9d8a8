"""data/curate.py on the real corpora and against references, in one run:

    python -m bench.curate                     # the shared data folder ($NANOLLM_DATA or ../shared/data)
    python -m bench.curate --workers 4

What it measures: what each rule removes from c4_demo, wiki_demo, Tiny Shakespeare and the Tang poems;
the script-ratio language labels on the alpaca EN/ZH sets; a synthetic check with 1,000 edited copies
(exact character 5-gram Jaccard spread over [0.3, 1)) and PII of every kind (with checksum-failing
decoys) injected into the real corpora, for near-duplicate recall at J >= 0.8 (target >= 95%), false
positives at J <= 0.5 (target <= 1%) and PII recall; and speed on 100k short real documents, the numpy
MinHash + LSH against the textbook pure-Python MinHash loop and exact all-pairs Jaccard (the references).
"""
import argparse
import json
import os
import random
import re
import time
import zlib
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np

from data.corpus import CorpusError, read_documents
from data.curate import (PII_KINDS, QUALITY_RULES, RULES, CurateConfig, CurateError, Curator, MinHasher,
                         cn_id_check_digit, curate, detect_language, jaccard, luhn_valid, near_duplicates, normalize,
                         scrub_pii, shingles)


def edited_copy(normalized: str, target: float, rng: random.Random, ngram: int = 5) -> tuple[str, float]:
    """A copy of `normalized` with characters substituted (in a seeded random order) until the exact
    character n-gram Jaccard with the original is as close to `target` as the edits allow."""
    base = shingles(normalized, ngram)
    positions = [i for i, ch in enumerate(normalized) if not ch.isspace()]
    rng.shuffle(positions)
    zh = detect_language(normalized) == "zh"
    alphabet = "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会" if zh \
        else "abcdefghijklmnopqrstuvwxyz"
    replacement = rng.choices(alphabet, k=len(positions))

    def edit(k):
        chars = list(normalized)
        for pos, ch in zip(positions[:k], replacement[:k]):
            chars[pos] = ch if ch != chars[pos] else alphabet[(alphabet.index(ch) + 1) % len(alphabet)]
        text = "".join(chars)
        return text, jaccard(base, shingles(text, ngram))

    lo, hi = 1, len(positions)  # at least one edit: an injected copy is never an exact duplicate
    while lo < hi:  # Jaccard falls as edits accumulate: the fewest edits that bring it to <= target
        mid = (lo + hi) // 2
        if edit(mid)[1] <= target:
            hi = mid
        else:
            lo = mid + 1
    candidates = [edit(k) for k in {max(1, lo - 1), lo}]
    return min(candidates, key=lambda c: abs(c[1] - target))


def _luhn_complete(prefix: str) -> str:
    return prefix + next(d for d in "0123456789" if luhn_valid(prefix + d))


def fake_pii(kind: str, rng: random.Random, valid: bool = True) -> str:
    """A random PII string of the given kind; valid=False gives a checksum failure (cards, IDs only)."""
    digits = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    if kind == "EMAIL":
        user = rng.choice(["john.doe", "li_wei", "a.b+news", "maria86", "x"]) + digits(2)
        return f"{user}@{rng.choice(['example', 'mail.example', 'uni-x'])}.{rng.choice(['com', 'org', 'edu.cn', 'de'])}"
    if kind == "PHONE":
        return rng.choice([
            lambda: f"+{rng.choice(['1', '44', '49', '86', '33'])} {digits(3)} {digits(3)} {digits(4)}",
            lambda: f"+1 ({rng.randint(201, 989)}) {digits(3)}-{digits(4)}",
            lambda: f"+86 1{rng.choice('3456789')}{digits(1)} {digits(4)} {digits(4)}",
            lambda: f"1{rng.choice('3456789')}{digits(9)}",
            lambda: f"1{rng.choice('3456789')}{digits(1)}-{digits(4)}-{digits(4)}",
            lambda: f"({rng.randint(201, 989)}) {digits(3)}-{digits(4)}",
            lambda: f"{rng.randint(201, 989)}-{digits(3)}-{digits(4)}",
            lambda: f"{rng.randint(201, 989)}-{digits(4)}"])()
    if kind == "IP_ADDRESS":
        return ".".join(str(rng.randint(0, 255)) for _ in range(4))
    if kind == "ID_NUMBER":
        birth = date(rng.randint(1940, 2010), rng.randint(1, 12), rng.randint(1, 28)).strftime("%Y%m%d")
        first17 = f"{rng.choice(['110105', '310104', '440305', '510107'])}{birth}{digits(3)}"
        check = cn_id_check_digit(first17)
        if not valid:
            check = rng.choice([c for c in "0123456789X" if c != check])
        return first17 + check
    if kind == "CREDIT_CARD":
        prefix = rng.choice(["4" + digits(14), "5" + str(rng.randint(1, 5)) + digits(13),  # Visa, Mastercard
                             "3" + rng.choice("47") + digits(12)])                           # Amex, 15 digits
        number = _luhn_complete(prefix)
        if not valid:
            number = number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)
        sep = rng.choice(["", " ", "-"])
        groups = [number[:4], number[4:10], number[10:]] if len(number) == 15 else \
            [number[i:i + 4] for i in range(0, 16, 4)]
        return sep.join(groups)
    raise ValueError(kind)


def _corpora(data_dir: Path) -> dict:
    return {"c4_demo.jsonl": [data_dir / "pretrain" / "c4_demo.jsonl"],
            "wiki_demo.txt": [data_dir / "pretrain" / "wiki_demo.txt"],
            "tinyshakespeare (paragraphs)": [data_dir / "tinyshakespeare" / "input.txt"],
            "tang_poems (58 files + 300)": [data_dir / "tang_poems"]}


def synthetic_check(documents: list[dict], n_dups: int = 1000, n_pii: int = 100, seed: int = 0,
                    config: CurateConfig | None = None, workers: int = 1) -> dict:
    """Inject n_dups edited copies (exact Jaccard spread over [0.3, 1)) and n_pii strings of every PII
    kind (plus checksum-failing decoys) into `documents`; curate; measure recall and false positives."""
    rng = random.Random(seed)
    cfg = config or CurateConfig(disabled=tuple(QUALITY_RULES), pii=False)
    bases = [i for i, d in enumerate(documents) if 200 <= len(normalize(d["text"])) <= 5000]
    injected = []
    for k, i in enumerate(rng.sample(bases, min(n_dups, len(bases)))):
        copy_text, j = edited_copy(normalize(documents[i]["text"]), rng.uniform(0.3, 1.0), rng, cfg.ngram)
        injected.append({"text": copy_text, "source": f"copy{k}", "jaccard": j})
    curator = Curator(cfg, workers=workers)
    try:
        curator.run(documents + [{"text": d["text"], "source": d["source"]} for d in injected])
        kept = {d["source"] for d in curator.kept()}
    finally:
        curator.close()
    js = np.array([d["jaccard"] for d in injected])
    caught = np.array([d["source"] not in kept for d in injected])
    bins = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0)]
    table = [{"jaccard": f"{lo:.1f}-{hi:.1f}", "copies": int(((js >= lo) & (js < hi)).sum()),
              "removed": int((caught & (js >= lo) & (js < hi)).sum())} for lo, hi in bins]
    real_removed = curator.docs_out and (len(documents) - sum(1 for s in kept if not s.startswith("copy")))

    pii_found, pii_total, decoys_kept, decoys_total = Counter(), Counter(), Counter(), Counter()
    for kind in PII_KINDS:
        for valid in ([True, False] if kind in ("ID_NUMBER", "CREDIT_CARD") else [True]):
            for _ in range(n_pii):
                secret = fake_pii(kind, rng, valid)
                doc = rng.choice(documents)["text"]
                cut = rng.choice([m.start() for m in re.finditer(r"[ \n，。]", doc)] or [len(doc)])
                text = doc[:cut] + f" {rng.choice(['contact:', '联系', 'call', 'id', 'at'])} {secret} " + doc[cut:]
                scrubbed = scrub_pii(text)[0]
                if valid:
                    pii_total[kind] += 1
                    pii_found[kind] += secret not in scrubbed and f"<{kind}>" in scrubbed
                else:
                    decoys_total[kind] += 1
                    decoys_kept[kind] += secret in scrubbed
    high, low = js >= 0.8, js <= 0.5
    return {"copies": len(injected), "table": table,
            "recall_at_0.8": float(caught[high].mean()) if high.any() else None, "n_at_0.8": int(high.sum()),
            "false_positive_at_0.5": float(caught[low].mean()) if low.any() else None, "n_at_0.5": int(low.sum()),
            "real_documents_removed": int(real_removed),
            "pii_recall": {k: (pii_found[k], pii_total[k]) for k in PII_KINDS},
            "decoys_untouched": {k: (decoys_kept[k], decoys_total[k]) for k in decoys_total}}


def _naive_minhash(normalized: str, a: list, b: list, ngram: int) -> list:
    """Reference: the textbook per-document, per-hash-function loop in pure Python."""
    xs = [zlib.crc32("".join(g).encode("utf-8")) for g in shingles(normalized, ngram)]
    mask64 = (1 << 64) - 1
    return [min(((ak * x + bk) & mask64) >> 32 for x in xs) for ak, bk in zip(a, b)]


def speed(documents: list[dict], workers: int) -> list[tuple]:
    """Rows (what, documents, seconds, documents/s) for MinHash+LSH and the full pipeline."""
    cfg = CurateConfig()
    texts = [normalize(d["text"]) for d in documents]
    rows = []
    t0 = time.perf_counter()
    sig = MinHasher(cfg.num_perm, cfg.ngram, cfg.unit, cfg.seed).signatures(texts)
    t1 = time.perf_counter()
    removed, n_candidates, _, _ = near_duplicates(sig, cfg.bands, cfg.rows, cfg.jaccard)
    t2 = time.perf_counter()
    rows += [("MinHash signatures (numpy, 1 process)", len(texts), t1 - t0),
             (f"LSH {cfg.bands}x{cfg.rows} + verify + union-find ({n_candidates:,} candidates)", len(texts), t2 - t1),
             ("MinHash + LSH total", len(texts), t2 - t0)]
    n_ref = 1000
    a, b = [int(x) for x in MinHasher(cfg.num_perm).a], [int(x) for x in MinHasher(cfg.num_perm).b]
    t3 = time.perf_counter()
    for text in texts[:n_ref]:
        _naive_minhash(text, a, b, cfg.ngram)
    rows.append(("reference: pure-Python MinHash loop", n_ref, time.perf_counter() - t3))
    n_pairs = 1000
    sets = [shingles(t, cfg.ngram) for t in texts[:n_pairs]]
    t4 = time.perf_counter()
    for i in range(n_pairs):
        for j in range(i + 1, n_pairs):
            jaccard(sets[i], sets[j])
    pairs_s = (time.perf_counter() - t4) / (n_pairs * (n_pairs - 1) / 2)
    rows.append((f"reference: exact all-pairs Jaccard (extrapolated from {n_pairs:,} docs)", len(texts),
                 pairs_s * len(texts) * (len(texts) - 1) / 2))
    for w in sorted({1, workers}):
        t5 = time.perf_counter()
        curate(documents, CurateConfig(), workers=w)
        rows.append((f"full pipeline, {w} process{'es' if w > 1 else ''}", len(texts), time.perf_counter() - t5))
    return rows


def short_documents(data_dir: Path, n: int = 100_000) -> list[dict]:
    """n short real documents: Tang poems, Shakespeare lines, then sentences of c4 and wiki."""
    docs = list(read_documents([data_dir / "tang_poems"]))
    docs += read_documents([data_dir / "tinyshakespeare" / "input.txt"], txt_docs="line")
    for d in read_documents([data_dir / "pretrain" / "c4_demo.jsonl", data_dir / "pretrain" / "wiki_demo.txt"]):
        docs += [{"text": s, "source": d["source"]} for s in re.split(r"(?<=[.!?])\s+", d["text"]) if len(s) > 20]
    return docs[:n]


def bench(data_dir: Path, workers: int = 2) -> None:
    if not data_dir.is_dir():
        raise CurateError(f"{data_dir}: shared data directory not found (pass --data)")
    print(f"# data/curate.py benchmark on {data_dir} ({os.cpu_count()} CPUs, workers={workers})\n")

    print("## Real corpora, default settings (--lang any)\n")
    rules = [r for r in RULES if r != "language"]
    print("| corpus | in | " + " | ".join(rules) + " | out | PII | seconds |")
    print("|---|" + "---:|" * (len(rules) + 4))
    everything, across = [], []
    for name, paths in _corpora(data_dir).items():
        docs = list(read_documents(paths))
        everything += docs
        t0 = time.perf_counter()
        _, report = curate(docs, CurateConfig(), workers=workers)
        pii = sum(report["pii_replaced"].values())
        print(f"| {name} | {report['documents_in']:,} | " + " | ".join(f"{report['removed'][r]:,}" for r in rules)
              + f" | {report['documents_out']:,} | {pii} | {time.perf_counter() - t0:.1f} |")
        across.append(f"{name}: " + ", ".join(f"{r} {n:,} of {report['removed'][r]:,}"
                                              for r, n in report["duplicates_across_files"].items()))
    print("\nDuplicates whose kept twin is in another file: " + "; ".join(across))

    print("\n## Language by script ratio on labelled data (alpaca instruction + input + output)\n")
    print("| data set | documents | zh | en | other |\n|---|---:|---:|---:|---:|")
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        rows = json.loads((data_dir / "sft" / name).read_text(encoding="utf-8"))
        labels = Counter(detect_language("\n".join(r.get(k, "") for k in ("instruction", "input", "output")))
                         for r in rows)
        print(f"| {name} | {len(rows):,} | {labels['zh']:,} | {labels['en']:,} | {labels['other']:,} |")

    print("\n## Synthetic check: 1,000 edited copies and PII injected into all four corpora\n")
    t0 = time.perf_counter()
    result = synthetic_check(everything, workers=workers)
    print("| exact Jaccard of the copy | copies | removed as near duplicates |\n|---|---:|---:|")
    for row in result["table"]:
        print(f"| {row['jaccard']} | {row['copies']} | {row['removed']} |")
    print(f"\nrecall at Jaccard >= 0.8: {result['recall_at_0.8']:.1%} of {result['n_at_0.8']} (target >= 95%); "
          f"false positives at Jaccard <= 0.5: {result['false_positive_at_0.5']:.1%} of {result['n_at_0.5']} "
          f"(target <= 1%); real documents removed in the same run: {result['real_documents_removed']:,}")
    print("PII recall: " + ", ".join(f"{k} {f}/{t}" for k, (f, t) in result["pii_recall"].items())
          + "; checksum-failing decoys left untouched: "
          + ", ".join(f"{k} {f}/{t}" for k, (f, t) in result["decoys_untouched"].items())
          + f" ({time.perf_counter() - t0:.1f}s)")

    docs = short_documents(data_dir)
    print(f"\n## Speed on {len(docs):,} short real documents "
          f"(mean {np.mean([len(d['text']) for d in docs]):.0f} characters)\n")
    print("| what | documents | seconds | documents/s |\n|---|---:|---:|---:|")
    for what, n, seconds in speed(docs, max(2, workers)):
        print(f"| {what} | {n:,} | {seconds:.2f} | {n / seconds:,.0f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("NANOLLM_DATA", str(Path(__file__).resolve().parent.parent.parent
                                                                          / "shared" / "data")),
                        help="the shared data directory (default: $NANOLLM_DATA or ../shared/data)")
    parser.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 1) - 1)),
                        help="analysis processes (default: CPUs - 1, at most 4)")
    args = parser.parse_args(argv)
    try:
        bench(Path(args.data), workers=args.workers)
    except (CurateError, CorpusError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
