"""Convert a CTranslate2 Whisper checkpoint (faster-whisper layout) into a transformers
WhisperForConditionalGeneration folder, for offline checks with real weights. Special-token ids come from the
checkpoint's own tokenizer.json, so English-only (tiny.en) and multilingual (base, small) checkpoints both
convert; a multilingual one transcribes English by default (generation_config.language).

Usage: python tools/ct2_whisper_to_hf.py CT2_FOLDER OUT_FOLDER (fetch_offline_models.sh and
fetch_stronger_models.sh, beside this file, call it)."""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

DT = {0: np.float32, 4: np.float16, 1: np.int8, 2: np.int16, 3: np.int32}


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """Read every variable of a CTranslate2 model.bin whose dtype is in DT, by name."""
    with open(path, "rb") as f:

        def rs() -> str:
            (n,) = struct.unpack("H", f.read(2))
            return f.read(n)[:-1].decode()

        struct.unpack("I", f.read(4))  # format version
        rs()  # model spec name
        struct.unpack("I", f.read(4))  # spec revision
        (nv,) = struct.unpack("I", f.read(4))
        out = {}
        for _ in range(nv):
            nm = rs()
            (r,) = struct.unpack("B", f.read(1))
            dims = struct.unpack("I" * r, f.read(4 * r)) if r else ()
            (d,) = struct.unpack("B", f.read(1))
            (nb,) = struct.unpack("I", f.read(4))
            buf = f.read(nb)
            if d in DT:
                out[nm] = np.frombuffer(buf, dtype=DT[d]).reshape(dims).copy()
    return out


def T(a: np.ndarray) -> torch.Tensor:
    """A float32 tensor from a CTranslate2 array."""
    return torch.from_numpy(a.astype(np.float32))


def main(src: str, dst: str) -> None:
    """Write the transformers folder dst (fp16 weights, tokenizer, feature extractor) from the CTranslate2 src."""
    src = Path(src)
    v = read_ct2(src / "model.bin")
    cfgj = json.loads((src / "config.json").read_text())
    d = v["decoder/embeddings/weight"].shape[1]
    vocab = v["decoder/embeddings/weight"].shape[0]
    nenc = len(
        {
            k.split("/")[1]
            for k in v
            if k.startswith("encoder/layer_")
            and "/" in k[8:]
            and k.split("/")[1].startswith("layer_")
            and k.split("/")[1][6:].isdigit()
        }
    )
    ndec = len({k.split("/")[1] for k in v if k.startswith("decoder/layer_") and k.split("/")[1][6:].isdigit()})
    heads = int(v["encoder/num_heads"]) if "encoder/num_heads" in v else d // 64
    ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    added = {a["content"]: a["id"] for a in json.loads((src / "tokenizer.json").read_text())["added_tokens"]}
    eot, sot = added["<|endoftext|>"], added["<|startoftranscript|>"]
    cfg = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d,
        encoder_layers=nenc,
        decoder_layers=ndec,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
    )
    model = WhisperForConditionalGeneration(cfg)
    sd = {}
    sd["model.encoder.conv1.weight"] = T(v["encoder/conv1/weight"])
    sd["model.encoder.conv1.bias"] = T(v["encoder/conv1/bias"])
    sd["model.encoder.conv2.weight"] = T(v["encoder/conv2/weight"])
    sd["model.encoder.conv2.bias"] = T(v["encoder/conv2/bias"])
    sd["model.encoder.embed_positions.weight"] = T(v["encoder/position_encodings/encodings"])
    sd["model.encoder.layer_norm.weight"] = T(v["encoder/layer_norm/gamma"])
    sd["model.encoder.layer_norm.bias"] = T(v["encoder/layer_norm/beta"])
    sd["model.decoder.embed_tokens.weight"] = T(v["decoder/embeddings/weight"])
    sd["model.decoder.embed_positions.weight"] = T(v["decoder/position_encodings/encodings"])
    sd["model.decoder.layer_norm.weight"] = T(v["decoder/layer_norm/gamma"])
    sd["model.decoder.layer_norm.bias"] = T(v["decoder/layer_norm/beta"])

    def attn(prefix: str, ct: str, fused: str) -> None:
        if fused == "qkv":
            w = T(v[ct + "/linear_0/weight"])
            b = T(v[ct + "/linear_0/bias"])
            q, k, vv = w.chunk(3, 0)
            bq, bk, bv = b.chunk(3, 0)
            sd[prefix + ".q_proj.weight"], sd[prefix + ".k_proj.weight"], sd[prefix + ".v_proj.weight"] = q, k, vv
            sd[prefix + ".q_proj.bias"], sd[prefix + ".v_proj.bias"] = bq, bv
            o = 1
        else:
            sd[prefix + ".q_proj.weight"] = T(v[ct + "/linear_0/weight"])
            sd[prefix + ".q_proj.bias"] = T(v[ct + "/linear_0/bias"])
            w = T(v[ct + "/linear_1/weight"])
            b = T(v[ct + "/linear_1/bias"])
            k, vv = w.chunk(2, 0)
            bk, bv = b.chunk(2, 0)
            sd[prefix + ".k_proj.weight"], sd[prefix + ".v_proj.weight"], sd[prefix + ".v_proj.bias"] = k, vv, bv
            o = 2
        sd[prefix + ".out_proj.weight"] = T(v[f"{ct}/linear_{o}/weight"])
        sd[prefix + ".out_proj.bias"] = T(v[f"{ct}/linear_{o}/bias"])

    for side, n in (("encoder", nenc), ("decoder", ndec)):
        for i in range(n):
            p = f"model.{side}.layers.{i}"
            c = f"{side}/layer_{i}"
            attn(p + ".self_attn", c + "/self_attention", "qkv")
            sd[p + ".self_attn_layer_norm.weight"] = T(v[c + "/self_attention/layer_norm/gamma"])
            sd[p + ".self_attn_layer_norm.bias"] = T(v[c + "/self_attention/layer_norm/beta"])
            if side == "decoder":
                attn(p + ".encoder_attn", c + "/attention", "kv")
                sd[p + ".encoder_attn_layer_norm.weight"] = T(v[c + "/attention/layer_norm/gamma"])
                sd[p + ".encoder_attn_layer_norm.bias"] = T(v[c + "/attention/layer_norm/beta"])
            sd[p + ".fc1.weight"] = T(v[c + "/ffn/linear_0/weight"])
            sd[p + ".fc1.bias"] = T(v[c + "/ffn/linear_0/bias"])
            sd[p + ".fc2.weight"] = T(v[c + "/ffn/linear_1/weight"])
            sd[p + ".fc2.bias"] = T(v[c + "/ffn/linear_1/bias"])
            sd[p + ".final_layer_norm.weight"] = T(v[c + "/ffn/layer_norm/gamma"])
            sd[p + ".final_layer_norm.bias"] = T(v[c + "/ffn/layer_norm/beta"])
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("k_proj.bias")]
    assert not missing and not unexpected, (missing, unexpected)
    english_only = vocab == 51864
    gen = GenerationConfig(
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
        max_length=448,
        begin_suppress_tokens=cfgj.get("suppress_ids_begin", [220, eot]),
        suppress_tokens=cfgj.get("suppress_ids", []),
        alignment_heads=cfgj.get("alignment_heads"),
        is_multilingual=not english_only,
        no_timestamps_token_id=added["<|notimestamps|>"],
        return_timestamps=False,
    )
    if not english_only:
        id_to_tok = {i: t for t, i in added.items()}
        gen.lang_to_id = {id_to_tok[i]: i for i in cfgj["lang_ids"]}
        gen.task_to_id = {"translate": added["<|translate|>"], "transcribe": added["<|transcribe|>"]}
        gen.language, gen.task = "<|en|>", "transcribe"
        gen.prev_sot_token_id = added.get("<|startofprev|>")
    model.generation_config = gen
    dst = Path(dst)
    model.to(torch.float16).save_pretrained(dst)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(src / "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.save_pretrained(dst)
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins).save_pretrained(dst)
    print("wrote", dst, "layers", nenc, ndec, "d", d, "vocab", vocab)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
