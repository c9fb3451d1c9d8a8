"""pipeline.py: skip-if-done, failure reporting and the report table on fake stages, the data download
from a file:// mirror of the shared data, the choice of the RL model DPO continues from (fast); the whole
chain on the `ci` preset with the real shared data (slow)."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from pipeline import build_report, main, run_pipeline
from pipeline_scratch import (DATA_URLS, PPO_CLEARLY_BETTER, PRESETS, build_stages, data_files, download_data,
                              rl_policy)
from pipeline_stages import REPO, PipelineError, Stage


def python_stage(name, code, writes_summary=False):
    return Stage(name, f"stage {name}", name, [[sys.executable, "-c", code]], writes_summary=writes_summary)


def test_runs_skips_and_stops_at_a_failing_stage(tmp_path):
    ran = tmp_path / "ran.txt"
    done = python_stage("done", "raise SystemExit(3)")  # would fail if run: its summary already exists
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text(json.dumps({"val_bpb": 1.5}))
    writer = python_stage("writer", "import json, pathlib; p = pathlib.Path('{0}'); p.mkdir(); "
                          "(p / 'summary.json').write_text(json.dumps({{'val_bpb': 2.0}}))".format(tmp_path / "writer"),
                          writes_summary=True)
    plain = python_stage("plain", f"open({str(ran)!r}, 'a').write('plain ran\\n'); print('hello')")
    failing = python_stage("broken", "import sys; print('step 1'); sys.exit('error: bad field x in data.json')")
    after = python_stage("after", f"open({str(ran)!r}, 'a').write('after ran\\n')")
    stages = [done, writer, plain, failing, after]

    with pytest.raises(PipelineError) as info:
        run_pipeline(stages, tmp_path, {"preset": "test"})
    message = str(info.value)
    assert "'broken'" in message and str(tmp_path / "logs" / "broken.log") in message
    assert "bad field x in data.json" in message and "\n" not in message  # one line, with the script's error
    assert ran.read_text() == "plain ran\n"  # the stage after the failure never ran
    assert "hello" in (tmp_path / "logs" / "plain.log").read_text()
    assert not (tmp_path / "logs" / "done.log").exists()
    assert json.loads((tmp_path / "done" / "summary.json").read_text()) == {"val_bpb": 1.5}
    assert json.loads((tmp_path / "writer" / "summary.json").read_text()) == {"val_bpb": 2.0}  # its own, untouched
    assert "wall_time_s" in json.loads((tmp_path / "plain" / "summary.json").read_text())  # written by the pipeline
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"writer", "plain"}

    # fixed: the rerun skips the three finished stages and runs the other two
    stages[3] = python_stage("broken", "print('fixed')")
    run_pipeline(stages, tmp_path, {"preset": "test"})
    assert ran.read_text() == "plain ran\nafter ran\n"
    report = (tmp_path / "report.md").read_text()
    assert all(f"| `{s.name}` |" in report for s in stages)


def test_a_script_that_writes_no_summary_fails_its_stage(tmp_path):
    with pytest.raises(PipelineError, match="'silent' wrote no .*summary.json"):
        run_pipeline([python_stage("silent", "pass", writes_summary=True)], tmp_path, {})


def test_report_table_from_fake_summaries(tmp_path):
    stages = [s for s in build_stages("ci", "en", tmp_path / "data", tmp_path)]
    fake = {"pretrain": {"val_bpb": 2.5, "tokens_per_s": 1234.5, "step": 100},
            "distill_ce": {"val_bpb": 2.75, "tokens_per_s": 5000.0, "step": 60},
            "distill": {"val_bpb": 2.625, "tokens_per_s": 4000.0, "step": 60},
            "grpo": {"initial_accuracy": 0.25, "final_accuracy": 0.5, "step": 4, "eval_problems": 20},
            "ppo": {"initial_accuracy": 0.25, "final_accuracy": 0.5, "score_first10": -0.5, "score_last10": 0.25,
                    "kl_last10": 0.125, "step": 4, "eval_problems": 20},
            "distill_gen": {"answers": 131, "left_out": 2, "finished": 100, "arithmetic_checked": 40,
                            "teacher_correct": 0.25},
            "dpo": {"val/rewards/accuracy": 0.75, "val/rewards/margin": 0.5, "rewards/accuracy": 1.0, "val_items": 30,
                    "step": 3, "stop_reason": "max_time"}}
    for name, summary in fake.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "dpo.json").write_text(json.dumps(
        {"params": 1000, "weights_mb": 0.5, "val_bpb": 2.4, "stop_rate": 0.8, "identity_acc": 0.6,
         "arith_acc_0shot": 0.35, "decode_tok_s": 321.0, "samples": [{"prompt": "Who are you?", "output": "I am nanollm."}]}))
    report = build_report(stages, tmp_path, {"pretrain": 12.0, "dpo": 3.5}, {"preset": "ci", "lang": "en"})
    table, card = report.split("## Loss curves")[0], report.split("## Report card")[1]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines() if line.startswith("| `")}
    assert list(rows) == [f"`{s.name}`" for s in stages]  # every stage has its row, in order
    assert "KD gain +0.1250 bpb" in rows["`distill`"][9]  # 2.75 - 2.625
    assert "RL accuracy 0.250 -> 0.500" in rows["`grpo`"][9]
    assert "RM score -0.500 -> 0.250, KL 0.125" in rows["`ppo`"][9]
    assert rows["`dpo`"][9].startswith("from grpo;")  # ppo is not clearly better
    assert "| `distill_gen` | distill.py generate" in report and \
        "131 teacher answers (100 finished with <\\|im_end\\|>, empty answers left out: 2), teacher arithmetic " \
        "correct 0.25 of 40" in report
    assert rows["`dpo`"][2:9] == ["1,000", "0.50", "2.4000", "0.80", "0.60", "0.35", "321"]
    assert rows["`dpo`"][10] == "3.5" and rows["`pretrain`"][10] == "12.0"
    assert "(not run)" in rows["`sft`"][1] and "(not run)" not in rows["`dpo`"][1]
    assert "'Who are you?' → 'I am nanollm.'" in report
    # the report card: a row per judged stage, with its steps against the planned ones and a verdict
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in card.splitlines()
             if line.startswith("| `")]  # an escaped \| is inside a cell
    verdicts = {row[0]: row for row in cells}
    assert verdicts["`grpo`"][2] == "accuracy 0.25 [0.11, 0.47] -> 0.50 [0.30, 0.70] (n=20)"  # overlapping
    assert verdicts["`grpo`"][3] == "4 of 4 steps" and verdicts["`grpo`"][4] == "**no effect**"
    assert "`grpo` did not move its metric beyond its uncertainty" in card
    assert verdicts["`distill`"][4] == "**worked**"  # 2.75 -> 2.625 bpb, 4.5% lower
    assert verdicts["`pretrain`"][3] == "100 of 60 steps" and verdicts["`pretrain`"][4] == "**not measured**"
    assert verdicts["`sft`"][4] == "**not run**"
    assert verdicts["`dpo`"][2] == "preference accuracy 0.500 -> 0.75 [0.57, 0.87] (n=30)"
    assert verdicts["`dpo`"][3] == "3 of 10 steps (stopped by the clock)" and verdicts["`dpo`"][4] == "**worked**"
    assert report.rstrip().splitlines()[-1] == "**2 of 4 judged stages worked (2 no effect)**"


def test_every_preset_builds_every_stage(tmp_path):
    names = None
    for preset in PRESETS:
        for lang in ("en", "zh"):
            stages = build_stages(preset, lang, tmp_path / "data", tmp_path / "run")
            assert len({s.out for s in stages}) == len(stages)  # no two stages share an output directory
            names = names or [s.name for s in stages]
            assert [s.name for s in stages] == names
    assert names[:4] == ["chat_data", "tokenizer", "prepare", "pretrain"] and names[-2:] == ["eval", "sample"]


def test_dpo_continues_from_ppo_only_when_clearly_better():
    def summaries(grpo, ppo):
        return {"grpo": {"final_accuracy": grpo}, "ppo": {"final_accuracy": ppo}}
    assert rl_policy(summaries(0.25, 0.25 + PPO_CLEARLY_BETTER)) == "ppo"
    assert rl_policy(summaries(0.25, 0.25 + PPO_CLEARLY_BETTER / 2)) == "grpo"
    assert rl_policy(summaries(0.5, 0.25)) == "grpo"
    assert rl_policy({"grpo": {"final_accuracy": 0.0}}) == "grpo"  # ppo not run (--only)


def test_every_data_file_has_a_public_url(data_dir):
    for preset in PRESETS:
        for lang in ("en", "zh"):
            files = data_files(preset, lang)
            assert all(DATA_URLS[f].startswith("https://") for f in files)
            assert all((data_dir / f).is_file() for f in files)  # the layout of the shared data
    assert len(data_files("cpu-tiny", "zh")) == 58 + 1 + 3  # every poet.tang.*.json, the 300 poems, sft and dpo files


def test_download_from_a_mirror_once(tmp_path, data_dir, monkeypatch):
    files = data_files("ci", "zh")
    dest = tmp_path / "downloads"
    download_data(files, dest, data_dir.as_uri())
    for f in files:
        assert (dest / f).read_bytes() == (data_dir / f).read_bytes()
    assert not list(dest.rglob("*.part"))
    # present files are not fetched again: the mirror is gone, yet a second call succeeds
    download_data(files, dest, (tmp_path / "gone").as_uri())
    # the default URLs, redirected to the mirror (no internet here): the same layout
    monkeypatch.setattr("pipeline_scratch.DATA_URLS", {f: (data_dir / f).as_uri() for f in DATA_URLS})
    download_data(files, tmp_path / "defaults")
    assert sorted(p.relative_to(tmp_path / "defaults") for p in (tmp_path / "defaults").rglob("*.json")) == \
        sorted(map(type(dest), files))
    with pytest.raises(PipelineError, match="gone/sft/identity.json: download failed"):
        download_data(["sft/identity.json"], tmp_path / "fresh", (tmp_path / "gone").as_uri())


def test_cli_without_data_dir_downloads_then_runs(tmp_path, data_dir):
    main(["--preset", "ci", "--data-url", data_dir.as_uri(), "--out", str(tmp_path), "--only", "tokenizer"])
    assert (tmp_path / "downloads" / "pretrain" / "c4_demo.jsonl").read_bytes() == \
        (data_dir / "pretrain" / "c4_demo.jsonl").read_bytes()
    assert str(tmp_path / "downloads" / "pretrain") in (tmp_path / "logs" / "tokenizer.log").read_text()
    with pytest.raises(SystemExit, match="error: .*nowhere/pretrain/wiki_demo.txt: download failed"):
        main(["--preset", "ci", "--data-url", (tmp_path / "nowhere").as_uri(), "--out", str(tmp_path / "b")])


@pytest.mark.slow
def test_ci_preset_end_to_end(tmp_path, data_dir):
    out = tmp_path / "run"
    subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--preset", "ci", "--data-dir", str(data_dir),
                    "--out", str(out)], check=True, cwd=REPO)
    stages = build_stages("ci", "en", data_dir, out)
    for stage in stages:
        assert stage.summary_path(out).exists(), f"{stage.name} wrote no summary.json"
    report = (out / "report.md").read_text()
    for stage in stages:
        assert f"| `{stage.name}` |" in report and f"{stage.what} (not run)" not in report
    evals = {s.name: json.loads((out / "eval" / f"{s.name}.json").read_text()) for s in stages if s.kind}
    assert all(0 < m["val_bpb"] < 10 for m in evals.values())
    assert evals["quant_rtn"]["weights_mb"] < evals["dpo"]["weights_mb"]  # int4 codes are smaller than fp32
    assert "KD gain" in report
    assert evals["distill_sft"]["params"] == evals["distill"]["params"] < evals["dpo"]["params"]  # the chat student
    assert all(k in evals["distill_sft"] for k in ("stop_rate", "identity_acc", "arith_acc_0shot"))
    gen = json.loads((out / "distill_gen" / "summary.json").read_text())
    assert gen["answers"] + gen["left_out"] == PRESETS["ci"]["n_student_arith"] + 91  # arithmetic + identity.json
    assert "RM score" in report and ("from grpo;" in report or "from ppo;" in report)
    # a second run finds every stage done and only rewrites the report
    result = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--preset", "ci", "--data-dir", str(data_dir),
                             "--out", str(out)], check=True, cwd=REPO, capture_output=True, text=True)
    assert result.stdout.count("skipped") == len(stages)


def test_a_rerun_with_another_preset_or_language_refuses(tmp_path, data_dir, refused):
    main(["--preset", "ci", "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--only", "chat_data"])
    assert json.loads((tmp_path / "run.json").read_text()) == {"preset": "ci", "lang": "en", "base": ""}
    for argv, said in ((["--preset", "ci", "--lang", "zh"], "--lang en, not --lang zh"),
                       (["--preset", "cpu-tiny"], "--preset ci, not --preset cpu-tiny")):
        code, err = refused(main, *argv, "--data-dir", data_dir, "--out", tmp_path)
        assert code == 2
        assert said in err and str(tmp_path) in err and err.count("\n") == 1
    assert not (tmp_path / "tokenizer").exists()  # nothing ran
    assert json.loads((tmp_path / "run.json").read_text()) == {"preset": "ci", "lang": "en", "base": ""}
    # the same choices go on
    main(["--preset", "ci", "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--only", "chat_data"])


def test_a_run_older_than_run_json_is_known_by_its_report(tmp_path, data_dir, refused):
    (tmp_path / "report.md").write_text("# nanollm report: preset `cpu-tiny`, lang `en`\n\n| stage |\n")
    _, err = refused(main, "--preset", "ci", "--lang", "zh", "--data-dir", data_dir, "--out", tmp_path)
    assert "--preset cpu-tiny --lang en, not --preset ci --lang zh" in err


def test_missing_data_files_fail_before_the_first_stage(tmp_path, data_dir, refused):
    partial = tmp_path / "data"
    for f in data_files("ci", "en"):
        if not f.startswith("preference/"):
            (partial / f).parent.mkdir(parents=True, exist_ok=True)
            (partial / f).write_bytes((data_dir / f).read_bytes())
    code, err = refused(main, "--preset", "ci", "--data-dir", partial, "--out-dir", tmp_path / "run")
    assert code == 2
    assert "lacks 1 file(s)" in err and "preference/dpo_en_demo.json" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "logs").exists()  # no stage started


def test_a_killed_pipeline_stops_its_running_stage(tmp_path):
    """SIGTERM to pipeline.py must not leave the stage it was running (a training subprocess) alive."""
    import signal
    pid_file = tmp_path / "stage.pid"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from pathlib import Path\n"
        "import pipeline\n"
        "from pipeline_stages import Stage\n"
        "sleeper = 'import os, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(120)'\n"
        f"stage = Stage('sleep', 'a stage that trains for long', 'sleep', [[sys.executable, '-c', 'import sys; ' + sleeper, {str(pid_file)!r}]])\n"
        "pipeline.stop_stages_on_sigterm()\n"
        f"pipeline.run_pipeline([stage], Path({str(tmp_path / 'run')!r}), {{}})\n")
    proc = subprocess.Popen([sys.executable, str(driver)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    stage_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 1 and "stopped by signal" in proc.stderr.read()
    with pytest.raises(ProcessLookupError):  # subprocess.call killed and reaped the stage
        os.kill(stage_pid, 0)
