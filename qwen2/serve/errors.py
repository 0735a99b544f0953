"""OpenAI-style errors, and turning a request body into a validated request model."""
from __future__ import annotations

from typing import TypeVar

from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from qwen2.serve.protocol import ErrorInfo, ErrorResponse

M = TypeVar("M", bound=BaseModel)


def json_response(body: BaseModel, status_code: int = 200, headers: dict | None = None) -> Response:
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json",
                    headers=headers)


class APIError(Exception):
    """Raised anywhere below a route; the app answers it with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.close = status, close   # close: end the connection (its body was not read)
        self.info = ErrorInfo(message=message, type=type_, param=param, code=code)

    @property
    def body(self) -> ErrorResponse:
        return ErrorResponse(error=self.info)

    def response(self) -> Response:
        return json_response(self.body, self.status, {"Connection": "close"} if self.close else None)


def parse_request(body: bytes, schema: type[M]) -> M:
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        raise _bad_request(schema, _most_telling(e.errors())) from None


def _is_union_tag(x) -> bool:
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x)


def _most_telling(errors: list[dict]) -> dict:
    """The error to report, with union branches ("str", "list[str]") dropped from its location:
    for `stop: [5 strings]` "at most 4 items" under `stop`, not "stop.str: should be a string"."""
    tags = [[x for x in e["loc"] if _is_union_tag(x)] for e in errors]
    errors = [dict(e, loc=tuple(x for x in e["loc"] if not _is_union_tag(x))) for e in errors]
    first = errors[0]
    same_field = [(e, t) for e, t in zip(errors, tags) if e["loc"] == first["loc"]]
    telling = next((e for e, _ in same_field if not e["type"].endswith("_type")), None)
    if telling is not None:
        return telling
    branches = list(dict.fromkeys(t[0] for _, t in same_field if t))
    if len(branches) > 1:   # no branch of the union fits: say which types are accepted
        return dict(first, msg=f"must be one of {', '.join(branches)}")
    return first


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _bad_request(schema: type[BaseModel], err: dict) -> APIError:
    if err["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {err['msg']}")
    param = ".".join(str(x) for x in err["loc"]) or None
    if err["type"] in _BOUND_ERRORS and len(err["loc"]) == 1:
        # pydantic names only the bound that was crossed; clients need the whole range
        limits = _allowed_range(schema.model_fields[param].metadata)
        return APIError(400, f"{param} must be {limits} (got {err['input']!r})", param=param)
    return APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param)


_WORDS = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}


def _allowed_range(constraints) -> str:
    """'between 1 and 16', 'in (0, 1]' or 'at least 0', from a field's Field(ge=..., ...) limits."""
    b = {k: getattr(c, k) for c in constraints for k in _WORDS if hasattr(c, k)}
    lo = next((k for k in ("ge", "gt") if k in b), None)
    hi = next((k for k in ("le", "lt") if k in b), None)
    if lo and hi:
        if (lo, hi) == ("ge", "le"):
            return f"between {b[lo]} and {b[hi]}"
        return f"in {'[' if lo == 'ge' else '('}{b[lo]}, {b[hi]}{']' if hi == 'le' else ')'}"
    return f"{_WORDS[lo or hi]} {b[lo or hi]}"
