"""Tests for bpe.py: ids identical to tiktoken (built offline by tiktoken's own loaders from the same
files) on real corpora and random strings, special-token semantics, the incremental trainer against
a naive recount-everything trainer, hand-computed merges, formats, errors and the CLI."""
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public as openai_public

import bpe
import tokenizer_io
from bpe import Tokenizer

REPO = Path(__file__).resolve().parent.parent
TANG_FILES = ["poet.tang.0.json", "poet.tang.10000.json", "poet.tang.20000.json",
              "poet.tang.30000.json", "poet.tang.57000.json"]


# ---- oracles: tiktoken's own constructors, pointed at the local files ---------------------------

@pytest.fixture(scope="module")
def cl100k_pair(data_dir):
    """(bpe.py tokenizer, tiktoken.Encoding) for cl100k_base."""
    path = str(data_dir / "tokenizers" / "cl100k_base.tiktoken")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache keyed by path: read the file itself
        # cl100k_base() would download; load the same bytes locally, checking tiktoken's expected hash
        mp.setattr(openai_public, "load_tiktoken_bpe",
                   lambda url, expected_hash: tiktoken.load.load_tiktoken_bpe(path, expected_hash))
        oracle = tiktoken.Encoding(**openai_public.cl100k_base())
    ours = Tokenizer.from_tiktoken(path, "cl100k", bpe.CL100K_SPECIAL_TOKENS)
    return ours, oracle


@pytest.fixture(scope="module")
def gpt2_pair(data_dir, tmp_path_factory):
    """(bpe.py tokenizer via from_hf, tiktoken.Encoding built by tiktoken's GPT-2 loader)."""
    path = data_dir / "tokenizers" / "gpt2_tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    # write the tokenizer.json back out as GPT-2's original encoder.json + vocab.bpe
    folder = tmp_path_factory.mktemp("gpt2")
    (folder / "encoder.json").write_text(json.dumps(spec["model"]["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    real_loader = tiktoken.load.data_gym_to_mergeable_bpe_ranks
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        mp.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda **kw: real_loader(
            str(folder / "vocab.bpe"), str(folder / "encoder.json")))
        oracle = tiktoken.Encoding(**openai_public.gpt2())
    return Tokenizer.from_hf(path), oracle


@pytest.fixture(params=["cl100k", "gpt2"])
def pair(request):
    return request.getfixturevalue(f"{request.param}_pair")


# ---- test texts --------------------------------------------------------------------------------

def _strings_in(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings_in(item)


def sft_texts(data_dir):
    texts = []
    for path in sorted((data_dir / "sft").iterdir()):
        if path.suffix == ".json":
            texts += _strings_in(json.loads(path.read_text(encoding="utf-8")))
        elif path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                texts += _strings_in(json.loads(line))
    return [t for t in texts if t]


PIECES = [
    # whitespace runs, line endings, unusual spaces
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", " \n", "   \n ", "\u00a0", "\u3000", "\x0b", "\x0c",
    "\x1c", "\u2028", "\u0085", "\u200b",
    # digits and other numbers
    "0", "7", "42", "2024", "1234567", "3.14159", "١٢٣", "½", "Ⅻ", "²",
    # letters in many scripts, contractions
    "hello", "World", "THE", "café", "naïve", "Straße", "ÆØÅ", "привет", "Ωμέγα", "你好", "世界和平",
    "カタカナ", "한국어", "مرحبا", "नमस्ते", "ภาษาไทย", "'s", "'t", "'LL", "'Ve", "’s", "don't",
    # combining marks
    "e\u0301", "a\u0308\u0304", "\u0301", "Z\u0351\u036b\u0343",
    # emoji and other astral characters
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇺🇸", "𝔘𝔫𝔦", "𠀀𠀁", "\U0001f600\U0001f600",
    # punctuation, code, fragments of special tokens
    ".", "...", "!!", "?", "—", "«»", "{{", "}}", "\\", '"', "@#$%", "<|", "|>", "<", "|", "def f(x):",
]
SPECIAL_TEXTS = ["<|endoftext|>", "<|fim_prefix|>", "<|endofprompt|>", "<s>", "</s>", "<|im_start|>",
                 "<|im_end|>", "<|pad|>"]


def random_strings(n, seed, with_specials=False):
    rng = random.Random(seed)
    pieces = PIECES + SPECIAL_TEXTS if with_specials else PIECES
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(n)]


# ---- exactness against tiktoken ------------------------------------------------------------------

def test_real_corpora_match_tiktoken(pair, data_dir):
    ours, oracle = pair
    shakespeare = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    tang = ["\n".join(bpe.iter_documents(data_dir / "tang_poems" / f)) for f in TANG_FILES]
    assert len(shakespeare) > 1_000_000 and sum(map(len, tang)) > 300_000
    for text in [shakespeare, *tang]:
        ids = ours.encode(text)
        assert ids == oracle.encode(text)
        assert ours.decode(ids) == text
    sft = sft_texts(data_dir)
    assert len(sft) > 4000
    ids = [ours.encode(t) for t in sft]
    assert ids == [oracle.encode(t) for t in sft]
    assert [ours.decode(i) for i in ids] == sft


def test_random_strings_match_tiktoken(pair):
    ours, oracle = pair
    for text in random_strings(3000, seed=1):
        ids = ours.encode_ordinary(text)
        assert ids == oracle.encode_ordinary(text), repr(text)
        assert ours.decode(ids) == text


def test_special_token_semantics_match_tiktoken(pair):
    ours, oracle = pair
    names = sorted(ours.special_tokens)
    assert names == sorted(oracle.special_tokens_set)
    raised = Counter()
    for text in random_strings(600, seed=2, with_specials=True):
        for kwargs in [dict(), dict(allowed_special="all"), dict(disallowed_special=()),
                       dict(allowed_special={names[0]}, disallowed_special=()),
                       dict(allowed_special={names[0]}), dict(disallowed_special={names[-1]})]:
            try:
                expected = oracle.encode(text, **kwargs)
            except ValueError:
                raised[str(kwargs)] += 1
                with pytest.raises(ValueError, match="special token"):
                    ours.encode(text, **kwargs)
            else:
                ids = ours.encode(text, **kwargs)
                assert ids == expected, (text, kwargs)
                assert ours.decode(ids) == text
    assert raised["{}"] > 50  # the random strings did spell special tokens


def test_lone_surrogates_fixed_up_like_tiktoken(cl100k_pair):
    ours, oracle = cl100k_pair
    for text in ["a\ud800b", "\ud83d\ude00 pair", "x \udfff", "<|endoftext|>\ud800"]:
        assert ours.encode(text, allowed_special="all") == oracle.encode(text, allowed_special="all")
        assert ours.encode_ordinary(text) == oracle.encode_ordinary(text)


def test_decode_partial_utf8_and_bad_ids(cl100k_pair):
    ours, oracle = cl100k_pair
    ids = ours.encode("世界和平🇺🇸")
    assert len(ids) > 4
    for cut in range(len(ids) + 1):
        assert ours.decode(ids[:cut]) == oracle.decode(ids[:cut])
    assert "\ufffd" in ours.decode(ids[:1])
    assert ours.decode_bytes(ids) == "世界和平🇺🇸".encode()
    assert ours.decode([100257]) == "<|endoftext|>"
    assert ours.vocab_size == oracle.n_vocab == 100277
    for bad in [100261, 100277, -1, "7", 1.5]:
        with pytest.raises(ValueError, match="position 1"):
            ours.decode([0, bad])


def test_trained_tokenizer_matches_its_tiktoken_export(data_dir):
    shakespeare = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    tang = list(bpe.iter_documents(data_dir / "tang_poems" / "poet.tang.0.json"))
    texts = [shakespeare[:200_000], *tang] + random_strings(300, seed=3)
    for pattern in ["cl100k", "r50k"]:
        tok = Tokenizer.train(texts, 1500, pattern=pattern)
        assert tok.vocab_size == 1500
        assert [tok.special_tokens[s] for s in bpe.DEFAULT_SPECIAL_TOKENS] == list(range(1494, 1500))
        fast = tok.to_tiktoken()
        probe = [shakespeare[-50_000:], "\n".join(tang[-50:])] + random_strings(500, seed=4, with_specials=True)
        for text in probe:
            ids = tok.encode(text, allowed_special="all")
            assert ids == fast.encode(text, allowed_special="all")
            assert tok.decode(ids) == text
            assert tok.encode_ordinary(text) == fast.encode_ordinary(text)


# ---- training --------------------------------------------------------------------------------

def test_train_hand_computed_merges():
    # aaabdaaabac: aa (count 4, overlaps counted), then ab beats Za on the tie (count 2; smaller
    # pair (97, 98) < (256, 97)), then (aa, ab) -> aaab (count 2), as in the Wikipedia example
    tok = Tokenizer.train("aaabdaaabac", 256 + 3, special_tokens=())
    merged = sorted((rank, token) for token, rank in tok.ranks.items() if rank >= 256)
    assert merged == [(256, b"aa"), (257, b"ab"), (258, b"aaab")]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    # overlapping pairs are merged left to right: aaaa -> (aa)(aa) -> (aaaa)
    tok = Tokenizer.train(["aaaa"], 256 + 2, special_tokens=())
    assert sorted(tok.ranks, key=tok.ranks.get)[256:] == [b"aa", b"aaaa"]
    assert tok.encode("aaaa") == [257]
    # aaaaa -> (aa)(aa)a, whose pairs (aa, aa) and (aa, a) tie at 1: the smaller pair (256, 97) wins
    tok = Tokenizer.train(["aaaaa"], 256 + 2, special_tokens=())
    assert sorted(tok.ranks, key=tok.ranks.get)[256:] == [b"aa", b"aaa"]
    assert tok.encode("aaaaa") == [256, 257]


def test_incremental_trainer_equals_naive_trainer(data_dir):
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:15_000]
    text += (data_dir / "sft" / "alpaca_zh_demo.json").read_text(encoding="utf-8")[:3_000]
    rng = random.Random(5)  # long runs over a tiny alphabet: overlapping pairs (a a a)
    text += " ".join("".join(rng.choice("aab") for _ in range(rng.randint(1, 12))) for _ in range(1000))
    chunk_counts = Counter(regex.findall(bpe.PATTERNS["cl100k"], text))
    byte_counts = {chunk.encode(): n for chunk, n in chunk_counts.items()}
    learned = bpe.learn_merges(byte_counts, 300)
    assert learned == bpe.naive_merges(byte_counts, 300)
    assert len(set(learned)) == len(learned)  # every merge makes a new token


def test_train_streams_documents_and_handles_specials():
    docs = (f"doc {i}: the cat sat on the mat<|endoftext|>" for i in range(200))  # a generator
    tok = Tokenizer.train(docs, 300)
    assert tok.vocab_size == 300
    # text spelling a special token is cut out before counting, so no merge learns a piece of it
    assert not any(b"|>" in token or b"<|" in token for token in tok.ranks)
    assert tok.special_tokens["<|pad|>"] not in {tok.special_tokens[s] for s in ("<|endoftext|>", "</s>", "<|im_end|>")}
    ids = tok.encode("the cat<|im_end|>", allowed_special={"<|im_end|>"})
    assert ids[-1] == tok.special_tokens["<|im_end|>"] and tok.decode(ids) == "the cat<|im_end|>"


def test_train_errors():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train("abc", 256 + 5)  # 6 default specials
    with pytest.raises(ValueError, match="duplicate special"):
        Tokenizer.train("abc", 300, special_tokens=["<s>", "<s>"])
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train(["", ""], 300)
    with pytest.raises(TypeError, match="document 2"):
        Tokenizer.train(["ok", b"bytes"], 300)
    with pytest.raises(TypeError, match="names only"):
        Tokenizer.train("abc", 300, special_tokens={"<s>": 299})


def test_constructor_rejects_colliding_specials_and_partial_byte_sets():
    ranks = {bytes([i]): i for i in range(256)}
    with pytest.raises(ValueError, match="already the id"):
        Tokenizer(ranks, special_tokens={"<s>": 65})
    with pytest.raises(ValueError, match="already the id"):
        Tokenizer(ranks, special_tokens={"<s>": 256, "</s>": 256})
    with pytest.raises(ValueError, match="single-byte"):
        Tokenizer({bytes([i]): i for i in range(255)})
    with pytest.raises(ValueError, match="not special tokens"):
        Tokenizer(ranks, special_tokens={"<s>": 256}).encode("x", allowed_special={"<pad>"})



def test_smollm_pattern_splits_like_hugging_face_digits_then_byte_level():
    """One regex for SmolLM's two-step pre-tokenizer (each digit alone, then GPT-2's regex between digits),
    against Hugging Face's own steps; whitespace runs before digits are where a naive merge differs."""
    from tokenizers import pre_tokenizers
    steps = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    to_unicode = tokenizer_io.bytes_to_unicode()
    split = regex.compile(bpe.PATTERNS["smollm"]).findall
    texts = ["  123 4567", "a  1  b   22\n\n 3", "x 1.5 , 2", *random_strings(2000, seed=3)]
    for text in texts:
        ours = ["".join(to_unicode[b] for b in chunk.encode("utf-8")) for chunk in split(text)]
        assert ours == [piece for piece, _ in steps.pre_tokenize_str(text)], repr(text)


def test_qwen2_pattern_is_qwen2s():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    assert bpe.PATTERNS["qwen2"] == PRETOKENIZE_REGEX


def test_missing_bytes_dropped_as_llama_cpp_and_hugging_face_do():
    """A vocabulary without byte 4 but with "!!": llama.cpp keeps the byte between the two "!" (so they
    cannot merge) and drops it after merging; Hugging Face's BPE drops it first, so "!!" merges."""
    ranks = {bytes([i]): i for i in range(256) if i != 4}
    ranks[b"!!"] = 256
    with pytest.raises(ValueError, match="lacks 1 single-byte"):
        Tokenizer(ranks)
    separate = Tokenizer(ranks, "r50k", missing_bytes="separate")
    skip = Tokenizer(ranks, "r50k", missing_bytes="skip")
    assert separate.encode("!\x04!") == [33, 33] and skip.encode("!\x04!") == [256]
    assert separate.encode("\x04") == skip.encode("\x04") == []
    assert separate.encode("!!a") == skip.encode("!!a") == [256, 97]
    fast = separate.to_tiktoken().encode_ordinary("!\x04!\x04")  # the byte's placeholder id, then dropped
    assert fast == [33, separate.vocab_size, 33, separate.vocab_size]
    with pytest.raises(ValueError, match="tiktoken cannot skip"):
        skip.to_tiktoken()


def test_prepared_data_drops_the_placeholders_of_missing_bytes():
    """data/prepare.py tokenizes with tiktoken, which returns a missing byte's placeholder id (beyond the
    vocabulary, where an embedding lookup would fail): the stream holds Tokenizer.encode's ids instead."""
    from data.corpus import EOT, tokenize
    ranks = {bytes([i]): i for i in range(256) if i != 4}
    ranks[b"!!"] = 256
    tokenizer = Tokenizer(ranks, "r50k", special_tokens={EOT: 257}, missing_bytes="separate")
    docs = ["!\x04!", "a\x04b!!"]
    stream = tokenize(docs, tokenizer, "txt", "test")
    assert stream.tolist() == tokenizer.encode(docs[0]) + [257] + tokenizer.encode(docs[1]) + [257]
    assert stream.max() < tokenizer.vocab_size


# ---- formats, batch, corpus reader, CLI --------------------------------------------------------

def test_save_load_roundtrip_and_tiktoken_format(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    tok = Tokenizer.train(["hello world, hello tokenizer 你好世界"] * 3, 280)
    meta = tok.save(tmp_path / "tok")
    assert meta == tmp_path / "tok.json"
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tok.tiktoken")) == tok.ranks
    for path in [tmp_path / "tok", meta]:
        loaded = Tokenizer.load(path)
        assert (loaded.ranks, loaded.special_tokens, loaded.pattern) == (tok.ranks, tok.special_tokens, tok.pattern)
        text = "hello 你好 <|im_end|>"
        assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_corrupt_files_name_file_and_line(tmp_path):
    lines = ["IQ== 0", "Ig== 1", "not*base64 2", "Iw== 3"]
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:3:"):
        Tokenizer.from_tiktoken(bad)
    bad.write_text("IQ== 0\nIQ== 1\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:2: duplicate token"):
        Tokenizer.from_tiktoken(bad)
    meta = tmp_path / "tok.json"
    meta.write_text('{"format": "nanollm-bpe", "pattern": "cl100k"}')
    with pytest.raises(ValueError, match="special_tokens"):
        Tokenizer.load(meta)
    meta.write_text('{"format": ')
    with pytest.raises(ValueError, match=r"tok\.json:1: not valid JSON"):
        Tokenizer.load(meta)
    hf = tmp_path / "hf.json"
    hf.write_text('{"model": {"type": "Unigram", "vocab": []}}')
    with pytest.raises(ValueError, match="not a BPE"):
        Tokenizer.from_hf(hf)


def test_from_hf_pre_tokenizer_variants(data_dir, tmp_path, gpt2_pair):
    spec = json.loads((data_dir / "tokenizers" / "gpt2_tokenizer.json").read_text(encoding="utf-8"))
    # Llama-3 style: an isolating Split regex, then ByteLevel without its own regex
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": bpe.PATTERNS["cl100k"]}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    tok = Tokenizer.from_hf(path)
    gpt2_ranks = gpt2_pair[1]._mergeable_ranks
    oracle = tiktoken.Encoding("x", pat_str=bpe.PATTERNS["cl100k"], mergeable_ranks=gpt2_ranks,
                               special_tokens={"<|endoftext|>": 50256})
    for text in random_strings(200, seed=7):
        assert tok.encode_ordinary(text) == oracle.encode_ordinary(text)
    # SmolLM's single digits then ByteLevel: its own pattern; digit runs kept together: refused, not approximated
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False}]}
    path.write_text(json.dumps(spec), encoding="utf-8")
    assert Tokenizer.from_hf(path).pattern == bpe.PATTERNS["smollm"]
    spec["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False
    path.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match=r"split\.json: unsupported pre_tokenizer steps \['Digits', 'ByteLevel'\]"):
        Tokenizer.from_hf(path)


def test_encode_batch_in_processes_equals_encode(cl100k_pair):
    ours, _ = cl100k_pair
    texts = random_strings(40, seed=6, with_specials=True)
    expected = [ours.encode(t, allowed_special="all") for t in texts]
    assert ours.encode_batch(texts, allowed_special="all", num_workers=2) == expected
    assert ours.encode_batch(texts, allowed_special="all") == expected
    with pytest.raises(ValueError, match="special token"):
        ours.encode_batch(texts, num_workers=2)


def test_iter_documents_formats(tmp_path, data_dir):
    (tmp_path / "a.txt").write_text("line one\nline two\n", encoding="utf-8")
    assert list(bpe.iter_documents(tmp_path / "a.txt")) == ["line one\nline two\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "二"}\n', encoding="utf-8")
    assert list(bpe.iter_documents(tmp_path / "b.jsonl")) == ["first", "二"]
    poems = [{"author": "a", "title": "题", "paragraphs": ["一行，", "二行。"]}]
    (tmp_path / "c.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    assert list(bpe.iter_documents(tmp_path / "c.json")) == ["题\n一行，\n二行。"]
    tang = list(bpe.iter_documents(data_dir / "tang_poems" / "poet.tang.0.json"))
    first = json.loads((data_dir / "tang_poems" / "poet.tang.0.json").read_text(encoding="utf-8"))[0]
    assert len(tang) == 1000 and tang[0] == "\n".join([first["title"], *first["paragraphs"]])
    nested = list(bpe.iter_documents(data_dir / "tang_poems" / "tangshisanbaishou.json"))
    assert nested[0] == "行宫\n寥落古行宫，宫花寂寞红。\n白头宫女在，闲坐说玄宗。"

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'text'"):
        list(bpe.iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "bad2.jsonl").write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad2\.jsonl:2:"):
        list(bpe.iter_documents(tmp_path / "bad2.jsonl"))
    (tmp_path / "d.json").write_text('[{"instruction": "x"}]', encoding="utf-8")
    with pytest.raises(ValueError, match="no poems"):
        list(bpe.iter_documents(tmp_path / "d.json"))
    with pytest.raises(ValueError, match="no such file"):
        list(bpe.iter_documents(tmp_path / "missing.txt"))


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, str(REPO / "bpe.py"), *map(str, args)], input=stdin,
                          capture_output=True, text=True, cwd=REPO)


def test_cli_train_encode_decode(tmp_path, data_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20_000])
    tang = data_dir / "tang_poems" / "poet.tang.0.json"
    out = tmp_path / "tok"
    result = run_cli("train", "--input", corpus, tang, "--vocab-size", 600, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "merges/s" in result.stderr and (tmp_path / "tok.tiktoken").exists()
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 600
    text = "To be, or not to be 白日依山尽<|endoftext|>"
    result = run_cli("encode", "--tokenizer", out, "--text", text, "--allowed-special", "all")
    ids = [int(i) for i in result.stdout.split()]
    assert ids == tok.encode(text, allowed_special="all")
    result = run_cli("decode", "--tokenizer", out, stdin=result.stdout)
    assert result.stdout == text
    result = run_cli("encode", "--tokenizer", out, "--text", text)  # special text not allowed
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("decode", "--tokenizer", out, 5, 600)
    assert result.returncode == 2 and "id 600" in result.stderr
    result = run_cli("train", "--input", corpus, "--vocab-size", 100, "--out", out)
    assert result.returncode == 2 and "too small" in result.stderr
    for command in ["train", "encode", "decode"]:
        assert "usage" in run_cli(command, "--help").stdout


def test_cli_reads_tiktoken_and_hf_files(data_dir, cl100k_pair, gpt2_pair):
    for path, (ours, _) in [(data_dir / "tokenizers" / "cl100k_base.tiktoken", cl100k_pair),
                            (data_dir / "tokenizers" / "gpt2_tokenizer.json", gpt2_pair)]:
        result = run_cli("encode", "--tokenizer", path, "--text", "Hello, 世界!")
        assert [int(i) for i in result.stdout.split()] == ours.encode("Hello, 世界!"), result.stderr
