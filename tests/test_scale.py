"""Sharded extraction in this process and on a Dask cluster, searches over the store, and the extract command."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import distributed
import joblib
import numpy as np
import pytest
from PIL import Image
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_difffeat import (
    BlockTimestepSearchCV,
    DiTFeatureExtractor,
    FeatureStore,
    TextDiffusionFeatureExtractor,
    extract,
)
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.metrics import map_scorer

IMAGE = dict(block=[3, -1], timestep=[0, 200])
TEXT = dict(block=[2, -1], timestep=[0.0, 0.3])


@pytest.fixture(scope="module")
def mosaics():
    return load_fashion_mosaics(300, split="test", random_state=1)


@pytest.fixture(scope="module")
def reference(mosaics):
    """Single-process features, no store."""
    image = DiTFeatureExtractor("embedded:fashion-dit", **IMAGE).fit(None).transform(mosaics.data["image"])
    # A few of these captions exceed the embedded text model's 64 tokens: truncated, with one warning.
    with pytest.warns(UserWarning, match="longer than max_length=64 tokens and were truncated"):
        text = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", **TEXT).fit(None).transform(mosaics.data["text"])
    return image, text


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def images(mosaics):
    return list(mosaics.data["image"])


def assert_no_duplicates_or_damage(folder, prefix=""):
    store = FeatureStore(folder)
    for name in (n for n in store.namespaces() if n.startswith(prefix)):
        rows = sum(int(np.load(p, mmap_mode="r").shape[0]) for p in (folder / name).glob("*.npy"))
        assert rows == store.count(name), name  # every stored row is a distinct sample
        values, found = store.read(name, store.keys(name))
        assert found.all() and np.isfinite(values).all()


@pytest.mark.slow
def test_in_process_extraction_equals_transform_and_resumes(mosaics, reference, tmp_path):
    ext = DiTFeatureExtractor("embedded:fashion-dit", **IMAGE)
    result = extract(ext, images(mosaics), tmp_path, shard_size=64, progress=False)
    assert (result.computed, result.already_stored, result.failed) == (300, 0, {})
    np.testing.assert_allclose(result.features(), reference[0], rtol=1e-6, atol=1e-6)
    again = extract(ext, images(mosaics), tmp_path, shard_size=64, progress=False)
    assert (again.computed, again.already_stored) == (0, 300)  # a second run computes nothing
    np.testing.assert_array_equal(again.features(), result.features())


@pytest.mark.slow
def test_cluster_extraction_equals_single_process(mosaics, reference, client, tmp_path):
    image = extract(DiTFeatureExtractor("embedded:fashion-dit", **IMAGE), images(mosaics), tmp_path, client=client,
                    shard_size=50, progress=False)
    text = extract(TextDiffusionFeatureExtractor("embedded:fashion-mdlm", **TEXT), list(mosaics.data["text"]),
                   tmp_path, client=client, shard_size=50, progress=False)
    assert image.computed == 300
    # a caption repeated in two shards that run at once may be computed by both (same values, stored twice)
    assert len(set(mosaics.data["text"])) <= text.computed + text.already_stored <= 300
    np.testing.assert_allclose(image.features(), reference[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(text.features(), reference[1], rtol=1e-6, atol=1e-5)
    # both workers did some of it, and no image was stored twice
    assert len({p.name.split("-")[1] for p in tmp_path.glob("dit-b3-*/*.npy")}) == 2
    assert_no_duplicates_or_damage(tmp_path, prefix="dit-")
    rerun = extract(DiTFeatureExtractor("embedded:fashion-dit", **IMAGE), images(mosaics), tmp_path, client=client,
                    shard_size=50, progress=False)
    assert (rerun.computed, rerun.already_stored) == (0, 300)


def shard_in_flight(client):
    """The address of a worker that has an extraction shard assigned and not finished, or None."""
    for address, keys in client.processing().items():
        if any(str(key).startswith("difffeat-shard-") for key in keys):
            return address
    return None


@pytest.mark.slow
def test_a_worker_killed_mid_run_changes_nothing(mosaics, reference, tmp_path):
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with distributed.Client(cluster) as client:
        pids = client.run(os.getpid)
        outcome = {}

        def run():
            outcome["result"] = extract(DiTFeatureExtractor("embedded:fashion-dit", **IMAGE), images(mosaics),
                                        tmp_path, client=client, shard_size=20, progress=False)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        victim = None
        # Wait until a shard is stored (the workers have their model and write to the store), then kill a worker
        # that the scheduler lists with a shard under way.
        while victim is None and thread.is_alive() and time.monotonic() < deadline:
            if list(tmp_path.glob("dit-b3-*/*.json")):
                victim = shard_in_flight(client)
            time.sleep(0.02)
        assert victim is not None, "no worker had a shard under way once the first shard was stored"
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(300)
        assert not thread.is_alive()
        # The scheduler's record of the worker's removal lists the shards it held unfinished: the kill landed
        # while work was under way, and those shards ran again elsewhere.
        removals = [event for _, event in client.get_events(victim) if event.get("action") == "remove-worker"]
        lost = [str(key) for event in removals for key in event["processing-tasks"]]
        assert any(key.startswith("difffeat-shard-") for key in lost), removals
    cluster.close()
    result = outcome["result"]
    assert result.failed == {} and result.computed + result.already_stored == 300
    np.testing.assert_allclose(result.features(), reference[0], rtol=1e-6, atol=1e-6)
    assert_no_duplicates_or_damage(tmp_path)


@pytest.mark.slow
def test_search_over_the_store_on_dask_matches_the_sequential_fit(mosaics, client, tmp_path):
    data, Y = mosaics.data.iloc[:120], mosaics.Y[:120]
    grid = {"features__image__block": [1, 2, 3, 4], "features__image__timestep": [0, 100, 300]}
    extract(DiTFeatureExtractor("embedded:fashion-dit", block=[1, 2, 3, 4], timestep=[0, 100, 300]),
            list(data["image"]), tmp_path, progress=False)  # extract on the "GPU" side once

    def search():
        pipe = Pipeline([
            ("features", ColumnTransformer([("image", DiTFeatureExtractor("embedded:fashion-dit", block=1,
                                                                          timestep=0, cache=str(tmp_path)), "image")])),
            ("scale", StandardScaler()),
            ("clf", OneVsRestClassifier(LogisticRegression(max_iter=200))),
        ])
        return BlockTimestepSearchCV(pipe, grid, cv=KFold(3, shuffle=True, random_state=0), scoring=map_scorer,
                                     n_jobs=2, priors=None, random_state=0)

    sequential = search().fit(data, Y)
    with joblib.parallel_config(backend="dask"):
        on_dask = search().fit(data, Y)
    assert on_dask.cv_results_["params"] == sequential.cv_results_["params"]
    np.testing.assert_allclose(on_dask.cv_results_["mean_test_score"], sequential.cv_results_["mean_test_score"],
                               rtol=1e-9)
    assert on_dask.best_params_ == sequential.best_params_


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sklearn_difffeat", "extract", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_extract_command_lists_bad_files_and_resumes(mosaics, tmp_path):
    folder = tmp_path / "jpg"
    folder.mkdir()
    for i, image in enumerate(images(mosaics)[:12]):
        Image.fromarray(image).save(folder / f"{i:02d}.jpg")
    (folder / "05.jpg").write_bytes(b"not a jpeg at all")
    store = tmp_path / "store"
    args = ["--model", "embedded:fashion-dit", "--block", "3", "-1", "--timestep", "0", "200", "--input", folder,
            "--store", store, "--shard-size", "5", "--quiet", "--failures", tmp_path / "failed.jsonl"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert "11 samples computed, 0 already stored, 1 failed" in first.stdout
    listed = [json.loads(line) for line in (tmp_path / "failed.jsonl").read_text().splitlines()]
    assert len(listed) == 1 and listed[0]["input"] == str(folder / "05.jpg") and listed[0]["position"] == 5
    assert "cannot read" in listed[0]["error"]
    assert {FeatureStore(store).count(name) for name in FeatureStore(store).namespaces()} == {11}
    second = cli(*args)
    assert second.returncode == 0 and "0 samples computed, 11 already stored, 1 failed" in second.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such-model-anywhere", "--input", "IN"], "Could not fetch 'no/such-model-anywhere'"),
    (["--model", "embedded:nope", "--input", "IN"], "Unknown embedded model 'nope'"),
    (["--model", "embedded:fashion-dit", "--input", "missing-folder"], "--input missing-folder does not exist"),
    (["--model", "embedded:fashion-dit", "--input", "IN", "--timestep", "0.5"], "integer DDPM steps"),
])
def test_extract_command_bad_arguments_give_one_line(tmp_path, args, message):
    folder = tmp_path / "IN"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    env_args = [a if a != "IN" else folder for a in args]
    done = subprocess.run([sys.executable, "-m", "sklearn_difffeat", "extract", *map(str, env_args), "--store",
                           str(tmp_path / "s"), "--quiet"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_extract_help_documents_every_flag():
    done = cli("--help")
    assert done.returncode == 0
    for flag in ("--model", "--input", "--store", "--block", "--timestep", "--text-column", "--scheduler",
                 "--local-gpus", "--failures", "--shard-size"):
        assert flag in done.stdout
