"""The chat template and the chat-data loaders shared by sft.py, dpo.py, rlhf.py, distill.py, eval.py and sample.py.

ChatML (the template of Qwen and of OpenAI's ChatML): every message is

    <|im_start|>{role}\\n{content}<|im_end|>\\n

and a model is asked to answer by ending the prompt with `<|im_start|>assistant\\n`. The markers are
special tokens; the role line and the content are ordinary text, encoded separately, so a message
that spells "<|im_end|>" cannot forge a turn boundary and a generated answer tokenizes exactly as
the answers it was trained on.

`encode_chat` returns `(ids, loss_mask)`: `loss_mask[i] == 1` where token i is a training target,
i.e. the content of every assistant turn and its `<|im_end|>` (so the model learns to stop). System
and user turns, role headers and the newline after `<|im_end|>` are masked, as are assistant turns
with `loss_weight` 0. With inputs `ids[:-1]` the targets are `ids[1:]` weighted by `loss_mask[1:]`.

Loaders turn the formats people have into one form, a conversation = a list of messages
`{"role": "system"|"user"|"assistant", "content": str, "loss_weight": 1.0}`:
  alpaca      {"instruction", "input", "output", optional "system", "history": [[q, a], ...]}
  sharegpt    {"conversations": [{"from": "human"|"gpt"|"system", "value"}], optional "system"}
  messages    {"messages": [{"role", "content": str or [{"type": "text", "value"|"text"}], "loss_weight"}]}
and preference data (dpo.py, rlhf.py's reward model) into `{"prompt": messages, "chosen": str, "rejected": str}`:
  sharegpt pairs  {"conversations": [...], "chosen": {"from", "value"}, "rejected": {"from", "value"}}
  prompt pairs    {"prompt": str or messages, "chosen": str, "rejected": str}
  messages pairs  {"chosen": messages, "rejected": messages} (the same prompt, different last answers)
Errors name the file, the record index and the field; `skip_bad_records=True` counts them instead.
`{{name}}`-style placeholders are filled from `placeholders` (sft.py's `--set name=nanollm`).
"""
import json
import re
from pathlib import Path

import torch

IM_START, IM_END, PAD, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|pad|>", "<|endoftext|>"
THINK_START, THINK_END = "<think>", "</think>"  # a reasoning trace, ordinary text (distill.py --reasoning)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ChatDataError(ValueError):
    """A record that cannot be used; the message names the file, record index and field."""


# ----------------------------------------------------------------------------------------------------------
# The template

def chat_token_ids(tokenizer, names=(IM_START, IM_END, PAD)) -> dict:
    """The ids of the chat special tokens (padding only where batches are padded); a clear error when
    the tokenizer lacks one."""
    special = dict(tokenizer.special_tokens)
    if PAD not in special and END_OF_TEXT in special:  # a published vocabulary (SmolLM2's) has no <|pad|>: padding
        special[PAD] = special[END_OF_TEXT]             # is masked everywhere, so <|endoftext|> serves
    missing = [t for t in names if t not in special]
    if missing:
        raise ChatDataError(f"the tokenizer has no {', '.join(missing)} special token(s): chat needs a tokenizer "
                            f"trained by bpe.py (which reserves them) or one that defines them")
    return {t: special[t] for t in names}


def default_system_prompt(tokenizer) -> str | None:
    """The system message a model's own chat template (a GGUF file's, gguf_io.py) puts first when the
    conversation has none, e.g. SmolLM2's "You are a helpful AI assistant named SmolLM, ..."; the template
    must be ChatML, the one template this file writes."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if IM_START not in template:
        raise ChatDataError(f"the model's chat template is not ChatML (it starts {template[:60]!r}); chat.py "
                            "writes ChatML only")
    found = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", template)  # a Jinja "\\n" or a newline
    return found.group(1) if found else None


def encode_chat(tokenizer, messages, add_generation_prompt: bool = False, think_weight: float = 1.0):
    """(ids, loss_mask) of a conversation in ChatML; see the module docstring for what is trained on.

    An assistant answer that opens with a reasoning trace, "<think>...</think>answer", has the trace
    encoded as its own piece and weighted by think_weight (0 masks it: learn the answer, not the steps).
    A conversation without a system message gets the model's default one, if its template has one."""
    special = chat_token_ids(tokenizer, (IM_START, IM_END))
    default_system = default_system_prompt(tokenizer)
    if default_system and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    start, end = special[IM_START], special[IM_END]
    newline = tokenizer.encode_ordinary("\n")
    ids, mask = [], []
    for m in messages:
        header = [start] + tokenizer.encode_ordinary(m["role"] + "\n")
        weight = 1 if m["role"] == "assistant" and m.get("loss_weight", 1.0) != 0 else 0
        think, answer = split_think(m["content"]) if weight else ("", m["content"])
        think_ids, body = tokenizer.encode_ordinary(think), tokenizer.encode_ordinary(answer) + [end]
        ids += header + think_ids + body + newline
        mask += [0] * len(header) + [weight * think_weight] * len(think_ids) + [weight] * len(body) + [0] * len(newline)
    if add_generation_prompt:
        header = [start] + tokenizer.encode_ordinary("assistant\n")
        ids += header
        mask += [0] * len(header)
    return ids, mask


def split_think(content: str) -> tuple[str, str]:
    """("<think>...</think>", rest) when content opens with a reasoning trace, else ("", content)."""
    if content.startswith(THINK_START) and THINK_END in content:
        cut = content.index(THINK_END) + len(THINK_END)
        return content[:cut], content[cut:]
    return "", content


def prompt_ids(tokenizer, messages) -> list[int]:
    """The ids that ask the model to answer `messages`: the conversation, then `<|im_start|>assistant\\n`."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The ids a model should generate after prompt_ids(): the answer and <|im_end|>. For any conversation,
    prompt_ids(m) + answer_ids(a) == encode_chat(m + [assistant a]) minus the final newline."""
    return tokenizer.encode_ordinary(answer) + [chat_token_ids(tokenizer, (IM_END,))[IM_END]]


def render_chatml(messages, add_generation_prompt: bool = False) -> str:
    """The conversation as ChatML text (for display; encode with encode_chat)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


# ----------------------------------------------------------------------------------------------------------
# Reading records

def read_records(path) -> list:
    """The records of a .json file (an array of objects) or a .jsonl file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError as whole_file_error:
        records = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == 0:
                    raise ChatDataError(f"{path}: not JSON or JSONL ({whole_file_error})") from None
                raise ChatDataError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def parse_placeholders(pairs) -> dict:
    """["name=nanollm", "author=Ada"] (the --set flags) -> {"name": "nanollm", "author": "Ada"}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ChatDataError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set name=nanollm")
        out[key] = value
    return out


def fill_placeholders(text: str, placeholders: dict | None) -> str:
    for key, value in (placeholders or {}).items():
        text = text.replace("{{" + key + "}}", value)
    return text


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "value"/"text"} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                raise ChatDataError(f"{where}.content[{j}]: only text parts are supported, got {str(part)[:60]!r}")
            value = part.get("value", part.get("text"))
            if not isinstance(value, str):
                raise ChatDataError(f"{where}.content[{j}]: a text part needs a string 'value' (or 'text')")
            parts.append(value)
        return "".join(parts)
    raise ChatDataError(f"{where}.content: expected a string or a list of text parts, got {type(content).__name__}")


def _field(record: dict, name: str, where: str, kind=str):
    if name not in record:
        raise ChatDataError(f"{where}: missing field {name!r}")
    if not isinstance(record[name], kind):
        raise ChatDataError(f"{where}.{name}: expected {kind.__name__}, got {type(record[name]).__name__}")
    return record[name]


def _message(role: str, content: str, loss_weight: float = 1.0) -> dict:
    return {"role": role, "content": content, "loss_weight": loss_weight}


def _sharegpt_turn(turn, where: str) -> dict:
    if not isinstance(turn, dict):
        raise ChatDataError(f"{where}: expected an object with 'from' and 'value'")
    speaker = _field(turn, "from", where)
    if speaker not in SHAREGPT_ROLES:
        raise ChatDataError(f"{where}.from: unknown role {speaker!r} (expected one of {sorted(SHAREGPT_ROLES)})")
    return _message(SHAREGPT_ROLES[speaker], _text(_field(turn, "value", where), where))


def _openai_message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise ChatDataError(f"{where}: expected an object with 'role' and 'content'")
    role = _field(message, "role", where)
    if role not in ROLES:
        raise ChatDataError(f"{where}.role: unknown role {role!r} (expected one of {list(ROLES)})")
    if "content" not in message:
        raise ChatDataError(f"{where}: missing field 'content'")
    weight = message.get("loss_weight", 1.0)
    if not isinstance(weight, (int, float)):
        raise ChatDataError(f"{where}.loss_weight: expected a number, got {weight!r}")
    return _message(role, _text(message["content"], where), float(weight))


def _messages_of(record, where: str, field: str = "messages") -> list[dict]:
    items = _field(record, field, where, list)
    return [_openai_message(m, f"{where}.{field}[{j}]") for j, m in enumerate(items)]


def record_to_messages(record, where: str) -> list[dict]:
    """One SFT record in any supported format -> a conversation (a list of messages)."""
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages_of(record, where)
    elif "conversations" in record:
        turns = _field(record, "conversations", where, list)
        messages = [_sharegpt_turn(t, f"{where}.conversations[{j}]") for j, t in enumerate(turns)]
    elif "instruction" in record or "output" in record:
        instruction = _field(record, "instruction", where)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise ChatDataError(f"{where}.input: expected str, got {type(extra).__name__}")
        messages = []
        for j, pair in enumerate(record.get("history") or []):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise ChatDataError(f"{where}.history[{j}]: expected [question, answer] strings")
            messages += [_message("user", pair[0]), _message("assistant", pair[1])]
        messages += [_message("user", instruction + ("\n" + extra if extra else "")),
                     _message("assistant", _field(record, "output", where))]
    else:
        raise ChatDataError(f"{where}: unknown format (expected 'messages', 'conversations', or alpaca's "
                            f"'instruction'/'output'); fields: {sorted(record)[:8]}")
    system = record.get("system")
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, _message("system", _field(record, "system", where)))
    return messages


def check_conversation(messages, where: str) -> None:
    if not any(m["role"] == "assistant" and m["loss_weight"] != 0 for m in messages):
        raise ChatDataError(f"{where}: no assistant answer to train on")
    for j, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise ChatDataError(f"{where}: message {j} (assistant) is empty")


def _load(path, convert, placeholders, skip_bad_records):
    out, skipped = [], 0
    for i, record in enumerate(read_records(path)):
        where = f"{path}: record {i}"
        try:
            out.append(convert(record, where))
        except ChatDataError:
            if not skip_bad_records:
                raise
            skipped += 1
    return _fill(out, placeholders) if placeholders else out, skipped


def _fill(obj, placeholders):
    """fill_placeholders applied to every string inside lists and dicts."""
    if isinstance(obj, str):
        return fill_placeholders(obj, placeholders)
    if isinstance(obj, list):
        return [_fill(x, placeholders) for x in obj]
    if isinstance(obj, dict):
        return {k: _fill(v, placeholders) for k, v in obj.items()}
    return obj


def load_conversations(path, placeholders: dict | None = None, skip_bad_records: bool = False):
    """(conversations, n_skipped) from an alpaca / sharegpt / messages file (.json or .jsonl)."""
    def convert(record, where):
        messages = record_to_messages(record, where)
        check_conversation(messages, where)
        return messages
    return _load(path, convert, placeholders, skip_bad_records)


def _answer(value, where: str) -> str:
    """A chosen/rejected answer: a string, a {"from"/"role", "value"/"content"} turn, or a message list's last."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        text = _sharegpt_turn(value, where)["content"] if "from" in value else _openai_message(value, where)["content"]
    else:
        raise ChatDataError(f"{where}: expected a string or a message, got {type(value).__name__}")
    if not text.strip():
        raise ChatDataError(f"{where}: empty answer")
    return text


def record_to_pair(record, where: str) -> dict:
    """One preference record in any supported format -> {"prompt": messages, "chosen": str, "rejected": str}."""
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in ("chosen", "rejected"):
        if name not in record:
            raise ChatDataError(f"{where}: missing field {name!r}")
    if "conversations" in record:
        turns = _field(record, "conversations", where, list)
        prompt = [_sharegpt_turn(t, f"{where}.conversations[{j}]") for j, t in enumerate(turns)]
    elif "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [_message("user", prompt)]
        elif isinstance(prompt, list):
            prompt = [_openai_message(m, f"{where}.prompt[{j}]") for j, m in enumerate(prompt)]
        else:
            raise ChatDataError(f"{where}.prompt: expected a string or a list of messages")
    elif isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        chosen, rejected = _messages_of(record, where, "chosen"), _messages_of(record, where, "rejected")
        if not chosen or chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
            raise ChatDataError(f"{where}: 'chosen' and 'rejected' must share every message but a last assistant one")
        return {"prompt": chosen[:-1], "chosen": _answer(chosen[-1]["content"], f"{where}.chosen"),
                "rejected": _answer(rejected[-1]["content"], f"{where}.rejected")}
    else:
        raise ChatDataError(f"{where}: unknown preference format (expected 'conversations' or 'prompt' with "
                            f"'chosen'/'rejected', or two message lists)")
    if not prompt or prompt[-1]["role"] != "user":
        raise ChatDataError(f"{where}: the prompt must end with a user message")
    return {"prompt": prompt, "chosen": _answer(record["chosen"], f"{where}.chosen"),
            "rejected": _answer(record["rejected"], f"{where}.rejected")}


def load_preference_pairs(path, placeholders: dict | None = None, skip_bad_records: bool = False):
    """(pairs, n_skipped): [{"prompt": messages, "chosen": str, "rejected": str}] from any supported format."""
    return _load(path, record_to_pair, placeholders, skip_bad_records)


def load_unpaired(path, placeholders: dict | None = None, skip_bad_records: bool = False):
    """(examples, n_skipped): [{"prompt": messages, "completion": str, "label": bool}] from KTO-style
    {"messages": [...], "label": true|false} records (the last message is the judged answer)."""
    def convert(record, where):
        messages = _messages_of(record, where)
        label = _field(record, "label", where, bool)
        if not messages or messages[-1]["role"] != "assistant":
            raise ChatDataError(f"{where}: the last message must be the assistant's answer")
        return {"prompt": messages[:-1], "completion": _answer(messages[-1]["content"], where), "label": label}
    return _load(path, convert, placeholders, skip_bad_records)


# ----------------------------------------------------------------------------------------------------------
# Tokenized examples and batches

def tokenize_conversations(tokenizer, conversations, max_len: int, truncate: str = "left", think_weight: float = 1.0):
    """[(ids, loss_mask)] of at most max_len tokens, and {"truncated", "dropped"} counts.

    truncate="left": drop the oldest messages (a system message stays) until the example fits, then, if
    still too long, its first tokens; an example left with nothing to train on is dropped.
    truncate="drop": drop every example longer than max_len."""
    if truncate not in ("left", "drop"):
        raise ValueError(f"truncate must be 'left' or 'drop', got {truncate!r}")
    examples, stats = [], {"truncated": 0, "dropped": 0}
    for messages in conversations:
        ids, mask = encode_chat(tokenizer, messages, think_weight=think_weight)
        if len(ids) > max_len:
            if truncate == "drop":
                stats["dropped"] += 1
                continue
            system, rest = ([messages[0]], messages[1:]) if messages[0]["role"] == "system" else ([], messages)
            while len(ids) > max_len and len(rest) > 1:
                rest = rest[1:]
                ids, mask = encode_chat(tokenizer, system + rest, think_weight=think_weight)
            ids, mask = ids[-max_len:], mask[-max_len:]
            if sum(mask[1:]) == 0:
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
        examples.append((ids, mask))
    return examples, stats


def pad_batch(examples, pad_id: int, device="cpu"):
    """(inputs, targets, loss_mask), each (B, T) with T the longest example minus one, right-padded.

    inputs = ids[:-1], targets = ids[1:], loss_mask = loss_mask[1:]; padding has loss_mask 0."""
    T = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), T), dtype=torch.float32)
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor(ids[1:])
        loss_mask[row, :n] = torch.tensor(mask[1:], dtype=torch.float32)
    return inputs.to(device), targets.to(device), loss_mask.to(device)
