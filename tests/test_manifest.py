"""Manifests, export, and reading a filled store without loading the model."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline

from sklearn_difffeat import (
    BlockTimestepSearchCV,
    DiTFeatureExtractor,
    FeatureStore,
    TextDiffusionFeatureExtractor,
    extract,
)
from sklearn_difffeat import extraction as extraction_module
from sklearn_difffeat.export import export_features
from sklearn_difffeat.extractors import _identity, clear_backbone_cache
from sklearn_difffeat.extractors import image as image_module
from sklearn_difffeat.extractors import text as text_module
from sklearn_difffeat.manifest import ManifestWriter, extractor_from_manifest, read_manifest_info

from conftest import build_tiny_dit_pipeline

PARAMS = dict(block=[1, -1], timestep=[50, 600], num_workers=0)


def image_files(folder, n, bad=()):
    """``n`` small PNG files (random pixels, two of them identical); positions in ``bad`` are not images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        if i in bad:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    if n > 3:  # a duplicate: same content as the first file
        shutil.copy(paths[0], paths[3])
    return paths


@pytest.fixture
def model_dir(tiny_dit_dir, tmp_path):
    """A private copy of the tiny DiT folder (tests modify it)."""
    return shutil.copytree(tiny_dit_dir, tmp_path / "model")


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads (the backbone cache is emptied first, as in a new process)."""
    counts = {"image": 0, "text": 0}

    def counting(kind, load):
        def wrapped(*args, **kwargs):
            counts[kind] += 1
            return load(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(image_module, "load_dit_backbone", counting("image", image_module.load_dit_backbone))
    monkeypatch.setattr(text_module, "load_text_backbone", counting("text", text_module.load_text_backbone))
    clear_backbone_cache()
    _identity._FOUND.clear()
    yield counts
    clear_backbone_cache()


def manifest_frame(path):
    return pq.read_table(path).to_pandas()


def test_manifest_lists_every_input_in_order_with_status(model_dir, tmp_path):
    paths = image_files(tmp_path / "img", 11, bad={5})
    ext = DiTFeatureExtractor(str(model_dir), **PARAMS)
    store = tmp_path / "store"
    first = extract(ext, paths, store, shard_size=4, progress=False, manifest=tmp_path / "m1.parquet")
    table = manifest_frame(first.manifest)
    assert first.manifest == tmp_path / "m1.parquet" and not (tmp_path / "m1.parquet.parts").exists()
    assert list(table["id"]) == paths and list(table["position"]) == list(range(11))
    assert list(table["status"]) == ["computed"] * 5 + ["failed"] + ["computed"] * 5
    assert "cannot read" in table["error"][5] and table["error"].drop(5).isna().all()
    assert table["key"].isna().tolist() == [i == 5 for i in range(11)]
    keys = [k.decode() for k in first.keys]
    assert list(table["key"].drop(5)) == [k for i, k in enumerate(keys) if i != 5]
    assert table["key"][3] == table["key"][0]  # same content, same key
    layout = ext.fit().feature_layout()
    stored = FeatureStore(store).keys(next(iter(layout.namespaces.values())))
    assert set(table["key"].dropna()) == {k.decode() for k in stored}
    # a rerun computes nothing: every readable input is "stored"; the default path is under the store
    again = extract(ext, paths[::-1], store, shard_size=3, progress=False)
    assert again.manifest.parent == store / ".manifests" and again.manifest.name.startswith("extract-")
    table = manifest_frame(again.manifest)
    assert list(table["id"]) == paths[::-1]
    assert list(table["status"]) == ["stored"] * 5 + ["failed"] + ["stored"] * 5
    info = read_manifest_info(again.manifest)
    assert info["extractor"] == "DiTFeatureExtractor" and info["params"]["model"] == str(model_dir)
    assert info["params"]["block"] == [1, -1] and info["dtype"] == "float32" and info["library_version"]
    assert info["counts"] == {"computed": 0, "stored": 10, "failed": 1}
    assert extract(ext, paths, store, progress=False, manifest=False).manifest is None
    assert {FeatureStore(store).count(name) for name in FeatureStore(store).namespaces()} == {9}  # no manifests


def test_text_manifest_ids_are_positions(tmp_path):
    texts = ["a red shirt", "blue trousers and a bag", "a red shirt", "sandals"]
    ext = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", block=[1, -1], timestep=[0.0, 0.5])
    result = extract(ext, texts, tmp_path / "store", shard_size=3, progress=False)
    table = manifest_frame(result.manifest)
    assert list(table["id"]) == ["0", "1", "2", "3"] and list(table["status"]) == ["computed"] * 4
    np.testing.assert_array_equal(np.load(result.export(tmp_path / "t.npy")[0]), result.features())


def test_manifest_ids_of_a_webdataset_shard(model_dir, tmp_path):
    from sklearn_difffeat.sources import WebDatasetSource

    paths = image_files(tmp_path / "img", 5)
    tar = tmp_path / "shard-007.tar"
    with tarfile.open(tar, "w") as archive:
        for i, path in enumerate(paths):
            if i != 2:  # sample 2 has its caption but no image
                archive.add(path, arcname=f"{i:05d}.png")
            info = tarfile.TarInfo(f"{i:05d}.txt")
            info.size = 3
            archive.addfile(info, io.BytesIO(b"cap"))
    ext = DiTFeatureExtractor(str(model_dir), **PARAMS)
    result = extract(ext, WebDatasetSource(str(tar)), tmp_path / "store", shard_size=2, progress=False)
    table = manifest_frame(result.manifest)
    assert list(table["id"]) == [f"{tar}/{i:05d}" for i in range(5)]
    assert list(table["status"]) == ["computed", "computed", "failed", "stored", "computed"]  # 3 is 0's copy
    assert table["error"][2].startswith("no .jpg or .jpeg or .png or .webp member")
    features = np.load(result.export(tmp_path / "f.npy")[0])
    assert np.isnan(features[2]).all()
    np.testing.assert_allclose(np.delete(features, 2, axis=0), ext.fit().transform([p for i, p in enumerate(paths)
                                                                                     if i != 2]), atol=1e-6)


def test_parts_are_assembled_in_input_order_and_an_interrupted_run_is_replaced(model_dir, tmp_path, monkeypatch):
    paths = image_files(tmp_path / "img", 9)
    ext = DiTFeatureExtractor(str(model_dir), **PARAMS)
    target = tmp_path / "m.parquet"
    real, calls = extraction_module._run_shard, []

    def dies_on_third_shard(extractor, shard):
        calls.append(shard)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(extractor, shard)

    monkeypatch.setattr(extraction_module, "_run_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        extract(ext, paths, tmp_path / "store", shard_size=3, progress=False, manifest=target)
    assert not target.exists() and len(list((tmp_path / "m.parquet.parts").glob("part-*.parquet"))) == 2
    monkeypatch.setattr(extraction_module, "_run_shard", real)
    result = extract(ext, paths, tmp_path / "store", shard_size=4, progress=False, manifest=target)
    table = manifest_frame(target)
    assert list(table["id"]) == paths and not (tmp_path / "m.parquet.parts").exists()
    assert list(table["status"]) == ["stored"] * 6 + ["computed"] * 3
    assert pq.ParquetFile(target).metadata.num_row_groups == 3  # one per shard
    # shards completing out of order (as on Dask) still give input order
    writer = ManifestWriter(tmp_path / "o.parquet", result.extractor, tmp_path / "store", 9)
    report = result.extractor.transform_with_report(paths)[1]
    for start in (6, 0, 3):
        part = type(report)(keys=report.keys[start:start + 3], from_store=report.from_store[start:start + 3])
        writer.add(start, paths[start:start + 3], part)
    assert list(manifest_frame(writer.finish())["id"]) == paths


def test_export_equals_features_and_transform_row_for_row(model_dir, tmp_path):
    paths = image_files(tmp_path / "img", 10, bad={2})
    ext = DiTFeatureExtractor(str(model_dir), **{**PARAMS, "block": [1, 3]}, cache_depth=4)
    result = extract(ext, paths, tmp_path / "store", shard_size=4, progress=False)
    features = result.features()
    assert np.isnan(features[2]).all() and not np.isnan(np.delete(features, 2, axis=0)).any()
    npy, ids = result.export(tmp_path / "out" / "feats.npy")
    assert ids == tmp_path / "out" / "feats.ids.parquet"
    np.testing.assert_array_equal(np.load(npy), features)
    id_table = manifest_frame(ids)
    assert list(id_table.columns) == ["id", "position", "key", "status"] and list(id_table["id"]) == paths
    (single,) = export_features(result.manifest, tmp_path / "feats.parquet")  # extractor rebuilt from the manifest
    table = pq.read_table(single)
    assert table.column_names == ["id", "position", "key", "status", "features"]
    np.testing.assert_array_equal(np.stack(table.column("features").to_numpy(zero_copy_only=False)), features)
    good = [p for i, p in enumerate(paths) if i != 2]
    plain = DiTFeatureExtractor(str(model_dir), **{**PARAMS, "block": [1, 3]}).fit()
    np.testing.assert_allclose(np.delete(features, 2, axis=0), plain.transform(good), rtol=1e-6, atol=1e-6)
    # a subset, in the order asked: blocks 4 and 2 (stored through cache_depth) at step 600
    npy, _ = result.export(tmp_path / "sub.npy", blocks=[4, 2], timesteps=[600])
    subset = DiTFeatureExtractor(str(model_dir), block=[4, 2], timestep=600, num_workers=0).fit()
    np.testing.assert_allclose(np.delete(np.load(npy), 2, axis=0), subset.transform(good), rtol=1e-6, atol=1e-6)
    meta = read_manifest_info(tmp_path / "sub.ids.parquet")
    assert meta["blocks"] == [4, 2] and meta["timesteps"] == [600] and meta["width"] == plain.feature_width_
    with pytest.raises(ValueError, match=r"block \[5\] was not extracted.*blocks \[0, 1, 2, 3, 4\]"):
        result.export(tmp_path / "x.npy", blocks=[-1])
    with pytest.raises(ValueError, match=r"timestep 100 was not extracted.*\[50, 600\]"):
        result.export(tmp_path / "x.npy", timesteps=[100])
    with pytest.raises(ValueError, match=r"must end in \.npy or \.parquet"):
        result.export(tmp_path / "x.csv")
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".*tmp"))


def test_export_reads_and_writes_in_chunks(model_dir, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)
    ext = DiTFeatureExtractor(str(model_dir), **PARAMS)
    result = extract(ext, images, tmp_path / "store", shard_size=16, progress=False)
    sizes, read = [], DiTFeatureExtractor.read_stored

    def recording(self, keys, store=None):
        sizes.append(len(keys))
        return read(self, keys, store)

    monkeypatch.setattr(DiTFeatureExtractor, "read_stored", recording)
    (out,) = result.export(tmp_path / "f.parquet", chunk_rows=8)
    assert sizes == [8] * 6 + [2]
    assert pq.ParquetFile(out).metadata.num_row_groups == 7
    sizes.clear()
    npy, _ = result.export(tmp_path / "f.npy", chunk_rows=8)
    assert max(sizes) == 8 and sum(sizes) == 50
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(npy), result.features())


def test_reading_a_filled_store_loads_no_model(model_dir, tmp_path, loads):
    paths = image_files(tmp_path / "img", 8)
    store = tmp_path / "store"
    ext = DiTFeatureExtractor(str(model_dir), **PARAMS)
    result = extract(ext, paths, store, progress=False)
    texts = ["a red shirt", "blue trousers", "sandals"]
    text_ext = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", block=[1, -1], timestep=[0.0, 0.5])
    text_result = extract(text_ext, texts, store, progress=False)
    assert loads == {"image": 1, "text": 1}
    expected, text_expected = result.features(), text_result.features()
    layouts = (result.extractor.feature_layout(), text_result.extractor.feature_layout())
    clear_backbone_cache()  # as in a new process
    _identity._FOUND.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(result.features(), expected)
        np.testing.assert_array_equal(text_result.features(), text_expected)
        assert (result.extractor.fit().feature_layout(), text_result.extractor.fit().feature_layout()) == layouts
        np.testing.assert_array_equal(np.load(export_features(result.manifest, tmp_path / "f.npy")[0]), expected)
        cached = DiTFeatureExtractor(str(model_dir), cache=str(store), **PARAMS).fit()
        np.testing.assert_array_equal(cached.transform(paths), expected)  # only hashes the files
    assert loads == {"image": 1, "text": 1}
    # a search whose candidates are all stored
    grid = {"block": [1, -1], "timestep": [50, 600]}
    pipe = Pipeline([("features", DiTFeatureExtractor(str(model_dir), block=1, timestep=50, cache=str(store),
                                                      num_workers=0)),
                     ("clf", LogisticRegression(max_iter=50))])
    search = BlockTimestepSearchCV(pipe, {f"features__{k}": v for k, v in grid.items()}, cv=KFold(2), priors=None,
                                  error_score="raise")
    search.fit(paths, [0, 1] * 4)
    assert loads == {"image": 1, "text": 1} and len(search.cv_results_["params"]) >= 2
    # an extractor without a cache, or one asking for features not stored, still loads the model
    DiTFeatureExtractor(str(model_dir), **PARAMS).fit()
    assert loads["image"] == 2


def test_a_changed_model_folder_is_loaded_with_one_warning(model_dir, tmp_path, loads):
    paths = image_files(tmp_path / "img", 6)
    store = tmp_path / "store"
    result = extract(DiTFeatureExtractor(str(model_dir), **PARAMS), paths, store, progress=False)
    expected = result.features()
    config = model_dir / "transformer" / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))  # touched
    clear_backbone_cache()
    with pytest.warns(UserWarning, match=r"differs from the one whose features.*transformer/config.json"):
        np.testing.assert_array_equal(result.features(), expected)  # same weights: same namespaces
    assert loads["image"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result.features()  # the touched folder is recorded now: once is enough
    clear_backbone_cache()
    _identity._FOUND.clear()
    result.features()
    assert loads["image"] == 2
    # other weights under the same path: new namespaces, the new model's features, one warning
    shutil.rmtree(model_dir)
    build_tiny_dit_pipeline(model_dir, seed=7)
    clear_backbone_cache()
    cached = DiTFeatureExtractor(str(model_dir), cache=str(store), **PARAMS)
    with pytest.warns(UserWarning, match="differs from the one whose features") as record:
        got = cached.fit().transform(paths)
        cached.transform(paths)
    assert len([w for w in record if "differs" in str(w.message)]) == 1
    fresh = DiTFeatureExtractor(str(model_dir), **PARAMS).fit().transform(paths)
    np.testing.assert_allclose(got, fresh, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, expected)


def test_a_record_that_disagrees_with_the_weights_gives_way_to_them(model_dir, tmp_path, loads):
    store = FeatureStore(tmp_path / "store")
    identity = _identity.ModelIdentity(store, "DiTFeatureExtractor", str(model_dir), "float32")
    true = DiTFeatureExtractor(str(model_dir), **PARAMS).fit()
    wrong = _identity.ResolvedModel.of(true.get_backbone())
    wrong = type(wrong)(**{**wrong.__dict__, "fingerprint": "not-these-weights"})
    store.record_identity(identity._identity(identity.state), wrong.as_record())
    clear_backbone_cache()
    images = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    cached = DiTFeatureExtractor(str(model_dir), cache=str(tmp_path / "store"), **PARAMS).fit()
    assert loads["image"] == 1  # fit believed the record; computing needs the weights, which correct it
    features, report = cached.transform_with_report(images)
    np.testing.assert_allclose(features, true.transform(images), rtol=1e-6, atol=1e-6)
    _identity._FOUND.clear()
    assert identity.lookup().fingerprint == true.get_backbone().fingerprint
    # the features went to the namespaces of the true weights
    again = DiTFeatureExtractor(str(model_dir), cache=str(tmp_path / "store"), **PARAMS).fit()
    np.testing.assert_array_equal(again.read_stored(report.keys), features)


def test_models_in_memory_and_uncached_hub_ids_use_no_record(tiny_dit_dir, tmp_path, monkeypatch):
    from sklearn_difffeat.backbones.dit import load_dit_backbone

    backbone = load_dit_backbone(str(tiny_dit_dir))
    modules = {"transformer": backbone.transformer, "scheduler": backbone.scheduler, "vae": backbone.vae}
    ext = DiTFeatureExtractor(modules, cache=str(tmp_path / "store"), **PARAMS).fit()
    ext.transform(np.zeros((2, 16, 16, 3), np.uint8))
    assert not (tmp_path / "store" / ".identities").exists()
    # a hub id is named by the snapshot its local cache resolves to; absent from the cache, it has no identity
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    assert _identity.model_state("someone/tiny-dit") is None
    repo = hub / "models--someone--tiny-dit"
    shutil.copytree(tiny_dit_dir, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert _identity.model_state("someone/tiny-dit") == {"revision": "a" * 40}
    shutil.copytree(tiny_dit_dir, repo / "snapshots" / ("b" * 40))
    (repo / "refs" / "main").write_text("b" * 40)
    assert _identity.model_state("someone/tiny-dit") == {"revision": "b" * 40}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sklearn_difffeat", *map(str, args)], capture_output=True,
                          text=True)


def test_extract_and_export_commands(model_dir, tmp_path):
    paths = image_files(tmp_path / "img", 7, bad={1})
    store, manifest = tmp_path / "store", tmp_path / "run.parquet"
    done = run_cli("extract", "--model", model_dir, "--block", "1", "-1", "--timestep", "50", "600", "--input",
                   tmp_path / "img", "--store", store, "--manifest", manifest, "--quiet", "--num-workers", "0")
    assert done.returncode == 0, done.stderr
    assert f"manifest: {manifest}" in done.stdout
    done = run_cli("export", "--manifest", manifest, "--output", tmp_path / "f.parquet", "--block", "-1",
                   "--timestep", "600", "--quiet")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "f.parquet")
    assert table.column("id").to_pylist() == paths and table.column("status").to_pylist()[1] == "failed"
    values = np.stack(table.column("features").to_numpy(zero_copy_only=False))
    reference = DiTFeatureExtractor(str(model_dir), block=-1, timestep=600, num_workers=0).fit()
    assert np.isnan(values[1]).all()
    np.testing.assert_allclose(np.delete(values, 1, axis=0), reference.transform(paths[:1] + paths[2:]), rtol=1e-6,
                               atol=1e-6)
    done = run_cli("export", "--manifest", manifest, "--output", tmp_path / "g.npy", "--block", "3")
    assert done.returncode == 1 and not (tmp_path / "g.npy").exists()
    assert done.stderr.strip().splitlines() == [
        "sklearn-difffeat export: error: block [3] was not extracted: the manifest's extractor extracted blocks "
        "[1, 5] (0 = embedding; negatives count from 5)."]


def test_rebuilt_extractor_reads_in_the_recorded_dtype(model_dir, tmp_path):
    result = extract(DiTFeatureExtractor(str(model_dir), dtype="bfloat16", **PARAMS), image_files(tmp_path, 4),
                     tmp_path / "store", progress=False)
    info = read_manifest_info(result.manifest)
    assert info["dtype"] == "bfloat16" and info["params"]["dtype"] == "bfloat16"
    rebuilt = extractor_from_manifest({**info, "params": {**info["params"], "dtype": "auto"}}, tmp_path / "store")
    assert rebuilt.dtype == "bfloat16" and rebuilt.device == "cpu"
    np.testing.assert_array_equal(rebuilt.fit().read_stored(result.keys), result.features())


@pytest.mark.slow
def test_manifest_in_input_order_on_a_dask_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    paths = image_files(tmp_path / "img", 24, bad={7})
    ext = DiTFeatureExtractor("embedded:fashion-dit", block=[2, -1], timestep=[0, 200], num_workers=0)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with cluster, distributed.Client(cluster) as client:
        result = extract(ext, paths, tmp_path / "store", client=client, shard_size=5, progress=False)
    table = manifest_frame(result.manifest)
    assert list(table["id"]) == paths and list(table["position"]) == list(range(24))
    assert list(table["status"]) == ["computed"] * 7 + ["failed"] + ["computed"] * 16
    assert list(table["key"].drop(7)) == [k.decode() for i, k in enumerate(result.keys) if i != 7]
    np.testing.assert_array_equal(np.load(result.export(tmp_path / "f.npy")[0]), result.features())
