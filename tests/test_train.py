"""data/prepare.py and train.py end to end on the real data: prepare -> train -> the loss drops,
kill -9 and resume is bit-exact, 2-process DDP equals one process, and bad input gets clear errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = ["--model", "tiny", "--seq-len", "64", "--batch-size", "8", "--log-interval", "1",
            "--eval-tokens", "2048", "--sample-tokens", "0", "--warmup-steps", "5", "--lr", "3e-3"]


def run(script, *args, check=True, **kwargs):
    result = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                            cwd=REPO, timeout=300, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def train_here(*args):
    """train.py's main() in this process (no python to start): for runs that are not about the command itself,
    which test_training_reduces_loss_and_writes_summary runs as one."""
    import train
    train.main(list(map(str, args)))


def losses(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def logged_steps_at_least(out_dir: Path, n: int) -> bool:
    try:
        return len(losses(out_dir)) >= n
    except (FileNotFoundError, json.JSONDecodeError):  # not started yet, or a line half-written
        return False


@pytest.fixture(scope="module")
def shakespeare(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare")
    run("data/prepare.py", "--source", data_dir / "tinyshakespeare" / "input.txt", "--out", out, "--vocab-size", "512")
    return out


def test_prepare_writes_split_and_meta(shakespeare, data_dir):
    meta = json.loads((shakespeare / "meta.json").read_text())
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    assert meta["train_bytes"] == len(text[:cut].encode()) and meta["val_bytes"] == len(text[cut:].encode())
    train = np.fromfile(shakespeare / "train.bin", dtype=np.uint16)
    val = np.fromfile(shakespeare / "val.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    from bpe import Tokenizer
    tokenizer = Tokenizer.load(shakespeare / meta["tokenizer"])
    eot = tokenizer.special_tokens["<|endoftext|>"]
    assert val[-1] == eot and tokenizer.decode(val[:-1].tolist()) == text[cut:]  # lossless, EOT-terminated
    assert 2.0 < meta["train_bytes"] / meta["train_tokens"] < 4.0  # a 512-token BPE compresses English ~2.5x
    again = run("data/prepare.py", "--source", data_dir / "tinyshakespeare" / "input.txt", "--out", shakespeare,
                "--vocab-size", "512")
    assert "nothing to do" in again.stdout


def test_training_reduces_loss_and_writes_summary(shakespeare, tmp_path):
    out = tmp_path / "run"
    run("train.py", "--data", shakespeare, "--out-dir", out, "--max-steps", "80", "--eval-interval", "40", *TINY_RUN)
    curve = losses(out)
    assert len(curve) == 80
    assert np.mean(curve[-10:]) < np.mean(curve[:5]) - 0.75  # from ~ln(512)=6.2, down by three quarters of a nat
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_loss", "val_bpb", "val_ppl", "tokens_seen", "tokens_per_s", "wall_time_s", "peak_memory_mb"):
        assert key in summary, key
    assert summary["tokens_seen"] == 80 * 8 * 64
    assert summary["val_bpb"] < 4.0  # an untrained model is at ~ln(512)/ln2/2.5 ~ 3.6 bits per byte or worse
    assert (out / "loss.png").stat().st_size > 1000 and (out / "ckpt.pt").exists()


def test_mixture_of_experts_trains_and_logs_expert_shares(shakespeare, tmp_path):
    out = tmp_path / "moe"
    train_here("--data", shakespeare, "--out-dir", out, "--max-steps", "40", "--eval-interval", "20",
               "--n-experts", "4", "--n-experts-per-token", "2", *TINY_RUN)
    curve = losses(out)
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.5
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    for r in evals:  # 2 layers x 4 experts, each layer's shares summing to 1
        assert len(r["moe_expert_share"]) == 2 and all(abs(sum(s) - 1) < 1e-3 for s in r["moe_expert_share"])
        assert 0 < r["moe_aux_loss"] <= 4 and r["moe_share_cv"] >= 0  # E sum f_i P_i <= E max f_i <= E
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"] > 2 * 4 * 3 * 64 * 192 and "moe_share_cv" in summary
    assert (out / "experts.png").stat().st_size > 1000


def test_kill_and_resume_is_bit_exact(shakespeare, tmp_path):
    args = ["--data", shakespeare, "--max-steps", "40", "--eval-interval", "10", "--dropout", "0.1", *TINY_RUN]
    train_here(*args, "--out-dir", tmp_path / "straight")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args), "--out-dir", str(killed)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not logged_steps_at_least(killed, 25):
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "training too slow to reach step 25"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(losses(killed)) < 40 and not (killed / "summary.json").exists()
    run("train.py", *args, "--out-dir", killed, "--resume")
    assert losses(killed) == losses(tmp_path / "straight")  # identical floats, step by step


def test_two_process_ddp_equals_one_process(shakespeare, tmp_path):
    args = ["--data", shakespeare, "--max-steps", "6", "--eval-interval", "100", *TINY_RUN]
    args[args.index("--batch-size") + 1] = "4"
    train_here(*args, "--out-dir", tmp_path / "single", "--batch-size", "8")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "train.py"), *map(str, args), "--out-dir", str(tmp_path / "ddp")],
                         capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single, both = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(single) == len(both) == 6
    assert max(abs(a - b) for a, b in zip(single, both)) <= 1e-5


def test_train_errors_are_clear(tmp_path):
    result = run("train.py", "--data", tmp_path / "nowhere", "--out-dir", tmp_path / "o", check=False)
    assert result.returncode != 0 and "meta.json not found" in result.stderr and "Traceback" not in result.stderr


def test_prepare_bad_input(tmp_path, data_dir):
    missing = run("data/prepare.py", "--source", tmp_path / "missing.txt", "--out", tmp_path / "o", check=False)
    assert missing.returncode != 0 and "missing.txt: no such file" in missing.stderr

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    bad_utf8 = run("data/prepare.py", "--source", latin1, "--out", tmp_path / "o", check=False)
    assert bad_utf8.returncode != 0 and "latin1.txt: not UTF-8" in bad_utf8.stderr

    lines = [json.dumps({"text": f"document number {i} " * 20}) for i in range(40)]
    lines[7] = "{not json"
    lines[12] = json.dumps({"content": "no text field"})
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines))
    result = run("data/prepare.py", "--source", broken, "--out", tmp_path / "j", "--vocab-size", "300", check=False)
    assert result.returncode != 0 and "broken.jsonl:8:" in result.stderr and "Traceback" not in result.stderr
    skipped = run("data/prepare.py", "--source", broken, "--out", tmp_path / "j", "--vocab-size", "300",
                  "--skip-bad-lines")
    assert "skipped 2 bad line(s)" in skipped.stdout
    assert json.loads((tmp_path / "j" / "meta.json").read_text())["skipped_bad_lines"] == 2


def test_jsonl_sentence_markers_become_special_tokens(tmp_path, data_dir):
    docs = [{"text": f"<s>line {i} of the corpus, some words.</s>"} for i in range(50)]
    source = tmp_path / "marked.jsonl"
    source.write_text("\n".join(json.dumps(d) for d in docs))
    run("data/prepare.py", "--source", source, "--out", tmp_path / "m", "--vocab-size", "300")
    from bpe import Tokenizer
    tokenizer = Tokenizer.load(tmp_path / "m" / "tokenizer")
    tokens = np.fromfile(tmp_path / "m" / "train.bin", dtype=np.uint16).tolist()
    bos, eos, eot = (tokenizer.special_tokens[s] for s in ("<s>", "</s>", "<|endoftext|>"))
    assert tokens.count(bos) == tokens.count(eos) == tokens.count(eot) == 45  # 50 documents, 5 held out
    assert tokens[0] == bos


def test_tang_poems_are_one_document_each(tmp_path, data_dir):
    poems = data_dir / "tang_poems" / "poet.tang.0.json"
    run("data/prepare.py", "--source", poems, "--out", tmp_path / "t", "--vocab-size", "600", "--dtype", "uint32")
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    n_poems = len(json.loads(poems.read_text(encoding="utf-8")))
    assert meta["train_documents"] + meta["val_documents"] == n_poems and meta["dtype"] == "uint32"
    tokens = np.fromfile(tmp_path / "t" / "val.bin", dtype=np.uint32)
    assert (tokens == meta["eot_id"]).sum() == meta["val_documents"]


def test_prepare_curate_drops_what_the_report_says(tmp_path, data_dir):
    source = data_dir / "pretrain" / "c4_demo.jsonl"
    run("data/prepare.py", "--source", source, "--out", tmp_path / "c", "--vocab-size", "300", "--curate")
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    report = json.loads((tmp_path / "c" / "curation_report.json").read_text())
    assert report["documents_in"] == len(source.read_text(encoding="utf-8").splitlines())
    assert report["documents_out"] < report["documents_in"]
    assert meta["train_documents"] + meta["val_documents"] == report["documents_out"]


def test_fused_cross_entropy_gives_the_same_losses(shakespeare, tmp_path):
    """--fused-ce (kernels/cross_entropy.py, in the Triton interpreter here) against torch's loss."""
    pytest.importorskip("triton")
    args = ["--data", shakespeare, "--max-steps", "3", "--eval-interval", "100", *TINY_RUN]
    args[args.index("--batch-size") + 1] = "1"  # the interpreter runs the kernel row by row: 64 rows, not 512
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run("train.py", *args, "--out-dir", tmp_path / "torch", env=env)
    run("train.py", *args, "--out-dir", tmp_path / "fused", "--fused-ce", env=env)
    assert np.allclose(losses(tmp_path / "fused"), losses(tmp_path / "torch"), rtol=1e-5, atol=1e-6)


def test_prepare_refuses_a_vocabulary_that_does_not_fit_the_dtype(tmp_path, data_dir):
    from bpe import CL100K_SPECIAL_TOKENS, Tokenizer
    cl100k = Tokenizer.from_tiktoken(data_dir / "tokenizers" / "cl100k_base.tiktoken",
                                     special_tokens=CL100K_SPECIAL_TOKENS)
    cl100k.save(tmp_path / "cl100k")
    result = run("data/prepare.py", "--source", data_dir / "pretrain" / "wiki_demo.txt", "--out", tmp_path / "w",
                 "--tokenizer", tmp_path / "cl100k", "--dtype", "uint16", check=False)
    assert result.returncode != 0 and "100277 tokens does not fit --dtype uint16" in result.stderr


def test_config_precedence_defaults_preset_file_flags(tmp_path):
    from training import parse_config
    from train import TRAIN_PRESETS, TrainConfig
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"lr": 0.5, "batch_size": 3}))
    config = parse_config(TrainConfig, TRAIN_PRESETS, "test", ["--preset", "cpu-shakespeare", "--config",
                                                                str(config_file), "--batch-size", "7", "--compile"])
    assert config.lr == 0.5                          # file over preset
    assert config.batch_size == 7                    # flag over file
    assert config.seq_len == 64 and config.max_time == 120.0  # preset over defaults
    assert config.compile is True and config.weight_decay == 0.1
    config_file.write_text(json.dumps({"learning_rate": 1.0}))
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, TRAIN_PRESETS, "test", ["--config", str(config_file)])
