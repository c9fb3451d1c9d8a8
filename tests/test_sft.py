"""sft.py end to end on the shared identity data: the masked loss falls, LoRA trains only adapters and
saves a merged model, resume is exact, packing changes no example's loss, bad input is named."""
import json

import pytest
import torch

from bpe import Tokenizer
from chat import load_conversations, pad_batch, tokenize_conversations
from common import load_model, save_checkpoint
from model import ModelConfig, Transformer
from sft import main, make_batch, masked_loss, pack_examples

ARGS = ["--max-len", "96", "--batch-size", "8", "--eval-fraction", "0.1", "--eval-prompts", "2",
        "--eval-new-tokens", "8", "--log-interval", "5", "--warmup-steps", "2", "--set", "name=nanollm",
        "--set", "author=Ada"]


def make_base(data_dir, out, tie_embeddings=False):
    """A random tiny model with a 512-token BPE trained on the identity answers, saved as a checkpoint."""
    conversations, _ = load_conversations(data_dir / "sft" / "identity.json", {"name": "nanollm", "author": "Ada"})
    tokenizer = Tokenizer.train([m["content"] for c in conversations for m in c], vocab_size=512)
    tokenizer.save(out / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                    max_seq_len=64, tie_embeddings=tie_embeddings))
    save_checkpoint(out, model, tokenizer="tokenizer")
    return out, tokenizer


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory):
    return make_base(data_dir, tmp_path_factory.mktemp("base"))


def run_sft(base_dir, data_dir, out, *extra):
    main(["--init", str(base_dir), "--data", str(data_dir / "sft" / "identity.json"), "--out-dir", str(out),
          *ARGS, *map(str, extra)])
    return json.loads((out / "summary.json").read_text())


def test_full_sft_learns_the_answers(base, data_dir, tmp_path):
    summary = run_sft(base[0], data_dir, tmp_path / "full", "--max-steps", 30, "--lr", 3e-3)
    assert summary["val_loss"] < summary["initial_val_loss"] - 1.0
    assert summary["trainable_params"] == summary["total_params"]
    model = load_model(tmp_path / "full")
    assert model.config.max_seq_len == 96  # raised to --max-len
    for name in ("metrics.jsonl", "loss.png", "tokenizer.json", "ckpt.pt"):
        assert (tmp_path / "full" / name).exists()


def test_lora_trains_adapters_and_saves_merged_model(base, data_dir, tmp_path):
    out = tmp_path / "lora"
    summary = run_sft(base[0], data_dir, out, "--max-steps", 60, "--lr", 2e-2, "--lora-rank", 8)
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.1  # a random base with frozen embeddings: slow
    assert summary["trainable_params"] < 0.2 * summary["total_params"]
    from lora import load_adapter
    merged = load_model(out)
    adapted = load_adapter(load_model(base[0]), out / "adapter.pt").eval()
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merged(idx)[0], adapted(idx)[0], atol=1e-4, rtol=0)
    assert (out / "adapter.pt").stat().st_size < (out / "ckpt.pt").stat().st_size / 3


def test_lora_with_an_embedding_adapter_on_a_tied_model(data_dir, tmp_path):
    base_dir, _ = make_base(data_dir, tmp_path / "tied", tie_embeddings=True)
    out = tmp_path / "lora_embed"
    summary = run_sft(base_dir, data_dir, out, "--max-steps", 30, "--lr", 2e-2, "--lora-rank", 4,
                      "--lora-embedding-rank", 1)
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.1
    from lora import load_adapter
    merged = load_model(out)
    assert merged.lm_head.weight is merged.embed_tokens.weight  # the merged checkpoint is still tied
    base_model = load_model(base_dir)
    assert not torch.equal(merged.embed_tokens.weight, base_model.embed_tokens.weight)  # the embedding moved
    adapted = load_adapter(base_model, out / "adapter.pt").eval()
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merged(idx)[0], adapted(idx)[0], atol=1e-4, rtol=0)


def test_resume_is_exact(base, data_dir, tmp_path, monkeypatch):
    import training  # where the run directory saves its checkpoint

    class Crash(Exception):
        pass

    def save_then_crash_at_step_4(ckpt_dir, model, **state):
        save_checkpoint(ckpt_dir, model, **state)
        if state["step"] == 4:
            raise Crash

    run_sft(base[0], data_dir, tmp_path / "straight", "--max-steps", 8, "--eval-interval", 4)
    monkeypatch.setattr(training, "save_checkpoint", save_then_crash_at_step_4)
    with pytest.raises(Crash):
        run_sft(base[0], data_dir, tmp_path / "resumed", "--max-steps", 8, "--eval-interval", 4)
    monkeypatch.undo()
    run_sft(base[0], data_dir, tmp_path / "resumed", "--max-steps", 8, "--eval-interval", 4, "--resume")
    a, b = load_model(tmp_path / "straight").state_dict(), load_model(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_packing_keeps_each_example_loss(base, data_dir):
    _, tokenizer = base
    conversations, _ = load_conversations(data_dir / "sft" / "identity.json", {"name": "nanollm", "author": "Ada"})
    examples, _ = tokenize_conversations(tokenizer, conversations[:12], max_len=64)
    pad = tokenizer.special_tokens["<|pad|>"]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                    max_seq_len=128)).eval()
    packed = pack_examples(examples, 128, pad)
    assert len(packed) < len(examples) and all(len(ids) <= 128 for ids, _, _ in packed)
    assert sum(len(ids) for ids, _, _ in packed) == sum(len(ids) for ids, _ in examples)
    with torch.no_grad():
        loss_packed, n_packed = masked_loss(model, *make_batch(packed, pad, "cpu", packed=True))
        loss_plain, n_plain = masked_loss(model, *pad_batch(examples, pad))
    assert n_packed == n_plain
    torch.testing.assert_close(loss_packed, loss_plain, atol=1e-5, rtol=0)


def test_bad_input_is_named(base, data_dir, tmp_path, refused):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q"}]))
    code, err = refused(main, "--init", base[0], "--data", bad, "--out-dir", tmp_path / "x")
    assert code != 0 and "bad.json: record 1: missing field 'output'" in err
    code, err = refused(main, "--init", base[0], "--data", bad, "--out-dir", tmp_path / "x", "--set", "name")
    assert code != 0 and "--set 'name': expected KEY=VALUE" in err
    code, err = refused(main, "--init", base[0], "--data", data_dir / "sft" / "identity.json", "--out-dir",
                        tmp_path / "y", *ARGS, "--max-steps", 1, "--eval-new-tokens", 96)
    assert code == 2 and "--eval-new-tokens 96 leaves no room for a prompt" in err
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())  # refused before the run starts


def test_tasks_cli_writes_arithmetic_chats_sft_reads(tmp_path, refused):
    import tasks
    out = tmp_path / "arith.jsonl"
    assert tasks.main(["--n", "20", "--n-terms", "2", "--max-operand", "30", "--out", str(out)]) == 0
    conversations, skipped = load_conversations(out)
    assert len(conversations) == 20 and skipped == 0
    for chat in conversations:
        terms = [int(x) for x in chat[0]["content"].removeprefix("What is ").removesuffix("?").split(" + ")]
        assert len(terms) == 2 and max(terms) <= 30 and chat[1]["content"] == f"The answer is {sum(terms)}."
        assert tasks.split_of(chat[0]["content"]) == "train"
    for argv, message in ((["--out", str(out)], "already exists"), (["--n", "500", "--split", "test", "--n-terms", "2"],
                                                                       "--n 500: only 8 distinct test problems")):
        code, err = refused(tasks.main, *argv)
        assert code == 2 and message in err
