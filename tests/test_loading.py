"""Broken or unsupported model folders fail with a message naming the file and the problem."""

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from nprerank import ModelError, Reranker
from nprerank.config import ModelConfig
from nprerank.weights import embedding_rows, load_weights, read_safetensors


@pytest.fixture
def folder(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


def rewrite_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def rewrite_tensors(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(architectures=["BertForMaskedLM"]), r"architectures is \['BertForMaskedLM'\]"),
        (dict(id2label={"0": "NO", "1": "YES"}), "2 labels; a reranker has exactly 1"),
        (dict(num_labels=3), "3 labels"),
        (dict(position_embedding_type="relative_key"), "position_embedding_type is 'relative_key'"),
        (dict(hidden_act="gelu_new"), "hidden_act is 'gelu_new'; only 'gelu'"),
        (dict(model_type="bert"), "model_type 'bert'"),
        (dict(hidden_size=33), "hidden_size 33 is not divisible by num_attention_heads 4"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive int"),
        (dict(layer_norm_eps="tiny"), "layer_norm_eps must be a positive float"),
        (dict(layer_norm_eps=0), "layer_norm_eps must be a positive float, got 0"),
        (dict(layer_norm_eps=-1e-5), "layer_norm_eps must be a positive float"),
        (dict(layer_norm_eps=float("nan")), "layer_norm_eps must be a finite positive number .* got nan"),
        (dict(layer_norm_eps=float("inf")), "layer_norm_eps must be a finite positive number .* got inf"),
        (dict(layer_norm_eps=1e300), "layer_norm_eps must be a finite positive number .* got 1e[+]?300"),
        (dict(layer_norm_eps=1e-45), "layer_norm_eps must be a positive float"),  # 0 in float32
        (dict(is_decoder=True), "decoder"),
    ],
)
def test_unsupported_configs_are_refused_by_name(folder, changes, message):
    rewrite_config(folder, **changes)
    with pytest.raises(ModelError, match=message):
        Reranker.from_pretrained(folder)


def test_config_reads_the_fields_we_use(tiny_model):
    config = ModelConfig.from_json(tiny_model / "config.json")
    raw = json.loads((tiny_model / "config.json").read_text())
    assert config.hidden_size == raw["hidden_size"] and config.layer_norm_eps == raw["layer_norm_eps"]
    assert config.head_size * config.num_attention_heads == config.hidden_size
    assert config.max_tokens == raw["max_position_embeddings"] - 2


def test_missing_folder_and_files(folder, tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        Reranker.from_pretrained(tmp_path / "nowhere")
    (folder / "model.safetensors").unlink()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="missing tokenizer.json, model.safetensors"):
        Reranker.from_pretrained(folder)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:4], "too short to be safetensors"),
        (lambda b: b"", "too short to be safetensors"),
        (lambda b: b[:8] + b"{not json" + b[17:], "header is not valid JSON"),
        (lambda b: (10**12).to_bytes(8, "little") + b[8:], "header claims"),
    ],
)
def test_corrupt_safetensors(folder, damage, message):
    path = folder / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelError, match=message) as error:
        Reranker.from_pretrained(folder)
    assert "model.safetensors" in str(error.value)


def test_missing_and_unknown_tensors_are_named(folder):
    rewrite_tensors(folder, lambda t: t.pop("roberta.encoder.layer.1.intermediate.dense.bias"))
    with pytest.raises(ModelError, match=r"missing tensors roberta\.encoder\.layer\.1\.intermediate\.dense\.bias"):
        Reranker.from_pretrained(folder)


def test_unknown_tensors_are_refused(folder):
    rewrite_tensors(folder, lambda t: t.update({"lm_head.dense.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(ModelError, match=r"unexpected tensors lm_head\.dense\.weight"):
        Reranker.from_pretrained(folder)


def test_wrong_shapes_are_named(folder):
    rewrite_tensors(
        folder,
        lambda t: t.update(
            {
                "roberta.encoder.layer.1.attention.self.key.weight": t[
                    "roberta.encoder.layer.1.attention.self.key.weight"
                ][:, :16].copy()
            }
        ),
    )
    with pytest.raises(
        ModelError,
        match=r"roberta\.encoder\.layer\.1\.attention\.self\.key\.weight has shape "
        r"\[32, 16\], config.json implies \[32, 32\]",
    ):
        Reranker.from_pretrained(folder)


def test_unsupported_dtype_is_named(folder):
    rewrite_tensors(
        folder, lambda t: t.update({"classifier.out_proj.bias": t["classifier.out_proj.bias"].astype(np.float64)})
    )
    with pytest.raises(ModelError, match="classifier.out_proj.bias is stored as F64"):
        Reranker.from_pretrained(folder)


def test_known_extras_and_old_names_are_accepted(folder, tiny_model):
    def old_style(tensors):
        tensors["roberta.embeddings.position_ids"] = np.arange(130, dtype=np.float32)[None]
        tensors["roberta.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
        tensors["roberta.pooler.dense.bias"] = np.zeros(32, np.float32)
        for name in [n for n in tensors if n.endswith("LayerNorm.weight")]:
            tensors[name.replace(".weight", ".gamma")] = tensors.pop(name)
        for name in [n for n in tensors if n.endswith("LayerNorm.bias")]:
            tensors[name.replace(".bias", ".beta")] = tensors.pop(name)

    rewrite_tensors(folder, old_style)
    pairs = [("what is panda?", "a bear"), ("q", "p")]
    assert Reranker.from_pretrained(folder).compute_score(pairs) == Reranker.from_pretrained(tiny_model).compute_score(
        pairs
    )


def test_fp32_weights_are_memory_mapped_not_copied(tiny_model):
    config = ModelConfig.from_json(tiny_model / "config.json")
    weights = load_weights(tiny_model / "model.safetensors", config)
    for array in (weights.embeddings.position, weights.layers[0].query.weight, weights.classifier.out_proj.bias):
        assert not array.flags.owndata and not array.flags.writeable  # a read-only view of the file


def _resident_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status on this system")


def test_word_embedding_rows_are_read_not_mapped(full_model):
    """Scattered rows of the 768 MB table must not make the table resident (see weights.RowsOnDisk)."""
    config = ModelConfig.from_json(full_model / "config.json")
    weights = load_weights(full_model / "model.safetensors", config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 5000)
    before = _resident_file_kb()
    rows = embedding_rows(weights.embeddings.word, ids)  # [5000, 768]
    grown_mb = (_resident_file_kb() - before) / 1024
    assert grown_mb < 16, f"gathering 5000 rows made {grown_mb:.0f} MB of the file resident"
    table = read_safetensors(full_model / "model.safetensors")[0]["roberta.embeddings.word_embeddings.weight"][0]
    assert rows.dtype == np.float32 and np.array_equal(rows, table[ids])


def test_broken_tokenizer_json(folder):
    (folder / "tokenizer.json").write_text("{ not a tokenizer")
    with pytest.raises(ModelError, match="tokenizer.json"):
        Reranker.from_pretrained(folder)


NON_FINITE = [
    ("roberta.encoder.layer.1.intermediate.dense.weight", (3, 5), np.nan),  # a large layer weight
    ("roberta.encoder.layer.0.attention.self.key.weight", (0, 0), np.inf),
    ("roberta.encoder.layer.0.output.dense.bias", (7,), np.nan),  # a bias
    ("roberta.encoder.layer.1.attention.output.LayerNorm.weight", (2,), -np.inf),
    ("roberta.embeddings.position_embeddings.weight", (4, 1), np.nan),
    ("roberta.embeddings.word_embeddings.weight", (777, 3), np.inf),  # a row no test text uses
    ("classifier.out_proj.bias", (0,), np.nan),
]


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("name, index, value", NON_FINITE)
def test_non_finite_weights_are_refused_at_load(folder, tmp_path, monkeypatch, engine, name, index, value):
    """NaN or infinity anywhere in the checkpoint: ModelError at load naming the tensor, from
    either engine (before, every score was NaN)."""
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))

    def poison(tensors):
        tensors[name][index] = value

    rewrite_tensors(folder, poison)
    with pytest.raises(ModelError, match=re.escape(name)):
        Reranker.from_pretrained(folder, engine=engine)


def test_non_finite_word_rows_are_caught_when_gathered(folder):
    """The rows a batch reads are checked as they are read (they bypass the load-time scan when
    the layout was written before the checkpoint's bytes were changed under the same stamp)."""
    config = ModelConfig.from_json(folder / "config.json")
    weights = load_weights(folder / "model.safetensors", config)
    table = np.array(weights.embeddings.word.rows(0, config.vocab_size))
    table[5, 2] = np.nan
    with pytest.raises(ModelError, match="word_embeddings.weight row 5"):
        embedding_rows(table, np.array([3, 4, 5, 6]))
    assert np.isfinite(embedding_rows(table, np.array([3, 4, 6]))).all()


# --- malformed files of every kind ---------------------------------------------------------------


def safetensors_bytes(header, data=b"\0" * 16, header_size=None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if header_size is None else header_size).to_bytes(8, "little") + text + data


GOOD = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
MALFORMED = {
    "offsets as strings": {"t": {**GOOD, "data_offsets": ["0", "16"]}},
    "offsets negative": {"t": {**GOOD, "data_offsets": [-16, 0]}},
    "offsets floats": {"t": {**GOOD, "data_offsets": [0.0, 16.0]}},
    "offsets booleans": {"t": {**GOOD, "shape": [1], "data_offsets": [False, True]}},
    "offsets not a list": {"t": {**GOOD, "data_offsets": "0-16"}},
    "offsets an object": {"t": {**GOOD, "data_offsets": {"0": 16}}},
    "offsets one number": {"t": {**GOOD, "data_offsets": [16]}},
    "offsets three numbers": {"t": {**GOOD, "data_offsets": [0, 8, 16]}},
    "offsets missing": {"t": {"dtype": "F32", "shape": [2, 2]}},
    "offsets beyond the data": {"t": {**GOOD, "shape": [8], "data_offsets": [0, 32]}},
    "ranges overlapping": {
        "t": {**GOOD, "shape": [3], "data_offsets": [0, 12]},
        "u": {**GOOD, "shape": [2], "data_offsets": [8, 16]},
    },
    "shape negative": {"t": {**GOOD, "shape": [-2, -2]}},  # its product, 4, would fit the range
    "shape strings": {"t": {**GOOD, "shape": ["2", "2"]}},
    "shape huge": {"t": {**GOOD, "shape": [2**40, 2**40]}},
    "shape wrapping int64": {"t": {**GOOD, "shape": [2**62, 4], "data_offsets": [0, 0]}},  # np.prod gave 0
    "shape not a list": {"t": {**GOOD, "shape": "2x2"}},
    "shape null": {"t": {**GOOD, "shape": None}},
    "dtype a list": {"t": {**GOOD, "dtype": ["F32"]}},
    "dtype a number": {"t": {**GOOD, "dtype": 32}},
    "dtype unknown": {"t": {**GOOD, "dtype": "I64"}},
    "entry a list": {"t": [0, 16]},
    "entry a string": {"t": "F32"},
    "header a list": [GOOD],
    "metadata a list": {"__metadata__": ["x"], "t": GOOD},
    "header nested deeply": b"[" * 100000 + b"]" * 100000,
    "header not JSON": b"{not json",
    "header not UTF-8": b'{"t\xff": 1}',
    "header length absurd": (GOOD, 2**63),
    "header length beyond the file": (GOOD, 10**6),
    "header length zero": (GOOD, 0),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_safetensors_headers_are_named(tmp_path, kind):
    """Every kind of broken header: a ModelError naming the file, never a bare TypeError,
    ValueError, RecursionError or OverflowError (or a tensor read from the wrong bytes)."""
    header = MALFORMED[kind]
    path = tmp_path / "model.safetensors"
    if isinstance(header, tuple):
        path.write_bytes(safetensors_bytes({"t": header[0]}, header_size=header[1]))
    else:
        path.write_bytes(safetensors_bytes(header))
    with pytest.raises(ModelError, match=re.escape(str(path))):
        read_safetensors(path)


def test_a_good_header_still_reads(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"t": GOOD, "u": {**GOOD, "shape": [0], "data_offsets": [16, 16]}}))
    tensors, _ = read_safetensors(path)
    assert tensors["t"][0].shape == (2, 2) and tensors["u"][0].shape == (0,)


def test_deeply_nested_config_is_a_model_error(folder):
    (folder / "config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ModelError, match="config.json: nested too deeply"):
        Reranker.from_pretrained(folder)


@pytest.mark.parametrize(
    "field, value, held",
    [
        ("num_hidden_layers", 10**7, 2),
        ("num_hidden_layers", 1, 2),
        ("hidden_size", 10**9, 32),
        ("vocab_size", 2**40, 802),
        ("intermediate_size", 10**8, 64),
        ("max_position_embeddings", 10**9, 130),
        ("type_vocab_size", 10**6, 1),
    ],
)
def test_absurd_config_sizes_are_refused_against_the_checkpoint(folder, field, value, held):
    """A config.json size that the checkpoint contradicts is refused before anything is built
    from it, naming the field and both values (num_hidden_layers 10**7 ran 29 s and took 6 GB)."""
    import time

    rewrite_config(folder, **{field: value})
    started = time.monotonic()
    with pytest.raises(ModelError, match=f"{field} is {value}, but the checkpoint holds {held}"):
        Reranker.from_pretrained(folder)
    assert time.monotonic() - started < 20, "refusing took as long as building"


def add_token(folder, token_id):
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append(
        {
            "id": token_id,
            "content": "<extra>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


def test_tokenizer_ids_beyond_the_vocabulary_are_refused(folder):
    """A tokenizer whose ids do not all have a row in the embedding table is refused at load,
    not at the first text that produces such an id: an added token past the end, and a model
    whose table is smaller than the tokenizer's vocabulary."""
    from nprerank.tokenizer import PairTokenizer

    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert PairTokenizer(folder / "tokenizer.json", 64).vocab_size <= vocab_size
    add_token(folder, vocab_size + 5)  # `tokenizers` numbers it after the last id it has
    highest = PairTokenizer(folder / "tokenizer.json", 64).vocab_size - 1
    assert highest >= vocab_size
    with pytest.raises(
        ModelError, match=f"tokenizer.json: token ids go up to {highest}, but config.json's vocab_size is {vocab_size}"
    ):
        Reranker.from_pretrained(folder)


def test_a_smaller_embedding_table_than_the_tokenizer_is_refused(folder):
    name = "roberta.embeddings.word_embeddings.weight"
    rewrite_tensors(folder, lambda t: t.update({name: t[name][:700].copy()}))
    rewrite_config(folder, vocab_size=700)
    with pytest.raises(ModelError, match="vocab_size is 700"):
        Reranker.from_pretrained(folder)


def test_cache_path_with_a_tilde_is_expanded(monkeypatch, tmp_path):
    from nprerank.layout import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NPRERANK_CACHE", "~/x")
    assert cache_dir() == tmp_path / "x"


def special_file(path, kind):
    import os

    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:  # a character device: a symbolic link to /dev/zero (endless, never EOF)
        os.symlink("/dev/zero", path)


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_a_special_file_in_a_model_folder_is_refused_at_once(folder, name, kind):
    """A FIFO, a folder or a device where a model file should be: ModelError naming it at once
    (a FIFO hung the load for ever; the test's timeout is the guard)."""
    (folder / name).unlink()
    special_file(folder / name, kind)
    what = {"fifo": "a FIFO", "directory": "a directory", "device": "a character device"}[kind]
    with pytest.raises(ModelError, match=re.escape(f"{folder / name}: is {what}")):
        Reranker.from_pretrained(folder)


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_special_file_at_the_layout_cache_path(tiny_model, tmp_path, monkeypatch, kind):
    """The layout's cache file replaced by a FIFO, a folder or a device: never opened to block;
    the file is written over it (FIFO, device link) or, for a folder, the copies stay in memory."""
    import hashlib

    from nprerank.layout import gemm_weights

    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path))
    config = ModelConfig.from_json(tiny_model / "config.json")
    weights = load_weights(tiny_model / "model.safetensors", config)
    name = hashlib.sha256(str((tiny_model / "model.safetensors").resolve()).encode()).hexdigest()[:16]
    special_file(tmp_path / f"layout-{name}.safetensors", kind)
    if kind == "directory":
        with pytest.warns(UserWarning, match="cannot use the weight layout cache"):
            matrices = gemm_weights(weights)
    else:
        matrices = gemm_weights(weights)
        assert (tmp_path / f"layout-{name}.safetensors").is_file()
    np.testing.assert_array_equal(matrices[0].qkv_bias[:32], weights.layers[0].query.bias)


def test_a_collected_model_closes_its_files_without_a_resource_warning(tiny_model):
    """The word embeddings stay in their file, read row by row (weights.RowsOnDisk): the file is
    closed when the model goes, silently (apps run with -W error, and pytest reports the warning)."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reranker = Reranker.from_pretrained(tiny_model)
        reranker.compute_score(["q", "a"])
        del reranker
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
