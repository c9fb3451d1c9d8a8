"""pipeline.py: skip-if-done, failure reporting and the report table on fake stages (fast); the whole
chain on the `ci` preset with the real shared data (slow)."""
import json
import subprocess
import sys

import pytest

from pipeline import PRESETS, REPO, PipelineError, Stage, build_report, build_stages, run_pipeline


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
            "grpo": {"initial_accuracy": 0.25, "final_accuracy": 0.5, "step": 4},
            "dpo": {"val/rewards/accuracy": 0.75, "val/rewards/margin": 0.5, "rewards/accuracy": 1.0}}
    for name, summary in fake.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "dpo.json").write_text(json.dumps(
        {"params": 1000, "weights_mb": 0.5, "val_bpb": 2.4, "stop_rate": 0.8, "identity_acc": 0.6,
         "arith_acc_0shot": 0.35, "decode_tok_s": 321.0, "samples": [{"prompt": "Who are you?", "output": "I am nanollm."}]}))
    report = build_report(stages, tmp_path, {"pretrain": 12.0, "dpo": 3.5}, {"preset": "ci", "lang": "en"})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in report.splitlines() if line.startswith("| `")}
    assert list(rows) == [f"`{s.name}`" for s in stages]  # every stage has its row, in order
    assert "KD gain +0.1250 bpb" in rows["`distill`"][9]  # 2.75 - 2.625
    assert "RL accuracy 0.250 -> 0.500" in rows["`grpo`"][9]
    assert rows["`dpo`"][2:9] == ["1,000", "0.50", "2.4000", "0.80", "0.60", "0.35", "321"]
    assert rows["`dpo`"][10] == "3.5" and rows["`pretrain`"][10] == "12.0"
    assert "(not run)" in rows["`sft`"][1] and "(not run)" not in rows["`dpo`"][1]
    assert "'Who are you?' → 'I am nanollm.'" in report


def test_every_preset_builds_every_stage(tmp_path):
    names = None
    for preset in PRESETS:
        for lang in ("en", "zh"):
            stages = build_stages(preset, lang, tmp_path / "data", tmp_path / "run")
            assert len({s.out for s in stages}) == len(stages)  # no two stages share an output directory
            names = names or [s.name for s in stages]
            assert [s.name for s in stages] == names
    assert names[:4] == ["tokenizer", "prepare", "chat_data", "pretrain"] and names[-2:] == ["eval", "sample"]


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
    # a second run finds every stage done and only rewrites the report
    result = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--preset", "ci", "--data-dir", str(data_dir),
                             "--out", str(out)], check=True, cwd=REPO, capture_output=True, text=True)
    assert result.stdout.count("skipped") == len(stages)
