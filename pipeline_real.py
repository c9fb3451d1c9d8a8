"""pipeline.py's real-model track (--base): post-training of a published chat model such as
SmolLM2-135M-Instruct: identity SFT, DPO, GRPO, a small student distilled from it and used as its draft in
speculative decoding, four quantizations and a GGUF export, every model evaluated on held-out identity
questions, real text and arithmetic. REAL_PRESETS sizes the stages (ci, quick, full); check_base refuses a
model the track cannot use before the first stage; write_real_data prepares the data; build_real_stages
lists the stages; evaluate_real_stage, speculate_stage and export_stage are workers (`python pipeline.py
evaluate-real | speculate | export ...`); judge_real and report_lines turn the results into report.md.
"""
import itertools
import json
import math
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

from pipeline_stages import (IDENTITY_AUTHOR, IDENTITY_NAME, IDENTITY_PROMPTS, QUANT_BPB_TOLERANCE, REPO,
                             PipelineError, Stage, fmt, py, read_json, report_header, write_json)
from verdicts import REPORT_CARD_TEXT, Measure, report_card, wilson_interval

# The real-model track: a fine-tuning stage "regressed" when held-out wiki/c4 bpb rose more than this
REAL_KEEP_TOLERANCE = 0.05
# The q8_0 GGUF read back "regressed" when its next-token argmax differs from the model's at more positions
EXPORT_TOP1_TOLERANCE = 0.1

# Per preset: which stages run, the data sizes and every stage's flags. "ci" runs every stage on a tiny
# stand-in with the base's tokenizer; "quick" is identity + DPO + quantize + export; "full" all of them.
REAL_STAGES = ["data", "text_data", "calib_data", "sft", "dpo", "grpo", "distill_cache", "distill_ce", "distill",
               "speculative", "quant_rtn8", "quant_rtn4_pc", "quant_gptq4_pc", "quant_rtn4", "quant_gptq4", "quant_nf4",
               "export", "eval"]
REAL_PRESETS = {
    "ci": dict(
        stages=REAL_STAGES, n_general=40, text_chars=20_000, heldout_tokens=2048, n_arith_eval=20, n_terms=2,
        max_operand=30, eval_new_tokens=16, spec_prompts=2, spec_new_tokens=16, spec_draft=4,
        sft=["--lora-rank", "8", "--lora-embedding-rank", "1", "--max-len", "128", "--batch-size", "4",
             "--max-steps", "6", "--lr", "2e-3", "--warmup-steps", "1", "--eval-interval", "6", "--eval-prompts", "4",
             "--eval-new-tokens", "8", "--log-interval", "2"],
        dpo=["--lora-rank", "4", "--max-len", "128", "--batch-size", "2", "--max-steps", "4", "--eval-interval", "4",
             "--log-interval", "2", "--lr", "1e-3"],
        grpo=["--n-train", "40", "--n-eval", "20", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-steps", "2",
              "--eval-interval", "2", "--log-interval", "1", "--max-new-tokens", "8"],
        student=["--model", "tiny", "--n-layers", "1", "--dim", "32", "--n-heads", "2", "--n-kv-heads", "2",
                 "--hidden-dim", "64", "--seq-len", "64", "--batch-size", "4", "--max-steps", "10", "--lr", "3e-3",
                 "--warmup-steps", "2", "--eval-interval", "10", "--eval-tokens", "1024", "--sample-tokens", "0",
                 "--log-interval", "5"],
        cache=["--seq-len", "64", "--top-k", "8", "--samples", "4", "--batch-size", "4"], group_size=32,
        gptq=["--calib-samples", "4", "--calib-seq-len", "64"]),
    # meant for 15 minutes on an idle 2-core CPU with evaluation (docs/pipeline_real_model.md): budgets in steps,
    # so the result does not depend on the machine's load; --max-time is only a safety net
    "quick": dict(
        # GPTQ (~130 s with its evaluation) is left to the full preset: RTN int8/int4 and NF4 take 20 s
        stages=["data", "text_data", "sft", "dpo", "quant_rtn8", "quant_rtn4", "quant_nf4", "export", "eval"],
        # english_repeat 3: the quick run's SFT named itself in 16 of 19 held-out Chinese questions, 1 of 5 English
        n_general=100, english_repeat=3, text_chars=200_000, heldout_tokens=2048, n_arith_eval=40, n_terms=2,
        max_operand=30, eval_new_tokens=40, spec_prompts=5, spec_new_tokens=48,
        # --max-len 160: every example but one (a Chinese identity answer of 225 tokens) fits whole. Full
        # fine-tuning at 2e-4: 19 of 20 held-out questions named at 40 steps, where LoRA r16 with the embedding
        # adapter named 14 (lr 1e-3) or 15 (2e-3) in the same steps and time (docs/pipeline_real_model.md)
        sft=["--max-len", "160", "--batch-size", "8", "--max-steps", "40", "--max-time", "900", "--lr", "2e-4",
             "--warmup-steps", "4", "--eval-interval", "40", "--eval-prompts", "0", "--log-interval", "5"],
        # the held-out pairs' reference log-probs are computed once; evaluated at the start and the end only
        dpo=["--lora-rank", "16", "--max-len", "192", "--batch-size", "2", "--max-steps", "30", "--max-time", "900",
             "--lr", "5e-4", "--eval-interval", "30", "--log-interval", "5"],
        grpo=["--n-eval", "40", "--prompts-per-step", "4", "--samples-per-prompt", "4", "--max-steps", "30",
              "--max-time", "300", "--eval-interval", "30", "--max-new-tokens", "40"],
        student=["--model", "tiny", "--n-layers", "2", "--dim", "128", "--n-heads", "4", "--n-kv-heads", "4",
                 "--hidden-dim", "384", "--seq-len", "256", "--batch-size", "8", "--max-steps", "300",
                 "--max-time", "300", "--lr", "2e-3", "--eval-interval", "300", "--sample-tokens", "0"],
        cache=["--seq-len", "256", "--top-k", "32", "--samples", "8", "--batch-size", "8"],
        group_size=64,  # SmolLM2's rows are 576 and 1536 long: 128 does not divide 576
        gptq=["--calib-samples", "32", "--calib-seq-len", "256", "--act-order"]),
}
# meant for 45 minutes on an idle 2-core CPU with evaluation: quick's data, SFT and DPO, then GRPO,
# distillation, speculative decoding and the four quantizations, every stage sized by steps (--max-time is a
# safety net only); per-stage estimates in docs/pipeline_real_model.md ("The full preset")
REAL_PRESETS["full"] = dict(
    REAL_PRESETS["quick"], stages=REAL_STAGES,
    # GRPO's task: 2 terms of 0..50 has 250 test problems; GRPO asks 200 of them before and after (a 95%
    # interval of about +-7 points); the eval stage asks 40 of each chat model, as the quick preset does
    n_terms=2, max_operand=50, n_arith_eval=40, eval_new_tokens=40, spec_prompts=5, spec_new_tokens=64,
    # one drafted token a round: the 100-step student agrees with the final model on few tokens, and each
    # drafted token past the first costs a draft step and a wider verify for little gain (1, 2, 3 drafts a
    # round measured side by side: 1 the fastest, docs/pipeline_real_model.md)
    spec_draft=1,
    # 20 steps of 4 prompts x 6 answers of at most 32 tokens: an answer cut by the budget scores 0, so the
    # policy is rewarded for answering right and briefly (the base explains first)
    # lr 1e-4, constant: from the full run's DPO model 0.25 -> 0.55 of 200 held-out problems in 20 steps, where
    # rlhf.py's default 1e-3 gave 0.28 at 20 steps and 0.10 at 40 (docs/pipeline_real_model.md)
    grpo=["--n-eval", "200", "--prompts-per-step", "4", "--samples-per-prompt", "6", "--max-steps", "20",
          "--max-time", "1200", "--eval-interval", "20", "--log-interval", "4", "--max-new-tokens", "32",
          "--lr", "1e-4", "--min-lr", "1e-4"],
    # the student's 49,152-word output layer is most of its cost: 100 steps of 8 x 256 tokens
    student=["--model", "tiny", "--n-layers", "2", "--dim", "128", "--n-heads", "4", "--n-kv-heads", "4",
             "--hidden-dim", "384", "--seq-len", "256", "--batch-size", "8", "--max-steps", "100",
             "--max-time", "900", "--lr", "2e-3", "--eval-interval", "100", "--sample-tokens", "0"],
    cache=["--seq-len", "256", "--top-k", "32", "--samples", "8", "--batch-size", "8"],
    # 90 steps of 2 pairs (180 of the 240) at a constant 1e-4: the held-out loss falls to step 90 and rises by
    # 120; three seeds pooled 0.64 of 180 at step 90, 0.62 at 75, where 30 steps at 5e-4 (the quick preset's) gave
    # 0.50; beta 0.3 instead of DPO's 0.1: the same three seeds pooled 0.66 (docs/pipeline_real_model.md)
    dpo=["--lora-rank", "16", "--max-len", "192", "--batch-size", "2", "--max-steps", "90", "--max-time", "1800",
         "--lr", "1e-4", "--min-lr", "1e-4", "--beta", "0.3", "--warmup-steps", "5", "--eval-interval", "90",
         "--log-interval", "5"],
    # act-order (the outlier channels first); windows of 64 tokens of calib_data: more windows, more first
    # positions, whose outputs matter most (docs/pipeline_real_model.md, "GPTQ's calibration windows"); 512 of
    # them beat 256 on both selection sets at groups of 64 ("GPTQ's calibration data"), for ~100 s more a stage
    gptq=["--calib-samples", "512", "--calib-seq-len", "64", "--act-order"])
REAL_DATA = ["pretrain/wiki_demo.txt", "pretrain/c4_demo.jsonl", "tinyshakespeare/input.txt", "sft/identity.json",
             "sft/alpaca_en_demo.json", "preference/dpo_en_demo.json"]
HELD_OUT_TEXTS = {"wiki": "wiki_heldout.txt", "c4": "c4_heldout.jsonl", "shakespeare": "shakespeare_heldout.txt"}
GENERAL_PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?",
                   "Write a haiku about the sea.", "Explain what a CPU does in one sentence.",
                   "Translate 'good morning' into French."]
# The identity and general chats, trained and asked, carry this system message: a published model's template
# adds its own otherwise (SmolLM2's: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
# which would contradict the name being taught
NEUTRAL_SYSTEM = "You are a helpful AI assistant."
# General chat records longer than this (instruction, input and answer) are left out: with the system message
# and ChatML's tokens they fit SFT's --max-len whole. Cut from the left, a long answer trains the model to
# continue text whose question it no longer sees
GENERAL_MAX_TOKENS = 96
CJK = re.compile(r"[\u3400-\u9fff]")  # a Chinese identity record (identity.json is three quarters Chinese)
IDENTITY_HELD_OUT_SHARE = 4  # one identity.json question in 4 (by hash) is held out of SFT: about 23 of 91
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# bytes of memory a base parameter needs in the track (activations and the 49,152-wide logits dominate, not the
# weights): on SmolLM2-135M the presets' largest stage, GRPO, peaked at 5.49 GB, 41 bytes a parameter; 48 was set
# from an SFT through LoRA (batch 8 x 160 tokens, 6.7 GB) and leaves the presets' stages 17% room
MEMORY_FACTOR = 48


def check_base(path: Path, available_bytes: int | None = None):
    """The base model's (config, tokenizer), or PipelineError naming the file and why the real-model track
    cannot use it: an architecture other than nanollm's Transformer (llama-like), a tokenizer without the
    ChatML tokens, or more memory than the machine has (MEMORY_FACTOR bytes a parameter). Reads the config
    and tokenizer only, not the weights."""
    from common import load_tokenizer
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"--base {path}: no such file or directory")
    try:
        if path.suffix == ".gguf":
            from gguf_io import GGUFFile, config_from_gguf
            config = config_from_gguf(GGUFFile(path))
        elif (path / "config.json").exists() and not (path / "ckpt.pt").exists():
            from hf_io import config_from_hf
            config = config_from_hf(json.loads((path / "config.json").read_text()))
        else:
            from common import read_checkpoint
            from model import ModelConfig
            config = ModelConfig(**read_checkpoint(path)["model_config"])
        tokenizer = load_tokenizer(path)
    except Exception as e:  # the reader's own one-line reason: an unknown architecture, a missing tensor
        raise PipelineError(f"--base {path}: cannot be read as a nanollm model ({e})") from None
    missing = [t for t in CHATML_TOKENS if t not in tokenizer.special_tokens]
    if missing:
        raise PipelineError(f"--base {path}: its tokenizer lacks the chat token(s) {', '.join(missing)} "
                            "(the track fine-tunes a ChatML chat model)")
    n_params = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2) + config.n_layers * (
        2 * config.dim * config.n_heads * config.head_dim + 2 * config.dim * config.n_kv_heads * config.head_dim
        + 3 * config.dim * config.hidden_dim)
    available = available_bytes if available_bytes is not None else available_memory()
    if available and n_params * MEMORY_FACTOR > available:
        raise PipelineError(f"--base {path}: {n_params / 1e6:,.0f}M parameters need about "
                            f"{n_params * MEMORY_FACTOR / 2**30:.1f} GiB to fine-tune; this machine has "
                            f"{available / 2**30:.1f} GiB available")
    return config, tokenizer


def resolve_base(name: str) -> Path:
    """--base: a path, or smollm2 for SmolLM2-135M-Instruct as `gguf_io.py fetch` gets it (prints its path)."""
    if name != "smollm2":
        return Path(name).resolve()
    result = subprocess.run([sys.executable, str(REPO / "gguf_io.py"), "fetch"], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        raise PipelineError(f"--base smollm2: gguf_io.py fetch failed "
                            f"({(result.stderr.strip() or 'no path').splitlines()[-1]})")
    return Path(result.stdout.strip().splitlines()[-1]).resolve()


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def split_tenth(items):
    """(the first nine tenths, the last tenth) of a list or a text: the last tenth is held out, never tuned on."""
    cut = len(items) * 9 // 10
    return items[:cut], items[cut:]


def write_real_data(out: Path, d: Path, base: Path, n_general: int, text_chars: int, english_repeat: int = 1) -> None:
    """The real-model track's data: identity.json split by a hash of each question into SFT's questions and
    the held-out ones (SFT's validation loss; the identity score asks the 20 of them whose reference answer
    gives the name, evaluate_real_stage) (placeholders kept: sft.py --set fills them; the English ones,
    11 of 67 beside 56 Chinese, english_repeat times, so the English model learns its name in English); the first
    n_general alpaca_en records of at most GENERAL_MAX_TOKENS tokens (general chat, so the model keeps its
    abilities: short enough that SFT trains each one whole); held-out real text the
    model is never tuned on (the last tenth of wiki_demo, c4_demo and Tiny Shakespeare); wiki + c4 documents
    from the other nine tenths, text_chars characters in all (the teacher's logits are cached for every
    position), for the student; for GPTQ's calibration, the rest of those nine tenths (about 260k tokens)
    and Tiny Shakespeare's first nine tenths (its speeches, about 270k tokens), documents separated by blank
    lines: random windows of a varied corpus as in the GPTQ paper (a few documents over-fit it), drawn from
    the training part of every text the quantized models are scored on, as the paper calibrates on C4's
    training split and scores C4's validation split; the base's tokenizer (bpe.py)."""
    from chat import read_records
    from common import load_tokenizer
    out.mkdir(parents=True, exist_ok=True)
    identity = [{**r, "system": NEUTRAL_SYSTEM} for r in read_records(d / "sft" / "identity.json")]
    held = [r for r in identity if zlib.crc32(r["instruction"].encode()) % IDENTITY_HELD_OUT_SHARE == 0]
    train = [r for r in identity if r not in held]
    train += [r for r in train if not CJK.search(r["instruction"] + r["output"])] * (english_repeat - 1)
    (out / "identity_train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False))
    (out / "identity_heldout.json").write_text(json.dumps(held, indent=1))
    tokenizer = load_tokenizer(base)
    general = [{**r, "system": NEUTRAL_SYSTEM} for r in read_records(d / "sft" / "alpaca_en_demo.json")
               if len(tokenizer.encode_ordinary(r["instruction"] + r.get("input", "") + r["output"])) <= GENERAL_MAX_TOKENS]
    general = general[:n_general]
    (out / "general.json").write_text(json.dumps(general, indent=1))
    wiki = [line for line in (d / "pretrain" / "wiki_demo.txt").read_text().splitlines() if line.strip()]
    c4 = (d / "pretrain" / "c4_demo.jsonl").read_text().splitlines()
    shakespeare = (d / "tinyshakespeare" / "input.txt").read_text()
    (wiki_train, wiki_held), (c4_lines, c4_held), (shakespeare_train, shakespeare_held) = map(
        split_tenth, (wiki, c4, shakespeare))
    (out / HELD_OUT_TEXTS["wiki"]).write_text("\n".join(wiki_held) + "\n")
    (out / HELD_OUT_TEXTS["c4"]).write_text("\n".join(c4_held) + "\n")
    (out / HELD_OUT_TEXTS["shakespeare"]).write_text(shakespeare_held)
    c4_train = [json.loads(line)["text"].replace("\n", " ") for line in c4_lines]
    pool = [doc for pair in zip(wiki_train, c4_train) for doc in pair]  # alternating wiki, c4
    docs = [doc for doc, before in zip(pool, itertools.accumulate(map(len, pool), initial=0)) if before < text_chars]
    (out / "text_train.txt").write_text("\n".join(docs) + "\n")
    student_docs = set(docs)
    rest = [[doc for doc in part if doc not in student_docs] for part in (wiki_train, c4_train)]
    wiki_c4 = [doc for pair in itertools.zip_longest(*rest) for doc in pair if doc]  # alternating, then c4's tail
    speeches = [block for block in shakespeare_train.split("\n\n") if block.strip()]
    calib = [doc for pair in itertools.zip_longest(wiki_c4, speeches) for doc in pair if doc]
    (out / "calib_train.txt").write_text("\n\n".join(calib) + "\n")
    tokenizer.chat_template = neutral_template(tokenizer)
    tokenizer.save(out / "tokenizer")
    write_json(out / "summary.json", {"identity_train": len(train), "identity_heldout": len(held),
                                      "general": len(general), "text_docs": len(docs), "calib_docs": len(calib)})


def neutral_template(tokenizer) -> str:
    """The base's chat template with NEUTRAL_SYSTEM as the system message it adds to a chat that has none
    (ChatML with that default where the base has no template). The fine-tuned model keeps it (sft.py
    --tokenizer), so sample.py, chat.py and llama.cpp (the exported GGUF's template) ask it as it was trained,
    not as "SmolLM"."""
    from chat import default_system_prompt
    from gguf_io import CHATML_TEMPLATE
    template = getattr(tokenizer, "chat_template", None)
    default = default_system_prompt(tokenizer)
    if template and default:
        return template.replace(default, NEUTRAL_SYSTEM)
    first = "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + NEUTRAL_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    return first + (template or CHATML_TEMPLATE)


def build_real_stages(preset: str, base: Path, data_dir: Path, run_dir: Path, device: str = "auto") -> list[Stage]:
    """The real-model track for one preset: post-training of `base`, every stage's exact commands."""
    p, d, r, dev = REAL_PRESETS[preset], Path(data_dir), Path(run_dir), ["--device", device]
    sets = ["--set", f"name={IDENTITY_NAME}", "--set", f"author={IDENTITY_AUTHOR}"]
    data = r / "data"
    chain = [name for name in ("sft", "dpo", "grpo") if name in p["stages"]]
    final = r / chain[-1]
    arith = ["--n-terms", p["n_terms"], "--max-operand", p["max_operand"]]
    stages = [
        Stage("data", "identity.json split into SFT and held-out questions, general chat, held-out real text",
              "data", lambda run_dir: write_real_data(data, d, base, p["n_general"], p["text_chars"],
                                                             p.get("english_repeat", 1))),
        Stage("text_data", "data/prepare.py: wiki + c4 documents in the base's tokens (the student)",
              "text_data", [py("data/prepare.py", "--source", data / "text_train.txt", "--txt-docs", "line",
                               "--tokenizer", data / "tokenizer", "--out-dir", r / "text_data")], writes_summary=False),
        Stage("calib_data", "data/prepare.py: the other wiki + c4 documents and Tiny Shakespeare's first nine "
              "tenths in the base's tokens (GPTQ calibration)",
              "calib_data", [py("data/prepare.py", "--source", data / "calib_train.txt", "--txt-docs", "blank",
                                "--tokenizer", data / "tokenizer", "--out-dir", r / "calib_data")], writes_summary=False),
        Stage("sft", f"sft.py: identity (name = {IDENTITY_NAME}) + general chat", "sft",
              [py("sft.py", "--init", base, "--tokenizer", data / "tokenizer",
                  "--data", f"{data / 'identity_train.json'},{data / 'general.json'}", *sets,
                  "--eval-data", data / "identity_heldout.json", "--out-dir", r / "sft", *p["sft"], *dev, "--resume")],
              kind="chat", pngs=["loss.png"]),
        Stage("dpo", "dpo.py: DPO on dpo_en_demo (a fifth of the pairs held out)", "dpo",
              [py("dpo.py", "--init", r / "sft", "--data", d / "preference" / "dpo_en_demo.json", "--val-fraction", "0.2",
                  "--out-dir", r / "dpo", *p["dpo"], *dev, "--resume")], kind="chat", pngs=["loss.png", "rewards.png"]),
        Stage("grpo", f"rlhf.py grpo: RL on {p['n_terms']}-term sums of 0..{p['max_operand']}, checked by tasks.py",
              "grpo", [py("rlhf.py", "grpo", "--init", r / "dpo", *arith,
                          "--out-dir", r / "grpo", *p["grpo"], *dev, "--resume")], kind="chat", pngs=["curves.png"]),
        Stage("distill_cache", "distill.py cache: the final model's top-k next-token distributions on text_data",
              "distill_cache", [py("distill.py", "cache", "--teacher", final, "--data", r / "text_data",
                                   "--out-dir", r / "distill_cache", *p["cache"], *dev)], writes_summary=False),
        Stage("distill_ce", "distill.py --alpha 0: a small student with the base's tokenizer, hard labels only",
              "distill_ce", [py("distill.py", "--data", r / "text_data", "--out-dir", r / "distill_ce", *p["student"],
                                "--alpha", "0", *dev, "--resume")], kind="text", pngs=["loss.png"]),
        Stage("distill", "distill.py: the same student taught from the cached teacher logits", "distill",
              [py("distill.py", "--data", r / "text_data", "--teacher-cache", r / "distill_cache", "--out-dir",
                  r / "distill", *p["student"], *dev, "--resume")], kind="text", pngs=["loss.png"]),
        Stage("speculative", "decoding.py speculative decoding: the final model, the student as its draft",
              "speculative", [py("pipeline.py", "speculate", "--target", final, "--draft", r / "distill",
                                 "--out-dir", r / "speculative", "--prompts", p["spec_prompts"],
                                 "--max-new-tokens", p["spec_new_tokens"], "--n-draft", p.get("spec_draft", 4), *dev)]),
    ]
    group = p["group_size"]
    for name, method, bits, group in (("quant_rtn8", "rtn", 8, 0), ("quant_rtn4_pc", "rtn", 4, 0),
                                      ("quant_gptq4_pc", "gptq", 4, 0), ("quant_rtn4", "rtn", 4, group),
                                      ("quant_gptq4", "gptq", 4, group), ("quant_nf4", "nf4", 4, group)):
        grid = f"group {group}" if group else "per channel"
        stages.append(Stage(name, f"quant.py: the final model, {method.upper()} int{bits}, {grid}", name,
                            [py("quant.py", "--ckpt", final, "--out-dir", r / name, "--method", method, "--bits", bits,
                                "--group-size", group,
                                *([*p["gptq"], "--calib-data", r / "calib_data"] if method == "gptq" else []),
                                "--data", r / "text_data", "--no-eval")], kind="text"))
    stages.append(Stage("export", "gguf_io.py: the final model as GGUF q8_0 and q4_0, one chat turn in llama.cpp",
                        "export", [py("pipeline.py", "export", "--ckpt", final, "--out-dir", r / "export")]))
    stages = [s for s in stages if s.name in p["stages"]]
    evaluated = [f"base={base}=chat"] + [f"{s.name}={r / s.out}={s.kind}" for s in stages if s.kind]
    stages.append(Stage("eval", "every model on the held-out identity questions, real text, arithmetic and "
                        "five general prompts", "eval",
                        [py("pipeline.py", "evaluate-real", "--run-dir", r, "--max-tokens", p["heldout_tokens"],
                            "--arithmetic", p["n_arith_eval"] if "grpo" in p["stages"] else 0, *arith,
                            "--max-new-tokens", p["eval_new_tokens"],
                            *dev, *evaluated)]))
    return stages


# ----------------------------------------------------------------------------------------------------------
# The workers of the eval, speculative and export stages

def evaluate_real_stage(args) -> None:
    """Per model NAME=PATH=KIND (chat | text): bits per byte on each held-out text (HELD_OUT_TEXTS, windows of
    --seq-len tokens); for chat models also the share of held-out identity questions answered with the name,
    arithmetic accuracy on tasks.py test problems of the track's difficulty (unless --arithmetic 0), greedy
    answers to GENERAL_PROMPTS. A trained model that took no step (its summary.json says step 0) is the model
    it started from: it gets the previous chat model's results instead of a second evaluation."""
    from chat import load_conversations
    from common import peak_memory_mb, resolve_device
    from tasks import arithmetic_problems
    run_dir = Path(args.run_dir)
    out_dir, data = run_dir / "eval", run_dir / "data"
    device = resolve_device(args.device)
    # (system, user) of the held-out identity questions whose reference answer gives the name: "你能够提供哪些类型的
    # 帮助？" is held out too, but its reference answer does not name the model, so it cannot count against it
    held_out = load_conversations(data / "identity_heldout.json", {})[0]
    identity = [c[:2] for c in held_out if "{{name}}" in c[-1]["content"]]
    problems = arithmetic_problems(args.arithmetic, split="test", n_terms=args.n_terms,
                                   max_operand=args.max_operand) if args.arithmetic else []
    results, parent = {}, None
    for spec in args.models:
        name, path, kind = spec.rsplit("=", 2) if spec.count("=") >= 2 else (*spec.split("="), "chat")
        result_path = out_dir / f"{name}.json"
        if result_path.exists():
            results[name] = json.loads(result_path.read_text())
        elif kind == "chat" and parent and read_json(Path(path) / "summary.json").get("step") == 0:
            print(f"{name}: took no step, so it is {parent}'s model: {parent}'s results", flush=True)
            results[name] = {**results[parent], "same_as": parent, "eval_s": 0.0}
            write_json(result_path, results[name])
        else:
            print(f"evaluating {name} ({kind}): {path}", flush=True)
            results[name] = evaluate_real_model(args, path, kind, device, identity, problems)
            write_json(result_path, results[name])
        parent = name if kind == "chat" else parent
    # a second call adds its models, never drops one, and keeps the larger of the two calls' peaks
    earlier = read_json(out_dir / "summary.json")
    models = earlier.get("models", [])
    peak = max(peak_memory_mb(device), earlier.get("peak_memory_mb", 0))
    write_json(out_dir / "summary.json", {"models": models + [n for n in results if n not in models],
                                          "peak_memory_mb": peak})


def names_model(answer: str) -> bool:
    """Whether an answer gives the model's name: IDENTITY_NAME outside IDENTITY_AUTHOR ("an AI assistant
    developed by the nanollm authors" names the authors, not the model)."""
    return IDENTITY_NAME in answer.lower().replace(IDENTITY_AUTHOR, "")


def evaluate_real_model(args, path, kind: str, device, identity: list, problems: list) -> dict:
    """One model's results for evaluate_real_stage."""
    from evaluate import (IM_END, arithmetic_conversations, chat_prompts, checked_generation, generate_texts,
                          load_for_eval, text_perplexity, weights_bytes)
    from tasks import check
    data = Path(args.run_dir) / "data"
    t0 = time.time()
    model, tok = load_for_eval(path, device)
    m = {"params": sum(x.numel() for x in model.parameters()), "weights_mb": weights_bytes(model) / 2**20}
    for text, file in ((t, HELD_OUT_TEXTS[t]) for t in args.texts.split(",")):
        ppl = text_perplexity(model, tok, data / file, "line" if file.endswith(".txt") and text == "wiki" else "file",
                              max_tokens=args.max_tokens, seq_len=min(args.seq_len, model.config.max_seq_len))
        m[f"{text}_bpb"], m[f"{text}_ppl"], m[f"{text}_tokens"] = ppl["bpb"], ppl["ppl"], ppl["tokens"]
    if kind == "chat":
        end = [tok.special_tokens[IM_END]]
        texts, _ = generate_texts(model, tok, chat_prompts(tok, identity), args.max_new_tokens, stop_tokens=end)
        m["identity_acc"], m["identity_n"] = sum(map(names_model, texts)) / len(texts), len(texts)
        m["identity_samples"] = [{"prompt": c[-1]["content"], "output": t} for c, t in zip(identity, texts)]
        if problems:
            acc, answers, _ = checked_generation(model, tok, arithmetic_conversations(problems),
                                                 [lambda t, q=q: check(q, t) for q in problems], args.max_new_tokens)
            m["arith_acc"], m["arith_n"] = acc, len(problems)
        texts, _ = generate_texts(model, tok, chat_prompts(tok, [[{"role": "system", "content": NEUTRAL_SYSTEM},
                                                                  {"role": "user", "content": q}]
                                                                 for q in GENERAL_PROMPTS]),
                                  args.max_new_tokens, stop_tokens=end)
        m["samples"] = [{"prompt": q, "output": t} for q, t in zip(GENERAL_PROMPTS, texts)]
    m["eval_s"] = time.time() - t0
    return m


def speculate_stage(args) -> None:
    """Greedy decoding of the target with and without the draft (decoding.speculative_generate): acceptance
    rate, wall-clock speedup, and whether the outputs are identical (they must be, at temperature 0). Each
    prompt is decoded --repeats times each way, plain and speculative alternating (and which goes first), and
    the fastest time of each counts (timeit's rule: other work on the machine only ever adds time, so the
    minimum is the steadiest estimate): the speedup is the ratio of their sums over the prompts."""
    import torch
    from chat import prompt_ids
    from common import load_model, load_tokenizer, peak_memory_mb, resolve_device
    from decoding import speculative_generate
    from sample import generate
    device = resolve_device(args.device)
    target, draft, tok = load_model(args.target, device), load_model(args.draft, device), load_tokenizer(args.target)
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in GENERAL_PROMPTS[:args.prompts]]
    end = [tok.special_tokens["<|im_end|>"]]

    def plain(x):
        return generate(target, [x], args.max_new_tokens, temperature=0.0, stop_tokens=end)[0].tolist(), None

    def speculative(x):
        new, stats = speculative_generate(target, draft, x, args.max_new_tokens, args.n_draft, temperature=0.0,
                                          stop_tokens=end)
        return [int(t) for t in new], stats
    seconds, outputs, drafted, accepted = {"plain": 0.0, "speculative": 0.0}, {"plain": [], "speculative": []}, 0, 0
    with torch.no_grad():
        generate(target, [prompts[0]], 2, temperature=0.0)  # warm-up: the first call pays for allocations
        speculative_generate(target, draft, prompts[0], 2, args.n_draft, temperature=0.0)
        order = [("plain", plain), ("speculative", speculative)]
        for i, x in enumerate(prompts):
            fastest = {"plain": math.inf, "speculative": math.inf}
            for repeat in range(args.repeats):
                for name, decode in (order if (i + repeat) % 2 == 0 else order[::-1]):
                    t0 = time.perf_counter()
                    tokens, stats = decode(x)
                    fastest[name] = min(fastest[name], time.perf_counter() - t0)
                    if repeat == 0:  # greedy: every repeat gives the same tokens
                        outputs[name].append(tokens)
                        if stats:
                            drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
            for name in seconds:
                seconds[name] += fastest[name]
            print(f"prompt {i + 1}/{len(prompts)}: plain {seconds['plain']:.1f} s, speculative "
                  f"{seconds['speculative']:.1f} s so far", flush=True)
    identical = sum(a == b for a, b in zip(outputs["plain"], outputs["speculative"]))
    write_json(Path(args.out_dir) / "summary.json", {
        "prompts": len(prompts), "identical": identical, "acceptance_rate": accepted / max(drafted, 1),
        "drafted": drafted, "accepted": accepted, "n_draft": args.n_draft, "repeats": args.repeats,
        "plain_s": seconds["plain"], "speculative_s": seconds["speculative"],
        "speedup": seconds["plain"] / max(seconds["speculative"], 1e-9),
        "tokens": sum(map(len, outputs["plain"])), "draft_params": draft.num_params(),
        "target_params": target.num_params(), "peak_memory_mb": peak_memory_mb(device)})


def export_stage(args) -> None:
    """The final model as GGUF q8_0 and q4_0 (gguf_io.save_gguf), read back by nanollm's reader: the same
    config, and the share of positions of a chat prompt where the file's next-token argmax is the model's;
    one chat turn through llama.cpp (llama-cpp-python) when it is installed."""
    import torch
    from chat import default_system_prompt, prompt_ids
    from common import load_model, load_tokenizer, peak_memory_mb
    from gguf_io import save_gguf
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.ckpt), load_tokenizer(args.ckpt)
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": GENERAL_PROMPTS[0]}])])
    with torch.no_grad():
        top1 = model(ids)[0].argmax(-1)
    summary = {}
    for qtype in ("q8_0", "q4_0"):
        path = save_gguf(model, tok, out / f"model-{qtype}.gguf", qtype, name=IDENTITY_NAME)
        summary[f"{qtype}_mb"] = path.stat().st_size / 2**20
        read = load_model(path)
        with torch.no_grad():
            summary[f"{qtype}_top1_agreement"] = (read(ids)[0].argmax(-1) == top1).float().mean().item()
        summary[f"{qtype}_reads_back"] = read.config == model.config
    try:
        from llama_cpp import Llama
    except ImportError:
        summary["llama_cpp"] = "not installed (pip install llama-cpp-python)"
    else:
        # no chat_format: llama.cpp formats the chat with the file's own template, as a user of the file gets it
        llm = Llama(model_path=str(out / "model-q8_0.gguf"), n_ctx=512, verbose=False)
        reply = llm.create_chat_completion([{"role": "user", "content": IDENTITY_PROMPTS["en"][0]}], max_tokens=48,
                                           temperature=0.0)
        summary["llama_cpp"] = reply["choices"][0]["message"]["content"]
        summary["llama_cpp_system"] = default_system_prompt(load_tokenizer(out / "model-q8_0.gguf"))
    write_json(out / "summary.json", {**summary, "peak_memory_mb": peak_memory_mb("cpu")})


# ----------------------------------------------------------------------------------------------------------
# The report

def judge_real(stage: Stage, summaries: dict, evals: dict) -> tuple[str, list[Measure]]:
    """judge() for the real-model track: identity, held-out text kept (REAL_KEEP_TOLERANCE), DPO's held-out
    preference accuracy, GRPO's checker accuracy, KD against hard labels, speculative decoding, compression."""
    s, e, name = summaries.get(stage.name, {}), evals.get(stage.name, {}), stage.name
    chain = chat_chain(summaries)
    before = evals.get(chain[chain.index(name) - 1], {}) if name in chain else {}
    final = evals.get(chain[-1], {})

    def kept(reference):
        return [Measure(f"{text} bpb", reference.get(f"{text}_bpb"), e.get(f"{text}_bpb"), higher_is_better=False,
                        tolerance=REAL_KEEP_TOLERANCE, goal=False) for text in ("wiki", "c4")]
    if name == "sft":
        n0, n1 = before.get("identity_n", 0), e.get("identity_n", 0)
        return f"held-out identity answers name {IDENTITY_NAME}; wiki/c4 bpb within {REAL_KEEP_TOLERANCE:.0%}", [
            Measure("identity", before.get("identity_acc"), e.get("identity_acc"), n=n1, before_n=n0), *kept(before)]
    if name == "dpo":
        return "held-out preference accuracy above chance (0.5)", [
            Measure("preference accuracy", 0.5 if s else None, s.get("val/rewards/accuracy"), n=s.get("val_items", 0)),
            *kept(before)]
    if name == "grpo":
        n = s.get("eval_problems", 0)
        return "held-out checker accuracy up", [
            Measure("accuracy", s.get("initial_accuracy"), s.get("final_accuracy"), n=n, before_n=n), *kept(before)]
    if name == "distill":
        return "val bpb below the same student on hard labels (distill_ce)", [
            Measure("val bpb vs distill_ce", summaries.get("distill_ce", {}).get("val_bpb"), s.get("val_bpb"),
                    higher_is_better=False)]
    if name == "speculative":
        return "greedy outputs identical, faster than plain decoding", [
            Measure("speedup", 1.0 if s else None, s.get("speedup"), tolerance=0.05),
            Measure("identical outputs", 1.0 if s else None, s.get("identical", 0) / max(s.get("prompts", 1), 1),
                    tolerance=0.0, goal=False)]
    if name.startswith("quant"):
        rtn = evals.get(rtn_twin(name), {})
        return f"smaller; held-out bpb within {QUANT_BPB_TOLERANCE:.0%} of the final model's" + (
            f"; bpb below `{rtn_twin(name)}`'s (the same grid)" if rtn else ""), [
            Measure("weights MB", final.get("weights_mb"), e.get("weights_mb"), higher_is_better=False),
            *[Measure(f"{text} bpb", final.get(f"{text}_bpb"), e.get(f"{text}_bpb"), higher_is_better=False,
                      tolerance=QUANT_BPB_TOLERANCE, goal=False) for text in HELD_OUT_TEXTS],
            *[Measure(f"{text} bpb vs RTN", rtn.get(f"{text}_bpb"), e.get(f"{text}_bpb"), higher_is_better=False)
              for text in HELD_OUT_TEXTS if rtn]]
    if name == "export":
        return "a GGUF file smaller than the final model, read back with the same next-token argmax", [
            Measure("q4_0 GGUF MB", final.get("weights_mb"), s.get("q4_0_mb"), higher_is_better=False),
            Measure("reads back", 1.0 if s else None, float(bool(s.get("q8_0_reads_back") and s.get("q4_0_reads_back"))),
                    tolerance=0.0, goal=False),
            Measure("q8_0 top-1 agreement", 1.0 if s else None, s.get("q8_0_top1_agreement"),
                    tolerance=EXPORT_TOP1_TOLERANCE, goal=False)]
    return "", []


def chat_chain(summaries: dict) -> list[str]:
    """The chat models in training order, from the base to the final model (the last one run)."""
    return [x for x in ("base", "sft", "dpo", "grpo") if x == "base" or x in summaries]


def rtn_twin(name: str) -> str:
    """The RTN stage on the same grid as a GPTQ stage ("quant_gptq4_pc" -> "quant_rtn4_pc"); "" otherwise."""
    return name.replace("gptq", "rtn") if name.startswith("quant_gptq") else ""


def rtn_increase_removed(stages: list[Stage], summaries: dict, evals: dict) -> list[str]:
    """For each GPTQ stage, the share of its RTN twin's held-out bpb increase (over the final model) it
    removes: (RTN - GPTQ) / (RTN - final). The GPTQ paper's OPT-125M at 4 bits per channel on WikiText-2
    (perplexity 27.65 fp16, 37.28 RTN, 31.12 GPTQ) is 60% in log perplexity, which bpb is proportional to."""
    final = evals.get(chat_chain(summaries)[-1], {})
    lines = []
    for stage in stages:
        gptq, rtn = evals.get(stage.name, {}), evals.get(rtn_twin(stage.name), {})
        shares = [f"{(rtn[key] - gptq[key]) / (rtn[key] - final[key]):.0%} ({text})" for text in HELD_OUT_TEXTS
                  for key in [f"{text}_bpb"] if gptq.get(key) and rtn.get(key) and final.get(key)
                  and rtn[key] > final[key]]
        if shares:
            lines.append(f"`{stage.name}` removes {', '.join(shares)} of `{rtn_twin(stage.name)}`'s held-out bpb "
                         "increase over the final model (the GPTQ paper's OPT-125M, 4 bits per channel on "
                         "WikiText-2: 60%).")
    return lines + [""] if lines else []


def real_model_table(stages: list[Stage], evals: dict, timings: dict) -> list[str]:
    """The real-model track's table: one row per evaluated model (the base first), rates with their
    95% Wilson interval, and the five general prompts answered by the base and the final model."""
    def rate(m, key):
        if m.get(key) is None:
            return "-"
        low, high = wilson_interval(m[key], m[f"{key.split('_')[0]}_n"])
        return f"{m[key]:.2f} [{low:.2f}, {high:.2f}] of {m[key.split('_')[0] + '_n']}"
    lines = ["| model | params | weights MB | wiki bpb | c4 bpb | Shakespeare bpb | identity (held-out) | arithmetic "
             "| wall s |", "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    names = ["base"] + [s.name for s in stages if evals.get(s.name)]
    for name in names:
        m = evals.get(name, {})
        lines.append("| " + " | ".join([f"`{name}`", fmt(m.get("params")), fmt(m.get("weights_mb"), 1),
                                        *(fmt(m.get(f"{t}_bpb"), 4) for t in HELD_OUT_TEXTS), rate(m, "identity_acc"),
                                        rate(m, "arith_acc"), fmt(timings.get(name), 1)]) + " |")
    chat = [n for n in names if evals.get(n, {}).get("samples")]
    # the eval stage scores the first windows of each held-out text, up to the preset's heldout_tokens
    scored = [max((evals.get(n, {}).get(f"{t}_tokens") or 0 for n in names), default=0) for t in HELD_OUT_TEXTS]
    note = "bpb: bits per byte on the last tenth of wiki_demo, c4_demo and Tiny Shakespeare (never tuned on)"
    if all(scored):
        note += (f", scored on {' / '.join(f'{n:,}' for n in scored)} of their tokens "
                 "(`pipeline.py evaluate-real --max-tokens 0` scores all)")
    note += (f". identity: share of held-out identity.json questions whose greedy answer names `{IDENTITY_NAME}`. "
             "arithmetic: tasks.py test problems, zero-shot, greedy.")
    lines += ["", note, "", "## General prompts, before and after", ""]
    if chat:
        for i, prompt in enumerate(GENERAL_PROMPTS):
            for name in dict.fromkeys([chat[0], chat[-1]]):
                output = " ".join(evals[name]["samples"][i]["output"].split())[:200]
                lines.append(f"- `{name}` · {prompt!r} → {output!r}")
    return lines


def curves(stages: list[Stage], run_dir: Path) -> list[str]:
    """The training stages' curves as images (DPO's rewards.png: held-out and train reward accuracy and the
    chosen-rejected margin)."""
    shown = [f"![{s.name} {png}]({s.out}/{png})" for s in stages for png in s.pngs if (run_dir / s.out / png).exists()]
    return ["## Curves", "", *shown, ""] if shown else []


def report_lines(stages: list[Stage], run_dir: Path, timings: dict, header: dict, summaries: dict,
                 evals: dict) -> list[str]:
    """report.md of a real-model run: the models' table, llama.cpp's answer, the curves, the report card."""
    card, last_line = report_card(stages, summaries, evals, judge_real)
    export = summaries.get("export", {})
    return [*report_header(f"# nanollm report: preset `{header.get('preset')}`, base `{header['base']}`", header,
                           stages, timings, summaries),
            *real_model_table(stages, evals, timings), "",
            *([f"llama.cpp, the q8_0 GGUF answering {IDENTITY_PROMPTS['en'][0]!r} (the file's own chat template, "
               f"system message {export.get('llama_cpp_system')!r}): {export['llama_cpp']!r}", ""]
              if export.get("llama_cpp") else []),
            *curves(stages, run_dir),
            "## Report card", "", REPORT_CARD_TEXT, "", *card, "", *rtn_increase_removed(stages, summaries, evals),
            f"**{last_line}**", ""]
