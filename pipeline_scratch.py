"""pipeline.py's from-scratch track: text -> tokenizer -> pretrained model -> chat model (SFT, RL, DPO) ->
distilled student -> quantized model. PRESETS sizes every stage (ci, cpu-tiny, gpu); build_stages lists the
stages with their exact commands; the files of the --data-dir layout come from DATA_URLS when there is no
--data-dir; evaluate_stage is the eval stage's worker (`python pipeline.py evaluate ...`); judge and
report_lines turn the stages' numbers into report.md.
"""
import json
import math
import time
from pathlib import Path
from urllib.parse import quote

from pipeline_stages import (IDENTITY_AUTHOR, IDENTITY_NAME, IDENTITY_PROMPTS, QUANT_BPB_TOLERANCE, PipelineError,
                             Stage, flag_value, fmt, py, read_summaries, report_header, write_json)
from verdicts import REPORT_CARD_TEXT, Measure, report_card

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
# DPO continues from PPO's policy instead of GRPO's only when PPO's held-out arithmetic accuracy is higher by this much
PPO_CLEARLY_BETTER = 0.05
# The eval stage's open prompts (chat models) and raw text prompts (base models)
OPEN_PROMPTS = {"en": ["Give three tips for staying healthy.", "What is 4 + 3 + 2?"],
                "zh": ["写一首关于春天的诗。", "What is 4 + 3 + 2?"]}
RAW_PROMPTS = {"en": ["The history of", "In 1990, the"], "zh": ["春晓\n", "静夜思\n"]}


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
# The stages' summaries and the eval stage's worker

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


# ----------------------------------------------------------------------------------------------------------
# The report

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


def report_lines(stages: list[Stage], run_dir: Path, timings: dict, header: dict, summaries: dict,
                 evals: dict) -> list[str]:
    """report.md of a from-scratch run: the stage table (one row per stage), the curves, samples, machine,
    commit, times and the report card."""
    lines = [*report_header(f"# nanollm report: preset `{header.get('preset')}`, lang `{header.get('lang')}`", header,
                            stages, timings, summaries, " (stages skipped in this run keep their earlier time)"),
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
    card, last_line = report_card(stages, summaries, evals, judge)
    lines += ["", "## Report card", "", REPORT_CARD_TEXT, "", *card,
              "", f"**{last_line}**", ""]
    return lines
