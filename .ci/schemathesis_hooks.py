"""Schemathesis hooks for .ci/run: adjust a few generated requests just before they are sent.

Each adjustment keeps docs/openapi.json true (it describes kv, not this test run) and keeps the
request what schemathesis meant it to be (valid stays valid, invalid stays invalid). schemathesis
re-checks every case after this hook, so its checks judge the request as actually sent.
"""

import base64
import re

import schemathesis
from schemathesis.core.parameters import ParameterLocation

# Longest long-poll sent, in seconds. The document says `wait` is 0 to 60, and a valid wait with
# nothing after `since` (most generated `since` values are far ahead of the store) holds the
# request that long: a few hundred of them would take the run past its budget, or past the
# request timeout. One second still exercises the waiting path.
MAX_WAIT_SECS = 1

# What a cursor looks like (the document's pattern): canonical unpadded base64url.
CURSOR = re.compile(r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}[AEIMQUYcgkosw048]|[A-Za-z0-9_-][AQgw])?$")


# The document's pattern for `If-Match` and `If-None-Match`.
ENTITY_TAGS = re.compile(
    r'^[ \t]*\*[ \t]*$|^[ \t,]*(?:W/)?"[!#-~]*"(?:[ \t]*,[ \t,]*(?:W/)?"[!#-~]*")*[ \t]*(?:,[ \t,]*)?$'
)


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    """POST /import takes NDJSON, which schemathesis has no serializer for: a generated string is
    sent as it is, anything else (the invalid-data phase) as one JSON line."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    import json

    return (json.dumps(value) + "\n").encode("utf-8")


def _relabel_preconditions(case):
    """schemathesis 4.32's coverage phase, when it finds no value of the pattern, builds cases it
    calls valid with an invalid `If-None-Match` (empty, or a number); kv rightly refuses them with
    400 invalid_precondition. Marking the headers as edited makes schemathesis check them against
    the document again, so such a case counts as the invalid request it is. (`_meta` and
    `mark_dirty` are schemathesis internals: the version is pinned, and an upgrade that drops them
    fails every case with an AttributeError rather than passing quietly.)"""
    meta = case._meta
    if meta is None or ParameterLocation.HEADER not in meta.components:
        return
    headers = case.headers or {}
    if any(
        name in headers and not ENTITY_TAGS.match(str(headers[name]))
        for name in ("If-Match", "If-None-Match")
    ):
        meta.mark_dirty(ParameterLocation.HEADER)


def _clamp_wait(query):
    wait = query.get("wait")
    if isinstance(wait, int) and not isinstance(wait, bool) and MAX_WAIT_SECS < wait <= 60:
        query["wait"] = MAX_WAIT_SECS


def _real_cursor(query):
    """A cursor is the base64url of a key (UTF-8). A random string of the right shape rarely
    decodes to UTF-8, and kv rightly refuses it (400 invalid_cursor), so one of the right shape
    becomes the cursor of a key; one of the wrong shape stays, to be refused."""
    cursor = query.get("cursor")
    if not isinstance(cursor, str) or cursor == "" or not CURSOR.match(cursor):
        return
    try:
        base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        query["cursor"] = base64.urlsafe_b64encode(cursor.encode()).decode().rstrip("=")


# Keys and collection names are limited in bytes of UTF-8 (1024 and 256); JSON Schema's maxLength
# counts characters, so the document can only give the same number as an upper bound.
MAX_BYTES = {"key": 1024, "collection": 256, "name": 256}


def _fit(names):
    """A name within maxLength characters but over the byte limit is valid by the document and
    rightly refused by kv (400); cut it to the byte limit, on a character boundary. A name over
    maxLength characters (an invalid one) stays as it is."""
    if not isinstance(names, dict):
        return
    for field, limit in MAX_BYTES.items():
        name = names.get(field)
        if isinstance(name, str) and len(name) <= limit < len(name.encode()):
            names[field] = name.encode()[:limit].decode("utf-8", errors="ignore")


def _fit_names(case):
    _fit(case.path_parameters)
    _fit(case.query)
    body = case.body
    if isinstance(body, dict):
        _fit(body)
        ops = body.get("ops")
        if isinstance(ops, list):
            for op in ops:
                _fit(op)


def _whole_numbers(value):
    """JSON Schema counts 86625.0 as an integer, and Python writes it with the `.0`; kv (as the
    README says) takes `ttl` and `if_rev` only as whole numbers written without a fraction."""
    if isinstance(value, dict):
        for name in ("ttl", "if_rev"):
            number = value.get(name)
            if isinstance(number, float) and number.is_integer():
                value[name] = int(number)
        for item in value.values():
            _whole_numbers(item)
    elif isinstance(value, list):
        for item in value:
            _whole_numbers(item)


@schemathesis.hook
def before_call(context, case, kwargs):
    _relabel_preconditions(case)
    _fit_names(case)
    if isinstance(case.query, dict):
        if case.path == "/changes":
            _clamp_wait(case.query)
        if case.path == "/objects":
            _real_cursor(case.query)
    if case.path == "/batch" or case.path == "/objects":
        _whole_numbers(case.body)
