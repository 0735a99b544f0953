"""Schema-driven fuzzing of a live `qwen2 serve` (schemathesis, from the server's own /openapi.json):
bodies that follow the request schemas and bodies that break them, on every operation. No answer
may be a 5xx, and a well-formed request right after each operation's run still succeeds. Bounded
in examples and time (a short context keeps every generation short)."""
import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from test_serve_lifecycle import ckpt  # noqa: F401 (the module's checkpoint fixture)
from test_serving_api import start_server, stop_server

EXAMPLES = 30          # per operation and mode
BUDGET_S = 50.0        # all operations together; what is left unrun when it is spent is reported
WELL_FORMED = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(ckpt):  # noqa: F811
    proc, url = start_server(ckpt, "--max-model-len", "48", "--max-batch", "8")
    yield url
    assert stop_server(proc) == 0


def _served_model(case):
    """Valid bodies name this server's model (or none): a random name is only ever a 400."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"
    return case


def _short_prompt(case):
    """Every other field as generated, the prompt a short valid one: most such bodies reach the
    engine, so the sampling fields are fuzzed against real generation."""
    case = _served_model(case)
    if isinstance(case.body, dict):
        if "messages" in case.body:
            case.body["messages"] = [{"role": "user", "content": "hi"}]
            for k in ("tools", "tool_choice", "max_completion_tokens"):
                case.body.pop(k, None)
        else:
            case.body["prompt"] = "Hello"
        if isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = case.body["max_tokens"] % 8 + (0 if case.body.get("echo") else 1)
    return case


MODES = [("positive", GenerationMode.POSITIVE, _served_model), ("negative", GenerationMode.NEGATIVE, _served_model),
         ("valid prompt", GenerationMode.POSITIVE, _short_prompt)]


def test_fuzz_openapi_no_server_errors(server):
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions"}
    statuses, errors, tried, params, by_mode = Counter(), [], Counter(), Counter(), Counter()
    deadline = time.monotonic() + BUDGET_S
    session = __import__("requests").Session()
    for op in operations:
        for name, mode, fix in MODES:
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode).map(fix))
            def run(case):
                if time.monotonic() > deadline:
                    return
                r = case.call(base_url=server, session=session, timeout=60)
                tried[op.label] += 1
                statuses[r.status_code] += 1
                if r.status_code == 400:
                    params[(op.label, name, r.json()["error"]["param"])] += 1
                by_mode[name, r.status_code < 300] += 1
                if r.status_code >= 500:
                    errors.append((op.label, case.body, r.status_code, r.text[:300]))
            try:
                run()
            except Unsatisfiable:   # nothing to break in an operation without parameters or body
                assert mode == GenerationMode.NEGATIVE and op.method.upper() == "GET"
            ok = httpx.post(server + "/v1/completions", json=WELL_FORMED, timeout=60)
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text
    print(f"\nfuzz: {sum(tried.values())} requests {dict(tried)}; statuses {dict(sorted(statuses.items()))}; "
          f"server errors {len(errors)}; (mode, 2xx): {dict(by_mode)}; 400s by param {params.most_common(12)}")
    assert not errors, errors[:5]
    assert sum(tried.values()) >= 50   # the budget was not spent before fuzzing began
    assert httpx.get(server + "/health", timeout=10).status_code == 200
