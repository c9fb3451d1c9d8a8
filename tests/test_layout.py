"""The layout: stage scripts import library modules, never each other (read from the source with ast), and
every benchmark module answers --help."""
import ast
import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Scripts run as a stage of the pipeline; none may be imported by any other module of the implementation.
# (bpe.py, chat.py, sample.py and quant.py have a CLI too, but they are also the libraries of the tokenizer,
# the chat template, generation and weight quantization (activation_quant.py rounds with quant.py's grids and
# GPTQ); data/curate.py's curate() is what data/prepare.py --curate runs.)
STAGE_SCRIPTS = {"train", "sft", "dpo", "rlhf", "distill", "eval", "pipeline", "data.prepare"}
BENCHMARKS = ["model", "kernels", "tokenizer", "sft", "dpo", "decode", "quant", "curate", "gguf", "moe", "awq"]


def implementation_files():
    """Every .py of the implementation: the top level, data/ and kernels/ (not tests/ or bench/)."""
    return sorted([*REPO.glob("*.py"), *(REPO / "data").glob("*.py"), *(REPO / "kernels").glob("*.py")])


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module, line) for every import in the file, at any depth (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]  # from data import prepare
    return found


def stage_imports() -> list[str]:
    problems = []
    for path in implementation_files():
        me = module_name(path)
        for module, line in imported_modules(path):
            if module in STAGE_SCRIPTS and module != me:
                problems.append(f"{path.relative_to(REPO)}:{line} imports the stage script {module}")
    return problems


def test_no_module_imports_a_stage_script():
    assert stage_imports() == []


def test_the_check_finds_a_stage_script_import(tmp_path, monkeypatch):
    """The test above can fail: a file importing train.py (at function level) is named with its line."""
    (tmp_path / "data").mkdir()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "good.py").write_text("import json\nfrom training import RunDir\n")
    (tmp_path / "bad.py").write_text("import json\n\ndef f():\n    from train import evaluate\n")
    (tmp_path / "data" / "worse.py").write_text("from data import prepare\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert stage_imports() == ["bad.py:4 imports the stage script train",
                               "data/worse.py:1 imports the stage script data.prepare"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_module_answers_help(name, capsys):
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out


@pytest.mark.parametrize("module, argv", [
    ("train", []), ("sft", []), ("dpo", []), ("rlhf", ["reward"]), ("rlhf", ["grpo"]), ("rlhf", ["ppo"]),
    ("distill", []), ("distill", ["cache"]), ("quant", []), ("pipeline", []), ("bpe", ["train"]),
    ("data.prepare", []), ("data.curate", [])])
def test_every_cli_takes_out_dir(module, argv, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).main([*argv, "--help"])
    assert "--out-dir" in capsys.readouterr().out
