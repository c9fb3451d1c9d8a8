"""Evaluate checkpoints: perplexity and bits per byte, multiple choice, generation tasks, BLEU, ROUGE-L
and the form of generated Tang poems; several checkpoints side by side in one table.

    python eval.py --ckpt out/shakespeare --data data/shakespeare            # val split: loss, ppl, bpb
    python eval.py --ckpt out/shakespeare --text notes.txt                   # any .txt / .jsonl ({"text"})
    python eval.py --ckpt out/base --mc choices.jsonl                        # {"context", "choices", "label"}
    python eval.py --ckpt out/sft --arithmetic 100 --shots 3                 # tasks.py, exact answer check
    python eval.py --ckpt out/sft --gen refs.jsonl                           # {"prompt", "reference"}: EM, BLEU, ROUGE-L
    python eval.py --ckpt out/tang --tang 50                                 # share of poems in 5/7-character form
    python eval.py --compare out/a out/b out/c --data data/shakespeare --out results.json

A checkpoint is a nanollm directory, a quantized one (quant.py --out-dir) or a Hugging Face directory, all
read by common.load_model. The metrics are computed by evaluate.py (each defined in its docstring):
perplexity and bits per byte are exactly train.py's final evaluation, so `--data` reproduces its val_bpb;
a raw file is tokenized as data/prepare.py does (each document followed by <|endoftext|>); multiple
choice is scored as lm-evaluation-harness scores HellaSwag and ARC (acc and acc_norm); generation is
greedy in the ChatML template, checked by exact match or by tasks.check (k-shot: k solved train
problems as earlier turns); BLEU and ROUGE-L as sacrebleu and rouge-score report them.
"""
import argparse
import json
import sys
from pathlib import Path

from common import atomic_write, exit_on_error
from evaluate import evaluate_checkpoint, markdown_table


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:2]))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="a checkpoint directory (nanollm, Hugging Face or quantized)")
    which.add_argument("--compare", nargs="+", metavar="CKPT", help="several checkpoints, side by side in one table")
    parser.add_argument("--tokenizer", help="tokenizer to use instead of the checkpoint's own")
    parser.add_argument("--data", help="a data/prepare.py directory: perplexity and bpb of --split")
    parser.add_argument("--split", default="val", help="which split of --data (default: val)")
    parser.add_argument("--text", help="a .txt or .jsonl ({\"text\"}) file: perplexity and bpb")
    parser.add_argument("--txt-docs", choices=["file", "line", "blank"], default="file",
                        help="how a .txt file splits into documents (as data/prepare.py)")
    parser.add_argument("--mc", help="JSONL of {context, choices, label}: multiple-choice accuracy")
    parser.add_argument("--arithmetic", type=int, default=0, metavar="N", help="N test problems of tasks.py (0: skip)")
    parser.add_argument("--shots", type=int, default=0, help="solved examples before each arithmetic question")
    parser.add_argument("--gen", help="JSONL of {prompt, reference | references}: exact match, BLEU, ROUGE-L")
    parser.add_argument("--template", choices=["chatml", "raw"], default="chatml", help="how --gen prompts are given")
    parser.add_argument("--tang", type=int, default=0, metavar="N", help="sample N poems and measure their form")
    parser.add_argument("--seq-len", type=int, default=0, help="perplexity window (default: the model's context)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=0, help="perplexity on at most this many tokens (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per answer")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="autocast dtype (auto: bf16 on CUDA, fp32 elsewhere, as train.py)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems, k-shot examples and poem samples")
    parser.add_argument("--out", help="write the metrics (with example outputs) to this JSON file")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shots < 0 or args.arithmetic < 0 or args.tang < 0:
        parser.error("--arithmetic, --shots and --tang must be >= 0")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not any([args.data, args.text, args.mc, args.arithmetic, args.gen, args.tang]):
        parser.error("nothing to evaluate: give --data, --text, --mc, --arithmetic, --gen or --tang")
    tasks = dict(data=args.data, split=args.split, text=args.text, txt_docs=args.txt_docs, mc=args.mc,
                 arithmetic=args.arithmetic, shots=args.shots, gen=args.gen, template=args.template, tang=args.tang,
                 seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                 max_new_tokens=args.max_new_tokens, dtype=args.dtype, seed=args.seed)
    results = {}
    try:
        for path in dict.fromkeys(args.compare or [args.ckpt]):  # each checkpoint once
            print(f"evaluating {path}", file=sys.stderr)
            results[path] = evaluate_checkpoint(path, args.device, args.tokenizer, **tasks)
    except (ValueError, FileNotFoundError) as e:
        exit_on_error(e)
    print(markdown_table(results))
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, ensure_ascii=False)))
        print(f"metrics written to {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
