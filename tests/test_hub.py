"""Model download (nprerank.hub) against a small Hugging Face Hub the tests run on 127.0.0.1.

`FakeHub` speaks the part of the Hub's HTTP API that huggingface_hub's download functions use
(read from huggingface_hub's own source, file_download.py and hf_api.py):
- `GET /api/models/{repo}/revision/{rev}?blobs=true`: the commit sha and each file's size, git
  blob id and, for LFS files, `lfs.sha256` (HfApi.model_info(files_metadata=True)).
- `HEAD` and `GET /{repo}/resolve/{rev}/{file}`: headers `X-Repo-Commit`, `ETag` (git blob id),
  for LFS files `X-Linked-Etag` (the sha256, which names the blob in the cache) and
  `X-Linked-Size`; GET honours `Range` so downloads resume.
- Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub does.
It serves a tiny model made by nprerank.synthetic, plus files nprerank must not download, under
any repo name (`REPO` unless told), and can fail a file's download after listing it.
"""

import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from nprerank import ModelError, Reranker, hub

REPO = "test-org/tiny-reranker"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_FILES = {"model.safetensors", "tokenizer.json", "pytorch_model.bin", "onnx/model.onnx"}


class FakeHub:
    """A Hub endpoint on a free loopback port serving `files` (name -> bytes) as the repo `repo`."""

    def __init__(self, files: dict, repo: str = REPO):
        self.files = dict(files)
        self.repo = repo
        self.fail = {}  # name -> HTTP status its GET answers, though the listing and HEAD show it
        self.corrupt = set()  # names served with one byte flipped (the listing keeps the true hash)
        self.cut_once = {}  # name -> serve only this many bytes on the next full GET, then hang up
        self.requests = []  # (method, path, Range header)
        hub_server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub_server._handle(self, body=False)

            def do_GET(self):
                hub_server._handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def listing(self) -> dict:
        siblings = []
        for name, data in self.files.items():
            entry = {"rfilename": name, "size": len(data), "blobId": _git_blob_id(data)}
            if name in LFS_FILES:
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        return {"id": self.repo, "modelId": self.repo, "sha": COMMIT, "private": False, "siblings": siblings}

    def _handle(self, request, body: bool):
        path = request.path.split("?")[0]
        self.requests.append((request.command, path, request.headers.get("Range")))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo, revision = (api or resolve or re.match("(.*)()", path)).group(1, 2)
        if repo != self.repo:
            return _answer(request, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        if revision not in (None, "main", COMMIT):
            return _answer(request, 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
        if api:
            return _answer(request, 200, json.dumps(self.listing()).encode(), {"Content-Type": "application/json"})
        name = resolve.group(3)
        if name not in self.files:
            return _answer(request, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        data = self.files[name]
        blob_id = _git_blob_id(data)
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{blob_id}"', "Accept-Ranges": "bytes"}
        if name in LFS_FILES:
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        if name in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range") or "")
        if body and match:
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status = 206 if start else 200
        if not body:
            return _answer(request, status, b"", headers, length=len(data))
        if name in self.fail:  # the Hub listed the file, then fails to serve it: a download dies midway
            return _answer(request, self.fail[name], b"Internal Error", {"X-Request-Id": "test"})
        cut = self.cut_once.pop(name, None) if not start else None
        if cut is not None:  # promise the whole file, send part of it, hang up
            return _answer(request, 200, data[:cut], headers, length=len(data))
        return _answer(request, status, data[start:], headers)


def _answer(request, status: int, data: bytes, headers: dict, length: int | None = None):
    request.send_response(status)
    for key, value in headers.items():
        request.send_header(key, value)
    request.send_header("Content-Length", str(len(data) if length is None else length))
    request.end_headers()
    if request.command != "HEAD":
        request.wfile.write(data)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def model_files(folder: Path) -> dict:
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    files["pytorch_model.bin"] = b"not needed: the torch copy of the weights"
    files["onnx/model.onnx"] = b"not needed either"
    files["README.md"] = b"# tiny test reranker\n"
    return files


@pytest.fixture
def fake_hub(tiny_model, monkeypatch, tmp_path):
    server = FakeHub(model_files(tiny_model))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()


def downloaded(server: FakeHub) -> set:
    return {path.rsplit("/", 1)[-1] for method, path, _ in server.requests if method == "GET" and "/resolve/" in path}


def test_fresh_download_fetches_only_the_needed_files_into_the_hf_cache(fake_hub, tiny_model, tmp_path):
    folder = hub.resolve(REPO)
    assert folder == tmp_path / "hf" / "hub" / "models--test-org--tiny-reranker" / "snapshots" / COMMIT
    wanted = {name for name in hub.REQUIRED_FILES + hub.OPTIONAL_FILES if name in fake_hub.files}
    assert wanted >= {"config.json", "tokenizer.json", "model.safetensors", "tokenizer_config.json"}
    for name in wanted:
        assert (folder / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert downloaded(fake_hub) == wanted
    assert not (folder / "pytorch_model.bin").exists() and not (folder / "sentencepiece.bpe.model").exists()

    pairs = [("what is panda?", "The giant panda is a bear species endemic to China."), ("query", "passage")]
    from_hub = Reranker.from_pretrained(REPO, engine="reference").compute_score(pairs)
    from_folder = Reranker.from_pretrained(tiny_model, engine="reference").compute_score(pairs)
    assert from_hub == from_folder


def test_cache_hit_needs_no_network(fake_hub, monkeypatch):
    folder = hub.resolve(REPO)
    fake_hub.stop()
    fake_hub.requests.clear()
    # The cache is looked at first, so a cached model loads with the Hub gone, with or without the
    # offline flag: no request is made at all.
    assert hub.resolve(REPO) == folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve(REPO) == folder
    assert fake_hub.requests == []
    Reranker.from_pretrained(REPO, engine="reference")


def test_offline_flag_without_cache_fails_fast_saying_what_to_do(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError) as error:
        hub.resolve(REPO)
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "HF_HUB_OFFLINE unset" in message  # else `nprerank download` itself refuses
    assert_both_ways(message, REPO)
    assert fake_hub.requests == []


def test_unreachable_hub_fails_fast_saying_what_to_do(fake_hub):
    fake_hub.stop()  # the port is closed: connection refused
    start = time.perf_counter()
    with pytest.raises(ModelError) as error:
        hub.resolve(REPO)
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert (
        "cannot reach" in message and fake_hub.url in message and "neither a local folder nor in the cache" in message
    )
    assert "HF_ENDPOINT" in message
    assert_both_ways(message, REPO)


def assert_both_ways(message: str, repo: str):
    """The advice names both ways to a working start, and says the folder way needs --model."""
    assert f"`nprerank download {repo}`" in message and "Hugging Face cache" in message
    assert f"`nprerank download {repo} --dir weights/`" in message and "`--model weights/`" in message
    assert "\n" not in message


def test_silent_hub_times_out_fast(fake_hub, monkeypatch):
    # A server that accepts connections and never answers (a black-holing proxy): the short
    # metadata timeout turns it into an error within seconds instead of minutes of retries.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    start = time.perf_counter()
    try:
        with pytest.raises(ModelError, match="cannot reach.*Timeout"):
            hub.resolve(REPO)
    finally:
        silent.close()
    assert time.perf_counter() - start < 10


def test_repo_not_found_is_a_clear_message(fake_hub):
    with pytest.raises(ModelError, match=r"^test-org/no-such-model: no such model on http://127\.0\.0\.1"):
        hub.resolve("test-org/no-such-model")
    with pytest.raises(ModelError, match="has no revision 'v9'"):
        hub.resolve(REPO, revision="v9")


def test_repo_without_safetensors_is_refused_before_downloading(fake_hub):
    del fake_hub.files["model.safetensors"]
    with pytest.raises(ModelError, match="has no model.safetensors"):
        hub.resolve(REPO)
    assert downloaded(fake_hub) == set()


def test_missing_local_folder_is_not_looked_up_on_the_hub(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in (str(tmp_path / "nowhere"), "./weights", "weights/", "a/b/c", "~/no-such-folder-here/"):
        with pytest.raises(ModelError, match="no such model folder"):
            hub.resolve(name)
    with pytest.raises(ModelError, match="no such model folder"):
        hub.resolve(Path("weights"))  # a Path is a folder, never a repo id
    with pytest.raises(ModelError, match="neither a model folder nor a valid Hugging Face repo id"):
        hub.resolve("bad name!")
    assert fake_hub.requests == []


def test_corrupt_download_is_detected_named_and_removed(fake_hub, tmp_path):
    fake_hub.corrupt.add("model.safetensors")  # right size, wrong bytes: only the sha256 can tell
    with pytest.raises(ModelError, match=r"model\.safetensors.*sha256") as error:
        hub.resolve(REPO)
    assert "run again" in str(error.value)
    blobs = tmp_path / "hf" / "hub" / "models--test-org--tiny-reranker" / "blobs"
    sha = hashlib.sha256(fake_hub.files["model.safetensors"]).hexdigest()
    assert not (blobs / sha).exists()  # the bad blob is gone, so the next run downloads it again
    fake_hub.corrupt.clear()
    folder = hub.resolve(REPO)
    assert (folder / "model.safetensors").read_bytes() == fake_hub.files["model.safetensors"]


def test_truncated_cached_model_gives_a_model_error_and_download_repairs_it(fake_hub):
    folder = hub.resolve(REPO)
    blob = (folder / "model.safetensors").resolve()
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"model\.safetensors.*truncated"):
        Reranker.from_pretrained(REPO, engine="reference")
    # `nprerank download` re-checks the cache against the Hub: the bad file is found and removed ...
    with pytest.raises(ModelError, match=r"model\.safetensors.*bytes, the Hub lists"):
        hub.download(REPO)
    # ... and the next run fetches it again
    assert hub.download(REPO) == folder
    assert (folder / "model.safetensors").read_bytes() == data


def test_interrupted_download_resumes_with_a_range_request(fake_hub):
    # huggingface_hub writes in 10 MB chunks and, when the connection drops, asks for the rest
    # with a Range request (within the same run; a new run starts the file over). So the file
    # must be bigger than a chunk: hub.resolve does not parse it, random bytes will do.
    data = np.random.default_rng(0).bytes(24 << 20)
    fake_hub.files["model.safetensors"] = data
    fake_hub.cut_once["model.safetensors"] = 15 << 20
    folder = hub.resolve(REPO)
    assert (folder / "model.safetensors").read_bytes() == data
    ranges = [r for method, path, r in fake_hub.requests if path.endswith("/model.safetensors") and method == "GET"]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 15 << 20


def test_download_to_a_plain_folder(fake_hub, tiny_model, tmp_path):
    target = tmp_path / "weights"
    assert hub.download(REPO, target) == target.resolve()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "tokenizer_config.json"):
        path = target / name
        assert path.is_file() and not path.is_symlink(), name
        assert path.read_bytes() == (tiny_model / name).read_bytes(), name
    assert not (target / "pytorch_model.bin").exists()
    assert not (tmp_path / "hf" / "hub" / "models--test-org--tiny-reranker" / "blobs").exists()  # not also cached
    reranker = Reranker.from_pretrained(target, engine="reference")
    expected = Reranker.from_pretrained(tiny_model, engine="reference")
    pairs = [("a cyberpunk cat", "a cyberpunk lizard"), ("query", "passage")]
    np.testing.assert_array_equal(reranker.predict(pairs), expected.predict(pairs))
    # a second run downloads nothing: the files are verified in place
    fake_hub.requests.clear()
    hub.download(REPO, target)
    assert downloaded(fake_hub) == set()


def test_failed_download_into_a_new_folder_leaves_no_folder(fake_hub, tmp_path):
    fake_hub.fail["model.safetensors"] = 500  # config.json and tokenizer.json arrive first, then this fails
    target = tmp_path / "models" / "nested" / "weights"
    with pytest.raises(ModelError, match=r"downloading model\.safetensors of test-org/tiny-reranker .* failed"):
        hub.download(REPO, target)
    assert downloaded(fake_hub) >= {"config.json", "model.safetensors"}  # it did fail midway
    assert not (tmp_path / "models").exists()  # every folder it made is gone
    fake_hub.stop()  # an unreachable Hub: the listing fails before any file
    with pytest.raises(ModelError, match="cannot reach") as error:
        hub.download(REPO, target)
    assert not (tmp_path / "models").exists()
    # the advice fits a download asked for: run it again, not "run nprerank download"
    assert "run this again where the Hub is reachable" in str(error.value) and "nprerank download" not in str(
        error.value
    )


def test_failed_download_into_an_existing_folder_keeps_only_what_was_there(fake_hub, tiny_model, tmp_path):
    target = tmp_path / "weights"
    target.mkdir()
    (target / "README.md").write_text("the user's own file\n")
    fake_hub.fail["model.safetensors"] = 500
    with pytest.raises(ModelError, match="model.safetensors"):
        hub.download(REPO, target)
    assert sorted(p.name for p in target.iterdir()) == ["README.md"]
    # followed by a download that works, then one that fails: the good files from before stay
    del fake_hub.fail["model.safetensors"]
    hub.download(REPO, target)
    before = sorted(p.name for p in target.iterdir())
    fake_hub.fail["config.json"] = 500
    (target / "config.json").unlink()  # missing again: this run must fetch it, and fails to
    with pytest.raises(ModelError, match="config.json"):
        hub.download(REPO, target)
    assert sorted(p.name for p in target.iterdir()) == [name for name in before if name != "config.json"]
    assert (target / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_interrupted_download_into_a_folder_leaves_nothing_half_made(fake_hub, tmp_path, monkeypatch):
    import huggingface_hub

    real = huggingface_hub.hf_hub_download

    def interrupted(repo_id, filename, **options):
        if filename == "model.safetensors":
            raise KeyboardInterrupt  # Ctrl-C in the middle of the big file
        return real(repo_id, filename, **options)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.download(REPO, tmp_path / "weights")
    assert not (tmp_path / "weights").exists()


def test_download_into_a_file_is_refused_and_leaves_it_alone(fake_hub, tmp_path):
    target = tmp_path / "weights"
    target.write_text("not a folder")
    with pytest.raises(ModelError, match="exists and is not a folder"):
        hub.download(REPO, target)
    assert target.read_text() == "not a folder"
    assert downloaded(fake_hub) == set()
