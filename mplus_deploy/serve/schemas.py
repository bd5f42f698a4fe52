"""Request bodies of the OpenAI and memory routes (pydantic; unknown fields are accepted and ignored, as the
OpenAI API does, except those that would change the answer and are not supported: they are refused)."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from mplus_deploy.model.sampling import SamplingParams

from .errors import ApiError


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = 1
    logprobs: object | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(400, "n: only n=1 is supported", "n", "unsupported_value")
        if self.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs: not supported by this server", "logprobs", "unsupported_value")
        stops = self.stops()
        if len(stops) > 4 or any(not isinstance(s, str) or not s for s in stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", "stop", "invalid_value")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def params(self, default_max: int) -> SamplingParams:
        """OpenAI sampling fields → ``SamplingParams``: temperature 0 is greedy, otherwise sampling with that
        temperature and top_p; ``seed`` seeds the sampling generator."""
        n = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        greedy = self.temperature == 0.0
        return SamplingParams(max_new_tokens=default_max if n is None else n, do_sample=not greedy,
                              temperature=1.0 if greedy else self.temperature, top_p=self.top_p, seed=self.seed)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str]]
    echo: bool = False
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ApiError(400, "echo: not supported by this server", "echo", "unsupported_value")
        if self.suffix:
            raise ApiError(400, "suffix: not supported by this server", "suffix", "unsupported_value")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request (a list of one string, a string or token ids)",
                               "prompt", "unsupported_value")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class MemorizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    ids: list[int] | None = None
    chunk_size: int | None = Field(default=512, gt=0)

    def content(self):
        if (self.text is None) == (self.ids is None):
            raise ApiError(400, "pass exactly one of text or ids", "text", "invalid_value")
        if self.text is not None and not self.text.strip():
            raise ApiError(400, "text: empty; nothing to memorize", "text", "invalid_value")
        if self.ids is not None and not self.ids:
            raise ApiError(400, "ids: empty; nothing to memorize", "ids", "invalid_value")
        return self.text if self.text is not None else self.ids
