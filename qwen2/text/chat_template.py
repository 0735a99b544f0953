"""Chat format: the checkpoint's own Jinja template (as transformers renders it), the Qwen2
ChatML fallback, injection-safe encoding, and first-generation Qwen's `make_context`."""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

from qwen2.errors import Qwen2Error
from qwen2.text.tokenizer import IM_END, IM_START

# Qwen2-*-Instruct's tokenizer_config.json chat_template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@lru_cache(maxsize=16)
def compile_template(source: str):
    """A sandboxed template with the globals/filters transformers gives chat templates."""
    import jinja2
    import jinja2.ext
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        # rendering just emits the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise Qwen2Error(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


@lru_cache(maxsize=16)
def template_uses(source: str, name: str) -> bool:
    """Whether the template reads the variable `name` (e.g. 'tools')."""
    from jinja2 import meta
    tmpl = compile_template(source)
    return name in meta.find_undeclared_variables(tmpl.environment.parse(source))


@lru_cache(maxsize=16)
def template_literal_text(source: str) -> str:
    """The template's constant text, \\0-joined so a search cannot match across two pieces."""
    import jinja2.nodes
    ast = compile_template(source).environment.parse(source)
    lits = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    lits |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(lits))


def _plain(value):
    """Template inputs rebuilt from plain JSON types: the sandbox does not know which methods of
    arbitrary objects are dangerous (transformers does the same)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):   # numpy / torch scalars
        return _plain(value.item())
    if callable(getattr(value, "model_dump", None)):       # pydantic
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _tool_schemas(tools):
    if tools is None:
        return None
    out = []
    for t in tools:
        if isinstance(t, dict):
            out.append(t)
        elif callable(t):
            try:
                from transformers.utils import get_json_schema
            except ImportError:
                raise Qwen2Error("tools given as Python functions need transformers installed; "
                                 "pass JSON schemas (dicts) instead") from None
            out.append(get_json_schema(t))
        else:
            raise TypeError(f"tools must be JSON-schema dicts or functions, got {type(t).__name__}")
    return out


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, dict)) or not hasattr(messages, "__iter__"):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"each message must be a dict with 'role' and 'content', got {type(m).__name__}")
        # OpenAI-style content=None / tool_calls=None: drop the key, as transformers does
        out.append({k: v for k, v in m.items() if v is not None})
    if not out:
        raise ValueError("cannot render an empty conversation")
    return out


def render(source: str, messages, add_generation_prompt: bool = True, tools=None, documents=None,
           **kwargs) -> str:
    """Render like transformers' apply_chat_template(tokenize=False)."""
    import jinja2
    chat = _plain(_check_messages(messages))
    try:
        return compile_template(source).render(
            messages=chat, tools=_plain(_tool_schemas(tools)), documents=_plain(documents),
            add_generation_prompt=add_generation_prompt, **_plain(kwargs))
    except jinja2.exceptions.TemplateError as e:
        raise Qwen2Error(f"chat template: {e}") from None


# ---- injection-safe encoding ------------------------------------------------------------------
# User strings are rendered with each control token's text swapped for a placeholder made of
# private-use characters. After rendering, every control token left in the text was written by
# the template. Text between them is encoded with the placeholders swapped back, so the user's
# "<|im_start|>" becomes the same plain-text ids that encode() gives it, in context.

_MARK_OPEN, _MARK_CLOSE, _MARK_BASE = "\U000F0000", "\U000F0001", 0xF0100
_UNMARK = re.compile(f"{_MARK_OPEN}(.){_MARK_CLOSE}", re.S)


def control_tokens(tok, source: str) -> list[str]:
    """Added tokens a user must not be able to produce: every special token, plus non-special
    added tokens the template writes (Qwen2.5's <tool_call>); the rule transformers'
    sanitize_control_tokens uses."""
    lit = template_literal_text(source)
    return [t for t in tok.added_tokens if t in tok.special_tokens or (t in lit and not t.isspace())]


def _marker(k: int) -> str:
    return _MARK_OPEN + chr(_MARK_BASE + k) + _MARK_CLOSE


def _escape(obj, pattern, index):
    if isinstance(obj, str):
        return pattern.sub(lambda m: _marker(index[m.group()]), obj)
    if isinstance(obj, dict):
        return {k: _escape(v, pattern, index) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_escape(v, pattern, index) for v in obj]
    return obj


def encode_chat(tok, messages, add_generation_prompt: bool = True, tools=None, **kwargs) -> list[int]:
    source = tok.chat_template_or_default
    # the markers themselves are escaped too, so user text cannot forge one
    protected = control_tokens(tok, source) + [_MARK_OPEN, _MARK_CLOSE]
    index = {t: k for k, t in enumerate(protected)}
    pattern = re.compile("|".join(map(re.escape, sorted(protected, key=len, reverse=True))))
    chat = _escape(_plain(_check_messages(messages)), pattern, index)
    tools = _escape(_plain(_tool_schemas(tools)), pattern, index)
    kwargs = {k: v if k in ("bos_token", "eos_token", "pad_token") else _escape(_plain(v), pattern, index)
              for k, v in kwargs.items()}
    text = render(source, chat, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
    ids = []
    split = tok._split_all
    pieces = split.split(text) if split is not None else [text]
    for k, piece in enumerate(pieces):
        if k % 2:
            ids.append(tok.added_tokens[piece])
        elif piece:
            plain = _UNMARK.sub(lambda m: protected[ord(m.group(1)) - _MARK_BASE], piece)
            ids += tok.encode_plain(plain)
    return ids


# ---- first-generation Qwen ----------------------------------------------------------------------

def make_context(tokenizer, query: str, history=None, system: str = "You are a helpful assistant.",
                 max_window_size: int = 6144) -> tuple[str, list[int]]:
    """Qwen-1.8B-Chat's `make_context` (chatml): the prompt text and ids for `query` after
    `history` [(query, response), ...], dropping the oldest turns beyond `max_window_size`."""
    history = list(history or [])
    im_start, im_end = tokenizer.special_tokens[IM_START], tokenizer.special_tokens[IM_END]
    nl = tokenizer.encode("\n")

    def turn(role, content):
        # role, "\n" and content are encoded separately, as the original does
        return [im_start] + tokenizer.encode(role) + nl + tokenizer.encode(content) + [im_end]

    system_ids = turn("system", system)
    raw_text, context = "", []
    for q, r in reversed(history):
        nxt = nl + turn("user", q) + nl + turn("assistant", r)
        if len(system_ids) + len(nxt) + len(context) >= max_window_size:
            break
        context = nxt + context
        raw_text = f"\n{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{r}{IM_END}" + raw_text
    context = system_ids + context + nl + turn("user", query) + nl + [im_start] + tokenizer.encode("assistant") + nl
    raw_text = f"{IM_START}system\n{system}{IM_END}" + raw_text + f"\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"
    return raw_text, context

