"""The training scripts' shared plumbing: every CLI keeps its defaults on training.RunConfig (the values
below are the ones each script declared before the refactor), --help orders and documents the options,
and the progress line's timing (training.StepTimer), lr setting and metrics file helpers behave."""
import json

import pytest

import distill
import dpo
import rlhf
import sft
import train
import training
from training import RunConfig, append_jsonl, opt, parse_config, truncate_metrics

SCRIPTS = {"train": (train.TrainConfig, train.TRAIN_PRESETS), "sft": (sft.SFTConfig, sft.SFT_PRESETS),
           "dpo": (dpo.DPOConfig, dpo.DPO_PRESETS), "distill": (distill.DistillConfig, distill.DISTILL_PRESETS),
           **{f"rlhf {c}": (rlhf.CONFIGS[c], rlhf.PRESETS[c]) for c in rlhf.SUBCOMMANDS}}

# (max_steps, lr, min_lr, warmup_steps, weight_decay, eval_interval, log_interval, out_dir) as each script had them
OLD_DEFAULTS = {
    "train": (2000, 1e-3, 1e-4, 100, 0.1, 250, 10, "out/train"),
    "sft": (300, 1e-4, 1e-5, 20, 0.0, 100, 10, "out/sft"),
    "dpo": (200, 5e-5, 5e-6, 10, 0.0, 50, 10, "out/dpo"),
    "distill": (2000, 1e-3, 1e-4, 100, 0.1, 250, 10, "out/distill"),
    "rlhf reward": (400, 3e-4, 3e-5, 20, 0.0, 100, 10, "out/rm"),
    "rlhf ppo": (200, 1e-3, 1e-3, 5, 0.0, 20, 5, "out/ppo"),
    "rlhf grpo": (200, 1e-3, 1e-3, 5, 0.0, 20, 5, "out/grpo"),
}
KEYS = ("max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "eval_interval", "log_interval", "out_dir")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_defaults_are_the_scripts_own(script):
    config_class, presets = SCRIPTS[script]
    config = parse_config(config_class, presets, "test", [])
    assert tuple(getattr(config, k) for k in KEYS) == OLD_DEFAULTS[script]
    assert (config.max_time, config.beta1, config.beta2, config.grad_clip, config.device, config.seed,
            config.resume) == (0.0, 0.9, 0.95, 1.0, "auto", 1337, False)


def test_script_specific_defaults():
    assert parse_config(rlhf.GRPOConfig, {}, "test", []).samples_per_prompt == 8
    ppo = parse_config(rlhf.PPOConfig, {}, "test", [])
    assert (ppo.prompts_per_step, ppo.samples_per_prompt, ppo.ppo_epochs, ppo.minibatches, ppo.beta) == (32, 1, 2, 2, 0.2)
    assert parse_config(rlhf.RewardConfig, {}, "test", []).batch_size == 16
    assert parse_config(sft.SFTConfig, {}, "test", []).batch_size == 8


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_preset_parses_and_applies(script):
    config_class, presets = SCRIPTS[script]
    for name, values in presets.items():
        config = parse_config(config_class, presets, "test", ["--preset", name])
        assert {k: getattr(config, k) for k in values} == values, name


def test_help_takes_the_base_text_and_lists_own_options_first(capsys):
    with pytest.raises(SystemExit):
        parse_config(sft.SFTConfig, sft.SFT_PRESETS, "test", ["--help"])
    text = capsys.readouterr().out
    own, shared = text.split("\noptions:")[1].split("\noptimisation and run")
    assert "--lora-rank" in own and "--pack" in own and "--warmup-steps" not in own
    # sft.py only re-declares the default of --warmup-steps; the help text is RunConfig's
    assert "--warmup-steps WARMUP_STEPS\n                        linear warmup steps (default: 20)" in shared
    assert "LoRA usually wants ~10x more" in shared  # a re-declaration with opt() gives its own help


def test_a_field_without_help_is_an_error():
    from dataclasses import dataclass

    @dataclass
    class Bad(RunConfig):
        batch_size: int = 4

    with pytest.raises(TypeError, match="batch_size"):
        parse_config(Bad, {}, "test", [])

    @dataclass
    class Good(RunConfig):
        batch_size: int = opt(4, "rows per step")
        lr: float = 0.5

    assert parse_config(Good, {}, "test", ["--batch-size", "6"]) == Good(batch_size=6, lr=0.5)


def test_step_timer_pace_and_eta(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(training.time, "time", lambda: now[0])
    timer = training.StepTimer(RunConfig(max_steps=100, max_time=0.0), step=0)
    now[0] += 20.0  # 10 steps in 20 s
    assert timer.lap(10, elapsed=20.0) == (2.0, 20.0, 180.0)  # 90 steps left at 2 s each
    now[0] += 50.0  # an eval, then 10 steps in 10 s
    timer.skip_pause()
    now[0] += 10.0
    assert timer.lap(20, elapsed=40.0) == (1.0, 10.0, 80.0)
    capped = training.StepTimer(RunConfig(max_steps=100, max_time=50.0), step=0)
    now[0] += 20.0
    assert capped.lap(10, elapsed=45.0)[2] == 5.0  # the budget ends before the steps do
    assert training.progress_line(20, 100, 80.0, "loss 1.2345", "lr 1.00e-03") == \
        "step 20/100 | loss 1.2345 | lr 1.00e-03 | ETA 1m20s"


def test_set_lr_follows_steps_or_the_time_budget():
    import torch
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    config = RunConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.0)
    assert training.set_lr(optimizer, config, 4, elapsed=0.0) == pytest.approx(0.5)  # warmup: (4 + 1) / 10
    assert training.set_lr(optimizer, config, 50, elapsed=0.0) == pytest.approx(0.5)  # cosine half way
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    timed = RunConfig(max_steps=100, max_time=10.0, warmup_steps=10, lr=1.0, min_lr=0.0)
    assert training.set_lr(optimizer, timed, 20, elapsed=10.0) == pytest.approx(0.0)  # the budget is spent


def test_metrics_file_truncated_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    for step in (1, 2, 3, 2):  # an eval row may repeat a step
        append_jsonl(path, {"step": step, "loss": float(step)})
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 2]
