"""The check's record: one JSON file and one markdown table of it, both rewritten after every step.

``gpu_check.json`` holds the environment, every step (command, limit, status, time, reason, figures) and
what was left out and why; ``gpu_check.md`` is made from the JSON alone (:func:`markdown`), so a record
copied off a GPU machine renders again anywhere: ``python -m pipeline.bench.gpu_check --markdown FILE``.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from .plan import COMPARE, GOALS, SHORT_NAMES, VARIANT, ZERO_STAGES, Step

FORMAT = 1
JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"
MFU_GOAL = 0.40


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def new_record(command: str, budget_s: float) -> dict[str, Any]:
    return {
        "tool": "gpu_check",
        "format": FORMAT,
        "command": command,
        "started": now(),
        "finished": None,
        "budget_s": budget_s,
        "elapsed_s": 0.0,
        "status": "running",
        "environment": {},
        "steps": [],
        "left_out": [],
    }


def add_step(record: dict[str, Any], step: Step, outcome: Any, figures: dict[str, Any]) -> None:
    """Add (or replace) ``step``'s entry; ``outcome`` is a :class:`.runner.Outcome`."""
    entry = {
        "name": step.name,
        "kind": step.kind,
        "what": step.what,
        "goals": list(step.goals),
        "command": step.command,
        **outcome.as_dict(),
        "figures": figures,
    }
    if step.kind == "probe":
        record["environment"] = figures
        entry["figures"] = {}
    record["steps"] = [s for s in record["steps"] if s["name"] != step.name] + [entry]


def save(record: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write the JSON and the markdown atomically (a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = out / JSON_NAME, out / MARKDOWN_NAME
    for path, text in zip(paths, (json.dumps(record, indent=1, default=str) + "\n", markdown(record))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


# -- reading figures back ---------------------------------------------------------------------------------
def _steps(record: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [s for s in record["steps"] if s["kind"] == kind]


def _row(step: dict[str, Any], model: str) -> dict[str, Any] | None:
    return next((r for r in step["figures"].get("rows", []) if r["model"] == model), None)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def goals(record: dict[str, Any]) -> list[dict[str, str]]:
    """Each goal of issue 6 with the figure that answers it and whether it is met (yes / no / not measured)."""
    out = []
    dinat = [(s["name"], r) for s in _steps(record, "speed") if (r := _row(s, VARIANT)) and r.get("mfu") is not None]
    if dinat:
        name, best = max(dinat, key=lambda x: x[1]["mfu"])
        out.append(_goal("mfu", f"best {_pct(best['mfu'])} ({name})", best["mfu"] >= MFU_GOAL))
    else:
        out.append(_goal("mfu", "no DiNAT-L speed run finished", None))
    ratios = []
    for s in _steps(record, "speed"):
        ours, swin = _row(s, VARIANT), _row(s, COMPARE[0])
        if ours and swin and swin.get("images_per_s_per_gpu"):
            ratios.append((ours["images_per_s_per_gpu"] / swin["images_per_s_per_gpu"], s["name"]))
    if ratios:
        text = ", ".join(f"{r:.2f}x ({n})" for r, n in ratios)
        out.append(_goal("vs_swin", f"DiNAT-L / Swin-L images/s: {text}", max(ratios)[0] >= 1.0))
    else:
        out.append(_goal("vs_swin", "no run with both finished", None))
    searches = _steps(record, "max_batch")
    settled = [s for s in searches if s["figures"].get("settled")]
    text = f"{len(settled)} of {len(ZERO_STAGES) * 2} searches settled"
    bracketed = [s for s in searches if not s["figures"].get("settled") and s["figures"].get("at_least")]
    text += f", {len(bracketed)} bracketed" if bracketed else ""
    out.append(_goal("max_batch", text, len(settled) == len(ZERO_STAGES) * 2 if searches else None))
    out.append(_natten_goal(record))
    out.append(_training_goal(record))
    return out


def _goal(key: str, figure: str, met: bool | None) -> dict[str, str]:
    return {"goal": GOALS[key], "figure": figure, "met": {True: "yes", False: "no", None: "not measured"}[met]}


def _natten_goal(record: dict[str, Any]) -> dict[str, str]:
    tests = next((s for s in _steps(record, "tests")), None)
    figures = tests["figures"] if tests else {}
    if not figures.get("tests"):
        return _goal("natten_vs_reference", "GPU tests did not run" if not tests else tests["status"], None)
    text = f"GPU tests: {figures['passed']} passed, {figures['failures']} failed, {figures['errors']} errors"
    text += f", {figures['skipped']} skipped" if figures["skipped"] else ""
    speeds = {s["name"]: _row(s, VARIANT) for s in _steps(record, "speed")}
    natten, reference = speeds.get("speed"), speeds.get("speed_reference")
    if natten and reference:
        ratio = natten["images_per_s_per_gpu"] / reference["images_per_s_per_gpu"]
        text += f"; natten / reference images/s {ratio:.2f}x"
    ran = figures["passed"] + figures["failures"] + figures["errors"]  # skipped: not measured
    met = (figures["failures"] == figures["errors"] == 0) if ran else None
    return _goal("natten_vs_reference", text, met)


def _training_goal(record: dict[str, Any]) -> dict[str, str]:
    runs = {s["name"]: s for s in _steps(record, "train")}
    first, resumed = runs.get("train"), runs.get("train_resume")
    if not first:
        return _goal("training", "did not run", None)
    if not resumed or resumed["status"] != "ok":
        again = resumed["status"] if resumed else "absent"
        return _goal("training", f"first run {first['status']}, resume {again}", False)
    f = resumed["figures"]
    delta = loss_deltas(first["figures"], f)
    text = f"resumed at step {f.get('resumed_at')}, export {'written' if f.get('export') else 'missing'}"
    text += f", largest loss difference after resuming {max(delta.values()):.2e}" if delta else ""
    met = first["status"] == "ok" and f.get("resumed_at") is not None and "model.safetensors" in f.get("export", {})
    return _goal("training", text, met)


def loss_deltas(first: dict[str, Any], resumed: dict[str, Any]) -> dict[str, float]:
    """|resumed - first| loss at each step both runs logged after the resume."""
    a, b = first.get("losses", {}), resumed.get("losses", {})
    return {k: abs(b[k] - a[k]) for k in b if k in a}


# -- markdown -------------------------------------------------------------------------------------------
def markdown(record: dict[str, Any]) -> str:
    env = record.get("environment") or {}
    devices = env.get("devices") or []
    device = f"{len(devices)} x {devices[0]['name']}" if devices else "no GPU recorded"
    lines = [f"# GPU check: {device}, {record['started'][:16].replace('T', ' ')} ({record['status']})", ""]
    lines += [f"`{record['command']}`: {record['elapsed_s']:.0f} s of a {record['budget_s']:.0f} s budget.", ""]
    lines += [_machine(env), ""]
    lines += ["## Goals (issue 6)", "", "| goal | figure | met |", "|---|---|---|"]
    lines += [f"| {_cell(g['goal'])} | {_cell(g['figure'])} | {g['met']} |" for g in goals(record)]
    lines += ["", "## Steps", "", "| step | status | seconds / limit | what | note |", "|---|---|---|---|---|"]
    for s in record["steps"]:
        limit = f"{s['seconds']:.0f} / {s['limit_s']:.0f}" if s.get("limit_s") else "-"
        lines.append(f"| {s['name']} | {s['status']} | {limit} | {_cell(s['what'])} | {_cell(s.get('reason') or '')} |")
    lines += _speed_table(record) + _search_table(record) + _tests_section(record) + _training_table(record)
    left = [(s["name"], s["reason"]) for s in record["steps"] if s["status"] == "skipped"]
    left += [(x["name"], x["reason"]) for x in record.get("left_out", [])]
    if left:
        lines += ["", "## Skipped or left out", ""] + [f"- {name}: {_cell(reason)}" for name, reason in left]
    return "\n".join(lines) + "\n"


def _machine(env: dict[str, Any]) -> str:
    if not env:
        return "Environment: not recorded (the probe did not finish)."
    devs = env.get("devices") or []
    gpu = ", ".join(
        f"{d['name']} ({d['total_memory'] / 2**30:.1f} GiB, sm {d['capability']}, {d['multiprocessors']} SMs)"
        for d in devs[:1]
    )
    pk = {k: (v or {}).get("version") for k, v in env.get("packages", {}).items()}
    natten = env.get("natten", {})
    natten_text = natten.get("path") if natten.get("available") else f"unavailable ({natten.get('error')})"
    parts = [
        f"{len(devs)} x {gpu}" if devs else "no GPU",
        f"driver {env.get('driver') or 'unknown'}, {env.get('cpus')} CPUs",
        f"Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')})",
        f"NATTEN {pk.get('natten')} ({natten_text})",
        ", ".join(f"{n} {pk.get(n)}" for n in ("deepspeed", "timm", "webdataset", "transformers") if n in pk),
    ]
    return "Machine: " + "; ".join(parts) + "."


def _speed_table(record: dict[str, Any]) -> list[str]:
    runs = [s for s in _steps(record, "speed") if s["figures"].get("rows")]
    if not runs:
        return []
    head = "| run | model | backend | ckpt | compile | micro | img/s/GPU | step ms | fwd / bwd / opt ms | TFLOP/s"
    lines = ["", "## Speed (bf16, 224 px, ZeRO-2, one GPU)", "", head + " | MFU | HFU | peak GiB | vs DiNAT-L |"]
    lines.append("|" + "---|" * 14)
    for s in runs:
        c, rows = s["figures"]["config"], s["figures"]["rows"]
        base = rows[0]["images_per_s_per_gpu"]
        for r in rows:
            ms = [None if r.get(k) is None else 1e3 * r[k] for k in ("forward_s", "backward_s", "optimizer_s")]
            phases = " / ".join(map(_num, ms))
            backend = c["attention_backend"] if r["model"] == VARIANT else "-"
            cells = [s["name"], SHORT_NAMES.get(r["model"], r["model"]), backend, c["activation_checkpointing"]]
            cells += ["yes" if c["compile"] else "no", c["micro_batch"], _num(r["images_per_s_per_gpu"])]
            cells += [_num(1e3 * r["step_s"]), phases, _num(r["tflops_per_s_per_gpu"]), _pct(r["mfu"]), _pct(r["hfu"])]
            cells += [_num(r["peak_gib"], ".2f"), f"{r['images_per_s_per_gpu'] / base:.2f}x"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def _search_table(record: dict[str, Any]) -> list[str]:
    searches = _steps(record, "max_batch")
    if not searches:
        return []
    lines = ["", "## Largest micro-batch (DiNAT-L, bf16, 224 px, one GPU)", ""]
    lines += ["| ZeRO | checkpointing | largest micro-batch | plan | trials | status |", "|---|---|---|---|---|---|"]
    for s in searches:
        f = s["figures"]
        zero, ckpt = s["name"].removeprefix("max_batch_z").split("_", 1)
        if f.get("settled"):
            answer, plan = str(f["max_micro_batch"]), str(f["plan_guess"])
        elif f.get("at_least") is not None:
            answer = f">= {f['at_least']}" + (f", < {f['below']}" if f.get("below") else "")
            plan = "-"
        else:
            answer, plan = "-", "-"
        trials = ", ".join(f"{m}{'' if ok else ' (no)'}" for m, ok in f.get("trials", []))
        lines.append(f"| {zero} | {ckpt} | {answer} | {plan} | {trials or '-'} | {s['status']} |")
    return lines


def _tests_section(record: dict[str, Any]) -> list[str]:
    tests = _steps(record, "tests")
    if not tests or not tests[0]["figures"]:
        return []
    f = tests[0]["figures"]
    lines = ["", "## GPU tests", "", f"{f['passed']} passed, {f['failures']} failed, {f['errors']} errors, "]
    lines[-1] += f"{f['skipped']} skipped (`pytest -m gpu`)."
    lines += [f"- {_cell(p)}" for p in f["problems"][:20]]
    if f["collection_errors"]:
        lines += ["", "Modules that did not import there (their tests are not GPU tests): "]
        lines[-1] += ", ".join(f["collection_errors"]) + "."
    return lines


def _training_table(record: dict[str, Any]) -> list[str]:
    runs = [s for s in _steps(record, "train") if s["figures"]]
    if not runs:
        return []
    lines = ["", "## Training loop", "", "| run | status | losses (step: loss) | img/s | data wait | checkpoints |"]
    lines[-1] += " eval top-1 | export |"
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in runs:
        f = s["figures"]
        losses = ", ".join(f"{k}: {v:.4f}" for k, v in f.get("losses", {}).items())
        export = ", ".join(f"{n} ({b / 2**20:.1f} MiB)" for n, b in f.get("export", {}).items()) or "-"
        top1 = f"{f['eval']['top1']:.2f}% at {f['eval']['step']}" if f.get("eval") else "-"
        wait = f"{f['data_wait_pct']}%" if "data_wait_pct" in f else "-"
        cells = [s["name"], s["status"], losses or "-", _num(f.get("images_per_s")), wait]
        cells += [", ".join(f.get("checkpoints", [])) or "-", top1, export]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    runs_by = {s["name"]: s["figures"] for s in runs}
    if "train" in runs_by and "train_resume" in runs_by:
        delta = loss_deltas(runs_by["train"], runs_by["train_resume"])
        text = ", ".join(f"step {k}: {v:.2e}" for k, v in delta.items()) or "no common logged step"
        lines += ["", f"Resumed run against the first run, |loss difference|: {text}."]
    return lines
