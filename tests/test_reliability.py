"""Issue #21: no run silently wrong or clobbered. A tokenizer the model was not trained with is refused
wherever the two meet; bad input gets one line (exit 2 for usage errors), never a traceback; outputs
that would overwrite an input are refused before anything is written.

    python -m pytest -q tests/test_reliability.py
"""
import pytest
import torch

import evaluate as evaluation
import sample
import sft
import train
from bpe import Tokenizer
from common import check_tokenizer, load_tokenizer, save_checkpoint, tokenizer_identity
from model import ModelConfig, Transformer

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
OTHER_TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. " * 20


def tiny_checkpoint(directory, tokenizer, vocab_size=None, seed=0):
    """A random model of vocab_size rows (default: the tokenizer's) saved as train.py saves one."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size or tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2,
                         n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory / "tokenizer")
    save_checkpoint(directory, Transformer(config), tokenizer="tokenizer")
    return directory


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The model's 300-id tokenizer, a 270-id one, and another 300-id one learned from other text."""
    root = tmp_path_factory.mktemp("tokenizers")
    trained = Tokenizer.train(TEXT, 300)
    smaller = Tokenizer.train(TEXT, 270)
    other = Tokenizer.train(OTHER_TEXT, 300)
    assert trained.vocab_size == other.vocab_size == 300 and smaller.vocab_size == 270
    paths = {}
    for name, tok in (("trained", trained), ("smaller", smaller), ("other", other)):
        tok.save(root / name)
        paths[name] = str(root / f"{name}.json")
    return trained, paths


# ----------------------------------------------------------------------------------------------------------
# Tokenizer identity

def test_checkpoint_records_the_identity_of_its_tokenizer(tmp_path, tokenizers):
    trained, _ = tokenizers
    ckpt = torch.load(tiny_checkpoint(tmp_path / "run", trained) / "ckpt.pt", weights_only=False)
    assert ckpt["tokenizer_identity"] == tokenizer_identity(trained)
    assert tokenizer_identity(Tokenizer.train(OTHER_TEXT, 300)) != tokenizer_identity(trained)


@pytest.mark.parametrize("which", ["smaller", "other"])
def test_sample_refuses_a_tokenizer_the_model_was_not_trained_with(tmp_path, tokenizers, which, refused):
    trained, paths = tokenizers
    run = tiny_checkpoint(tmp_path / "run", trained)
    code, err = refused(sample.main, "--ckpt", run, "--tokenizer", paths[which], "--prompt", "To be", "--max-new-tokens", "4")
    assert code != 0 and "not the tokenizer the model" in err and paths[which] in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_same_tokenizer_from_elsewhere_and_a_padded_model_vocabulary_are_accepted(tmp_path, tokenizers, capsys):
    trained, paths = tokenizers
    padded = tiny_checkpoint(tmp_path / "padded", trained, vocab_size=320)   # as GPT-2's 50,257 in 50,304 rows
    sample.main(["--ckpt", str(padded), "--tokenizer", paths["trained"], "--prompt", "To be",
                 "--max-new-tokens", "4", "--strategy", "greedy"])
    assert "tokens/s" in capsys.readouterr().err
    check_tokenizer(padded, load_tokenizer(padded))


def test_a_replaced_tokenizer_file_beside_the_checkpoint_is_refused(tmp_path, tokenizers):
    trained, paths = tokenizers
    run = tiny_checkpoint(tmp_path / "run", trained)
    Tokenizer.load(paths["other"]).save(run / "tokenizer")
    with pytest.raises(ValueError, match="not the tokenizer the model"):
        check_tokenizer(run, load_tokenizer(run))


def test_sft_and_eval_refuse_a_foreign_tokenizer(tmp_path, tokenizers, refused):
    trained, paths = tokenizers
    run = tiny_checkpoint(tmp_path / "run", trained)
    code, err = refused(sft.main, "--init", run, "--data", tmp_path / "chat.jsonl", "--tokenizer", paths["smaller"],
                        "--out-dir", tmp_path / "sft")
    assert code == 1 and "not the tokenizer the model" in err
    with pytest.raises(ValueError, match="not the tokenizer the model"):
        evaluation.load_for_eval(run, tokenizer_path=paths["other"])


# ----------------------------------------------------------------------------------------------------------
# One line, not a traceback; nothing overwritten

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small corpus through data/prepare.py (a 300-id tokenizer), for train.py."""
    import data.prepare as prepare
    root = tmp_path_factory.mktemp("prepared")
    (root / "corpus.txt").write_text((TEXT + OTHER_TEXT) * 12)
    prepare.main(["--source", str(root / "corpus.txt"), "--out", str(root / "data"), "--vocab-size", "300"])
    return root / "data"


def one_line(err: str) -> str:
    """The error's line, checked to be the only one (after argparse's usage lines, for its own errors) and no
    traceback."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and all(line.startswith(("usage:", " ")) for line in lines[:-1]), err
    return lines[-1]


def train_args(data, out_dir, *flags):
    """train.py's command line for a two-step run of the tiny model."""
    return ["--data", data, "--out-dir", out_dir, "--model", "tiny", "--seq-len", "32", "--batch-size", "4",
            "--max-steps", "2", "--eval-interval", "2", "--eval-tokens", "256", "--sample-tokens", "0",
            "--warmup-steps", "1", "--log-interval", "1", *flags]


def test_train_usage_errors_are_one_line_with_exit_status_2(prepared, tmp_path, capsys, refused):
    code, err = refused(train.main, *train_args(prepared, tmp_path / "run", "--batch-size", "0"))
    assert code == 2 and "--batch-size must be >= 1, got 0" in one_line(err)

    train.main(list(map(str, train_args(prepared, tmp_path / "run"))))
    capsys.readouterr()
    saved = (tmp_path / "run" / "ckpt.pt").read_bytes()
    # another width: a size mismatch deep in torch today
    code, err = refused(train.main, *train_args(prepared, tmp_path / "run", "--resume", "--max-steps", "4", "--dim", "32"))
    assert code == 2 and "--resume" in one_line(err) and "dim 64 -> 32" in err
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == saved

    (tmp_path / "blocker").write_text("a file, not a directory")
    code, err = refused(train.main, *train_args(prepared, tmp_path / "blocker" / "run"))
    assert code == 2 and "--out-dir" in one_line(err) and f"{tmp_path / 'blocker'} is a file" in err


@pytest.mark.parametrize("script,argv", [
    ("sft", ["--init", "x", "--data", "y"]), ("dpo", ["--init", "x", "--data", "y"]), ("distill", ["--teacher", "x"]),
    ("rlhf", ["grpo", "--init", "x", "--prompts-per-step", "0"]), ("eval", ["--ckpt", "x", "--arithmetic", "5"]),
    ("distill", ["generate", "--teacher", "x", "--prompts", "y", "--out", "z"]),
    ("distill", ["cache", "--teacher", "x", "--data", "y", "--out", "z"])])
def test_a_batch_of_zero_is_a_usage_error_in_every_script(script, argv, refused):
    import importlib
    flag = "--prompts-per-step" if script == "rlhf" else "--batch-size"
    code, err = refused(importlib.import_module(script).main, *argv, *([] if script == "rlhf" else ["--batch-size", "0"]))
    assert code == 2 and f"{flag} must be >= 1, got 0" in one_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_the_machine_lacks_is_a_usage_error(tmp_path, refused):
    code, err = refused(sft.main, "--init", "x", "--data", "y", "--device", "cuda", "--out-dir", tmp_path / "run")
    assert code == 2 and one_line(err) and "--device cuda asked for, but torch sees no CUDA device" in err


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_train_resume_from_a_damaged_checkpoint_is_one_line(prepared, tmp_path, capsys, refused, damage):
    train.main(list(map(str, train_args(prepared, tmp_path / "run"))))
    capsys.readouterr()
    path = tmp_path / "run" / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:1000] if damage == "truncated" else b"")
    code, err = refused(train.main, *train_args(prepared, tmp_path / "run", "--resume", "--max-steps", "4"))
    assert code == 1 and f"{path}: not a readable checkpoint" in one_line(err)


@pytest.mark.parametrize("failure,free_mb,reason", [
    (OSError(28, "No space left on device"), 10_240, "the disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/3: "
                  "file write failed"), 10_240, "file write failed; 10,240 MB free on that disk"),
    # the wordings torch.save gave when this machine's disk filled, 57 MB left
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 117952 vs 117846"), 57,
     "the disk is full: 57 MB free"),
    (RuntimeError("basic_ios::clear: iostream error"), 57, "the disk is full: 57 MB free")])
def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, tokenizers, monkeypatch, failure,
                                                                     free_mb, reason):
    import shutil
    from types import SimpleNamespace
    from common import WriteError
    trained, _ = tokenizers
    run = tiny_checkpoint(tmp_path / "run", trained)
    before = (run / "ckpt.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise failure
    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=free_mb * 2**20))
    with pytest.raises(WriteError) as error:
        save_checkpoint(run, Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                                                     hidden_dim=64, max_seq_len=64)))
    assert str(error.value) == f"cannot write {run / 'ckpt.pt'} ({reason}); the previous ckpt.pt is intact"
    assert (run / "ckpt.pt").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt", "tokenizer.json", "tokenizer.tiktoken"]  # no .tmp


def test_a_read_only_directory_is_named(tmp_path, tokenizers, monkeypatch):
    """As root the permission bits do not stop a write, so the refusal a read-only mount gives is simulated."""
    import tempfile
    from common import UsageError, WriteError, check_writable_dir
    trained, _ = tokenizers
    run = tiny_checkpoint(tmp_path / "run", trained)
    before = (run / "ckpt.pt").read_bytes()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(WriteError, match=r"ckpt.pt \(the directory is not writable\); the previous ckpt.pt is intact"):
        save_checkpoint(run, Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                                                     hidden_dim=64, max_seq_len=64)))
    assert (run / "ckpt.pt").read_bytes() == before
    with pytest.raises(UsageError, match=f"--out-dir {run}: cannot write there \\(the directory is not writable\\)"):
        check_writable_dir(run)


def test_prepare_refuses_a_vocabulary_smaller_than_the_bytes_and_specials(tmp_path, refused):
    import data.prepare as prepare
    (tmp_path / "corpus.txt").write_text(TEXT)
    code, err = refused(prepare.main, "--source", tmp_path / "corpus.txt", "--out", tmp_path / "data", "--vocab-size", "100")
    assert code == 2
    assert "--vocab-size must be at least the 256 byte tokens + 6 special tokens = 262, got 100" in one_line(err)
    assert not (tmp_path / "data" / "meta.json").exists()


def test_sft_names_a_file_that_is_not_utf8(tmp_path, tokenizers, refused):
    trained, _ = tokenizers
    run = tiny_checkpoint(tmp_path / "run", trained)
    chat_file = tmp_path / "chats.jsonl"
    raw = b'{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
    chat_file.write_bytes(raw)
    code, err = refused(sft.main, "--init", run, "--data", chat_file, "--out-dir", tmp_path / "sft")
    assert code == 1 and f"{chat_file}: not UTF-8 text (line 2, byte offset {raw.index(0xE9)}" in err


def test_quant_refuses_to_overwrite_its_input_and_names_the_group_size_flag(tmp_path, tokenizers, refused):
    import quant
    trained, _ = tokenizers
    run = tiny_checkpoint(tmp_path / "run", trained)          # dim 32: narrower than the default group of 128
    before = (run / "ckpt.pt").read_bytes()
    for out in (run, run / "ckpt.pt"):
        code, err = refused(quant.main, "--ckpt", run, "--out", out, "--method", "rtn", "--no-eval")
        assert code == 2 and "is --ckpt's directory" in one_line(err)
    other = tiny_checkpoint(tmp_path / "other", trained)
    code, err = refused(quant.main, "--ckpt", run, "--out", other, "--method", "rtn", "--no-eval")
    assert code == 2 and "holds a full-precision checkpoint" in one_line(err)
    assert (run / "ckpt.pt").read_bytes() == before
    code, err = refused(quant.main, "--ckpt", run, "--out", tmp_path / "q", "--method", "rtn", "--no-eval")
    err = one_line(err)
    assert code == 2 and "--group-size 128 does not divide the 32 input columns of layers.0.self_attn.q_proj" in err


# ----------------------------------------------------------------------------------------------------------
# Generation

def test_a_generation_cut_short_by_the_context_says_so(tmp_path, tokenizers, capsys):
    trained, _ = tokenizers
    run = tiny_checkpoint(tmp_path / "run", trained)                 # a context of 64 tokens
    n_prompt = len(trained.encode("To be"))
    sample.main(["--ckpt", str(run), "--prompt", "To be", "--max-new-tokens", "100", "--strategy", "greedy"])
    err = capsys.readouterr().err
    assert (f"[the generation stopped at the model's context of 64 tokens ({n_prompt} prompt + {64 - n_prompt} new), "
            f"before --max-new-tokens 100]") in err
    assert f"[{64 - n_prompt} tokens in" in err
    sample.main(["--ckpt", str(run), "--prompt", "To be", "--max-new-tokens", "10", "--strategy", "greedy"])
    assert "context" not in capsys.readouterr().err
