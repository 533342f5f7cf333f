"""Finding the model: a local folder, or a Hugging Face repo id fetched into the Hugging Face cache.

This module owns the step before `Reranker.from_pretrained` reads any file: turning what the user
typed ("BAAI/bge-reranker-base", "weights/") into a folder holding config.json, tokenizer.json and
model.safetensors. It must behave like the Hugging Face tools people already use, so it uses
`huggingface_hub` (installed with `tokenizers`) for the cache layout, the HTTP protocol and the
resumable downloads, and honours the same environment: HF_HOME / HF_HUB_CACHE (where the cache
is), HF_ENDPOINT (a mirror), HF_HUB_OFFLINE (never touch the network), HF_TOKEN.

What it adds on top:
- Cache first: a model already in the cache is used without any network request, so a start
  is fast and works offline. (Updates to the repo are picked up by `nprerank download`.)
- Only the files the model needs are fetched (not pytorch_model.bin or onnx/, which would
  triple the download).
- Fail fast: one metadata request with a short timeout (HF_HUB_ETAG_TIMEOUT, default 5 s) before
  any download. huggingface_hub on its own retries an unreachable Hub for minutes; here a missing
  network, an unknown repo or an offline flag each end in one `ModelError` whose message says what
  to do instead. (With no network at all, DNS fails at once: about 1.4 s from the shell prompt. A
  network that swallows packets costs the timeout, plus up to 3 s that huggingface_hub >= 2 spends
  once a day fetching its agent registry for telemetry; HF_HUB_DISABLE_TELEMETRY=1 skips that.)
- Verification: every file fetched is checked against the Hub's listing (size, then sha256 for LFS
  files or the git blob id for small ones); a corrupt file is deleted and named in the error.
  huggingface_hub itself only checks sizes. Files found in the cache are not re-hashed at load (that
  would cost about a second per start); a truncated or garbled model.safetensors is still caught by
  weights.py, which names the file. `nprerank download` re-verifies what is cached.

Read next: reranker.py (`Reranker.from_pretrained` calls `resolve`) and cli.py (`nprerank download`).
"""

import hashlib
import os
from pathlib import Path

from .config import ModelError

DEFAULT_MODEL = "BAAI/bge-reranker-base"
REQUIRED_FILES = ("config.json", "tokenizer.json", "model.safetensors")  # what a model folder holds
OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # small; other tools like to find them
DEFAULT_TIMEOUT = 5.0  # seconds to wait for the Hub's first answer before calling it unreachable


def resolve(
    name_or_path=DEFAULT_MODEL, cache_dir=None, offline: bool | None = None, revision: str | None = None
) -> Path:
    """A model folder for `name_or_path`: an existing local folder as is, else a Hub repo id.

    A repo id is looked up in the Hugging Face cache first (no network), then downloaded into it
    unless `offline` (default: the HF_HUB_OFFLINE environment variable) forbids it.
    """
    found = folder_or_repo_id(name_or_path)
    if isinstance(found, Path):
        return found
    repo_id = found
    cached = _cached_folder(repo_id, revision, cache_dir)
    if cached is not None:
        return cached
    if _offline(offline):
        raise ModelError(
            f"{repo_id} is not in the Hugging Face cache ({_cache_dir_shown(cache_dir)}) and HF_HUB_OFFLINE forbids "
            f"downloading it; with HF_HUB_OFFLINE unset, {how_to_get(repo_id)}"
        )
    return _fetch(repo_id, revision, cache_dir=cache_dir, local_dir=None, asked_to_download=False)


def how_to_get(repo_id: str) -> str:
    """The two ways to a working start, as advice for an error message. The same story as the
    README's "Getting the model": a repo id is looked up in the Hugging Face cache only, so a model
    fetched into a plain folder must then be passed as that folder."""
    return (
        f"either run `nprerank download {repo_id}` where the Hub is reachable (into the Hugging Face cache, "
        f"where this same command then finds it), or `nprerank download {repo_id} --dir weights/` and pass "
        'that folder as the model (`--model weights/`, `Reranker.from_pretrained("weights/")`); '
        "a folder holding config.json, tokenizer.json and model.safetensors copied from elsewhere works the same way"
    )


def download(repo_id: str = DEFAULT_MODEL, dir=None, cache_dir=None, revision: str | None = None) -> Path:
    """Fetch (or re-verify) the model's files: into the Hugging Face cache, or into the plain folder `dir`.

    Into `dir`, a download that fails (or is interrupted) leaves nothing half made: the files and
    folders this call created are removed, those that were there before are kept. (In the Hugging
    Face cache, huggingface_hub keeps a partial file to resume on the next run; the cache is only
    used once it holds every required file.)
    """
    repo_id = _repo_id(str(repo_id))
    if _offline(None):
        raise ModelError(
            f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded; unset it or run this where there is network"
        )
    if dir is None:
        return _fetch(repo_id, revision, cache_dir=cache_dir, local_dir=None)
    target = Path(os.path.expanduser(str(dir)))
    if target.exists() and not target.is_dir():
        raise ModelError(f"{dir}: exists and is not a folder")
    made = _new_paths(target)  # what a failure must remove: the files we may write, folders we create
    try:
        target.mkdir(parents=True, exist_ok=True)
        return _fetch(repo_id, revision, cache_dir=cache_dir, local_dir=target)
    except BaseException:  # a ModelError, or Ctrl-C in the middle of 1.1 GB
        _remove(made)
        raise


def _new_paths(target: Path) -> list:
    """The paths a download into `target` may create that do not exist yet, outermost first."""
    missing = [folder for folder in (target, *target.parents) if not folder.exists()]
    if missing:
        return [missing[-1]]  # the outermost folder we are about to create holds everything else
    names = REQUIRED_FILES + OPTIONAL_FILES + (".cache",)  # .cache: huggingface_hub's metadata for local_dir
    return [target / name for name in names if not (target / name).exists() and not (target / name).is_symlink()]


def _remove(paths: list) -> None:
    import shutil

    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def folder_or_repo_id(name_or_path) -> Path | str:
    """The existing local folder `name_or_path` names, else it as a valid Hub repo id; a ModelError
    if it is neither (empty, a file, a path that does not exist, a malformed id). No network."""
    if str(name_or_path) == "":  # Path("") is the current folder
        raise ModelError("no model named: give a model folder or a Hugging Face repo id")
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{name_or_path} is a file; a model is a folder ({', '.join(REQUIRED_FILES)})")
    if isinstance(name_or_path, os.PathLike):  # a Path is never a repo id
        raise ModelError(f"{name_or_path}: no such model folder")
    return _repo_id(str(name_or_path))


def check_folder(folder: Path) -> Path:
    """`folder`, or a ModelError naming the REQUIRED_FILES it lacks."""
    # exists(), not is_file(): a FIFO or a folder in its place is refused by its reader, by name
    missing = [name for name in REQUIRED_FILES if not (folder / name).exists()]
    if missing:
        raise ModelError(f"{folder}: missing {', '.join(missing)} (a model folder needs {', '.join(REQUIRED_FILES)})")
    return folder


def check_without_network(name_or_path) -> None:
    """A ModelError now for what can be known of `name_or_path` without the network: a path that
    is no folder, a malformed repo id, a folder (or cached repo) without the model's files, a repo
    id not cached while HF_HUB_OFFLINE is set. A repo id to download is left to the load. What a
    server checks before it listens, so that it never answers a port it must then close."""
    found = folder_or_repo_id(name_or_path)
    if isinstance(found, str):
        if not _offline(None) and _cached_folder(found, None, None) is None:
            return
        found = resolve(found)  # cached, or the offline error
    check_folder(found)


def _repo_id(name: str) -> str:
    """`name` as a repo id, or a ModelError if it is a path that does not exist or not a valid id."""
    looks_like_path = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
    if looks_like_path or not name:
        raise ModelError(f"{name}: no such model folder")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(
            f"{name}: neither a model folder nor a valid Hugging Face repo id (like {DEFAULT_MODEL})"
        ) from None
    return name


def _cached_folder(repo_id: str, revision: str | None, cache_dir) -> Path | None:
    """The cached snapshot folder holding every required file, or None. Makes no network request."""
    from huggingface_hub import try_to_load_from_cache

    folders = set()
    for filename in REQUIRED_FILES:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=_cache_dir(cache_dir), revision=revision)
        if not isinstance(found, str):  # None, or a marker saying the Hub has no such file
            return None
        folders.add(Path(found).parent)
    return folders.pop() if len(folders) == 1 else None


def _fetch(repo_id: str, revision: str | None, cache_dir, local_dir, asked_to_download: bool = True) -> Path:
    """Ask the Hub what the repo holds (fast failure), download the files we need, verify them."""
    listing = _listing(repo_id, revision, asked_to_download)
    missing = [name for name in REQUIRED_FILES if name not in listing]
    if missing:
        raise ModelError(
            f"{repo_id} has no {', '.join(missing)}; nprerank needs {', '.join(REQUIRED_FILES)} "
            "(an XLM-RoBERTa or BERT cross-encoder, as docs/models.md lists, saved in safetensors)"
        )
    from huggingface_hub import hf_hub_download

    folder = None
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        if name not in listing:
            continue
        try:
            path = hf_hub_download(
                repo_id,
                name,
                revision=revision,
                cache_dir=_cache_dir(cache_dir),
                local_dir=local_dir,
                endpoint=_endpoint(),
                etag_timeout=_timeout(),
            )
        except Exception as e:  # huggingface_hub raises OSError, HfHubHTTPError, httpx errors ...
            raise ModelError(
                f"downloading {name} of {repo_id} from {_endpoint_shown()} failed: {_one_line(e)}"
            ) from None
        _verify(Path(path), listing[name], repo_id)
        folder = Path(path).parent
    return folder


def _listing(repo_id: str, revision: str | None, asked_to_download: bool) -> dict:
    """File name -> the Hub's metadata for it (size, blob id, LFS sha256); raises ModelError fast.
    asked_to_download: `nprerank download` (True) or a model looked for and not found (False):
    what an unreachable Hub's message advises."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    what = repo_id if revision is None else f"{repo_id} at revision {revision}"
    try:
        info = HfApi(endpoint=_endpoint()).model_info(
            repo_id, revision=revision, files_metadata=True, timeout=_timeout()
        )
    except GatedRepoError:
        raise ModelError(f"{repo_id} is gated on the Hub: accept its terms on the website and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{repo_id}: no such model on {_endpoint_shown()} (check the spelling; a private repo needs HF_TOKEN), "
            "and no such local folder"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"{repo_id} has no revision {revision!r}") from None
    except HfHubHTTPError as e:
        raise ModelError(f"the Hub at {_endpoint_shown()} refused {what}: {_one_line(e)}") from None
    except Exception as e:  # connection refused, DNS failure, timeout, proxy ...: the Hub is unreachable
        unreachable = (
            f"cannot reach the Hugging Face Hub at {_endpoint_shown()} to download {what} "
            f"({type(e).__name__}: {_one_line(e)})"
        )
        if asked_to_download:
            raise ModelError(
                f"{unreachable}; run this again where the Hub is reachable, or set HF_ENDPOINT to a "
                "reachable mirror; a model folder copied from elsewhere is used with --model FOLDER"
            ) from None
        raise ModelError(
            f"{unreachable}, and it is neither a local folder nor in the cache; set HF_ENDPOINT to a "
            f"reachable mirror, or {how_to_get(repo_id)}"
        ) from None
    return {sibling.rfilename: sibling for sibling in info.siblings or []}


def _verify(path: Path, sibling, repo_id: str) -> None:
    """Compare a downloaded file with the Hub's listing; delete it and raise ModelError if it differs."""
    size = path.stat().st_size
    if sibling.lfs is not None:
        expected, actual, kind = sibling.lfs.sha256, None, "sha256"
        expected_size = sibling.lfs.size
    else:
        expected, actual, kind = sibling.blob_id, None, "git blob id"
        expected_size = sibling.size
    if expected_size is not None and size != expected_size:
        problem = f"is {size} bytes, the Hub lists {expected_size}"
    elif expected:
        actual = _sha256(path) if kind == "sha256" else _git_blob_id(path)
        if actual == expected:
            return
        problem = f"has {kind} {actual}, the Hub lists {expected}"
    else:
        return  # the Hub gave nothing to check against
    real = path.resolve()  # in the cache, the snapshot entry is a symlink to the blob
    path.unlink(missing_ok=True)
    real.unlink(missing_ok=True)
    raise ModelError(
        f"{path}: corrupt download of {sibling.rfilename} from {repo_id}: {problem}; "
        "deleted it, run again to download it afresh"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _git_blob_id(path: Path) -> str:
    # git names a file by sha1("blob <size>\0" + content); the Hub lists that id for non-LFS files
    content = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


# --- the environment, read at call time (huggingface_hub reads it once, at import) -------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    from huggingface_hub import constants

    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _cache_dir(cache_dir) -> str | None:
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None  # huggingface_hub's default, ~/.cache/huggingface/hub


def _cache_dir_shown(cache_dir) -> str:
    from huggingface_hub import constants

    return _cache_dir(cache_dir) or constants.HF_HUB_CACHE


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _endpoint_shown() -> str:
    from huggingface_hub import constants

    return _endpoint() or constants.ENDPOINT


def _timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines)[:300] or type(error).__name__
