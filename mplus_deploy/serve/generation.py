"""``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (OpenAI's formats, docs/serving.md).

A request's ``user`` selects the memory the answer comes from (the store's session of that id, read under the
id's lock for the prefill); no ``user``: the artifact's initial memory (the engine's own session, which the
server never writes). Generation itself is ``Session.stream``: the answers are those of ``Engine.generate``
with the same memory, prompt ids and ``SamplingParams``.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .errors import ApiError
from .ids import BadMemoryId, check_memory_id
from .schemas import ChatRequest, CompletionRequest

router = APIRouter()
COMPLETION_DEFAULT_MAX = 16  # OpenAI's default max_tokens of /v1/completions


@router.get("/v1/models")
async def models(request: Request):
    st = request.app.state.serve
    return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.started,
                                         "owned_by": "mplus-deploy"}]}


@router.post("/v1/completions")
def completions(req: CompletionRequest, request: Request):
    st = request.app.state.serve
    _check(st, req)
    prompt = req.prompt[0] if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) else req.prompt
    ids = _encode(lambda: st.engine.codec.encode_prompt(prompt) if isinstance(prompt, str) else torch.tensor(prompt))
    return _answer(st, req, ids, "completions", req.params(COMPLETION_DEFAULT_MAX))


@router.post("/v1/chat/completions")
def chat(req: ChatRequest, request: Request):
    st = request.app.state.serve
    _check(st, req)
    ids = _encode(lambda: st.engine.codec.encode_chat([{"role": m.role, "content": m.content} for m in req.messages]))
    room = max(0, st.engine.config.max_window - int(ids.numel()))  # OpenAI's chat default: up to the context
    return _answer(st, req, ids, "chat", req.params(room))


# ------------------------------------------------------------------------------------ helpers
def _check(st, req) -> None:
    if req.model != st.model_name:
        raise ApiError(404, f"model {req.model!r} does not exist; this server serves {st.model_name!r} (GET /v1/models)",
                       "model", "model_not_found")
    req.check_supported()
    if req.user is not None:
        try:
            check_memory_id(req.user)
        except BadMemoryId as e:
            raise ApiError(400, f"user: {e}", "user", "invalid_value") from None


def _encode(fn) -> torch.Tensor:
    from jinja2 import TemplateError

    try:
        ids = fn()
    except (ValueError, TemplateError) as e:  # bad token ids, no chat template, a template that refuses the messages
        raise ApiError(400, str(e), "messages" if isinstance(e, TemplateError) else "prompt", "invalid_value") from None
    if ids.numel() == 0:
        raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
    return ids


def _answer(st, req, ids: torch.Tensor, endpoint: str, params):
    t0 = time.perf_counter()
    try:
        if req.user is None or not st.store.is_live(req.user):
            # no memory of its own: the initial memory, which the engine's own session holds (generation draws
            # nothing from the drop generator, so any session on the initial memory answers the same)
            pieces = st.engine.stream(ids, params=params, stop=req.stops())
        else:
            with st.store.lock(req.user):
                pieces = st.store.session(req.user).stream(ids, params=params, stop=req.stops())
    except ValueError as e:  # window, max_prompt, token ids: nothing was generated or written
        raise ApiError(400, str(e), "prompt", "invalid_value") from None
    rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    timed = _timed(st.metrics, endpoint, pieces, t0)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(st, rid, endpoint, timed, int(ids.numel()), include_usage),
                                 media_type="text/event-stream")
    text, n, reason = [], 0, None
    for p in timed:
        text.append(p.text)
        n += p.token is not None
        reason = p.finish_reason or reason
    out = {"id": rid, "created": int(time.time()), "model": st.model_name,
           "usage": {"prompt_tokens": int(ids.numel()), "completion_tokens": n, "total_tokens": int(ids.numel()) + n}}
    if endpoint == "chat":
        out.update(object="chat.completion", choices=[{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                                       "finish_reason": reason, "logprobs": None}])
    else:
        out.update(object="text_completion", choices=[{"index": 0, "text": "".join(text), "finish_reason": reason,
                                                       "logprobs": None}])
    return out


def _timed(metrics, endpoint: str, pieces, t0: float) -> Iterator:
    """The pieces, with time to first token, inter-token and end-to-end latency recorded."""
    last = None
    for p in pieces:
        if p.token is not None:
            now = time.perf_counter()
            if last is None:
                metrics.ttft.labels(endpoint).observe(now - t0)
            else:
                metrics.itl.labels(endpoint).observe(now - last)
            last = now
            metrics.tokens.inc()
        yield p
    metrics.e2e.labels(endpoint).observe(time.perf_counter() - t0)


def _sse(st, rid: str, endpoint: str, pieces, n_prompt: int, include_usage: bool) -> Iterator[str]:
    created, n = int(time.time()), 0
    chat = endpoint == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        c = {"id": rid, "object": obj, "created": created, "model": st.model_name, "choices": [choice]}
        if include_usage:
            c["usage"] = None
        return f"data: {json.dumps(c)}\n\n"

    if chat:
        yield chunk("", None, first=True)
    for p in pieces:
        n += p.token is not None
        if p.finish_reason is not None:
            if p.text:
                yield chunk(p.text, None)
            yield chunk(None, p.finish_reason)
        elif p.text:
            yield chunk(p.text, None)
    if include_usage:
        u = {"id": rid, "object": obj, "created": created, "model": st.model_name, "choices": [],
             "usage": {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}}
        yield f"data: {json.dumps(u)}\n\n"
    yield "data: [DONE]\n\n"
