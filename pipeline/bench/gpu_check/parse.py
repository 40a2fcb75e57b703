"""Figures out of what each step left: dinat-bench's JSON, pytest's JUnit XML, the trainer's log lines.

Whatever a step left is read, also after a failure or a timeout: a micro-batch search stopped at its limit
still gives a bracket (the largest micro-batch that fitted, the smallest that did not) from its log, and a
training run stopped half-way still gives its logged losses.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .plan import Step

TAIL_LINES = 20
_ERROR = re.compile(r"(Error|Exception|error:|Traceback|Killed|out of memory)", re.IGNORECASE)
_TRIAL = re.compile(r"micro-batch (\d+): (fits|does not fit)")
_TRAIN_STEP = re.compile(r"step (\d+)/(\d+) loss ([0-9.naninf+-]+) .*\| ([0-9.]+) img/s, data wait (\d+)%")
_RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
_CHECKPOINT = re.compile(r"\bcheckpoint (\S+step_\d+)\s*$")
_EVAL = re.compile(r"eval at step (\d+): loss ([0-9.]+) top-1 ([0-9.]+)% top-5 ([0-9.]+)%")
_DONE = re.compile(r"done: (\d+) steps")


def log_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-empty lines of a log (read from its end: logs can be long)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def failure_reason(tail: list[str], returncode: int | None) -> str:
    """The last line that names an error, else the last line, else the exit code."""
    named = [line for line in tail if _ERROR.search(line)]
    line = (named or tail or [f"exit code {returncode}"])[-1].strip()
    return line[:300] + ("..." if len(line) > 300 else "")


def _read_json(path: str | None) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, json.JSONDecodeError):
        return None


def speed_figures(record: dict[str, Any]) -> dict[str, Any]:
    """One speed run of ``dinat-bench --json``: its configuration and a row per model."""
    keys = ("model", "params", "images_per_s_per_gpu", "step_s", "forward_s", "backward_s", "optimizer_s")
    keys += ("tflops_per_s_per_gpu", "mfu", "hfu", "peak_gib", "peak_flops_per_gpu")
    cfg = record.get("config", {})
    rows = [{k: r.get(k) for k in keys} for r in record.get("results", [])]
    plan = record.get("plan", {})
    return {
        "config": {k: cfg.get(k) for k in ("attention_backend", "activation_checkpointing", "compile", "micro_batch")}
        | {"zero_stage": cfg.get("zero_stage")},
        "rows": rows,
        "plan_gib": plan["total"] / 2**30 if "total" in plan else None,
    }


def search_figures(record: dict[str, Any] | None, log: list[str]) -> dict[str, Any]:
    """The micro-batch search: settled (from the JSON), or a bracket from the trials logged so far."""
    if record is not None and "search" in record:
        s = record["search"]
        trials = [[t["micro_batch"], t["fits"]] for t in s["trials"]]
        out = {"max_micro_batch": s["max_micro_batch"], "plan_guess": s["plan_guess"], "trials": trials}
        return out | {"limit_gib": s["limit_bytes"] / 2**30, "settled": True}
    found = (_TRIAL.search(line) for line in log)
    trials = [[int(m.group(1)), m.group(2) == "fits"] for m in found if m]
    fitted = [m for m, ok in trials if ok]
    lo = max(fitted, default=None)
    hi = min((m for m, ok in trials if not ok and (lo is None or m > lo)), default=None)
    return {"trials": trials, "at_least": lo, "below": hi, "settled": False}


def junit_figures(junit: str | None) -> dict[str, Any]:
    """Counts, failing tests and collection errors (a module that does not import) from pytest's JUnit XML."""
    try:
        root = ET.parse(junit).getroot() if junit else None
    except (OSError, ET.ParseError):
        return {}
    out: dict[str, Any] = {"passed": 0, "failures": 0, "errors": 0, "skipped": 0}
    out |= {"problems": [], "collection_errors": []}
    for case in root.iter("testcase"):
        name = "::".join(x for x in (case.get("classname"), case.get("name")) if x)
        kinds = {child.tag: child for child in case if child.tag in ("failure", "error", "skipped")}
        if not kinds:
            out["passed"] += 1
        elif "skipped" in kinds and len(kinds) == 1:
            out["skipped"] += 1
        elif "error" in kinds and kinds["error"].get("message") == "collection failure":
            out["collection_errors"].append(name)
        else:
            tag = "failure" if "failure" in kinds else "error"
            out["failures" if tag == "failure" else "errors"] += 1
            message = (kinds[tag].get("message") or tag).strip().splitlines() or [tag]
            out["problems"].append(f"{name}: {message[0][:200]}")
    out["tests"] = out["passed"] + out["failures"] + out["errors"] + out["skipped"]
    return out


def train_figures(run_dir: str | None, log: list[str]) -> dict[str, Any]:
    """Losses per logged step, throughput, resume, checkpoints, evaluation and export of one trainer run."""
    out: dict[str, Any] = {"losses": {}, "checkpoints": []}
    for line in log:
        if m := _TRAIN_STEP.search(line):
            out["losses"][m.group(1)] = float(m.group(3))
            out["images_per_s"], out["data_wait_pct"] = float(m.group(4)), int(m.group(5))
        elif m := _RESUMED.search(line):
            out["resumed_at"] = int(m.group(2))
        elif m := _CHECKPOINT.search(line):
            out["checkpoints"].append(Path(m.group(1)).name)
        elif m := _EVAL.search(line):
            out["eval"] = {"step": int(m.group(1)), "loss": float(m.group(2)), "top1": float(m.group(3))}
        elif m := _DONE.search(line):
            out["done_steps"] = int(m.group(1))
    export = Path(run_dir) / "export" if run_dir else None
    if export is not None and export.is_dir():
        out["export"] = {p.name: p.stat().st_size for p in sorted(export.iterdir()) if p.is_file()}
    return out


def _full_log(outcome) -> list[str]:
    try:
        return Path(outcome.log).read_text(errors="replace").splitlines() if outcome.log else []
    except OSError:
        return []


def figures_of(step: Step, outcome) -> dict[str, Any]:
    """The figures of ``step`` from what it left (``outcome``: a :class:`.runner.Outcome`)."""
    if step.kind == "speed":
        record = _read_json(step.artifact)
        return speed_figures(record) if record else {}
    if step.kind == "max_batch":
        return search_figures(_read_json(step.artifact), _full_log(outcome))
    if step.kind == "tests":
        return junit_figures(step.artifact)
    if step.kind == "train":
        return train_figures(step.artifact, _full_log(outcome))
    if step.kind == "probe":
        return _read_json(step.artifact) or {}
    return {}


def settle(step: Step, outcome, figures: dict[str, Any]) -> None:
    """The GPU tests pass when every GPU test collected passed (or skipped): pytest's exit code also counts
    modules that do not import there (transformers 5 refuses the HF-parity module), which hold no GPU test;
    they stay listed in the figures and the reason."""
    if step.kind != "tests" or outcome.status != "failed" or not figures.get("collection_errors"):
        return
    if figures["tests"] > 0 and figures["failures"] == figures["errors"] == 0:
        outcome.status = "ok"
        outcome.reason = "did not import there: " + ", ".join(figures["collection_errors"])
