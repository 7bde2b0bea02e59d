#!/usr/bin/env python
"""Render our results next to the QwT paper's numbers.

Usage:
    python tools/make_tables.py [--runs results/runs.jsonl]
                                [--reference results/paper_reference.yaml]
                                [--out results/tables]

Inputs:
  * runs: JSON Lines, one result row per line (written by run.py). Blank or unparsable lines
    (e.g. a truncated last line of a run still writing) are skipped with a warning.
  * reference: results/paper_reference.yaml (layout documented in its header comment).

Outputs (in --out):
  * <table>.md / <table>.tex for every table in the reference file: one row per model; for the
    FP column and every (bits, compensation) column, three sub-columns "ours", "paper" and
    "Δ" (ours − paper, signed, 1 decimal). Missing cells show as "—".
  * embedded.md / embedded.tex: every row whose dataset is not "imagenet" (the embedded digits
    runs), grouped by (model, ptq, bits): FP top-1, then one top-1 column per compensation.
  * top1_vs_bits.png: top-1 vs bit-width of the embedded runs, one subplot per model, one line
    per (ptq, compensation).

Cell selection: a row fills a paper cell when task == "classification", dataset == "imagenet"
and model, ptq, bits ("w{w_bits}a{a_bits}") and compensation all match. When several rows
match, the one with the newest `finished_at` wins. Our FP number for a model is fp_metrics.top1
of the newest ImageNet classification row of that model (FP does not depend on the PTQ).
"""

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = REPO_ROOT / "results" / "runs.jsonl"
DEFAULT_REFERENCE = REPO_ROOT / "results" / "paper_reference.yaml"
DEFAULT_OUT = REPO_ROOT / "results" / "tables"

MISSING = "—"
DELTA = "Δ"

# How compensation names are printed in column headers; unknown names print as "+<name>".
COMP_LABELS = {
    "none": "base",
    "qwt": "+QwT",
    "qwt_star": "+QwT*",
    "qwt_v2": "+QwT-v2",
    "qft": "+QFT",
    "qft+qwt": "+QFT+QwT",
    "qft+qwt_v2": "+QFT+QwT-v2",
}


# --------------------------------------------------------------------------- loading


def warn(message):
    print(f"make_tables: warning: {message}", file=sys.stderr)


def load_runs(path):
    """Read result rows from a JSON Lines file; skip bad lines with a warning."""
    path = Path(path)
    if not path.exists():
        print(f"make_tables: no runs file at {path}; our cells will be empty")
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                warn(f"{path}:{lineno}: skipping unparsable line ({err})")
                continue
            if not isinstance(row, dict):
                warn(f"{path}:{lineno}: skipping line that is not a JSON object")
                continue
            rows.append(row)
    if not rows:
        print(f"make_tables: {path} has no result rows; our cells will be empty")
    return rows


def load_reference(path):
    with Path(path).open(encoding="utf-8") as f:
        return yaml.safe_load(f)["tables"]


def load_generation_reference(path):
    """The ``generation`` block of the reference file (DiT FID numbers), {} if absent."""
    with Path(path).open(encoding="utf-8") as f:
        return yaml.safe_load(f).get("generation") or {}


# --------------------------------------------------------------------------- row helpers


def bits_label(row):
    """'w4a4' style label of a row, or None when its bit-widths are missing."""
    w_bits, a_bits = row.get("w_bits"), row.get("a_bits")
    if w_bits is None or a_bits is None:
        return None
    return f"w{w_bits}a{a_bits}"


def parse_bits(label):
    """'w4a8' -> (4, 8), for sorting."""
    w_part, a_part = label[1:].split("a")
    return int(w_part), int(a_part)


def finished_time(row):
    """finished_at as an aware datetime; rows without a readable one sort as oldest."""
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    text = row.get("finished_at")
    if not isinstance(text, str):
        return oldest
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return oldest
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when


def newest(rows):
    """The row with the latest finished_at, or None for no rows."""
    if not rows:
        return None
    return max(rows, key=finished_time)


def get_metric(row, block, metric):
    """row[block][metric] as a float, or None."""
    if row is None:
        return None
    values = row.get(block)
    if not isinstance(values, dict):
        return None
    value = values.get(metric)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def is_imagenet_classification(row):
    return row.get("task") == "classification" and row.get("dataset") == "imagenet"


def select_cell(rows, model, ptq, bits, compensation):
    """Newest ImageNet classification row for one paper cell, or None."""
    matches = [
        row
        for row in rows
        if is_imagenet_classification(row)
        and row.get("model") == model
        and row.get("ptq") == ptq
        and bits_label(row) == bits
        and row.get("compensation") == compensation
    ]
    return newest(matches)


def select_fp(rows, model, metric):
    """Our FP number for a model: from the newest ImageNet row of it that has one."""
    matches = [
        row
        for row in rows
        if is_imagenet_classification(row)
        and row.get("model") == model
        and get_metric(row, "fp_metrics", metric) is not None
    ]
    return get_metric(newest(matches), "fp_metrics", metric)


# --------------------------------------------------------------------------- formatting


def fmt_value(value):
    return MISSING if value is None else f"{value:.1f}"


def fmt_delta(ours, paper):
    if ours is None or paper is None:
        return MISSING
    text = f"{ours - paper:+.1f}"
    return "+0.0" if text == "-0.0" else text


def column_name(bits, compensation):
    return f"{bits.upper()} {COMP_LABELS.get(compensation, '+' + compensation)}"


def cell_key(bits, compensation):
    return f"{bits}/{compensation}"


# --------------------------------------------------------------------------- paper tables


def build_paper_table(spec, rows):
    """Header and body (lists of strings) for one reference table."""
    metric = spec.get("metric", "top1")
    columns = spec.get("columns", [])
    paper_fp = spec.get("fp") or {}
    paper_values = spec.get("values") or {}
    ptq_per_model = spec.get("ptq_per_model") or {}

    header = ["model", "ptq", "FP ours", "FP paper", f"FP {DELTA}"]
    for column in columns:
        name = column_name(column["bits"], column["compensation"])
        header += [f"{name} ours", f"{name} paper", f"{name} {DELTA}"]

    body = []
    for model in spec["models"]:
        ptq = ptq_per_model.get(model, spec["ptq"])
        ours_fp = select_fp(rows, model, metric)
        paper_model_fp = paper_fp.get(model)
        line = [model, ptq, fmt_value(ours_fp), fmt_value(paper_model_fp),
                fmt_delta(ours_fp, paper_model_fp)]
        for column in columns:
            bits, compensation = column["bits"], column["compensation"]
            row = select_cell(rows, model, ptq, bits, compensation)
            ours = get_metric(row, "metrics", metric)
            paper = (paper_values.get(model) or {}).get(cell_key(bits, compensation))
            line += [fmt_value(ours), fmt_value(paper), fmt_delta(ours, paper)]
        body.append(line)
    return header, body


# --------------------------------------------------------------------------- embedded table


def embedded_rows(rows):
    """Embedded classification rows (other task families have their own tables)."""
    return [row for row in rows if row.get("dataset") != "imagenet"
            and row.get("task", "classification") == "classification"]


def compensation_order(names):
    """'none' first, then the others alphabetically."""
    return sorted(names, key=lambda name: (name != "none", name))


def group_key(row):
    return (str(row.get("model")), str(row.get("ptq")), bits_label(row) or "?")


def group_sort_key(key):
    model, ptq, bits = key
    return (model, ptq, parse_bits(bits) if bits != "?" else (99, 99))


def build_embedded_table(rows):
    """Header and body for the embedded (non-ImageNet) runs."""
    rows = embedded_rows(rows)
    compensations = compensation_order({str(row.get("compensation")) for row in rows})
    groups = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)

    header = ["model", "ptq", "bits", "FP top-1"]
    header += [f"{COMP_LABELS.get(name, '+' + name)} top-1" for name in compensations]
    body = []
    for key in sorted(groups, key=group_sort_key):
        group = groups[key]
        with_fp = [row for row in group if get_metric(row, "fp_metrics", "top1") is not None]
        line = [key[0], key[1], key[2].upper(),
                fmt_value(get_metric(newest(with_fp), "fp_metrics", "top1"))]
        for name in compensations:
            matches = [row for row in group if str(row.get("compensation")) == name]
            line.append(fmt_value(get_metric(newest(matches), "metrics", "top1")))
        body.append(line)
    return header, body


# --------------------------------------------------------------------------- DiT generation table


def fmt_fid(row, block="metrics"):
    """'FID ± sd (IS)' of a generation row (sd: over sampling seeds)."""
    fid = get_metric(row, block, "fid")
    if fid is None:
        return MISSING
    sd = get_metric(row, block, "fid_std")
    isc = get_metric(row, block, "isc")
    out = f"{fid:.2f}" + (f" ± {sd:.2f}" if sd else "")
    return out + (f" (IS {isc:.2f})" if isc is not None else "")


def build_dit_table(rows, paper):
    """One line per (model, dataset, ptq, bits): FP, then each compensation ('FID ± sd (IS)'),
    newest row wins; then the paper's numbers (``generation`` block of the reference file)."""
    rows = [row for row in rows if row.get("task") == "generation"]
    compensations = compensation_order({str(row.get("compensation")) for row in rows} | set(paper.get("compensations", [])))
    groups = {}
    for row in rows:
        key = (str(row.get("model")), str(row.get("dataset")), str(row.get("ptq")), bits_label(row) or "?")
        groups.setdefault(key, []).append(row)
    header = ["model", "data", "ptq", "bits", "samples", "FP FID"] + [f"{COMP_LABELS.get(n, '+' + n)} FID" for n in compensations]
    body = []
    for key in sorted(groups):
        group = groups[key]
        fp_row = newest([row for row in group if get_metric(row, "fp_metrics", "fid") is not None])
        n = get_metric(newest(group), "metrics", "num_samples")
        line = list(key[:3]) + [key[3].upper(), str(int(n)) if n else MISSING, fmt_fid(fp_row, "fp_metrics") if fp_row else MISSING]
        for name in compensations:
            match = newest([row for row in group if str(row.get("compensation")) == name])
            line.append(fmt_fid(match) if match else MISSING)
        body.append(line)
    for model, spec in (paper.get("values") or {}).items():
        line = [f"{model} (paper)", "imagenet", str(paper.get("ptq", "?")), str(paper.get("bits", "?")).upper(),
                str(paper.get("samples", MISSING)), MISSING]
        for name in compensations:
            v = spec.get(name)
            line.append(f"{v:.2f}" if v is not None else MISSING)
        body.append(line)
    return header, body


# --------------------------------------------------------------------------- writers


def markdown_table(title, header, body):
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for line in body:
        lines.append("| " + " | ".join(line) + " |")
    if not body:
        lines.append("")
        lines.append("(no rows)")
    return "\n".join(lines) + "\n"


def latex_escape(text):
    text = str(text)
    replacements = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "#": r"\#",
        "_": r"\_",
        "$": r"\$",
        "{": r"\{",
        "}": r"\}",
        DELTA: r"$\Delta$",
        MISSING: "--",
        "*": r"$^*$",
    }
    return "".join(replacements.get(char, char) for char in text)


def latex_table(title, header, body):
    lines = [
        r"% Generated by tools/make_tables.py; needs \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        r"\scriptsize",
        r"\caption{" + latex_escape(title) + "}",
        r"\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}",
        r"\toprule",
        " & ".join(latex_escape(cell) for cell in header) + r" \\",
        r"\midrule",
    ]
    for line in body:
        lines.append(" & ".join(latex_escape(cell) for cell in line) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(out_dir, name, title, header, body):
    """Write <name>.md and <name>.tex; return their paths."""
    md_path = out_dir / f"{name}.md"
    tex_path = out_dir / f"{name}.tex"
    md_path.write_text(markdown_table(title, header, body), encoding="utf-8")
    tex_path.write_text(latex_table(title, header, body), encoding="utf-8")
    return [md_path, tex_path]


# --------------------------------------------------------------------------- plot


def plot_points(rows):
    """{model: {(ptq, compensation): {bits: top1}}} for the embedded runs (newest row wins)."""
    latest = {}
    for row in embedded_rows(rows):
        bits = bits_label(row)
        top1 = get_metric(row, "metrics", "top1")
        if bits is None or top1 is None:
            continue
        key = (str(row.get("model")), str(row.get("ptq")), str(row.get("compensation")), bits)
        if key not in latest or finished_time(row) >= finished_time(latest[key]):
            latest[key] = row
    points = {}
    for (model, ptq, compensation, bits), row in latest.items():
        method = points.setdefault(model, {}).setdefault((ptq, compensation), {})
        method[bits] = get_metric(row, "metrics", "top1")
    return points


def write_plot(out_dir, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out_dir / "top1_vs_bits.png"
    points = plot_points(rows)
    models = sorted(points)
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(5 * max(len(models), 1), 4),
                             squeeze=False)
    if not models:
        axes[0][0].text(0.5, 0.5, "no embedded runs yet", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, model in zip(axes[0], models):
        methods = points[model]
        all_bits = sorted({bits for method in methods.values() for bits in method},
                          key=parse_bits)
        positions = {bits: i for i, bits in enumerate(all_bits)}
        for (ptq, compensation) in sorted(methods):
            series = methods[(ptq, compensation)]
            xs = sorted(series, key=parse_bits)
            ax.plot([positions[b] for b in xs], [series[b] for b in xs], marker="o",
                    label=f"{ptq} {COMP_LABELS.get(compensation, '+' + compensation)}")
        ax.set_xticks(range(len(all_bits)))
        ax.set_xticklabels([bits.upper() for bits in all_bits])
        ax.set_xlabel("bit-width")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS,
                        help="result rows, JSON Lines (default: results/runs.jsonl)")
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                        help="paper numbers (default: results/paper_reference.yaml)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default: results/tables)")
    return parser.parse_args(argv)


def main(argv=None):
    """Write all tables and the plot; return the list of paths written."""
    args = parse_args(argv)
    rows = load_runs(args.runs)
    reference = load_reference(args.reference)
    args.out.mkdir(parents=True, exist_ok=True)

    written = []
    for name, spec in reference.items():
        header, body = build_paper_table(spec, rows)
        written += write_table(args.out, name, spec.get("title", name), header, body)

    header, body = build_embedded_table(rows)
    written += write_table(args.out, "embedded",
                           "Embedded runs (non-ImageNet), top-1", header, body)
    written.append(write_plot(args.out, rows))
    header, body = build_dit_table(rows, load_generation_reference(args.reference))
    written += write_table(args.out, "dit", "DiT generation: FID (± sd over sampling seeds, IS), lower is better",
                           header, body)

    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
