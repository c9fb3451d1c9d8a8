"""Did a stage work? A verdict computed from its numbers, for pipeline.py's report card.

Each training stage is expected to move a metric: SFT the stop rate and the held-out loss, RL the checker's
accuracy, DPO the held-out preference accuracy, distillation the student's bits per byte against the same
student on hard labels. A Measure holds one metric before and after the stage; compare() says whether it
moved beyond its uncertainty, and stage_verdict() combines that with how much of its budget the stage ran:

    worked      a goal metric moved the right way beyond its uncertainty, and no metric regressed
    no effect   no goal metric moved beyond its uncertainty (0.00 -> 0.00 is no effect, so is 0.40 -> 0.55
                on 20 problems, whose 95% intervals overlap)
    regressed   a metric moved the wrong way beyond its uncertainty
    starved     the clock stopped the stage before STARVED_SHARE of its planned steps, and it did not work

A rate measured on n items gets the Wilson score interval (Wilson 1927; it stays inside [0, 1] and is
sensible at 0/n, unlike p +- 1.96 sqrt(p(1-p)/n)); two rates differ when their 95% intervals do not
overlap, a conservative test. A metric measured on many tokens (bits per byte, loss) has no interval
here: it moved when it changed by more than its relative tolerance.

    from verdicts import Measure, stage_verdict
    stage_verdict(2, 300, "max_time", [Measure("accuracy", 0.1, 0.5, n=20)])   # -> "starved"

report_card() writes them as report.md's table, each track saying what its stages are expected to move
(pipeline_scratch.judge, pipeline_real.judge_real).
"""
import math
from dataclasses import dataclass

STARVED_SHARE = 0.25   # the clock stopped a stage before this share of its planned steps: starved (unless it worked)
Z_95 = 1.96            # the normal quantile of a two-sided 95% interval


def wilson_interval(rate: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a rate measured on n items: (low, high), inside [0, 1]."""
    if n <= 0:
        raise ValueError(f"a rate needs n >= 1 items, got n={n}")
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Measure:
    """One metric before and after a stage.

    n: the items a rate after the stage is measured on (0: not a rate; the tolerance decides);
    before_n: the items the rate before is measured on (0: the before value is exact, e.g. chance);
    goal: False for a guard, a metric the stage must not make worse (the held-out loss of a quantized model).
    """
    name: str
    before: float | None
    after: float | None
    n: int = 0
    before_n: int = 0
    higher_is_better: bool = True
    tolerance: float = 0.01  # not a rate: a relative change within it is no change
    goal: bool = True

    def interval(self, value: float, n: int) -> tuple[float, float]:
        return wilson_interval(value, n) if n else (value, value)

    def text(self) -> str:
        """'accuracy 0.10 [0.03, 0.30] -> 0.50 [0.30, 0.70] (n=20)', or 'val bpb 2.500 -> 2.400 (-4.0%)'."""
        def one(value, n):
            if value is None:
                return "-"
            if not n:
                return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
            low, high = wilson_interval(value, n)
            return f"{value:.2f} [{low:.2f}, {high:.2f}]"
        text = f"{self.name} {one(self.before, self.before_n)} -> {one(self.after, self.n)}"
        if self.n:
            return text + f" (n={self.n})"
        if self.before and self.after is not None:
            return text + f" ({(self.after - self.before) / abs(self.before):+.1%})"
        return text


def compare(m: Measure) -> str:
    """'worked' | 'no effect' | 'regressed' for one measure ('not measured' when a value is missing)."""
    if m.before is None or m.after is None:
        return "not measured"
    sign = 1 if m.higher_is_better else -1
    if m.n or m.before_n:
        before_low, before_high = m.interval(m.before, m.before_n)
        after_low, after_high = m.interval(m.after, m.n)
        if (after_low > before_high) if sign > 0 else (after_high < before_low):
            return "worked"
        if (after_high < before_low) if sign > 0 else (after_low > before_high):
            return "regressed"
        return "no effect"
    change = sign * (m.after - m.before) / max(abs(m.before), 1e-12)
    return "worked" if change > m.tolerance else "regressed" if change < -m.tolerance else "no effect"


def steps_text(done: int | None, planned: int | None, stop_reason: str | None) -> str:
    """'203 of 3,000 steps (stopped by the clock)'."""
    if done is None:
        return "-"
    why = {"max_time": "stopped by the clock", "max_steps": "all planned steps",
           "early_stop": "stopped early"}.get(stop_reason, stop_reason)
    return (f"{done:,} of {planned:,} steps" if planned else f"{done:,} steps") + (f" ({why})" if why else "")


def is_starved(done: int | None, planned: int | None, stop_reason: str | None) -> bool:
    """The stage ran under STARVED_SHARE of its planned steps and did not stop by its own choice (early stop)."""
    if done is None or not planned or stop_reason in ("max_steps", "early_stop"):
        return False
    return done < STARVED_SHARE * planned


def stage_verdict(done: int | None, planned: int | None, stop_reason: str | None, measures: list[Measure]) -> str:
    """'worked' | 'no effect' | 'regressed' | 'starved' | 'not measured' for a stage from its step count
    and its measures (see the module docstring)."""
    if done == 0 and planned:  # no update was made: a difference in its metrics is the measurement's, not the stage's
        return "starved" if is_starved(done, planned, stop_reason) else "no effect"
    results = [(m, compare(m)) for m in measures]
    if any(r == "regressed" for _, r in results):
        return "regressed"
    goals = [r for m, r in results if m.goal and r != "not measured"]
    if goals and any(r == "worked" for r in goals):
        return "worked"
    if is_starved(done, planned, stop_reason):
        return "starved"
    return "no effect" if goals else "not measured"


def in_words(stage: str, verdict: str, measures: list[Measure], steps: str) -> str:
    """One sentence for a stage that did not work: what did not move, or why it stopped."""
    if verdict == "worked":
        return ""
    unmoved = [m.text() for m in measures if m.goal and compare(m) == "no effect"]
    worse = [m.text() for m in measures if compare(m) == "regressed"]
    if verdict == "starved":
        return (f"`{stage}` was starved: it ran {steps}, too few to judge"
                + (f"; {'; '.join(unmoved)}" if unmoved else "") + ".")
    if verdict == "regressed":
        return f"`{stage}` made a metric worse beyond its uncertainty: {'; '.join(worse)}."
    if verdict == "no effect":
        return f"`{stage}` did not move its metric beyond its uncertainty: {'; '.join(unmoved)}."
    return f"`{stage}` has no metric to judge it by."


def tally(verdicts: dict[str, str]) -> str:
    """The run's last line: 'K of N judged stages worked (a no effect, b regressed, c starved)'."""
    judged = {name: v for name, v in verdicts.items() if v not in ("not measured", "not run")}
    counts = {v: sum(x == v for x in judged.values()) for v in ("no effect", "regressed", "starved")}
    others = ", ".join(f"{k} {v}" for v, k in counts.items() if k)
    return f"{sum(v == 'worked' for v in judged.values())} of {len(judged)} judged stages worked" + \
        (f" ({others})" if others else "")


# ----------------------------------------------------------------------------------------------------------
# The report card of pipeline.py's report.md

REPORT_CARD_TEXT = (
    "Each stage that trains or compresses a model, judged from its numbers (verdicts.py): a rate gets its 95% "
    "Wilson interval and moved only when the intervals before and after do not overlap; bits per byte and losses "
    "moved when they changed by more than 1% (a guard, a metric the stage must not make worse, by more than its "
    "stated tolerance). A stage the clock stopped before a quarter of its planned steps, without a metric that "
    "moved, is starved.")


def report_card(stages: list, summaries: dict, evals: dict, judge) -> tuple[list[str], str]:
    """The report card's table rows and words, and the run's last line (how many stages worked): each stage
    judged by judge(stage, summaries, evals) -> (what it is expected to do, its Measures); stages are
    pipeline_stages.Stage (their planned_steps() against the steps their summary says they ran)."""
    rows = ["| stage | expected | measured (before -> after) | steps | verdict |", "|---|---|---|---|---|"]
    words, verdicts = [], {}
    for stage in stages:
        s = summaries.get(stage.name, {})
        expected, measures = judge(stage, summaries, evals)
        planned = stage.planned_steps()
        done = s.get("step")
        steps = steps_text(done, planned, s.get("stop_reason"))
        verdict = ("not run" if not s else
                   stage_verdict(done, planned, s.get("stop_reason"), measures) if measures else "not measured")
        verdicts[stage.name] = verdict
        if not measures:
            continue
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in [
            f"`{stage.name}`", expected, "; ".join(m.text() for m in measures), steps, f"**{verdict}**"]) + " |")
        if verdict != "not run":
            words.append(in_words(stage.name, verdict, measures, steps))
    return rows + [""] + [w for w in words if w], tally(verdicts)
