"""What every dialect shares: the refusal (`ApiError`), the request (`Query`), the field readers.

A dialect module (cloudflare.py, tei.py, cohere.py) turns its JSON body into a `Query` with the
readers below and maps each `ApiError` kind to its own status and error body; the app and the
batcher see only `Query` objects and logits, never a dialect's field names. Read next: one dialect
module, then app.py.
"""

import json
from dataclasses import dataclass

import numpy as np

from .limits import Limits

DEFAULT_MODEL = "BAAI/bge-reranker-base"


class ApiError(Exception):
    """A request we refuse. `kind` says why; each dialect maps kinds to its own status and shape."""

    KINDS = (
        "bad_json",
        "media_type",
        "invalid",
        "empty",
        "empty_pair",
        "too_many",
        "too_long",
        "too_large",
        "unauthorized",
        "forbidden",
        "timeout",
        "overloaded",
        "loading",
        "internal",
    )
    # empty: a list with no items; empty_pair: a pair whose query and text are both "" (TEI's rule)

    def __init__(self, kind: str, message: str):
        assert kind in self.KINDS, kind
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass
class Query:
    """One rerank request, whatever dialect it came in: a query against a list of texts."""

    query: str
    texts: list
    top: int | None = None  # Cloudflare's top_k, Cohere's top_n
    raw_scores: bool = False  # TEI: logits instead of sigmoid scores
    return_text: bool = False  # TEI's return_text, Cohere's return_documents
    truncate: bool = True  # False: refuse a pair that does not fit instead of cutting it (TEI)
    model: str | None = None  # Cohere/Jina echo it back
    truncation: str | None = None  # "only_second" | "longest_first"; None: the server's --truncation
    passage_max_length: int | None = None  # Cohere v2's max_tokens_per_doc: tokens kept of each text


# --- reading a request ------------------------------------------------------------------------


def parse_json(body: bytes):
    if not body.strip():
        raise ApiError("bad_json", "the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8 too
        raise ApiError("bad_json", f"the request body is not valid JSON: {e}") from None


def read_object(payload) -> dict:
    if not isinstance(payload, dict):
        raise ApiError("invalid", f"the request body must be a JSON object, got {json_type(payload)}")
    return payload


# How a dialect treats a text with nothing in it: "refuse" an empty string (Cloudflare's minLength 1),
# "blank" refuses whitespace-only too (Cohere), "allow" takes "" (TEI; see TEI.parse for its rule).
EMPTY_RULES = ("refuse", "blank", "allow")


def read_text(value, name: str, empty: str = "refuse") -> str:
    """A JSON string that is valid Unicode, checked against the dialect's rule for empty text."""
    if not isinstance(value, str):
        raise ApiError("invalid", f"{name} must be a string, got {json_type(value)}")
    check_unicode(value, name)
    if not value and empty != "allow":
        raise ApiError("invalid", f"{name} must not be empty")
    if empty == "blank" and not value.strip():
        raise ApiError("invalid", f"{name} is blank (only whitespace); send text to rank")
    return value


def check_unicode(value: str, name: str) -> None:
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"): valid JSON, but not text anything can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            "invalid",
            f"{name} is not valid Unicode: character {e.start} is a lone surrogate "
            f"(\\u{ord(value[e.start]):04x}); send UTF-8 text",
        ) from None


def read_query(payload: dict, ranked: str, empty: str = "refuse") -> str:
    if "query" not in payload:
        raise ApiError("invalid", f"query is required: the text to rank the {ranked} against")
    return read_text(payload["query"], "query", empty)


def read_texts(items: list, name: str, objects: bool = True, strings: bool = True, empty: str = "refuse") -> list:
    """The text of each item: a string, or an object {"text": ...}, as far as the dialect allows."""
    texts = []
    for i, item in enumerate(items):
        if objects and isinstance(item, dict):
            if "text" not in item:
                raise ApiError("invalid", f"{name}[{i}] has no text field")
            texts.append(read_text(item["text"], f"{name}[{i}].text", empty))
        elif strings:
            texts.append(read_text(item, f"{name}[{i}]", empty))
        else:
            raise ApiError("invalid", f'{name}[{i}] must be an object {{"text": "..."}}, got {json_type(item)}')
    return texts


def read_list(payload: dict, name: str, limits: Limits, shape: str) -> list:
    if payload.get(name) is None:
        raise ApiError("invalid", f"{name} is required: {shape}")
    items = payload[name]
    if not isinstance(items, list):
        raise ApiError("invalid", f"{name} must be {shape}, got {json_type(items)}")
    if not items:
        raise ApiError("empty", f"{name} must not be empty")
    if len(items) > limits.max_contexts:
        raise ApiError(
            "too_many",
            f"{name} has {len(items)} items; this server takes at most "
            f"{limits.max_contexts} per request (--max-contexts)",
        )
    return items


def read_optional(payload: dict, name: str, kind: type, default=None):
    """An optional field; JSON null counts as absent. Integers must be >= 1."""
    value = payload.get(name)
    if value is None:
        return default
    if kind is bool and not isinstance(value, bool):
        raise ApiError("invalid", f"{name} must be true or false, got {json_type(value)} {value!r:.40}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ApiError("invalid", f"{name} must be an integer >= 1, got {json_type(value)} {value!r:.40}")
    return value


def json_type(value) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


# --- a dialect -------------------------------------------------------------------------------


class Dialect:
    """How one API family spells requests, answers and errors. Subclasses fill in the tables.

    The app serves `parse` -> score -> `answer` at each of `paths` (POST), and answers a refusal
    with `error_response`; openapi.py describes the same paths with `schemas`.
    """

    name = ""
    paths: tuple = ()  # the POST routes that speak this dialect
    summary = ""  # one line for the OpenAPI description
    json_only = True  # refuse a body whose Content-Type is not JSON (415)
    statuses: dict = {}  # ApiError kind -> HTTP status
    # Seconds a client should wait before retrying, sent as Retry-After: the retry logic of the
    # SDKs (cohere's, cloudflare's, ...) reads it on 429 and 503 in every dialect.
    retry_after = {429: 1, 503: 5}

    def parse(self, payload, limits: Limits) -> Query:
        raise NotImplementedError

    def answer(self, query: Query, logits: np.ndarray, tokens: int, model_name: str):
        raise NotImplementedError

    def error(self, error: ApiError) -> tuple:
        """-> (HTTP status, JSON body)."""
        raise NotImplementedError

    def error_response(self, error: ApiError) -> tuple:
        """-> (HTTP status, JSON body, headers): `error` plus Retry-After where a retry can succeed."""
        status, body = self.error(error)
        headers = {"Retry-After": str(self.retry_after[status])} if status in self.retry_after else {}
        return status, body, headers

    def schemas(self, limits: Limits) -> dict:
        """OpenAPI schemas of this dialect: {"request": ..., "answer": ..., "error": ...}."""
        raise NotImplementedError
