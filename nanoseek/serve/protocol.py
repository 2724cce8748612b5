"""The OpenAI-compatible wire format: pydantic request and response models, and their mapping to SamplingParams.

What. Request bodies of `/v1/completions`, `/v1/chat/completions`, `/v1/load_lora_adapter`,
`/v1/unload_lora_adapter` (vLLM's names), validated strictly ("16" is not an int, unknown `role`s are refused,
ranges as OpenAI documents them: temperature in [0, 2], top_p in (0, 1], penalties in [-2, 2], completions
logprobs in [0, 20], chat top_logprobs in [0, 20]); the response and streaming-chunk shapes; `APIError`, the
one exception the server turns into `{"error": {"message", "type", "param", "code"}}`.
Fields that OpenAI accepts and this server cannot honour (n > 1, best_of > 1, echo, suffix, logit_bias) are
refused with a 400 naming the field, never silently ignored; other unknown fields are ignored, as OpenAI's
own server and vLLM do, so newer clients keep working.

Why pydantic: FastAPI validates and documents (`/docs`) the same models, and a validation error carries the
field path that becomes the error's `param`.

Rejected: hand-written dict checks (the same rules twice: once for validation, once for the docs);
`extra="forbid"` (the official client sends fields such as `user` or `logit_bias={}` by default in some versions).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .sampling import SamplingParams

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MaxTokens = Annotated[StrictInt, Field(ge=1)]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None


class APIError(Exception):
    """An error answered as OpenAI's JSON: status 400/401/404/429/503..., type, optional param and code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _Sampling(_Request):
    """Fields shared by completions and chat completions."""

    model: StrictStr
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None  # vLLM's extension
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    stop_token_ids: list[StrictInt] | None = None  # vLLM's extension
    ignore_eos: StrictBool = False  # vLLM's extension
    seed: StrictInt | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    return_tokens_as_token_ids: StrictBool = False  # vLLM's extension: logprobs name tokens "token_id:N"
    user: StrictStr | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n={self.n}: this server returns one choice per request; send n=1 (or omit it) "
                                "and repeat the request for more samples", param="n")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(max_tokens=max_tokens if max_tokens is not None else 16, temperature=self.temperature,
                                top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=stop,
                                stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                                logprobs=logprobs, presence_penalty=self.presence_penalty,
                                frequency_penalty=self.frequency_penalty)
        try:
            params.validate()
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":")[0]) from None
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name, bad in (("echo", self.echo), ("best_of", self.best_of not in (None, 1)), ("suffix", self.suffix)):
            if bad:
                raise APIError(400, f"{name} is not supported", param=name)

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each a string or token ids (one choice per prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if self.messages[-1].role == "assistant":
            raise APIError(400, "the last message must be from the user or system (the reply is generated)",
                           param="messages")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadLoraRequest(_Request):
    lora_name: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    lora_path: Annotated[StrictStr, Field(min_length=1)]


class UnloadLoraRequest(_Request):
    lora_name: Annotated[StrictStr, Field(min_length=1)]


# ---------------------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details={"cached_tokens": cached})


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nanoseek"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
