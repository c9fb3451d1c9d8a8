"""Verifiable tasks: problems whose answers a program checks, shared by dpo.py, rlhf.py, distill.py and eval.py.

The task is multi-step addition of small numbers, e.g. "What is 3 + 5 + 2?". A model's answer is
right when the last integer it writes equals the sum, so rewards (GRPO), preference pairs (DPO),
teacher traces (distillation) and accuracies (eval) all come from one checker, with no judge model.

    from tasks import arithmetic_problems, check, answer_text, worked_solution
    train = arithmetic_problems(2000, split="train")        # [{"question", "answer", "terms"}, ...]
    test = arithmetic_problems(100, split="test")           # never overlaps the train split
    check(test[0], "The answer is 10.")                     # -> True / False

Splits are by a hash of the question, so a question is in the same split whatever n, seed or order.
`python tasks.py` prints a few problems with their worked solutions; with --out it writes SFT chats (JSONL
of {"messages": [...]}, what sft.py --data reads):

    python tasks.py --n 400 --n-terms 2 --max-operand 30 --out out/arithmetic_sft.jsonl
"""
import random
import re
import zlib

TEST_SHARE = 10  # one question in TEST_SHARE goes to the test split (by hash)
_INTEGER = re.compile(r"-?\d+")


def question_text(terms) -> str:
    return "What is " + " + ".join(map(str, terms)) + "?"


def answer_text(problem) -> str:
    """The short answer an SFT model is taught: 'The answer is 10.'"""
    return f"The answer is {problem['answer']}."


def worked_solution(problem) -> str:
    """The step-by-step solution (a reasoning trace): '3 + 5 = 8. 8 + 2 = 10.'"""
    total, steps = problem["terms"][0], []
    for term in problem["terms"][1:]:
        steps.append(f"{total} + {term} = {total + term}.")
        total += term
    return " ".join(steps)


def split_of(question: str) -> str:
    return "test" if zlib.crc32(question.encode()) % TEST_SHARE == 0 else "train"


def arithmetic_problems(n: int, split: str = "train", seed: int = 0, n_terms: int = 3, max_operand: int = 9):
    """`n` distinct problems of `n_terms` operands in [0, max_operand] from `split` ('train' or 'test').

    Raises ValueError when the split has fewer than n distinct questions (e.g. 2 terms of 0..9 give
    100 questions, about 10 of them in the test split)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    space = (max_operand + 1) ** n_terms
    rng = random.Random(f"{seed}:{n_terms}:{max_operand}")
    problems, seen = [], set()
    for _ in range(50 * space):  # rejection sampling; enough tries to exhaust the space
        if len(problems) == n:
            break
        terms = [rng.randint(0, max_operand) for _ in range(n_terms)]
        question = question_text(terms)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        problems.append({"question": question, "answer": sum(terms), "terms": terms})
    if len(problems) < n:
        raise ValueError(f"only {len(problems)} distinct {split} problems with {n_terms} terms of 0..{max_operand}; "
                         f"asked for {n}")
    return problems


def extract_answer(text: str):
    """The last integer in `text` (what a model 'answered'), or None when there is none."""
    found = _INTEGER.findall(text.split("</think>")[-1])  # a reasoning trace's numbers are not the answer
    return int(found[-1]) if found else None


def check(problem, text: str) -> bool:
    """The verifiable reward: does the answer in `text` equal the problem's sum?"""
    return extract_answer(text) == problem["answer"]


def wrong_answer(problem, rng: random.Random) -> int:
    """A plausible wrong sum (off by 1 to 3), for rejected answers in preference pairs."""
    return max(0, problem["answer"] + rng.choice([-3, -2, -1, 1, 2, 3])) if problem["answer"] > 3 \
        else problem["answer"] + rng.randint(1, 3)


def sft_conversations(problems, reasoning: bool = False):
    """Chat conversations (chat.py messages) that teach the answer, optionally after a <think> trace."""
    conversations = []
    for p in problems:
        answer = answer_text(p)
        if reasoning:
            answer = f"<think>{worked_solution(p)}</think>{answer}"
        conversations.append([{"role": "user", "content": p["question"]}, {"role": "assistant", "content": answer}])
    return conversations


def preference_pairs(problems, seed: int = 0):
    """{"prompt": messages, "chosen": right answer, "rejected": wrong answer} for every problem."""
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": p["question"]}], "chosen": answer_text(p),
             "rejected": answer_text({**p, "answer": wrong_answer(p, rng)})} for p in problems]


def main(argv=None) -> int:
    import argparse
    import json
    from pathlib import Path
    parser = argparse.ArgumentParser(description="Print arithmetic problems, or write them as SFT chats (--out).")
    parser.add_argument("--n", type=int, default=5, help="number of problems")
    parser.add_argument("--split", choices=["train", "test"], default="train")
    parser.add_argument("--n-terms", type=int, default=3, help="numbers per question")
    parser.add_argument("--max-operand", type=int, default=9, help="largest number")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reasoning", action="store_true", help="answers start with a <think> worked solution")
    parser.add_argument("--out", help="write the chats here as JSONL (refuses to overwrite a file)")
    args = parser.parse_args(argv)
    try:
        problems = arithmetic_problems(args.n, args.split, args.seed, args.n_terms, args.max_operand)
    except ValueError as e:
        parser.exit(2, f"tasks.py: error: --n {args.n}: {e}\n")
    if not args.out:
        for p in problems:
            print(f"{p['question']:<24} {worked_solution(p):<28} {answer_text(p)}")
        return 0
    out = Path(args.out)
    if out.exists():
        parser.exit(2, f"tasks.py: error: --out {out} already exists\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"messages": c}) + "\n" for c in sft_conversations(problems, args.reasoning)))
    print(f"wrote {len(problems)} {args.split} problems ({args.n_terms} terms of 0..{args.max_operand}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
