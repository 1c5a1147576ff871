"""A whole reproduction: the steps in order, each skipped when the state file records it done."""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from ._data import load_splits
from ._report import markdown, paper_reference, protocol_note, write_report
from ._settings import ReproduceSettings, grid_axes, resolve_dtype
from ._state import RunState, digest
from ._steps import extract_features, fit_and_score, model_depths, search_cells

# FusionClassifier on a label column that is all 0 in its training rows, and mAP over labels without a positive.
_REPEATED_WARNINGS = (r".*label column\(s\) of y are constant", r".*classes have no positive sample")


def run_reproduce(settings: ReproduceSettings | None = None, *, client=None, gpu_workers: bool = False,
                  **overrides) -> dict:
    """Run the paper's protocol on a benchmark; return the summary (also written as ``results.json``).

    Steps: load the two splits; extract image and text features into the store (:func:`extract_features`); search
    the grid on a held-out part of the training split (:func:`search_cells`); fit the image-only, text-only and
    fused heads on the whole training split and score the test split (:func:`fit_and_score`); write
    ``results.md`` and ``results.json``. Each finished step is recorded in ``<output>/state.json``; a rerun with
    the same settings takes recorded steps from there (a run killed during the search resumes at the search),
    and features from the store (an interrupted extraction resumes where it stopped).

    Parameters
    ----------
    settings : ReproduceSettings
    client : dask.distributed.Client or None
        Extraction runs its shards on the client's workers; None runs them here.
    gpu_workers : bool, default=False
        Whether the client's workers compute on GPUs (with ``dtype="auto"``: bfloat16 there).
    **overrides
        Fields of :class:`ReproduceSettings` to change.
    """
    settings = replace(settings, **overrides) if settings is not None else ReproduceSettings(**overrides)
    started = time.perf_counter()
    say = print if settings.verbose > 0 else _silent
    state = RunState(settings.output_dir)
    train, test, target_names = load_splits(settings.dataset, settings.root, settings.limit)
    say(f"{settings.dataset}: {len(train.frame)} train / {len(test.frame)} test images, {len(target_names)} labels"
        f"{'' if train.has_text else ', no text'}")
    dtype = (state.dtype if settings.dtype == "auto" and state.dtype
             else resolve_dtype(settings.dtype, settings.device, gpu_workers=gpu_workers and client is not None))
    axes = grid_axes(settings.grid, *model_depths(settings, dtype, train.has_text))
    keys = _step_digests(settings, axes, dtype, train.has_text)
    resumed = []
    extraction = _extraction(settings, state, keys["extract"], (train, test), axes, dtype, client, resumed, say)
    train, test = (_without_failures(split, extraction) for split in (train, test))
    with warnings.catch_warnings():
        # Said once in the summary (labels without positives), not for every candidate and head.
        for message in _REPEATED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        search = _step(state, "search", keys["search"], resumed, say,
                       lambda: search_cells(settings, train, axes, dtype))
        results = _step(state, "score", keys["score"], resumed, say,
                        lambda: fit_and_score(settings, train, test, axes, search["best_params"], dtype))
    summary = {
        "dataset": settings.dataset,
        "splits": {role: {"name": s.name, "n": len(s.frame), "dropped": s.dropped}
                   for role, s in (("train", train), ("test", test))},
        "n_labels": len(target_names),
        "labels_without_positives": {"train": int((train.target.sum(axis=0) == 0).sum()),
                                     "test": int((test.target.sum(axis=0) == 0).sum())},
        "settings": settings.describe(),
        "models_used": {"image": settings.image_model, "text": settings.text_model if train.has_text else None},
        "dtype": dtype,
        "grid": axes,
        "extraction": _this_run(extraction, from_state="extract" in resumed),
        "resumed_steps": resumed,
        "search": search,
        "results": results,
        "paper": paper_reference(settings.dataset),
        "note": protocol_note(settings.dataset, train.has_text),
        "seconds": time.perf_counter() - started,
    }
    written = write_report(summary, settings.output_dir)
    print(markdown(summary))
    say(f"wrote {', '.join(str(p) for p in written)}; state: {state.path}")
    return summary


def _silent(*args, **kwargs):
    pass


def _step_digests(settings: ReproduceSettings, axes: dict, dtype: str, has_text: bool) -> dict:
    """Per step, a digest of what its result depends on: a changed setting reruns the steps it affects."""
    data = [settings.dataset, str(Path(settings.root).resolve()), settings.limit, settings.image_model,
            settings.text_model if has_text else None]
    keys = {"extract": digest(data, axes, dtype)}
    keys["search"] = digest(keys["extract"], settings.seed, settings.val_fraction, settings.candidate_head)
    keys["score"] = digest(keys["search"], settings.head)
    return keys


def _extraction(settings, state: RunState, key: str, splits, axes, dtype, client, resumed: list, say) -> dict:
    """The extraction step: its record when the state holds one whose manifests are still in the store, else run
    (the store skips what it holds) and record it. Unreadable inputs are listed in ``failures.tsv``."""
    extraction = state.result("extract", key)
    if extraction is not None and all(_manifests_exist(by_split) for by_split in extraction.values()):
        resumed.append("extract")
        say("extraction: recorded done in the state file, skipped")
    else:
        say(f"extraction into {settings.store} ({'on Dask' if client is not None else 'here'}, {dtype}) ...")
        extraction = extract_features(settings, splits, axes, dtype, client=client)
        state.record("extract", key, extraction, dtype=dtype)
    _write_failures(settings.output_dir, extraction)
    return extraction


def _step(state: RunState, name: str, key: str, resumed: list, say, compute):
    """The recorded result of a step, or compute and record it."""
    result = state.result(name, key)
    if result is not None:
        resumed.append(name)
        say(f"{name}: recorded done in the state file, skipped")
        return result
    say({"search": "search over the grid (held-out mAP) ...", "score": "fit the heads, score the test split ..."}[name])
    result = compute()
    state.record(name, key, result)
    return result


def _manifests_exist(by_split: dict) -> bool:
    """Whether each split's manifest is still in the store (a moved or deleted store reruns the extraction)."""
    return all(Path(record["manifest"]).is_file() for record in by_split.values())


def _without_failures(split, extraction: dict):
    """The split without the images whose image or text could not be read (listed in ``failures.tsv``)."""
    failed = np.zeros(len(split.frame), dtype=bool)
    for by_split in extraction.values():
        positions = [int(p) for p in by_split[split.name]["failed"]]
        failed[positions] = True
    return split.drop(failed, "unreadable")


def _this_run(extraction: dict, from_state: bool) -> dict:
    """Per modality, what this run's extraction computed (nothing when it was taken from the state file)."""
    counts = {}
    for modality, by_split in extraction.items():
        failed = sum(len(r["failed"]) for r in by_split.values())
        stored = sum(r["computed"] + r["already_stored"] for r in by_split.values())
        computed = 0 if from_state else sum(r["computed"] for r in by_split.values())
        counts[modality] = {"computed": computed, "already_stored": stored - computed, "failed": failed,
                            "from_state": from_state}
    return counts


def _write_failures(folder, extraction: dict) -> None:
    """List every input extraction could not read in ``<output>/failures.tsv`` (split, modality, row, reason)."""
    lines = [f"{split}\t{modality}\t{position}\t{reason}" for modality, by_split in extraction.items()
             for split, record in by_split.items() for position, reason in record["failed"].items()]
    path = Path(folder) / "failures.tsv"
    if lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("split\tmodality\trow\treason\n" + "\n".join(lines) + "\n")
    elif path.exists():  # left by an earlier run whose inputs have since been repaired
        path.unlink()
