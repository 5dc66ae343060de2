"""The ``kvforge`` command: generate, chat, serve, and the GGUF tools (quantize, imatrix,
perplexity, convert)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kvforge import config as kv_config
from kvforge.engine_args import EngineArgs
from kvforge.entrypoints.bench import add_bench_parser
from kvforge.entrypoints.clip_cli import add_clip_parser
from kvforge.errors import KVForgeError
from kvforge.lora.request import parse_lora_module
from kvforge.sampling_params import SamplingParams


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--sample-seed", type=int, default=None, dest="sample_seed")
    group.add_argument("--stop", action="append", default=None)


def _sampling_params(args: argparse.Namespace, n: int = 1) -> SamplingParams:
    return SamplingParams(
        n=n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        seed=args.sample_seed,
        stop=args.stop,
    )


def _make_llm(args: argparse.Namespace) -> Any:
    from kvforge.entrypoints.llm import LLM

    engine_args = EngineArgs.from_cli_args(args)
    return LLM(**vars(engine_args))


def cmd_generate(args: argparse.Namespace) -> int:
    """One-shot generation: print ``n`` completions of each prompt."""
    llm = _make_llm(args)
    params = _sampling_params(args, args.n)
    prompts: list[Any] = args.prompt
    if args.chat:
        tok = llm.get_tokenizer()
        prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    for prompt, output in zip(
        args.prompt, llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    ):
        for completion in output.outputs:
            header = f"[{completion.index}] " if len(output.outputs) > 1 else ""
            if len(args.prompt) > 1:
                header = f"{prompt!r} -> {header}"
            print(f"{header}{completion.text}")
    return 0


CHAT_HELP = """commands:
  /system TEXT   set the system prompt (and start over)
  /preset NAME   sampling preset for the next replies (code, factual, chat, ...; /preset off)
  /save FILE     write the conversation as JSON (OpenAI messages)
  /reset         start over
  /help          this list
  a line ending in \\ continues on the next line; Ctrl-D quits"""


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat, streamed token by token; the prefix cache keeps past turns."""
    llm = _make_llm(args)
    print("kvforge chat: type a message, /help for commands, Ctrl-D to quit.", file=sys.stderr)
    run_chat(llm.engine, _sampling_params(args), system=args.system, verbose=args.verbose)
    return 0


def _read_message(read: Callable[[str], str]) -> str:
    """One message: lines ending in a backslash continue on the next."""
    lines = [read("> ")]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read(". "))
    return "\n".join(lines)


def run_chat(
    engine: Any,
    params: SamplingParams,
    *,
    system: str | None = None,
    verbose: bool = False,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda text: print(text, end="", flush=True),
) -> list[Any]:
    """The chat loop over an engine; returns the final RequestOutput of every turn."""
    import dataclasses

    from kvforge import presets

    base: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    turns: list[Any] = []
    current = params
    while True:
        try:
            line = _read_message(read)
        except EOFError:
            write("\n")
            return turns
        if not line.strip():
            continue
        command, _, rest = line.strip().partition(" ")
        if command == "/reset":
            messages = list(base)
            continue
        if command == "/help":
            write(CHAT_HELP + "\n")
            continue
        if command == "/system":
            base = [{"role": "system", "content": rest.strip()}] if rest.strip() else []
            messages = list(base)
            write("system prompt set; the conversation starts over\n")
            continue
        if command == "/preset":
            name = rest.strip()
            if name in ("", "off"):
                current = params
                write("no preset\n")
                continue
            try:
                current = dataclasses.replace(params, **presets.sampling_preset(name).values)
            except KVForgeError as exc:
                write(f"{exc}\n")
                continue
            write(f"preset {name}: {presets.SAMPLING[name].values}\n")
            continue
        if command == "/save":
            if not rest.strip():
                write("usage: /save FILE\n")
                continue
            try:
                with open(rest.strip(), "w") as out:
                    json.dump(messages, out, indent=2)
            except OSError as exc:
                write(f"cannot save: {exc}\n")
                continue
            write(f"saved {len(messages)} messages to {rest.strip()}\n")
            continue
        messages.append({"role": "user", "content": line})
        request_id = engine.add_request(engine.tokenizer.encode_chat(messages), current)
        shown = 0
        final = None
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                text = output.outputs[0].text
                write(text[shown:])
                shown = len(text)
                final = output
        write("\n")
        assert final is not None
        turns.append(final)
        if verbose:
            print(
                f"[{len(final.prompt_token_ids)} prompt tokens, {final.num_cached_tokens} cached, "
                f"{len(final.outputs[0].token_ids)} generated]",
                file=sys.stderr,
            )
        messages.append({"role": "assistant", "content": final.outputs[0].text})


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model over HTTP (OpenAI-compatible API and native /generate)."""
    from pathlib import Path

    from kvforge.async_engine import AsyncLLM
    from kvforge.entrypoints.openai import ServerConfig, serve
    from kvforge.hub import is_model_name, resolve
    from kvforge.utils import parse_size

    if args.model_positional:
        args.model = args.model_positional
    served_name = args.model
    if args.model:  # a name missing from the cache fails here, before anything starts
        args.model = resolve(args.model)
    if args.node_rank > 0:  # another machine of a split model: its ranks only, no server
        from kvforge.engine_args import EngineArgs
        from kvforge.parallel.executor import run_node

        return run_node(EngineArgs.from_cli_args(args).create_engine_config())
    loras = [parse_lora_module(spec, i + 1) for i, spec in enumerate(args.lora_modules or [])]
    loras += [
        parse_lora_module(spec, len(loras) + i + 1, scaled=True)
        for i, spec in enumerate(args.lora_scaled or [])
    ]
    if len({lora.lora_name for lora in loras}) < len(loras):
        raise KVForgeError("two LoRA modules share a name")
    args.enable_lora = args.enable_lora or bool(loras) or args.allow_runtime_lora
    default_preset = _apply_preset(args, build_parser()) if args.preset else None

    def make_engine() -> Any:
        # Runs on the engine's own thread (see AsyncLLM): loading and stepping share one
        # OpenMP pool.
        engine = _make_llm(args).engine
        for lora in loras:  # a bad adapter stops the start with its one-line reason
            engine.add_lora(lora)
        # Build the grammar backend's vocabulary tables now, not on the first structured request.
        engine.structured_outputs()
        return engine

    names = args.served_model_name or [
        served_name
        if served_name and is_model_name(served_name)  # Org/Name[:QUANT] from the HF cache
        else Path(served_name).stem
        if served_name
        else kv_config.DEFAULT_MODEL_NAME
    ]
    config = ServerConfig(
        served_model_names=tuple(names),
        api_key=args.api_key or kv_config.api_key(),
        allowed_origins=tuple(args.allowed_origins or ()),
        max_request_bytes=parse_size(args.max_request_bytes),
        max_queued_requests=args.max_queued_requests,
        shutdown_timeout=args.shutdown_timeout,
        timeout_header_read=args.timeout_header_read,
        timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency,
        lora_modules=tuple(loras),
        allow_runtime_lora=args.allow_runtime_lora,
        lora_root=args.lora_root,
        admin_key=args.admin_key,
        clip_path=args.clip,
        default_preset=default_preset,
        json_access_log=args.json_access_log,
    )
    config.check()  # before loading the model
    async_llm = AsyncLLM(make_engine, args.max_queued_requests)
    return serve(async_llm, config, args.host, args.port)


def _apply_preset(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """Apply ``--preset``: a serving preset's values to the options still at their defaults
    (returns None), or a sampling preset's name (the server's default for requests)."""
    from kvforge import presets

    preset = presets.find(args.preset)
    if preset.kind == "sampling":
        return preset.name
    defaults = parser.parse_args(["serve"])
    for key, value in preset.values.items():
        if getattr(args, key) == getattr(defaults, key):
            setattr(args, key, value)
    return None


def cmd_models(args: argparse.Namespace) -> int:
    """The models available without downloading: the embedded one and the HF cache's."""
    from kvforge.hub import cached_models
    from kvforge.utils import format_size

    print(f"{kv_config.DEFAULT_MODEL_NAME}  (embedded, the default)")
    for model in cached_models():
        if model["kind"] == "other":
            continue
        quants = f"  [{', '.join(model['gguf'])}]" if model["gguf"] else ""
        print(f"{model['name']}  ({model['kind']}, {format_size(model['bytes'])}){quants}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """Print the presets and the reason for each value."""
    from kvforge import presets

    print(presets.table(), end="")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Requantize a GGUF file (llama.cpp's llama-quantize), or quantize a float model with
    GPTQ / AWQ / round-to-nearest into a Hugging Face directory (``--method``)."""
    if args.method is not None:
        return _quantize_calibrated(args)
    if args.type is None:
        raise KVForgeError("give a GGUF type (Q4_K_M, Q8_0, ...) or --method gptq|awq|rtn")
    from gguf import GGMLQuantizationType

    from kvforge.quant.mixes import MixOptions
    from kvforge.tools.quantize import quantize_file

    def qtype(name: str | None) -> GGMLQuantizationType | None:
        if name is None:
            return None
        try:
            return GGMLQuantizationType[name.upper()]
        except KeyError:
            raise KVForgeError(f"unknown tensor type {name!r}") from None

    options = MixOptions(
        args.pure, qtype(args.output_tensor_type), qtype(args.token_embedding_type)
    )
    counts = quantize_file(args.input, args.output, args.type, args.imatrix, options)
    print(f"{args.output}: " + ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())))
    return 0


def _quantize_calibrated(args: argparse.Namespace) -> int:
    from kvforge.tools.calibrated import quantize_calibrated

    if args.type is not None:
        raise KVForgeError("--method writes a Hugging Face directory: drop the GGUF type")
    if args.method != "rtn" and args.calibration is None:
        raise KVForgeError(f"--method {args.method} needs --calibration FILE (text)")
    text = _read_text(args.calibration) if args.calibration else ""
    config = quantize_calibrated(
        args.input,
        args.output,
        args.method,
        text,
        bits=args.bits,
        group_size=args.group_size,
        symmetric=args.sym,
        act_order=args.act_order,
        damp=args.damp,
        ctx=args.ctx,
        max_chunks=args.chunks,
    )
    print(f"{args.output}: {json.dumps(config)}")
    return 0


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise KVForgeError(f"cannot read {path}: {exc}") from exc


def cmd_imatrix(args: argparse.Namespace) -> int:
    """Collect an importance matrix over calibration text (llama.cpp's llama-imatrix)."""
    from kvforge.quant.imatrix import write_imatrix
    from kvforge.tools.perplexity import collect_imatrix, make_runner, text_chunks

    runner = make_runner(args.model, args.dtype)
    chunks = text_chunks(runner, _read_text(args.file), args.ctx, args.chunks)
    sums, counts = collect_imatrix(runner, chunks)
    write_imatrix(args.output, sums, counts, [args.file], len(chunks), args.ctx)
    print(f"{args.output}: {len(sums)} matrices over {len(chunks)} chunks of {args.ctx} tokens")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    """Chunked perplexity, and KL divergence against saved base logits."""
    from kvforge.tools.perplexity import make_runner, perplexity, text_chunks

    runner = make_runner(args.model, args.dtype, args.kv_cache_dtype)
    chunks = text_chunks(runner, _read_text(args.file), args.ctx, args.chunks)
    base = args.kl_divergence_base
    result = perplexity(
        runner,
        chunks,
        save_base=base if base and not args.kl_divergence else None,
        compare_base=base if base and args.kl_divergence else None,
    )
    print(f"perplexity: {result.ppl:.4f} over {result.num_tokens} tokens ({len(chunks)} chunks)")
    if result.kld is not None:
        print(f"base perplexity: {result.base_ppl:.4f}")
        print(f"mean KL divergence: {result.kld:.6f} +- {result.kld_stderr:.6f}")
        print(f"same top token: {100 * (result.top1 or 0):.2f}%")
    elif base:
        print(f"saved base log-probabilities to {base}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a Hugging Face directory to GGUF."""
    from kvforge.tools.convert import convert

    count = convert(args.input, args.output, args.outtype)
    print(f"{args.output}: {count} tensors ({args.outtype})")
    return 0


def cmd_moe_upcycle(args: argparse.Namespace) -> int:
    """Turn a dense GGUF into a mixture of identical experts."""
    from kvforge.tools.upcycle import upcycle

    layers = upcycle(args.input, args.output, args.experts, args.active, args.seed)
    active = args.active or args.experts
    print(f"{args.output}: {layers} layers of {args.experts} experts ({active} active)")
    return 0


def cmd_lora_merge(args: argparse.Namespace) -> int:
    """Fold a LoRA adapter into its base model."""
    from kvforge.tools.lora_merge import merge

    merge(args.base, args.adapter, args.output, args.outtype, args.scale)
    print(f"{args.output}: {args.base} + {args.adapter} (scale {args.scale})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train a LoRA adapter."""
    from kvforge.tools.finetune import FinetuneConfig, finetune

    targets = tuple(t for spec in args.target_modules for t in spec.split(","))
    config = FinetuneConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        target_modules=targets,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        learning_rate=args.learning_rate,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        eval_fraction=args.eval_fraction,
        max_length=args.max_length,
        save_every=args.save_every,
        seed=args.seed,
        dtype=args.dtype,
        resume=args.resume,
        router_aux_loss_coef=args.router_aux_loss_coef,
        router_z_loss_coef=args.router_z_loss_coef,
        qat=args.qat,
        qat_group_size=args.qat_group_size,
    )
    metrics = finetune(config)
    print(json.dumps(metrics, indent=2))
    return 0


def _add_tool_parsers(sub: Any) -> None:
    tune = sub.add_parser("finetune", help="train a LoRA adapter on chat JSONL (CPU)")
    tune.add_argument("model", help="GGUF file or Hugging Face directory (the frozen base)")
    tune.add_argument("data", help='JSON Lines of {"messages": [...]} or {"text": "..."}')
    tune.add_argument("output", help="the PEFT adapter directory to write")
    tune.add_argument(
        "--target-modules",
        nargs="+",
        default=["q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"],
    )
    tune.add_argument("--rank", type=int, default=8)
    tune.add_argument("--alpha", type=float, default=16.0)
    tune.add_argument("--dropout", type=float, default=0.05)
    tune.add_argument("--learning-rate", type=float, default=2e-4)
    tune.add_argument("--epochs", type=float, default=1.0)
    tune.add_argument("--batch-size", type=int, default=4)
    tune.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    tune.add_argument("--warmup-ratio", type=float, default=0.1)
    tune.add_argument("--max-grad-norm", type=float, default=1.0)
    tune.add_argument("--eval-fraction", type=float, default=0.1)
    tune.add_argument("--max-length", type=int, default=512, help="tokens per conversation")
    tune.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    tune.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    tune.add_argument(
        "--router-aux-loss-coef",
        type=float,
        default=0.0,
        help="mixture of experts: weight of the load-balancing loss (e.g. 0.01)",
    )
    tune.add_argument(
        "--router-z-loss-coef",
        type=float,
        default=0.0,
        help="mixture of experts: weight of the router z-loss (e.g. 0.001)",
    )
    tune.add_argument(
        "--qat",
        choices=["int4", "int8"],
        default=None,
        help="quantization-aware: train through rounded weights, write OUTPUT/quantized",
    )
    tune.add_argument("--qat-group-size", type=int, default=128, help="columns per scale")
    tune.set_defaults(func=cmd_finetune)
    lora = sub.add_parser("lora", help="LoRA adapter tools").add_subparsers(
        dest="lora_command", required=True
    )
    merge = lora.add_parser("merge", help="fold a PEFT LoRA adapter into its base model")
    merge.add_argument("base", help="GGUF file or Hugging Face directory")
    merge.add_argument("adapter", help="PEFT adapter directory")
    merge.add_argument("output", help="a .gguf file, or a directory (Hugging Face base)")
    merge.add_argument("--outtype", default="F16", help="GGUF type: F32 F16 Q8_0 Q4_K_M ...")
    merge.add_argument("--scale", type=float, default=1.0, help="multiply the adapter's update")
    merge.set_defaults(func=cmd_lora_merge)
    moe = sub.add_parser("moe", help="mixture-of-experts tools").add_subparsers(
        dest="moe_command", required=True
    )
    up = moe.add_parser("upcycle", help="a dense llama GGUF as identical experts plus a router")
    up.add_argument("input")
    up.add_argument("output")
    up.add_argument("--experts", type=int, default=4)
    up.add_argument("--active", type=int, default=None, help="experts per token (default all)")
    up.add_argument("--seed", type=int, default=0, help="of the random router")
    up.set_defaults(func=cmd_moe_upcycle)
    quant = sub.add_parser("quantize", help="requantize a GGUF file (F16, Q8_0, Q4_K_M, ...)")
    quant.add_argument("input")
    quant.add_argument("output")
    quant.add_argument(
        "type", nargs="?", help="F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_S/M/L ..."
    )
    quant.add_argument("--imatrix", default=None, help="importance matrix (imatrix.gguf)")
    quant.add_argument("--pure", action="store_true", help="one type for all matrices")
    quant.add_argument("--output-tensor-type", default=None)
    quant.add_argument("--token-embedding-type", default=None)
    calibrated = quant.add_argument_group(
        "calibrated", "a float Llama model to a GPTQ / AWQ Hugging Face directory"
    )
    calibrated.add_argument("--method", choices=["gptq", "awq", "rtn"], default=None)
    calibrated.add_argument("--calibration", default=None, help="calibration text file")
    calibrated.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    calibrated.add_argument("--group-size", type=int, default=128, help="-1: one per row")
    calibrated.add_argument(
        "--sym",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="symmetric groups (default: yes, except AWQ)",
    )
    calibrated.add_argument("--act-order", action="store_true", help="GPTQ: columns by Hessian")
    calibrated.add_argument("--damp", type=float, default=0.01, help="GPTQ: Hessian damping")
    calibrated.add_argument("--ctx", type=int, default=512, help="tokens per calibration chunk")
    calibrated.add_argument("--chunks", type=int, default=16, help="calibration chunks")
    quant.set_defaults(func=cmd_quantize)
    for name, helptext, func in (
        ("imatrix", "collect an importance matrix over calibration text", cmd_imatrix),
        ("perplexity", "chunked perplexity and KL divergence", cmd_perplexity),
    ):
        tool = sub.add_parser(name, help=helptext)
        tool.add_argument("-m", "--model", default=None, help="GGUF file or HF directory")
        tool.add_argument("-f", "--file", required=True, help="text file")
        tool.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
        tool.add_argument("--chunks", type=int, default=None, help="at most this many chunks")
        tool.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
        tool.set_defaults(func=func)
        if name == "imatrix":
            tool.add_argument("-o", "--output", default="imatrix.gguf")
        else:
            tool.add_argument(
                "--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3", "fp8_e5m2", "int8"]
            )
            tool.add_argument(
                "--kl-divergence-base",
                default=None,
                help="log-probabilities file: written, or read with --kl-divergence",
            )
            tool.add_argument("--kl-divergence", action="store_true", help="compare with the base")
    conv = sub.add_parser("convert", help="convert a Hugging Face directory to GGUF")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"])
    conv.set_defaults(func=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kvforge`` command."""
    from kvforge import __version__

    parser = argparse.ArgumentParser(prog="kvforge", description="kvforge LLM inference engine")
    parser.add_argument("--version", action="version", version=f"kvforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete prompts and print the results")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("-p", "--prompt", action="append", required=True, help="prompt (repeatable)")
    gen.add_argument("-n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive streaming chat")
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("-v", "--verbose", action="store_true", help="print token counts per turn")
    chat.set_defaults(func=cmd_chat)
    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    srv.add_argument(
        "model_positional",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model: a path, or Org/Name[:QUANT] from the local Hugging Face cache",
    )
    _add_engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--served-model-name", nargs="+", default=None, help="name (and aliases) in the API"
    )
    srv.add_argument(
        "--api-key", default=None, help="require this bearer token (or KVFORGE_API_KEY)"
    )
    srv.add_argument("--allowed-origins", nargs="*", default=None, help="CORS origins")
    srv.add_argument(
        "--max-queued-requests", type=int, default=None, help="429 beyond this many waiting"
    )
    srv.add_argument("--max-request-bytes", default="16MiB", help="413 for larger bodies")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0, help="SIGTERM drain limit (s)")
    srv.add_argument(
        "--timeout-header-read",
        type=float,
        default=10.0,
        help="close a connection whose request has not arrived within this many seconds",
    )
    srv.add_argument(
        "--timeout-keep-alive", type=int, default=5, help="close idle keep-alive connections (s)"
    )
    srv.add_argument(
        "--limit-concurrency",
        type=int,
        default=512,
        help="open connections and tasks beyond which new requests get 503",
    )
    srv.add_argument(
        "--preset",
        default=None,
        help="a serving preset (throughput, low-latency, memory-constrained) for the options "
        "left at their defaults, or a sampling preset (code, chat, ...) for every request that "
        "names none; see kvforge presets",
    )
    srv.add_argument(
        "--json-access-log",
        action="store_true",
        help="one JSON object per HTTP request on stderr (method, path, status, bytes, duration)",
    )
    srv.add_argument(
        "--clip",
        default=None,
        metavar="PATH",
        help="also serve this CLIP checkpoint: text / image embeddings, POST /v1/classify",
    )
    lora = srv.add_argument_group("LoRA adapters (imply --enable-lora)")
    lora.add_argument(
        "--lora-modules",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="PEFT adapter directories served as model NAME",
    )
    lora.add_argument(
        "--lora-scaled",
        nargs="+",
        default=None,
        metavar="NAME=PATH:SCALE",
        help="the same, the adapter's update multiplied by SCALE",
    )
    lora.add_argument(
        "--allow-runtime-lora",
        action="store_true",
        help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --lora-root and "
        "--admin-key)",
    )
    lora.add_argument("--lora-root", default=None, help="runtime adapters must lie under this")
    lora.add_argument(
        "--admin-key", default=None, help="X-Admin-Key that runtime adapter requests must send"
    )
    srv.set_defaults(func=cmd_serve)
    _add_tool_parsers(sub)
    add_bench_parser(sub, _add_engine_args, _make_llm)
    add_clip_parser(sub)
    sub.add_parser("presets", help="the sampling and serving presets, with reasons").set_defaults(
        func=cmd_presets
    )
    sub.add_parser(
        "models", help="models available locally (embedded and in the Hugging Face cache)"
    ).set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvforge`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=kv_config.log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except KVForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
