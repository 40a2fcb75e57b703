"""``python -m pipeline.bench.gpu_check`` (``bash launch/gpu_check.sh``): every GPU figure in one bounded run.

Exit codes: 0 every step that ran passed (steps skipped for the budget are listed in the record), 1 a step
failed or ran out of time, 2 bad arguments or no torch, 3 no CUDA GPU (nothing was run), 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from . import record as rec
from .plan import ROOT, Options, build_plan, probe_step
from .runner import Interrupted, execute

EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU, EXIT_INTERRUPTED = 1, 2, 3, 130

EXAMPLES = """examples:
  bash launch/gpu_check.sh --out runs/gpu_check                                  # in the project's .venv
  bash launch/gpu_check.sh --system-python --wheels .whl/gpu-cp312 --out /tmp/gc  # a machine's own torch
  bash launch/gpu_check.sh --only max_batch --budget-s 900                         # the searches alone
  python -m pipeline.bench.gpu_check --markdown runs/gpu_check/gpu_check.json     # the table again
"""


def parser() -> argparse.ArgumentParser:
    d = Options(out=Path("."))
    p = argparse.ArgumentParser(
        prog="gpu_check",
        description="The GPU check: GPU tests, dinat-bench speed and micro-batch searches, the bf16 training "
        "loop; each step a subprocess with its own time limit, one JSON record and one markdown table.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/gpu_check/DATE-TIME)")
    p.add_argument("--budget-s", type=float, default=d.budget_s, help="total seconds; later steps are skipped")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="images per GPU in the speed runs")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per speed run")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (compilation happens here)")
    p.add_argument("--limit-scale", type=float, default=d.limit_scale, help="multiply every step's time limit")
    p.add_argument("--only", default="", help="comma-separated step names or prefixes (speed, max_batch, ...)")
    p.add_argument("--skip", default="", help="comma-separated step names or prefixes to leave out")
    p.add_argument("--train-variant", default=d.train_variant, help="the model of the training-loop steps")
    p.add_argument("--train-batch", type=int, default=d.train_batch, help="images per step in the training loop")
    p.add_argument("--train-data", default=None, help="shards for the training loop (default: synthetic)")
    p.add_argument("--keep-train-files", action="store_true", help="keep the training checkpoints and export")
    p.add_argument("--list", action="store_true", help="print the steps (commands, limits) and exit")
    p.add_argument("--markdown", type=Path, default=None, metavar="JSON", help="print the table of a record")
    return p


def options(args: argparse.Namespace, out: Path) -> Options:
    split = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
    return Options(
        out=out.resolve(),
        budget_s=args.budget_s,
        micro_batch=args.micro_batch,
        steps=args.steps,
        warmup=args.warmup,
        limit_scale=args.limit_scale,
        only=split(args.only),
        skip=split(args.skip),
        train_variant=args.train_variant,
        train_batch=args.train_batch,
        train_data=args.train_data,
    )


def no_gpu_reason() -> str | None:
    """None when torch sees a CUDA GPU, else the one line that says why not."""
    try:
        import torch
    except ImportError as e:
        return f"cannot import torch in {sys.executable} ({e})"
    if not torch.cuda.is_available():
        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"no CUDA GPU visible to torch {torch.__version__} ({cuda}) in {sys.executable}; nothing was run"
    return None


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.markdown is not None:
        try:
            print(rec.markdown(json.loads(args.markdown.read_text())), end="")
        except (OSError, json.JSONDecodeError, KeyError) as e:
            p.error(f"--markdown: {args.markdown} is not a gpu_check record ({e})")
        return 0
    out = args.out or ROOT / "runs" / "gpu_check" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        opts = options(args, out)
    except ValueError as e:
        p.error(str(e))
    if args.list:
        return _list(opts)
    if (opts.out / rec.JSON_NAME).exists():  # its training runs would collide with the earlier ones
        p.error(f"--out: {opts.out} already holds a record ({rec.JSON_NAME}); choose a new folder")
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu_check: {reason}", file=sys.stderr)
        return EXIT_USAGE if reason.startswith("cannot import torch") else EXIT_NO_GPU
    given = sys.argv[1:] if argv is None else argv
    command = os.environ.get("GPU_CHECK_COMMAND") or shlex.join(["python", "-m", "pipeline.bench.gpu_check", *given])
    return run(opts, command, args.keep_train_files)


def run(opts: Options, command: str, keep_train_files: bool = False) -> int:
    """Probe, plan, run every step within the budget; the record is saved after each step."""
    started = time.monotonic()
    record = rec.new_record(command, opts.budget_s)
    logs = opts.out / "logs"

    def save(step, outcome, figures) -> None:
        rec.add_step(record, step, outcome, figures)
        record["elapsed_s"] = time.monotonic() - started
        rec.save(record, opts.out)
        print(f"gpu_check: {step.name}: {outcome.status} ({outcome.seconds:.0f} s){_note(outcome)}", flush=True)

    print(f"gpu_check: record in {opts.out}; budget {opts.budget_s:.0f} s", flush=True)
    try:
        execute([probe_step(opts)], save, opts.budget_s, logs, started)
        steps, record["left_out"] = build_plan(opts, record["environment"])
        execute(steps, save, opts.budget_s, logs, started)
        status = "complete" if all(s["status"] == "ok" for s in record["steps"]) else "partial"
    except Interrupted:
        status = "interrupted"
    if not keep_train_files:
        _remove_train_files(opts.out)
    record |= {"status": status, "finished": rec.now(), "elapsed_s": time.monotonic() - started}
    json_path, md_path = rec.save(record, opts.out)
    print(f"gpu_check: {status}; {json_path} and {md_path}")
    if status == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_FAILED if any(s["status"] in ("failed", "timeout") for s in record["steps"]) else 0


def _note(outcome) -> str:
    return f": {outcome.reason}" if outcome.reason else ""


def _remove_train_files(out: Path) -> None:
    """Checkpoints (GBs for DiNAT-L) and exported weights: their figures are in the record already."""
    for run_dir in (out / "train").glob("*"):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / "export" / "model.safetensors").unlink(missing_ok=True)


def _list(opts: Options) -> int:
    """The plan for this machine (probed here, in this process), without running anything."""
    from .probe import probe

    steps, left_out = build_plan(opts, probe())
    for step in [probe_step(opts), *steps]:
        print(f"{step.name:<22} {step.limit_s:5.0f} s  {step.what}\n    {step.command}")
    for x in left_out:
        print(f"{x['name']:<22} left out: {x['reason']}")
    print(f"total budget {opts.budget_s:.0f} s; limits add up to {sum(s.limit_s for s in steps):.0f} s")
    return 0
