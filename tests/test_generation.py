"""The generation backends at scale: the end of turn as eos, continuous batching, the back-off after running out of
GPU memory, and what the vLLM backend hands vLLM (a stand-in of vLLM's LLM interface: vLLM cannot run here)."""

import json
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from desta.core.generation import GROW_AFTER, SHRINK, SamplingSettings, TransformersBackend
from desta.model.tiny import tiny_llm, tiny_tokenizer
from tests.conftest import described_dataset


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    return described_dataset(tmp_path_factory.mktemp("described"), num_clips=6, seed=5)


@pytest.fixture
def backend():
    return TransformersBackend(llm=tiny_llm(), tokenizer=tiny_tokenizer(), batch_size=4)


def _conversations(count):
    return [[{"role": "user", "content": "describe " * k}] for k in range(1, count + 1)]


class EndTurnAt(LogitsProcessor):
    """Every row writes the end-of-turn token at step `step`."""

    def __init__(self, token, step):
        self.token, self.step, self.calls = token, step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step + 1:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.token] = 0
        return scores


def test_generation_stops_at_the_end_of_turn_whatever_the_generation_config_names(backend):
    end = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    backend.llm.generation_config.eos_token_id = None  # as a config naming only <|end_of_text|> would not stop here
    stopping = TransformersBackend(llm=backend.llm, tokenizer=backend.tokenizer, batch_size=4)
    assert end in stopping.eos_ids
    stopping.logits_processor = LogitsProcessorList([EndTurnAt(end, step=2)])
    new_ids = stopping.generate_ids([stopping.encode(c) for c in _conversations(3)], SamplingSettings(max_new_tokens=8))
    assert [row[2] for row in new_ids] == [end] * 3 and all(len(row) == 3 for row in new_ids)  # not 8 tokens each


def test_continuous_batching_answers_as_padded_batches(backend, monkeypatch):
    conversations, settings = _conversations(7), SamplingSettings(max_new_tokens=6)
    expected = backend.generate(conversations, settings)
    continuous = TransformersBackend(llm=backend.llm, tokenizer=backend.tokenizer, token_budget=2048, continuous=True)
    calls = []
    generate_batch = continuous.llm.generate_batch
    monkeypatch.setattr(continuous.llm, "generate_batch", lambda prompts, **kwargs: calls.append(
        (len(prompts), kwargs["generation_config"])) or generate_batch(prompts, **kwargs))
    assert continuous.generate(conversations, settings) == expected
    assert len(calls) == 1 and calls[0][0] == 7  # every prompt in one continuous run
    assert set(calls[0][1].eos_token_id) == continuous.eos_ids
    assert continuous.prompts_per_call == 4096  # the targets stage hands it thousands of prompts at once
    # continuous batching would drop a logits processor: padded batches instead
    continuous.logits_processor = LogitsProcessorList([EndTurnAt(0, step=99)])
    continuous.generate(conversations[:2], settings)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="continuous batching has its own paged cache"):
        TransformersBackend(llm=backend.llm, tokenizer=backend.tokenizer, cache="static", continuous=True)


def test_out_of_gpu_memory_shrinks_the_budget_by_a_quarter_and_it_grows_back(backend, monkeypatch):
    from desta.core.generation import bytes_per_token, memory_token_budget

    conversations, settings = _conversations(8), SamplingSettings(max_new_tokens=6)
    expected = backend.generate(conversations, settings)
    budgeted = TransformersBackend(llm=backend.llm, tokenizer=backend.tokenizer, token_budget=1000)
    generate, rows_tried, error = budgeted.llm.generate, [], {}

    def small_memory(input_ids, **kwargs):  # a GPU that holds 3 rows at most; `error` stands for a CUDA fault
        rows_tried.append(len(input_ids))
        if error:
            raise error["raise"]
        if len(input_ids) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return generate(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(budgeted.llm, "generate", small_memory)
    with pytest.warns(UserWarning, match="ran out of GPU memory"):
        assert budgeted.generate(conversations, settings) == expected
    failures = sum(rows > 3 for rows in rows_tried)
    assert rows_tried[0] == 8 and sum(rows for rows in rows_tried if rows <= 3) == 8  # each prompt answered once
    budget = 1000
    for _ in range(failures):
        budget = math.floor(budget * SHRINK)
    assert failures >= 2 and budgeted.token_budget == budget  # a quarter off at each, not halved for good
    fitted = len(rows_tried) - 1 - max(i for i, rows in enumerate(rows_tried) if rows > 3)  # since the last failure
    for _ in range(GROW_AFTER - 1 - fitted):  # more batches that fit
        budgeted.generate(conversations[:1], settings)
    assert budgeted.token_budget == budget
    budgeted.generate(conversations[:1], settings)
    assert budgeted.token_budget == math.ceil(budget / SHRINK)  # grown back by a step
    for _ in range(12 * GROW_AFTER):
        budgeted.generate(conversations[:1], settings)
    assert budgeted.token_budget == 1000  # up to where it started, not beyond
    error["raise"] = RuntimeError("CUDA error: an illegal memory access was encountered")
    tried = len(rows_tried)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # not out of memory: surfaces as it is
        budgeted.generate(conversations, settings)
    assert len(rows_tried) == tried + 1 and budgeted.token_budget == 1000
    free = 10 * 2**30  # 10 GiB free: 80 % of it in tokens of the model's cache and activations
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * 2**30))
    assert memory_token_budget(backend.llm, "cuda") == int(free * 0.8) // bytes_per_token(backend.llm.config, 4)


class StandInLLM:
    """vLLM's `LLM` as desta calls it: LLM(model=..., **engine settings), get_tokenizer(), chat(messages,
    sampling_params, use_tqdm) returning one RequestOutput-like object per conversation."""

    engines: list = []

    def __init__(self, model, **settings):
        self.settings, self.calls = {"model": model, **settings}, []
        StandInLLM.engines.append(self)

    def get_tokenizer(self):
        return tiny_tokenizer()

    def chat(self, messages, sampling_params=None, use_tqdm=True):
        self.calls.append((messages, sampling_params, use_tqdm))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f" A voice, answer {i}.", finish_reason="stop",
                                                         token_ids=[5, 6, 7])]) for i in range(len(messages))]


class StandInSamplingParams:
    def __init__(self, **settings):
        self.settings = settings


@pytest.fixture
def stand_in_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = StandInLLM, StandInSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    StandInLLM.engines = []
    return StandInLLM


def test_the_vllm_backend_hands_vllm_its_settings_thousands_of_prompts_and_the_end_of_turn(described, tmp_path,
                                                                                          stand_in_vllm):
    from desta.core.chunks import ChunkingSection
    from desta.core.generation import GenerationSection, SamplingSection
    from desta.targets import TargetsConfig, targets

    model = tmp_path / "model"  # the checkpoint's generation config names another end id, 99
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [99]}))
    generation = GenerationSection(kind="vllm", model=str(model), max_model_len=4096, gpu_memory_utilization=0.85,
                                   tensor_parallel_size=2)
    settings = dict(source=str(described), generation=generation, chunking=ChunkingSection(chunk_size=2),
                    progress=False)
    summary = targets(TargetsConfig(out=str(tmp_path / "greedy"), sampling=SamplingSection(40), **settings))
    (engine,) = stand_in_vllm.engines
    assert engine.settings == {"model": str(model), "max_model_len": 4096, "gpu_memory_utilization": 0.85,
                               "tensor_parallel_size": 2, "seed": 0}
    assert len(engine.calls) == 1  # 6 prompts in chunks of 2: one call (today's runs: thousands at once)
    messages, params, use_tqdm = engine.calls[0]
    assert len(messages) == len(params) == 6 and use_tqdm is False
    end = tiny_tokenizer().convert_tokens_to_ids("<|im_end|>")
    for i, request in enumerate(params):
        assert {end, 99} <= set(request.settings["stop_token_ids"])
        assert request.settings["seed"] == i and request.settings["max_tokens"] == 40
        assert request.settings["temperature"] == 0.0
    assert summary["kept"] == 6
    sampled = targets(TargetsConfig(out=str(tmp_path / "sampled"), sampling=SamplingSection(40, temperature=0.7),
                                    **settings))
    calls = stand_in_vllm.engines[-1].calls
    assert sampled["kept"] == 6 and [len(messages) for messages, _, _ in calls] == [2, 2, 2]  # a chunk at a time
    seeds = [[p.settings["seed"] for p in params] for _, params, _ in calls]
    assert seeds == [[0, 1], [1_000_000, 1_000_001], [2_000_000, 2_000_001]]  # chunk c: seed + c; one per request
