"""`nprerank`, the command line (also `python -m nprerank`).

What it owns: the subcommands and how they read their input and print their output.
- `rerank QUERY [CONTEXT ...]`: contexts from the arguments, `--file` (JSON or JSONL), or stdin;
  prints a table (rank, id, score, text) or, with `--json`, Cloudflare's `{"response": [...]}`.
- `download [REPO_ID] [--dir DIR]`: hub.py's download, into the Hugging Face cache or a folder.
- `serve` and `bench`: handed to server.py and bench.py (imported only when asked for, so that
  `rerank` starts without the web stack); each adds its own arguments.

Exit codes: 0 done; 2 the command line is wrong (argparse's errors, an empty query, no contexts);
1 something failed while running (a model or input file that cannot be used); 130 Ctrl-C. Every
error is one line on stderr, `nprerank: error: ...`, never a traceback.

Read next: reranker.py (what `rerank` calls), hub.py (what `download` and `--model` use).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from . import __version__
from .arguments import positive_int
from .config import ModelError
from .hub import DEFAULT_MODEL

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
repo id taken from the Hugging Face cache (HF_HOME) or downloaded on first use (HF_ENDPOINT,
HF_HUB_OFFLINE are honoured).
exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted.
"""

RERANK_INPUT = """\
contexts come from the CONTEXT arguments, from --file, or from stdin when neither is given.
A file or stdin holds JSON (a list of strings or of {"text": ...} objects, or a Cloudflare body
{"query"?, "contexts", "top_k"?}), JSONL (one string or {"text": ...} per line), or plain text
(one context per non-empty line). Output is best first.
"""


class UsageError(Exception):
    """The command line is wrong: exit code 2."""


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
        "rerank", help="score contexts against a query and print them best first",
        description="Score each context against the query and print them best first.",
        epilog=RERANK_INPUT + "\n" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rerank.add_argument("query", metavar="QUERY", nargs="?", help="the query (may come from a --file Cloudflare body instead)")
    rerank.add_argument("contexts", metavar="CONTEXT", nargs="*", help="texts to rank")
    rerank.add_argument("--file", "-f", metavar="PATH", help="read contexts from this JSON/JSONL/text file ('-' for stdin)")
    rerank.add_argument("--top-k", type=positive_int, metavar="K", help="print only the K best")
    rerank.add_argument("--json", action="store_true", help='print {"response": [{"id", "score", "text"}]} instead of a table')
    _add_model_arguments(rerank)
    rerank.set_defaults(run=_rerank)

    download = commands.add_parser(
        "download", help="fetch the model's files from the Hugging Face Hub",
        description="Fetch config.json, tokenizer.json, model.safetensors (and small tokenizer files) of a "
        "Hugging Face repo, verify them, and print the folder they are in.",
        epilog=f"examples:\n  nprerank download\n  nprerank download {DEFAULT_MODEL} --dir weights/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    download.add_argument("repo_id", metavar="REPO_ID", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    download.add_argument("--dir", metavar="DIR", help="write the files into this plain folder (default: the Hugging Face cache)")
    download.add_argument("--revision", help="a branch, tag or commit (default: main)")
    download.set_defaults(run=_download)

    # serve and bench bring their own arguments; add_help=False so that their --help reaches them
    serve = commands.add_parser("serve", help="HTTP server speaking Cloudflare, TEI and Cohere/Jina rerank APIs", add_help=False)
    serve.set_defaults(run=_serve)
    bench = commands.add_parser("bench", help="measure speed against torch and ONNX Runtime", add_help=False)
    bench.set_defaults(run=_bench)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", default=os.environ.get("NPRERANK_MODEL") or DEFAULT_MODEL,
                       help="a model folder or Hugging Face repo id (default: $NPRERANK_MODEL or %(default)s)")
    group.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads to use (default: all, or $NPRERANK_NUM_THREADS)")
    group.add_argument("--max-length", type=positive_int, metavar="N", help="tokens per query+context pair (default 512)")
    group.add_argument("--truncation", choices=("only_second", "longest_first"), default="only_second",
                       help="only_second cuts the context, never the query (FlagEmbedding); longest_first cuts "
                       "the longer one (sentence-transformers, TEI). Default %(default)s")
    group.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                       help="fp32 (exact) or int8 (the encoder's products on 8-bit integers: faster, logits "
                       "off by ~0.01-1 on random models, docs/performance.md). Default %(default)s")
    group.add_argument("--long-documents", choices=("truncate", "chunk"), default="truncate",
                       help="truncate: score the start of a long context; chunk: score overlapping windows and "
                       "keep the best. Default %(default)s")


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("serve", "bench"):
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
    query, contexts, top_k = args.query, list(args.contexts), args.top_k
    if args.file is not None or (not contexts and sys.stdin is not None and not sys.stdin.isatty()):
        source = args.file if args.file not in (None, "-") else "<stdin>"
        text = sys.stdin.read() if source == "<stdin>" else _read_file(args.file)
        file_query, file_contexts, file_top_k = read_contexts(text, source)
        query = query if query is not None else file_query
        top_k = top_k if top_k is not None else file_top_k
        contexts += file_contexts
    if query is None:
        raise UsageError("a QUERY is required")
    if not query.strip():
        raise UsageError("the query is empty")
    if not contexts:
        raise UsageError("no contexts to rank: give them as arguments, with --file, or on stdin")
    for i, context in enumerate(contexts):
        if not context.strip():
            raise UsageError(f"context {i} is empty")

    from .reranker import Reranker  # numpy, numba: only once the command line is known to be good

    options = dict(truncation=args.truncation, long_documents=args.long_documents, precision=args.precision)
    if args.max_length is not None:
        options["max_length"] = args.max_length
    if args.threads is not None:
        options["threads"] = args.threads
    reranker = Reranker.from_pretrained(args.model, **options)
    ranked = reranker.rerank(query, [{"text": text} for text in contexts], top_k=top_k)
    for hit in ranked:
        hit["text"] = contexts[hit["id"]]
    if args.json:
        print(json.dumps({"response": ranked}, ensure_ascii=False))
    else:
        print(format_table(ranked))
    return 0


def _read_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OSError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def read_contexts(text: str, source: str) -> tuple:
    """A file's text -> (query or None, [context], top_k or None). See RERANK_INPUT for the formats."""
    stripped = text.strip()
    if not stripped:
        return None, [], None
    if not (source.endswith((".json", ".jsonl")) or stripped[0] in '[{"'):
        return None, [line for line in stripped.splitlines() if line.strip()], None
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # "Extra data": several JSON values, i.e. JSONL
            raise ValueError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        items = []
        for number, line in enumerate(stripped.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as line_error:
                    raise ValueError(f"{source}: line {number} is not valid JSON: {line_error.msg}") from None
        return None, [_context(item, f"{source}: line {i + 1}") for i, item in enumerate(items)], None
    query, top_k = None, None
    if isinstance(data, dict) and "text" not in data:  # a request body: Cloudflare's, or TEI's / Cohere's
        key = next((k for k in ("contexts", "documents", "texts") if k in data), None)
        if key is None or not isinstance(data[key], list):
            raise ValueError(f"{source}: expected a list of contexts or an object with a 'contexts' list")
        query, top_k, data = data.get("query"), data.get("top_k"), data[key]
        if query is not None and not isinstance(query, str):
            raise ValueError(f"{source}: 'query' must be a string")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"{source}: 'top_k' must be an integer >= 1, got {top_k!r}")
    items = data if isinstance(data, list) else [data]
    return query, [_context(item, f"{source}: item {i}") for i, item in enumerate(items)], top_k


def _context(item, where: str) -> str:
    text = item.get("text") if isinstance(item, dict) else item
    if not isinstance(text, str):
        raise ValueError(f"{where} must be a string or an object with a 'text' string, got {json.dumps(item)[:60]}")
    if not text.strip():
        raise ValueError(f"{where} is empty")
    return text


def format_table(ranked: list, width: int | None = None) -> str:
    """[{"id", "score", "text"}] -> aligned rows of rank, id, score and the start of the text."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    id_width = max(2, *(len(str(hit["id"])) for hit in ranked))
    rank_width = max(4, len(str(len(ranked))))
    preview = max(20, width - rank_width - id_width - 8 - 6)
    lines = [f"{'rank':>{rank_width}}  {'id':>{id_width}}  {'score':<8}  text"]
    for rank, hit in enumerate(ranked, 1):
        text = " ".join(hit["text"].split())
        if len(text) > preview:
            text = text[: preview - 3] + "..."
        lines.append(f"{rank:>{rank_width}}  {hit['id']:>{id_width}}  {hit['score']:.6f}  {text}")
    return "\n".join(lines)


# --- download, serve, bench --------------------------------------------------------------------


def _download(args, rest) -> int:
    from .hub import download

    folder = download(args.repo_id, args.dir, revision=args.revision)
    print(folder)
    return 0


def _serve(args, rest) -> int:
    server = _optional_module("server", "serve", "pip install 'nprerank[server]'")
    parser = _Parser(prog="nprerank serve", description="Serve reranking over HTTP (Cloudflare Workers AI, "
                     "Text Embeddings Inference and Cohere/Jina dialects).")
    server.add_arguments(parser)
    return server.serve_from_args(parser.parse_args(rest)) or 0


def _bench(args, rest) -> int:
    bench = _optional_module("bench", "bench", "pip install 'nprerank[bench]'")
    parser = _Parser(prog="nprerank bench", description="Measure nprerank against torch and ONNX Runtime.")
    bench.add_arguments(parser)
    return bench.run_from_args(parser.parse_args(rest)) or 0


def _optional_module(name: str, command: str, install: str):
    import importlib

    try:
        return importlib.import_module(f".{name}", __package__)
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.{name}":
            raise OSError(f"`nprerank {command}` is not part of this installation") from None
        raise OSError(f"`nprerank {command}` needs {e.name}: {install}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
