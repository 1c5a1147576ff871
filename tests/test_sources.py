"""Streamed inputs: encoded image bytes, webdataset tar shards, parquet columns and Hugging Face datasets give the
same samples (keys, noise, features) as the same images as files, read a shard at a time, with bad samples listed
by id and never a crash."""

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sklearn_difffeat import DiTFeatureExtractor, FeatureStore, TextDiffusionFeatureExtractor, extract
from sklearn_difffeat.__main__ import main
from sklearn_difffeat.datasets import load_fashion_mosaics
from sklearn_difffeat.sources import (
    HuggingFaceColumn,
    HuggingFaceSource,
    ParquetSource,
    WebDatasetSource,
    index_tar,
    split_key,
)

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

N = 10
IMAGE = dict(block=[3], timestep=[0, 200], num_workers=0)
TEXT = dict(block=[-1], timestep=[0.0], num_workers=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """N JPEG files (mosaics, 56x56), their bytes and captions, and the features of the files (the reference)."""
    folder = tmp_path_factory.mktemp("files")
    mosaics = load_fashion_mosaics(N, split="test", random_state=3)
    paths = []
    for i, image in enumerate(mosaics.data["image"]):
        paths.append(str(folder / f"{i:03d}.jpg"))
        Image.fromarray(image).save(paths[-1], quality=90)
    blobs = [Path(p).read_bytes() for p in paths]
    texts = list(mosaics.data["text"])
    features, report = image_extractor().transform_with_report(paths)
    text_features = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", **TEXT).fit().transform(texts)
    return dict(paths=paths, blobs=blobs, texts=texts, features=features, keys=report.keys,
                text_features=text_features)


def image_extractor(**params):
    return DiTFeatureExtractor("embedded:fashion-dit", **{**IMAGE, **params}).fit()


def file_key(data: bytes) -> bytes:  # the key of an image file: a hash of its bytes (docs/store.md)
    return hashlib.sha256(b"file:" + data).hexdigest()[:32].encode()


def write_tar(path, members):
    """A tar of (name, bytes) members in order, as webdataset's writer (Python's tarfile) makes it."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def img2dataset_members(corpus, indices, drop=(), replace=None):
    """img2dataset's layout: per key, .jpg, .txt and .json (caption and url) members; ``drop`` leaves members
    out, ``replace`` swaps a member's bytes."""
    members = []
    for i in indices:
        key = f"{i:09d}"
        parts = {"jpg": corpus["blobs"][i], "txt": corpus["texts"][i].encode(),
                 "json": json.dumps({"caption": corpus["texts"][i], "url": f"http://x/{i}.jpg"}).encode()}
        parts.update((ext, data) for (k, ext), data in (replace or {}).items() if k == i)
        members += [(f"{key}.{ext}", data) for ext, data in parts.items() if (i, ext) not in drop]
    return members


def test_encoded_bytes_and_hf_dicts_are_the_files(corpus):
    ext = image_extractor()
    blobs, paths = corpus["blobs"], corpus["paths"]
    forms = [blobs, [bytearray(b) for b in blobs], [memoryview(b) for b in blobs],
             [{"bytes": b, "path": None} for b in blobs], [{"bytes": None, "path": p} for p in paths]]
    for X in forms:
        features, report = ext.transform_with_report(X)
        np.testing.assert_array_equal(report.keys, corpus["keys"])
        np.testing.assert_array_equal(features, corpus["features"])  # same key, same noise, same pixels
    assert corpus["keys"][0] == file_key(blobs[0])
    bad = [blobs[0], b"\xff\xd8 not a jpeg", blobs[2]]
    with pytest.raises(ValueError, match=r"Image 1: cannot read the 13 image bytes given as an image \(not an image"):
        ext.transform(bad)
    features, report = ext.transform_with_report(bad, on_error="record")
    assert list(report.failed) == [1] and np.isnan(features[1]).all() and np.isfinite(features[[0, 2]]).all()
    with pytest.raises(ValueError, match="Image 1: an image dict needs 'bytes' or 'path'"):
        ext.transform([blobs[0], {"bytes": None, "path": None}])
    with pytest.raises(ValueError, match="Image 1: expected a PIL image, an array, a file path or encoded"):
        ext.transform([blobs[0], 3])


def test_webdataset_shards_extract_the_good_samples_and_list_the_bad(corpus, tmp_path):
    corrupt = (2, "jpg")
    members = img2dataset_members(corpus, range(N), drop={(5, "txt"), (7, "jpg")},
                                  replace={corrupt: b"\xff\xd8 broken"})
    tar = write_tar(tmp_path / "shard-00003.tar", members)
    source = WebDatasetSource(tar)
    assert len(source) == N
    result = extract(image_extractor(), source, tmp_path / "store", shard_size=4, progress=False)
    assert list(result.ids) == [f"{tar}/{i:09d}" for i in range(N)]
    assert sorted(result.failed) == [2, 7]
    assert result.failed[2].startswith(f"{tar}/000000002: ") and "image bytes given as an image" in result.failed[2]
    assert result.failed[7] == f"{tar}/000000007: no .jpg or .jpeg or .png or .webp member (it has: .txt, .json)"
    good = [i for i in range(N) if i not in (2, 7)]
    assert result.computed == len(good)
    np.testing.assert_array_equal(result.keys[good], corpus["keys"][good])  # the files' keys: one sample
    np.testing.assert_allclose(result.features()[good], corpus["features"][good], atol=1e-6)
    assert np.isnan(result.features()[[2, 7]]).all()
    again = extract(image_extractor(), WebDatasetSource(tar), tmp_path / "store", shard_size=3, progress=False)
    assert (again.computed, again.already_stored, sorted(again.failed)) == (0, len(good), [2, 7])
    # texts of the same shard: the sample missing its .txt is listed; json:caption reads the same captions
    text = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", **TEXT)
    for key, missing in (("txt", [5]), ("json:caption", [])):
        texts = extract(text, WebDatasetSource(tar, text_key=key), tmp_path / "text", shard_size=4, progress=False)
        assert sorted(texts.failed) == missing
        kept = [i for i in range(N) if i not in missing]
        np.testing.assert_allclose(texts.features()[kept], corpus["text_features"][kept], atol=1e-5)
        if missing:
            assert texts.failed[5] == f"{tar}/000000005: no .txt member (it has: .jpg, .json)"


def test_text_members_that_are_not_texts_are_listed(corpus, tmp_path):
    members = [("a.txt", b"  "), ("b.txt", b"\xff\xfe"), ("c.json", b"{}"), ("d.json", b"[1"), ("e.txt", b"ok")]
    tar = write_tar(tmp_path / "t.tar", members)
    inputs = WebDatasetSource(tar, text_key="txt").shards(10)[0].read()
    assert inputs.items[4] == "ok" and set(inputs.failed) == {0, 1, 2, 3}
    assert "empty text" in inputs.failed[0] and "unreadable .txt member" in inputs.failed[1]
    captions = WebDatasetSource(tar, text_key="json:caption").shards(10)[0].read()
    assert "has no field 'caption'" in captions.failed[2] and "unreadable .json member" in captions.failed[3]
    with pytest.raises(ValueError, match="json:FIELD"):
        WebDatasetSource(tar, text_key="txt:caption")


def test_a_truncated_tar_lists_what_it_could_not_read(corpus, tmp_path):
    whole = write_tar(tmp_path / "whole.tar", img2dataset_members(corpus, range(6)))
    data = Path(whole).read_bytes()
    index = index_tar(whole, 100)
    assert (index.count, index.problem) == (6, None)
    # cut inside sample 4's image: samples 0-3 are extracted, 4 and the rest of the tar are listed
    with tarfile.open(whole) as tar:
        cut_member = tar.getmember("000000004.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:cut_member.offset_data + 100])
    result = extract(image_extractor(), WebDatasetSource(str(cut)), tmp_path / "store", shard_size=2,
                     progress=False)
    assert list(result.ids) == [f"{cut}/{i:09d}" for i in range(5)] + [str(cut)]
    assert sorted(result.failed) == [4, 5]
    assert "cannot read member 000000004.jpg" in result.failed[4]
    assert result.failed[5].startswith(f"{cut}: the tar truncated at byte {cut_member.offset_data + 100}")
    np.testing.assert_allclose(result.features()[:4], corpus["features"][:4], atol=1e-6)
    # cut between two samples (no member is short, the end-of-archive block is missing)
    with tarfile.open(whole) as tar:
        boundary = tar.getmember("000000003.jpg").offset
    (tmp_path / "boundary.tar").write_bytes(data[:boundary + 200])
    inputs = WebDatasetSource(str(tmp_path / "boundary.tar")).shards(10)[0].read()
    assert len(inputs.ids) == 4 and list(inputs.failed) == [3] and inputs.ids[3] == str(tmp_path / "boundary.tar")
    assert f"breaks off at byte {boundary}" in inputs.failed[3] and "after sample 000000002" in inputs.failed[3]
    # not a tar at all: one listed input, no crash
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    junk = extract(image_extractor(), WebDatasetSource([whole, str(tmp_path / "junk.tar")]), tmp_path / "store",
                   progress=False)
    assert (junk.computed, junk.already_stored, list(junk.failed)) == (2, 4, [6])  # 0-3 stored above
    assert "unreadable at its start" in junk.failed[6]


def test_brace_patterns_folders_and_offsets(corpus, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "00000.tar", img2dataset_members(corpus, range(0, 7)))
    write_tar(folder / "00001.tar", img2dataset_members(corpus, range(7, N)))
    by_pattern = WebDatasetSource(str(folder / "{00000..00001}.tar"))
    by_folder = WebDatasetSource(folder)
    shards = by_pattern.shards(3)
    assert [(s.start, s.size) for s in shards] == [(0, 3), (3, 3), (6, 1), (7, 3)]  # shards never span two tars
    assert all(len(pickle.dumps(s)) < 600 for s in shards)  # a task carries a path and an offset, not images
    ids = [i for s in shards for i in s.ids()]
    assert ids == [i for s in by_folder.shards(4) for i in s.read().ids]
    assert ids == [f"{folder}/00000.tar/{i:09d}" for i in range(7)] + [f"{folder}/00001.tar/{i:09d}" for i in
                                                                        range(7, N)]
    items = [item for s in shards for item in s.read().items]
    assert items == corpus["blobs"]
    with pytest.raises(ValueError, match=r"Tar shards not found: .*00002.tar"):
        WebDatasetSource(str(folder / "{00000..00002}.tar"))
    assert split_key("a/b.c/000123.seg.png") == ("a/b.c/000123", "seg.png") and split_key("a/README") is None


@pytest.fixture(scope="module")
def hf_dataset(corpus):
    blobs = [{"bytes": b, "path": None} for b in corpus["blobs"]]
    return datasets.Dataset.from_dict({"image": blobs, "text": corpus["texts"]}).cast_column("image", datasets.Image())


def test_hf_datasets_and_parquet_bytes_are_the_files(corpus, hf_dataset, tmp_path):
    ext = image_extractor()
    features, report = ext.transform_with_report(hf_dataset["image"])
    np.testing.assert_array_equal(report.keys, corpus["keys"])
    np.testing.assert_array_equal(features, corpus["features"])
    np.testing.assert_array_equal(ext.transform(hf_dataset.select_columns(["image"])), corpus["features"])
    stored = extract(ext, hf_dataset["image"], tmp_path / "store", shard_size=4, progress=False)
    assert stored.computed == N and list(stored.ids) == [str(i) for i in range(N)]
    np.testing.assert_array_equal(stored.keys, corpus["keys"])
    # the same rows on disk, through parquet: binary, and the HF {bytes, path} struct, in row groups of 3
    pq.write_table(pa.table({"image": corpus["blobs"]}), tmp_path / "binary.parquet", row_group_size=3)
    hf_dataset.to_parquet(str(tmp_path / "struct.parquet"), batch_size=3)
    for name in ("binary", "struct"):
        source = ParquetSource(tmp_path / f"{name}.parquet", "image")
        result = extract(ext, source, tmp_path / "store", shard_size=4, progress=False)
        assert (result.computed, result.already_stored) == (0, N)  # one sample per image, whatever the form
        np.testing.assert_array_equal(result.keys, corpus["keys"])
        assert result.ids[5] == f"{tmp_path / name}.parquet#5"
        np.testing.assert_array_equal(result.features(), corpus["features"])
    text = TextDiffusionFeatureExtractor("embedded:fashion-mdlm", **TEXT)
    texts = extract(text, HuggingFaceSource(hf_dataset, "text", "texts"), tmp_path / "store", shard_size=4,
                    progress=False)
    np.testing.assert_allclose(texts.features(), corpus["text_features"], atol=1e-5)
    with pytest.raises(ValueError, match=r"holds images .* but the extractor takes texts"):
        extract(text, hf_dataset["image"], tmp_path / "store", progress=False)
    with pytest.raises(ValueError, match=r"columns \['image', 'text'\]: name the one"):
        ext.transform(hf_dataset)


def test_parquet_nulls_paths_and_texts(corpus, tmp_path):
    table = pa.table({"image": [corpus["blobs"][0], None, corpus["blobs"][2]],
                      "path": ["000.jpg", "001.jpg", corpus["paths"][2]], "caption": ["a dress", "  ", None]})
    pq.write_table(table, tmp_path / "t.parquet")
    blobs = ParquetSource(tmp_path / "t.parquet", "image").shards(10)[0].read()
    assert blobs.failed == {1: "no image (a null value)"} and blobs.items[0] == corpus["blobs"][0]
    paths = ParquetSource(tmp_path / "t.parquet", "path", "images").shards(2)
    assert paths[0].read().ids == [str(tmp_path / "000.jpg"), str(tmp_path / "001.jpg")]  # relative to the table
    assert paths[1].read().items == [corpus["paths"][2]]
    captions = ParquetSource(tmp_path / "t.parquet", "caption", "texts").shards(10)[0].read()
    assert captions.failed == {1: "empty text", 2: "missing text (None/NaN)"}
    with pytest.raises(ValueError, match="has no column 'img'; its columns are"):
        ParquetSource(tmp_path / "t.parquet", "img")
    with pytest.raises(ValueError, match="holds strings: pass modality"):
        ParquetSource(tmp_path / "t.parquet", "caption")


def test_hf_columns_are_read_in_chunks_never_whole(corpus, monkeypatch, tmp_path):
    n = 60
    blobs = [{"bytes": corpus["blobs"][i % N], "path": None} for i in range(n)]
    big = datasets.Dataset.from_dict({"image": blobs}).cast_column("image", datasets.Image())
    reads = []
    original = datasets.Dataset.__getitem__

    def recording(self, key):
        reads.append(key)
        return original(self, key)

    def iterate_all(self):
        raise AssertionError("the whole dataset was iterated")

    monkeypatch.setattr(datasets.Dataset, "__getitem__", recording)
    monkeypatch.setattr(datasets.Dataset, "__iter__", iterate_all)
    monkeypatch.setattr(HuggingFaceColumn, "chunk_rows", 8)
    ext = image_extractor(batch_size=5)
    features = ext.transform(big["image"])
    np.testing.assert_allclose(features[:N], corpus["features"], atol=1e-6)  # another batch size: float rounding
    sizes = [len(range(n)[key]) if isinstance(key, slice) else 1 for key in reads]
    assert max(sizes) == 8 and sum(sizes) <= 2 * n  # keys, then decoding: chunk by chunk, never all 60 rows
    reads.clear()
    extract(image_extractor(), big["image"], tmp_path / "store", shard_size=16, progress=False)
    sizes = [len(range(n)[key]) if isinstance(key, slice) else 1 for key in reads]
    assert max(sizes) <= 16 and sum(sizes) <= 3 * n


def test_hf_shards_pickle_small_from_disk_and_with_rows_from_memory(hf_dataset, tmp_path):
    in_memory = HuggingFaceSource(hf_dataset["image"]).shards(4)
    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    on_disk = HuggingFaceSource(datasets.load_from_disk(str(tmp_path / "saved"))["image"]).shards(4)
    assert all(len(pickle.dumps(s)) < 4000 for s in on_disk)  # file names, not images
    for a, b in zip(in_memory, on_disk):
        copy = pickle.loads(pickle.dumps(a))  # carries its own rows only, read here
        assert copy.column is None and copy.read() == b.read() == pickle.loads(pickle.dumps(b)).read()
    total = sum(len(pickle.dumps(s)) for s in in_memory)
    assert total < 2 * len(pickle.dumps(hf_dataset))


def run_cli(capsys, *args):
    code = main(["extract", "--model", "embedded:fashion-dit", "--block", "3", "--timestep", "0", "200",
                 "--num-workers", "0", "--quiet", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_reads_tar_shards_parquet_bytes_and_saved_datasets(corpus, hf_dataset, tmp_path, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "00000.tar", img2dataset_members(corpus, range(0, 5), replace={(1, "jpg"): b"junk"}))
    write_tar(folder / "00001.tar", img2dataset_members(corpus, range(5, N), drop={(6, "jpg")}))
    store, failures = tmp_path / "store", tmp_path / "failed.jsonl"
    for spec in (folder / "{00000..00001}.tar", folder):
        code, out, err = run_cli(capsys, "--input", spec, "--store", store, "--shard-size", "3", "--failures",
                                 failures)
        assert code == 0, err
        listed = [json.loads(line)["input"] for line in failures.read_text().splitlines()]
        assert listed == [f"{folder}/00000.tar/000000001", f"{folder}/00001.tar/000000006"]
    assert "0 samples computed, 8 already stored, 2 failed" in out
    hf_dataset.to_parquet(str(tmp_path / "table.parquet"))
    code, out, err = run_cli(capsys, "--input", tmp_path / "table.parquet", "--store", store)
    assert code == 0 and "2 samples computed, 8 already stored, 0 failed" in out, err  # the two bad in the tars
    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    code, out, err = run_cli(capsys, "--input", f"hf:{tmp_path / 'saved'}", "--store", store)
    assert code == 0 and "0 samples computed, 10 already stored, 0 failed" in out, err
    assert FeatureStore(store).count(next(n for n in FeatureStore(store).namespaces() if n.startswith("dit-b3"))) == N
    main(["extract", "--model", "embedded:fashion-mdlm", "--input", str(folder), "--text-key", "json:caption",
          "--store", str(tmp_path / "text"), "--num-workers", "0", "--quiet"])
    assert "10 samples computed, 0 already stored, 0 failed" in capsys.readouterr().out
    for args, message in ((["--input", folder, "--text-column", "x"], "not --text-column"),
                          (["--input", tmp_path / "table.parquet", "--text-key", "txt"], "apply to webdataset"),
                          (["--input", folder / "{00000..00009}.tar"], "Tar shards not found")):
        code, out, err = run_cli(capsys, *args, "--store", store)
        assert code != 0 and message in err


@pytest.mark.slow
def test_dask_workers_read_their_own_shards(corpus, hf_dataset, tmp_path):
    distributed = pytest.importorskip("distributed")
    tar = write_tar(tmp_path / "s.tar", img2dataset_members(corpus, range(N), replace={(4, "jpg"): b"junk"}))
    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    on_disk = datasets.load_from_disk(str(tmp_path / "saved"))
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0")
    with distributed.Client(cluster) as client:
        wds = extract(DiTFeatureExtractor("embedded:fashion-dit", **IMAGE), WebDatasetSource(tar), tmp_path / "a",
                      client=client, shard_size=3, progress=False)
        hf = extract(DiTFeatureExtractor("embedded:fashion-dit", **IMAGE), on_disk["image"], tmp_path / "b",
                     client=client, shard_size=4, progress=False)
    cluster.close()
    assert list(wds.failed) == [4] and wds.failed[4].startswith(f"{tar}/000000004: ")
    good = [i for i in range(N) if i != 4]
    np.testing.assert_allclose(wds.features()[good], corpus["features"][good], atol=1e-6)
    assert (hf.computed, hf.failed) == (N, {})
    np.testing.assert_allclose(hf.features(), corpus["features"], atol=1e-6)
