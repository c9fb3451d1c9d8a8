"""data/curate.py: each rule on hand-made documents, PII patterns with checksums, MinHash against an
independent pure-Python implementation and the exact Jaccard, LSH against brute force, idempotence,
determinism across processes, reports, bad input, and the synthetic recall check on real data."""
import json
import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "data"))

import curate as C  # noqa: E402
from bench import curate as bench_curate  # noqa: E402  (the synthetic check and its generators)

GOOD = ("The history of the river valley is long and varied. Farmers settled there with their cattle and built "
        "small villages near the water. Over the centuries, the towns grew into markets that traded grain, wool "
        "and timber with distant cities. Today the valley is known for its orchards, its quiet roads and the old "
        "stone bridges that still carry travellers across the river to the hills beyond.")
POEM = "静夜思\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"


# ---------------------------------------------------------------------------------------------------
# quality rules, one hand-made document each

RULE_CASES = {
    "min_length": "Too short here.",
    "mean_word_length": ("I am to go to the zoo with my ma and pa. We saw an ox, a pig, a cat, a rat, a yak and a big "
                         "red hen. Pa got me a hot bun. Ma had tea. It was a fun day; we sat on a log by the sea, ate "
                         "an egg, fed a gnu, met a kid. So we go up now, as it is dim."),
    "symbol_ratio": GOOD + " #news #art #food #travel #music #film #books #sport #tech #style",
    "alpha_words": GOOD + " " + " ".join(str(1000 + i) for i in range(20)),
    "stop_words": ("Quick brown foxes jump over lazy dogs while bright yellow birds sing sweetly in tall green "
                   "trees. Children play outside, laughing loudly; neighbours wave from porches. Later, "
                   "families gather around tables covered in bread, cheese, apples, soup, warm pies. Evening "
                   "falls slowly; lamps glow softly across quiet streets until everyone sleeps. Morning brings "
                   "fresh rain, cool winds, distant bells ringing over sleepy fields."),
    "line_punctuation": "Home page and news\nAbout the company\nOur products and services\nContact the team",
    "repeated_lines": "Buy now at the best price.\nBuy now at the best price.\nBuy now at the best price.\n"
                      "Great deals today.",
    "repeated_ngrams": GOOD + " click here" * 15,
    "boilerplate": "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
}


@pytest.mark.parametrize("rule", list(RULE_CASES))
def test_each_rule_fires_on_its_document_and_only_it(rule):
    failure = C.quality_failure(RULE_CASES[rule], "en", C.DEFAULT_THRESHOLDS)
    assert failure is not None and failure[0] == rule, failure
    # switched off, the document passes that rule (and, for these documents, every other)
    assert C.quality_failure(RULE_CASES[rule], "en", C.DEFAULT_THRESHOLDS, frozenset([rule])) is None


def test_good_documents_pass_and_lengths_and_boilerplate_lines():
    assert C.quality_failure(GOOD, "en", C.DEFAULT_THRESHOLDS) is None
    assert C.quality_failure(POEM, "zh", C.DEFAULT_THRESHOLDS) is None
    assert C.quality_failure("你好。", "zh", C.DEFAULT_THRESHOLDS)[0] == "min_length"  # 3 < 10 characters
    boiler = ("We use cookies to improve the site.\nRead our privacy policy.\nTerms of use apply.\n"
              "Welcome to the shop.")
    assert C.quality_failure(boiler, "en", C.DEFAULT_THRESHOLDS)[0] == "boilerplate"
    thresholds = json.loads(json.dumps(C.DEFAULT_THRESHOLDS))  # the JSON round trip of a report's config
    thresholds["en"]["max_words"] = 50
    assert C.quality_failure(GOOD, "en", thresholds)[0] == "max_length"
    thresholds["en"]["max_words"] = None  # None switches a parameter off
    assert C.quality_failure(GOOD + " click here" * 15, "en", thresholds)[0] == "repeated_ngrams"


def test_ratio_rules_skip_short_documents():
    # a 12-word line with one 2-gram repeated: 40% of characters, but below the 50 words Gopher judged
    short = "click here click here click here for the best and the cheapest deals"
    assert C.quality_failure(short, "en", C.DEFAULT_THRESHOLDS) is None


def test_curate_keeps_exactly_the_expected_documents():
    docs = [GOOD, *RULE_CASES.values(), POEM, "Привет, как дела? Это русский текст без латиницы.", GOOD.upper()]
    kept, report = C.curate(docs, C.CurateConfig(near_dedup=False))
    assert kept == [GOOD, POEM, "Привет, как дела? Это русский текст без латиницы."]
    assert all(report["removed"][rule] == 1 for rule in RULE_CASES)
    assert report["removed"]["exact_dup"] == 1  # the upper-cased copy
    assert report["languages_in"] == {"en": len(RULE_CASES) + 2, "zh": 1, "other": 1}
    assert report["documents_in"] == len(docs) and report["documents_out"] == 3


# ---------------------------------------------------------------------------------------------------
# language

@pytest.mark.parametrize("text, lang", [
    (GOOD, "en"), (POEM, "zh"),
    ("写一个Python函数，计算两个整数的最小公倍数。\n```python\ndef lcm(x, y):\n    return x * y // gcd(x, y)\n```", "zh"),
    ("The word 你好 means hello in Chinese, and people use it every day.", "en"),
    ("ここは日本語の文章です。漢字も少し含まれています。", "other"),
    ("Это русский текст.", "other"), ("12345 !!!", "other")])
def test_detect_language(text, lang):
    assert C.detect_language(text) == lang


def test_lang_selection_keeps_one_language():
    russian = "Это русский текст, довольно длинный для проверки."
    kept, report = C.curate([GOOD, POEM, russian], C.CurateConfig(lang="zh"))
    assert kept == [POEM] and report["removed"]["language"] == 2
    kept, _ = C.curate([GOOD, POEM], C.CurateConfig(lang="en"))
    assert kept == [GOOD]


# ---------------------------------------------------------------------------------------------------
# PII

@pytest.mark.parametrize("text, expected", [
    ("mail john.doe@example.co.uk.", "mail <EMAIL>."),
    ("联系john@x.com谢谢", "联系<EMAIL>谢谢"),
    ("call +44 20 7946 0958 or +1 (415) 555-0132!", "call <PHONE> or <PHONE>!"),
    ("手机13812345678，或者 138-1234-5678", "手机<PHONE>，或者 <PHONE>"),
    ("(415) 555-0132 and 415-555-0132", "<PHONE> and <PHONE>"),
    ("call 555-0132 today", "call <PHONE> today"),
    ("server 192.168.1.100. and 10.0.0.1", "server <IP_ADDRESS>. and <IP_ADDRESS>"),
    ("card 4111 1111 1111 1111, 4111-1111-1111-1111, 4111111111111111",
     "card <CREDIT_CARD>, <CREDIT_CARD>, <CREDIT_CARD>"),
    ("amex 3782 822463 10005", "amex <CREDIT_CARD>"),
    ("身份证11010519491231002X。", "身份证<ID_NUMBER>。"),
    # checksum failures and look-alikes stay as they are
    ("bad card 4111 1111 1111 1112 stays", None),
    ("bad ID 110105194912310021 stays", None),
    ("bad date 110105194902301234 stays", None),
    ("not an IP 256.1.1.1 nor 1.2.3.4.5", None),
    ("years 2020 2021 2022 and 12345678, price 1,234,567, ISBN 978-3-16-148410-0, v1.2.3, pi 3.14159", None),
    ("v1.2.3.4, version 10.0.0.1, Release 2.4.0.1, 1999-2004, 2019-2020, 123.4567, 55-1234", None),
])
def test_pii_patterns(text, expected):
    assert C.scrub_pii(text)[0] == (text if expected is None else expected)


def test_checksums_against_known_values():
    assert C.luhn_valid("4111111111111111") and C.luhn_valid("378282246310005") and not C.luhn_valid("4111111111111112")
    assert C.cn_id_check_digit("11010519491231002") == "X"  # the example of GB 11643-1999
    assert C.cn_id_valid("11010519491231002X") and not C.cn_id_valid("110105194912310021")
    rng = random.Random(0)
    for kind in C.PII_KINDS:  # every generated string is scrubbed as its own kind, decoys are not
        for _ in range(20):
            secret = bench_curate.fake_pii(kind, rng)
            text, counts, found = C.scrub_pii(f"see {secret} now")
            assert text == f"see <{kind}> now" and counts == Counter({kind: 1}) and found == [(kind, secret)]
    for kind in ("ID_NUMBER", "CREDIT_CARD"):
        for _ in range(50):
            decoy = bench_curate.fake_pii(kind, rng, valid=False)
            assert C.scrub_pii(f"see {decoy} now")[0] == f"see {decoy} now"


# ---------------------------------------------------------------------------------------------------
# exact and near duplicates

def test_exact_dedup_normalises_case_space_and_nfkc():
    docs = ["Hello World. This is a test document.", "hello   world.\nTHIS is a test document.",
            "Ｈｅｌｌｏ World. This is a test document.", "Hello World. This is another document."]
    kept, report = C.curate(docs, C.CurateConfig(near_dedup=False))
    assert kept == [docs[0], docs[3]] and report["removed"]["exact_dup"] == 2


def _reference_signature(text: str, hasher: C.MinHasher) -> list[int]:
    """MinHash of one text straight from the definition, in Python integers."""
    n, m64 = hasher.ngram, (1 << 64) - 1
    text = text + "\0" * (n - len(text)) if len(text) < n else text
    xs = set()
    for i in range(len(text) - n + 1):
        h = 0
        for ch in text[i:i + n]:
            h = (h * int(C._POLY) + ord(ch)) & m64
        xs.add(((h * int(C._MIX)) & m64) >> 32)
    return [min(((int(a) * x + int(b)) & m64) >> 32 for x in xs) for a, b in zip(hasher.a, hasher.b)]


def test_minhash_matches_a_pure_python_reference():
    texts = ["abc", "", "hello world, hello world", POEM, GOOD, "x" * 40, "αβγδε ζηθ"]
    hasher = C.MinHasher(num_perm=16, ngram=5, seed=3, chunk=7)  # chunks that split documents
    sig = hasher.signatures(texts)
    assert sig.shape == (len(texts), 16) and sig.dtype == np.uint32
    for text, row in zip(texts, sig):
        assert row.tolist() == _reference_signature(text, hasher)


@pytest.mark.parametrize("unit", ["char", "word"])
def test_minhash_estimate_within_tolerance_of_exact_jaccard(unit):
    rng = random.Random(1)
    words = GOOD.lower().split()
    base = " ".join(words * 3)
    num_perm = 512
    hasher = C.MinHasher(num_perm=num_perm, ngram=3 if unit == "word" else 5, unit=unit, seed=0)
    for n_edits in (2, 8, 20, 60):
        edited = words * 3
        for i in rng.sample(range(len(edited)), n_edits):
            edited[i] = "zz" + edited[i][::-1]
        other = " ".join(edited)
        exact = C.jaccard(C.shingles(base, hasher.ngram, unit), C.shingles(other, hasher.ngram, unit))
        sig = hasher.signatures([base, other])
        est = float((sig[0] == sig[1]).mean())
        assert abs(est - exact) <= 4 * math.sqrt(exact * (1 - exact) / num_perm) + 0.01, (n_edits, est, exact)


def test_lsh_candidates_equal_brute_force():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2, size=(80, 12), dtype=np.uint32)  # tiny alphabet: many shared bands
    bands, rows = 4, 3
    got = {tuple(p) for p in C.lsh_candidates(sig, bands, rows, max_bucket=10_000).tolist()}
    want = {(i, j) for i in range(80) for j in range(i + 1, 80)
            if any((sig[i, b * rows:(b + 1) * rows] == sig[j, b * rows:(b + 1) * rows]).all() for b in range(bands))}
    assert got == want


def test_near_duplicates_removed_and_dissimilar_kept():
    rng = random.Random(0)
    base = C.normalize(GOOD * 2)
    close, j_close = bench_curate.edited_copy(base, 0.85, rng)
    far, j_far = bench_curate.edited_copy(base, 0.35, rng)
    assert 0.8 <= j_close <= 0.9 and 0.3 <= j_far <= 0.4
    kept, report = C.curate([base, close, far, POEM], C.CurateConfig(disabled=tuple(C.QUALITY_RULES)))
    assert kept == [base, far, POEM] and report["removed"]["near_dup"] == 1
    check = report["near_dup"]["jaccard_check"]
    assert check["pairs"] == 1 and abs(check["sample"][0]["exact"] - j_close) < 1e-3
    assert abs(check["sample"][0]["estimated"] - j_close) < 0.15


def test_near_dup_clusters_keep_their_earliest_document():
    removed, _, verified, _ = C.near_duplicates(np.array([[1, 2, 3, 4]] * 3 + [[5, 6, 7, 8]], dtype=np.uint32),
                                                bands=2, rows=2, threshold=0.7)
    assert sorted(removed) == [1, 2] and all(root == 0 for root, _, _ in removed.values())
    assert verified.tolist() == [[0, 1], [0, 2], [1, 2]]


# ---------------------------------------------------------------------------------------------------
# reading, reports, bad input

def test_reader_formats(tmp_path):
    (tmp_path / "lines.txt").write_text("first doc\n\nsecond doc\nthird doc\n", encoding="utf-8")
    (tmp_path / "flat.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"text": "b", "id": 2}\n', encoding="utf-8")
    (tmp_path / "t.json").write_text(json.dumps([{"title": "静夜思", "paragraphs": ["床前明月光，", "疑是地上霜。"]}]),
                                     encoding="utf-8")
    (tmp_path / "s.json").write_text(json.dumps({"title": "唐诗三百首", "content": [{"type": "五言绝句", "content": [
        {"chapter": "登鹳雀楼", "paragraphs": ["白日依山尽，黄河入海流。"]}]}]}), encoding="utf-8")
    read = lambda *a, **k: [(d["text"], d["source"]) for d in C.read_documents(*a, **k)]  # noqa: E731
    assert read(tmp_path / "lines.txt") == [("first doc", "lines.txt:1"), ("second doc\nthird doc", "lines.txt:3")]
    assert read(tmp_path / "lines.txt", txt_docs="line")[1] == ("second doc", "lines.txt:3")
    assert read(tmp_path / "flat.txt") == [("one", "flat.txt:1"), ("two", "flat.txt:2")]
    assert read(tmp_path / "flat.txt", txt_docs="file") == [("one\ntwo\n", "flat.txt:1")]
    assert read(tmp_path / "d.jsonl") == [("a", "d.jsonl:1"), ("b", "d.jsonl:3")]
    assert read(tmp_path / "t.json") == [("静夜思\n床前明月光，\n疑是地上霜。", "t.json#1")]
    assert read(tmp_path / "s.json") == [("登鹳雀楼\n白日依山尽，黄河入海流。", "s.json#1")]
    assert [s for _, s in read(tmp_path)] == ["s.json#1", "t.json#1", "d.jsonl:1", "d.jsonl:3", "flat.txt:1",
                                              "flat.txt:2", "lines.txt:1", "lines.txt:3"]


def test_bad_input_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(C.CorpusError, match=r"bad\.jsonl:2: .*skip-bad-lines"):
        list(C.read_documents(bad))
    counts = Counter()
    assert [d["text"] for d in C.read_documents(bad, skip_bad_lines=True, bad_lines=counts)] == ["ok"]
    assert counts == {str(bad): 2}
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(C.CorpusError, match=r"latin1\.txt: not UTF-8 text \(byte 3"):
        list(C.read_documents(tmp_path / "latin1.txt"))
    with pytest.raises(C.CorpusError, match="missing.txt: no such file"):
        list(C.read_documents(tmp_path / "missing.txt"))
    (tmp_path / "broken.json").write_text('[{"title": "x",\n "paragraphs": [}', encoding="utf-8")
    with pytest.raises(C.CorpusError, match=r"broken\.json:2: not valid JSON"):
        list(C.read_documents(tmp_path / "broken.json"))
    (tmp_path / "empty.json").write_text('[{"title": "x"}]', encoding="utf-8")
    with pytest.raises(C.CorpusError, match="no poems"):
        list(C.read_documents(tmp_path / "empty.json"))
    for bad_config, message in [(dict(lang="fr"), "lang must be"), (dict(disabled=("nope",)), "unknown rule"),
                                (dict(bands=20, rows=7), "exceeds num_perm"), (dict(jaccard=1.5), "jaccard must")]:
        with pytest.raises(C.CurateError, match=message):
            C.CurateConfig(**bad_config).validate()
    with pytest.raises(C.CurateError, match="unknown language or parameter"):
        C.CurateConfig().set_threshold("en.min_wrds=3")
    result = subprocess.run([sys.executable, str(REPO / "data" / "curate.py"), "--source", str(bad), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {bad}:2: Expecting value: line 1 column 1 (char 0) "
                                     "(use --skip-bad-lines to skip such lines)")


def test_curate_files_writes_output_and_consistent_reports(tmp_path):
    src = tmp_path / "in.jsonl"
    docs = [GOOD, GOOD.lower(), *RULE_CASES.values(), POEM, "Write to jane@example.org about the meeting next week."]
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    cfg = C.CurateConfig()
    cfg.set_threshold("en.min_words=3")  # "Too short here." now passes the length rule
    report = C.curate_files([src], tmp_path / "out", cfg, progress=False)
    out = [json.loads(line) for line in (tmp_path / "out" / "curated.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [d["text"] for d in out] == [GOOD, "Too short here.", POEM, "Write to <EMAIL> about the meeting next week."]
    assert [d["source"] for d in out] == ["in.jsonl:1", "in.jsonl:3", "in.jsonl:12", "in.jsonl:13"]
    assert report["documents_in"] == len(docs) == report["documents_out"] + sum(report["removed"].values())
    assert report["pii_replaced"]["EMAIL"] == 1 and report["removed"]["exact_dup"] == 1
    assert json.loads((tmp_path / "out" / "curation_report.json").read_text(encoding="utf-8")) == report
    md = (tmp_path / "out" / "curation_report.md").read_text(encoding="utf-8")
    assert "| removed by `repeated_ngrams` | 1 | 7.69% |" in md and "ja**@*******.*rg" in md
    assert all(len(examples) <= 3 for examples in report["examples"].values())
    assert not (tmp_path / "out" / ".curate_spool.jsonl").exists()
    again = C.curate_files([tmp_path / "out" / "curated.jsonl"], tmp_path / "again", cfg, progress=False)
    assert again["documents_out"] == again["documents_in"] == len(out)
    assert (tmp_path / "again" / "curated.jsonl").read_text(encoding="utf-8").count("<EMAIL>") == 1


def test_cli_help():
    result = subprocess.run([sys.executable, str(REPO / "data" / "curate.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--jaccard" in result.stdout and "near_dup" in result.stdout


# ---------------------------------------------------------------------------------------------------
# real data: idempotence, determinism across processes, the synthetic recall check

@pytest.fixture(scope="module")
def real_docs(data_dir):
    docs = list(C.read_documents([data_dir / "pretrain" / "c4_demo.jsonl",
                                  data_dir / "tang_poems" / "poet.tang.12000.json",
                                  data_dir / "tang_poems" / "poet.tang.40000.json"]))
    rng = random.Random(0)
    for k in range(30):  # PII and near copies, so that every stage has something to do
        doc = rng.choice(docs)
        docs.append({"text": f"{doc['text']} Contact {bench_curate.fake_pii(rng.choice(C.PII_KINDS), rng)} today.",
                     "source": f"pii{k}"})
    return docs


def test_curating_curated_output_removes_nothing_more(real_docs):
    kept, report = C.curate(real_docs)
    assert sum(report["removed"].values()) > 100 and sum(report["pii_replaced"].values()) >= 10
    assert report["removed"]["exact_dup"] > 0 and report["removed"]["near_dup"] > 0
    again, report2 = C.curate(kept)
    assert again == kept
    assert sum(report2["removed"].values()) == 0 and sum(report2["pii_replaced"].values()) == 0


def test_two_processes_give_the_same_result(real_docs):
    docs = real_docs[:400] + real_docs[-100:]  # c4, some poems, the PII copies
    kept1, report1 = C.curate(docs, workers=1)
    kept2, report2 = C.curate(docs, workers=2)
    del report1["seconds"], report2["seconds"]
    assert kept1 == kept2 and report1 == report2


def test_synthetic_near_duplicates_and_pii_recall(data_dir):
    docs = list(C.read_documents([data_dir / "pretrain" / "c4_demo.jsonl", data_dir / "pretrain" / "wiki_demo.txt",
                                  data_dir / "tang_poems" / "poet.tang.0.json"]))
    result = bench_curate.synthetic_check(docs, n_dups=300, n_pii=30)
    assert result["n_at_0.8"] >= 50 and result["n_at_0.5"] >= 50
    assert result["recall_at_0.8"] >= 0.95 and result["false_positive_at_0.5"] <= 0.01
    assert all(found == total for found, total in result["pii_recall"].values())
    assert all(kept == total for kept, total in result["decoys_untouched"].values())


def test_duplicates_across_files_are_counted(tmp_path):
    (tmp_path / "a.txt").write_text(f"{GOOD}\n{POEM.replace(chr(10), ' ')}\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text(f"{GOOD.upper()}\nA different line that is long enough to keep.\n"
                                    f"a different line that is long enough to keep.\n", encoding="utf-8")
    report = C.curate_files([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", progress=False)
    assert report["removed"]["exact_dup"] == 2 and report["duplicates_across_files"]["exact_dup"] == 1
