"""`nprerank`, the command line (also `python -m nprerank`).

What it owns: the subcommands and how they read their input and print their output.
- `rerank QUERY [CONTEXT ...]`: contexts from the arguments, `--file` or stdin, all read by one
  reader with one set of rules (UTF-8, plain text split at newlines only, JSON, JSONL, or a
  Cloudflare / Cohere / Jina / TEI request body with its top_k or top_n); prints a table (rank,
  id, score, text) or, with `--json`, Cloudflare's `{"response": [...]}`; `--raw` for logits.
  A first run that compiles the kernels says so on stderr (startup.py); stdout is only results.
- `download [REPO_ID] [--dir DIR]`: hub.py's download, into the Hugging Face cache or a folder,
  printing the folder on stdout and how to use it on stderr.
- `serve` and `bench`: handed to server.py and bench.py (imported only when asked for, so that
  `rerank` starts without the web stack); each adds its own arguments.

Exit codes: 0 done; 2 the command line is wrong (argparse's errors, an empty query, no contexts,
an argument that is not UTF-8); 1 something failed while running (a model, or an input file or
stdin that cannot be used); 130 Ctrl-C. Every error is one line on stderr, `nprerank: error: ...`,
never a traceback.

Read next: reranker.py (what `rerank` calls), hub.py (what `download` and `--model` use).
"""

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from . import __version__
from .arguments import UsageError, positive_int
from .config import ModelError
from .hub import DEFAULT_MODEL
from .precisions import DEFAULT as PRECISION_DEFAULT
from .precisions import HELP as PRECISION_HELP
from .precisions import NAMES as PRECISION_NAMES

EXAMPLES = f"""\
examples:
  nprerank rerank "Which one is cooler?" "a cyberpunk lizzard" "a cyberpunk cat"
  nprerank rerank "what is panda?" --file contexts.json --top-k 3 --json
  cat passages.txt | nprerank rerank "what is panda?"     # one context per line
  nprerank download {DEFAULT_MODEL} --dir weights/
  nprerank rerank "what is panda?" "hi" "a bear" --model weights/
  nprerank serve --port 8080
  nprerank bench --help

The model is --model, else $NPRERANK_MODEL, else {DEFAULT_MODEL}: a local folder, or a Hugging Face
repo id, looked up in the Hugging Face cache (HF_HOME) and downloaded into it on first use
(HF_ENDPOINT, HF_HUB_OFFLINE are honoured). To fetch it ahead of time, either
  nprerank download                    # into the cache: the repo id then finds it, no --model needed
  nprerank download --dir weights/     # into a plain folder: then pass --model weights/
(a repo id is never looked up in a plain folder).
exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted.
"""

RERANK_INPUT = """\
contexts come from the CONTEXT arguments, from --file, or from stdin when neither is given.
A file or stdin is UTF-8 (a byte order mark is dropped) holding one of:
  JSON   a list of strings or of {"text": ...} objects, or a rerank request body: Cloudflare's
         {"query"?, "contexts", "top_k"?}, Cohere's or Jina's {"query"?, "documents", "top_n"?},
         TEI's {"query"?, "texts"}; the body's query and top_k / top_n apply unless given here
  JSONL  one string or {"text": ...} per line
  text   one context per non-empty line
Lines end at \\n or \\r\\n only: a form feed, \\v or U+2028 inside a line stays in its context.
Output is best first: a table, or with --json Cloudflare's {"response": [{"id", "score", "text"}]};
scores are sigmoid(logit) in [0, 1], or the logits themselves with --raw.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) instead of usage + message."""

    def error(self, message):
        sys.stderr.write(f"nprerank: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> _Parser:
    parser = _Parser(
        prog="nprerank",
        description="Rerank texts by relevance to a query with BAAI's bge-reranker-base, on the CPU, without torch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nprerank {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)

    rerank = commands.add_parser(
        "rerank",
        help="score contexts against a query and print them best first",
        description="Score each context against the query and print them best first.",
        epilog=RERANK_INPUT + "\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rerank.add_argument(
        "query", metavar="QUERY", nargs="?", help="the query (may come from a --file Cloudflare body instead)"
    )
    rerank.add_argument("contexts", metavar="CONTEXT", nargs="*", help="texts to rank")
    rerank.add_argument(
        "--file", "-f", metavar="PATH", help="read contexts from this JSON/JSONL/text file ('-' for stdin)"
    )
    rerank.add_argument("--top-k", type=positive_int, metavar="K", help="print only the K best")
    rerank.add_argument(
        "--json", action="store_true", help='print {"response": [{"id", "score", "text"}]} instead of a table'
    )
    rerank.add_argument(
        "--raw",
        action="store_true",
        help="print the model's logits instead of sigmoid(logit) scores in [0, 1] (the ranking is the same)",
    )
    rerank.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="pairs per forward pass, at most (default 32; a token budget also bounds it)",
    )
    _add_model_arguments(rerank)
    rerank.set_defaults(run=_rerank)

    download = commands.add_parser(
        "download",
        help="fetch the model's files from the Hugging Face Hub",
        description="Fetch config.json, tokenizer.json, model.safetensors (and small tokenizer files) of a "
        "Hugging Face repo, verify them, and print the folder they are in.",
        epilog=f"examples:\n  nprerank download                      # then: nprerank rerank QUERY CONTEXT ...\n"
        f"  nprerank download {DEFAULT_MODEL} --dir weights/   "
        "# then: nprerank rerank QUERY CONTEXT ... --model weights/\n\n"
        "A download into --dir that fails leaves nothing half made: what it created is removed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    download.add_argument(
        "repo_id", metavar="REPO_ID", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}"
    )
    download.add_argument(
        "--dir",
        metavar="DIR",
        help="write the files into this plain folder instead of the Hugging Face cache; then pass "
        "it as --model DIR (a repo id is looked up in the cache only)",
    )
    download.add_argument("--revision", help="a branch, tag or commit (default: main)")
    download.set_defaults(run=_download)

    # serve and bench bring their own arguments; add_help=False so that their --help reaches them
    serve = commands.add_parser(
        "serve", help="HTTP server speaking Cloudflare, TEI and Cohere/Jina rerank APIs", add_help=False
    )
    serve.set_defaults(run=_serve)
    bench = commands.add_parser("bench", help="measure speed against torch and ONNX Runtime", add_help=False)
    bench.set_defaults(run=_bench)
    batch = commands.add_parser(
        "batch", help="rerank a JSONL file or a TREC run, resumable, locally or on Ray", add_help=False
    )
    batch.set_defaults(run=_batch)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        "-m",
        default=os.environ.get("NPRERANK_MODEL") or DEFAULT_MODEL,
        help="a model folder or Hugging Face repo id (default: $NPRERANK_MODEL or %(default)s)",
    )
    group.add_argument(
        "--threads", type=positive_int, metavar="N", help="CPU threads to use (default: all, or $NPRERANK_NUM_THREADS)"
    )
    group.add_argument(
        "--max-length", type=positive_int, metavar="N", help="tokens per query+context pair (default 512)"
    )
    group.add_argument(
        "--truncation",
        choices=("only_second", "longest_first"),
        default="only_second",
        help="only_second cuts the context, never the query (FlagEmbedding); longest_first cuts "
        "the longer one (sentence-transformers, TEI). Default %(default)s",
    )
    group.add_argument(
        "--engine",
        choices=("fast", "reference"),
        default="fast",
        help="fast: the Numba kernels; reference: the readable NumPy forward pass (slower, the same "
        "scores within 1e-4). Default %(default)s",
    )
    group.add_argument(
        "--precision",
        choices=PRECISION_NAMES,
        default=PRECISION_DEFAULT,
        help=PRECISION_HELP,
    )
    group.add_argument(
        "--long-documents",
        choices=("truncate", "chunk"),
        default="truncate",
        help="truncate: score the start of a long context; chunk: score overlapping windows and "
        "keep the best. Default %(default)s",
    )


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("serve", "bench", "batch"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args, rest) or 0
    except UsageError as e:
        sys.stderr.write(f"nprerank: error: {e} (see `nprerank {args.command} --help`)\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("nprerank: interrupted\n")
        return 130
    except BrokenPipeError:  # `nprerank rerank ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 0
    except (ModelError, ValueError, OSError) as e:
        sys.stderr.write(f"nprerank: error: {_one_line(e)}\n")
        return 1


# --- rerank ----------------------------------------------------------------------------------


def _rerank(args, rest) -> int:
    query, top_k = args.query, args.top_k
    contexts = [_check_text(text, f"context {i}", argument=True) for i, text in enumerate(args.contexts)]
    if args.file is not None or (not contexts and sys.stdin is not None and not sys.stdin.isatty()):
        source = args.file if args.file not in (None, "-") else "<stdin>"
        data = sys.stdin.buffer.read() if source == "<stdin>" else _read_file(args.file)
        file_query, file_contexts, file_top_k = read_contexts(decode(data, source), source)
        query = query if query is not None else file_query
        top_k = top_k if top_k is not None else file_top_k
        contexts += file_contexts
    if query is None:
        raise UsageError("a QUERY is required")
    query = _check_text(query, "the query", argument=query is args.query)
    if not contexts:
        raise UsageError("no contexts to rank: give them as arguments, with --file, or on stdin")

    from .reranker import Reranker, best_first, sigmoid  # numpy, numba: once the command line is known good
    from .startup import warm_up

    options = dict(
        truncation=args.truncation, long_documents=args.long_documents, engine=args.engine, precision=args.precision
    )
    if args.max_length is not None:
        options["max_length"] = args.max_length
    if args.threads is not None:
        options["threads"] = args.threads
    reranker = Reranker.from_pretrained(args.model, **options)
    warm_up(reranker, say=_say)  # a first run compiles the kernels: say so on stderr, not in the results
    logits = reranker.logits([(query, text) for text in contexts], batch_size=args.batch_size)
    scores = logits.astype(float) if args.raw else sigmoid(logits)
    ranked = [{"id": i, "score": float(scores[i]), "text": contexts[i]} for i in best_first(scores, top_k)]
    if args.json:
        print(json.dumps({"response": ranked}, ensure_ascii=False))
    else:
        print(format_table(ranked, score="logit" if args.raw else "score"))
    return 0


def _say(message: str) -> None:
    sys.stderr.write(f"nprerank: {message}\n")
    sys.stderr.flush()


# --- reading contexts: one reader, one set of rules for arguments, --file and stdin ---------------
# Plain text is split on "\n" (a "\r" before it goes too) and nowhere else: str.splitlines would
# also split on \v, \f, \x1c-\x1e, \x85, U+2028 and U+2029, which are characters inside a line of
# text (a form feed between pages, a Unicode line separator), not a new context. JSONL is split the
# same way: JSON strings may hold a raw U+2028 but never a raw newline, so a line is one value.


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise OSError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise OSError(f"{path}: is a folder, not a file") from None


def decode(data: bytes, source: str) -> str:
    """A file's or stdin's bytes -> text: UTF-8, a byte order mark at the start dropped; else ValueError."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def text_lines(text: str) -> list:
    """(line number from 1, line) for each line with something on it; lines end at "\n" or "\r\n" only."""
    return [(number, line.removesuffix("\r")) for number, line in enumerate(text.split("\n"), 1) if line.strip()]


def read_contexts(text: str, source: str) -> tuple:
    """A file's text -> (query or None, [context], top_k or None). See RERANK_INPUT for the formats."""
    start = text.lstrip(" \t\r\n")[:1]  # JSON's own whitespace: a first character that decides the format
    if not start:
        return None, [], None
    if not (source.endswith((".json", ".jsonl")) or start in '[{"'):
        return None, [_check_text(line, f"{source}: line {number}") for number, line in text_lines(text)], None
    try:
        data = _json(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # "Extra data": several JSON values, i.e. JSONL
            raise ValueError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        items = []
        for number, line in text_lines(text):
            try:
                items.append((number, _json(line)))
            except json.JSONDecodeError as line_error:
                raise ValueError(f"{source}: line {number} is not valid JSON: {line_error.msg}") from None
        return None, [_context(item, f"{source}: line {number}") for number, item in items], None
    query, top_k = None, None
    if isinstance(data, dict) and "text" not in data:  # a request body: Cloudflare's, Cohere's / Jina's, TEI's
        query, data, top_k = _body(data, source)
    items = data if isinstance(data, list) else [data]
    return query, [_context(item, f"{source}: item {i}") for i, item in enumerate(items)], top_k


def _json(text: str):
    # strict=False: a raw control character (a tab, \f, \v) inside a string is kept, as in a text line
    return json.loads(text, strict=False)


BODY_LISTS = {"contexts": "Cloudflare", "documents": "Cohere and Jina", "texts": "TEI"}
BODY_LIMITS = ("top_k", "top_n")  # Cloudflare's name, Cohere's and Jina's


def _body(body: dict, source: str) -> tuple:
    """A rerank request body -> (query or None, its list of contexts, top_k or None)."""
    keys = [key for key in BODY_LISTS if key in body]
    if len(keys) != 1 or not isinstance(body[keys[0]], list):
        found = f"; it has {' and '.join(keys)}" if len(keys) > 1 else ""
        raise ValueError(
            f"{source}: expected a list of contexts or a request body with one list of them: 'contexts' "
            f"(Cloudflare), 'documents' (Cohere, Jina) or 'texts' (TEI){found}"
        )
    query = body.get("query")
    if query is not None:
        query = _check_text(query, f"{source}: 'query'")
    limits = [key for key in BODY_LIMITS if body.get(key) is not None]
    if len(limits) > 1:
        raise ValueError(f"{source}: gives both 'top_k' and 'top_n'; keep one")
    if body.get("rank_fields") not in (None, ["text"]):  # Cohere v1 would rank those keys; we read only text
        raise ValueError(
            f"{source}: 'rank_fields' {body['rank_fields']!r:.60} is not supported: only each "
            'document\'s text is ranked; leave it out or give ["text"]'
        )
    top_k = body[limits[0]] if limits else None
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{source}: '{limits[0]}' must be an integer >= 1, got {top_k!r}")
    return query, body[keys[0]], top_k


def _context(item, where: str) -> str:
    text = item.get("text") if isinstance(item, dict) else item
    if not isinstance(text, str):
        raise ValueError(f"{where} must be a string or an object with a 'text' string, got {json.dumps(item)[:60]}")
    return _check_text(text, where)


def _check_text(text, where: str, argument: bool = False) -> str:
    """`text` if it is a string with something on it in valid Unicode, else an error naming `where`:
    a UsageError (exit 2) for a command-line argument, a ValueError (exit 1) for a file's content."""
    error = UsageError if argument else ValueError
    if not isinstance(text, str):
        raise error(f"{where} must be a string, got {json.dumps(text)[:60]}")
    if not text.strip():
        raise error(f"{where} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if argument and 0xDC80 <= code <= 0xDCFF:  # how Python keeps an argument's undecodable byte
            raise error(f"{where} is not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {e.start})") from None
        raise error(
            f"{where} is not valid Unicode text (a lone surrogate U+{code:04X} at character {e.start})"
        ) from None
    return text


def format_table(ranked: list, width: int | None = None, score: str = "score") -> str:
    """[{"id", "score", "text"}] -> aligned rows of rank, id, score (headed `score`) and the start of the text."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    id_width = max(2, *(len(str(hit["id"])) for hit in ranked))
    rank_width = max(4, len(str(len(ranked))))
    preview = max(20, width - rank_width - id_width - 8 - 6)
    rows = [f"{'rank':>{rank_width}}  {'id':>{id_width}}  {score:<8}  text"]
    for rank, hit in enumerate(ranked, 1):
        text = " ".join(hit["text"].split())
        if len(text) > preview:
            text = text[: preview - 3] + "..."
        rows.append(f"{rank:>{rank_width}}  {hit['id']:>{id_width}}  {hit['score']:.6f}  {text}")
    return "\n".join(rows)


# --- download, serve, bench --------------------------------------------------------------------


def _download(args, rest) -> int:
    from .hub import download

    folder = download(args.repo_id, args.dir, revision=args.revision)
    print(folder)  # stdout: the folder alone, for scripts; how to use it goes to stderr
    model = f"--model {shlex.quote(args.dir)}" if args.dir is not None else f"--model {args.repo_id}"
    if args.dir is None and args.repo_id == DEFAULT_MODEL:
        model += " (the default)"
    where = "this folder" if args.dir is not None else "the Hugging Face cache"
    _say(f"{args.repo_id} is ready in {where}: nprerank rerank QUERY CONTEXT ... {model}")
    return 0


def _serve(args, rest) -> int:
    server = _optional_module("server", "serve", "pip install '.[server]' from the nprerank checkout")
    parser = _Parser(
        prog="nprerank serve",
        description="Serve reranking over HTTP (Cloudflare Workers AI, "
        "Text Embeddings Inference and Cohere/Jina dialects).",
    )
    server.add_arguments(parser)
    return server.serve_from_args(parser.parse_args(rest)) or 0


def _bench(args, rest) -> int:
    bench = _optional_module("bench", "bench", "pip install '.[bench]' from the nprerank checkout")
    parser = _Parser(prog="nprerank bench", description="Measure nprerank against torch and ONNX Runtime.")
    bench.add_arguments(parser)
    return bench.run_from_args(parser.parse_args(rest)) or 0


def _batch(args, rest) -> int:
    from . import batch

    parser = _Parser(prog="nprerank batch", description="Rerank every query of a file; rerun to resume.")
    batch.add_arguments(parser)
    return batch.run_from_args(parser.parse_args(rest)) or 0


def _optional_module(name: str, command: str, install: str):
    import importlib

    try:
        return importlib.import_module(f".{name}", __package__)
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.{name}":
            raise OSError(f"`nprerank {command}` is not part of this installation") from None
        raise OSError(f"`nprerank {command}` needs {e.name}: {install}") from None


def _one_line(error: Exception) -> str:
    """The error as one line; an OSError from the system as "path: reason" (permission denied, a
    full disk), not Python's "[Errno 13] Permission denied: 'path'"."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        paths = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        return f"{paths}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__
