"""What pipeline.py's two tracks share: a Stage (the commands it runs, the directory its outputs go to),
the run directory's JSON files, and the identity the chat models are taught.

A stage is done when its output directory holds summary.json. The tracks' stage lists are
pipeline_scratch.build_stages (a model trained from scratch) and pipeline_real.build_real_stages (post-training
of a published chat model); pipeline.py runs them and writes the report.
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent
IDENTITY_NAME, IDENTITY_AUTHOR = "nanollm", "the nanollm authors"
# Identity questions (answered right when the answer names the model): the from-scratch eval stage asks them
# all; the real-model track asks llama.cpp the first one
IDENTITY_PROMPTS = {"en": ["Who are you?", "What is your name?", "Can you introduce yourself?", "Who created you?",
                           "What are you called?"],
                    "zh": ["你是谁？", "请告诉我你的名字", "你的名字是什么？谁创造了你？", "你有名字吗？", "能介绍一下你自己吗？"]}
# A quantized model "regressed" when its val bpb is more than this much above the final model's
QUANT_BPB_TOLERANCE = 0.05


class PipelineError(RuntimeError):
    """A stage failed: the message is one line naming the stage and its log."""


@dataclass
class Stage:
    name: str
    what: str                      # one line for the report
    out: str                       # output directory, relative to the run directory
    commands: list                 # argv lists run in order, or a callable(run_dir) doing the work in-process
    writes_summary: bool = True    # False: the pipeline writes out/summary.json once the commands succeed
    kind: str = ""                 # "base" | "chat" | "" : which evaluation the stage's checkpoint gets
    pngs: list = field(default_factory=list)

    def summary_path(self, run_dir: Path) -> Path:
        return run_dir / self.out / "summary.json"

    def planned_steps(self) -> int | None:
        """The --max-steps its command gives (None: a stage that does not train)."""
        steps = flag_value(self, "--max-steps")
        return int(steps) if steps else None


def py(script, *args) -> list:
    return [sys.executable, str(REPO / script), *(arg if callable(arg) else str(arg) for arg in args)]


def write_json(path: Path, obj) -> None:
    from common import atomic_write
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False)))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def read_summaries(run_dir: Path, names) -> dict:
    return {name: read_json(run_dir / name / "summary.json") for name in names}


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def report_header(title: str, header: dict, stages: list, timings: dict, summaries: dict,
                  time_note: str = "") -> list[str]:
    """report.md's first lines, for both tracks: the title, command, machine, commit, total wall time and
    the largest peak memory a stage's summary.json records (each stage is a process of its own)."""
    total = sum(timings.get(s.name, 0.0) for s in stages)
    peaks = {s.name: summaries[s.name]["peak_memory_mb"] for s in stages
             if summaries.get(s.name, {}).get("peak_memory_mb")}
    peak = [f"- peak memory: {max(peaks.values()):,.0f} MB (`{max(peaks, key=peaks.get)}`; every stage runs in a "
            f"process of its own, {len(peaks)} of the {len(stages)} record their peak in summary.json)"] if peaks else []
    return [title, "", f"- command: `{header.get('command', '')}`", f"- machine: {header.get('machine', '')}",
            f"- commit: {header.get('commit', '')}", f"- total wall time: {total:.0f} s{time_note}", *peak, ""]


def flag_value(stage: Stage, flag: str):
    """The value a stage's command gives a flag (its last occurrence), or None."""
    if callable(stage.commands):
        return None
    values = [argv[i + 1] for argv in stage.commands for i, arg in enumerate(argv[:-1]) if arg == flag]
    return values[-1] if values else None
