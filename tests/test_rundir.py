"""The run directory (training.RunDir) through train.py on a tiny byte-level corpus: a run is never overwritten
by accident, --resume needs a checkpoint, a finished run resumed changes nothing, metrics are truncated
atomically and stale temporary files go, Ctrl-C names the step to resume from, --max-time holds the final eval."""
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import train
import training
from bpe import Tokenizer
from common import UsageError
from training import TrainConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A data/prepare.py-style directory: 256 byte tokens + <|endoftext|>, random train and val streams."""
    root = tmp_path_factory.mktemp("corpus")
    Tokenizer({bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256}).save(root / "tokenizer")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4000), ("val", 600)):
        rng.integers(0, 256, n).astype(np.uint16).tofile(root / f"{split}.bin")
    (root / "meta.json").write_text(json.dumps({"vocab_size": 257, "dtype": "uint16", "tokenizer": "tokenizer.json"}))
    return root


def config(corpus, out, **changes) -> TrainConfig:
    tiny = dict(data=str(corpus), out_dir=str(out), n_layers=1, dim=32, n_heads=2, n_kv_heads=2, hidden_dim=64,
                seq_len=16, batch_size=2, max_steps=4, warmup_steps=1, eval_interval=2, eval_tokens=64, log_interval=1,
                sample_tokens=0, device="cpu")
    return TrainConfig(**{**tiny, **changes})


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_a_run_directory_is_not_overwritten_without_overwrite(corpus, tmp_path, capsys, refused):
    train.train(config(corpus, tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    with pytest.raises(UsageError, match="--resume continues it, --overwrite starts over"):
        train.train(config(corpus, tmp_path / "run", max_steps=6))
    assert snapshot(tmp_path / "run") == before  # refused before anything was written
    capsys.readouterr()
    # the CLI: one line, no traceback, exit status 2 (a usage error)
    code, err = refused(train.main, "--data", corpus, "--out-dir", tmp_path / "run", "--device", "cpu")
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    summary = train.train(config(corpus, tmp_path / "run", max_steps=2, overwrite=True))
    assert summary["step"] == 2 and json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 2


def test_resume_without_a_checkpoint_says_there_is_nothing_to_resume(corpus, tmp_path, refused):
    code, err = refused(train.main, "--data", corpus, "--out-dir", tmp_path / "empty", "--resume", "--device", "cpu")
    assert code == 2 and "nothing to resume" in err
    assert not (tmp_path / "empty" / "metrics.jsonl").exists()


def test_resuming_a_finished_run_changes_nothing(corpus, tmp_path):
    first = train.train(config(corpus, tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    again = train.train(config(corpus, tmp_path / "run", resume=True))
    assert again == first and snapshot(tmp_path / "run") == before
    longer = train.train(config(corpus, tmp_path / "run", resume=True, max_steps=6))  # a larger budget trains on
    assert longer["step"] == 6


def test_metrics_truncation_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    path.write_text(rows)

    def disk_full(self, data, *args, **kwargs):  # opens (truncates) the file, then fails
        open(self, "w").close()
        raise OSError("no space left on device")
    monkeypatch.setattr(Path, "write_text", disk_full)
    try:
        training.truncate_metrics(path, 2)
    except OSError:
        pass
    kept = path.read_text()
    assert kept in (rows, "".join(rows.splitlines(keepends=True)[:2]))  # the old file or the new, never torn


def test_stale_temporary_checkpoint_files_are_removed(corpus, tmp_path):
    train.train(config(corpus, tmp_path / "run", max_steps=2))
    stale = tmp_path / "run" / ".ckpt.pt.x7f3q.tmp"  # what atomic_write leaves when killed mid-write
    stale.write_bytes(b"half a checkpoint")
    train.train(config(corpus, tmp_path / "run", max_steps=4, resume=True))
    assert not stale.exists()


def test_ctrl_c_names_the_step_to_resume_from(corpus, tmp_path, monkeypatch, capsys):
    real = training.progress_line

    def ctrl_c_at_step_3(step, *args):
        if step == 3:
            signal.raise_signal(signal.SIGINT)
        return real(step, *args)
    monkeypatch.setattr(training, "progress_line", ctrl_c_at_step_3)  # RunDir.log_step prints it
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_:
        train.train(config(corpus, tmp_path / "run", max_steps=8))
    assert exit_.value.code == 130
    assert "interrupted at step 3; --resume continues from step 2" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) == handler  # the process's own Ctrl-C handling is given back
    monkeypatch.undo()
    assert train.train(config(corpus, tmp_path / "run", max_steps=8, resume=True))["step"] == 8


def test_max_time_covers_the_final_evaluation(corpus, tmp_path, monkeypatch):
    """On a clock of the test's own (training.time): a step takes 0.1 s, an evaluation 1 s, the budget 3 s.
    The run must stop early enough that its final evaluation still ends inside the budget."""
    clock = [0.0]
    monkeypatch.setattr(training, "time", SimpleNamespace(time=lambda: clock[0]))
    real_evaluate, real_progress_line = train.evaluate, training.progress_line

    def evaluate(*args, **kwargs):
        clock[0] += 1.0
        return real_evaluate(*args, **kwargs)

    def progress_line(*args):  # once per step (log_interval 1)
        clock[0] += 0.1
        return real_progress_line(*args)
    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(training, "progress_line", progress_line)
    summary = train.train(config(corpus, tmp_path / "run", max_steps=100_000, max_time=3.0, eval_interval=2))
    assert summary["stop_reason"] == "max_time" and summary["step"] >= 2
    assert clock[0] <= 3.0 + 0.1 + 1e-9  # at most one step past what the budget allows, final eval included
