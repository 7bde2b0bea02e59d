"""Tests for tools/make_tables.py and results/paper_reference.yaml."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL_PATH = REPO_ROOT / "tools" / "make_tables.py"
REFERENCE_PATH = REPO_ROOT / "results" / "paper_reference.yaml"


def load_tool():
    spec = importlib.util.spec_from_file_location("make_tables", TOOL_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tables = load_tool()


def run_row(**overrides):
    row = {
        "run_id": "r",
        "exp": "deit_w4a4",
        "task": "classification",
        "model": "deit_t",
        "dataset": "imagenet",
        "w_bits": 4,
        "a_bits": 4,
        "ptq": "repq_vit",
        "compensation": "qwt",
        "metrics": {"top1": 60.0, "agreement": 80.0},
        "fp_metrics": {"top1": 72.1},
        "finished_at": "2026-11-22T15:40:00+00:00",
    }
    row.update(overrides)
    return row


def write_runs(path, rows, trailing=""):
    lines = [json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n\n" + trailing, encoding="utf-8")


def table_row(markdown, model):
    """Cells of the Markdown body row of `model` (first cell == model)."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0] == model:
            return cells
    raise AssertionError(f"no row for {model}")


def header_cells(markdown):
    for line in markdown.splitlines():
        if line.startswith("| model"):
            return [cell.strip() for cell in line.strip().strip("|").split("|")]
    raise AssertionError("no header")


def cell(markdown, model, column):
    return table_row(markdown, model)[header_cells(markdown).index(column)]


@pytest.fixture()
def tables(tmp_path):
    rows = [
        # Two rows for the same cell: the newer (61.3) must win, even though it comes first.
        run_row(metrics={"top1": 61.3}, finished_at="2026-11-22T16:00:00+00:00"),
        run_row(metrics={"top1": 50.0}, finished_at="2026-11-22T15:00:00+00:00"),
        # A digits run of deit_t must not leak into the ImageNet table.
        run_row(dataset="digits", compensation="none", metrics={"top1": 1.0}),
        run_row(model="resnet101", ptq="percentile", w_bits=4, a_bits=8,
                metrics={"top1": 76.9}, fp_metrics={"top1": 77.4}),
        run_row(model="embedded_vit", dataset="digits", ptq="rtn", compensation="none",
                metrics={"top1": 80.5}, fp_metrics={"top1": 95.5}),
        run_row(model="embedded_vit", dataset="digits", ptq="rtn", compensation="qwt",
                metrics={"top1": 88.3}, fp_metrics={"top1": 95.5}),
        run_row(model="embedded_vit", dataset="digits", ptq="rtn", compensation="qwt",
                w_bits=6, a_bits=6, metrics={"top1": 94.0}, fp_metrics={"top1": 95.5}),
        run_row(model="embedded_resnet", dataset="digits", ptq="percentile",
                compensation="none", w_bits=4, a_bits=8,
                metrics={"top1": 90.0}, fp_metrics={"top1": 97.0}),
    ]
    runs = tmp_path / "runs.jsonl"
    write_runs(runs, rows, trailing='{"run_id": "truncated", "metrics": {"to')
    out = tmp_path / "tables"
    written = make_tables.main(["--runs", str(runs), "--reference", str(REFERENCE_PATH),
                                "--out", str(out)])
    return out, written


def read(out, name):
    return (out / f"{name}.md").read_text(encoding="utf-8")


def test_newest_row_wins_and_delta(tables):
    out, _ = tables
    md = read(out, "repq_vit_qwt")
    assert cell(md, "deit_t", "W4A4 +QwT ours") == "61.3"
    assert cell(md, "deit_t", "W4A4 +QwT paper") == "61.4"
    assert cell(md, "deit_t", "W4A4 +QwT Δ") == "-0.1"
    assert cell(md, "deit_t", "FP ours") == "72.1"
    assert cell(md, "deit_t", "FP paper") == "72.2"
    assert cell(md, "deit_t", "FP Δ") == "-0.1"


def test_missing_cells_and_paper_numbers(tables):
    out, _ = tables
    md = read(out, "repq_vit_qwt")
    # The digits deit_t "none" row must not fill the ImageNet baseline cell.
    assert cell(md, "deit_t", "W4A4 base ours") == "—"
    assert cell(md, "deit_t", "W4A4 base Δ") == "—"
    assert cell(md, "deit_t", "W4A4 base paper") == "58.2"
    assert cell(md, "swin_s", "W6A6 +QwT ours") == "—"
    assert cell(md, "swin_s", "W6A6 +QwT paper") == "82.9"
    assert cell(md, "swin_s", "FP ours") == "—"


def test_other_tables(tables):
    out, _ = tables
    md = read(out, "resnet_percentile")
    assert cell(md, "resnet101", "W4A8 +QwT ours") == "76.9"
    assert cell(md, "resnet101", "W4A8 +QwT paper") == "76.4"
    assert cell(md, "resnet101", "W4A8 +QwT Δ") == "+0.5"
    assert cell(md, "resnet101", "FP Δ") == "+0.1"
    star = read(out, "qwt_star")
    assert table_row(star, "resnet50")[1] == "percentile"
    assert table_row(star, "deit_t")[1] == "repq_vit"
    assert cell(star, "resnet50", "W4A4 +QwT* paper") == "72.5"
    w8 = read(out, "w8a8_hist")
    assert cell(w8, "vit_b", "W8A8 +QwT paper") == "82.8"
    tex = (out / "repq_vit_qwt.tex").read_text(encoding="utf-8")
    assert r"\begin{tabular}" in tex and "61.4" in tex and r"deit\_t" in tex


def test_embedded_table_and_plot(tables):
    out, written = tables
    md = read(out, "embedded")
    assert header_cells(md) == ["model", "ptq", "bits", "FP top-1", "base top-1", "+QwT top-1"]
    assert table_row(md, "embedded_vit") == ["embedded_vit", "rtn", "W4A4", "95.5", "80.5", "88.3"]
    assert "| embedded_vit | rtn | W6A6 | 95.5 | — | 94.0 |" in md
    assert "| embedded_resnet | percentile | W4A8 | 97.0 | 90.0 | — |" in md
    # The deit_t digits row is a non-ImageNet row, so it shows up here.
    assert "| deit_t | repq_vit | W4A4 | 72.1 | 1.0 | — |" in md
    png = out / "top1_vs_bits.png"
    assert png.exists() and png.stat().st_size > 0
    assert png in written
    assert (out / "embedded.tex").exists()


def test_truncated_line_warns(tmp_path, capsys):
    runs = tmp_path / "runs.jsonl"
    write_runs(runs, [run_row()], trailing='{"run_id": "cut')
    rows = make_tables.load_runs(runs)
    assert len(rows) == 1
    assert "skipping unparsable line" in capsys.readouterr().err


def test_missing_runs_file(tmp_path, capsys):
    out = tmp_path / "tables"
    make_tables.main(["--runs", str(tmp_path / "nope.jsonl"),
                      "--reference", str(REFERENCE_PATH), "--out", str(out)])
    md = read(out, "repq_vit_qwt")
    assert cell(md, "deit_t", "W4A4 +QwT ours") == "—"
    assert cell(md, "deit_t", "W4A4 +QwT paper") == "61.4"
    assert (out / "top1_vs_bits.png").stat().st_size > 0
    assert "no runs file" in capsys.readouterr().out


def test_reference_numbers():
    tables = yaml.safe_load(REFERENCE_PATH.read_text(encoding="utf-8"))["tables"]
    assert set(tables) == {"repq_vit_qwt", "qwt_star", "resnet_percentile", "w8a8_hist"}
    repq = tables["repq_vit_qwt"]
    assert repq["values"]["swin_s"]["w6a6/qwt"] == 82.9
    assert repq["values"]["deit_t"]["w4a4/qwt"] == 61.4
    assert repq["values"]["deit_s_dist"]["w4a4/qwt"] == 76.2
    assert repq["fp"]["vit_b"] == 84.5
    assert tables["resnet_percentile"]["values"]["resnet101"]["w4a8/qwt"] == 76.4
    assert tables["resnet_percentile"]["values"]["resnet18"]["w4a4/none"] == 47.1
    assert tables["resnet_percentile"]["fp"]["resnet50"] == 76.6
    star = tables["qwt_star"]
    assert star["values"]["resnet50"]["w4a4/qwt_star"] == 72.5
    assert star["ptq_per_model"]["resnet50"] == "percentile"
    w8 = tables["w8a8_hist"]
    assert w8["values"]["vit_b"]["w8a8/qwt"] == 82.8
    assert w8["latency_ms"]["swin_s"]["w8a8/qwt"] == 17.9
    # Every listed model has every column filled, and the values are plain numbers.
    for table in tables.values():
        keys = {f"{c['bits']}/{c['compensation']}" for c in table["columns"]}
        for model in table["models"]:
            assert set(table["values"][model]) == keys
            assert all(isinstance(v, float) for v in table["values"][model].values())
            assert isinstance(table["fp"][model], float)


def test_seed_table_reports_mean_std_and_paired_differences():
    rows = []
    for seed, (b_top1, b_mse, q_top1, q_mse) in enumerate([(80.0, 0.30, 82.0, 0.20), (81.0, 0.32, 81.5, 0.25), (79.0, 0.28, 82.5, 0.30)]):
        common = dict(exp="embedded_default", dataset="digits_wild", model="embedded_vit", seed=seed,
                      fp_metrics={"top1": 90.0})
        rows.append(run_row(compensation="none", metrics={"top1": b_top1, "logit_mse": b_mse}, **common))
        rows.append(run_row(compensation="qwt", metrics={"top1": q_top1, "logit_mse": q_mse}, **common))
    rows.append(run_row(exp="other", dataset="digits_wild", model="embedded_vit", compensation="none", seed=0,
                        metrics={"top1": 1.0}))  # one seed only: not in the seed table
    header, body = make_tables.build_seed_table(rows)
    assert len(body) == 3 and all(line[0] == "embedded_default" for line in body)
    fp, base, qwt = body
    assert fp[4] == "FP" and fp[6] == "90.00 ± 0.00"
    assert base[4] == "base" and base[6] == "80.00 ± 1.00" and base[7] == ""
    # paired: +2.0, +0.5, +3.5 -> mean 2.0, sample std 1.5
    assert qwt[4] == "+QwT" and qwt[7] == "2.00 ± 1.50"
    # paired MSE: -0.10, -0.07, +0.02 -> mean -0.05, sample std 0.0624; seed 2: 0.30 > 0.28
    assert qwt[9] == "-0.0500 ± 0.0624" and qwt[10] == "no"
