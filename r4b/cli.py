"""The ``r4b`` command line.

    r4b info                      what this install has: extension, CUDA, backends of every op
    r4b bench <op ...>|all        run benchmarks (from a source checkout: python -m bench)
    r4b generate MODEL_DIR -p "..." generate with a checkpoint (HF layout + tokenizer.json) in a thinking mode
    r4b sft --model M --data D --output-dir O ...   stage 1 training (bi-mode annealing); torchrun for many GPUs
    r4b bpo --model M --data D --output-dir O ...   stage 2 training (BPO)
    r4b eval --model M --data D --output-dir O ...  accuracy / tokens / think-rate per thinking mode
    r4b serve MODEL_DIR --port 8000                   an OpenAI-compatible server (chat completions, thinking modes)
    r4b chat MODEL_DIR                                 a multi-turn chat in the terminal, streamed, in any thinking mode
    r4b demo                      the CPU demo of the first milestone (same as `make demo`)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def cmd_info(_: argparse.Namespace) -> int:
    import torch

    import r4b
    from r4b.kernels import available_backends, registered_ops
    from r4b.kernels._dispatch import PEER_BACKENDS
    from r4b.kernels._ext import load

    ext = load()
    print(f"r4b {r4b.__version__}  torch {torch.__version__}  cuda available: {torch.cuda.is_available()}")
    if ext is None:
        print("r4b._C: not built (pip install -e . --no-build-isolation)")
    else:
        print(f"r4b._C: cpu ops {ext.cpu_ops()}, cuda ops {ext.cuda_ops() or 'none (built without CUDA)'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = registered_ops()
    w = max(28, *(len(",".join(b)) + 1 for b in ops.values()))
    print(f"{'op':<28} {'implements':<{w}} " + " ".join(f"{'runs on ' + d:<{w}}" for d in devices))
    for op, backends in sorted(ops.items()):
        runs = " ".join(f"{','.join(available_backends(op, d)):<{w}}" for d in devices)
        print(f"{op:<28} {','.join(backends):<{w}} {runs}")
    print(f"{', '.join(PEER_BACKENDS)}: opt-in, never picked by backend=None (backend=..., or R4B_ATTN_BACKEND=...)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "__main__.py").exists():
        print("r4b bench runs from a source checkout (the bench/ folder is not installed)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "bench", *args.names], cwd=root)


def _requests(args: argparse.Namespace) -> list:
    import json

    reqs: list = list(args.prompt or [])
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{args.file}:{n}: not JSON ({e})") from None
                if isinstance(row, dict) and isinstance(row.get("messages"), list):
                    reqs.append(row["messages"])
                elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
                    reqs.append(row["prompt"])
                else:
                    raise SystemExit(f"{args.file}:{n}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}")
    if not reqs:
        raise SystemExit("r4b generate: give --prompt (repeatable) or --file")
    return reqs


def _engine_args(p: argparse.ArgumentParser, *, max_num_seqs: int) -> None:
    """The arguments _load_llm reads (generate, chat, serve)."""
    p.add_argument("model", help="checkpoint directory (HF layout: config.json + *.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the checkpoint directory)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--max-num-seqs", type=int, default=max_num_seqs)
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt in full (default: reuse the KV of prefixes seen before)")


def _load_llm(args: argparse.Namespace, cmd: str):
    """The engine over args.model (HF checkpoint dir) with its tokenizer, on args.device in args.dtype."""
    from r4b.engine.llm import LLM

    try:
        return LLM.from_pretrained(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                                   max_num_seqs=args.max_num_seqs, prefix_caching=not args.no_prefix_caching)
    except (ValueError, OSError) as e:
        raise SystemExit(f"r4b {cmd}: {e}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from r4b.engine.llm import RequestOutput, StreamEvent
    from r4b.engine.sampling import SamplingParams

    reqs = _requests(args)
    try:  # a bad sampling flag fails before the model loads
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                                repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens,
                                seed=args.seed, n=args.n, response_format=args.response_format)
    except ValueError as e:
        raise SystemExit(f"r4b generate: {e}") from None
    if args.run_tools:
        return _generate_with_tools(args, reqs, params)
    tools = None
    if args.tools:
        try:
            with open(args.tools, encoding="utf-8") as f:
                tools = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"r4b generate: --tools {args.tools}: {e}") from None
        if not isinstance(tools, list):
            raise SystemExit(f"r4b generate: --tools {args.tools}: expected a JSON list of tool schemas, got "
                             f"{type(tools).__name__}")
        from r4b.engine.chat import check_tools

        try:
            check_tools(tools)
        except ValueError as e:
            raise SystemExit(f"r4b generate: --tools {args.tools}: {e}") from None
    llm = _load_llm(args, "generate")
    if args.tool_choice is not None and tools is None:
        raise SystemExit("r4b generate: --tool-choice needs --tools")
    kw = dict(thinking_mode=args.thinking_mode, max_thinking_tokens=args.max_thinking_tokens, tools=tools,
              answer_prefix=args.answer_prefix, tool_choice=args.tool_choice)
    try:  # a ValueError: arguments the engine refuses (tools the chat template cannot take, a tool_choice)
        if args.stream:
            for ev in llm.stream(reqs, params, **kw):
                if isinstance(ev, StreamEvent) and len(reqs) * args.n == 1:
                    print(ev.text, end="", flush=True)
                elif isinstance(ev, RequestOutput) and len(reqs) * args.n == 1:
                    print(f"\n[{ev.outputs[0].finish_reason if ev.outputs else 'error: ' + str(ev.error)}]")
                elif isinstance(ev, RequestOutput):
                    _print_output(ev, args.json)
            return 0
        outs = llm.generate(reqs, params, **kw)
    except ValueError as e:
        raise SystemExit(f"r4b generate: {e}") from None
    for out in outs:
        _print_output(out, args.json)
    return 0 if all(o.error is None for o in outs) else 1


def _generate_with_tools(args: argparse.Namespace, reqs: list, params) -> int:
    """``r4b generate --run-tools``: each completion a conversation in which r4b runs the model's calls."""
    import json

    from r4b.engine.agent import Toolbox, run_tool_loop

    clash = [flag for flag, v in (("--tools", args.tools), ("--tool-choice", args.tool_choice),
                                  ("--answer-prefix", args.answer_prefix), ("--response-format", args.response_format),
                                  ("--stream", args.stream)) if v]
    if clash:
        raise SystemExit(f"r4b generate: --run-tools does not go with {', '.join(clash)}")
    if args.max_tool_turns < 1 or not args.tool_timeout > 0:
        raise SystemExit(f"r4b generate: --max-tool-turns must be >= 1 and --tool-timeout > 0, got "
                         f"{args.max_tool_turns} and {args.tool_timeout}")
    try:
        toolbox = Toolbox.load(args.run_tools, timeout=args.tool_timeout)
    except ValueError as e:
        raise SystemExit(f"r4b generate: --run-tools: {e}") from None
    llm = _load_llm(args, "generate")
    try:
        outs = run_tool_loop(llm, reqs, toolbox, params, thinking_mode=args.thinking_mode,
                             max_turns=args.max_tool_turns, max_thinking_tokens=args.max_thinking_tokens)
    except ValueError as e:
        raise SystemExit(f"r4b generate: {e}") from None
    for out in outs:
        if args.json:
            print(json.dumps({"request_index": out.prompt_index, "error": out.error, "conversations": [
                {"index": t.index, "thinking_mode": t.mode, "answer": t.answer, "stop_reason": t.stop_reason,
                 "turns": len(t.turns), "tool_calls": t.num_tool_calls, "tool_errors": t.tool_errors,
                 "generated_tokens": t.generated_tokens, "error": t.error, "messages": t.messages(images=False)}
                for t in out.trajectories]}, ensure_ascii=False))
            continue
        if out.error is not None:
            print(f"[request {out.prompt_index}] error: {out.error}")
        for t in out.trajectories:
            print(f"[request {out.prompt_index} #{t.index} {t.mode}: {len(t.turns)} turns, {t.num_tool_calls} tool "
                  f"calls ({t.tool_errors} failed), {t.generated_tokens} tokens, {t.stop_reason}]")
            for m in t.messages(images=False):
                if m["role"] == "tool":
                    content = m["content"]
                    if isinstance(content, list):  # images, then the text
                        content = " ".join("<image {}x{}>".format(*p["size"][::-1]) if p["type"] == "image"
                                           else p["text"] for p in content)
                    print(f"[tool {m['name'] or '(no call)'} -> {content}]")
                    continue
                _print_reply(m.get("reasoning_content", ""), m["content"],
                             [(k["function"]["name"], k["function"]["arguments"]) for k in m.get("tool_calls", [])])
    ok = all(o.error is None and all(t.stop_reason != "error" for t in o.trajectories) for o in outs)
    return 0 if ok else 1


def _print_reply(thinking: str, answer: str, calls: list[tuple[str, str]], blank: bool = False) -> None:
    """A reply as text: its thought, its answer (an empty one printed only with ``blank``), its tool calls."""
    if thinking:
        print(f"<think>\n{thinking}\n</think>")
    if answer or blank:
        print(answer)
    for name, arguments in calls:
        print(f"[tool call] {name}({arguments})")


def _print_output(out, as_json: bool) -> None:
    import json
    from dataclasses import asdict

    if as_json:  # the images (tensors) stay out of the JSON
        row = {k: v for k, v in asdict(out).items() if k not in ("pixel_values", "image_sizes")}
        print(json.dumps(row, ensure_ascii=False))
        return
    if out.error is not None:
        print(f"[request {out.request_index}] error: {out.error}")
    for c in out.outputs:
        print(f"[request {out.request_index} #{c.index} {c.thinking_mode} -> {c.mode}, "
              f"{len(c.token_ids)} tokens, {c.num_thinking_tokens} thinking, {c.finish_reason}]")
        _print_reply(c.thinking, c.answer, [(k.name, k.arguments_json()) for k in c.tool_calls or []], blank=True)


_TYPES = {"int": int, "float": float, "str": str}


def _bool_or_auto(text: str) -> bool | None:
    t = text.lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    if t in ("auto", "none"):
        return None
    raise argparse.ArgumentTypeError(f"expected true / false / auto, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of the config dataclass ``cls`` (its docstring says what they mean). Flags given on the
    command line override the --config JSON file, which overrides the defaults."""
    import dataclasses

    parser.add_argument("--config", help="a JSON file of config fields (flags given here override it)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" ", "")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"(default: {f.default!r})")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind == "bool|None":
            parser.add_argument(flag, type=_bool_or_auto, metavar="{true,false,auto}", **kw)
        else:
            base = kind.removesuffix("|None")
            if base not in _TYPES:
                raise TypeError(f"{cls.__name__}.{f.name}: no command-line type for {f.type!r}")
            parser.add_argument(flag, type=_TYPES[base], **kw)


def config_from_args(cls: type, args: argparse.Namespace):
    import dataclasses
    import json

    values: dict = {}
    if getattr(args, "config", None):
        with open(args.config, encoding="utf-8") as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise SystemExit(f"{args.config}: expected a JSON object of config fields")
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    try:
        return cls.from_dict(values)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"r4b {args.cmd}: {e}") from None


def _train(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "sft":
        from r4b.engine.train.sft import SFTConfig as cls
        from r4b.engine.train.sft import train_sft as run
    else:
        from r4b.engine.train.bpo import BPOConfig as cls
        from r4b.engine.train.bpo import train_bpo as run
    cfg = config_from_args(cls, args)
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"r4b {args.cmd}: {e}") from None
    metrics = run(cfg)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "reward_mean", "grad_norm"))
    print(f"r4b {args.cmd}: done, {cfg.output_dir} ({shown})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import logging

    from r4b.engine.evaluate import EvalConfig, format_summary, run_eval

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(EvalConfig, args)
    try:
        summary = run_eval(cfg)
    except (ValueError, OSError) as e:
        raise SystemExit(f"r4b eval: {e}") from None
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return 0 if summary["prompts"] else 1
    print(format_summary(summary, cfg.mode_list))
    print(f"r4b eval: {cfg.output_dir}/summary.json, summary.md, samples.jsonl" + (", eval.png" if cfg.plot else ""))
    return 0 if summary["prompts"] else 1


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from r4b.engine.server import Server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_tokens < 1 or not 0 <= args.port < 65536:
        raise SystemExit(f"r4b serve: --max-tokens must be >= 1 and --port in [0, 65535], got {args.max_tokens} "
                         f"and {args.port}")
    api_key = args.api_key or os.environ.get("R4B_API_KEY") or None
    llm = _load_llm(args, "serve")
    name = args.served_model_name or Path(args.model).resolve().name
    try:
        server = Server((args.host, args.port), llm, model_name=name, default_mode=args.thinking_mode,
                        default_max_tokens=args.max_tokens, api_key=api_key)
    except OSError as e:
        raise SystemExit(f"r4b serve: cannot listen on {args.host}:{args.port}: {e}") from None
    host, port = server.server_address[:2]
    print(f"r4b serve: {name} on http://{host}:{port}/v1 (POST /v1/chat/completions, POST /v1/completions, "
          f"GET /v1/models, GET /health, GET /metrics); {'an API key is required; ' if api_key else ''}"
          "Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from r4b.engine.interactive import HELP, ChatSession, run
    from r4b.engine.sampling import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                presence_penalty=args.presence_penalty, max_tokens=args.max_tokens, seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"r4b chat: {e}") from None
    toolbox = None
    if not args.tool_timeout > 0:
        raise SystemExit(f"r4b chat: --tool-timeout must be > 0 seconds, got {args.tool_timeout}")
    if args.tools:
        from r4b.engine.agent import Toolbox

        try:
            toolbox = Toolbox.load(args.tools, timeout=args.tool_timeout)
        except ValueError as e:
            raise SystemExit(f"r4b chat: {e}") from None
    if args.max_tool_turns < 1:
        raise SystemExit(f"r4b chat: --max-tool-turns must be >= 1, got {args.max_tool_turns}")
    llm = _load_llm(args, "chat")
    session = ChatSession(llm, params, thinking_mode=args.thinking_mode, max_thinking_tokens=args.max_thinking_tokens,
                          system=args.system, toolbox=toolbox, max_turns=args.max_tool_turns)

    def write(text: str) -> None:
        print(text, end="", flush=True)

    interactive = sys.stdin.isatty()
    if interactive:
        print(f"r4b chat: {Path(args.model).resolve().name}, thinking mode {args.thinking_mode}\n{HELP}")
    run(session, sys.stdin, write, prompt=(lambda: print("\n> ", end="", flush=True)) if interactive else lambda: None)
    return 0


def cmd_demo(_: argparse.Namespace) -> int:
    from r4b import demo

    return demo.main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r4b", description="r4b: kernels and engine for auto-thinking LLMs")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="extension, devices and the backends of every op").set_defaults(fn=cmd_info)
    b = sub.add_parser("bench", help="run benchmarks (source checkout)")
    b.add_argument("names", nargs="+", help="bench names or 'all' (add --quick for tiny shapes)")
    b.set_defaults(fn=cmd_bench)
    sub.add_parser("demo", help="run the CPU demo").set_defaults(fn=cmd_demo)
    g = sub.add_parser("generate", help="generate with a checkpoint in a thinking mode")
    _engine_args(g, max_num_seqs=256)
    g.add_argument("-p", "--prompt", action="append", help="a user message (repeatable)")
    g.add_argument("--file", help='JSONL of {"prompt": str} or {"messages": [...]} rows')
    g.add_argument("--thinking-mode", default="auto", choices=("auto", "long", "short"))
    g.add_argument("--max-thinking-tokens", type=int, default=None)
    g.add_argument("--max-tokens", type=int, default=1024)
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=20)
    g.add_argument("--min-p", type=float, default=0.0, help="keep tokens at least this times as likely as the best")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2] (OpenAI's; Qwen3 suggests up to "
                   "1.5 against endless repeats)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2] (OpenAI's)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0, 1 = none (transformers' / vLLM's)")
    g.add_argument("-n", type=int, default=1, help="completions per prompt")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--tools", help="JSON file: a list of OpenAI function schemas the chats offer (their calls are "
                   "parsed into tool_calls)")
    g.add_argument("--response-format", default=None, choices=("json_object",),
                   help="json_object: each answer is one JSON object (constrained decoding, after the thought)")
    g.add_argument("--tool-choice", default=None, help="auto / none / required / a tool's name (required and a "
                   "name constrain each answer to one valid call)")
    g.add_argument("--answer-prefix", default=None, help="text every answer starts with (forced after the thought)")
    g.add_argument("--run-tools", default=None, help="Python functions the model may call and r4b runs, "
                   "'my_tools.py:fn1,fn2' or 'package.module:fn': each completion is then a conversation of up to "
                   "--max-tool-turns turns (r4b.engine.agent)")
    g.add_argument("--max-tool-turns", type=int, default=4, help="assistant turns a conversation may take")
    g.add_argument("--tool-timeout", type=float, default=30.0, help="seconds a tool call may take")
    g.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt, n=1)")
    g.add_argument("--json", action="store_true", help="one JSON line per request")
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="a multi-turn chat in the terminal (streamed; /mode, /budget, /system, /reset)")
    _engine_args(c, max_num_seqs=8)
    c.add_argument("--thinking-mode", default="auto", choices=("auto", "long", "short"))
    c.add_argument("--max-thinking-tokens", type=int, default=None)
    c.add_argument("--system", default=None, help="a system message")
    c.add_argument("--max-tokens", type=int, default=4096)
    c.add_argument("--temperature", type=float, default=0.6)
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--top-k", type=int, default=20)
    c.add_argument("--presence-penalty", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--tools", default=None, help="Python functions the model may call and r4b runs: "
                   "'my_tools.py:fn1,fn2' or 'package.module:fn' (r4b.engine.agent.Toolbox)")
    c.add_argument("--max-tool-turns", type=int, default=4, help="assistant turns a message may take with tools")
    c.add_argument("--tool-timeout", type=float, default=30.0, help="seconds a tool call may take")
    c.set_defaults(fn=cmd_chat)
    from r4b.engine.train.bpo import BPOConfig
    from r4b.engine.train.common import TrainConfig
    from r4b.engine.train.sft import SFTConfig

    for name, cls, what in (("sft", SFTConfig, "stage 1: bi-mode annealing SFT on thinking and non-thinking answers"),
                            ("bpo", BPOConfig, "stage 2: BPO, GRPO with rollouts in both forced modes")):
        t = sub.add_parser(name, help=what + " (torchrun for several GPUs)", description=(cls.__doc__ or "") +
                           "\n\n" + (TrainConfig.__doc__ or ""), formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_args(t, cls)
        t.set_defaults(fn=_train)
    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat completions, streaming, thinking modes)")
    _engine_args(v, max_num_seqs=256)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    v.add_argument("--thinking-mode", default="auto", choices=("auto", "long", "short"),
                   help="the mode of a request that names none")
    v.add_argument("--max-tokens", type=int, default=1024, help="max_tokens of a request that names none")
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1/ routes (default: "
                   "$R4B_API_KEY; none: open)")
    v.set_defaults(fn=cmd_serve)
    from r4b.engine.evaluate import EvalConfig

    e = sub.add_parser("eval", help="accuracy, tokens and think-rate in each thinking mode, and auto mode's choices",
                       description=EvalConfig.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(e, EvalConfig)
    e.set_defaults(fn=cmd_eval)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "bench":
        args.names += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
