"""Describe-stage speed on the synthetic corpus: signal attributes only, then with Whisper ASR.

Signal only: decode + validate + pitch/volume/speed/noise, metadata transcripts. With ASR: the
same clips with their transcripts withheld, transcribed by Whisper (the real tiny.en when
--models or DESTA_MODELS gives it, else a tiny random Whisper). Prints clips/s, real-time factor
(audio seconds per wall second), the WER reached with real weights, and one JSON line.

    python bench/describe.py --clips 400 [--models ~/.cache/desta-offline-models]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from desta.audio.synth import synth_corpus
from desta.demo import small_models_dir
from desta.describe import DescribeConfig, describe
from desta.model.tiny import save_tiny_bases


def run(manifest: Path, out: Path, **kwargs) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = describe(DescribeConfig(source=str(manifest), out=str(out), progress=False, **kwargs))
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--asr-clips", type=int, default=60, help="clips for the (slower) ASR run")
    parser.add_argument("--models", default=None, help="folder with whisper-tiny.en (tools/fetch_offline_models.sh)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = synth_corpus(tmp / "corpus", num_clips=args.clips, seed=0, progress=False)
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        seconds, summary = run(manifest, tmp / "signal")
        audio_hours = summary["hours"]
        signal = {"clips_per_s": args.clips / seconds, "rtf": audio_hours * 3600 / seconds}
        print(f"signal attributes: {args.clips} clips, {audio_hours * 3600:.0f} s of audio in {seconds:.1f} s: "
              f"{signal['clips_per_s']:.0f} clips/s, {signal['rtf']:.0f}x real time (1 process)")

        bare = tmp / "bare.jsonl"
        bare.write_text("".join(json.dumps({"path": str(manifest.parent / r["path"]), "id": r["id"]}) + "\n"
                                for r in rows[: args.asr_clips]))
        folder = small_models_dir(args.models)
        asr_model = str(folder / "whisper-tiny.en") if folder else str(save_tiny_bases(tmp / "tiny")[0])
        seconds, summary = run(bare, tmp / "asr", asr_model=asr_model)
        asr = {"clips_per_s": args.asr_clips / seconds, "rtf": summary["hours"] * 3600 / seconds,
               "weights": "whisper-tiny.en" if folder else "tiny random"}
        print(f"with ASR ({asr['weights']}): {args.asr_clips} clips in {seconds:.1f} s: "
              f"{asr['clips_per_s']:.1f} clips/s, {asr['rtf']:.1f}x real time")
        if folder:
            import jiwer
            from datasets import load_from_disk
            from whisper.normalizers import EnglishTextNormalizer

            normalize = EnglishTextNormalizer()
            heard = {r["id"]: r["transcript"] for r in load_from_disk(str(tmp / "asr" / "dataset"))}
            scored = [r for r in rows[: args.asr_clips] if r["id"] in heard]
            asr["wer"] = jiwer.wer([normalize(r["transcript"]) for r in scored],
                                   [normalize(heard[r["id"]]) for r in scored])
            by_accent = {}
            for accent in sorted({r["accent"] for r in scored}):
                group = [r for r in scored if r["accent"] == accent]
                by_accent[accent] = round(jiwer.wer([normalize(r["transcript"]) for r in group],
                                                    [normalize(heard[r["id"]]) for r in group]), 3)
            asr["wer_by_accent"] = by_accent
            print(f"WER of whisper-tiny.en on the synthetic corpus: {asr['wer']:.3f}; by accent: {by_accent}")

    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(json.dumps({"bench": "describe", "machine": machine, "clips": args.clips,
                      "signal_clips_per_s": round(signal["clips_per_s"], 1), "signal_rtf": round(signal["rtf"], 1),
                      "asr_clips": args.asr_clips, "asr_clips_per_s": round(asr["clips_per_s"], 2),
                      "asr_rtf": round(asr["rtf"], 2), "asr_weights": asr["weights"],
                      "wer": round(asr["wer"], 3) if "wer" in asr else None,
                      "wer_by_accent": asr.get("wer_by_accent")}))


if __name__ == "__main__":
    main()
