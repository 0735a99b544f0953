"""`<tool_call>{json}</tool_call>` blocks (Qwen2.5 / Hermes format) -> OpenAI tool_calls.

Both whole-text parsing (non-streaming replies) and an incremental parser for streams: plain text
is passed through as soon as it cannot be the start of `<tool_call>`; a block is buffered until
its closing tag and then comes out as one complete tool call (name and full arguments).

Small Qwen2.5 checkpoints (the 0.5B demo model among them) often answer with the bare JSON object
and no tags; a reply that is exactly one {"name": <a tool offered>, "arguments": ...} object is
taken as a call too.
"""
from __future__ import annotations

import json
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _call(body: str) -> dict | None:
    """One tool call from a block's JSON (None if it is not a {"name", "arguments"} object)."""
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def _bare_call(text: str, names) -> dict | None:
    call = _call(text) if names and text.lstrip().startswith("{") else None
    return call if call and call["function"]["name"] in names else None


def parse_tool_calls(text: str, names=()) -> tuple[str, list[dict]]:
    """(content outside the blocks, tool calls). Blocks that do not parse stay in the content.
    `names`: the offered tools, for replies that are a bare JSON call."""
    bare = _bare_call(text, names)
    if bare:
        return "", [bare]
    content, calls, pos = [], [], 0
    while True:
        i = text.find(OPEN, pos)
        if i < 0:
            content.append(text[pos:])
            break
        j = text.find(CLOSE, i)
        end = len(text) if j < 0 else j + len(CLOSE)
        call = _call(text[i + len(OPEN):j if j >= 0 else len(text)])
        if call is None:
            content.append(text[pos:end])
        else:
            content.append(text[pos:i])
            calls.append(call)
        pos = end
    return "".join(content).strip() if calls else "".join(content), calls


class StreamingToolParser:
    """feed(text) -> (content delta, [new tool calls]); finish() flushes what is left."""

    def __init__(self, names=()):
        self.buf = ""
        self.inside = False
        self.count = 0
        self.names = set(names)
        self.started = False    # some non-space text has been seen
        self.bare = False       # the reply opened with "{": hold it all, it may be a bare call

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        if not self.started and self.buf.strip():
            self.started = True
            self.bare = bool(self.names) and self.buf.lstrip().startswith("{")
        if self.bare or not self.started:
            return "", []
        out, calls = [], []
        while True:
            if not self.inside:
                i = self.buf.find(OPEN)
                if i >= 0:
                    out.append(self.buf[:i])
                    self.buf, self.inside = self.buf[i + len(OPEN):], True
                    continue
                # keep a tail that could still grow into "<tool_call>"
                keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                             if OPEN.startswith(self.buf[-k:])), 0)
                out.append(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            j = self.buf.find(CLOSE)
            if j < 0:
                break
            body, self.buf, self.inside = self.buf[:j], self.buf[j + len(CLOSE):], False
            call = _call(body)
            if call is None:
                out.append(OPEN + body + CLOSE)
            else:
                calls.append(call)
        return "".join(out), self._index(calls)

    def finish(self) -> tuple[str, list[dict]]:
        """End of stream: an unclosed block still counts if its JSON is complete."""
        if self.bare:
            self.bare = False
            call = _bare_call(self.buf, self.names)
            if call:
                self.buf = ""
                return "", self._index([call])
            text, calls = self.feed("")
            t2, c2 = self.finish()
            return text + t2, calls + c2
        if self.inside:
            call = _call(self.buf)
            text, self.buf, self.inside = ("" if call else OPEN + self.buf), "", False
            return text, self._index([call] if call else [])
        text, self.buf = self.buf, ""
        return text, []

    def _index(self, calls):
        for c in calls:
            c["index"] = self.count
            self.count += 1
        return calls
