"""Whisper encoder time on 3 s clips: variable length (desta's default) vs padded to 30 s (the papers).

Random weights with the real Whisper shapes (weights do not change the time), synthetic espeak-ng
speech, CPU unless --device says otherwise. Prints a table and one JSON line.

    python bench/encoder.py --size small --clips 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from desta.audio.tts import Voice, synthesize
from desta.model.modeling import DestaConfig, DestaModel
from desta.model.processing import DestaProcessor
from desta.model.tiny import tiny_llm_config, tiny_tokenizer, tiny_whisper_config

# (d_model, layers, heads, ffn) of the released Whisper sizes.
SIZES = {"tiny": (384, 4, 6, 1536), "base": (512, 6, 8, 2048), "small": (768, 12, 12, 3072),
         "medium": (1024, 24, 16, 4096), "large-v3": (1280, 32, 20, 5120)}


def encoder_model(size: str, pad_to_30s: bool) -> tuple[DestaModel, DestaProcessor]:
    d_model, layers, heads, ffn = SIZES[size]
    whisper = tiny_whisper_config(d_model=d_model, encoder_layers=layers, encoder_attention_heads=heads,
                                  encoder_ffn_dim=ffn, num_mel_bins=128 if size == "large-v3" else 80)
    tokenizer = tiny_tokenizer()
    config = DestaConfig(encoder_config=whisper.to_dict(), text_config=tiny_llm_config(len(tokenizer)).to_dict(),
                         pad_to_30s=pad_to_30s)
    processor = DestaProcessor.from_config(config, tokenizer)
    return DestaModel(config).eval(), processor


def time_encoder(model: DestaModel, features: dict, repeats: int, device: str) -> float:
    features = {k: v.to(device) for k, v in features.items()}
    with torch.no_grad():
        model.encode_audio(**features)  # warm-up
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.encode_audio(**features)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(SIZES), help="Whisper shapes (default: small)")
    parser.add_argument("--clips", type=int, default=4, help="clips per batch")
    parser.add_argument("--seconds", type=float, default=3.0, help="clip length")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    sentence = "Excuse me, could you tell me the way to the railway station please?"
    clips = [synthesize(sentence, Voice(variant=f"m{i % 4 + 1}"))[: int(args.seconds * 16000)]
             for i in range(args.clips)]
    results = {}
    for mode, padded in [("variable", False), ("padded_30s", True)]:
        model, processor = encoder_model(args.size, padded)
        model.to(args.device)
        features = processor.extract_features(clips)
        results[mode] = time_encoder(model, features, args.repeats, args.device)
        print(f"{mode:>11}: {features['input_features'].shape[-1]:>5} mel frames, "
              f"{results[mode] * 1000:8.1f} ms per batch of {args.clips}, "
              f"{results[mode] / args.clips * 1000:7.1f} ms per clip")
    speedup = results["padded_30s"] / results["variable"]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if args.device.startswith("cuda"):
        machine = torch.cuda.get_device_name()
    print(f"variable length is {speedup:.1f}x faster than padding to 30 s ({args.size}, {args.device}: {machine})")
    print(json.dumps({"bench": "encoder", "size": args.size, "device": args.device, "machine": machine,
                      "clips": args.clips, "clip_seconds": args.seconds,
                      "variable_s_per_batch": round(results["variable"], 4),
                      "padded_30s_s_per_batch": round(results["padded_30s"], 4), "speedup": round(speedup, 2)}))


if __name__ == "__main__":
    main()
