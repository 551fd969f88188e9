"""The feed's HTTP API (FastAPI).

Routes:
- ``GET /generate`` → JSON array of strings: the seed's contract, from the server's own stream.
- ``GET /v1/batch?size=N&cursor=C&rank=R&world_size=W[&tokens=1]`` → a ``FeedBatch`` (``{"texts", "sources",
  "ids", "cursor", "tokens"}``), or with ``tokens=1`` a ``TokenBatch`` (the texts' token ids, binary; the
  contract is ``data.feed_protocol``). Asking again from a cursor returns the same corpus texts in the same
  order; teacher texts are never replayed (they are fresh samples).
- ``GET /v1/heldout?size=N`` → ``HeldOut``: the first N held-out documents (fixed; never in the training
  stream).
- ``GET /health`` (no key), ``GET /metrics`` (Prometheus), ``GET /docs`` and ``/openapi.json``.

Every route but ``/health`` needs ``Authorization: Bearer KEY`` when a key is set (compared in constant time).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter

from ..data.feed_protocol import TOKEN_BATCH_MEDIA_TYPE, BatchQuery, FeedBatch, HeldOut, TokenBatch
from ..serving import harden
from .corpus import Cursor, CursorError
from .mixer import Feed, NoSoftLabels, TeacherBehind
from .settings import FeedLimits

MAX_BODY_BYTES = 64 * 2**10
"""The feed's routes take no body: anything bigger than a form is refused."""
RETRY_AFTER_S = 5
"""What a 503 from a strict feed whose teachers are behind tells the client to wait."""


def get_feed(request: Request) -> Feed:
    return request.app.state.feed


def get_limits(request: Request) -> FeedLimits:
    return request.app.state.limits


FeedDep = Annotated[Feed, Depends(get_feed)]
LimitsDep = Annotated[FeedLimits, Depends(get_limits)]
Size = Annotated[int, Query(ge=1, description="number of texts (at most the server's --max-batch-size)")]

router = APIRouter()  # the key is checked in front of the app (serving.Guard), before any body is read
JSON_OF = {kind: TypeAdapter(kind) for kind in (FeedBatch, HeldOut, list[str])}


def _json(answer: FeedBatch | HeldOut | list[str]) -> Response:
    """An answer serialised once, by pydantic-core. Returned as a model, FastAPI would dump it, validate the
    dump against the response model and encode that again with the standard library: three passes over half
    a megabyte of text, which cost the feed most of its throughput (bench/RESULTS.md, "Feed throughput"). The
    response models stay on the routes for the schema and the docs."""
    kind = list[str] if isinstance(answer, list) else type(answer)
    return Response(JSON_OF[kind].dump_json(answer), media_type="application/json")  # bytes: no re-encoding


def _check_size(size: int, limits: FeedLimits) -> int:
    if size > limits.max_batch_size:
        raise HTTPException(status_code=422, detail=f"size {size} is over this server's limit of "
                                                    f"{limits.max_batch_size} texts")
    return size


@router.get("/health")
def health(feed: FeedDep) -> dict:
    return feed.health()


@router.get("/generate", response_model=list[str])
def generate(feed: FeedDep, limits: LimitsDep):
    return _json(feed.batch(limits.batch_size, None).texts)


@router.get("/v1/batch", response_model=FeedBatch,
            responses={200: {"content": {TOKEN_BATCH_MEDIA_TYPE: {}}, "description":
                             "a FeedBatch (JSON), or with tokens=1 a TokenBatch (safetensors)"}})
def batch(feed: FeedDep, limits: LimitsDep, query: Annotated[BatchQuery, Query()]):
    _check_size(query.size, limits)
    if query.rank >= query.world_size:
        raise HTTPException(status_code=422, detail=f"rank {query.rank} must be below world_size "
                                                    f"{query.world_size}")
    if query.world_size > len(feed.corpus.texts):
        raise HTTPException(status_code=422, detail=f"world_size {query.world_size} exceeds the corpus's "
                                                    f"{len(feed.corpus.texts)} documents")
    try:
        start = (Cursor.decode(query.cursor, feed.corpus.fingerprint_for(query.window)) if query.cursor
                 else Cursor(0, 0))
    except CursorError as err:
        raise HTTPException(status_code=400, detail=str(err)) from None
    try:
        answer = feed.batch(query.size, start, query.rank, query.world_size, query.tokens, query.soft_labels,
                            query.window)
    except NoSoftLabels as err:
        raise HTTPException(status_code=400, detail=str(err)) from None
    if isinstance(answer, TokenBatch):
        return Response(answer.to_bytes(), media_type=TOKEN_BATCH_MEDIA_TYPE)
    return _json(answer)


@router.get("/v1/heldout", response_model=HeldOut)
def heldout(feed: FeedDep, limits: LimitsDep, size: Size = 64):
    return _json(HeldOut(texts=feed.corpus.held_out[: _check_size(size, limits)]))


@router.get("/metrics")
def metrics(feed: FeedDep) -> PlainTextResponse:
    return PlainTextResponse(generate_latest(feed.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request) -> dict:
    return request.app.openapi()


@router.get("/docs", include_in_schema=False)
def docs():
    return get_swagger_ui_html(openapi_url="/openapi.json", title="scratchlm feed")


def create_app(feed: Feed, api_key: str | None, limits: FeedLimits | None = None) -> FastAPI:
    app = FastAPI(title="scratchlm feed", docs_url=None, redoc_url=None, openapi_url=None,
                  description=__doc__)
    app.state.feed, app.state.limits = feed, limits or FeedLimits()
    app.include_router(router)

    @app.exception_handler(TeacherBehind)
    async def teachers_behind(request: Request, err: TeacherBehind) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    def count(status: int) -> None:
        if status >= 400:
            feed.errors.labels(str(status)).inc()

    return harden(app, api_key, MAX_BODY_BYTES, count)
