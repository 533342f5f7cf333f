"""The dialects this server speaks, in one list: the app routes them and openapi.py describes them.

To add a dialect: write its module (a `Dialect` subclass naming its paths, rules, answer, errors
and schemas, with the source it follows), then list it here.
"""

from .cloudflare import Cloudflare
from .cohere import Cohere, CohereV2
from .limits import Limits
from .tei import TEI


def dialects(limits: Limits) -> list:
    """One instance of each dialect, configured by the server's settings."""
    return [Cloudflare(), TEI(limits.auto_truncate, limits.truncation), Cohere(), CohereV2()]
