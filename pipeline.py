"""The whole chain in one command: text -> tokenizer -> pretrained model -> chat model (SFT, RL, DPO) ->
distilled student -> quantized model, every stage evaluated, and a report card (report.md).

    python pipeline.py --preset cpu-tiny --data-dir ../shared/data --out-dir runs/tiny         # < 20 min, 2-core CPU
    python pipeline.py --preset cpu-tiny --data-dir ../shared/data --out-dir runs/tiny-zh --lang zh
    python pipeline.py --preset ci --data-dir ../shared/data --out-dir /tmp/ci                 # a few minutes
    python pipeline.py --preset gpu --data-dir ../shared/data --out-dir runs/gpu --device cuda
    python pipeline.py --preset cpu-tiny --out-dir runs/tiny                                   # downloads the data first
    python pipeline.py --base smollm2 --preset quick --data-dir ../shared/data --out-dir runs/smol  # a real model

Each stage is a subprocess of the project's own scripts (pipeline_scratch.build_stages lists them in order, with their
flags: chat_data, tokenizer, prepare, pretrain, sft, sft_lora, reward, grpo, ppo, dpo, distill_ce, distill,
distill_gen, distill_sft, quant_rtn, quant_gptq, eval, sample), its log in OUT/logs/<stage>.log. A stage is
done when its output directory holds summary.json (written last), so a rerun skips finished stages and
training stages continue from their checkpoint (--resume, passed once the stage's directory holds one). A
failing stage stops the run with one line naming the stage and its log. --data-dir is a folder laid out
like ../shared/data; without it the files are downloaded once from their public URLs (pipeline_scratch.DATA_URLS) into
OUT/downloads. The CPU presets are small: their quality numbers are only indicative.

The real-model track (--base MODEL: a .gguf, a Hugging Face or nanollm directory; smollm2 is
SmolLM2-135M-Instruct as `gguf_io.py fetch` gets it) post-trains a published chat model instead of
pretraining one (pipeline_real.build_real_stages: data, text_data, calib_data, sft, dpo, grpo, distill_cache,
distill_ce, distill, speculative, quant_rtn8, quant_rtn4_pc, quant_gptq4_pc, quant_rtn4, quant_gptq4, quant_nf4,
export, eval);
REAL_PRESETS: ci (every stage on a tiny stand-in), quick (identity + DPO + quantize + export), full.
Before the first stage, check_base refuses a model it cannot use (architecture, a tokenizer without
ChatML, too large for the memory), naming the file and the reason.

OUT/run.json records the preset, language and base model; a rerun with other ones refuses, and so does a
--data-dir that lacks a file the run reads, before any stage starts. report.md has one table of every
stage's metrics, the loss curves, sample generations, the machine, the commit, each stage's wall time, and
the report card: each stage judged from its numbers (verdicts.py: worked / no effect / regressed /
starved, rates with 95% intervals); its last line, also the run's last line, says how many stages worked.
`python pipeline.py evaluate | evaluate-real | speculate | export ...` are stages' workers (see *_stage).

This file is the command line, the stage runner and the run directory; each track is a module of its own
(pipeline_scratch.py, pipeline_real.py: presets, data, stages, workers, report), what they share is in
pipeline_stages.py and the report card in verdicts.py.
"""
import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pipeline_real
import pipeline_scratch
from pipeline_real import (HELD_OUT_TEXTS, REAL_DATA, REAL_PRESETS, build_real_stages, check_base, evaluate_real_stage,
                           export_stage, resolve_base, speculate_stage)
from pipeline_scratch import PRESETS, build_stages, data_files, download_data, evaluate_stage, stage_summary
from pipeline_stages import REPO, PipelineError, Stage, read_json, write_json


# ----------------------------------------------------------------------------------------------------------
# The run directory: its data, its choices

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


# ----------------------------------------------------------------------------------------------------------
# Running stages

def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


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


def stop_stages_on_sigterm() -> None:
    """A SIGTERM (kill, a job scheduler) ends the pipeline through Python, as Ctrl-C does, so that
    subprocess.call kills the running stage on its way out instead of leaving it to train on alone."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"error: stopped by signal {signum}"))


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


def build_report(stages: list[Stage], run_dir: Path, timings: dict, header: dict) -> str:
    """report.md: each track's tables (pipeline_scratch.report_lines, pipeline_real.report_lines), from the
    stages' summary.json and the eval stage's results."""
    summaries = {s.name: read_json(s.summary_path(run_dir)) for s in stages}
    evals = {s.name: read_json(run_dir / "eval" / f"{s.name}.json") for s in stages}
    if header.get("base"):
        evals["base"] = read_json(run_dir / "eval" / "base.json")
        return "\n".join(pipeline_real.report_lines(stages, run_dir, timings, header, summaries, evals))
    return "\n".join(pipeline_scratch.report_lines(stages, run_dir, timings, header, summaries, evals))


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
        parser.add_argument("--repeats", type=int, default=3,
                            help="decodings of each prompt each way; the fastest counts")
        parser.add_argument("--device", default="auto")
        args = parser.parse_args(argv[1:])
        if args.repeats < 1:
            parser.error(f"--repeats must be >= 1, got {args.repeats}")
        return speculate_stage(args)
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
    try:
        base = resolve_base(args.base) if args.base else None
        choices = {"preset": args.preset, "lang": args.lang, "base": str(base or "")}  # "": the from-scratch track
        choices = check_run_dir(run_dir, choices)
        if base:
            check_base(base)
    except PipelineError as e:
        usage_error(str(e))
    files = REAL_DATA if base else data_files(args.preset, args.lang)
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
    stop_stages_on_sigterm()
    try:
        run_pipeline(stages, run_dir, header, only)
    except PipelineError as e:
        sys.exit(f"error: {e}")
    print(f"done in {time.time() - t0:.0f} s: {run_dir / 'report.md'}")
    print((run_dir / "report.md").read_text().rstrip().splitlines()[-1].strip("*"))  # how many stages worked


if __name__ == "__main__":
    main()
