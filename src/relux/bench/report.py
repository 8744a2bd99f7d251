"""Benchmark output: aligned text table, markdown, JSON and matplotlib plots of rows from
:mod:`relux.bench.runner`.

Tables give one line per row; long status reasons, missed targets and the progress of timed-out rows
go to numbered notes under the table. Per-layer figures read ``L1 15/15 rec, 15 matched, 0 sgn, 2^-38.2``:
neurons the attack recovered of the layer's width, neurons the verification matched to the truth,
sign errors, and log2 of the layer's largest normalised weight error.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]


# --------------------------------------------------------------------------- cells
def _num(x: Any, fmt: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


def _pow2(x: Any) -> str:
    return "-" if x is None else f"2^{x:.1f}"


def short_status(row: Row) -> str:
    """``ok``, ``failed``, ``skipped`` or ``timeout`` (the reason goes to the notes)."""
    status = str(row.get("status") or "")
    return status.split(":", 1)[0] or "?"


def layer_summary(row: Row) -> str:
    """Per-hidden-layer figures of a row, e.g. ``L1 15/15 rec, 15 matched, 0 sgn, 2^-38.2; L2 ...``."""
    parts = []
    for layer in row.get("layers") or []:
        if layer.get("recovered") is None and "matched" not in layer:
            continue
        rec = layer.get("recovered", "?")
        text = f"L{layer['index']} {rec}/{layer['width']} rec"
        if "matched" in layer:
            sgn = layer.get("sign_errors", "?")
            text += f", {layer['matched']} matched, {sgn} sgn, {_pow2(layer.get('log2_weight_error'))}"
        parts.append(text)
    return "; ".join(parts)


def _published(row: Row) -> list[str]:
    p = row.get("published")
    if not p:
        return ["", "", "", ""]
    return [p["paper"], p["queries"], p["time"], p["error"]]


def _columns(rows: Sequence[Row]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, body cells and numbered notes shared by the text and markdown tables."""
    paper = any(r.get("published") for r in rows)
    targets = any(r.get("targets") for r in rows)
    deep = any(len(r.get("layers") or []) > 1 for r in rows)
    head = ["model", "params", "queries", "log2 q", "seconds", "log2 w err", "max rel out err", "agreement",
            "sign err", "self-check", "status"]
    if targets:
        head.append("met")
    if deep:
        head.append("per layer")
    if paper:
        head += ["sign q", "published by", "pub. queries", "pub. time", "pub. error"]
    body: list[list[str]] = []
    notes: list[str] = []
    for r in rows:
        status = short_status(r)
        reasons = []
        full = str(r.get("status") or "")
        if ":" in full:
            reasons.append(full.split(":", 1)[1].strip())
        if r.get("partial"):
            reasons.append("figures are those of the partial result the failed run returned")
        if any(layer.get("from_log") for layer in r.get("layers") or []):
            reasons.append("per-layer counts from the attack's log (no result to verify)")
        if r.get("verify_error"):
            reasons.append(f"verification impossible: {r['verify_error']}")
        if status == "timeout":
            q = f" after {r['queries']} queries" if r.get("queries") else ""
            reasons.append(f"killed at the time limit{q}; last log: {' | '.join(r.get('progress') or []) or '-'}")
        for miss in r.get("misses") or []:
            reasons.append(f"missed target: {miss}")
        if r.get("note"):
            reasons.append(str(r["note"]))
        if reasons:
            notes.append(f"({len(notes) + 1}) {r['model']}: " + "; ".join(reasons))
            status = f"{status} ({len(notes)})"
        cells = [
            str(r["model"]),
            _num(r.get("params"), "d"),
            _num(r.get("queries"), "d"),
            _num(r.get("log2_queries"), ".2f"),
            _num(r.get("seconds"), ".2f"),
            _num(r.get("log2_weight_error"), ".1f"),
            _num(r.get("max_rel_output_error"), ".2g"),
            _num(r.get("argmax_agreement"), ".4f"),
            _num(r.get("sign_errors"), "d"),
            str(r.get("selfcheck") or "-"),
            status,
        ]
        if targets:
            cells.append("-" if r.get("met") is None else ("yes" if r["met"] else "NO"))
        if deep:
            cells.append(layer_summary(r) or "-")
        if paper:
            cells += [_num(r.get("sign_queries"), "d"), *_published(r)]
        body.append(cells)
    return head, body, notes


def format_table(rows: Sequence[Row]) -> str:
    """An aligned plain-text table of ``rows`` with its notes."""
    head, body, notes = _columns(rows)
    table = [head, *body]
    widths = [max(len(line[c]) for line in table) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, *([""] + notes if notes else [])])


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Row]) -> str:
    """A markdown table of ``rows`` followed by its notes as a list."""
    head, body, notes = _columns(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_cell(c) for c in cells) + " |" for cells in body]
    if notes:
        lines.append("")
        lines += [f"- {_md_cell(n)}" for n in notes]
    return "\n".join(lines)


def to_markdown(rows: Sequence[Row], *, title: str, command: str | None = None,
                env: dict[str, Any] | None = None) -> str:
    """A markdown section: title, the command that produced it, the environment, the table."""
    parts = [f"## {title}", ""]
    if command:
        parts += ["```", command, "```", ""]
    if env:
        parts += [
            f"Python {env.get('python')}, numpy {env.get('numpy')}, {env.get('machine')} "
            f"({env.get('cpus')} CPUs), commit {str(env.get('commit') or '?')[:10]}"
            f"{' with uncommitted changes under src/' if env.get('src_modified') else ''}, started {env.get('date')}.",
            "",
        ]
    parts.append(markdown_table(rows))
    return "\n".join(parts) + "\n"


def write_markdown(rows: Sequence[Row], path: str | Path, *, title: str, command: str | None = None,
                   env: dict[str, Any] | None = None) -> Path:
    out = Path(path)
    out.write_text(to_markdown(rows, title=title, command=command, env=env))
    return out


def write_json(rows: Sequence[Row], path: str | Path) -> Path:
    """Write ``rows`` as a JSON list (strict JSON: no NaN or infinities)."""
    out = Path(path)
    out.write_text(json.dumps(list(rows), indent=2, allow_nan=False, default=_json_default) + "\n")
    return out


def _json_default(o: object) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def environment(repo: str | Path | None = None) -> dict[str, Any]:
    """Python and numpy versions, machine, CPU count, git commit of ``repo`` (when it is a checkout) and
    whether tracked files under its ``src/`` differ from it, date."""
    import os

    commit = None
    modified = None
    if repo is not None:
        try:
            commit = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                timeout=10,
            ).stdout.strip() or None
            if commit:
                status = subprocess.run(
                    ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", "src"],
                    capture_output=True, text=True, check=False, timeout=10,
                ).stdout
                modified = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "system": platform.platform(),
        "commit": commit,
        "src_modified": modified,  # uncommitted changes to tracked files under src/ at that moment
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------- plots
def plots_available() -> bool:
    """Whether matplotlib is importable (``pip install 'relux[bench]'``)."""
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(rows: Sequence[Row], directory: str | Path) -> list[Path]:
    """Write ``queries.png`` (log2 queries per model, published figures as markers), ``errors.png``
    (log2 weight and output errors per model) and ``stages.png`` (seconds per stage and model) into
    ``directory``. Needs matplotlib; rows that did not run are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ran = [r for r in rows if r.get("queries") is not None]
    names = [str(r["model"]) for r in ran]
    y = np.arange(len(ran))
    height = max(2.5, 0.45 * len(ran) + 1.2)
    written = []

    fig = Figure(figsize=(10, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    q = [r.get("log2_queries") or 0.0 for r in ran]
    colors = ["tab:green" if short_status(r) == "ok" else "tab:red" for r in ran]
    ax.barh(y, q, color=colors, label="relux (green ok, red failed/timeout)")
    pub = [(i, r["published"]["log2_queries"]) for i, r in enumerate(ran)
           if r.get("published") and r["published"].get("log2_queries") is not None]
    if pub:
        ax.scatter([p for _, p in pub], [i for i, _ in pub], marker="D", color="black", zorder=3, label="published")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("log2 queries")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    written.append(out / "queries.png")
    fig.savefig(written[-1], dpi=110)

    fig = Figure(figsize=(10, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    w = [r.get("log2_weight_error") for r in ran]
    o = [r.get("log2_max_rel_output_error") for r in ran]
    ax.barh(y - 0.2, [v if v is not None else 0.0 for v in w], height=0.4, label="log2 max normalised weight error")
    ax.barh(y + 0.2, [v if v is not None else 0.0 for v in o], height=0.4, label="log2 max relative output error")
    ax.axvline(-30, color="grey", linestyle=":", label="2^-30")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("log2 error (further left is better; missing values drawn as 0)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    written.append(out / "errors.png")
    fig.savefig(written[-1], dpi=110)

    fig = Figure(figsize=(10, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels: list[str] = []
    for r in ran:
        for s in r.get("stages") or []:
            label = _stage_label(s)
            if label not in labels:
                labels.append(label)
    left = np.zeros(len(ran))
    for label in labels:
        secs = np.array([sum(s["seconds"] for s in (r.get("stages") or []) if _stage_label(s) == label)
                         for r in ran])
        ax.barh(y, secs, left=left, label=label)
        left += secs
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("attack seconds per stage")
    if labels:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
    written.append(out / "stages.png")
    fig.savefig(written[-1], dpi=110)
    return written


def _stage_label(stage: dict[str, Any]) -> str:
    layer = stage.get("layer")
    return str(stage["name"]) if layer is None else f"{stage['name']} (layer {layer})"
