"""The OpenAI wire format as pydantic models: request bodies (with their limits) and responses.

Requests are validated strictly from the JSON body. Only what the server honours is declared;
unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
Extensions beyond OpenAI: top_k, min_p, repetition_penalty, ignore_eos (vLLM's names).
The limits are the ones SamplingParams enforces, checked here so that a bad value is answered
with its parameter's name.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_TOP_LOGPROBS = 20            # OpenAI's limit for chat
MAX_COMPLETION_LOGPROBS = 5      # and for the legacy completions endpoint


MAX_STOP = 4  # stop strings per request, as OpenAI allows


# =========================================================================== requests
class _In(BaseModel):
    # strict: "10" is not an integer and 1 is not a bool, as in OpenAI's API
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_In):
    include_usage: bool = False


class SamplingRequest(_In):
    # which parameter the prompt is, for errors about its length
    prompt_param: ClassVar[str] = "prompt"
    # with no max_tokens: None = up to the context limit
    default_max_tokens: ClassVar[Optional[int]] = None

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)  # OpenAI's range
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Optional[Union[str, Annotated[list[str], Field(max_length=MAX_STOP)]]] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)  # what a torch.Generator takes
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # extensions (vLLM names)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    # past these, dividing or multiplying the logits overflows them to inf (NaN probabilities)
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=100)
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_strings(self) -> list[str]:
        # "" can never match; OpenAI accepts it, so it is dropped rather than refused
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stop if s]


class TextPart(_In):
    type: Literal["text"]
    text: str


class FunctionCall(_In):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"


class ToolCall(_In):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_In):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None


class FunctionDef(_In):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(_In):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_In):
    type: Literal["function"]
    function: dict[str, str]


class ChatCompletionRequest(SamplingRequest):
    prompt_param: ClassVar[str] = "messages"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)   # declared after logprobs: see below
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        # info.data holds the fields declared before this one
        if v and not info.data.get("logprobs"):
            raise PydanticCustomError("needs_logprobs", "needs logprobs=true")
        return v

    def token_limit(self) -> tuple[Optional[int], str]:
        """(the output limit asked for, the parameter that asked): the newer name wins."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs, self.top_logprobs or 0


class CompletionRequest(SamplingRequest):
    default_max_tokens: ClassVar[Optional[int]] = 16   # OpenAI's default for this endpoint

    prompt: Union[str, list[str], list[int], list[list[int]]]
    # 0 only with echo: the prompt (and with logprobs its logprobs) is the whole answer, as in vLLM
    max_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False

    def token_limit(self) -> tuple[Optional[int], str]:
        return self.max_tokens, "max_tokens"

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


# =========================================================================== responses
class _Out(BaseModel):
    # OpenAI sends some unset fields as null and leaves others out; _omit_none names the
    # left-out ones, so one model_dump_json() gives the exact wire shape.
    _omit_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_omitted(self, handler):
        data = handler(self)
        for k in self._omit_none:
            if k in data and data[k] is None:
                del data[k]
        return data


class ErrorInfo(_Out):
    message: str
    type: str = "invalid_request_error"
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(_Out):
    error: ErrorInfo


class Health(_Out):
    status: Literal["ok"] = "ok"


class ModelCard(_Out):
    _omit_none = ("parent",)
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen2"
    max_model_len: int
    parent: str | None = None   # a LoRA adapter's base model (vLLM's field)


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[Optional[float]]           # with echo the first prompt token's is null
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class FunctionCallOut(_Out):
    name: str
    arguments: str           # JSON text, as OpenAI sends it


class ToolCallOut(_Out):
    _omit_none = ("index",)
    index: Optional[int] = None       # streams only: which call of the reply this is
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Out):
    _omit_none = ("tool_calls",)
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[list[ToolCallOut]] = None


class Delta(_Out):
    _omit_none = ("role", "content", "tool_calls")
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallOut]] = None


class _Envelope(_Out):
    """What every completion body and chunk starts with. After the choices comes usage, which
    streams leave out unless the client asked for it (stream_options.include_usage); then it is
    null until the last chunk."""
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: Optional[str] = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str]


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(_Out):
    index: int
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class Completion(_Envelope):
    """A legacy completion, and each chunk of a streamed one (OpenAI uses one shape for both)."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
