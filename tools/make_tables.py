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
  * embedded_seeds.md / .tex: the embedded groups run over several calibration seeds (the
    `seed` option): per method, top-1 and logit MSE as mean ± std over seeds, and the paired
    difference to the base of the same seed (mean ± std), and whether the logit MSE is below the
    base's on every seed.
  * clip_zeroshot.md / .tex: CLIP zero-shot ImageNet (block ``clip_zeroshot`` of the reference
    file), one line per quantization mode (vision-only, vision+text); rows with task "zeroshot",
    dataset "imagenet_cc3m", mode from the row's config.zeroshot.mode.
  * clip_embedded.md / .tex: the embedded CLIP zero-shot runs, per (model, ptq, bits, mode).
  * COCO tables (``task: detection`` in the reference file): AP box / AP mask of each cell, ours
    and the paper's, and the box-AP difference; rows with task == "detection", dataset == "coco".
  * embedded_detection.md / .tex: the embedded detection runs, AP box / AP mask per compensation.
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
    "qwt+qwt_v2": "+QwT+QwT-v2",
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


def load_reference_block(path, key):
    """A top-level block of the reference file other than ``tables`` (e.g. clip_zeroshot), or None."""
    with Path(path).open(encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get(key)


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
    """Classification rows on the embedded benchmark (not ImageNet)."""
    return [row for row in rows if row.get("task", "classification") == "classification"
            and row.get("dataset") != "imagenet"]


# --------------------------------------------------------------------------- CLIP zero-shot


def zeroshot_mode(row):
    """The row's quantization mode; "vision (classifier float)" for the vision-mode ablation."""
    zs = (row.get("config") or {}).get("zeroshot") or {}
    mode = zs.get("mode") or (row.get("metrics") or {}).get("mode")
    if mode == "vision" and zs.get("quantize_classifier", True) is False:
        return "vision (classifier float)"
    return mode


MODE_LABELS = {"vision": "vision-only", "vision_text": "vision+text"}


def build_clip_table(spec, rows):
    """Paper table: one line per mode; FP and every (bits, compensation) column as ours / paper / Δ."""
    model, ptq = spec["model"], spec["ptq"]
    mine = [row for row in rows if row.get("task") == "zeroshot" and row.get("dataset") == "imagenet_cc3m"
            and row.get("model") == model and row.get("ptq") == ptq]
    header = ["model", "mode", "FP ours", "FP paper", f"FP {DELTA}"]
    for column in spec["columns"]:
        name = column_name(column["bits"], column["compensation"])
        header += [f"{name} ours", f"{name} paper", f"{name} {DELTA}"]
    body = []
    for mode in spec["modes"]:
        of_mode = [row for row in mine if zeroshot_mode(row) == mode]
        fp = get_metric(newest([r for r in of_mode if get_metric(r, "fp_metrics", "top1") is not None]), "fp_metrics", "top1")
        line = [model, MODE_LABELS.get(mode, mode), fmt_value(fp), fmt_value(spec.get("fp")), fmt_delta(fp, spec.get("fp"))]
        for column in spec["columns"]:
            bits, comp = column["bits"], column["compensation"]
            row = newest([r for r in of_mode if bits_label(r) == bits and r.get("compensation") == comp])
            ours = get_metric(row, "metrics", "top1")
            paper = ((spec.get("values") or {}).get(mode) or {}).get(cell_key(bits, comp))
            line += [fmt_value(ours), fmt_value(paper), fmt_delta(ours, paper)]
        body.append(line)
    return header, body


def build_clip_embedded_table(rows):
    """Embedded zero-shot runs: one line per (model, ptq, bits, mode); FP top-1, then top-1 per compensation."""
    mine = [row for row in rows if row.get("task") == "zeroshot" and row.get("dataset") != "imagenet_cc3m"]
    comps = compensation_order({str(row.get("compensation")) for row in mine})
    groups = {}
    for row in mine:
        groups.setdefault(group_key(row) + (str(zeroshot_mode(row)),), []).append(row)
    header = ["model", "ptq", "bits", "mode", "FP top-1"] + [f"{COMP_LABELS.get(c, '+' + c)} top-1" for c in comps]
    body = []
    for key in sorted(groups, key=lambda k: group_sort_key(k[:3]) + (k[3],)):
        group = groups[key]
        fp = get_metric(newest([r for r in group if get_metric(r, "fp_metrics", "top1") is not None]), "fp_metrics", "top1")
        line = [key[0], key[1], key[2].upper(), MODE_LABELS.get(key[3], key[3]), fmt_value(fp)]
        for c in comps:
            line.append(fmt_value(get_metric(newest([r for r in group if str(r.get("compensation")) == c]), "metrics", "top1")))
        body.append(line)
    return header, body


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


# --------------------------------------------------------------------------- embedded, over seeds


def mean_std(values):
    n = len(values)
    if n == 0:
        return None, None
    m = sum(values) / n
    sd = (sum((v - m) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return m, sd


def fmt_ms(values, digits=2):
    m, sd = mean_std(values)
    if m is None:
        return MISSING
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def seed_groups(rows):
    """{(exp, model, ptq, bits): {compensation: {seed: newest row}}} of the embedded rows."""
    groups = {}
    for row in embedded_rows(rows):
        bits = bits_label(row)
        if bits is None:
            continue
        key = (str(row.get("exp", "default")), str(row.get("model")), str(row.get("ptq")), bits)
        per_seed = groups.setdefault(key, {}).setdefault(str(row.get("compensation")), {})
        seed = row.get("seed", 0)
        if seed not in per_seed or finished_time(row) >= finished_time(per_seed[seed]):
            per_seed[seed] = row
    return groups


def build_seed_table(rows, min_seeds=2):
    """Mean ± std over calibration seeds of top-1 and logit MSE (to FP), and each method's paired
    difference to the base (same seed, same stage-1 model), for every group run over at least
    ``min_seeds`` seeds."""
    header = ["exp", "model", "ptq", "bits", "method", "seeds", "top-1", "Δ top-1 vs base (paired)",
              "logit MSE", "Δ logit MSE vs base (paired)", "MSE below base on every seed"]
    body = []
    groups = seed_groups(rows)
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], parse_bits(k[3]))):
        comps = groups[key]
        base = comps.get("none", {})
        if len(base) < min_seeds:
            continue
        fp_top1 = [get_metric(r, "fp_metrics", "top1") for r in base.values()]
        body.append(list(key) + ["FP", str(len(base)), fmt_ms([v for v in fp_top1 if v is not None]), "", "", "", ""])
        for name in compensation_order(comps):
            per_seed = comps[name]
            seeds = sorted(s for s in per_seed if s in base)
            top1 = [get_metric(per_seed[s], "metrics", "top1") for s in seeds]
            mse = [get_metric(per_seed[s], "metrics", "logit_mse") for s in seeds]
            d_top1 = [t - get_metric(base[s], "metrics", "top1") for s, t in zip(seeds, top1) if t is not None]
            d_mse = [m - get_metric(base[s], "metrics", "logit_mse") for s, m in zip(seeds, mse)
                     if m is not None and get_metric(base[s], "metrics", "logit_mse") is not None]
            label = COMP_LABELS.get(name, "+" + name)
            below = "" if name == "none" or not d_mse else ("yes" if all(d < 0 for d in d_mse) else "no")
            body.append(list(key) + [label, str(len(seeds)), fmt_ms([t for t in top1 if t is not None]),
                                     "" if name == "none" else fmt_ms(d_top1),
                                     fmt_ms([m for m in mse if m is not None], 4),
                                     "" if name == "none" else fmt_ms(d_mse, 4), below])
    return header, body


# --------------------------------------------------------------------------- LLaMA (task=language)

LLAMA_LABELS = {"none": "base", "qwt": "+QwT (global)", "qwt@local": "+QwT (local)", "qwt_v2": "+QwT-v2", "qft": "+QFT"}


def fmt2(value):
    return MISSING if value is None else f"{value:.2f}"


def fmt_delta2(ours, paper):
    return MISSING if ours is None or paper is None else f"{ours - paper:+.2f}"


def language_rows(rows, dataset=None):
    return [row for row in rows if row.get("task") == "language" and (dataset is None or row.get("dataset") == dataset)]


def load_language_reference(path):
    with Path(path).open(encoding="utf-8") as f:
        return yaml.safe_load(f).get("language_tables", {}) or {}


def build_llama_table(spec, rows):
    """Paper LLaMA table: one line per (model, ptq, compensation); per metric ours / paper / delta.
    A row fills a line when task == language, dataset, model, ptq, bits and compensation match
    (newest wins); the FP line is fp_metrics of the newest matching model's row."""
    metrics = spec["metrics"]  # [{key, label}]
    header = ["model", "method"]
    for m in metrics:
        header += [f"{m['label']} ours", f"{m['label']} paper", DELTA]
    body = []
    mine = [r for r in language_rows(rows, spec.get("dataset")) if bits_label(r) == spec["bits"]]
    for model in spec["models"]:
        ref = (spec.get("values") or {}).get(model, {})
        of_model = [r for r in mine if r.get("model") == model]
        fp_row = newest(of_model)
        line = [model, "FP"]
        for m in metrics:
            ours = get_metric(fp_row, "fp_metrics", m["key"]) if fp_row else None
            paper = (spec.get("fp") or {}).get(model, {}).get(m["key"])
            line += [fmt2(ours), fmt2(paper), fmt_delta2(ours, paper)]
        body.append(line)
        for col in spec["columns"]:
            ptq, comp = col["ptq"], col["compensation"]
            row = newest([r for r in of_model if r.get("ptq") == ptq and str(r.get("compensation")) == comp])
            line = [model, f"{ptq.upper()} {LLAMA_LABELS.get(comp, '+' + comp)}"]
            for m in metrics:
                ours = get_metric(row, "metrics", m["key"]) if row else None
                paper = ref.get(f"{ptq}/{comp}/{m['key']}")
                line += [fmt2(ours), fmt2(paper), fmt_delta2(ours, paper)]
            body.append(line)
    return header, body


def build_llama_embedded_table(rows):
    """Every language row of the embedded data (not c4_wikitext2): one line per (model, ptq,
    compensation), newest wins; perplexity, agreement with FP's next-token predictions, QA."""
    rows = [r for r in language_rows(rows) if r.get("dataset") != "c4_wikitext2"]
    keys = sorted({(str(r.get("model")), str(r.get("ptq")), bits_label(r) or "?") for r in rows})
    header = ["model", "bits", "method", "ppl (held-out)", "agree %", "QA avg", "extra params", "peak MB"]
    body = []
    for model, ptq, bits in keys:
        group = [r for r in rows if (str(r.get("model")), str(r.get("ptq")), bits_label(r) or "?") == (model, ptq, bits)]
        fp = newest(group)
        headline = fp.get("headline") if fp else None
        if not body or body[-1][0] != model:
            body.append([model, "FP", "FP", fmt2(get_metric(fp, "fp_metrics", headline)), "",
                         fmt_value(get_metric(fp, "fp_metrics", "qa_avg")), "0", ""])
        for comp in compensation_order({str(r.get("compensation")) for r in group}):
            r = newest([x for x in group if str(x.get("compensation")) == comp])
            body.append([model, bits.upper(), f"{ptq.upper()} {LLAMA_LABELS.get(comp, '+' + comp)}",
                         fmt2(get_metric(r, "metrics", headline)),
                         fmt_value(get_metric(r, "metrics", "agree")), fmt_value(get_metric(r, "metrics", "qa_avg")),
                         f"{int(r.get('extra_params') or 0):,d}", fmt_value(r.get("peak_mem_mb"))])
    return header, body


# --------------------------------------------------------------------------- COCO detection


def fmt_pair(box, mask):
    return f"{fmt_value(box)}/{fmt_value(mask)}"


def select_det_cell(rows, model, ptq, bits, compensation, dataset="coco"):
    matches = [row for row in rows if row.get("task") == "detection" and row.get("dataset") == dataset
               and row.get("model") == model and row.get("ptq") == ptq and bits_label(row) == bits
               and row.get("compensation") == compensation]
    return newest(matches)


def build_coco_table(spec, rows):
    """COCO table (``task: detection`` in the reference file): AP box / AP mask per cell, ours and paper."""
    columns = spec.get("columns", [])
    paper_fp, paper_values = spec.get("fp") or {}, spec.get("values") or {}
    header = ["model", "ptq", "FP ours", "FP paper"]
    for column in columns:
        name = column_name(column["bits"], column["compensation"])
        header += [f"{name} ours", f"{name} paper", f"{name} {DELTA} box"]
    body = []
    for model in spec["models"]:
        ptq = spec["ptq"]
        det = [row for row in rows if row.get("task") == "detection" and row.get("dataset") == "coco"
               and row.get("model") == model and get_metric(row, "fp_metrics", "bbox_mAP") is not None]
        fp_row = newest(det)
        fp = paper_fp.get(model) or [None, None]
        line = [model, ptq, fmt_pair(get_metric(fp_row, "fp_metrics", "bbox_mAP"), get_metric(fp_row, "fp_metrics", "segm_mAP")),
                fmt_pair(*fp)]
        for column in columns:
            row = select_det_cell(rows, model, ptq, column["bits"], column["compensation"])
            box, mask = get_metric(row, "metrics", "bbox_mAP"), get_metric(row, "metrics", "segm_mAP")
            paper = (paper_values.get(model) or {}).get(cell_key(column["bits"], column["compensation"])) or [None, None]
            line += [fmt_pair(box, mask), fmt_pair(*paper), fmt_delta(box, paper[0])]
        body.append(line)
    return header, body


def build_embedded_detection_table(rows):
    """Embedded detection runs (task detection, dataset not coco): AP box / AP mask per compensation."""
    rows = [row for row in rows if row.get("task") == "detection" and row.get("dataset") != "coco"]
    compensations = compensation_order({str(row.get("compensation")) for row in rows})
    groups = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    header = ["model", "ptq", "bits", "FP AP box/mask"]
    header += [f"{COMP_LABELS.get(name, '+' + name)} AP box/mask" for name in compensations]
    body = []
    for key in sorted(groups, key=group_sort_key):
        group = groups[key]
        fp_row = newest([row for row in group if get_metric(row, "fp_metrics", "bbox_mAP") is not None])
        line = [key[0], key[1], key[2].upper(),
                fmt_pair(get_metric(fp_row, "fp_metrics", "bbox_mAP"), get_metric(fp_row, "fp_metrics", "segm_mAP"))]
        for name in compensations:
            row = newest([row for row in group if str(row.get("compensation")) == name])
            line.append(fmt_pair(get_metric(row, "metrics", "bbox_mAP"), get_metric(row, "metrics", "segm_mAP")))
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
        "±": r"$\pm$",
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
    parser.add_argument("--print", dest="show", default=None, metavar="TABLE",
                        help="also print one table's Markdown (e.g. embedded_seeds) instead of the file list")
    return parser.parse_args(argv)


def main(argv=None):
    """Write all tables and the plot; return the list of paths written."""
    args = parse_args(argv)
    rows = load_runs(args.runs)
    reference = load_reference(args.reference)
    args.out.mkdir(parents=True, exist_ok=True)

    written = []
    for name, spec in reference.items():
        build = build_coco_table if spec.get("task") == "detection" else build_paper_table
        header, body = build(spec, rows)
        written += write_table(args.out, name, spec.get("title", name), header, body)

    clip = load_reference_block(args.reference, "clip_zeroshot")
    if clip:
        header, body = build_clip_table(clip, rows)
        written += write_table(args.out, "clip_zeroshot", clip.get("title", "clip_zeroshot"), header, body)
    header, body = build_clip_embedded_table(rows)
    written += write_table(args.out, "clip_embedded", "Embedded CLIP zero-shot runs, top-1", header, body)
    for name, spec in load_language_reference(args.reference).items():
        header, body = build_llama_table(spec, rows)
        written += write_table(args.out, name, spec.get("title", name), header, body)
    header, body = build_llama_embedded_table(rows)
    written += write_table(args.out, "llama_embedded", "Embedded LLaMA (docstrings): held-out perplexity, "
                           "agreement with FP, pydoc_mc QA", header, body)

    header, body = build_embedded_table(rows)
    written += write_table(args.out, "embedded",
                           "Embedded runs (non-ImageNet), top-1", header, body)
    header, body = build_seed_table(rows)
    written += write_table(args.out, "embedded_seeds",
                           "Embedded benchmark over calibration seeds: mean ± std, paired difference to the base",
                           header, body)
    header, body = build_embedded_detection_table(rows)
    written += write_table(args.out, "embedded_detection",
                           "Embedded detection runs (shapes), AP box / AP mask", header, body)
    written.append(write_plot(args.out, rows))
    header, body = build_dit_table(rows, load_generation_reference(args.reference))
    written += write_table(args.out, "dit", "DiT generation: FID (± sd over sampling seeds, IS), lower is better",
                           header, body)

    if args.show:
        md = args.out / f"{args.show}.md"
        if not md.is_file():
            raise SystemExit(f"make_tables: --print {args.show}: no such table (written: {sorted(p.stem for p in written)})")
        print(md.read_text(encoding="utf-8"))
    else:
        for path in written:
            print(path)
    return written


if __name__ == "__main__":
    main()
