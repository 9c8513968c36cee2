"""`vlm-prune eval`: arguments and entry point (wired into vlm_prune.cli by the lead).

    vlm-prune eval --model ./llava-1.5-7b-hf --method cls_attention --keep 64 \\
                   --bench pope,mme --data ./eval-data --limit 200 --out ./eval-out
    vlm-prune eval --model ./llava-1.5-7b-hf --compare none cls_attention:64 pool:0.25 \\
                   --bench textvqa --data ./eval-data --out ./eval-out

Standalone: `python -m vlm_prune.evals.cli ...` takes the same arguments.
Exit status: 0 done, 1 bad arguments or setup, 2 bad data, 130 interrupted (re-run the same
command to resume: finished items are skipped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .backends import available_backends
from .configs import make_config, parse_config, parse_keep, parse_options
from .data import DataError
from .tasks import TASKS, get_task


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--model", required=True, help="local checkpoint folder (llava, llava_next, qwen2_vl, qwen2_5_vl)")
    p.add_argument("--method", help="pruning method, or 'none' for the unpruned baseline")
    p.add_argument("--keep", type=parse_keep, default=1.0, help="int = tokens per image, float in (0, 1] = fraction")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="method option (repeatable)")
    p.add_argument("--compare", nargs="+", metavar="METHOD:KEEP[:NAME=VALUE,...]",
                   help="several configurations into one retention table, e.g. none cls_attention:64 pool:0.25")
    p.add_argument("--bench", required=True, help=f"comma-separated: {', '.join(TASKS)} (alias sqa)")
    p.add_argument("--data", required=True, type=Path, help="folder with one sub-folder per benchmark (evals/README.md)")
    p.add_argument("--limit", type=int, help="first N questions of each benchmark (POPE: per split; MME: N images)")
    p.add_argument("--backend", choices=available_backends(), default="hf")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("eval-results"), help="output folder; re-running resumes")
    p.add_argument("--prompt-suffix", help="replaces the benchmark's instruction line ('' for none)")
    p.add_argument("--max-new-tokens", type=int, help="default per benchmark (16 short answer, 8 yes/no and MC)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="bad rows / images: stop with the file and row, or skip and count them")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--pope-splits", help="comma-separated POPE splits (default random,popular,adversarial)")
    p.add_argument("--sqa-split", default="test", help="ScienceQA split (default test)")
    p.add_argument("--mmbench-circular", action="store_true",
                   help="MMBench circular evaluation (headline = circular_accuracy, the published number)")
    p.add_argument("--lenient-parsing", action="store_true",
                   help="score with forgiving answer readers instead of the official scorers' (not comparable "
                        "with published numbers; evals/README.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _configs(args) -> list:
    if args.compare:
        return [parse_config(spec) for spec in args.compare]
    if not args.method:
        raise ValueError("give --method (or 'none' for the baseline) or --compare")
    options = parse_options(",".join(args.option))
    return [make_config(args.method, args.keep, options)]


def run_from_args(args: argparse.Namespace) -> int:
    from .backends import make_backend
    from .report import write_report
    from .runner import run_benchmark
    from .tasks import load_bench

    try:
        configs = _configs(args)
        tasks = [get_task(b) for b in args.bench.split(",") if b.strip()]
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
            raise ValueError("--batch-size and --limit must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    options = {"pope_splits": args.pope_splits.split(",") if args.pope_splits else None,
               "sqa_split": args.sqa_split, "mmbench_circular": args.mmbench_circular}
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    try:
        loaded = {t.name: load_bench(t, args.data, options, args.on_error, args.limit) for t in tasks}
        backend = make_backend(args.backend, str(args.model), device=args.device, dtype=args.dtype)
        try:
            for config in configs:
                for task in tasks:
                    bench = loaded[task.name]
                    s = run_benchmark(backend, task, config, bench.items, args.out, args.batch_size,
                                      args.prompt_suffix, args.max_new_tokens, args.on_error, bench.errors,
                                      progress=not args.no_progress, data_fingerprint=bench.fingerprint,
                                      lenient=args.lenient_parsing)
                    print(f"{config.name} / {task.name}: {s['primary']} = {s['score']} "
                          f"({s['n_answered']}/{s['n_items']} answered, {s['skipped']} skipped"
                          + (", lenient parsing)" if args.lenient_parsing else ")"))
        finally:
            backend.close()
    except KeyboardInterrupt:
        print("\ninterrupted: every finished prediction is saved; re-run the same command to resume", file=sys.stderr)
        status = 130
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        status = 2
    except (NotImplementedError, ValueError, OSError, RuntimeError) as e:  # OSError: unreadable files, full disk
        print(f"error: {e}", file=sys.stderr)
        status = 1
    report = write_report(args.out)
    if report["summaries"]:
        print(report["markdown"].read_text())
        print(f"wrote {report['json']}, {report['markdown']}"
              + "".join(f", {report[key]}" for key in ("png", "pareto") if report.get(key)))
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm-prune eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
