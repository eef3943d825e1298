import os

import numpy as np
import pytest
import torch

from desta.audio import SAMPLE_RATE
from desta.model.loading import build, load, save
from desta.model.modeling import DestaConfig, default_tapped_layers
from desta.model.tiny import save_tiny_bases, tiny_model
from tests.conftest import conversation


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _step(model, batch, steps=1):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_connector_gives_queries_per_window_in_llm_width(clip):
    model, processor = tiny_model()
    assert model.config.tapped_layers == [0, 1, 2, 3] and model.config.num_queries == 64
    long_clip = np.tile(clip, int(np.ceil(45 * SAMPLE_RATE / len(clip))))[: 45 * SAMPLE_RATE]
    for audio, windows in [(clip, 1), (long_clip, 2)]:
        features = processor.extract_features([w for w in np.array_split(audio, 1)] if windows == 1 else
                                              [audio[: 30 * SAMPLE_RATE], audio[30 * SAMPLE_RATE:]])
        hidden, mask = model.encode_audio(**features)
        assert hidden.shape[:2] == (4, windows)  # (layers, windows, steps, d_model)
        out = model.embed_audio(**features)
        assert out.shape == (windows, 64, model.config.text_config.hidden_size)




def test_variable_length_and_padded_modes_both_run(clip):
    variable, processor = tiny_model()
    padded, padded_processor = tiny_model(pad_to_30s=True)
    short = processor([conversation()], audios=[[clip]])
    full = padded_processor([conversation()], audios=[[clip]])
    assert short["input_features"].shape[-1] < 3000 == full["input_features"].shape[-1]
    assert torch.isfinite(variable(**short).loss) and torch.isfinite(padded(**full).loss)


def test_audio_features_do_not_depend_on_batch_padding(clip, short_clip):
    model, processor = tiny_model()
    alone_inputs = processor.extract_features([short_clip])
    batched_inputs = processor.extract_features([short_clip, clip])
    hidden, mask = model.encode_audio(**alone_inputs)
    batched_hidden, _ = model.encode_audio(**batched_inputs)
    steps = int(mask[0].sum())
    # every real step, the last ones included (their convolutions reach past the clip's end)
    torch.testing.assert_close(batched_hidden[:, 0, :steps], hidden[:, 0, :steps], atol=1e-5, rtol=1e-5)
    alone = model.embed_audio(**alone_inputs)
    batched = model.embed_audio(**batched_inputs)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def _saved_bytes_and_layer_calls(model, batch):
    """Bytes autograd keeps for the backward pass, LLM layer runs in the forward and in the backward pass."""
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in model.llm.model.layers]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    forward_calls = len(calls)
    loss.backward()
    for hook in hooks:
        hook.remove()
    return loss, sum(saved), forward_calls, len(calls) - forward_calls


def test_gradient_checkpointing_recomputes_the_frozen_llm_layers(clip):
    batch = None
    results = {}
    for checkpointing in (False, True):
        model, processor = tiny_model(qformer_dropout=0.0)
        for layer in model.llm.model.layers:
            layer.self_attn.attention_dropout = 0.5  # must stay off: the LLM is frozen
        if checkpointing:
            model.llm.activation_checkpointing_enable()
        batch = processor([conversation()], audios=[[clip]], transcripts=[["excuse me"]])
        model.train()
        loss, saved, forward_calls, backward_calls = _saved_bytes_and_layer_calls(model, batch)
        model.eval()
        with torch.no_grad():
            assert model(**batch, logits_at="labelled").loss.item() == loss.item()  # no dropout anywhere in train mode
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[checkpointing] = saved, forward_calls, backward_calls, grads
    layers = len(model.llm.model.layers)
    assert results[False][1:3] == (layers, 0)
    assert results[True][1:3] == (layers, layers)  # each layer runs again in the backward pass
    assert results[True][0] < results[False][0] - 500_000  # and keeps less for it
    for name, grad in results[False][3].items():
        torch.testing.assert_close(results[True][3][name], grad, atol=1e-6, rtol=1e-5)


def test_text_only_batch_keeps_every_trainable_weight_in_the_graph():
    model, processor = tiny_model(lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    batch = processor([[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]])
    model.train()
    model(**batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP without unused-parameter search needs every one
    assert all(p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n.startswith("connector."))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)






@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}])
def test_response_only_logits_give_the_full_logits_loss_and_gradients(clip, short_clip, lora):
    model, processor = tiny_model(qformer_dropout=0.0, lora=lora)
    batch = processor([conversation("A woman asks for the station."), conversation("No.")],
                      audios=[[clip], [short_clip]], transcripts=[["excuse me"], ["hello"]])
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    full = model(**batch, logits_at="all")
    full_grads = torch.autograd.grad(full.loss, trainable)
    labelled = model(**batch)  # training with labels: only the response positions are projected
    labelled_grads = torch.autograd.grad(labelled.loss, trainable)
    positions = int((batch["labels"][:, 1:] != -100).sum())
    vocab = model.config.text_config.vocab_size
    assert full.logits.shape == (*batch["input_ids"].shape, vocab) and labelled.logits is None
    assert labelled.label_logits.shape == (positions, vocab) and positions < batch["input_ids"].numel() // 3
    torch.testing.assert_close(labelled.loss, full.loss, atol=1e-5, rtol=1e-5)
    for got, expected in zip(labelled_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    keep = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(labelled.label_logits, full.logits[:, :-1][keep], atol=1e-5, rtol=1e-5)
    model.eval()
    with torch.no_grad():  # evaluation keeps every position's logits
        assert model(**batch).logits.shape == full.logits.shape
    with pytest.raises(ValueError, match="logits_at must be one of"):
        model(**batch, logits_at="response")


def test_one_step_trains_connector_only(clip):
    model, processor = tiny_model()
    before = _snapshot(model)
    _step(model, processor([conversation()], audios=[[clip]], transcripts=[["excuse me"]]))
    for name, param in model.named_parameters():
        if name.startswith("connector."):
            assert not torch.equal(param, before[name]), f"{name} did not change"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_lora_trains_lora_and_connector_only(clip):
    model, processor = tiny_model(lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    counts = model.parameter_counts()
    before = _snapshot(model)
    # two steps: LoRA's B starts at zero, so A first moves on the second step
    _step(model, processor([conversation()], audios=[[clip]]), steps=2)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and counts["trainable"] == sum(p.numel() for n, p in model.named_parameters()
                                               if "lora_" in n or n.startswith("connector."))
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == ("lora_" in name or name.startswith("connector.")), name




def test_placeholder_feature_mismatch_names_both_counts(clip):
    model, processor = tiny_model()
    batch = processor([conversation()], audios=[[clip]])
    two_windows = processor.extract_features([clip, clip])
    batch.update(two_windows)
    with pytest.raises(ValueError, match=r"64 audio placeholder positions but the audio gives 128 vectors"):
        model(**batch)
    without = {k: v for k, v in batch.items() if "feature" not in k}
    with pytest.raises(ValueError, match="64 audio placeholder positions but no audio features"):
        model(**without)




def test_tapped_layer_defaults_and_bad_layers():
    assert default_tapped_layers(4) == [0, 1, 2, 3]
    assert default_tapped_layers(12) == [2, 5, 8, 11]
    assert default_tapped_layers(24) == [5, 11, 17, 23]
    assert default_tapped_layers(32) == [7, 15, 23, 31]
    model, _ = tiny_model()
    with pytest.raises(ValueError, match=r"tapped_layers \[9\] .* \[0, 3\]"):
        DestaConfig(encoder_config=model.config.encoder_config.to_dict(), tapped_layers=[9])


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}])
def test_save_load_round_trip_gives_identical_logits(tmp_path, clip, lora):
    whisper_dir, llm_dir = save_tiny_bases(tmp_path / "bases")
    model, processor = build(str(whisper_dir), str(llm_dir), lora=lora)
    batch = processor([conversation()], audios=[[clip]], transcripts=[["excuse me"]])
    _step(model, batch, steps=2)  # so the saved weights differ from a fresh init
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    save(model, processor, tmp_path / "ckpt")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert {"config.json", "model.safetensors", "desta_processor.json", "preprocessor_config.json"} <= set(files)
    full_size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert os.path.getsize(tmp_path / "ckpt" / "model.safetensors") < 0.1 * full_size

    reloaded, reloaded_processor = load(tmp_path / "ckpt")
    reloaded.eval()
    again = reloaded_processor([conversation()], audios=[[clip]], transcripts=[["excuse me"]])
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(reloaded(**again).logits, expected)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path / "empty")


def test_chat_with_audio_and_plain_text(clip):
    model, processor = tiny_model()
    model.eval()
    answers = model.chat(processor, [conversation(None), [{"role": "user", "content": "Say hi."}]],
                         audios=[[clip], []], max_new_tokens=5, do_sample=False)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    alone = model.chat(processor, [conversation(None)], audios=[[clip]], max_new_tokens=5, do_sample=False)
    assert alone[0] == answers[0]  # left padding: a row's answer does not depend on its batch
    assert isinstance(model.transcribe(processor, [clip])[0], str)


@pytest.mark.real
def test_real_checkpoints_transcribe_and_answer(real_models, clip):
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    from tests.conftest import load_real_models

    model, processor = load_real_models(real_models)
    model.eval()
    heard = model.transcribe(processor, [clip])[0]
    normalize = EnglishTextNormalizer()
    assert jiwer.wer(normalize("Excuse me, where is the station?"), normalize(heard)) <= 0.4
    answer = model.chat(processor, conversation(None, "Repeat what was said."), [clip], max_new_tokens=20)[0]
    assert answer.strip()




def test_official_connector_settings_build_the_official_q_former():
    model, _ = tiny_model(query_layernorm=False, query_init_std=1.0, qformer_init="pytorch",
                          qformer_intermediate_size=96)
    connector = model.connector
    names = [name for name, _ in connector.named_parameters()]
    assert not [n for n in names if "layernorm" in n]  # the queries enter the encoder as they are
    assert 0.9 < connector.queries.std().item() < 1.1
    layer = connector.qformer.layer[0]
    assert layer.intermediate_query.dense.out_features == 96
    weight = layer.attention.attention.query.weight  # PyTorch's kaiming-uniform: |w| <= 1/sqrt(fan_in)
    assert weight.abs().max().item() <= 64**-0.5 and weight.std().item() > 0.05


@pytest.mark.parametrize("settings", [{"connector": "mlp"}, {"frame_norm": True},
                                      {"connector": "mlp", "frame_norm": True}])
def test_the_plain_projector_and_frame_norm_give_the_same_interface(tmp_path, clip, short_clip, settings):
    """num_queries vectors per window in the LLM's width, independent of the batch, trained and saved as the
    connector, loaded back to the same logits."""
    model, processor = tiny_model(num_queries=8, **settings)
    alone = model.embed_audio(**processor.extract_features([short_clip]))
    batched = model.embed_audio(**processor.extract_features([short_clip, clip]))
    assert batched.shape == (2, 8, model.config.text_config.hidden_size)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-4, rtol=1e-4)  # padding never reaches a clip's spans
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("connector.") for n in trainable)
    assert any("frame_norm" in n for n in trainable) == settings.get("frame_norm", False)
    whisper_dir, llm_dir = save_tiny_bases(tmp_path / "bases")
    built, built_processor = build(str(whisper_dir), str(llm_dir), num_queries=8, **settings)
    batch = built_processor([conversation()], audios=[[clip]])
    _step(built, batch, steps=2)
    built.eval()
    with torch.no_grad():
        expected = built(**batch).logits
    save(built, built_processor, tmp_path / "ckpt")
    reloaded, _ = load(tmp_path / "ckpt")
    assert reloaded.config.connector == settings.get("connector", "qformer")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**batch).logits, expected)


def test_an_unknown_connector_is_refused():
    with pytest.raises(ValueError, match=r"connector: must be one of \('qformer', 'mlp'\), got 'linear'"):
        tiny_model(connector="linear")


def test_the_config_refuses_settings_the_command_refuses():
    with pytest.raises(ValueError, match=r"transcript_format: must be one of \('bare', 'timestamped'\), got 'srt'"):
        tiny_model(transcript_format="srt")
    with pytest.raises(ValueError, match=r"num_queries: num_queries and qformer_layers must be at least 1.*got 0, 2"):
        tiny_model(num_queries=0)
    with pytest.raises(ValueError, match=r"qformer_dropout: must be in \[0, 1\), got 1.5"):
        tiny_model(qformer_dropout=1.5)


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}])
def test_save_pretrained_full_writes_a_model_that_loads_without_its_bases(tmp_path, clip, lora):
    from desta.model.modeling import DestaModel

    model, processor = tiny_model(lora=lora)
    batch = processor([conversation()], audios=[[clip]], transcripts=[["excuse me"]])
    _step(model, batch, steps=1)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "full", full=True)
    reloaded = DestaModel.from_pretrained(tmp_path / "full")
    assert reloaded.config.lora is None and reloaded.config.llm_name_or_path is None  # merged, no base named
    assert {"whisper_generation_config.json", "llm_generation_config.json"} <= set(os.listdir(tmp_path / "full"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
