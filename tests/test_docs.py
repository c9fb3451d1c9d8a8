"""The documentation's commands: every shell command in README.md, README_zh.md and docs/*.md must name a
script or module that exists and only flags that the script's --help lists.

Commands are taken from the ```bash blocks: `python X.py ...`, `python -m bench.NAME ...`, `python -m
pytest ...` and `torchrun ... X.py ...`, also after `VAR=value`, `&&`, `;` and `|`, across `\\` line
continuations and multi-line quotes, with comments dropped and shell variables defined in the same block
(`KD="python distill.py ..."`, then `$KD --alpha 0`) expanded. Values are never checked, so placeholders
(PATH, DIR, FILE.gguf, "...") are fine. `python SCRIPT [SUBCOMMAND] --help` runs once per script and is
cached. The quick commands (--help itself, model.py's preset tables, bpe.py encode with the shared
tokenizer files) run in full; the others need trained checkpoints or minutes and are skipped as not run.
A failure names the file, the line, the command and what is missing.

The commands run as the script's main(args) in this process (a python started per command, each importing
torch, took minutes); `python -m pytest` runs as a subprocess, every documented script is checked to call
main() under `if __name__ == "__main__":`, and one script runs as a subprocess.
"""
import ast
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", ROOT / "README_zh.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", "|", ";", "&", "(", ")"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SUBCOMMAND = re.compile(r"^[a-z][a-z0-9_-]*$")
HELP_TIMEOUT_S = 300


@dataclass(frozen=True)
class Command:
    file: str           # path relative to the repository root
    line: int           # the line of the file where the command starts
    argv: tuple         # ("python", "-m", "bench.model", ...) or ("python", "train.py", ...), torchrun's options dropped
    text: str           # the command as written (variables expanded), for messages

    @property
    def module(self):
        return self.argv[2] if self.argv[1] == "-m" else None

    @property
    def script(self):
        return None if self.argv[1] == "-m" else self.argv[1]

    @property
    def args(self):
        return self.argv[3:] if self.module else self.argv[2:]

    @property
    def subcommand(self):
        """The first argument when it is a bare word (bpe.py train, rlhf.py grpo, bench.sft identity)."""
        return self.args[0] if self.args and SUBCOMMAND.match(self.args[0]) else None

    @property
    def where(self):
        return f"{self.file}:{self.line}: `{self.text}`"


def shell_blocks(text: str):
    """(line number of the block's first line, lines) of every fenced shell code block."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```\s*(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        if fence.group(1).lower() in SHELL_LANGUAGES:
            yield i + 2, lines[i + 1:end]
        i = end + 1


def tokenize(line: str):
    """Shell words and separators of one logical line, comments dropped; ValueError on an open quote."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def expand(line: str, variables: dict) -> str:
    for name, value in variables.items():
        line = re.sub(r"\$(\{" + name + r"\}|" + name + r"(?![A-Za-z0-9_]))", lambda m: value, line)
    return line


def logical_lines(lines, first_line: int):
    """Join `\\` continuations and lines inside an open quote: (start line, text)."""
    buffer, start = "", None
    for offset, line in enumerate(lines):
        if start is None:
            start = first_line + offset
        if line.endswith("\\") and not line.endswith("\\\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        try:
            tokenize(buffer)
        except ValueError:  # a quote spans lines (python -c "...")
            buffer += "\n"
            continue
        if buffer.strip():
            yield start, buffer
        buffer, start = "", None
    if buffer.strip():
        yield start, buffer


def commands_in(text: str, file: str):
    """Every python / torchrun command of the shell blocks of one Markdown text."""
    for first_line, lines in shell_blocks(text):
        variables = {}
        for line_no, line in logical_lines(lines, first_line):
            line = expand(line, variables)
            try:
                tokens = tokenize(line)
            except ValueError:
                continue
            simple, simples = [], []
            for token in tokens + [";"]:
                if token in SEPARATORS:
                    simples.append(simple)
                    simple = []
                else:
                    simple.append(token)
            for words in simples:
                if words[:1] == ["export"]:
                    words = words[1:]
                while words and ASSIGNMENT.match(words[0]):
                    if len(words) == 1 or all(ASSIGNMENT.match(w) for w in words):
                        name, value = words[0].split("=", 1)
                        variables[name] = value
                    words = words[1:]
                if not words:
                    continue
                if words[0] == "torchrun":
                    rest = [w for w in words[1:] if not w.startswith("-")]
                    words = ["python", *words[words.index(rest[0]):]] if rest else []
                if words[:1] not in (["python"], ["python3"]) or len(words) < 2 or words[1] == "-c":
                    continue
                if words[1] == "-m" and len(words) < 3:
                    continue
                text_of = " ".join(shlex.quote(w) if w != "|" else w for w in words)
                yield Command(file, line_no, ("python", *words[1:]), text_of)


def all_commands():
    commands = []
    for path in DOC_FILES:
        if path.exists():
            commands += commands_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return commands


COMMANDS = all_commands()


def command_ids(commands):
    """file:line, and file:line+k for the k-th further command on the same line (a && b, a | b)."""
    seen, ids = {}, []
    for c in commands:
        key = f"{c.file}:{c.line}"
        seen[key] = seen.get(key, 0) + 1
        ids.append(key if seen[key] == 1 else f"{key}+{seen[key] - 1}")
    return ids


COMMAND_IDS = command_ids(COMMANDS)


def module_exists(name: str) -> bool:
    local = ROOT / Path(*name.split("."))
    if local.with_suffix(".py").is_file() or (local / "__init__.py").is_file():
        return True
    if (ROOT / name.split(".")[0]).exists():  # a local package without this module
        return False
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def help_argv(command: Command, with_subcommand: bool):
    target = ["-m", command.module] if command.module else [command.script]
    sub = [command.subcommand] if with_subcommand and command.subcommand else []
    return (sys.executable, *target, *sub, "--help")


def environment():
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_subprocess(argv: tuple, timeout_s: float):
    """(exit code, output) of argv run as a subprocess in the repository root."""
    try:
        done = subprocess.run(argv, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout_s} s"
    return done.returncode, done.stdout + done.stderr


def main_module(argv: tuple) -> str:
    """The module whose main() `python SCRIPT ...` or `python -m MODULE ...` runs: data/prepare.py -> data.prepare."""
    return argv[2] if argv[1] == "-m" else argv[1].removesuffix(".py").replace("/", ".")


def run_main(argv: tuple):
    """(exit code, output) of `python SCRIPT ARGS` as the script's main([ARGS]) called in this process, in the
    repository root; an exception other than SystemExit is exit code 1 with its traceback, as python gives."""
    args = argv[3:] if argv[1] == "-m" else argv[2:]
    output = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            code = importlib.import_module(main_module(argv)).main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        except Exception:
            traceback.print_exc()
            code = 1
    if not isinstance(code, int):  # sys.exit("message") prints it and exits 1
        output.write("" if code is None else f"{code}\n")
        code = 0 if code is None else 1
    return code, output.getvalue()


@lru_cache(maxsize=None)
def run_help(argv: tuple):
    """(exit code, output) of one `python SCRIPT [SUBCOMMAND] --help`, run once."""
    if argv[1:3] == ("-m", "pytest"):  # pytest's own --help cannot run inside this pytest
        return run_subprocess(argv, HELP_TIMEOUT_S)
    return run_main(argv)


def target_problem(command: Command):
    """Why the command's script or module cannot run, or None."""
    if command.module:
        if not module_exists(command.module):
            return f"no module {command.module} ({command.module.replace('.', '/')}.py does not exist)"
    elif not (ROOT / command.script).is_file():
        return f"no script {command.script}"
    return None


def flag_problems(command: Command):
    problem = target_problem(command)
    if problem:
        return [problem]
    code, text = run_help(help_argv(command, True))
    shown = " ".join(help_argv(command, True)[1:]).replace(sys.executable, "python")
    if code != 0 and command.subcommand:  # a positional value that is no subcommand: check against the plain help
        code, text = run_help(help_argv(command, False))
        shown = " ".join(help_argv(command, False)[1:])
    if code != 0:
        last = text.strip().splitlines()[-1] if text.strip() else "(no output)"
        return [f"`python {shown}` exited {code}: {last}"]
    flags = [a.split("=", 1)[0] for a in command.args if a.startswith("--") and len(a) > 2]
    missing = [f for f in dict.fromkeys(flags) if not re.search(r"(?<![\w-])" + re.escape(f) + r"(?![\w-])", text)]
    extra = []
    if command.module == "pytest":
        extra = [f"no test file {a}" for a in command.args
                 if a.startswith("tests/") and not (ROOT / a.split("::")[0]).exists()]
    return [f"{f} is not in `python {shown}`" for f in missing] + extra


def quick(command: Command):
    """The commands that finish in seconds without a trained model: (argv to run, why it is quick) or None."""
    if "--help" in command.args or "-h" in command.args:
        return "its --help"
    if command.script == "model.py":
        return "model.py prints its preset tables"
    if command.script == "bpe.py" and command.subcommand == "encode" and "--text" in command.args:
        tokenizer = command.args[command.args.index("--tokenizer") + 1] if "--tokenizer" in command.args else None
        if tokenizer and (ROOT / tokenizer).is_file():
            return "bpe.py encode with a tokenizer file"
    return None


@pytest.mark.parametrize("command", COMMANDS, ids=COMMAND_IDS)
def test_command_script_and_flags_exist(command):
    problems = flag_problems(command)
    assert not problems, "\n".join(f"{command.where}: {p}" for p in problems)


QUICK = [(c, i) for c, i in zip(COMMANDS, COMMAND_IDS) if quick(c) is not None]  # the rest need a model or minutes


@pytest.mark.parametrize("command", [c for c, _ in QUICK], ids=[i for _, i in QUICK])
def test_quick_command_runs(command):
    problem = target_problem(command)
    assert problem is None, f"{command.where}: {problem}"
    argv = (sys.executable, *command.argv[1:])
    code, output = run_help(argv) if argv[-1] in ("--help", "-h") else run_main(argv)  # help: cached
    last = output.strip().splitlines()[-1:] or ["(no output)"]
    assert code == 0, f"{command.where}: exited {code}: {last[0]}"
    assert output.strip(), f"{command.where}: printed nothing"


def calls_main_as_a_script(path: Path) -> bool:
    """Whether the file has `if __name__ == "__main__":` with a call of main() in it."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and ast.unparse(node.test) in ("__name__ == '__main__'", "'__main__' == __name__")):
            return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "main"
                       for n in ast.walk(node))
    return False


def test_every_documented_script_calls_main_when_run():
    """The flag checks call main() in this process: `python SCRIPT` runs the same only if the script calls it."""
    local = {c.script or f"{c.module.replace('.', '/')}.py" for c in COMMANDS if target_problem(c) is None}
    local = sorted(name for name in local if (ROOT / name).is_file())
    assert len(local) > 20
    assert [name for name in local if not calls_main_as_a_script(ROOT / name)] == []


def test_a_script_answers_help_as_a_subprocess():
    """One documented script started as python does it (from a subfolder: its own sys.path set-up included)."""
    code, output = run_subprocess((sys.executable, "data/prepare.py", "--help"), HELP_TIMEOUT_S)
    assert code == 0 and "--out-dir" in output and "usage" in output, output[-2000:]


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_line = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    readme_lines = [line for _, lines in shell_blocks((ROOT / "README.md").read_text()) for line in lines]
    assert ci_line.strip() in [line.strip() for line in readme_lines], \
        f"README.md has no shell line equal to .ci/run's `{ci_line.strip()}`"


NEW_TOPIC_DOCS = {"gguf.md", "merge.md", "moe.md", "awq_smoothquant.md"}  # written by other stages' work, may land later


def heading_anchors(text: str) -> set:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*)$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def test_links_between_the_docs_resolve():
    problems = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for line_no, line in enumerate(text.split("\n"), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z]+://", target):
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(ROOT)}:{line_no}: link {target}"
                if linked.name in NEW_TOPIC_DOCS and not linked.exists():
                    continue
                if not linked.exists():
                    problems.append(f"{where}: {file_part} does not exist")
                elif anchor and anchor not in heading_anchors(linked.read_text(encoding="utf-8")):
                    problems.append(f"{where}: {linked.name} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


def test_the_readme_has_commands():
    assert {"README.md", "README_zh.md"} <= {c.file for c in COMMANDS}


EXTRACTION_SAMPLE = '''
Some prose with `python not_a_block.py --x`.

```bash
OMP_NUM_THREADS=1 python train.py --preset cpu-shakespeare \\
    --out-dir out/a   # a comment with --not-a-flag
KD="python distill.py --preset p --data d"        # add --seed 2
$KD --alpha 0 --out-dir out/hard && python sample.py --ckpt PATH.gguf --interactive
python bpe.py encode --text "a # b" | python bpe.py decode --tokenizer out/tang
python -c "import json
print(1)"
torchrun --nproc_per_node=8 train.py --data DIR
python -m bench.sft identity --init out/base
pip install -r requirements.txt; python -m pytest -q
```

```python
python looks_like_a_command.py --in-a-python-block
```
'''


def test_extraction_handles_continuations_comments_variables_pipes_and_quotes():
    found = [(c.line, c.argv) for c in commands_in(EXTRACTION_SAMPLE, "sample.md")]
    assert found == [
        (5, ("python", "train.py", "--preset", "cpu-shakespeare", "--out-dir", "out/a")),
        (8, ("python", "distill.py", "--preset", "p", "--data", "d", "--alpha", "0", "--out-dir", "out/hard")),
        (8, ("python", "sample.py", "--ckpt", "PATH.gguf", "--interactive")),
        (9, ("python", "bpe.py", "encode", "--text", "a # b")),
        (9, ("python", "bpe.py", "decode", "--tokenizer", "out/tang")),
        (12, ("python", "train.py", "--data", "DIR")),
        (13, ("python", "-m", "bench.sft", "identity", "--init", "out/base")),
        (14, ("python", "-m", "pytest", "-q")),
    ]
    sft = Command("sample.md", 13, ("python", "-m", "bench.sft", "identity", "--init", "out/base"), "")
    assert (sft.module, sft.subcommand, sft.args) == ("bench.sft", "identity", ("identity", "--init", "out/base"))
