"""The counter-based noise against a pure-Python reference and against the laws it must follow."""

import numpy as np
import pytest
import torch
from scipy import stats

from sklearn_difffeat.extractors._noise import key_words, mix32, normals, sample_seeds, uniforms


def lowbias32(x: int) -> int:
    """The published lowbias32 finaliser, in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def keys(n, offset=0):
    import hashlib

    return np.array([hashlib.sha256(str(i + offset).encode()).hexdigest()[:32].encode() for i in range(n)])


def test_int32_words_match_the_unsigned_reference_bit_for_bit():
    words = np.random.default_rng(0).integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32)
    words[:4] = [0, 1, 2**31, 2**32 - 1]  # the sign bit and the edges
    got = mix32(torch.from_numpy(words.view(np.int32))).numpy().view(np.uint32)
    assert got.tolist() == [lowbias32(int(w)) for w in words]


def test_key_words_read_the_key_bytes():
    key = np.array([b"000102030405060708090a0b0c0d0e0f"])
    expected = np.frombuffer(bytes(range(16)), dtype="<i4")
    assert key_words(key).tolist() == [expected.tolist()]


def test_normals_are_standard_normal_and_independent():
    z = normals(sample_seeds(key_words(keys(64)), 0, 0), (3, 16, 16)).reshape(64, -1).numpy()
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    corr = np.corrcoef(z)  # between samples: no shared stream
    assert np.abs(corr[~np.eye(64, dtype=bool)]).max() < 5 / np.sqrt(z.shape[1])
    lagged = np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]  # within a sample: no serial correlation
    assert abs(lagged) < 0.02


def test_uniforms_are_uniform_on_the_24_bit_grid():
    u = uniforms(sample_seeds(key_words(keys(32)), 7, 0), 2000).numpy()
    assert u.min() >= 0 and u.max() < 1
    np.testing.assert_array_equal(u * 2**24, np.round(u * 2**24))
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3


def test_a_sample_gets_its_numbers_whatever_its_batch():
    words = key_words(keys(10))
    alone = normals(sample_seeds(words[3:4], 0, 1), (4, 8, 8))
    in_batch = normals(sample_seeds(words, 0, 1), (4, 8, 8))[3:4]
    torch.testing.assert_close(alone, in_batch, rtol=0, atol=0)


@pytest.mark.parametrize("change", [dict(random_state=1), dict(draw=1), dict(offset=1)])
def test_seed_draw_and_content_each_change_the_numbers(change):
    base = normals(sample_seeds(key_words(keys(4)), 0, 0), (64,))
    other = normals(sample_seeds(key_words(keys(4, change.get("offset", 0))), change.get("random_state", 0),
                                 change.get("draw", 0)), (64,))
    assert (base != other).float().mean() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_gpu_draw_the_same_numbers():
    words = key_words(keys(16))
    cpu = normals(sample_seeds(words, 0, 0), (4, 32, 32))
    gpu = normals(sample_seeds(words.cuda(), 0, 0), (4, 32, 32)).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-6)
    assert torch.equal(uniforms(sample_seeds(words, 0, 0), 100), uniforms(sample_seeds(words.cuda(), 0, 0), 100).cpu())
