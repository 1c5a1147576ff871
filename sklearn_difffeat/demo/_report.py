"""The demo's printed results: the held-out table and the lines under it, from the summary."""

from __future__ import annotations

from pathlib import Path


def print_table(summary, model_path):
    """Print the held-out table (mAP, CF1, OF1 per model) and the search, probe, head and file lines."""
    chosen = summary["chosen"]
    print("")
    print("Diff-Feat on Fashion-MNIST mosaics (held-out test split, threshold 0.5)")
    print(f"{'model':<12} {'branch choice':<26} {'mAP':>6} {'CF1':>6} {'OF1':>6}")
    choice = {
        "image only": f"block {chosen['image__block']}, t={chosen['image__timestep']}",
        "text only": f"block {chosen['text__block']}, t={chosen['text__timestep']:g}",
        "fused": "both of the above",
    }
    for name, report in summary["held_out"].items():
        print(
            f"{name:<12} {choice[name]:<26} {100 * report['mAP']:6.1f} {100 * report['CF1']:6.1f} "
            f"{100 * report['OF1']:6.1f}"
        )
    print(
        f"local search: {summary['evaluations']} evaluations of {summary['grid_size']} grid points "
        f"({100 * summary['evaluations'] / summary['grid_size']:.1f}%), "
        f"stopped {'at a local optimum' if summary['stopped'] == 'local_optimum' else 'at max_evaluations'}"
    )
    probes = summary["probes"]
    print(
        f"linear probes, held-out mAP: image features {100 * probes['image']:.1f} (raw pixels "
        f"{100 * probes['raw pixels']:.1f}); text features {100 * probes['text']:.1f} (untrained copy "
        f"{100 * probes['text, untrained copy']:.1f}, TF-IDF {100 * probes['TF-IDF']:.1f})"
    )
    g = summary["image_grid_best"]
    print(
        f"image grid optimum (for the heatmap, image only): block {g['block']}, t={g['timestep']}, "
        f"CV mAP {100 * g['cv_map']:.1f}"
    )
    search_head, head = summary["search_head"], summary["held_out_head"]
    print(
        f"heads: held-out models FusionClassifier({'' if summary['held_out_head_is_default'] else '...'}) "
        f"({head['projection_dim']} wide, {head['max_epochs']} epochs); candidates "
        f"{search_head['projection_dim']} wide, {search_head['max_epochs']} epochs"
    )
    print(f"saved {model_path}; reloaded predictions identical: {summary['reload_identical']}")
    figures = summary["figures"]
    print(f"figures: {figures['heatmap']}, {figures['tsne']}")
    print(f"summary: {Path(model_path).parent / 'summary.json'}; {summary['seconds']:.0f} s")


