"""Issue #21: no run silently wrong or clobbered. A tokenizer the model was not trained with is refused
wherever the two meet; bad input gets one line (exit 2 for usage errors), never a traceback; outputs
that would overwrite an input are refused before anything is written.

    python -m pytest -q tests/test_reliability.py
"""
import pytest
import torch

import eval as evaluation
import sample
import sft
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
def test_sample_refuses_a_tokenizer_the_model_was_not_trained_with(tmp_path, tokenizers, which, capsys):
    trained, paths = tokenizers
    run = tiny_checkpoint(tmp_path / "run", trained)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(run), "--tokenizer", paths[which], "--prompt", "To be", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and "not the tokenizer the model" in err and paths[which] in err
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


def test_sft_and_eval_refuse_a_foreign_tokenizer(tmp_path, tokenizers):
    trained, paths = tokenizers
    run = tiny_checkpoint(tmp_path / "run", trained)
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--init", str(run), "--data", str(tmp_path / "chat.jsonl"), "--tokenizer", paths["smaller"],
                  "--out-dir", str(tmp_path / "sft")])
    assert "not the tokenizer the model" in str(exit_info.value.code)
    with pytest.raises(ValueError, match="not the tokenizer the model"):
        evaluation.load_for_eval(run, tokenizer_path=paths["other"])
