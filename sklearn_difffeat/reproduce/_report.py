"""The reproduction's results: a markdown table (also printed) and a JSON file, beside the paper's figure."""

from __future__ import annotations

import json
from pathlib import Path

from ._settings import PAPER_MAP

METRICS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1",
           "CP_top3", "CR_top3", "CF1_top3", "OP_top3", "OR_top3", "OF1_top3")
REPORT_FILES = ("results.md", "results.json")

_BENCHMARK = {
    "coco": "COCO 2014 (train2014 to train and search, val2014 to test)",
    "vg500": "VG500 (Visual Genome, 500 labels; the train and test lists)",
}
_PROTOCOL_NOTE = {
    "coco": ('"MS-COCO-enhanced" is not defined in the paper\'s abstract. This run used COCO 2014 instead: '
             "train2014 to train, val2014 to test, with the loader's protocol (80 categories, columns by category "
             "id, images without any label dropped, an image's captions as its text). The paper's figure and this "
             "run's are not of the same data."),
    "vg500": ("VG500 with the loader's protocol: the SSGRL / C-Tran train and test lists, the 500 labels of "
              "vg_category_500_labels_index.json, an image's region phrases as its text."),
}


def paper_reference(dataset: str) -> dict:
    value, benchmark = PAPER_MAP[dataset]
    return {"mAP": value, "benchmark": benchmark, "model": "fused"}


def protocol_note(dataset: str, has_text: bool) -> str:
    note = _PROTOCOL_NOTE[dataset]
    if not has_text:
        note += " No text was found (region_descriptions.json), so only the image model ran."
    return note


def _cell(params: dict) -> str:
    parts = []
    for branch in ("image", "text"):
        block, t = params.get(f"features__{branch}__block"), params.get(f"features__{branch}__timestep")
        if block is not None:
            parts.append(f"{branch} b{block} t={t:g}")
    return ", ".join(parts)


def _counts(extraction: dict) -> str:
    parts = []
    for modality, counts in extraction.items():
        source = " (extraction recorded done; not rerun)" if counts.get("from_state") else ""
        parts.append(f"{modality} {counts['computed']} computed, {counts['already_stored']} already stored, "
                     f"{counts['failed']} failed{source}")
    return "; ".join(parts)


def _no_positives(summary: dict) -> str:
    counts = summary["labels_without_positives"]
    if not any(counts.values()):
        return "each with positives in both splits"
    return (f"without a positive image: {counts['train']} in train, {counts['test']} in test; mAP averages over the "
            "test labels that have one")


def markdown(summary: dict) -> str:
    """The results page: what ran on what, the table (x 100) with the paper's row, and the protocol note."""
    search, splits, paper = summary["search"], summary["splits"], summary["paper"]
    dropped = "; ".join(f"{split}: {', '.join(f'{n} {why}' for why, n in s['dropped'].items())}"
                        for split, s in splits.items() if s["dropped"]) or "none"
    lines = [
        f"# Diff-Feat on {_BENCHMARK[summary['dataset']]}",
        "",
        f"Train {splits['train']['n']} images ({search['n_val']} of them held out to score the search), test "
        f"{splits['test']['n']}; {summary['n_labels']} labels ({_no_positives(summary)}). Images set apart: "
        f"{dropped}.",
        f"Models: image {summary['models_used']['image']}, text {summary['models_used']['text'] or 'none'}; "
        f"dtype {summary['dtype']}.",
        f"Grid \"{summary['settings']['grid']}\": {' x '.join(str(len(v)) for v in summary['grid'].values())} = "
        f"{search['grid_size']} cells; the local search scored {search['n_evaluations']} "
        f"({search['stopped'].replace('_', ' ')}), held-out mAP {100 * search['val_map']:.1f} at "
        f"{_cell(search['best_params'])}.",
        f"Features this run: {_counts(summary['extraction'])}.",
        "",
        "| model | cell | " + " | ".join(m.replace("_top3", "-3") for m in METRICS) + " |",
        "|---|---|" + "---:|" * len(METRICS),
    ]
    for name, row in summary["results"].items():
        values = " | ".join(f"{100 * row['report'][m]:.1f}" for m in METRICS)
        lines.append(f"| {name} | {_cell(row['params'])} | {values} |")
    rest = " | ".join("" for _ in METRICS[1:])
    lines.append(f"| paper ({paper['model']}) | {paper['benchmark']} | {paper['mAP']:.1f} | {rest} |")
    lines += ["", "Metrics x 100 on the test split; thresholded ones at 0.5, -3: each image's top 3 labels.",
              "", summary["note"], ""]
    return "\n".join(lines)


def write_report(summary: dict, folder) -> list[Path]:
    """Write ``results.md`` and ``results.json`` into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md, js = (folder / name for name in REPORT_FILES)
    md.write_text(markdown(summary))
    js.write_text(json.dumps(summary, indent=2))
    return [md, js]
