"""The `vlm-prune` command: demo, bench, eval, lmms-eval, methods."""

from __future__ import annotations

import argparse
import sys

from .benchmark import RunLog
from .cli_args import parse_keep, parse_options
from .registry import available_methods, get_method

__all__ = ["build_parser", "main", "parse_keep", "parse_options"]


def _cmd_bench(args) -> int:
    from .pipeline_config import is_pipeline

    keep = None if is_pipeline(args.method) else args.keep  # a pipeline's keeps are in its string
    common = dict(shape=args.shape, method=args.method, keep=keep, text_tokens=args.text_tokens,
                  **parse_options(args.option))
    if args.backend == "vllm":
        try:
            from .vllm_plugin import bench as vllm_bench

            result = vllm_bench.run(rounds=3 if args.repeats is None else args.repeats, batch=args.batch,
                                    max_tokens=args.max_tokens, threads=args.threads or 2, **common)
        except ImportError as error:
            raise SystemExit(f"--backend vllm needs vLLM in this environment ({error}); on the CPU machines run "
                             ".venv-vllm/bin/python -m vlm_prune.cli bench --backend vllm ...") from None
    else:
        from . import bench

        result = bench.run(repeats=9 if args.repeats is None else args.repeats, threads=args.threads or 1,
                           clock=args.clock, **common)
    label = (f"{args.method}" if keep is None else f"{args.method}-{args.keep}") + "".join(
        f"-{pair}" for pair in args.option)
    label = "".join(c if c.isalnum() or c in "._=-" else "_" for c in label)
    log = RunLog(args.out or None, f"bench-{args.backend}-{args.shape}-{label}", json_path=args.json)
    log.print(result.report())
    log.print()
    log.print(result.spread_report())
    log.save(result.to_json())
    if log.log_path is not None:
        print(f"wrote {', '.join(map(str, log.paths))}")
    return 0


def _cmd_demo(args) -> int:
    from . import demo

    demo.run(threads=args.threads, n=args.n, out=args.out, positions=args.positions, variants=args.variants,
             methods=args.methods, budgets=args.budgets, timing_rounds=args.timing_rounds)
    return 0


def _demo_row(text: str) -> str:
    """A demo row (`vlm_prune.demo.expand`), checked before the run."""
    from .demo import expand

    try:
        for row in expand(text, [16]):
            row.check()
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _demo_budgets(text: str) -> list[int]:
    try:
        budgets = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        budgets = []
    if not budgets or not all(1 <= k <= 144 for k in budgets):
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: visual tokens kept, ints in 1..144 joined by ','")
    return budgets


def _cmd_lmms_eval(args) -> int:
    from .lmms_eval_launcher import run

    return run(args.prune, args.lmms_args)


def _cmd_methods(args) -> int:
    for name in available_methods():
        method = get_method(name)
        print(f"{name:16} stage={method.stage:7} {method.paper}")
        for option, spec in method.options.items():
            print(f"    {option}={spec.default!r}: {spec.doc}")
    return 0


def _method_or_pipeline(text: str) -> str:
    """A registered method, or a pipeline string checked by vlm_prune.pipeline_config."""
    from .pipeline_config import is_pipeline, pipeline_config

    try:
        if is_pipeline(text):
            pipeline_config(text)
        elif text not in available_methods():
            raise ValueError(f"unknown method {text!r}; choose one of {', '.join(available_methods())}")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-prune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="every method at four budgets on the bundled fixture model")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch threads (default 1: the fixture is tiny, and on a busy machine 2 threads took 2-4x "
                           "the time)")
    demo.add_argument("-n", type=int, default=600, help="test questions per configuration")
    demo.add_argument("--out", default="demo-results", help="folder for demo.md, demo.json and the PNG plots")
    demo.add_argument("--method", "--config", dest="methods", action="append", type=_demo_row, default=None,
                      metavar="CONFIG",
                      help="a row (repeatable; replaces the default list): a method ('cls_attention': every budget), "
                           "a configuration string ('cls_attention:36', 'fastv:16:layer=2'), or a pipeline "
                           "('visionzip+transition': every budget; 'visionzip:72+fastv:16:layer=1')")
    demo.add_argument("--budgets", type=_demo_budgets, default=None, metavar="K,K,...",
                      help="visual tokens kept (of 144) of the rows without a keep (default: 72,36,16,8)")
    demo.add_argument("--positions", choices=["renumber", "original"], default=None,
                      help="position ids of the kept tokens for the vision-stage methods (default: renumber)")
    demo.add_argument("--variants", action="store_true",
                      help="also score each method's named departures from its release (rescaled dct, ...)")
    demo.add_argument("--timing-rounds", type=int, default=None, metavar="R",
                      help="interleaved rounds of the measured speed-up (default 5; 0: the FLOPs ratio only)")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="prefill time pruned vs unpruned, in one process")
    bench.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                       help="vllm: an engine with the plugin against one without (needs vLLM)")
    bench.add_argument("--shape", default="llava-1.5", choices=["llava-1.5", "llava-next", "qwen2-vl", "qwen3-vl-video", "tiny"])
    bench.add_argument("--method", default="cls_attention", type=_method_or_pipeline,
                       help=f"one of {', '.join(available_methods())}, or a pipeline "
                            "'visionzip:192+transition:64' (each stage's keep in the string; --keep unused)")
    bench.add_argument("--keep", type=parse_keep, default=64)
    bench.add_argument("--text-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=None,
                       help="measured rounds (default: 9 with transformers, 3 with vllm)")
    bench.add_argument("--batch", type=int, default=4, help="vllm: requests in the throughput batch")
    bench.add_argument("--max-tokens", type=int, default=8, help="vllm: tokens each batch request generates")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch threads, pinned (default: 1 with transformers, 2 with vllm)")
    bench.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                       help="transformers: 'cpu' (default) times the process's CPU time, which other jobs on a shared "
                            "machine do not add to (one thread: back-to-back runs agree within 1%%); 'wall' the host clock")
    bench.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                       help="method option, value parsed as JSON (repeatable)")
    bench.add_argument("--json", help="also write the numbers to this JSON file")
    bench.add_argument("--out", default="bench-results",
                       help="folder for the numbers (JSON) and the report (.txt) of this run ('' for none)")
    bench.set_defaults(func=_cmd_bench)

    from .evals.cli import add_eval_arguments, run_from_args

    evaluate = sub.add_parser("eval", help="accuracy and cost on VQA benchmarks (see evals/README.md)")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=run_from_args)

    from .lmms_eval_launcher import prune_argument

    lmms = sub.add_parser("lmms-eval", help="any lmms-eval task on a pruned model (docs/lmms_eval.md)",
                          usage="vlm-prune lmms-eval --prune METHOD:KEEP[...] -- <lmms-eval arguments>")
    lmms.add_argument("--prune", required=True, type=prune_argument,
                      help="'cls_attention:64', 'fastv:64:layer=2', 'visionzip:192+transition:64', or 'none'")
    lmms.add_argument("lmms_args", nargs=argparse.REMAINDER,
                      help="lmms-eval's own arguments, after '--' (--model llava_hf|qwen2_vl|qwen2_5_vl|... "
                           "--model_args ... --tasks ...)")
    lmms.set_defaults(func=_cmd_lmms_eval)

    methods = sub.add_parser("methods", help="list methods and their options")
    methods.set_defaults(func=_cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as error:
        print(f"vlm-prune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
