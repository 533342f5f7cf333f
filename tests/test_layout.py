"""layout.py: the packed weight panels, written once to the cache and memory-mapped after."""

import shutil
import warnings

import numpy as np
import pytest

from nprerank.config import ModelConfig
from nprerank.kernels.fp32 import PANEL
from nprerank.layout import PRODUCTS, gemm_weights
from nprerank.weights import load_weights


def load(folder):
    config = ModelConfig.from_json(folder / "config.json")
    return load_weights(folder / "model.safetensors", config)


def unpack(panels, bias):
    """panels [P, in, PANEL] and bias [P * PANEL] -> the weight [P * PANEL, in] and bias they hold."""
    count, inp, width = panels.shape
    assert width == PANEL and bias.shape == (count * PANEL,)
    return panels.transpose(0, 2, 1).reshape(count * PANEL, inp), bias


def assert_packed(matrices, weights):
    """Each layer's panels hold its weights and biases, each Linear padded with zeros to whole panels."""
    for layer, layer_matrices in zip(weights.layers, matrices, strict=True):
        for name, fields in PRODUCTS.items():
            panels, bias = getattr(layer_matrices, name), getattr(layer_matrices, f"{name}_bias")
            assert panels.dtype == bias.dtype == np.float32 and panels.flags.c_contiguous
            weight, bias = unpack(panels, bias)
            start = 0
            for field in fields:
                linear = getattr(layer, field)
                out = linear.weight.shape[0]
                np.testing.assert_array_equal(weight[start : start + out], linear.weight)
                np.testing.assert_array_equal(bias[start : start + out], linear.bias)
                padded = -(-out // PANEL) * PANEL
                assert not weight[start + out : start + padded].any() and not bias[start + out : start + padded].any()
                start += padded
            assert start == len(weight)


def test_written_once_then_mapped(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path))
    weights = load(tiny_model)
    matrices = gemm_weights(weights)
    files = list(tmp_path.glob("layout-*.safetensors"))
    assert len(files) == 1, files
    assert not list(tmp_path.glob("*.tmp")), "the temporary file was left behind"
    assert_packed(matrices, weights)
    assert not matrices[0].qkv.flags.writeable, "expected a read-only view of the memory-mapped file"
    written = files[0].stat().st_mtime_ns
    assert_packed(gemm_weights(load(tiny_model)), weights)
    assert files[0].stat().st_mtime_ns == written, "a second load wrote the file again"


def test_changed_checkpoint_gets_a_new_layout(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    gemm_weights(load(folder))
    data = bytearray((folder / "model.safetensors").read_bytes())
    weights = load(folder)
    offset = data.index(weights.layers[0].query.weight.tobytes())  # change one weight of layer 0's query
    data[offset : offset + 4] = np.float32(123.0).tobytes()
    (folder / "model.safetensors").write_bytes(bytes(data))
    changed = load(folder)
    matrices = gemm_weights(changed)
    assert matrices[0].qkv[0, 0, 0] == 123.0  # query's [out 0, in 0]
    assert_packed(matrices, changed)
    assert len(list((tmp_path / "cache").glob("layout-*.safetensors"))) == 1, "the stale layout was kept"


def test_damaged_layout_is_written_again(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path))
    weights = load(tiny_model)
    gemm_weights(weights)
    (path,) = tmp_path.glob("layout-*.safetensors")
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    assert_packed(gemm_weights(weights), weights)


@pytest.mark.parametrize("where", [0.0, 0.37, 1.0])  # the first, a middle and the last byte of the data
def test_one_changed_byte_in_the_layout_data_is_caught(tiny_model, tmp_path, monkeypatch, where):
    """A byte of the cached panels changed after the file was written (a bad disk, a stray write):
    the checksum catches it, the file is written again with a warning naming it, and the
    scores are right (before, the damage gave NaN or wrong scores on every later load)."""
    from nprerank import Reranker

    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path))
    pairs = [("what do pandas eat", "bamboo, mostly"), ("a query", "an unrelated passage")]
    want = Reranker.from_pretrained(tiny_model).compute_score(pairs)
    (path,) = tmp_path.glob("layout-*.safetensors")
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    offset = start + int(where * (len(data) - 1 - start))
    data[offset] ^= 0x40  # flips an exponent bit when it lands on a float's top byte
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"{path.name}.*damaged"):
        got = Reranker.from_pretrained(tiny_model).compute_score(pairs)
    assert got == want
    assert_packed(gemm_weights(load(tiny_model)), load(tiny_model))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the file written again passes its checksum
        gemm_weights(load(tiny_model))


def test_checksum_covers_every_byte():
    """layout._checksum: any single changed byte, blocks swapped, a tail shorter than a block."""
    from nprerank.layout import CHECKSUM_BLOCK, _checksum

    rng = np.random.default_rng(0)
    data = bytearray(rng.integers(0, 256, 3 * CHECKSUM_BLOCK + 100, dtype=np.uint8).tobytes())
    reference = _checksum(bytes(data), 8)
    for offset in (8, 9, CHECKSUM_BLOCK + 3, len(data) - 1):
        for flip in (1, 0x80):
            changed = bytearray(data)
            changed[offset] ^= flip
            assert _checksum(bytes(changed), 8) != reference, (offset, flip)
    swapped = (
        data[:8]
        + data[8 + CHECKSUM_BLOCK : 8 + 2 * CHECKSUM_BLOCK]
        + data[8 : 8 + CHECKSUM_BLOCK]
        + data[8 + 2 * CHECKSUM_BLOCK :]
    )
    assert _checksum(bytes(swapped), 8) != reference
    assert _checksum(bytes(data[:8]) + bytes(len(data) - 8), 8) != reference  # zeroed


def test_unwritable_cache_keeps_copies_in_memory(tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NPRERANK_CACHE", str(blocker / "cache"))
    weights = load(tiny_model)
    with pytest.warns(UserWarning, match="cannot use the weight layout cache"):
        matrices = gemm_weights(weights)
    assert_packed(matrices, weights)


def test_weights_without_a_file_are_copied_in_memory(tiny_model, tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path))
    weights = dataclasses.replace(load(tiny_model), source=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_packed(gemm_weights(weights), weights)
    assert not list(tmp_path.iterdir())


def test_garbage_layout_file_is_replaced(tiny_model, tmp_path, monkeypatch):
    """A file that is not safetensors at all (a header size of 2^64 - 1) is written over, not trusted."""
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path))
    weights = load(tiny_model)
    gemm_weights(weights)
    (path,) = tmp_path.glob("layout-*.safetensors")
    path.write_bytes(b"\xff" * 64)
    assert_packed(gemm_weights(weights), weights)


def test_checkpoint_copied_over_with_its_times_gets_a_new_layout(tiny_model, tmp_path, monkeypatch):
    """cp -p keeps size and mtime; the inode and change time still give the new contents away."""
    import os

    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    target = folder / "model.safetensors"
    gemm_weights(load(folder))
    stat = target.stat()
    data = bytearray(target.read_bytes())
    offset = data.index(load(folder).layers[0].query.weight.tobytes())
    data[offset : offset + 4] = np.float32(7.0).tobytes()
    replacement = tmp_path / "replacement.safetensors"
    replacement.write_bytes(bytes(data))
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    os.replace(replacement, target)
    assert gemm_weights(load(folder))[0].qkv[0, 0, 0] == 7.0


def test_no_home_and_no_cache_setting_keeps_copies_in_memory(tiny_model, monkeypatch):
    monkeypatch.delenv("NPRERANK_CACHE", raising=False)
    monkeypatch.setattr("pathlib.Path.home", lambda: (_ for _ in ()).throw(RuntimeError("no home directory")))
    weights = load(tiny_model)
    with pytest.warns(UserWarning, match="no home directory"):
        assert_packed(gemm_weights(weights), weights)


def test_layouts_of_deleted_checkpoints_are_pruned(tiny_model, tmp_path, monkeypatch):
    """Writing a layout deletes those of checkpoints that are gone, and old temporary files; a
    layout whose checkpoint is still there, and a temporary file being written now, stay."""
    import os
    import time

    cache = tmp_path / "cache"
    monkeypatch.setenv("NPRERANK_CACHE", str(cache))
    layouts = {}
    for name in ("kept", "deleted"):
        shutil.copytree(tiny_model, tmp_path / name)
        before = set(cache.glob("layout-*.safetensors"))
        gemm_weights(load(tmp_path / name))
        (layouts[name],) = set(cache.glob("layout-*.safetensors")) - before
    shutil.rmtree(tmp_path / "deleted")
    old, fresh = cache / "layout-x.safetensors.a.tmp", cache / "layout-y.safetensors.b.tmp"
    for path in (old, fresh):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert layouts["deleted"].exists()

    shutil.copytree(tiny_model, tmp_path / "new")
    gemm_weights(load(tmp_path / "new"))
    assert layouts["kept"].exists() and fresh.exists()
    assert not layouts["deleted"].exists() and not old.exists()
    assert len(list(cache.glob("layout-*.safetensors"))) == 2
