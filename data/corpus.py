"""Reading corpora: the one reader that data/prepare.py, data/curate.py and bpe.py share.

    from data.corpus import read_documents
    for doc in read_documents(["../shared/data/tang_poems", "notes.txt"], txt_docs="line"):
        doc["text"], doc["source"]          # the document, and where it came from ("file:line", "file#poem")

Formats, chosen per file by its extension unless `fmt` is given:
  txt    `txt_docs="line"`: a document per line; `"blank"`: per blank-line-separated block; `"file"`:
         the whole file; `"auto"`: `blank` when the file has a blank line, else `line`.
  jsonl  one JSON object per line with a string `text` field (skip_bad_lines counts bad lines instead).
  tang   chinese-poetry JSON (`.json`): every object with a `paragraphs` list is a poem,
         `title\nline\nline...` (title from `title`, else `chapter`).
  A directory stands for its *.txt, *.jsonl and *.json files, sorted.
Errors are CorpusError (a ValueError) naming the file and line at fault.
"""
import json
import os
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"
JSONL_SPECIALS = ("<s>", "</s>")  # in a jsonl corpus these strings are the special tokens


class CorpusError(ValueError):
    """Unreadable input: one clear line naming the file (and line) at fault."""



def infer_format(path: Path) -> str:
    if path.suffix == ".json":
        return "tang"
    if path.suffix == ".jsonl":
        return "jsonl"
    return "txt"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file or directory") from None
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _poems_in(obj, found: list) -> None:
    """Every {title, paragraphs} object anywhere in the JSON, as `title\\nline\\nline...` (as prepare.py)."""
    if isinstance(obj, list):
        for item in obj:
            _poems_in(item, found)
    elif isinstance(obj, dict):
        if isinstance(obj.get("paragraphs"), list):
            title = obj.get("title") or obj.get("chapter") or ""
            lines = [line if isinstance(line, str) else str(line) for line in obj["paragraphs"]]
            found.append("\n".join([title, *lines]).strip("\n"))
        else:
            for value in obj.values():
                _poems_in(value, found)


def files_of(path: Path) -> list[Path]:
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if not path.is_dir():
        return [path]
    files = sorted((p for p in path.iterdir() if p.suffix in (".txt", ".jsonl", ".json") and p.is_file()),
                   key=lambda p: (len(p.name), p.name))
    if not files:
        raise CorpusError(f"{path}: directory has no .txt, .jsonl or .json files")
    return files


def read_documents(paths, fmt: str | None = None, txt_docs: str = "auto", skip_bad_lines: bool = False,
                   bad_lines: Counter | None = None):
    """Yield {"text", "source"} for every document of the given files/directories, in order.

    `source` names the origin: `file:line` (txt, jsonl) or `file#poem` (tang). Bad JSONL lines raise
    CorpusError naming file and line, or are counted in bad_lines[path] when skip_bad_lines is set.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for top in paths:
        for path in files_of(Path(top)):
            kind = fmt or infer_format(path)
            text = _read_text(path)
            if kind == "txt":
                yield from _txt_documents(path, text, txt_docs)
            elif kind == "jsonl":
                yield from _jsonl_documents(path, text, skip_bad_lines, bad_lines)
            elif kind == "tang":
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
                poems = []
                _poems_in(obj, poems)
                if not poems:
                    raise CorpusError(f"{path}: no poems (objects with a 'paragraphs' list) found")
                for i, poem in enumerate(poems, start=1):
                    yield {"text": poem, "source": f"{path.name}#{i}"}
            else:
                raise CorpusError(f"{path}: unknown format {kind!r} (expected txt, jsonl or tang)")


def _txt_documents(path: Path, text: str, txt_docs: str):
    if txt_docs not in ("auto", "file", "line", "blank"):
        raise CorpusError(f"txt_docs must be auto, file, line or blank, got {txt_docs!r}")
    lines = text.split("\n")
    if txt_docs == "auto":
        txt_docs = "blank" if any(not line.strip() for line in lines[:-1]) else "line"
    if txt_docs == "file":
        if text.strip():
            yield {"text": text, "source": f"{path.name}:1"}
        return
    block, first = [], 0
    for i, line in enumerate(lines):
        if txt_docs == "line":
            if line.strip():
                yield {"text": line, "source": f"{path.name}:{i + 1}"}
        elif line.strip():
            if not block:
                first = i
            block.append(line)
        elif block:
            yield {"text": "\n".join(block), "source": f"{path.name}:{first + 1}"}
            block = []
    if block:
        yield {"text": "\n".join(block), "source": f"{path.name}:{first + 1}"}


def _jsonl_documents(path: Path, text: str, skip_bad_lines: bool, bad_lines: Counter | None):
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError("no string field 'text'")
        except ValueError as e:
            if skip_bad_lines:
                if bad_lines is not None:
                    bad_lines[str(path)] += 1
                continue
            raise CorpusError(f"{path}:{line_no}: {e} (use --skip-bad-lines to skip such lines)") from None
        yield {"text": record["text"], "source": f"{path.name}:{line_no}"}


def fetch(source: str, cache_dir: Path) -> Path:
    """A local path as is; a URL downloaded once into cache_dir."""
    if "://" not in source:
        return Path(source)  # read_documents names a missing path
    target = cache_dir / source.rstrip("/").rsplit("/", 1)[-1]
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        print(f"downloading {source} -> {target}")
        tmp = target.with_suffix(target.suffix + ".part")
        try:
            urllib.request.urlretrieve(source, tmp)
        except OSError as e:
            raise CorpusError(f"{source}: download failed ({e}); pass a local copy with --source PATH") from None
        os.replace(tmp, target)
    return target


def tokenize(docs: list[str], tokenizer, fmt: str, desc: str) -> np.ndarray:
    """All documents, each followed by <|endoftext|>, as one token stream (tiktoken's threads do the work).
    A byte the vocabulary lacks comes back from tiktoken as a placeholder id >= vocab_size
    (Tokenizer.to_tiktoken) and is dropped, as Tokenizer.encode drops it."""
    encoding = tokenizer.to_tiktoken()
    allowed = {s for s in JSONL_SPECIALS if s in tokenizer.special_tokens} if fmt == "jsonl" else set()
    eot = tokenizer.special_tokens[EOT]
    chunks, batch = [], 1024
    for start in range(0, len(docs), batch):
        ids = encoding.encode_batch(docs[start:start + batch], num_threads=os.cpu_count() or 1,
                                    allowed_special=allowed, disallowed_special=())
        for doc in ids:
            doc = np.array(doc + [eot], dtype=np.int64)
            chunks.append(doc[doc < tokenizer.vocab_size] if tokenizer.missing_bytes else doc)
        done = min(start + batch, len(docs))
        print(f"\rtokenizing {desc}: {done:,}/{len(docs):,} documents", end="", flush=True)
    print()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
