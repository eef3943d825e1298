"""The `desta` command: one subcommand per stage; `desta --help` lists them."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path


def _field_help(cls: type) -> dict[str, str]:
    """Each config field's trailing comment, which becomes its --help text."""
    source = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.M)}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of a config dataclass; only flags given on the command line override defaults."""
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        text = helps.get(f.name, "")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind.startswith("dict"):
            parser.add_argument(flag, action="append", metavar="KEY=VALUE", default=None, help=text)
        elif kind.startswith("list") or "list[str]" in kind:
            parser.add_argument(flag, metavar="A,B,...", default=None, help=text + " (comma-separated)")
        else:
            convert = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=convert, default=None, required=required, help=text)


def config_from_args(cls: type, args: argparse.Namespace):
    """The config dataclass from the flags that were given."""
    settings = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        kind = str(f.type)
        if kind.startswith("dict"):
            bad = [v for v in value if "=" not in v]
            if bad:
                raise ValueError(f"--{f.name.replace('_', '-')} takes KEY=VALUE, got {bad[0]!r}")
            value = dict(v.split("=", 1) for v in value)
        elif kind.startswith("list") or "list[str]" in kind:
            value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
            if f.name == "pool" and len(value) == 1:
                value = value[0]
        settings[f.name] = value
    return cls(**settings)


def _demo(args: argparse.Namespace) -> int:
    """The whole DeSTA loop on a built-in tiny default: synth, describe, targets, train, eval, export, report."""
    from desta.demo import MINIMAL, run_demo

    run_demo(args.out, models=args.models, size=MINIMAL if args.minimal else None)
    return 0


def _tiny_models(args: argparse.Namespace) -> int:
    """Write the tiny random Whisper and chat LLM (with tokenizer) as model folders, for smoke runs."""
    from desta.testing import save_tiny_bases

    whisper_dir, llm_dir = save_tiny_bases(args.out, seed=args.seed)
    print(f"wrote {whisper_dir} and {llm_dir}")
    return 0


def _tts(args: argparse.Namespace) -> int:
    """Speak text to a 16 kHz WAV file with espeak-ng."""
    import soundfile as sf

    from desta.audio import SAMPLE_RATE
    from desta.tts import Voice, synthesize

    voice = Voice(accent=args.accent, variant=args.variant, rate=args.rate, pitch=args.pitch, volume=args.volume)
    samples = synthesize(args.text, voice)
    sf.write(args.out, samples, SAMPLE_RATE)
    print(f"wrote {args.out}: {len(samples) / SAMPLE_RATE:.2f} s")
    return 0


def _synth(args: argparse.Namespace) -> int:
    """Write the synthetic espeak-ng corpus: WAV clips and a manifest with their labels."""
    from desta.synth import synth_corpus

    manifest = synth_corpus(args.out, num_clips=args.num_clips, seed=args.seed, num_proc=args.num_proc)
    print(f"wrote {args.num_clips} clips; manifest: {manifest}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    """Turn an audio corpus into DeSTA descriptions (transcript + attributes); bad rows go to rejects."""
    from desta.describe import DescribeConfig, describe, merge

    if not args.merge and not args.source:
        raise ValueError("--source is required (or --merge)")
    summary = merge(args.out) if args.merge else describe(config_from_args(DescribeConfig, args))
    return _print_counts("describe", summary, args.out, lambda s: (
        f"inputs {s['inputs']} = described {s['described']} + rejected {s['rejected']} ({s['hours']} h described)"))


def _print_counts(stage: str, summary: dict, out: str, counts) -> int:
    """The end-of-run line of a chunked stage: counts after a merge, or this shard's progress."""
    if "inputs" in summary:
        print(f"{counts(summary)} -> {Path(out) / 'dataset'}, {Path(out) / 'rejects.jsonl'}")
    else:
        print(f"shard {summary['shard']}: {summary['chunks']} chunks done ({summary['run_now']} in this run); "
              f"merge with: desta {stage} --merge --out {out}")
    return 0


def _targets(args: argparse.Namespace) -> int:
    """The text LLM answers instructions from each description; its answers become training targets."""
    from desta.targets import TargetsConfig, merge, targets

    if not args.merge and not (args.source and args.model):
        raise ValueError("--source and --model are required (or --merge)")
    summary = merge(args.out) if args.merge else targets(config_from_args(TargetsConfig, args))
    return _print_counts("targets", summary, args.out, lambda s: (
        f"prompts {s['inputs']} = kept {s['kept']} + rejected {s['rejected']} {s['reasons'] or ''}"))


def _serve(args: argparse.Namespace) -> int:
    """Serve a DeSTA checkpoint (or a text LLM) behind an OpenAI-compatible chat-completions API."""
    import os

    import uvicorn

    from desta.serve import ServeLimits, create_app, load_engine

    engine = load_engine(args.checkpoint, args.llm, args.model_name)
    limits = ServeLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_audio_seconds=args.max_audio_seconds,
                         max_tokens=args.max_tokens, max_concurrent=args.max_concurrent)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    print(f"serving {engine.model_id!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    uvicorn.run(create_app(engine, limits, api_key), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`desta train key=value ...` without a YAML file: the first word is an override too."""
    if args.config and "=" in args.config and not Path(args.config).is_file():
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _train(args: argparse.Namespace) -> int:
    """Train the connector (and optional LoRA) on a targets dataset: CONFIG.yaml plus key=value overrides."""
    from desta.train import run

    summary = run(*_config_and_overrides(args))
    print(f"trained {summary['steps']} steps on {summary['train_rows']} rows "
          f"({summary['samples_per_second']} samples/s); loss {summary['first_train_loss']} -> "
          f"{summary['last_train_loss']}; eval losses {[round(v, 4) for _, v in summary['eval_losses']]}")
    return 0


def _posttrain(args: argparse.Namespace) -> int:
    """Post-train a chat LLM on a new task with strategies against forgetting; compare them."""
    from desta.posttrain import render_comparison, run

    print(render_comparison(run(*_config_and_overrides(args))))
    return 0


def _magpie(args: argparse.Namespace) -> int:
    """Pseudo replay data: the model writes instructions from its bare user header and answers them."""
    import json

    from desta.generation import TransformersBackend
    from desta.posttrain import magpie

    rows, dropped = magpie(TransformersBackend(args.model), args.count, args.max_new_tokens, seed=args.seed)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {args.out}; dropped {dropped}")
    return 0


def _cache_features(args: argparse.Namespace) -> int:
    """Compute the frozen encoder's tapped-layer features once for a training config's data."""
    from desta.config import load_config
    from desta.features import cache_features
    from desta.train import TrainConfig, build_model, load_targets

    config = load_config(TrainConfig, *_config_and_overrides(args))
    if not config.data.feature_cache:
        raise ValueError("set data.feature_cache=FOLDER (in the config or as an override)")
    model, processor = build_model(config.model, Path(config.output_dir))
    for split in (config.data.train, config.data.eval):
        if split:
            cache_features(model, processor, load_targets(split, "data"), config.data.feature_cache,
                           dtype=config.data.cache_dtype)
    print(f"features cached in {config.data.feature_cache}")
    return 0


def _eval_set(args: argparse.Namespace) -> int:
    """Build an eval set of unseen instructions from a described dataset with gold attributes."""
    from datasets import load_from_disk

    from desta.evaluate import build_eval_set, save_eval_set

    if not Path(args.source).is_dir():
        raise FileNotFoundError(f"{args.source} not found; give the dataset folder written by desta describe")
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    items = build_eval_set(load_from_disk(args.source), seed=args.seed, categories=categories)
    if args.max_clips:
        keep = sorted({i["id"] for i in items})[: args.max_clips]
        items = [i for i in items if i["id"] in set(keep)]
    save_eval_set(items, args.out)
    counts: dict[str, int] = {}
    for item in items:
        counts[item["category"]] = counts.get(item["category"], 0) + 1
    print(f"wrote {len(items)} items to {args.out}: {counts}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Score checkpoints on unseen speech instructions against the text LLM reading the gold description."""
    from desta.evaluate import EvalConfig, evaluate

    args.checkpoints = args.checkpoint
    report = evaluate(config_from_args(EvalConfig, args))
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {Path(args.out) / 'report.json'}, report.md, scores.png; overall {report['overall']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Write a Hub-ready folder (weights, config, processor, model card); --push uploads it."""
    from desta.export import export, files_to_upload, push

    folder = export(args.checkpoint, args.out, full=args.full, encoder_id=args.encoder_id, llm_id=args.llm_id,
                    license=args.license, report=args.report)
    size = sum(s for _, s in files_to_upload(folder))
    print(f"exported {args.checkpoint} -> {folder} ({size / 2**20:.1f} MiB, "
          f"{'full model' if args.full else 'trainable weights only'})")
    if args.push:
        result = push(folder, args.push, private=args.private, dry_run=args.dry_run)
        for name, size in result["files"]:
            print(f"  {'would upload' if args.dry_run else 'uploaded'} {name} ({size:,} bytes)")
        if not args.dry_run:
            print(f"pushed to {result['url']}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    """Talk to a checkpoint: audio files and an instruction in, the answer streamed out (or --batch FILE)."""
    import json

    from desta.audio import AudioError, load_audio
    from desta.generation import SamplingSettings
    from desta.loading import load
    from desta.serve import DestaEngine

    model, processor = load(args.checkpoint)
    system = [{"role": "system", "content": args.system}] if args.system else []
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.batch:
        rows = [json.loads(line) for line in Path(args.batch).read_text().splitlines() if line.strip()]
        out = Path(args.out or Path(args.batch).with_suffix(".answers.jsonl"))
        results: list[dict] = [{} for _ in rows]
        ready = []
        for index, row in enumerate(rows):
            paths = row.get("audio") or []
            paths = [paths] if isinstance(paths, str) else paths
            try:
                clips = [load_audio(Path(args.batch).parent / p if not Path(p).is_absolute() else p) for p in paths]
            except AudioError as err:
                results[index] = {**row, "error": str(err)}
                continue
            if not row.get("instruction"):
                results[index] = {**row, "error": "no instruction"}
                continue
            text = "".join(f"{processor.audio_token}\n" for _ in clips) + row["instruction"]
            ready.append((index, system + [{"role": "user", "content": text}], clips))
        for start in range(0, len(ready), args.batch_size):
            chunk = ready[start : start + args.batch_size]
            answers = model.chat(processor, [c for _, c, _ in chunk], [a for _, _, a in chunk],
                                 max_new_tokens=args.max_new_tokens, do_sample=False)
            for (index, _, _), answer in zip(chunk, answers, strict=True):
                results[index] = {**rows[index], "answer": answer}
        out.write_text("".join(json.dumps(r) + "\n" for r in results))
        failed = sum("error" in r for r in results)
        print(f"answered {len(rows) - failed} of {len(rows)} rows ({failed} with errors) -> {out}")
        return 0
    if not args.instruction:
        raise ValueError("give an instruction (or --batch FILE.jsonl)")
    clips = [load_audio(p) for p in args.audio]
    text = "".join(f"{processor.audio_token}\n" for _ in clips) + args.instruction
    engine = DestaEngine(model, processor, args.checkpoint)
    for piece in engine.stream(system + [{"role": "user", "content": text}], clips, settings):
        print(piece, end="", flush=True)
    print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from desta.tts import ACCENTS

    parser = argparse.ArgumentParser(prog="desta", description="Train speech LLMs the DeSTA2 way.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help=_demo.__doc__, description=_demo.__doc__)
    demo.add_argument("--out", default="desta-demo", help="folder for every stage's output (default: desta-demo)")
    demo.add_argument("--models", default=None,
                      help="folder holding whisper-tiny.en/ and SmolLM2-135M-Instruct/: the real small models")
    demo.add_argument("--minimal", action="store_true", help="the smallest sizes (a smoke test in seconds)")
    demo.set_defaults(run=_demo)

    synth = commands.add_parser("synth", help=_synth.__doc__, description=_synth.__doc__)
    synth.add_argument("--out", required=True, help="output folder (audio/ and manifest.jsonl)")
    synth.add_argument("--num-clips", type=int, default=1000, help="how many clips (default 1000)")
    synth.add_argument("--seed", type=int, default=0, help="labels and sentences depend only on (seed, index)")
    synth.add_argument("--num-proc", type=int, default=1, help="worker processes")
    synth.set_defaults(run=_synth)

    from desta.describe import DescribeConfig

    desc = commands.add_parser("describe", help=_describe.__doc__, description=_describe.__doc__)
    add_config_arguments(desc, DescribeConfig, skip=("source",))
    desc.add_argument("--source", help="manifest (.jsonl/.csv), save_to_disk folder, or Hub dataset id")
    desc.add_argument("--merge", action="store_true", help="merge finished shards in --out")
    desc.set_defaults(run=_describe)

    from desta.targets import TargetsConfig

    tgt = commands.add_parser("targets", help=_targets.__doc__, description=_targets.__doc__)
    add_config_arguments(tgt, TargetsConfig, skip=("source", "model", "refusal_patterns"))
    tgt.add_argument("--source", help="described dataset folder (OUT/dataset of desta describe)")
    tgt.add_argument("--model", help="the LLM: Hub id or folder (the served model name for --backend http)")
    tgt.add_argument("--merge", action="store_true", help="merge finished shards in --out")
    tgt.set_defaults(run=_targets)

    for name, run, doc in (("train", _train, _train.__doc__),
                           ("cache-features", _cache_features, _cache_features.__doc__),
                           ("posttrain", _posttrain, _posttrain.__doc__)):
        sub = commands.add_parser(name, help=doc, description=doc)
        sub.add_argument("config", nargs="?", help="YAML config, e.g. recipes/tiny/config.yaml")
        sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 data.train=DIR")
        sub.set_defaults(run=run)

    es = commands.add_parser("eval-set", help=_eval_set.__doc__, description=_eval_set.__doc__)
    es.add_argument("--source", required=True, help="described dataset folder (OUT/dataset of desta describe)")
    es.add_argument("--out", required=True, help="eval set folder")
    es.add_argument("--categories", help="comma-separated subset of: gender, accent, emotion, speaking_speed, pitch, "
                                         "volume, duration, transcription, format_*, open")
    es.add_argument("--max-clips", type=int, help="use at most this many clips")
    es.add_argument("--seed", type=int, default=0, help="seed for the format instructions' numbers")
    es.set_defaults(run=_eval_set)

    from desta.evaluate import EvalConfig

    ev = commands.add_parser("eval", help=_eval.__doc__, description=_eval.__doc__)
    ev.add_argument("checkpoint", nargs="+", help="DeSTA checkpoint folder(s), compared side by side")
    add_config_arguments(ev, EvalConfig, skip=("checkpoints",))
    ev.set_defaults(run=_eval)

    ex = commands.add_parser("export", help=_export.__doc__, description=_export.__doc__)
    ex.add_argument("checkpoint", help="checkpoint folder (output of desta train)")
    ex.add_argument("out", help="folder to write")
    ex.add_argument("--full", action="store_true", help="the whole model, LoRA merged: no base checkpoint needed")
    ex.add_argument("--encoder-id", help="Hub id of the Whisper base to name in the config (instead of a local path)")
    ex.add_argument("--llm-id", help="Hub id of the LLM base to name in the config")
    ex.add_argument("--license", default="other", help="license in the model card (follow the base models')")
    ex.add_argument("--report", help="report.json of desta eval to put in the model card")
    ex.add_argument("--push", metavar="REPO_ID", help="upload to this Hub repository")
    ex.add_argument("--private", action="store_true", help="create the repository as private")
    ex.add_argument("--dry-run", action="store_true", help="with --push: list what would be uploaded, send nothing")
    ex.set_defaults(run=_export)

    ch = commands.add_parser("chat", help=_chat.__doc__, description=_chat.__doc__)
    ch.add_argument("checkpoint", help="checkpoint or exported folder")
    ch.add_argument("instruction", nargs="?", help="what to ask")
    ch.add_argument("--audio", action="append", default=[], help="audio file (repeat for several)")
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("--batch", help="JSONL with audio (path or list) and instruction per row")
    ch.add_argument("--out", help="with --batch: where to write the answers (JSONL)")
    ch.add_argument("--batch-size", type=int, default=8)
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ch.set_defaults(run=_chat)

    mp = commands.add_parser("magpie", help=_magpie.__doc__, description=_magpie.__doc__)
    mp.add_argument("--model", required=True, help="the chat LLM (Hub id or folder)")
    mp.add_argument("--out", required=True, help="JSONL to write (instruction, answer)")
    mp.add_argument("--count", type=int, default=64, help="instructions to sample before filtering")
    mp.add_argument("--max-new-tokens", type=int, default=64, help="instruction length limit")
    mp.add_argument("--seed", type=int, default=0)
    mp.set_defaults(run=_magpie)

    serve = commands.add_parser("serve", help=_serve.__doc__, description=_serve.__doc__)
    serve.add_argument("checkpoint", nargs="?", help="DeSTA checkpoint folder (or give --llm)")
    serve.add_argument("--llm", help="serve a plain chat LLM (Hub id or folder) instead")
    serve.add_argument("--model-name", help="the model id clients ask for (default: the path given)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key-env", default="DESTA_API_KEY",
                       help="environment variable holding the key clients must send (unset: no key)")
    serve.add_argument("--max-body-mb", type=float, default=25.0, help="largest request body, MiB")
    serve.add_argument("--max-audio-seconds", type=float, default=120.0, help="longest audio part")
    serve.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask")
    serve.add_argument("--max-concurrent", type=int, default=1, help="requests generating at once; more get 503")
    serve.add_argument("--log-level", default="warning", help="uvicorn log level")
    serve.set_defaults(run=_serve)

    tiny = commands.add_parser("tiny-models", help=_tiny_models.__doc__, description=_tiny_models.__doc__)
    tiny.add_argument("out", help="folder for tiny-whisper/ and tiny-llm/")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_models)

    tts = commands.add_parser("tts", help=_tts.__doc__, description=_tts.__doc__)
    tts.add_argument("text", help="what to say")
    tts.add_argument("--out", default="speech.wav", help="output WAV path")
    tts.add_argument("--accent", default="American", choices=sorted(ACCENTS), help="English accent")
    tts.add_argument("--variant", default="m1", help="voice variant: f1-f4 (female), m1-m4 (male)")
    tts.add_argument("--rate", type=int, default=170, help="words per minute")
    tts.add_argument("--pitch", type=int, default=50, help="base pitch, 0-100")
    tts.add_argument("--volume", type=int, default=100, help="amplitude, 0-200")
    tts.set_defaults(run=_tts)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take `desta chat CKPT --audio a.wav "instruction"`: the instruction comes last
    if extra and args.command == "chat" and args.instruction is None and not any(e.startswith("-") for e in extra):
        args.instruction = " ".join(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config chatter from transformers, not the user's concern
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FloatingPointError, PermissionError, ConnectionError) as err:
        print(f"desta {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
