"""The bounds and request rules the server enforces, in one frozen dataclass; each field is a
`nprerank serve` flag.

The app admits, reads and batches requests under these; the dialects refuse a request over
`max_contexts` in their own shape. Read next: app.py (where each bound is applied).
"""

from dataclasses import dataclass, fields

TRUNCATIONS = (None, "only_second", "longest_first")


@dataclass(frozen=True)
class Limits:
    """Every bound and request rule the server enforces; each is a `nprerank serve` flag of the same name."""

    max_body_bytes: int = 4 * 1024 * 1024  # a larger request body is refused with 413
    max_contexts: int = 1000  # contexts / texts / documents in one request
    queue_size: int = 64  # requests read whole and waiting or being scored; one more is refused with 429
    batch_tokens: int = 16384  # tokens the worker takes from the queue for one forward call
    max_connections: int = 128  # open sockets; a request on one more is refused with 429 and closed
    header_timeout: float = 10.0  # seconds from connecting (or the last answer) to a request's whole headers
    body_timeout: float = 30.0  # seconds from the headers to the whole body; later: 408
    shutdown_timeout: float = 10.0  # seconds requests in progress get on Ctrl-C / SIGTERM; later: 503
    auto_truncate: bool = True  # TEI's `truncate` when a request leaves it out (true since TEI 1.9)
    # how a pair too long for the model is cut: "only_second" (the passage) or "longest_first";
    # None: each dialect as its service does (TEI longest_first, the others the Reranker's default)
    truncation: str | None = None

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{field.name} must be an integer >= 1, got {value!r}")
            if field.type is float and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400
            ):
                raise ValueError(f"{field.name} must be a number of seconds > 0, got {value!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS[1:]} or None, got {self.truncation!r}")
