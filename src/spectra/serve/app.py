"""The OpenAI-compatible HTTP API over an `Engine`: Starlette routes, request validation, server-sent events.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id}, POST /tokenize, POST
/detokenize, GET /health, GET /metrics (Prometheus text).
Bodies are checked field by field before anything runs; every bad input answers 400 with OpenAI's error shape
{"error": {"message", "type": "invalid_request_error", "param", "code"}}, a full queue 429 with `Retry-After`, a
missing or wrong bearer key 401. Fields we do not know are ignored (clients send many), fields we know with the wrong
type are refused.

Chat prompts: the model directory's `chat_template` (tokenizer_config.json, Jinja, as Hugging Face stores it, rendered
with its `bos_token` and `eos_token` and Hugging Face's `raise_exception` and `strftime_now`; a template that raises
answers 400) when it has one; else the plain template

    System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}\\n\\nUser: ...\\n\\nAssistant:

with "\\n\\nUser:" as an extra stop string, so the model's turn ends where it would start writing the user's.

Extensions beyond OpenAI's fields: `top_k` (0 = off) and `ignore_eos` (keep going past the end-of-text token, for
fixed-length benchmarks).
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _enc  # json.dumps of a str (ensure_ascii), in C
from pathlib import Path
from typing import Any

from spectra.files import CHAT_TEMPLATE_FILE
from spectra.inference.batch import Request
from spectra.serve.engine import Engine, QueueFull, ShuttingDown

log = logging.getLogger(__name__)

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # OpenAI's
# `developer` role is its newer name for `system` (o1 and later), passed to templates as `system`
PLAIN_STOP = "\n\nUser:"
MAX_STOPS = 4
MAX_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one completion request (OpenAI's batch), each its own choice
DISCONNECT_POLL_S = 0.25


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): printable bytes stand for themselves, the other 68 for the characters
    from U+0100 on, in byte order; returned inverted, character -> byte."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    hidden = [b for b in range(256) if b not in shown]
    return {**{chr(b): b for b in shown}, **{chr(256 + n): b for n, b in enumerate(hidden)}}


BYTE_OF_CHAR = _byte_alphabet()


def _byte_level(tok: Any) -> bool:
    """Whether a `tokenizers.Tokenizer` decodes through the byte-level alphabet (its token strings are bytes)."""
    return type(getattr(tok, "decoder", None)).__name__ == "ByteLevel"


class Mailbox:
    """Hands the engine thread's events to the asyncio loop, one loop wake-up per decode step.

    `loop.call_soon_threadsafe` per event writes to the loop's wake-up pipe each time: 16 streams cost 16 system calls
    and loop wake-ups per decode step, on the engine thread (5-6 % of its time, profiled). Here `post` only appends
    to a pending list, and the engine calls `deliver` once its step is over (`Engine.on_step_end`), which schedules one
    `flush`. Waking the loop at a step's first event instead had it take the GIL while the engine was still sampling
    the step's other rows, and the engine then waited for the loop at each GIL release: the loop's work now overlaps
    the next step's C layers, which run without the GIL."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, dict]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, event: dict) -> None:
        with self._lock:
            self._pending.append((queue, event))

    def deliver(self) -> None:
        """Wake the loop for what `post` has gathered (engine thread, after each step)."""
        with self._lock:
            if self._scheduled or not self._pending:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed (the server stopped): nobody is left to read the events
            pass

    def _flush(self) -> None:
        """Each queue gets its events one by one, each stream (`EventStream`) all of its step's events in one call."""
        with self._lock:
            items, self._pending, self._scheduled = self._pending, [], False
        streams: dict[EventStream, list[dict]] = {}
        for target, event in items:
            if isinstance(target, EventStream):
                streams.setdefault(target, []).append(event)
            else:
                target.put_nowait(event)
        for stream, events in streams.items():
            stream.push(events)


class Gatherer:
    """Which of a stream's engine events go out in one write: whatever has arrived (a client that fell behind gets
    its events together), held back until `interval` token events wait, except the first token and the end ("done",
    always the last event), which go out at once."""

    def __init__(self, interval: int = 1) -> None:
        self.interval = interval
        self._held: list[dict] = []
        self._tokens = 0
        self._first = True

    def add(self, events: list[dict]) -> list[list[dict]]:
        """The groups to write now (at most one) after `events` arrived."""
        self._held += events
        self._tokens += sum(ev["type"] == "token" for ev in events)
        if not self._held or not (self._held[-1]["type"] == "done" or self._first or self._tokens >= self.interval):
            return []
        group, self._held, self._tokens, self._first = self._held, [], 0, False
        return [group]


def sse_failure(message: str) -> str:
    """The end of a stream that failed: an OpenAI-style error event, then `[DONE]`."""
    return f"data: {json.dumps(error_body(message, 'server_error'))}\n\ndata: [DONE]\n\n"


async def _disconnect(receive) -> None:
    """Returns once the client has gone away (the request body has already been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """A streamed request's response: server-sent events written by the loop's per-step flush.

    A stream used to be a task of its own per request: an asyncio queue that the flush filled, an async generator
    gathering and formatting its events, and Starlette's StreamingResponse sending each write down through three
    middleware layers to uvicorn's `transport.write`. That cost a queue wake-up, a task switch, two generator hops
    and four awaits per stream per step, and the writes of one step went out spread over the loop's work, so the
    clients' side woke for each in turn. Here `Mailbox._flush` hands each stream its step's events in one call
    (`push`), which formats them (`render`; `closing` after the last) and calls the ASGI `send` itself, running the
    coroutine by hand: uvicorn's send of a body finishes without suspending unless the transport's write buffer is
    full. A send that does suspend (flow control) is carried on by the loop (`_step`), and later writes wait
    behind it in order. The response's own coroutine (`__call__`) sends the status and headers, waits for the end
    or for the client to go away (which calls `cancel`), then returns once the last write is out."""

    HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    def __init__(self, opening: str, render, closing, cancel, interval: int = 1) -> None:
        self._opening, self._render, self._closing, self._cancel = opening, render, closing, cancel
        self._gather = Gatherer(interval)
        self._send = None
        self._early: list[dict] = []  # events pushed before the response started
        self._backlog: deque[dict] = deque()  # writes behind a suspended one
        self._busy = False
        self._closed = False  # the end is written (or the client left): later events are dropped
        self._end: asyncio.Future | None = None  # done once the last write is out

    async def __call__(self, scope, receive, send) -> None:
        self._end = asyncio.get_running_loop().create_future()
        await send({"type": "http.response.start", "status": 200, "headers": self.HEADERS})
        self._send = send
        if self._opening:
            self._write(self._opening.encode())
        early, self._early = self._early, []
        if early:
            self.push(early)
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait((self._end, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not self._end.done():  # the client went away, or the server is cancelling this response
                self._abandon()

    def push(self, events: list[dict]) -> None:
        """This step's events of the stream (on the loop, from `Mailbox._flush`)."""
        if self._closed:
            return
        if self._send is None:
            self._early += events
            return
        try:
            for group in self._gather.add(events):
                done = group[-1]["type"] == "done"
                text = self._render(group) + (self._closing() if done else "")
                if text or done:
                    self._write(text.encode(), more=not done)
                if done:
                    self._closed = True
        except Exception:  # a bug in formatting: end this stream with an error event, keep the others going
            log.exception("formatting a stream's events failed")
            self._closed = True
            self._cancel()
            self._write(sse_failure("internal error").encode(), more=False)

    def _write(self, body: bytes, more: bool = True) -> None:
        msg = {"type": "http.response.body", "body": body, "more_body": more}
        if self._busy:
            self._backlog.append(msg)
        else:
            self._step(self._send(msg), msg)

    def _step(self, coro, msg: dict) -> None:
        """Run send coroutine `coro` (writing `msg`) until it ends, then the writes queued behind it; when it
        suspends, the loop resumes it here once what it waits for is done, as a Task would."""
        try:
            waiting = coro.send(None)
        except StopIteration:
            self._busy = False
            if not msg["more_body"] and not self._end.done():
                self._end.set_result(None)
            while self._backlog and not self._busy:
                nxt = self._backlog.popleft()
                self._step(self._send(nxt), nxt)
            return
        except Exception as e:  # the transport failed under us: the client is gone
            log.debug("a stream's write failed: %r", e)
            self._busy = False
            self._abandon()
            return
        self._busy = True
        if waiting is None:  # a bare yield (asyncio.sleep(0))
            asyncio.get_running_loop().call_soon(self._step, coro, msg)
        else:  # a future, as a Task would wait on it
            waiting._asyncio_future_blocking = False
            waiting.add_done_callback(lambda _: self._step(coro, msg))

    def _abandon(self) -> None:
        """The client is gone: drop what is left to write, cancel the request, end the response."""
        self._closed = True
        self._backlog.clear()
        self._cancel()
        if not self._end.done():
            self._end.set_result(None)


class Chunks:
    """The `data:` lines of one stream: what `json.dumps` gives for each chunk object, built faster. The envelope (id,
    object, created, model) is encoded once per stream, and an event's strings with json's own C encoder; a one-token
    logprobs body (every event of a `logprobs` stream) is laid out by hand. `json.dumps` of the whole object was about
    a quarter of the HTTP loop's Python time at 16 streams (py-spy); tests compare the text with it."""

    def __init__(self, rid: str, obj: str, created: int, model: str) -> None:
        self.head = (f'data: {{"id": {_enc(rid)}, "object": {_enc(obj)}, "created": {int(created)}, "model": '
                     f'{_enc(model)}, "choices": [{{"index": 0, ')

    def delta(self, payload: dict, finish: str | None = None) -> str:
        """A chat chunk: choices[0] = {"index": 0, "delta": payload, "finish_reason": finish}."""
        return f'{self.head}"delta": {json.dumps(payload)}, "finish_reason": {_opt(finish)}}}]}}\n\n'

    def content(self, text: str, logprobs: str | None = None) -> str:
        """`delta({"content": text})`, with choices[0]["logprobs"] (already JSON) when given."""
        lp = "" if logprobs is None else f', "logprobs": {logprobs}'
        return f'{self.head}"delta": {{"content": {_enc(text)}}}{lp}, "finish_reason": null}}]}}\n\n'

    def text(self, text: str, logprobs: str = "null", finish: str | None = None) -> str:
        """A completion chunk: choices[0] = {"index": 0, "text", "logprobs" (already JSON), "finish_reason"}."""
        return (f'{self.head}"text": {_enc(text)}, "logprobs": {logprobs}, "finish_reason": {_opt(finish)}}}]}}'
                "\n\n")

    @staticmethod
    def one_logprob(token: str, logprob: float, top: dict[str, float], offset: int) -> str:
        """json.dumps of the logprobs body of one token (`Api.logprobs_body` of one entry)."""
        lp = float(logprob)
        return (f'{{"tokens": [{_enc(token)}], "token_logprobs": [{repr(lp) if math.isfinite(lp) else json.dumps(lp)}'
                f'], "top_logprobs": [{json.dumps(top) if top else "{}"}], "text_offset": [{int(offset)}]}}')


def _opt(s: str | None) -> str:
    return "null" if s is None else _enc(s)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- validation ----------------------------------------------------------------------------------------------------


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, what: str = "") -> Any:
    """body[name] when it has one of `kinds` (bool is not a number here), `default` when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise BadRequest(f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, got {json.dumps(v)}",
                         name, "invalid_type")
    return v


def prompt_items(p: Any) -> list:
    """A completion's `prompt` as the list of its prompts: OpenAI's batch (a list of strings or of token-id lists) as
    it is, anything else (one string, one list of ids, or what `Api._one_prompt` will refuse) as a list of one."""
    return p if isinstance(p, list) and p and all(isinstance(x, str | list) for x in p) else [p]


def logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's `logit_bias`: a JSON object from token ids (as strings) to numbers in [-100, 100], added to those
    tokens' logits; the ids' range is the model's (`Scheduler.check`)."""
    bias = _get(body, "logit_bias", (dict,), None, "an object from token ids to numbers")
    if not bias:
        return None
    out = {}
    for k, v in bias.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit()):
            raise BadRequest(f"'logit_bias' keys must be token ids, got {json.dumps(k)}", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise BadRequest(f"'logit_bias' values must be numbers in [-100, 100], got {json.dumps(v)} for token "
                             f"{k}", "logit_bias")
        out[int(k)] = float(v)
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A model's Jinja chat template and the special tokens it is rendered with (`bos_token`, `eos_token`), as
    Hugging Face's `apply_chat_template` passes them."""

    source: str
    bos_token: str = ""
    eos_token: str = ""


def _token_text(v: Any) -> str:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken object with its `content`."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


def load_chat_template(model_dir: str | None) -> ChatTemplate | None:
    """The Jinja chat template stored with a model (chat_template.jinja, where transformers >= 4.50 saves it, else
    tokenizer_config.json's `chat_template`) with its special tokens, or None."""
    if model_dir is None:
        return None
    p = Path(model_dir) / "tokenizer_config.json"
    jinja = Path(model_dir) / CHAT_TEMPLATE_FILE
    config: Any = {}
    if p.is_file():
        try:
            config = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: not readable JSON ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"{p}: expected a JSON object, got {type(config).__name__}")
    tpl = config.get("chat_template")
    if jinja.is_file():
        try:
            tpl = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{jinja}: not a readable UTF-8 template ({e})") from None
    if isinstance(tpl, list):  # HF's named templates: take "default"
        tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(tpl, str):
        return None
    return ChatTemplate(tpl, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))


def _template_exception(message: str) -> None:
    """`raise_exception(message)` inside a chat template (Hugging Face's global): the messages are refused."""
    import jinja2

    raise jinja2.TemplateError(message)


def unsupported(body: dict) -> None:
    """A BadRequest naming the first OpenAI feature this server does not implement that `body` asks for (tools,
    functions, structured output, audio): they were ignored and answered 200 with plain text, so a client asking for
    JSON or a tool call got neither and could not tell."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools:
        raise BadRequest("'tools' (function calling) is not supported by this server", "tools")
    if choice not in (None, "none"):
        raise BadRequest("'tool_choice' other than \"none\" is not supported (no tools)", "tool_choice")
    for name in ("functions", "function_call", "audio"):
        if body.get(name) is not None:
            raise BadRequest(f"'{name}' is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise BadRequest("'response_format' other than {\"type\": \"text\"} (JSON mode, JSON schema) is not "
                         "supported", "response_format")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise BadRequest("'modalities' other than [\"text\"] are not supported", "modalities")


class Api:
    """Request parsing and the response shapes, independent of the web framework's routing."""

    def __init__(self, engine: Engine, model_name: str, *, chat_template: ChatTemplate | str | None = None) -> None:
        self.engine, self.model_name = engine, model_name
        self.created = int(time.time())
        self._pieces: dict[int, str] = {}
        self._bytes: dict[int, list[int] | None] = {}
        self._template = None
        if chat_template is not None:
            import jinja2.sandbox  # the serve extra; rendered in a sandbox as Hugging Face does

            if isinstance(chat_template, str):
                chat_template = ChatTemplate(chat_template)
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals.update(raise_exception=_template_exception,
                               strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
            try:
                self._template = env.from_string(chat_template.source)
            except jinja2.TemplateError as e:
                raise ValueError(f"the model's chat_template is not a valid Jinja template: {e}") from None
            self._special = {"bos_token": chat_template.bos_token, "eos_token": chat_template.eos_token}
            self._template_error = jinja2.TemplateError

    # ---- prompts -------------------------------------------------------------------------------------------------
    def encode(self, text: str, param: str = "prompt") -> list[int]:
        tok = self.engine.tokenizer
        if tok is None:
            raise BadRequest("this server has no tokenizer: send the prompt as a list of token ids", "prompt")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # "\ud800" is valid JSON; the tokenizer raised a TypeError: a 500
            raise BadRequest("the text contains an unpaired UTF-16 surrogate (not a Unicode character)", param) \
                from None
        return tok.encode(text).ids

    def completion_prompt(self, body: dict) -> list[int]:
        """The one prompt of a body (a string, or a list of token ids); BadRequest for several."""
        prompts = self.completion_prompts(body)
        if len(prompts) > 1:
            raise BadRequest("'prompt' holds several prompts; send one here", "prompt")
        return prompts[0]

    def completion_prompts(self, body: dict) -> list[list[int]]:
        """A completion body's prompts as token ids: a string, a list of token ids, or (OpenAI's batch) a list of up
        to MAX_PROMPTS strings or lists of token ids, each its own choice."""
        items = prompt_items(body.get("prompt"))
        if len(items) > MAX_PROMPTS:
            raise BadRequest(f"'prompt' holds {len(items)} prompts; at most {MAX_PROMPTS} a request", "prompt")
        return [self._one_prompt(x) for x in items]

    def _one_prompt(self, p: Any) -> list[int]:
        if isinstance(p, str):
            ids = self.encode(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
        else:
            raise BadRequest(f"'prompt' must be a non-empty string or list of token ids (or a list of those), got "
                             f"{json.dumps(p)[:80]}", "prompt", "invalid_type")
        if not ids:
            raise BadRequest("'prompt' is empty", "prompt")
        return ids

    def chat_prompt(self, body: dict) -> tuple[list[int], list[str]]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages",
                             "invalid_type")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise BadRequest(f"messages[{i}] needs a role of {', '.join(CHAT_ROLES)}", f"messages[{i}].role")
            c = m.get("content")
            if c is None and m["role"] == "assistant":  # an assistant turn may come with no content (OpenAI's)
                c = ""
            if isinstance(c, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in c):
                    raise BadRequest(f"messages[{i}].content parts must be {{type: text, text}}",
                                     f"messages[{i}].content")
                c = "".join(p["text"] for p in c)
            if not isinstance(c, str):
                raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")
            turns.append({"role": CHAT_ROLES[m["role"]], "content": c})
        if self._template is not None:
            try:
                text = self._template.render(messages=turns, add_generation_prompt=True, **self._special)
            except self._template_error as e:
                raise BadRequest(f"the model's chat template refused these messages: {e}", "messages") from None
            return self.encode(text, "messages"), []
        text = "\n\n".join(f"{PLAIN_ROLES[t['role']]}: {t['content']}" for t in turns) + "\n\nAssistant:"
        return self.encode(text, "messages"), [PLAIN_STOP]

    # ---- parameters ----------------------------------------------------------------------------------------------
    def requests(self, body: dict, *, chat: bool) -> tuple[list[Request], bool, bool]:
        """([Request, one per prompt], stream, include_usage) from a JSON body; BadRequest names the field. A
        completion may hold several prompts (OpenAI's batch: one choice each, in order), not when streamed."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        _get(body, "model", (str,))
        n = _get(body, "n", (int,), 1)
        if n != 1:
            raise BadRequest(f"'n' must be 1 (one choice per request), got {n}", "n")
        stream = _get(body, "stream", (bool,), False)
        opts = _get(body, "stream_options", (dict,), {})
        if body.get("stream_options") is not None and not stream:  # as OpenAI answers it
            raise BadRequest("'stream_options' is only allowed with 'stream': true", "stream_options")
        include_usage = bool(_get(opts, "include_usage", (bool,), False))
        unsupported(body)
        echo = False  # completions only
        if chat:
            ids, extra_stops = self.chat_prompt(body)
            limit = _get(body, "max_tokens", (int,), None)  # deprecated by OpenAI for chat:
            limit = _get(body, "max_completion_tokens", (int,), limit)  # the newer name wins when both come
            top_n = _get(body, "top_logprobs", (int,), None)
            if _get(body, "logprobs", (bool,), False):
                logprobs = 0 if top_n is None else top_n
            elif top_n is not None:
                raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            else:
                logprobs = None
        else:
            prompts, extra_stops = self.completion_prompts(body), []
            if len(prompts) > 1 and stream:
                raise BadRequest("a streamed completion takes one prompt; send the others as their own requests",
                                 "prompt")
            ids = max(prompts, key=len)  # the context checks below hold for every prompt if for the longest
            limit = _get(body, "max_tokens", (int,), 16)  # OpenAI's default for completions
            logprobs = _get(body, "logprobs", (int,), None)
            echo = _get(body, "echo", (bool,), False)
            if echo and stream:
                raise BadRequest("'echo' is not streamed; ask without 'stream'", "echo")
            if _get(body, "best_of", (int,), 1) != 1:
                raise BadRequest("'best_of' must be 1 (one candidate per request)", "best_of")
            if _get(body, "suffix", (str,), ""):
                raise BadRequest("'suffix' (insertion) is not supported", "suffix")
        ctx = self.engine.ctx_len
        if len(ids) > ctx or len(ids) == ctx and not (echo and limit == 0):  # echo scoring: every position fits
            raise BadRequest(f"the prompt has {len(ids)} tokens; this server's context is {ctx} tokens "
                             f"(prompt + max_tokens must fit)", "messages" if chat else "prompt",
                             "context_length_exceeded")
        if limit is None:
            limit = ctx - len(ids)
        limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if limit < 0 or limit == 0 and not echo:
            raise BadRequest(f"'{limit_name}' must be a positive integer (0 only with 'echo'), got {limit}", limit_name)
        if len(ids) + limit > ctx:
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({limit}) exceeds this server's context of "
                             f"{ctx} tokens", "max_tokens", "context_length_exceeded")
        temperature = float(_get(body, "temperature", (int, float), 1.0))
        if not 0 <= temperature <= 2:
            raise BadRequest(f"'temperature' must be in [0, 2], got {temperature}", "temperature")
        top_p = float(_get(body, "top_p", (int, float), 1.0))
        if not 0 < top_p <= 1:
            raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
        top_k = _get(body, "top_k", (int,), 0)
        if top_k < 0:
            raise BadRequest(f"'top_k' must be >= 0 (0 = off), got {top_k}", "top_k")
        seed = _get(body, "seed", (int,), None)
        if seed is None:  # OpenAI's: without a seed each request samples afresh (its range: Scheduler.check)
            seed = secrets.randbits(63)
        stop = _get(body, "stop", (str, list), [], "a string or a list of strings")
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest(f"'stop' must be up to {MAX_STOPS} non-empty strings", "stop")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            name = "top_logprobs" if chat else "logprobs"
            raise BadRequest(f"'{name}' must be in 0..{MAX_LOGPROBS}, got {logprobs}", name)
        penalties = {}
        for name in ("frequency_penalty", "presence_penalty"):
            v = float(_get(body, name, (int, float), 0.0))
            if not -2 <= v <= 2:
                raise BadRequest(f"'{name}' must be in [-2, 2], got {v}", name)
            penalties[name] = v
        bias = logit_bias(body)
        reqs = [Request(p, limit, temperature=temperature, top_k=top_k or None, top_p=top_p if top_p < 1 else None,
                        stop=stop + extra_stops, seed=seed, logprobs=logprobs,
                        stop_at_eos=not _get(body, "ignore_eos", (bool,), False), logit_bias=bias,
                        echo=echo, **penalties)
                for p in ([ids] if chat else prompts)]
        for req in reqs:
            try:
                self.engine.check(req)
            except ValueError as e:
                param = next((p for p in ("logit_bias", "seed") if str(e).startswith(p)), None)
                raise BadRequest(str(e), param) from None
        return reqs, stream, include_usage

    # ---- responses -----------------------------------------------------------------------------------------------
    def piece(self, i: int) -> str:
        """Token i's own text (its id as text without a tokenizer), decoded once per id."""
        t = self._pieces.get(i)
        if t is None:
            tok = self.engine.tokenizer
            t = self._pieces[i] = tok.decode([i]) if tok is not None else str(i)
        return t

    def top_pieces(self, entry: dict) -> dict[str, float]:
        """An entry's top alternatives by text. Two ids can decode to one string (a partial UTF-8 character): the
        likelier one (listed first) is kept."""
        top: dict[str, float] = {}
        for i, v in entry["top"]:
            top.setdefault(self.piece(i), v)
        return top

    def prompt_text(self, body: dict, index: int) -> str:
        """Prompt `index` of a completion body as text: the string given, or its token ids decoded."""
        p = prompt_items(body.get("prompt"))[index]
        if isinstance(p, str):
            return p
        return self.engine.tokenizer.decode(list(p)) if self.engine.tokenizer is not None else ""

    def logprobs_body(self, entries: list[dict], text_offset: int = 0) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            t = self.piece(e["token"])
            out["tokens"].append(t)
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append(None if e["top"] is None else self.top_pieces(e))
            out["text_offset"].append(text_offset)
            text_offset += len(t)
        return out

    def token_bytes(self, i: int) -> list[int] | None:
        """Token i's own bytes, for a chat answer's log-probabilities: a byte-level BPE token's through the byte
        alphabet (so a piece of a multi-byte character has its real bytes), else its text's UTF-8, or None where that
        text is a replacement character (the bytes are not known)."""
        b = self._bytes.get(i, False)
        if b is False:
            tok, b = self.engine.tokenizer, None
            raw = tok.id_to_token(i) if tok is not None and _byte_level(tok) else None
            if raw is not None and all(ch in BYTE_OF_CHAR for ch in raw):
                b = [BYTE_OF_CHAR[ch] for ch in raw]
            elif "\ufffd" not in (t := self.piece(i)):
                b = list(t.encode("utf-8"))
            self._bytes[i] = b
        return b

    def chat_logprob(self, entry: dict) -> dict:
        """One token of a chat answer's `logprobs.content`: OpenAI's {token, logprob, bytes, top_logprobs}."""
        return {"token": self.piece(entry["token"]), "logprob": entry["logprob"],
                "bytes": self.token_bytes(entry["token"]),
                "top_logprobs": [{"token": self.piece(i), "logprob": v, "bytes": self.token_bytes(i)}
                                 for i, v in entry["top"]]}  # fmt: skip

    def logprob_json(self, entry: dict, text_offset: int) -> str:
        """json.dumps(self.logprobs_body([entry], text_offset)), built by `Chunks.one_logprob`."""
        return Chunks.one_logprob(self.piece(entry["token"]), entry["logprob"], self.top_pieces(entry), text_offset)

    @staticmethod
    def finish_reason(req: Request) -> str:
        return "length" if req.finish_reason == "length" else "stop"

    @staticmethod
    def usage(*reqs: Request) -> dict:
        n_p, n_c = sum(len(r.prompt_ids) for r in reqs), sum(len(r.tokens) for r in reqs)
        return {"prompt_tokens": n_p, "completion_tokens": n_c, "total_tokens": n_p + n_c,
                "prompt_tokens_details": {"cached_tokens": sum(r.cached for r in reqs)}}


# ---- the Starlette application -------------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None,
               chat_template: ChatTemplate | str | None = None, stream_interval: int = 1):
    """The ASGI application (Starlette). The engine thread starts and stops with the app's lifespan.

    `stream_interval`: a stream's token events go out in one write once that many are waiting (its first token and
    its end at once), as SGLang's and vLLM's `--stream-interval`; every token stays its own event. 1 (the default):
    every step's events as soon as they arrive. More cuts the server's writes (one per stream per write: with 16
    streams on 2 cores a third of the HTTP loop's time) at the cost of tokens arriving in groups."""
    if not isinstance(stream_interval, int) or stream_interval < 1:
        raise ValueError(f"stream_interval must be a positive integer, got {stream_interval!r}")
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    api = Api(engine, model_name, chat_template=chat_template)
    boxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}

    def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
        if loop not in boxes:
            boxes.clear()  # one loop serves the app; a new one (tests restarting it) replaces it
            boxes[loop] = Mailbox(loop)
            engine.on_step_end = boxes[loop].deliver
        return boxes[loop]

    def err(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
        return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)

    def unauthorized(request: HttpRequest) -> JSONResponse | None:
        if api_key is None:
            return None
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {api_key}":
            return err(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                       code="invalid_api_key")
        return None

    async def health(request: HttpRequest):
        return JSONResponse({"status": "ok", "model": model_name, "active": len(engine.scheduler.running),
                             "queued": engine.queue_depth(), "slots": engine.max_batch})

    async def metrics(request: HttpRequest):
        if (r := unauthorized(request)) is not None:
            return r
        text = engine.metrics.render(engine.queue_depth(), len(engine.scheduler.running), engine.max_batch)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": api.created, "owned_by": "spectra",
                "max_model_len": engine.ctx_len}

    async def models(request: HttpRequest):
        if (r := unauthorized(request)) is not None:
            return r
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: HttpRequest):
        """GET /v1/models/{id}: OpenAI's model object, or 404 `model_not_found` for another id."""
        if (r := unauthorized(request)) is not None:
            return r
        name = request.path_params["model_id"]
        if name != model_name:
            return err(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                       "invalid_request_error", "model", "model_not_found")
        return JSONResponse(model_card())

    async def json_body(request: HttpRequest) -> Any:
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        except RecursionError:  # 100,000 nested '[' was a 500
            raise BadRequest("the request body is not valid JSON: nested too deeply") from None

    async def body_of(request: HttpRequest) -> dict:
        body = await json_body(request)
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    async def tokenize(request: HttpRequest):
        """vLLM's /tokenize ({"prompt"} or chat {"messages"}; llama.cpp's {"content"} too): the ids the server would
        run, their count and the context."""
        if (r := unauthorized(request)) is not None:
            return r
        try:
            body = await body_of(request)
            if "messages" in body:
                ids = api.chat_prompt(body)[0]
            else:
                ids = api.completion_prompt({"prompt": body.get("prompt", body.get("content"))})
        except BadRequest as e:
            return err(400, str(e), "invalid_request_error", e.param, e.code)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.ctx_len})

    async def detokenize(request: HttpRequest):
        """vLLM's and llama.cpp's /detokenize: {"tokens": [ids]} -> the text, as "prompt" (vLLM) and "content"."""
        if (r := unauthorized(request)) is not None:
            return r
        try:
            body = await body_of(request)
            ids = body.get("tokens")
            vocab = engine.scheduler.decoder.config.vocab_size
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                    for t in ids):
                raise BadRequest(f"'tokens' must be a list of token ids in 0..{vocab - 1}", "tokens", "invalid_type")
            if engine.tokenizer is None:
                raise BadRequest("this server has no tokenizer to turn ids into text", "tokens")
        except BadRequest as e:
            return err(400, str(e), "invalid_request_error", e.param, e.code)
        text = engine.tokenizer.decode(ids)
        return JSONResponse({"prompt": text, "content": text})

    async def generate(request: HttpRequest, chat: bool):
        if (r := unauthorized(request)) is not None:
            return r
        try:
            body = await json_body(request)
        except BadRequest as e:  # unreadable JSON is not counted among the bad requests in the metrics
            return err(400, str(e), "invalid_request_error")
        try:
            reqs, stream, include_usage = api.requests(body, chat=chat)
            capacity = engine.max_batch + engine.max_queue
            if len(reqs) > capacity:  # a batch goes in whole: no retry could ever admit it, so not a 429
                raise BadRequest(f"{len(reqs)} prompts in one request exceed the server's capacity of {capacity} "
                                 f"({engine.max_batch} slots + {engine.max_queue} queued); send at most {capacity}",
                                 "prompt")
        except BadRequest as e:
            engine.metrics.count_request("bad_request")
            return err(400, str(e), "invalid_request_error", e.param, e.code)
        box = mailbox(asyncio.get_running_loop())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        # a stream has one request (n=1, one prompt: Api.requests), the others a queue each
        queues: list[Any] = ([event_stream(reqs[0], rid, created, chat, include_usage)] if stream
                             else [asyncio.Queue() for _ in reqs])
        for i, (req, q) in enumerate(zip(reqs, queues)):
            req.on_event = lambda ev, q=q: box.post(q, ev)
            try:
                engine.submit(req)
            except (QueueFull, ShuttingDown) as e:
                for r in reqs[:i]:  # a batch goes in whole or not at all
                    r.cancel()
                engine.wake()
                if isinstance(e, ShuttingDown):
                    return err(503, str(e), "server_shutting_down", headers={"Retry-After": "5"})
                engine.metrics.count_request("rejected_full")
                return err(429, f"the server is at capacity: {e}; retry shortly", "rate_limit_exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        if stream:
            return queues[0]
        choices = []
        try:
            check_at = [asyncio.get_running_loop().time() + DISCONNECT_POLL_S]
            for index, (req, events) in enumerate(zip(reqs, queues)):
                text_parts: list[str] = []
                while True:
                    ev = await next_event(events, request, check_at)
                    if ev is None:
                        return err(499, "client closed the request", "cancelled")
                    if ev["type"] == "token":
                        text_parts.append(ev["text"])
                    else:
                        break
                if req.finish_reason in ("error", "cancelled"):
                    return err(500 if req.finish_reason == "error" else 503, f"generation {req.finish_reason}",
                               "server_error")
                text = "".join(text_parts) if engine.tokenizer is not None else ""
                choice: dict[str, Any] = {"index": index, "finish_reason": api.finish_reason(req)}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                    choice["logprobs"] = ({"content": [api.chat_logprob(e) for e in req.token_logprobs],
                                           "refusal": None} if req.logprobs is not None else None)
                else:
                    if req.echo:  # the prompt as given (a string) or its ids' text, then the completion
                        text = api.prompt_text(body, index) + text
                    choice["text"] = text
                    choice["logprobs"] = (api.logprobs_body(req.prompt_logprobs + req.token_logprobs)
                                          if req.logprobs is not None else None)
                choices.append(choice)
        finally:
            if any(r.finish_reason is None for r in reqs):  # the client went away or one failed: free the slots
                for r in reqs:
                    r.cancel()
                engine.wake()
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                             "usage": api.usage(*reqs)})

    async def next_event(events: asyncio.Queue, request: HttpRequest, check_at: list[float]):
        """The next engine event, or None once the client has gone away (the request is then cancelled). Whether it
        has is asked at check_at[0] and every DISCONNECT_POLL_S after, also while events keep coming (a long answer's
        tokens arrive every step)."""
        loop = asyncio.get_running_loop()
        while True:
            wait = check_at[0] - loop.time()
            if wait > 0:
                try:
                    return await asyncio.wait_for(events.get(), wait)
                except TimeoutError:
                    pass
            check_at[0] = loop.time() + DISCONNECT_POLL_S
            if await request.is_disconnected():
                return None

    def event_stream(req: Request, rid: str, created: int, chat: bool, include_usage: bool) -> EventStream:
        """The response of a streamed request: its opening (chat's role delta), each write's token events as SSE
        `data:` lines, and its end (the finish chunk, the usage chunk when asked, `[DONE]`; an error event instead
        when the request failed or was cancelled)."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        fmt = Chunks(rid, obj, created, model_name)
        offset = 0

        def render(events: list[dict]) -> str:
            nonlocal offset
            out = []
            for ev in events:
                if ev["type"] == "done":
                    break
                if chat:
                    if "logprob" in ev:  # every token has its chunk, text or not (held back for a stop string)
                        lp = json.dumps({"content": [api.chat_logprob(ev["logprob"])], "refusal": None})
                        out.append(fmt.content(ev["text"], lp))
                    elif ev["text"]:
                        out.append(fmt.content(ev["text"]))
                else:
                    lp = None
                    if "logprob" in ev:  # offsets of the tokens' own text, as logprobs_body counts them
                        lp = api.logprob_json(ev["logprob"], offset)
                        offset += len(api.piece(ev["logprob"]["token"]))
                    if ev["text"] or lp is not None:
                        out.append(fmt.text(ev["text"], "null" if lp is None else lp))
            return "".join(out)

        def closing() -> str:
            if req.finish_reason in ("error", "cancelled"):
                return sse_failure(f"generation {req.finish_reason}")
            finish = api.finish_reason(req)
            out = fmt.delta({}, finish) if chat else fmt.text("", "null", finish)
            if include_usage:
                body = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [],
                        "usage": api.usage(req)}
                out += f"data: {json.dumps(body)}\n\n"
            return out + "data: [DONE]\n\n"

        def cancel() -> None:  # the client went away mid-stream: free the slot
            if req.finish_reason is None:
                req.cancel()
                engine.wake()

        opening = fmt.delta({"role": "assistant", "content": ""}) if chat else ""
        return EventStream(opening, render, closing, cancel, stream_interval)

    async def completions(request: HttpRequest):
        return await generate(request, chat=False)

    async def chat_completions(request: HttpRequest):
        return await generate(request, chat=True)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # What is alive now (torch, the model, the tokenizer, the app: about 300,000 tracked objects) leaves the
        # collector's generations, so a full collection walks only what serving made: at 16 streams the HTTP loop
        # made one every 14 s, and each held the interpreter lock for 160-180 ms (the engine's steps waiting on it).
        gc.collect()
        gc.freeze()
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            gc.unfreeze()

    async def not_found(request: HttpRequest, exc):
        return err(getattr(exc, "status_code", 404), f"{request.method} {request.url.path}: no such route",
                   "invalid_request_error")

    async def client_gone(request: HttpRequest, exc):
        """A client that left while sending its body: nothing to answer, nothing to log (it was logged twice as an
        unhandled error, with two tracebacks)."""
        log.debug("%s %s: the client left while sending the request", request.method, request.url.path)
        return Response(status_code=499)

    async def server_error(request: HttpRequest, exc):
        log.exception("unhandled error", exc_info=exc)
        return err(500, f"internal error: {type(exc).__name__}", "server_error")

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", one_model, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={404: not_found, 405: not_found, ClientDisconnect: client_gone,
                                         Exception: server_error})
