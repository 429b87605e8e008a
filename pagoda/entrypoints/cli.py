"""The `pagoda` command line."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

from pagoda.entrypoints.engine_args import add_engine_args as _add_engine_args
from pagoda.entrypoints.engine_args import engine_kwargs as _engine_kwargs

_DESCRIPTION = """pagoda: an LLM inference engine (paged KV cache, continuous batching).

commands:
  generate   complete one prompt with a model and print the text as it comes
  serve      run an OpenAI-compatible HTTP server
  chat       talk with a model in the terminal
  bench      benchmark a server (any OpenAI-compatible one) or the offline engine
  estimate   parameters, memory, FLOPs and roofline TTFT/TPOT for a model on an accelerator
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagoda", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = commands.add_parser(
        "generate",
        help="complete one prompt and print the text as it comes",
        description="Complete one prompt with a model, streaming the text to stdout.",
    )
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    _add_engine_args(gen)
    gen.set_defaults(handler=_generate)

    chat = commands.add_parser(
        "chat",
        help="talk with a model in the terminal",
        description="An interactive chat in the terminal; the reply streams as it is generated. "
                    "Type /bye or press Ctrl-D to leave, /clear to forget the conversation.",
    )
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--max-tokens", type=int, default=512, help="tokens per reply at most (default: 512)")
    chat.add_argument("--temperature", type=float, default=0.7, help="(default: 0.7)")
    chat.add_argument("--top-p", type=float, default=0.95)
    chat.add_argument("--seed", type=int, default=None)
    _add_chat_tool_args(chat)
    _add_engine_args(chat)
    chat.set_defaults(handler=_chat)

    serve = commands.add_parser(
        "serve",
        help="run an OpenAI-compatible HTTP server",
        description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route (OpenAI, Ollama, /metrics, "
                            "/tokenize, /docs...) except /health, which stays open for probes")
    serve.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    serve.add_argument("--ollama-port", type=int, default=None, metavar="PORT",
                       help="also listen on this port (Ollama's is 11434) for Ollama clients")
    serve.add_argument("--max-queued-requests", type=int, default=1024,
                       help="answer 503 + Retry-After beyond this many waiting requests (default: 1024)")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="a Jinja chat template file to use instead of the tokenizer's")
    from pagoda.tools.parsers import TOOL_PARSERS

    serve.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default="hermes",
                       help="how tool calls are read out of the model's text for tool_choice \"auto\": hermes "
                            "(<tool_call> JSON: Qwen, Hermes, SmolLM and the fallback tool prompt for templates "
                            "without tools), llama3_json, mistral (default: hermes)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true", default=True,
                       help="answer tool_choice \"auto\" (on by default; accepted for vLLM compatibility)")
    serve.add_argument("--disable-auto-tool-choice", dest="enable_auto_tool_choice", action="store_false",
                       help="refuse tool_choice \"auto\" with a 400 (\"required\" and named tools still work)")
    serve.add_argument("--engine-loop", choices=["thread", "process"], default="process",
                       help="where the engine's step loop runs: its own process (the HTTP side then never "
                            "competes with the model for the GIL: 1.36x the tokens/s at concurrency 1 and half "
                            "the TTFT at 32, measured by benchmarks/cpu_peers.py), or a thread of the server "
                            "process (default: process)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds to let in-flight requests finish on SIGTERM/Ctrl-C; then the requests still "
                            "running end with an error (streams: an error event, then [DONE]) (default: 30)")
    serve.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024, metavar="BYTES",
                       help="refuse request bodies larger than this with 413 (default: 16 MiB)")
    serve.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="a client must send a request's head within this time, and then its body (else the "
                            "connection is closed, or 408) (default: 30)")
    serve.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="close an idle keep-alive connection after this long (default: 5)")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="LoRA adapters to serve (with --enable-lora): requests pick one by `model`=NAME")
    serve.add_argument("--lora-dir", default=None, metavar="DIR",
                       help="allow POST /v1/load_lora_adapter, for adapter folders under DIR only "
                            "(default: runtime loading is refused)")
    _add_engine_args(serve)
    serve.set_defaults(handler=_serve)

    from pagoda.bench.cli import add_bench_parser
    from pagoda.estimate.cli import add_estimate_parser

    add_bench_parser(commands)
    add_estimate_parser(commands)
    return parser


def _add_chat_tool_args(chat: argparse.ArgumentParser) -> None:
    from pagoda.entrypoints.tool_loop import TOOL_CHOICES
    from pagoda.tools.parsers import TOOL_PARSERS

    group = chat.add_argument_group("tools from MCP servers (docs/mcp.md)")
    group.add_argument("--mcp", action="append", default=None, metavar="COMMAND",
                       help="start an MCP server with this command line (stdio) and offer its tools to the model; "
                            "repeatable (tool names must differ across servers)")
    group.add_argument("--tool-choice", choices=TOOL_CHOICES, default=None,
                       help="auto: the model decides; required: the first round of every turn is forced by a "
                            "grammar to call tools (default: auto)")
    group.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                       help="how calls are read out of the model's text when it decides (default: hermes)")
    group.add_argument("--max-tool-rounds", type=int, default=None, metavar="N",
                       help="rounds of tool calls per turn at most; then the model answers without tools "
                            "(default: 5)")
    group.add_argument("--no-parallel-tool-calls", dest="parallel_tool_calls", action="store_false", default=None,
                       help="a forced round calls exactly one tool (default: one or more)")


def _chat_tool_loop(args: argparse.Namespace, servers):
    """The ToolLoop of `pagoda chat --mcp` over the started ``servers``."""
    from pagoda.entrypoints.tool_loop import ToolLoop

    return ToolLoop(servers.openai_tools(), servers.call, tool_choice=args.tool_choice or "auto",
                    parser=args.tool_call_parser or "hermes",
                    max_rounds=5 if args.max_tool_rounds is None else args.max_tool_rounds,
                    parallel=args.parallel_tool_calls is not False)


def _refuse_tool_flags_without_mcp(args: argparse.Namespace) -> None:
    given = [flag for flag, value in (("--tool-choice", args.tool_choice), ("--tool-call-parser",
             args.tool_call_parser), ("--max-tool-rounds", args.max_tool_rounds),
             ("--no-parallel-tool-calls", args.parallel_tool_calls)) if value is not None]
    if given and not args.mcp:
        raise ValueError(f"{given[0]} needs --mcp (the tools come from MCP servers)")


def _start_mcp(commands: list[str]):
    try:
        import mcp  # noqa: F401
    except ImportError:
        raise ValueError("--mcp needs the MCP SDK: pip install 'mcp>=2.3,<3'") from None
    from pagoda.entrypoints.mcp_client import McpServers

    servers = McpServers(commands)
    servers.start()
    for notice in servers.notices:
        print(f"pagoda: {notice}", file=sys.stderr)
    return servers


def _reply_deltas(llm, messages, tools, constraint, params):
    """One reply of the chat with tools, as text deltas (a ToolLoop's ``generate``): ``tools``
    shown through the chat template, ``constraint`` (a structured-outputs kind and value: a JSON
    schema or a structural tag) forced by a grammar."""
    import dataclasses

    from pagoda.structured_output.params import StructuredOutputsParams

    prompt = llm.apply_chat_template(messages, tools=tools)
    if constraint is not None:
        kind, value = constraint
        params = dataclasses.replace(params, structured_outputs=StructuredOutputsParams(**{kind: value}))
    engine = llm.engine
    request_id = engine.add_request(prompt, params)
    shown, finished = 0, False
    try:
        while not finished and engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id == request_id:
                    text = output.outputs[0].text
                    finished = output.finished
                    if len(text) > shown:
                        yield text[shown:]
                        shown = len(text)
    finally:
        if not finished:  # interrupted (Ctrl-C) or abandoned: free its slot
            engine.abort_request(request_id)


def _stream_reply(engine, prompt, params):
    """Runs one request on the engine, printing its text as it grows; returns its last output."""
    request_id = engine.add_request(prompt, params)
    shown = 0
    last = None
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id == request_id:
                    last = output
                    text = output.outputs[0].text
                    sys.stdout.write(text[shown:])
                    sys.stdout.flush()
                    shown = len(text)
    except KeyboardInterrupt:  # stop this reply, keep the session
        engine.abort_request(request_id)
    sys.stdout.write("\n")
    return last


def _chat(args: argparse.Namespace) -> int:
    from pagoda.engine.llm import LLM
    from pagoda.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    _refuse_tool_flags_without_mcp(args)
    servers = _start_mcp(args.mcp) if args.mcp else None  # a bad server fails before the model loads
    try:
        tool_loop = _chat_tool_loop(args, servers) if servers is not None else None
        llm = LLM(args.model, **_engine_kwargs(args))
        history: list[dict] = []
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"Chatting with {args.model}. /bye or Ctrl-D to leave, /clear to start over.", file=sys.stderr)
            if servers is not None:
                print(f"Tools ({tool_loop.tool_choice}): {', '.join(t.name for t in servers.tools) or 'none'}",
                      file=sys.stderr)
        while True:
            try:
                line = input(">>> " if interactive else "")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/bye", "/exit", "/quit"):
                break
            if line == "/clear":
                history.clear()
                continue
            history.append({"role": "user", "content": line})
            system = [{"role": "system", "content": args.system}] if args.system else []
            if tool_loop is None:
                output = _stream_reply(llm.engine, llm.apply_chat_template(system + history), params)
                history.append({"role": "assistant", "content": output.outputs[0].text if output else ""})
                continue
            try:
                history.extend(tool_loop.run_turn(
                    system + history, lambda messages, tools, constraint: _reply_deltas(llm, messages, tools,
                                                                                        constraint, params)))
            except ValueError as error:  # e.g. the conversation and tool results outgrew the model
                print(f"pagoda: error: {error}", file=sys.stderr)
                history.pop()  # this turn is forgotten; the chat goes on
        llm.close()
    finally:
        if servers is not None:
            servers.close()
    return 0


def _lora_registry(args: argparse.Namespace):
    """--lora-modules NAME=PATH ... and --lora-dir, checked before the model loads."""
    from pagoda.entrypoints.openai.serving_lora import LoRARegistry

    modules = {}
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"pagoda serve: --lora-modules {item!r} is invalid: give NAME=PATH")
        modules[name] = path
    if (modules or args.lora_dir) and not args.enable_lora:
        raise SystemExit("pagoda serve: --lora-modules and --lora-dir need --enable-lora")
    if args.lora_dir is not None and not os.path.isdir(args.lora_dir):
        raise SystemExit(f"pagoda serve: --lora-dir {args.lora_dir!r} is not a folder")
    return LoRARegistry(args.enable_lora, args.max_lora_rank, args.lora_dir, modules)


def _check_lora_modules(loras, hf_config, engine) -> None:
    """Refuses to start with an adapter of --lora-modules that the engine could not serve."""
    from pagoda.model.lora.adapter import AdapterError, ModelShape, load_adapter

    for lora in loras.adapters.values():
        try:
            load_adapter(lora.lora_path, ModelShape.from_hf_config(hf_config), loras.max_lora_rank, lora.lora_name)
        except AdapterError as error:
            engine.shutdown()
            raise SystemExit(f"pagoda serve: --lora-modules: {error}") from None


def _serve(args: argparse.Namespace) -> int:

    from pagoda.config import engine_config_from_kwargs
    from pagoda.engine.async_engine import AsyncLLM
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.entrypoints.openai.api_server import ServerConfig, build_app
    from pagoda.metrics import EngineMetrics

    chat_template = None
    if args.chat_template is not None:
        with open(args.chat_template) as f:
            chat_template = f.read()
    loras = _lora_registry(args)
    engine_config = engine_config_from_kwargs(args.model, **_engine_kwargs(args))
    if args.engine_loop == "process":
        engine = AsyncLLM.in_child_process(engine_config)
    else:
        engine = AsyncLLM(LLMEngine(engine_config))
    metrics = EngineMetrics(engine)
    engine.on_finished = metrics.observe_finished
    name = args.served_model_name or args.model
    server_config = ServerConfig(served_model_name=name, api_key=args.api_key,
                                 max_queued_requests=args.max_queued_requests, chat_template=chat_template,
                                 max_request_bytes=args.max_request_bytes, request_timeout=args.request_timeout,
                                 scheduling_policy=args.policy, loras=loras,
                                 tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None)
    app = build_app(engine, server_config, metrics)
    info = engine.model_info
    _check_lora_modules(loras, info.hf_config, engine)
    print(f"pagoda {name!r} listening on http://{args.host}:{args.port}/v1 (max_model_len="
          f"{info.max_model_len}, dtype={info.dtype}, engine loop: {args.engine_loop})",
          file=sys.stderr, flush=True)
    ports = [args.port] + ([args.ollama_port] if args.ollama_port else [])
    # The server process owns everything built so far (model, tokenizer, app) for its whole
    # life: out of the collector's sight, full collections while serving stay short.
    gc.collect()
    gc.freeze()
    if args.ollama_port:
        print(f"pagoda Ollama API also on http://{args.host}:{args.ollama_port}", file=sys.stderr, flush=True)
    try:
        _run_servers(app, args.host, ports, args, engine)
    finally:
        engine.shutdown()
    return 0


def _run_servers(app, host: str, ports: list[int], args: argparse.Namespace, engine) -> None:
    """Serves `app` on each port until SIGTERM/SIGINT, then drains in-flight requests.

    uvicorn's own signal capture re-raises the signal after shutdown (the
    process would die by it); we handle the signals here so a graceful stop
    exits 0, and one signal stops every listener. A second Ctrl-C forces.
    Requests still running when --shutdown-timeout passes are ended by shutting
    the engine down: each gets the engine's error (a stream: an error event and
    [DONE]) before uvicorn closes the connections a few seconds later.
    """
    import asyncio
    import contextlib
    import signal

    import uvicorn

    from pagoda.entrypoints.http_guard import guarded_protocol

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    protocol = guarded_protocol(args.request_timeout)
    servers = [
        Server(uvicorn.Config(app, host=host, port=port, log_level="warning", http=protocol,
                              timeout_keep_alive=args.keep_alive_timeout,
                              timeout_graceful_shutdown=args.shutdown_timeout + 5))
        for port in ports
    ]

    def stop(signum, frame):
        for server in servers:
            server.force_exit = server.should_exit and signum == signal.SIGINT
            server.should_exit = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    async def end_requests_after_timeout():
        while not any(server.should_exit for server in servers):
            await asyncio.sleep(0.2)
        await asyncio.sleep(args.shutdown_timeout)
        if engine.num_unfinished:
            print(f"pagoda: {engine.num_unfinished} requests still running after --shutdown-timeout "
                  f"{args.shutdown_timeout:g} s: ending them", file=sys.stderr, flush=True)
        await asyncio.to_thread(engine.shutdown)

    async def serve_all():
        ender = asyncio.ensure_future(end_requests_after_timeout())
        try:
            await asyncio.gather(*(server.serve() for server in servers))
        finally:
            ender.cancel()

    asyncio.run(serve_all())


def _generate(args: argparse.Namespace) -> int:
    from pagoda.engine.llm import LLM
    from pagoda.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )
    llm = LLM(args.model, **_engine_kwargs(args))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt = llm.apply_chat_template(messages)
    else:
        prompt = args.prompt
    start = time.perf_counter()
    output = _stream_reply(llm.engine, prompt, params)
    llm.close()
    if args.stats and output is not None:
        elapsed = time.perf_counter() - start
        completion = output.outputs[0]
        print(
            f"[{len(output.prompt_token_ids)} prompt tokens, {len(completion.token_ids)} generated, "
            f"finish_reason={completion.finish_reason}, {len(completion.token_ids) / elapsed:.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:  # bad input or missing files: one clear sentence, no stack trace
        print(f"pagoda: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
