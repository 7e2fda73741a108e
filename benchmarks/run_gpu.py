"""Every GPU measurement in one go; JSON under $OUT (default benchmarks/results).

    OUT=/some/dir python benchmarks/run_gpu.py            # or: benchmarks/run_gpu.sh
    python benchmarks/run_gpu.py --quick                  # a smoke run (one preset, few iters)

1. default: the six paper presets x loop/vmap x first/second order with the engine's CUDA
   defaults, CUDA memory peaks at the presets' meta-batch sizes, validation tasks/s for both
   implementations;
2. variants, vmap (the CUDA default) and second order only: strict float32 (TF32 off
   everywhere; the default run is `precision = auto`, i.e. TF32), bf16 autocast, channels_last
   for every pass or first-order passes only, torch.compile (skipped with a note while the
   engine has no such key). These decide the CUDA `auto` defaults in engine/fast_paths.py.

The report is rewritten after each part, so a run cut short still leaves what it measured.
Everything runs in this one process (CUDA peaks are reset per phase); use --isolate to give every
phase its own process (slower: one CUDA start each).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.acceptance import add_targets, format_rows, target_lines  # noqa: E402
from engine.bench import (  # noqa: E402
    PAPER_PRESETS,
    BenchOptions,
    run_bench,
    write_report,
)
from engine.config import ConfigError, resolve  # noqa: E402

# Engine switches worth measuring on a GPU, as `--set` overrides. A candidate is used only when
# the engine's config accepts it; add the real key here (or pass --variant) when it lands.
ENGINE_VARIANTS = {
    "bf16-autocast": ["train.precision=bf16"],
    "bf16-channels-last": ["train.precision=bf16", "train.channels_last=always"],
    "channels-last": ["train.channels_last=always"],
    "channels-last-first-order": ["train.channels_last=first_order"],
    "compile": ["train.compile=true"],
}


def _accepted(overrides: list[str]) -> str | None:
    """None when every preset accepts the overrides, else the config error."""
    try:
        for preset in PAPER_PRESETS:
            resolve(preset, overrides=overrides)
    except ConfigError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path,
                    default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    ap.add_argument("--preset", action="append", help="preset (repeat); default: the six")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eval-tasks", type=int, default=200)
    ap.add_argument("--eval-repeats", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,...]",
                    help="extra engine variant, e.g. amp=train.precision=bf16")
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--isolate", action="store_true", help="one process per phase")
    ap.add_argument("--quick", action="store_true", help="omniglot-5w1s only, 3 iters")
    args = ap.parse_args(argv)
    presets = args.preset or list(PAPER_PRESETS)
    if args.quick:
        presets, args.iters, args.warmup, args.eval_tasks = ["omniglot-5w1s"], 3, 1, 50
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    base = dict(presets=presets, device="cuda", iters=args.iters, warmup=args.warmup,
                eval_tasks=args.eval_tasks, eval_repeats=args.eval_repeats,
                isolate=args.isolate)
    started = time.time()

    say("== default settings, all presets, loop and vmap, first and second order")
    report = add_targets(run_bench(BenchOptions(**base), progress=say))
    gpu = (report["device"].get("gpu") or {}).get("name", "cuda")
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = args.out_dir / f"cuda-{slug}-{dt.date.today().isoformat()}.json"
    report["variants"] = {}
    write_report(report, out)
    say(f"wrote {out}")

    # the default run is `precision = auto` (TF32 on CUDA); strict float32 is a variant
    variants = {"strict-fp32": ["train.precision=float32"], **ENGINE_VARIANTS}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        variants[name] = [o for o in rest.split(",") if o]
    if args.no_variants:
        variants = {}
    for name, overrides in variants.items():
        problem = _accepted(overrides) if overrides else None
        if problem:
            report["variants"][name] = {"skipped": problem, "overrides": overrides}
            say(f"== variant {name}: skipped ({problem})")
            continue
        say(f"== variant {name}: vmap, second order")
        sub = run_bench(BenchOptions(**{**base, "impls": ["vmap"], "orders": ["second"]},
                                     overrides=overrides), progress=say)
        report["variants"][name] = {"overrides": overrides, "results": sub["results"],
                                    "rows": sub["rows"]}
        write_report(report, out)
    report["duration_s"] = time.time() - started
    write_report(report, out)
    print(format_rows(report))
    for name, v in report["variants"].items():
        print(f"\nvariant {name}: " + (v["skipped"] if "skipped" in v else ""))
        if "rows" in v:
            print(format_rows(v))
    for line in target_lines(report):
        print(line)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
