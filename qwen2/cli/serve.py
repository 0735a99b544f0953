"""`qwen2 serve`: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md)."""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from qwen2.errors import Qwen2Error
from qwen2.cli._common import add_model_args, model_path
from qwen2.serve.limits import Limits


def register(subparsers):
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible server (chat, completions, tools) with continuous batching",
        description="Serve a model over the OpenAI API: /v1/chat/completions, /v1/completions, /v1/models, "
                    "/health, /metrics. Binds to 127.0.0.1 unless --host says otherwise.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="0: any free port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("QWEN2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 endpoints (default: $QWEN2_API_KEY; "
                        "the environment keeps the key out of `ps`)")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: --model as given)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="also serve a LoRA adapter (PEFT format, e.g. from qwen2 finetune) as model NAME, over the "
                        "base weights (not copied); repeatable. A request's \"model\" picks the adapter or the base. "
                        "Each model served has its own KV cache of --kv-cache-memory (default: 2G shared among them)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests in the running batch")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit per request, prompt + output (default: the model's, capped by the KV memory)")
    p.add_argument("--kv-cache-memory", type=_bytes, default=None,
                   help="KV cache budget, bytes (suffixes K/M/G allowed; default 2G)")
    p.add_argument("--max-batched-tokens", type=int, default=1024,
                   help="tokens per engine step (long prompts are prefilled in chunks of this size)")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before answering 429")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N processes (ranks) with tensor parallelism; rank 0 serves "
                        "(docs/distributed.md); --kv-cache-memory is then per rank")
    d = Limits()
    p.add_argument("--max-body-size", type=_bytes, default=d.max_body_bytes,
                   help="largest request body, bytes (K/M/G allowed; default 8M); larger ones get 413")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds a connection may take to send a request's headers before it is closed "
                        "(default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help="seconds a request body may take to arrive (default %(default)s); slower ones get 408")
    p.add_argument("--max-queued-per-request", type=int, default=d.max_queued_per_request,
                   help="engine requests (prompts x n) one HTTP request keeps queued at once; the rest "
                        "follow as they finish, admitted round-robin with other requests (default %(default)s)")
    from qwen2.cli.generate import add_speculative_args
    add_speculative_args(p)
    p.add_argument("--eager", action="store_true",
                   help="no speed passes (default: the fastest path for the machine; see qwen2 bench)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def _port(s: str) -> int:
    try:
        port = int(s)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{s!r} is not a port (0-65535)")
    return port


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (seconds to minutes), so that a port in
    use or a bad host is a one-line error at once; uvicorn listens on it once the model is up."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "another process is listening there" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise Qwen2Error(f"cannot serve on {host}:{port}: {why}") from None
    return sock


def _bytes(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {s!r}") from None


def build_server(args, lockstep=None):
    """(engine, app) for parsed arguments: loads the model once."""
    import qwen2
    from qwen2.engine.sampling import SamplingParams, read_generation_config
    from qwen2.serve.app import build_app
    from qwen2.engine.core import Engine
    from qwen2.io.adapter import with_adapter

    for name in ("max_batch", "max_batched_tokens", "max_waiting", "max_queued_per_request", "max_body_size"):
        if getattr(args, name) < 1:
            raise Qwen2Error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            raise Qwen2Error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise Qwen2Error("--max-model-len must be at least 2")
    path = model_path(args)
    name = args.served_model_name or (args.model or "qwen2-demo")
    adapters = _adapter_args(args.adapter, name)
    if adapters and lockstep is not None:
        raise Qwen2Error("--adapter does not combine with --tensor-parallel-size")
    llm = qwen2.load(path, dtype=args.dtype, device=args.device, mode="eager" if args.eager else "auto",
                     draft_model=args.draft_model, speculative=args.speculative, num_draft_tokens=args.num_draft_tokens)
    warm_up(llm)
    # Sampling defaults as vLLM: the checkpoint's generation_config.json, else OpenAI's.
    p = Path(path)
    has_gc = bool(read_generation_config(p)) if p.is_dir() else False
    defaults = llm.defaults if has_gc else SamplingParams(temperature=1.0)
    kv = _kv_share(args, llm.model, 1 + len(adapters))
    engine = Engine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_batch=args.max_batch,
                    max_model_len=args.max_model_len, kv_cache_memory=kv,
                    max_batched_tokens=args.max_batched_tokens, max_waiting=args.max_waiting,
                    lockstep=lockstep, speculator=llm.speculator)
    views = {}
    for adapter, adapter_dir in adapters.items():   # each over the base's own (prepared) weights
        try:
            views[adapter] = with_adapter(llm.model, adapter_dir)
        except Qwen2Error as e:
            raise Qwen2Error(f"--adapter {adapter}: {e}") from None
    engines = {a: Engine(m, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_batch=args.max_batch,
                         max_model_len=args.max_model_len, kv_cache_memory=kv,
                         max_batched_tokens=args.max_batched_tokens, max_waiting=args.max_waiting)
               for a, m in views.items()}
    limits = Limits(args.max_body_size, args.header_timeout, args.body_timeout, args.max_queued_per_request)
    return engine, build_app(engine, llm.tokenizer, name, api_key=args.api_key, defaults=defaults, limits=limits,
                             adapters=engines)


def _kv_share(args, model, n: int) -> int | None:
    """Each served model's KV budget: --kv-cache-memory as given (each model has its own cache),
    else the engine's 2 GiB default shared among the n models, never less than one full-length
    request (the engine's own rule, qwen2.engine.core.Engine)."""
    if args.kv_cache_memory is not None or n == 1:
        return args.kv_cache_memory
    from qwen2.engine.paged import BLOCK_SIZE, KVPool
    limit = int(model.config.max_position_embeddings)
    want = -(-min(args.max_model_len or limit, limit) // BLOCK_SIZE) * KVPool.bytes_per_block(
        model.config, BLOCK_SIZE, model.dtype)
    return max(min((2 << 30) // n, want * args.max_batch), want)


def _adapter_args(given: list[str], base: str) -> dict[str, Path]:
    """--adapter NAME=DIR values -> {NAME: DIR}, each directory checked (one line) before the base
    model loads; whether an adapter fits the base (rank, targets, shapes) is checked once it has."""
    from qwen2.io.adapter import WEIGHTS, read_adapter_config
    out: dict[str, Path] = {}
    for value in given:
        adapter, sep, where = value.partition("=")
        if not sep or not adapter or not where:
            raise Qwen2Error(f"--adapter {value!r}: expected NAME=DIR (the model name requests use, the adapter directory)")
        if adapter == base or adapter in out:
            raise Qwen2Error(f"--adapter {value!r}: the model name {adapter!r} is already served")
        d = Path(where).expanduser()
        try:
            read_adapter_config(d)
        except Qwen2Error as e:
            raise Qwen2Error(f"--adapter {adapter}: {e}") from None
        if not (d / WEIGHTS).is_file():
            raise Qwen2Error(f"--adapter {adapter}: {d}: no {WEIGHTS}")
        out[adapter] = d
    return out


def warm_up(llm):
    """Compile every graph of the decode step before the first client waits on one: one row, and
    several. Two rows then one make Dynamo see the row count change; only the third size makes it
    compile the graph that serves any count of rows (the first is specialized on 2). Without it
    the first step with 3+ rows compiled while serving: on a fresh Inductor cache, every stream
    stalled for 20-60 s (thread dumps showed the engine thread inside Dynamo from runner.forward)."""
    if llm.mode != "compiled":
        return
    for batch in ([[0, 1], [2, 3]], [[0, 1]], [[0, 1], [2, 3], [4, 5]]):
        llm.generate(batch, max_new_tokens=3, temperature=0, ignore_eos=True)


def _reexec_with_passive_omp():
    """Serve with OpenMP's passive wait policy: restart this process once with
    OMP_WAIT_POLICY=PASSIVE unless the user set a policy (it is read when torch loads, so it
    cannot be changed in-process). The default active policy makes a worker thread spin at every
    barrier; on a machine whose cores are shared with other busy processes (or with the HTTP
    thread) a spinning thread holds a core that the thread it waits for needs, and decode steps
    slow down several times over (docs/serving.md). The passive policy's cost (waking the sleeping
    threads at every parallel region) no longer falls on the float32 matmuls and attention: qwen2's serving kernels run on their own thread
    pool (qwen2/kernels/csrc/threadpool.cpp). Only for the command line (`qwen2 serve` / `python -m qwen2.cli
    serve`), never when run() is called in-process."""
    if "OMP_WAIT_POLICY" in os.environ or sys.argv[1:2] != ["serve"]:
        return
    if os.path.basename(sys.argv[0]) not in ("qwen2", "__main__.py"):
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    sys.stdout.flush(), sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "qwen2.cli", *sys.argv[1:]], env)


def run(args) -> int:
    _reexec_with_passive_omp()
    import uvicorn

    from qwen2.serve.limits import h11_protocol

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # `kill -USR1 PID` prints every thread's stack to stderr: what a stalled server is doing
    signal.signal(signal.SIGUSR1, _dump_stacks)
    # SIGTERM while loading stops as Ctrl-C does (uvicorn takes both signals over once it serves)
    signal.signal(signal.SIGTERM, _interrupt)
    from qwen2.serve.parallel import Ranks
    ranks = Ranks(args)  # --tensor-parallel-size: start or join the ranks
    try:
        sock = _bind(args.host, args.port) if ranks.rank == 0 else None   # rank 0 serves
        # A lost rank stops the server as SIGTERM does (the engine has failed every request).
        engine, app = build_server(args, ranks.lockstep(lambda _msg: os.kill(os.getpid(), signal.SIGTERM)))
    except KeyboardInterrupt:
        print("qwen2 serve: stopped while starting", file=sys.stderr)
        ranks.reap(5)
        return 0
    except BaseException:
        ranks.reap(5)
        raise
    if ranks.rank != 0:
        return ranks.follow(engine)
    grace = 5.0
    state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # uvicorn stops accepting and waits for open requests; give them `grace` seconds to
            # finish, then end what is left (on the event loop, whatever the engine thread is
            # doing), so every client gets an answer and uvicorn never has to cancel a request.
            if not self.should_exit and state.loop is not None:
                state.loop.call_soon_threadsafe(state.loop.call_later, grace, state.close)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its graceful shutdown; a requested, clean
            # shutdown is a success here: exit status 0.
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=int(grace) + 5, http=h11_protocol(args.header_timeout))
    port = sock.getsockname()[1]
    names = ", ".join(app.state.server.engines)   # the base model, then its adapters
    print(f"qwen2 serve: {names} on http://{args.host}:{port}/v1 "
          f"(max batch {engine.max_batch}, max model len {engine.max_model_len}, "
          f"{engine.pool.num_blocks} KV blocks of {engine.pool.block_size} tokens)", flush=True)
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:   # a signal between loading and uvicorn taking the signals over
        pass
    finally:
        if ranks.world > 1:
            engine.shutdown()   # tells the other ranks to exit
            ranks.reap()
    if ranks.error:
        raise Qwen2Error(ranks.error)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _dump_stacks(signum, frame):
    """Every thread's stack, read under the GIL from the main thread (faulthandler's all-thread
    dump reads the frames of running threads without it, and crashed the server twice in three
    dumps taken while the engine thread was inside torch.compile)."""
    import traceback
    names = {t.ident: t.name for t in threading.enumerate()}
    out = [f"qwen2 serve: stacks of {len(names)} threads"]
    for ident, f in sys._current_frames().items():
        out.append(f"Thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(f)))
    print("\n".join(out), file=sys.stderr, flush=True)
