"""The whole chain in one command: text -> tokenizer -> pretrained model -> chat model (SFT, RL, DPO) ->
distilled student -> quantized model, every stage evaluated, and a report card (report.md).

    python pipeline.py --preset cpu-tiny --data-dir ../shared/data --out-dir runs/tiny         # < 20 min, 2-core CPU
    python pipeline.py --preset cpu-tiny --data-dir ../shared/data --out-dir runs/tiny-zh --lang zh
    python pipeline.py --preset ci --data-dir ../shared/data --out-dir /tmp/ci                 # a few minutes
    python pipeline.py --preset gpu --data-dir ../shared/data --out-dir runs/gpu --device cuda
    python pipeline.py --preset cpu-tiny --out-dir runs/tiny                                   # downloads the data first
    python pipeline.py --base smollm2 --preset quick --data-dir ../shared/data --out-dir runs/smol  # a real model

Each stage is a subprocess of the project's own scripts (build_stages lists them in order, with their
flags: chat_data, tokenizer, prepare, pretrain, sft, sft_lora, reward, grpo, ppo, dpo, distill_ce, distill,
distill_gen, distill_sft, quant_rtn, quant_gptq, eval, sample), its log in OUT/logs/<stage>.log. A stage is
done when its output directory holds summary.json (written last), so a rerun skips finished stages and
training stages continue from their checkpoint (--resume, passed once the stage's directory holds one). A
failing stage stops the run with one line naming the stage and its log. --data-dir is a folder laid out
like ../shared/data; without it the files are downloaded once from their public URLs (DATA_URLS) into
OUT/downloads. The CPU presets are small: their quality numbers are only indicative.

The real-model track (--base MODEL: a .gguf, a Hugging Face or nanollm directory; smollm2 is
SmolLM2-135M-Instruct as `gguf_io.py fetch` gets it) post-trains a published chat model instead of
pretraining one (build_real_stages: data, text_data, sft, dpo, grpo, distill_cache, distill_ce, distill,
speculative, quant_rtn8, quant_rtn4, quant_gptq4, quant_nf4, export, eval); REAL_PRESETS: ci (every stage
on a tiny stand-in), quick (identity + DPO + quantize + export), full. Before the first stage, check_base
refuses a model it cannot use (architecture, a tokenizer without ChatML, too large for the memory),
naming the file and the reason.

OUT/run.json records the preset, language and base model; a rerun with other ones refuses, and so does a
--data-dir that lacks a file the run reads, before any stage starts. report.md has one table of every
stage's metrics, the loss curves, sample generations, the machine, the commit, each stage's wall time, and
the report card: each stage judged from its numbers (verdicts.py: worked / no effect / regressed /
starved, rates with 95% intervals); its last line, also the run's last line, says how many stages worked.
`python pipeline.py evaluate | evaluate-real | speculate | export ...` are stages' workers (see *_stage).
"""
import argparse
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from verdicts import Measure, in_words, stage_verdict, steps_text, tally, wilson_interval

REPO = Path(__file__).resolve().parent
IDENTITY_NAME, IDENTITY_AUTHOR = "nanollm", "the nanollm authors"

# Per preset: the vocabulary, the corpus choice and every stage's extra flags. Budgets are in steps and
# (on the CPU presets) in seconds (--max-time), so a slow shared machine ends stages early, not late.
PRESETS = {
    # the end-to-end test: tiny sizes, every stage a few seconds
    "ci": dict(
        vocab_size={"en": 512, "zh": 1024}, zh_source="tang_poems/tangshisanbaishou.json",
        n_arith_sft=300, n_arith_pairs=200, eval_tokens=8192, eval_arith=20,
        pretrain=["--model", "tiny", "--seq-len", "128", "--batch-size", "8", "--max-steps", "60",
                  "--lr", "3e-3", "--warmup-steps", "20", "--eval-interval", "150", "--eval-tokens", "8192",
                  "--sample-tokens", "0", "--log-interval", "25"],
        sft=["--max-len", "128", "--batch-size", "8", "--max-steps", "40", "--lr", "2e-3", "--warmup-steps", "4",
             "--eval-interval", "40", "--eval-prompts", "8", "--eval-new-tokens", "16", "--log-interval", "10"],
        sft_lora=["--lora-rank", "8", "--lora-embedding-rank", "1",
                  "--max-len", "128", "--batch-size", "8", "--max-steps", "20", "--lr", "5e-3",
                  "--warmup-steps", "2", "--eval-interval", "20", "--eval-prompts", "8", "--eval-new-tokens", "16",
                  "--log-interval", "10"],
        reward=["--n-problems", "100", "--pairs-per-problem", "2", "--n-eval-problems", "20", "--max-len", "64",
                "--batch-size", "16", "--max-steps", "20", "--eval-interval", "20", "--log-interval", "5"],
        grpo=["--n-train", "100", "--n-eval", "20", "--prompts-per-step", "4", "--samples-per-prompt", "4",
              "--max-steps", "4", "--eval-interval", "4", "--log-interval", "1"],
        ppo=["--n-train", "100", "--n-eval", "20", "--prompts-per-step", "8", "--max-steps", "4", "--eval-interval", "4",
             "--log-interval", "1"],
        dpo=["--max-len", "128", "--batch-size", "4", "--max-steps", "10", "--eval-interval", "10",
             "--log-interval", "5", "--lr", "1e-4"],
        distill=["--model", "tiny", "--n-layers", "1", "--dim", "32", "--n-heads", "2", "--n-kv-heads", "2",
                 "--hidden-dim", "96", "--seq-len", "128", "--batch-size", "8", "--max-steps", "40", "--lr", "3e-3",
                 "--warmup-steps", "5", "--eval-interval", "40", "--eval-tokens", "8192", "--sample-tokens", "0",
                 "--log-interval", "20"],
        n_student_arith=40, distill_gen=["--max-new-tokens", "16"],
        distill_sft=["--max-len", "128", "--batch-size", "8", "--max-steps", "20", "--lr", "2e-3", "--warmup-steps", "2",
                     "--eval-interval", "20", "--eval-prompts", "8", "--eval-new-tokens", "16", "--log-interval", "10"],
        quant=["--group-size", "32"], gptq=["--calib-samples", "8", "--calib-seq-len", "64"],
        sample=["--max-new-tokens", "32", "--num-samples", "2"]),
    # a 2-core CPU in under 20 minutes: the time budgets (--max-time) add up to about 14 minutes
    "cpu-tiny": dict(
        vocab_size={"en": 2048, "zh": 4096}, zh_source="tang_poems",
        n_arith_sft=300, n_arith_pairs=800, eval_tokens=65536, eval_arith=100,
        pretrain=["--preset", "cpu-shakespeare", "--seq-len", "128", "--max-steps", "3000", "--max-time", "270",
                  "--eval-interval", "1000", "--sample-tokens", "0"],
        sft=["--max-len", "192", "--batch-size", "8", "--max-steps", "400", "--max-time", "100", "--lr", "1e-3",
             "--min-lr", "1e-4", "--eval-interval", "200", "--eval-prompts", "16", "--eval-new-tokens", "32"],
        sft_lora=["--lora-rank", "16", "--lora-embedding-rank", "1",
                  "--max-len", "192", "--batch-size", "8", "--max-steps", "200", "--max-time", "60",
                  "--lr", "5e-3", "--eval-interval", "200", "--eval-prompts", "16", "--eval-new-tokens", "32"],
        reward=["--n-problems", "400", "--n-eval-problems", "100", "--max-len", "64", "--max-steps", "200",
                "--max-time", "45"],
        grpo=["--n-eval", "100", "--max-steps", "100", "--max-time", "75", "--eval-interval", "20"],
        ppo=["--n-eval", "100", "--prompts-per-step", "16", "--max-steps", "60", "--max-time", "60", "--eval-interval", "20"],
        dpo=["--max-len", "256", "--batch-size", "4", "--max-steps", "100", "--max-time", "50", "--eval-interval", "50"],
        distill=["--preset", "cpu-shakespeare-student", "--seq-len", "128", "--max-steps", "400", "--max-time", "75",
                 "--eval-interval", "400"],
        n_student_arith=200, distill_gen=["--max-new-tokens", "48"],
        distill_sft=["--max-len", "128", "--batch-size", "8", "--max-steps", "300", "--max-time", "45", "--lr", "1e-3",
                     "--min-lr", "1e-4", "--eval-interval", "300", "--eval-prompts", "16", "--eval-new-tokens", "32"],
        quant=["--group-size", "32"], gptq=["--calib-samples", "32", "--calib-seq-len", "128"],
        sample=["--max-new-tokens", "64", "--num-samples", "3"]),
    # about an hour on a 2-core CPU: the time budgets add up to 55 minutes
    "cpu-small": dict(
        vocab_size={"en": 4096, "zh": 8192}, zh_source="tang_poems",
        n_arith_sft=300, n_arith_pairs=800, eval_tokens=0, eval_arith=100,
        pretrain=["--preset", "cpu-shakespeare", "--n-layers", "6", "--dim", "256", "--n-heads", "8",
                  "--n-kv-heads", "4", "--hidden-dim", "768", "--seq-len", "256", "--batch-size", "16",
                  "--max-steps", "20000", "--max-time", "1080", "--eval-interval", "2000", "--sample-tokens", "0"],
        sft=["--max-len", "256", "--batch-size", "8", "--max-steps", "2000", "--max-time", "420", "--lr", "5e-4",
             "--min-lr", "5e-5", "--eval-interval", "500", "--eval-new-tokens", "48"],
        sft_lora=["--lora-rank", "16", "--lora-embedding-rank", "1",
                  "--max-len", "256", "--batch-size", "8", "--max-steps", "1000",
                  "--max-time", "180", "--lr", "3e-3", "--eval-interval", "500", "--eval-new-tokens", "48"],
        reward=["--max-len", "64", "--max-steps", "400", "--max-time", "150"],
        grpo=["--n-eval", "100", "--max-steps", "200", "--max-time", "300"],
        ppo=["--n-eval", "100", "--max-steps", "150", "--max-time", "240"],
        dpo=["--max-len", "384", "--batch-size", "4", "--max-steps", "300", "--max-time", "240"],
        distill=["--preset", "cpu-shakespeare-student", "--dim", "64", "--n-heads", "4", "--n-kv-heads", "4",
                 "--hidden-dim", "192", "--seq-len", "256", "--max-steps", "1500", "--max-time", "240",
                 "--eval-interval", "500"],
        n_student_arith=200, distill_gen=["--max-new-tokens", "64"],
        distill_sft=["--max-len", "256", "--batch-size", "8", "--max-steps", "1000", "--max-time", "180", "--lr", "1e-3",
                     "--min-lr", "1e-4", "--eval-interval", "500", "--eval-new-tokens", "48"],
        quant=["--group-size", "64"], gptq=["--calib-samples", "64", "--calib-seq-len", "256"],
        sample=["--max-new-tokens", "128", "--num-samples", "3"]),
    # one CUDA GPU: llama-124m-shaped base, bf16
    "gpu": dict(
        vocab_size={"en": 8192, "zh": 16384}, zh_source="tang_poems",
        n_arith_sft=300, n_arith_pairs=800, eval_tokens=0, eval_arith=100,
        pretrain=["--model", "small", "--n-layers", "12", "--dim", "768", "--n-heads", "12", "--n-kv-heads", "4",
                  "--hidden-dim", "2048", "--seq-len", "512", "--batch-size", "32", "--max-steps", "5000",
                  "--lr", "6e-4", "--min-lr", "6e-5", "--warmup-steps", "200", "--eval-interval", "1000"],
        sft=["--max-len", "512", "--batch-size", "16", "--max-steps", "2000", "--lr", "1e-4"],
        sft_lora=["--lora-rank", "16", "--lora-embedding-rank", "1",
                  "--max-len", "512", "--batch-size", "16", "--max-steps", "1000", "--lr", "1e-3"],
        reward=["--max-len", "128", "--max-steps", "600"],
        grpo=["--n-eval", "100", "--prompts-per-step", "32", "--max-steps", "300"],
        ppo=["--n-eval", "100", "--prompts-per-step", "64", "--max-steps", "300"],
        dpo=["--max-len", "512", "--batch-size", "8", "--max-steps", "400"],
        distill=["--model", "small", "--n-layers", "4", "--dim", "256", "--n-heads", "4", "--n-kv-heads", "4",
                 "--hidden-dim", "768", "--seq-len", "512", "--batch-size", "32", "--max-steps", "3000",
                 "--lr", "1e-3", "--eval-interval", "1000"],
        n_student_arith=400, distill_gen=["--max-new-tokens", "128", "--batch-size", "64"],
        distill_sft=["--max-len", "512", "--batch-size", "16", "--max-steps", "1000", "--lr", "2e-4"],
        quant=["--group-size", "128"], gptq=["--calib-samples", "128", "--calib-seq-len", "512"],
        sample=["--max-new-tokens", "256", "--num-samples", "3"]),
}

# Where each file of the --data-dir layout comes from (../shared/data/README.md), for a run without it.
LLAMA_FACTORY = "https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/main/data/"
CHINESE_POETRY = "https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/master/"
DATA_URLS = {
    **{f"{folder}/{name}": LLAMA_FACTORY + name
       for folder, names in (("pretrain", ["wiki_demo.txt", "c4_demo.jsonl"]),
                             ("sft", ["identity.json", "alpaca_en_demo.json", "alpaca_zh_demo.json"]),
                             ("preference", ["dpo_en_demo.json", "dpo_zh_demo.json"]))
       for name in names},
    **{f"tang_poems/poet.tang.{i}.json": CHINESE_POETRY + quote(f"全唐诗/poet.tang.{i}.json") for i in range(0, 58000, 1000)},
    "tang_poems/tangshisanbaishou.json": CHINESE_POETRY + quote("蒙学/tangshisanbaishou.json"),
    "tinyshakespeare/input.txt": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
}
# The real-model track: a fine-tuning stage "regressed" when held-out wiki/c4 bpb rose more than this
REAL_KEEP_TOLERANCE = 0.05
# The q8_0 GGUF read back "regressed" when its next-token argmax differs from the model's at more positions
EXPORT_TOP1_TOLERANCE = 0.1
# A quantized model "regressed" when its val bpb is more than this much above the final model's
QUANT_BPB_TOLERANCE = 0.05
# DPO continues from PPO's policy instead of GRPO's only when PPO's held-out arithmetic accuracy is higher by this much
PPO_CLEARLY_BETTER = 0.05

# The eval stage's prompts: identity questions (answered right when the answer names the model) and open ones.
IDENTITY_PROMPTS = {"en": ["Who are you?", "What is your name?", "Can you introduce yourself?", "Who created you?",
                           "What are you called?"],
                    "zh": ["你是谁？", "请告诉我你的名字", "你的名字是什么？谁创造了你？", "你有名字吗？", "能介绍一下你自己吗？"]}
OPEN_PROMPTS = {"en": ["Give three tips for staying healthy.", "What is 4 + 3 + 2?"],
                "zh": ["写一首关于春天的诗。", "What is 4 + 3 + 2?"]}
RAW_PROMPTS = {"en": ["The history of", "In 1990, the"], "zh": ["春晓\n", "静夜思\n"]}


class PipelineError(RuntimeError):
    """A stage failed: the message is one line naming the stage and its log."""


@dataclass
class Stage:
    name: str
    what: str                      # one line for the report
    out: str                       # output directory, relative to the run directory
    commands: list                 # argv lists run in order, or a callable(run_dir) doing the work in-process
    writes_summary: bool = True    # False: the pipeline writes out/summary.json once the commands succeed
    kind: str = ""                 # "base" | "chat" | "" : which evaluation the stage's checkpoint gets
    pngs: list = field(default_factory=list)

    def summary_path(self, run_dir: Path) -> Path:
        return run_dir / self.out / "summary.json"


def py(script, *args) -> list:
    return [sys.executable, str(REPO / script), *(arg if callable(arg) else str(arg) for arg in args)]


def corpus_source(preset: str, lang: str) -> str:
    """The pretraining corpus, a file or folder of the --data-dir layout."""
    return "pretrain" if lang == "en" else PRESETS[preset]["zh_source"]


def data_files(preset: str, lang: str) -> list[str]:
    """Every file of the --data-dir layout that a preset and language read."""
    corpus = corpus_source(preset, lang)
    return ([f for f in DATA_URLS if f == corpus or f.startswith(corpus + "/")] +
            ["sft/identity.json", f"sft/alpaca_{lang}_demo.json", f"preference/dpo_{lang}_demo.json"])


def download_data(files: list[str], dest: Path, base_url: str = "") -> None:
    """Each file from its public URL (DATA_URLS), or from base_url + its path (a mirror of the layout), into
    dest in the --data-dir layout. data/corpus.py's fetch does the work: a file already there is kept, a new
    one is written to FILE.part and renamed, a failure names the URL."""
    from data.corpus import CorpusError, fetch
    for name in files:
        url = base_url.rstrip("/") + "/" + quote(name) if base_url else DATA_URLS[name]
        try:
            fetch(url, dest / Path(name).parent)
        except CorpusError as e:
            raise PipelineError(f"{e} (pipeline.py: or pass --data-dir with a local copy of the data)") from None


def missing_data(files: list[str], data_dir: Path) -> list[str]:
    """The files of the --data-dir layout that a run reads and data_dir lacks."""
    return [f for f in files if not (Path(data_dir) / f).is_file()]


RUN_FILE = "run.json"  # the run directory's choices: a rerun with other ones would mix two runs' stages


def recorded_choices(run_dir: Path) -> dict:
    """The choices a run directory was made with: run.json, or for a run older than run.json the first
    line of its report.md ("# nanollm report: preset `P`, lang `L`")."""
    recorded = read_json(Path(run_dir) / RUN_FILE)
    report = Path(run_dir) / "report.md"
    if not recorded and report.exists():
        match = re.match(r"# nanollm report: preset `([^`]*)`, lang `([^`]*)`", report.read_text().split("\n", 1)[0])
        recorded = {"preset": match[1], "lang": match[2]} if match else {}
    return recorded


def check_run_dir(run_dir: Path, choices: dict) -> dict:
    """The choices (preset, language, base model) to record in run_dir/run.json, checked against the ones
    recorded there: stages are skipped when their summary.json exists, so a rerun with other choices
    would label the first run's outputs as its own. Raises PipelineError, one line, on a mismatch."""
    recorded = recorded_choices(run_dir)
    changed = [k for k, v in choices.items() if k in recorded and recorded[k] != v]
    if changed:
        was = " ".join(f"--{k} {recorded[k] or '(none)'}" for k in changed)
        now = " ".join(f"--{k} {choices[k] or '(none)'}" for k in changed)
        raise PipelineError(f"{run_dir} holds a run made with {was}, not {now}: give another --out-dir")
    return {**recorded, **choices}


def rl_policy(summaries: dict) -> str:
    """The RL stage DPO continues from: grpo, unless ppo's held-out accuracy is clearly (PPO_CLEARLY_BETTER) higher."""
    grpo, ppo = summaries.get("grpo", {}).get("final_accuracy"), summaries.get("ppo", {}).get("final_accuracy")
    return "ppo" if grpo is not None and ppo is not None and ppo >= grpo + PPO_CLEARLY_BETTER else "grpo"


def build_stages(preset: str, lang: str, data_dir: Path, run_dir: Path, device: str = "auto") -> list[Stage]:
    """The chain for one preset and language, as a list of stages with their exact commands (an argument
    that is a callable(run_dir) is filled in when its stage starts)."""
    p = PRESETS[preset]
    d, r = Path(data_dir), Path(run_dir)
    dev = ["--device", device]
    corpus = d / corpus_source(preset, lang)
    corpus_args = ["--txt-docs", "line"] if lang == "en" else []  # wiki_demo.txt: a document a line
    alpaca, preference = d / "sft" / f"alpaca_{lang}_demo.json", d / "preference" / f"dpo_{lang}_demo.json"
    sets = ["--set", f"name={IDENTITY_NAME}", "--set", f"author={IDENTITY_AUTHOR}"]
    sft_data = ",".join(map(str, [d / "sft" / "identity.json", r / "chat_data" / "arithmetic_sft.jsonl", alpaca]))
    sft_eval = ["--eval-data", r / "chat_data" / "arithmetic_sft_eval.jsonl"]  # short held-out prompts (see write_chat_data)
    dpo_data = ",".join(map(str, [preference, r / "chat_data" / "arithmetic_pairs.jsonl"]))
    data = r / "data"
    # zh: the Tang poems have no English and little modern Chinese, so the tokenizer also learns from the
    # SFT chats it must spell (en: the pretraining corpus already covers them)
    tokenizer_extra = [r / "chat_data" / "tokenizer_text.jsonl"] if lang == "zh" else []
    stages = [
        Stage("chat_data", "tasks.py: arithmetic SFT chats, preference pairs and the student's prompts (JSONL)", "chat_data",
              lambda run_dir: write_chat_data(run_dir / "chat_data", p["n_arith_sft"], p["n_arith_pairs"],
                                              p["n_student_arith"], d / "sft" / "identity.json", alpaca),
              writes_summary=False),
        Stage("tokenizer", f"bpe.py: {p['vocab_size'][lang]}-token BPE on {corpus.name}"
              + (" + the SFT chats" if tokenizer_extra else ""), "tokenizer",
              [py("bpe.py", "train", "--input", corpus, *tokenizer_extra, "--vocab-size", p["vocab_size"][lang],
                  "--out-dir", r / "tokenizer")], writes_summary=False),
        Stage("prepare", "data/prepare.py --curate: curated train/val token shards", "data",
              [py("data/prepare.py", "--source", corpus, *corpus_args, "--curate",
                  "--tokenizer", r / "tokenizer" / "tokenizer", "--out-dir", data)], writes_summary=False),
        Stage("pretrain", "train.py: the base model", "pretrain",
              [py("train.py", "--data", data, "--out-dir", r / "pretrain", *p["pretrain"], *dev, "--resume")],
              kind="base", pngs=["loss.png"]),
        Stage("sft", "sft.py: full fine-tuning (identity + arithmetic + alpaca)", "sft",
              [py("sft.py", "--init", r / "pretrain", "--data", sft_data, *sets, *sft_eval, "--out-dir", r / "sft", *p["sft"],
                  *dev, "--resume")], kind="chat", pngs=["loss.png"]),
        Stage("sft_lora", "sft.py --lora-rank: LoRA fine-tuning on the same data", "sft_lora",
              [py("sft.py", "--init", r / "pretrain", "--data", sft_data, *sets, *sft_eval, "--out-dir", r / "sft_lora",
                  *p["sft_lora"], *dev, "--resume")], kind="chat", pngs=["loss.png"]),
        Stage("reward", "rlhf.py reward: Bradley-Terry reward model (arithmetic pairs)", "reward",
              [py("rlhf.py", "reward", "--init", r / "sft", "--data", "arithmetic", "--out-dir", r / "reward",
                  *p["reward"], *dev, "--resume")], pngs=["curves.png"]),
        Stage("grpo", "rlhf.py grpo: RL against the verifiable arithmetic reward", "grpo",
              [py("rlhf.py", "grpo", "--init", r / "sft", "--out-dir", r / "grpo", *p["grpo"], *dev, "--resume")],
              kind="chat", pngs=["curves.png"]),
        Stage("ppo", "rlhf.py ppo: RL against the trained reward model (a side branch)", "ppo",
              [py("rlhf.py", "ppo", "--init", r / "sft", "--reward-model", r / "reward", "--out-dir", r / "ppo",
                  *p["ppo"], *dev, "--resume")], kind="chat", pngs=["curves.png"]),
        Stage("dpo", f"dpo.py: DPO of the RL model on {preference.name} + arithmetic pairs (the final chat model)", "dpo",
              [py("dpo.py", "--init", lambda run_dir: run_dir / rl_policy(read_summaries(run_dir, ["grpo", "ppo"])),
                  "--data", dpo_data, *sets, "--out-dir", r / "dpo", *p["dpo"], *dev, "--resume")],
              kind="chat", pngs=["loss.png", "rewards.png"]),
        Stage("distill_ce", "distill.py --alpha 0: the student on hard labels only (baseline)", "distill_ce",
              [py("distill.py", "--data", data, "--out-dir", r / "distill_ce", *p["distill"], "--alpha", "0",
                  *dev, "--resume")], kind="base", pngs=["loss.png"]),
        Stage("distill", "distill.py: the same student taught by the base model (forward KL, T=2)", "distill",
              [py("distill.py", "--data", data, "--teacher", r / "pretrain", "--out-dir", r / "distill",
                  *p["distill"], *dev, "--resume")], kind="base", pngs=["loss.png"]),
        Stage("distill_gen", "distill.py generate: the final chat model answers arithmetic and identity prompts",
              "distill_gen", [py("distill.py", "generate", "--teacher", r / "dpo", "--prompts",
                                 r / "chat_data" / "student_prompts.jsonl", "--out", r / "distill_gen" / "teacher.jsonl",
                                 "--keep-unfinished", *p["distill_gen"], *dev)], writes_summary=False),
        Stage("distill_sft", "sft.py: the KD student fine-tuned on the teacher's answers (a chat student)",
              "distill_sft", [py("sft.py", "--init", r / "distill", "--data", r / "distill_gen" / "teacher.jsonl",
                                 *sft_eval, "--out-dir", r / "distill_sft", *p["distill_sft"], *dev, "--resume")],
              kind="chat", pngs=["loss.png"]),
        Stage("quant_rtn", "quant.py: the final chat model to int4, round to nearest", "quant_rtn",
              [py("quant.py", "--ckpt", r / "dpo", "--out-dir", r / "quant_rtn", "--method", "rtn", "--bits", "4",
                  *p["quant"], "--data", data, "--no-eval", *dev)], kind="chat"),
        Stage("quant_gptq", "quant.py --method gptq: int4 GPTQ of the final chat model", "quant_gptq",
              [py("quant.py", "--ckpt", r / "dpo", "--out-dir", r / "quant_gptq", "--method", "gptq", "--bits", "4",
                  *p["quant"], *p["gptq"], "--data", data, "--no-eval", *dev)], kind="chat"),
    ]
    evaluated = [f"{s.name}={s.kind}" for s in stages if s.kind]
    stages.append(Stage("eval", "eval.py: every checkpoint on the same held-out data and prompts", "eval",
                        [py("pipeline.py", "evaluate", "--run-dir", r, "--data", data, "--lang", lang,
                            "--max-tokens", p["eval_tokens"], "--arithmetic", p["eval_arith"], *dev, *evaluated)]))
    chat_prompt = f"<|im_start|>user\n{IDENTITY_PROMPTS[lang][0]}<|im_end|>\n<|im_start|>assistant\n"
    stages.append(Stage("sample", "sample.py: the final chat model answers (temperature 0.8, top-k 50)", "sample",
                        [py("sample.py", "--ckpt", r / "dpo", "--prompt", chat_prompt, "--temperature", "0.8",
                            "--top-k", "50", "--seed", "0", "--stop", "<|im_end|>", *p["sample"], *dev)],
                        writes_summary=False))
    return stages


def write_chat_data(out: Path, n_sft: int, n_pairs: int, n_student: int, identity: Path, alpaca: Path) -> None:
    """tasks.py's arithmetic as chat.py formats: messages conversations for SFT, prompt pairs for DPO,
    test-split conversations as SFT's held-out set (sft.py answers its held-out prompts untruncated, so
    they must fit the context: alpaca's long inputs do not at the ci sizes), the chat student's
    prompts for the teacher: arithmetic questions (with their answers, so distill.py generate checks the
    teacher) and identity.json's questions; and the text of every SFT conversation (identity, arithmetic,
    alpaca) as tokenizer_text.jsonl, which the zh track's tokenizer learns from besides its corpus."""
    from chat import load_conversations, read_records
    from tasks import arithmetic_problems, preference_pairs, sft_conversations
    out.mkdir(parents=True, exist_ok=True)
    chats = sft_conversations(arithmetic_problems(n_sft, split="train", seed=1))
    held_out = sft_conversations(arithmetic_problems(40, split="test", seed=1))
    pairs = preference_pairs(arithmetic_problems(n_pairs, split="train", seed=2), seed=2)
    student_prompts = (arithmetic_problems(n_student, split="train", seed=3) +
                       [{"prompt": r["instruction"]} for r in read_records(identity)])
    for name, records in (("arithmetic_sft.jsonl", [{"messages": c} for c in chats]),
                          ("arithmetic_sft_eval.jsonl", [{"messages": c} for c in held_out]),
                          ("arithmetic_pairs.jsonl", pairs), ("student_prompts.jsonl", student_prompts)):
        (out / name).write_text("".join(json.dumps(x) + "\n" for x in records))
    placeholders = {"name": IDENTITY_NAME, "author": IDENTITY_AUTHOR}
    sft_chats = [c for path in (identity, alpaca) for c in load_conversations(path, placeholders)[0]] + chats
    (out / "tokenizer_text.jsonl").write_text("".join(
        json.dumps({"text": "\n".join(m["content"] for m in c)}, ensure_ascii=False) + "\n" for c in sft_chats),
        encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# The real-model track: post-training of a published chat model (--base, e.g. SmolLM2-135M-Instruct)

# Per preset: which stages run, the data sizes and every stage's flags. "ci" runs every stage on a tiny
# stand-in with the base's tokenizer; "quick" is identity + DPO + quantize + export; "full" all of them.
REAL_STAGES = ["data", "text_data", "sft", "dpo", "grpo", "distill_cache", "distill_ce", "distill", "speculative",
               "quant_rtn8", "quant_rtn4", "quant_gptq4", "quant_nf4", "export", "eval"]
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
        stages=["data", "text_data", "sft", "dpo", "quant_rtn8", "quant_rtn4", "quant_gptq4", "quant_nf4", "export",
                "eval"],
        # english_repeat 3: the quick run's SFT named itself in 16 of 19 held-out Chinese questions, 1 of 5 English
        n_general=100, english_repeat=3, text_chars=200_000, heldout_tokens=2048, n_arith_eval=40, n_terms=2,
        max_operand=30, eval_new_tokens=40, spec_prompts=5, spec_new_tokens=48,
        # --max-len 160: every example but one (a Chinese identity answer of 225 tokens) fits whole
        sft=["--lora-rank", "16", "--lora-embedding-rank", "1", "--max-len", "160", "--batch-size", "8",
             "--max-steps", "40", "--max-time", "900", "--lr", "1e-3", "--warmup-steps", "4", "--eval-interval", "40",
             "--eval-prompts", "0", "--log-interval", "5"],
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
    spec_draft=3,
    # 20 steps of 4 prompts x 6 answers of at most 32 tokens: an answer cut by the budget scores 0, so the
    # policy is rewarded for answering right and briefly (the base explains first)
    grpo=["--n-eval", "200", "--prompts-per-step", "4", "--samples-per-prompt", "6", "--max-steps", "20",
          "--max-time", "1200", "--eval-interval", "20", "--log-interval", "4", "--max-new-tokens", "32"],
    # the student's 49,152-word output layer is most of its cost: 100 steps of 8 x 256 tokens
    student=["--model", "tiny", "--n-layers", "2", "--dim", "128", "--n-heads", "4", "--n-kv-heads", "4",
             "--hidden-dim", "384", "--seq-len", "256", "--batch-size", "8", "--max-steps", "100",
             "--max-time", "900", "--lr", "2e-3", "--eval-interval", "100", "--sample-tokens", "0"],
    cache=["--seq-len", "256", "--top-k", "32", "--samples", "8", "--batch-size", "8"],
    # twice the quick preset's calibration tokens, act-order (the outlier channels first)
    gptq=["--calib-samples", "32", "--calib-seq-len", "512", "--act-order"])
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
# bytes of memory a base parameter needs in the track: SFT of SmolLM2-135M (LoRA, batch 8 x 160 tokens) peaked at
# 6.7 GB, 48 bytes a parameter (activations and the 49,152-wide logits dominate, not the weights)
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
        usage_error(f"--base smollm2: gguf_io.py fetch failed ({(result.stderr.strip() or 'no path').splitlines()[-1]})")
    return Path(result.stdout.strip().splitlines()[-1]).resolve()


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def write_real_data(out: Path, d: Path, base: Path, n_general: int, text_chars: int, english_repeat: int = 1) -> None:
    """The real-model track's data: identity.json split by a hash of each question into SFT's questions and
    the held-out ones the identity score asks (placeholders kept: sft.py --set fills them; the English ones,
    11 of 67 beside 56 Chinese, english_repeat times, so the English model learns its name in English); the first
    n_general alpaca_en records of at most GENERAL_MAX_TOKENS tokens (general chat, so the model keeps its
    abilities: short enough that SFT trains each one whole); held-out real text the
    model is never tuned on (the last tenth of wiki_demo, c4_demo and Tiny Shakespeare) and wiki + c4
    documents from the other nine tenths, text_chars characters in all (the teacher's logits are cached for
    every position), for the student and GPTQ's calibration; the base's tokenizer (bpe.py)."""
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
    (out / HELD_OUT_TEXTS["wiki"]).write_text("\n".join(wiki[len(wiki) * 9 // 10:]) + "\n")
    (out / HELD_OUT_TEXTS["c4"]).write_text("\n".join(c4[len(c4) * 9 // 10:]) + "\n")
    (out / HELD_OUT_TEXTS["shakespeare"]).write_text(shakespeare[len(shakespeare) * 9 // 10:])
    pool = [doc for pair in zip(wiki[:len(wiki) * 9 // 10], c4[:len(c4) * 9 // 10])  # alternating wiki, c4
            for doc in (pair[0], json.loads(pair[1])["text"].replace("\n", " "))]
    docs = [doc for doc, before in zip(pool, itertools.accumulate(map(len, pool), initial=0)) if before < text_chars]
    (out / "text_train.txt").write_text("\n".join(docs) + "\n")
    tokenizer.chat_template = neutral_template(tokenizer)
    tokenizer.save(out / "tokenizer")
    write_json(out / "summary.json", {"identity_train": len(train), "identity_heldout": len(held),
                                      "general": len(general), "text_docs": len(docs)})


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
        Stage("text_data", "data/prepare.py: wiki + c4 documents in the base's tokens (student, GPTQ calibration)",
              "text_data", [py("data/prepare.py", "--source", data / "text_train.txt", "--txt-docs", "line",
                               "--tokenizer", data / "tokenizer", "--out-dir", r / "text_data")], writes_summary=False),
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
        Stage("speculative", "sample.py speculative decoding: the final model, the student as its draft",
              "speculative", [py("pipeline.py", "speculate", "--target", final, "--draft", r / "distill",
                                 "--out-dir", r / "speculative", "--prompts", p["spec_prompts"],
                                 "--max-new-tokens", p["spec_new_tokens"], "--n-draft", p.get("spec_draft", 4), *dev)]),
    ]
    group = p["group_size"]
    for name, method, bits, group in (("quant_rtn8", "rtn", 8, 0), ("quant_rtn4", "rtn", 4, group),
                                      ("quant_gptq4", "gptq", 4, group), ("quant_nf4", "nf4", 4, group)):
        grid = f"group {group}" if group else "per channel"
        stages.append(Stage(name, f"quant.py: the final model, {method.upper()} int{bits}, {grid}", name,
                            [py("quant.py", "--ckpt", final, "--out-dir", r / name, "--method", method, "--bits", bits,
                                "--group-size", group, *(p["gptq"] if method == "gptq" else []),
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
# Running stages

def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def stage_summary(stage: Stage, run_dir: Path, wall_s: float) -> dict:
    """summary.json of a stage whose script writes none: what its outputs say."""
    out = run_dir / stage.out
    if stage.name == "tokenizer":
        from bpe import Tokenizer
        return {"vocab_size": Tokenizer.load(out / "tokenizer").vocab_size, "wall_time_s": wall_s}
    if stage.name == "prepare":
        meta = json.loads((out / "meta.json").read_text())
        curation = json.loads((out / "curation_report.json").read_text())
        return {**{k: meta[k] for k in ("vocab_size", "train_tokens", "val_tokens", "train_bytes", "val_bytes")},
                "documents_in": curation["documents_in"], "documents_out": curation["documents_out"],
                "wall_time_s": wall_s}
    if stage.name == "sample":  # sample.py's output, from its first sample on (the log starts with the command)
        log = (run_dir / "logs" / "sample.log").read_text(errors="replace")
        return {"text": log[log.find("--- sample"):], "wall_time_s": wall_s}
    if stage.name == "distill_gen":
        answers = [json.loads(line) for line in (out / "teacher.jsonl").read_text().splitlines()]
        rejected = out / "teacher.rejected.jsonl"  # empty answers: distill.py generate leaves them out
        checked = [a["correct"] for a in answers if "correct" in a]
        return {"answers": len(answers), "left_out": len(rejected.read_text().splitlines()) if rejected.exists() else 0,
                "finished": sum(a["finished"] for a in answers),
                "arithmetic_checked": len(checked), "teacher_correct": sum(checked) / max(len(checked), 1),
                "wall_time_s": wall_s}
    return {"wall_time_s": wall_s}


def without_idle_resume(argv: list) -> list:
    """argv without --resume when its --out-dir holds no checkpoint yet: the stage's first run starts it."""
    if "--resume" in argv and "--out-dir" in argv:
        if not (Path(argv[argv.index("--out-dir") + 1]) / "ckpt.pt").exists():
            return [arg for arg in argv if arg != "--resume"]
    return argv


def run_stage(stage: Stage, run_dir: Path, log_dir: Path) -> tuple[str, float]:
    """Run one stage unless its summary.json exists -> ("done" | "skipped", seconds). Raises PipelineError."""
    if stage.summary_path(run_dir).exists():
        return "skipped", 0.0
    log = log_dir / f"{stage.name}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        if callable(stage.commands):
            try:
                stage.commands(run_dir)
            except Exception as e:  # report it as a stage failure with its log, like a failed subprocess
                fh.write(f"error: {e}\n")
                raise PipelineError(f"stage '{stage.name}' failed ({e}); log: {log}") from None
        else:
            for argv in stage.commands:
                argv = without_idle_resume([str(arg(run_dir)) if callable(arg) else arg for arg in argv])
                fh.write("$ " + " ".join(map(str, argv)) + "\n")
                fh.flush()
                # unbuffered, so that the log shows the stage's progress lines as they come
                code = subprocess.call(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
                if code != 0:
                    fh.close()
                    raise PipelineError(f"stage '{stage.name}' failed (exit {code}: {last_line(log)}); log: {log}")
    wall = time.time() - t0
    if not stage.summary_path(run_dir).exists():
        if stage.writes_summary:
            raise PipelineError(f"stage '{stage.name}' wrote no {stage.summary_path(run_dir)}; log: {log}")
        write_json(stage.summary_path(run_dir), stage_summary(stage, run_dir, wall))
    return "done", wall


def write_json(path: Path, obj) -> None:
    from common import atomic_write
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False)))


def run_pipeline(stages: list[Stage], run_dir: Path, report_header: dict, only=None) -> dict:
    """Every stage in order (skipping finished ones), timings in run_dir/timings.json, then report.md."""
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    timings_path = run_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for stage in stages:
        if only and stage.name not in only:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {stage.name:<11} {stage.what}", flush=True)
        status, wall = run_stage(stage, run_dir, log_dir)
        if status == "done":
            timings[stage.name] = wall
            write_json(timings_path, timings)
        print(f"{'':<12} {status}" + (f" in {wall:.1f} s" if status == "done" else " (summary.json exists)"),
              flush=True)
    report = build_report(stages, run_dir, timings, report_header)
    (run_dir / "report.md").write_text(report)
    return timings


# ----------------------------------------------------------------------------------------------------------
# The eval stage's worker: one process evaluates every checkpoint with eval.py's functions

def evaluate_stage(args) -> None:
    """Per checkpoint NAME=KIND: val bpb on the prepared data; for chat models the stop rate and identity
    accuracy on IDENTITY_PROMPTS, zero-shot arithmetic accuracy (tasks.py test split) and greedy answers;
    for base models continuations of RAW_PROMPTS (and the Tang form for zh); decode tokens/s."""
    import torch
    from evaluate import (IM_END, arithmetic_accuracy, chat_prompts, evaluate_model, generate_texts, load_for_eval,
                          markdown_table)
    from common import resolve_device
    from sample import generate
    run_dir, out_dir = Path(args.run_dir), Path(args.run_dir) / "eval"
    device = resolve_device(args.device)
    results = {}
    for spec in args.checkpoints:
        name, kind = spec.split("=")
        path = out_dir / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            continue
        print(f"evaluating {name} ({kind})", flush=True)
        t0 = time.time()
        model, tok = load_for_eval(run_dir / name, device)
        m = evaluate_model(model, tok, data=args.data, max_tokens=args.max_tokens,
                           tang=8 if args.lang == "zh" and kind == "base" else 0)
        if kind == "chat":
            questions = IDENTITY_PROMPTS[args.lang] + OPEN_PROMPTS[args.lang]
            texts, stopped = generate_texts(model, tok, chat_prompts(tok, [[{"role": "user", "content": q}]
                                                                          for q in questions]),
                                            max_new_tokens=48, stop_tokens=[tok.special_tokens[IM_END]])
            n_id = len(IDENTITY_PROMPTS[args.lang])
            m["stop_rate"] = sum(stopped) / len(stopped)
            m["identity_acc"] = sum(IDENTITY_NAME in t.lower() for t in texts[:n_id]) / n_id
            m.update(arithmetic_accuracy(model, tok, args.arithmetic, shots=0, max_new_tokens=16))
            m["samples"] = [{"prompt": q, "output": t} for q, t in zip(questions, texts)]
        else:
            prompts = [tok.encode_ordinary(x) for x in RAW_PROMPTS[args.lang]]
            texts, _ = generate_texts(model, tok, prompts, max_new_tokens=40, temperature=0.8, seed=0,
                                      stop_tokens=[tok.special_tokens["<|endoftext|>"]])
            m["samples"] = [{"prompt": x, "output": t} for x, t in zip(RAW_PROMPTS[args.lang], texts)]
        n_new = min(64, model.config.max_seq_len - 1)
        eot = tok.special_tokens["<|endoftext|>"]
        with torch.no_grad():
            generate(model, [[eot]], 4, temperature=0.0)  # warm-up: the first call pays for allocations
        t1 = time.time()
        with torch.no_grad():
            new = generate(model, [[eot]], n_new, temperature=0.0)
        m["decode_tok_s"] = sum(len(x) for x in new) / (time.time() - t1)
        m["eval_s"] = time.time() - t0
        write_json(path, m)
        results[name] = m
    print(markdown_table(results))
    write_json(out_dir / "summary.json", {"checkpoints": list(results)})


def evaluate_real_stage(args) -> None:
    """Per model NAME=PATH=KIND (chat | text): bits per byte on each held-out text (HELD_OUT_TEXTS, windows of
    --seq-len tokens); for chat models also the share of held-out identity questions answered with the name,
    arithmetic accuracy on tasks.py test problems of the track's difficulty (unless --arithmetic 0), greedy
    answers to GENERAL_PROMPTS. A trained model that took no step (its summary.json says step 0) is the model
    it started from: it gets the previous chat model's results instead of a second evaluation."""
    from chat import load_conversations
    from common import resolve_device
    from tasks import arithmetic_problems
    run_dir = Path(args.run_dir)
    out_dir, data = run_dir / "eval", run_dir / "data"
    device = resolve_device(args.device)
    identity = [c[:2] for c in load_conversations(data / "identity_heldout.json", {})[0]]  # system, user
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
    write_json(out_dir / "summary.json", {"models": list(results)})


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
        m[f"{text}_bpb"], m[f"{text}_ppl"] = ppl["bpb"], ppl["ppl"]
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
    rate, wall-clock speedup, and whether the outputs are identical (they must be, at temperature 0). Plain
    and speculative decoding alternate prompt by prompt (and which goes first), so a machine whose load
    changes during the stage slows both alike: the speedup is the ratio of their summed times."""
    import torch
    from chat import prompt_ids
    from common import load_model, load_tokenizer, resolve_device
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
        for i, x in enumerate(prompts):
            order = [("plain", plain), ("speculative", speculative)]
            for name, decode in (order if i % 2 == 0 else order[::-1]):
                t0 = time.time()
                tokens, stats = decode(x)
                seconds[name] += time.time() - t0
                outputs[name].append(tokens)
                if stats:
                    drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
            print(f"prompt {i + 1}/{len(prompts)}: plain {seconds['plain']:.1f} s, speculative "
                  f"{seconds['speculative']:.1f} s so far", flush=True)
    identical = sum(a == b for a, b in zip(outputs["plain"], outputs["speculative"]))
    write_json(Path(args.out_dir) / "summary.json", {
        "prompts": len(prompts), "identical": identical, "acceptance_rate": accepted / max(drafted, 1),
        "drafted": drafted, "accepted": accepted, "n_draft": args.n_draft, "plain_s": seconds["plain"],
        "speculative_s": seconds["speculative"], "speedup": seconds["plain"] / max(seconds["speculative"], 1e-9),
        "tokens": sum(map(len, outputs["plain"])), "draft_params": draft.num_params(),
        "target_params": target.num_params()})


def export_stage(args) -> None:
    """The final model as GGUF q8_0 and q4_0 (gguf_io.save_gguf), read back by nanollm's reader: the same
    config, and the share of positions of a chat prompt where the file's next-token argmax is the model's;
    one chat turn through llama.cpp (llama-cpp-python) when it is installed."""
    import torch
    from chat import default_system_prompt, prompt_ids
    from common import load_model, load_tokenizer
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
    write_json(out / "summary.json", summary)


# ----------------------------------------------------------------------------------------------------------
# The report

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def read_summaries(run_dir: Path, names) -> dict:
    return {name: read_json(run_dir / name / "summary.json") for name in names}


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def stage_metrics(name: str, s: dict, summaries: dict) -> str:
    """The stage's own numbers (from its summary.json), as a short 'key value' list."""
    g = s.get
    if name == "tokenizer":
        return f"vocab {fmt(g('vocab_size'))}"
    if name == "prepare":
        return (f"docs {fmt(g('documents_in'))} -> {fmt(g('documents_out'))} curated; train {fmt(g('train_tokens'))} "
                f"tok, val {fmt(g('val_tokens'))} tok")
    if name == "chat_data" or name == "eval" or name == "sample":
        return ""
    if name in ("pretrain", "distill_ce", "distill"):
        tok_s = g("tokens_per_s") or (g("tokens_seen") / g("wall_time_s") if g("tokens_seen") and g("wall_time_s") else None)
        text = f"val bpb {fmt(g('val_bpb'))}, train {fmt(tok_s, 0)} tok/s, {fmt(g('step'))} steps"
        if name == "distill" and "val_bpb" in summaries.get("distill_ce", {}) and "val_bpb" in s:
            text += f"; KD gain {summaries['distill_ce']['val_bpb'] - s['val_bpb']:+.4f} bpb vs hard labels"
        return text
    if name in ("sft", "sft_lora", "distill_sft"):
        return (f"val loss {fmt(g('initial_val_loss'))} -> {fmt(g('val_loss'))}, stop rate "
                f"{fmt(g('initial_stop_rate'))} -> {fmt(g('stop_rate'))}, trainable {fmt(g('trainable_params'))}")
    if name == "reward":
        return f"held-out pair accuracy {fmt(g('initial_accuracy'))} -> {fmt(g('accuracy'))}"
    if name == "grpo":
        return (f"RL accuracy {fmt(g('initial_accuracy'))} -> {fmt(g('final_accuracy'))}, reward "
                f"{fmt(g('reward_first10'))} -> {fmt(g('reward_last10'))}, {fmt(g('step'))} steps")
    if name == "ppo":
        return (f"RL accuracy {fmt(g('initial_accuracy'))} -> {fmt(g('final_accuracy'))}, RM score "
                f"{fmt(g('score_first10'))} -> {fmt(g('score_last10'))}, KL {fmt(g('kl_last10'))}, {fmt(g('step'))} steps")
    if name == "dpo":
        return (f"from {rl_policy(summaries)}; val reward acc {fmt(g('val/rewards/accuracy'))}, margin "
                f"{fmt(g('val/rewards/margin'))}, train reward acc {fmt(g('rewards/accuracy'))}")
    if name == "distill_gen":
        return (f"{fmt(g('answers'))} teacher answers ({fmt(g('finished'))} finished with <|im_end|>, "
                f"empty answers left out: {fmt(g('left_out'))}), teacher arithmetic correct {fmt(g('teacher_correct'), 2)} "
                f"of {fmt(g('arithmetic_checked'))}")
    if name.startswith("quant"):
        return (f"ckpt {fmt(g('ckpt_mb'))} MB on disk, linear layers {fmt(g('linear_vs_fp16'), 3)}x of fp16, "
                f"quantized in {fmt(g('quant_time_s'), 1)} s")
    return ""


def flag_value(stage: Stage, flag: str):
    """The value a stage's command gives a flag (its last occurrence), or None."""
    if callable(stage.commands):
        return None
    values = [argv[i + 1] for argv in stage.commands for i, arg in enumerate(argv[:-1]) if arg == flag]
    return values[-1] if values else None


def uniform_bpb(summaries: dict) -> float | None:
    """Bits per byte of a model that guesses every token uniformly: log2(vocab) bits per token over the
    prepared validation split's bytes per token. What pretraining starts from (about: a random init)."""
    prep = summaries.get("prepare", {})
    if not all(prep.get(k) for k in ("vocab_size", "val_tokens", "val_bytes")):
        return None
    return math.log2(prep["vocab_size"]) * prep["val_tokens"] / prep["val_bytes"]


def judge(stage: Stage, summaries: dict, evals: dict) -> tuple[str, list[Measure]]:
    """What a stage is expected to do (a few words) and its measures before -> after, from the stages'
    summary.json and the eval stage's results. Stages that train nothing get no measures."""
    s, e, name = summaries.get(stage.name, {}), evals.get(stage.name, {}), stage.name
    final = evals.get("dpo", {})
    if name in ("pretrain", "distill_ce"):
        return "val bpb well below a uniform guess", [
            Measure("val bpb", uniform_bpb(summaries), e.get("val_bpb", s.get("val_bpb")), higher_is_better=False)]
    if name == "distill":
        return "val bpb below the same student on hard labels (distill_ce)", [
            Measure("val bpb vs distill_ce", summaries.get("distill_ce", {}).get("val_bpb"), s.get("val_bpb"),
                    higher_is_better=False)]
    if name in ("sft", "sft_lora", "distill_sft"):
        n = int(flag_value(stage, "--eval-prompts") or 16)
        return "answers end with <|im_end|>; held-out loss down", [
            Measure("stop rate", s.get("initial_stop_rate"), s.get("stop_rate"), n=n, before_n=n),
            Measure("held-out loss", s.get("initial_val_loss"), s.get("val_loss"), higher_is_better=False)]
    if name == "reward":
        n = s.get("eval_pairs", 0)
        return "held-out pair accuracy up", [Measure("pair accuracy", s.get("initial_accuracy"), s.get("accuracy"),
                                                     n=n, before_n=n)]
    if name in ("grpo", "ppo"):
        n = s.get("eval_problems", 0)
        return "held-out arithmetic accuracy up", [
            Measure("accuracy", s.get("initial_accuracy"), s.get("final_accuracy"), n=n, before_n=n)]
    if name == "dpo":
        return "held-out preference accuracy above chance (0.5)", [
            Measure("preference accuracy", 0.5 if s else None, s.get("val/rewards/accuracy"), n=s.get("val_items", 0))]
    if name.startswith("quant"):
        measures = [Measure("weights MB", final.get("weights_mb"), e.get("weights_mb"), higher_is_better=False),
                    Measure("val bpb", final.get("val_bpb"), e.get("val_bpb"), higher_is_better=False,
                            tolerance=QUANT_BPB_TOLERANCE, goal=False)]
        return f"smaller, val bpb within {QUANT_BPB_TOLERANCE:.0%} of the final model's", measures
    return "", []


def judge_real(stage: Stage, summaries: dict, evals: dict) -> tuple[str, list[Measure]]:
    """judge() for the real-model track: identity, held-out text kept (REAL_KEEP_TOLERANCE), DPO's held-out
    preference accuracy, GRPO's checker accuracy, KD against hard labels, speculative decoding, compression."""
    s, e, name = summaries.get(stage.name, {}), evals.get(stage.name, {}), stage.name
    chain = [x for x in ("base", "sft", "dpo", "grpo") if x == "base" or x in summaries]
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
        return f"smaller; held-out bpb within {QUANT_BPB_TOLERANCE:.0%} of the final model's", [
            Measure("weights MB", final.get("weights_mb"), e.get("weights_mb"), higher_is_better=False),
            *[Measure(f"{text} bpb", final.get(f"{text}_bpb"), e.get(f"{text}_bpb"), higher_is_better=False,
                      tolerance=QUANT_BPB_TOLERANCE, goal=False) for text in HELD_OUT_TEXTS]]
    if name == "export":
        return "a GGUF file smaller than the final model, read back with the same next-token argmax", [
            Measure("q4_0 GGUF MB", final.get("weights_mb"), s.get("q4_0_mb"), higher_is_better=False),
            Measure("reads back", 1.0 if s else None, float(bool(s.get("q8_0_reads_back") and s.get("q4_0_reads_back"))),
                    tolerance=0.0, goal=False),
            Measure("q8_0 top-1 agreement", 1.0 if s else None, s.get("q8_0_top1_agreement"),
                    tolerance=EXPORT_TOP1_TOLERANCE, goal=False)]
    return "", []


def report_card(stages: list[Stage], summaries: dict, evals: dict, judge=judge) -> tuple[list[str], str]:
    """The report card's table rows and words, and the run's last line (how many stages worked)."""
    rows = ["| stage | expected | measured (before -> after) | steps | verdict |", "|---|---|---|---|---|"]
    words, verdicts = [], {}
    for stage in stages:
        s = summaries.get(stage.name, {})
        expected, measures = judge(stage, summaries, evals)
        planned = flag_value(stage, "--max-steps")
        planned = int(planned) if planned else None
        done = s.get("step")
        steps = steps_text(done, planned, s.get("stop_reason"))
        verdict = ("not run" if not s else
                   stage_verdict(done, planned, s.get("stop_reason"), measures) if measures else "not measured")
        verdicts[stage.name] = verdict
        if not measures:
            continue
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in [
            f"`{stage.name}`", expected, "; ".join(m.text() for m in measures), steps, f"**{verdict}**"]) + " |")
        if verdict != "not run":
            words.append(in_words(stage.name, verdict, measures, steps))
    return rows + [""] + [w for w in words if w], tally(verdicts)


def machine_info() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), GPU: {gpu}")


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    lines += ["", "bpb: bits per byte on the last tenth of wiki_demo, c4_demo and Tiny Shakespeare (never tuned on). "
              "identity: share of held-out identity.json questions whose greedy answer names "
              f"`{IDENTITY_NAME}`. arithmetic: tasks.py test problems, zero-shot, greedy.", "",
              "## General prompts, before and after", ""]
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


REPORT_CARD_TEXT = (
    "Each stage that trains or compresses a model, judged from its numbers (verdicts.py): a rate gets its 95% "
    "Wilson interval and moved only when the intervals before and after do not overlap; bits per byte and losses "
    "moved when they changed by more than 1% (a guard, a metric the stage must not make worse, by more than its "
    "stated tolerance). A stage the clock stopped before a quarter of its planned steps, without a metric that "
    "moved, is starved.")


def build_report(stages: list[Stage], run_dir: Path, timings: dict, header: dict) -> str:
    """report.md: the stage table (one row per stage), the curves, samples, machine, commit and times."""
    summaries = {s.name: read_json(s.summary_path(run_dir)) for s in stages}
    evals = {s.name: read_json(run_dir / "eval" / f"{s.name}.json") for s in stages}
    if header.get("base"):
        evals["base"] = read_json(run_dir / "eval" / "base.json")
        card, last_line = report_card(stages, summaries, evals, judge_real)
        export = summaries.get("export", {})
        return "\n".join([
            f"# nanollm report: preset `{header.get('preset')}`, base `{header['base']}`", "",
            f"- command: `{header.get('command', '')}`", f"- machine: {header.get('machine', '')}",
            f"- commit: {header.get('commit', '')}",
            f"- total wall time: {sum(timings.get(s.name, 0.0) for s in stages):.0f} s", "",
            *real_model_table(stages, evals, timings), "",
            *([f"llama.cpp, the q8_0 GGUF answering {IDENTITY_PROMPTS['en'][0]!r} (the file's own chat template, "
               f"system message {export.get('llama_cpp_system')!r}): {export['llama_cpp']!r}", ""]
              if export.get("llama_cpp") else []),
            *curves(stages, run_dir),
            "## Report card", "", REPORT_CARD_TEXT, "", *card, "", f"**{last_line}**", ""])
    lines = [f"# nanollm report: preset `{header.get('preset')}`, lang `{header.get('lang')}`", "",
             f"- command: `{header.get('command', '')}`", f"- machine: {header.get('machine', '')}",
             f"- commit: {header.get('commit', '')}",
             f"- total wall time: {sum(timings.get(s.name, 0.0) for s in stages):.0f} s "
             "(stages skipped in this run keep their earlier time)", "",
             "| stage | what | params | weights MB | val bpb | stop rate | identity acc | arithmetic acc "
             "| decode tok/s | stage metrics | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for s in stages:
        e, done = evals[s.name], bool(summaries[s.name])
        cells = [f"`{s.name}`", s.what if done else f"{s.what} (not run)", fmt(e.get("params")), fmt(e.get("weights_mb"), 2),
                 fmt(e.get("val_bpb"), 4), fmt(e.get("stop_rate"), 2), fmt(e.get("identity_acc"), 2),
                 fmt(e.get("arith_acc_0shot"), 2), fmt(e.get("decode_tok_s"), 0),
                 "; ".join(x for x in [stage_metrics(s.name, summaries[s.name], summaries) if done else "",
                                       f"Tang form {e['tang_form']:.2f} (lines of 5/7 chars {e['tang_lines_5or7']:.2f})"
                                       if "tang_form" in e else ""] if x),
                 fmt(timings.get(s.name), 1)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "val bpb: bits per byte on the held-out split of the prepared corpus (eval.py, the same tokens for "
              "every model). stop rate: share of greedy chat answers ending with <|im_end|> within 48 tokens. "
              "identity acc: share of answers to identity questions naming `nanollm`. arithmetic acc: tasks.py "
              "test split, zero-shot, greedy. decode tok/s: batch 1, greedy, 64 tokens.", "", "## Loss curves", ""]
    for s in stages:
        for png in s.pngs:
            if (run_dir / s.out / png).exists():
                lines.append(f"- `{s.name}`: [{s.out}/{png}]({s.out}/{png})")
    lines += ["", "## Sample generations", ""]
    for s in stages:
        samples = evals[s.name].get("samples", [])
        for sample in (samples[:1] + samples[-2:] if len(samples) > 3 else samples):  # chat: an identity + the open prompts
            output = " ".join(sample["output"].split())[:200]
            lines.append(f"- `{s.name}` · {sample['prompt'].strip()!r} → {output!r}")
    sample_text = summaries.get("sample", {}).get("text")
    if sample_text:
        lines += ["", "Final chat model, sampled (`sample.py`):", "", "```", sample_text.strip(), "```"]
    card, last_line = report_card(stages, summaries, evals)
    lines += ["", "## Report card", "", REPORT_CARD_TEXT, "", *card,
              "", f"**{last_line}**", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------

def usage_error(message: str):
    """A choice the run cannot go on with: one line on stderr, exit 2 (before any stage runs)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate-real"]:
        parser = argparse.ArgumentParser(prog="pipeline.py evaluate-real", description=evaluate_real_stage.__doc__)
        parser.add_argument("--run-dir", required=True)
        parser.add_argument("--max-tokens", type=int, default=0, help="tokens of each held-out text (0: all)")
        parser.add_argument("--seq-len", type=int, default=1024, help="window of the held-out bits per byte (the "
                            "attention's cost grows with its square: SmolLM2's 8,192-token context would triple it)")
        parser.add_argument("--arithmetic", type=int, default=60, help="test problems asked (0: none)")
        parser.add_argument("--texts", default=",".join(HELD_OUT_TEXTS), help="comma-separated held-out texts to "
                            f"score ({', '.join(HELD_OUT_TEXTS)}; default: all)")
        parser.add_argument("--n-terms", type=int, default=2)
        parser.add_argument("--max-operand", type=int, default=9)
        parser.add_argument("--max-new-tokens", type=int, default=48)
        parser.add_argument("--device", default="auto")
        parser.add_argument("models", nargs="+", metavar="NAME=PATH=KIND")
        args = parser.parse_args(argv[1:])
        unknown = [t for t in args.texts.split(",") if t not in HELD_OUT_TEXTS]
        if unknown:
            parser.error(f"--texts: unknown text {unknown[0]!r} (choose from {', '.join(HELD_OUT_TEXTS)})")
        return evaluate_real_stage(args)
    if argv[:1] == ["speculate"]:
        parser = argparse.ArgumentParser(prog="pipeline.py speculate", description=speculate_stage.__doc__)
        for flag in ("--target", "--draft"):
            parser.add_argument(flag, required=True)
        parser.add_argument("--out-dir", "--out", dest="out_dir", required=True)
        parser.add_argument("--prompts", type=int, default=5)
        parser.add_argument("--max-new-tokens", type=int, default=64)
        parser.add_argument("--n-draft", type=int, default=4)
        parser.add_argument("--device", default="auto")
        return speculate_stage(parser.parse_args(argv[1:]))
    if argv[:1] == ["export"]:
        parser = argparse.ArgumentParser(prog="pipeline.py export", description=export_stage.__doc__)
        parser.add_argument("--ckpt", required=True)
        parser.add_argument("--out-dir", "--out", dest="out_dir", required=True)
        return export_stage(parser.parse_args(argv[1:]))
    if argv[:1] == ["evaluate"]:
        parser = argparse.ArgumentParser(prog="pipeline.py evaluate", description=evaluate_stage.__doc__)
        parser.add_argument("--run-dir", required=True)
        parser.add_argument("--data", required=True)
        parser.add_argument("--lang", choices=["en", "zh"], default="en")
        parser.add_argument("--max-tokens", type=int, default=0)
        parser.add_argument("--arithmetic", type=int, default=20)
        parser.add_argument("--device", default="auto")
        parser.add_argument("checkpoints", nargs="+", metavar="NAME=KIND")
        try:
            return evaluate_stage(parser.parse_args(argv[1:]))
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--preset", choices=sorted(set(PRESETS) | set(REAL_PRESETS)),
                        help=f"sizes and budgets: {', '.join(PRESETS)} (default cpu-tiny); with --base: "
                        f"{', '.join(REAL_PRESETS)} (default full)")
    parser.add_argument("--base", help="the real-model track: post-train this chat model (a .gguf, a Hugging Face "
                        "or nanollm directory; smollm2: gguf_io.py fetch's SmolLM2-135M-Instruct) instead of "
                        "pretraining one")
    parser.add_argument("--data-dir", help="the data folder (../shared/data layout); without it, the files the "
                        "preset reads are downloaded once from their public URLs into OUT/downloads")
    parser.add_argument("--data-url", default="", help="without --data-dir: download from this mirror of the "
                        "layout (http://, https:// or file:// + the same relative paths) instead")
    parser.add_argument("--out-dir", "--out", dest="out_dir", required=True,
                        help="run directory: every stage's outputs, logs/, report.md (--out: the same)")
    parser.add_argument("--lang", choices=["en", "zh"], default="en", help="en, or zh: Tang poems, alpaca_zh, dpo_zh")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps, passed to every stage")
    parser.add_argument("--only", help="comma-separated stage names to run (the others are not touched)")
    args = parser.parse_args(argv)
    run_dir = Path(args.out_dir).resolve()
    presets = REAL_PRESETS if args.base else PRESETS
    args.preset = args.preset or ("full" if args.base else "cpu-tiny")
    if args.preset not in presets:
        usage_error(f"--preset {args.preset} is not a preset of the {'real-model' if args.base else 'from-scratch'} "
                    f"track (choose from {', '.join(presets)})")
    if args.base and args.lang != "en":
        usage_error("--lang zh: the real-model track is English only (its identity, DPO and held-out data)")
    base = resolve_base(args.base) if args.base else None
    choices = {"preset": args.preset, "lang": args.lang, "base": str(base or "")}  # "": the from-scratch track
    files = REAL_DATA if base else data_files(args.preset, args.lang)
    try:
        choices = check_run_dir(run_dir, choices)
        if base:
            check_base(base)
    except PipelineError as e:
        usage_error(str(e))
    if args.data_dir:
        data_dir = Path(args.data_dir).resolve()
        if not data_dir.is_dir():
            sys.exit(f"error: --data-dir {data_dir}: no such directory")
        missing = missing_data(files, data_dir)
        if missing:
            usage_error(f"--data-dir {data_dir} lacks {len(missing)} file(s) the {args.preset} preset "
                        f"({args.lang}) reads: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    else:
        data_dir = run_dir / "downloads"
        try:
            download_data(files, data_dir, args.data_url)
        except PipelineError as e:
            sys.exit(f"error: {e}")
    write_json(run_dir / RUN_FILE, choices)
    stages = (build_real_stages(args.preset, base, data_dir, run_dir, args.device) if base else
              build_stages(args.preset, args.lang, data_dir, run_dir, args.device))
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {s.name for s in stages}
    if unknown:
        sys.exit(f"error: --only: unknown stage(s) {', '.join(sorted(unknown))}")
    header = {"preset": args.preset, "lang": args.lang, "base": str(base or ""), "command": "python pipeline.py " + " ".join(argv),
              "machine": machine_info(), "commit": git_commit()}
    t0 = time.time()
    try:
        run_pipeline(stages, run_dir, header, only)
    except PipelineError as e:
        sys.exit(f"error: {e}")
    print(f"done in {time.time() - t0:.0f} s: {run_dir / 'report.md'}")
    print((run_dir / "report.md").read_text().rstrip().splitlines()[-1].strip("*"))  # how many stages worked


if __name__ == "__main__":
    main()
