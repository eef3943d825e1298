"""The `desta` command: one subcommand per stage; `desta --help` lists them."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    """Speak a question with espeak-ng and let a DeSTA model answer it from the audio."""
    import soundfile as sf
    import torch

    from desta.audio import SAMPLE_RATE
    from desta.testing import load_real_models, tiny_model
    from desta.tts import Voice, synthesize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    clip = synthesize(args.question, Voice(accent="British", variant="f2", pitch=60))
    sf.write(out / "question.wav", clip, SAMPLE_RATE)
    print(f"[1/3] spoke the question with espeak-ng: {len(clip) / SAMPLE_RATE:.1f} s -> {out / 'question.wav'}")
    if args.models:
        model, processor = load_real_models(args.models)
        kind = f"real Whisper tiny.en + SmolLM2-135M-Instruct from {args.models} (untrained connector)"
    else:
        model, processor = tiny_model(seed=args.seed)
        kind = "tiny random models (the answer is noise until the pipeline trains a real one)"
    counts = model.parameter_counts()
    print(f"[2/3] built {kind}: {counts['total']:,} parameters, {counts['trainable']:,} trainable")
    torch.manual_seed(args.seed)
    conversation = [{"role": "user", "content": f"{processor.audio_token}\n{args.instruction}"}]
    transcript = model.transcribe(processor, [clip], max_new_tokens=48)[0]
    answer = model.chat(processor, conversation, [clip], transcripts=[[transcript]],
                        max_new_tokens=args.max_new_tokens)[0]
    print(f"[3/3] Whisper heard: {transcript!r}")
    print(f"      instruction:   {args.instruction!r}")
    print(f"      answer:        {answer!r}")
    print(f"done in {time.perf_counter() - start:.1f} s")
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


def build_parser() -> argparse.ArgumentParser:
    from desta.tts import ACCENTS

    parser = argparse.ArgumentParser(prog="desta", description="Train speech LLMs the DeSTA2 way.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help=_demo.__doc__, description=_demo.__doc__)
    demo.add_argument("--out", default="desta-demo", help="folder for the demo's files (default: desta-demo)")
    demo.add_argument("--models", default=None,
                      help="folder from fetch_offline_models.sh: use real Whisper tiny.en + SmolLM2-135M-Instruct")
    demo.add_argument("--question", default="What is the capital of France?", help="the text espeak-ng speaks")
    demo.add_argument("--instruction", default="Answer the question in the audio.",
                      help="the written instruction that goes with the audio")
    demo.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit in tokens")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the tiny models")
    demo.set_defaults(run=_demo)

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
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config chatter from transformers, not the user's concern
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"desta {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
