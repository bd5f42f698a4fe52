"""The memory routes (docs/serving.md "Memory API"). Every route validates the id first (``ids.py``); a
memorize is answered only after its new state is durable (``MemoryStore.commit``); a request that fails
changes no memory (input checked before any update; a failure after one drops the half-updated session so the
committed state reloads)."""
from __future__ import annotations

import os
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from mplus_deploy.runtime import SnapshotError

from .errors import ApiError
from .ids import BadMemoryId, check_memory_id
from .schemas import MemorizeRequest

router = APIRouter(prefix="/v1/memory")


def _id(mid: str) -> str:
    try:
        return check_memory_id(mid)
    except BadMemoryId as e:
        raise ApiError(400, str(e), "id", "invalid_value") from None


def _known(st, mid: str) -> dict:
    row = st.store.info(mid)
    if row is None:
        raise ApiError(404, f"memory {mid!r} does not exist (memorize into it first)", "id", "memory_not_found")
    return row


@router.post("/{mid}/memorize")
def memorize(mid: str, req: MemorizeRequest, request: Request):
    st = request.app.state.serve
    mid = _id(mid)
    content = req.content()
    with st.store.lock(mid):
        sess = st.store.session(mid)
        try:
            stats = sess.memorize(content, chunk_size=req.chunk_size, progress=False)
        except ValueError as e:  # token ids out of range, text the tokenizer cannot take (checked before any update)
            st.store.discard(mid)  # ... or a later failure: the committed state reloads either way
            raise ApiError(400, str(e), "text" if req.text is not None else "ids", "invalid_value") from None
        except BaseException:
            st.store.discard(mid)
            raise
        try:
            row = st.store.commit(mid, sess)
        except BaseException:
            st.store.discard(mid)
            raise
    st.metrics.memory_rows(st.store.resident_stats())
    return {"id": mid, "version": row["version"], "updates": row["updates"], "bytes": row["bytes"], "memory": stats}


@router.get("/{mid}")
def stats(mid: str, request: Request):
    st = request.app.state.serve
    mid = _id(mid)
    with st.store.lock(mid):
        row = _known(st, mid)
        memory = st.store.session(mid).memory
    return {"id": mid, "version": row["version"], "updates": row["updates"], "bytes": row["bytes"],
            "last_use": row["last_use"], "memory": memory}


@router.delete("/{mid}")
def reset(mid: str, request: Request):
    st = request.app.state.serve
    mid = _id(mid)
    with st.store.lock(mid):
        _known(st, mid)
        st.store.delete(mid)
    st.metrics.memory_rows(st.store.resident_stats())
    return {"id": mid, "deleted": True}


@router.get("/{mid}/snapshot")
def download(mid: str, request: Request):
    st = request.app.state.serve
    mid = _id(mid)
    with st.store.lock(mid):  # a hard link keeps this version's bytes while a later commit replaces the file
        _known(st, mid)
        src = st.store.snapshot_file(mid)
        link = st.store.tmp / f"{src.stem}.{uuid.uuid4().hex}.download"  # one per download
        os.link(src, link)
    return FileResponse(link, media_type="application/octet-stream", filename=f"{mid}.safetensors",
                        background=BackgroundTask(link.unlink, missing_ok=True))


@router.put("/{mid}/snapshot")
async def upload(mid: str, request: Request):
    st = request.app.state.serve
    mid = _id(mid)
    data = await request.body()
    if not data:
        raise ApiError(400, "empty body: PUT the bytes of a snapshot (GET /v1/memory/{id}/snapshot)", "body", "invalid_value")
    from starlette.concurrency import run_in_threadpool

    def put():
        with st.store.lock(mid):
            try:
                return st.store.upload(mid, data)
            except SnapshotError as e:
                msg = str(e).replace(str(st.store.tmp), "<upload>")
                raise ApiError(400, f"not a valid memory snapshot for this model: {msg}", "body", "invalid_snapshot") from None

    row = await run_in_threadpool(put)
    st.metrics.memory_rows(st.store.resident_stats())
    return {"id": mid, "version": row["version"], "updates": row["updates"], "bytes": row["bytes"]}


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
def bad_path(rest: str):
    """Anything else under /v1/memory/: an id with a '/' (or an unknown sub-route) is a bad request, not a path."""
    head, _, tail = rest.partition("/")
    if tail in ("memorize", "snapshot") and "/" not in head:
        raise ApiError(404, f"no such route /v1/memory/{rest} for this method", None, "not_found")
    raise ApiError(400, f"memory id {rest!r} is invalid: use 1-128 characters of A-Z a-z 0-9 . _ - @ :, starting with "
                        "a letter or digit", "id", "invalid_value")
