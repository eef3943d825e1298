import json

import pytest
from datasets import load_from_disk

from desta.core.args import build
from desta.core.generation import Generation, SamplingSettings, TransformersBackend
from desta.model.tiny import tiny_llm, tiny_tokenizer
from desta.prompts import TRAINING_POOLS, training_pool
from desta.targets import DEFAULT_REFUSAL_PATTERNS, TargetsConfig, flag, targets
from tests.conftest import described_dataset


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    return described_dataset(tmp_path_factory.mktemp("described"), num_clips=6, seed=5)


@pytest.fixture
def backend():
    return TransformersBackend(llm=tiny_llm(), tokenizer=tiny_tokenizer(), batch_size=4)


def _config(described, out, generation=None, sampling=None, chunking=None, **settings):
    """Settings for these tests: the tiny LLM, answers of up to 6 tokens, chunks of 2, flagged answers kept; each
    section's keys given here replace those."""
    return build(TargetsConfig, {"source": str(described), "out": str(out), "progress": False, "keep_flagged": True,
                                 **settings, "generation": {"model": "tiny", **(generation or {})},
                                 "sampling": {"max_new_tokens": 6, **(sampling or {})},
                                 "chunking": {"chunk_size": 2, **(chunking or {})}})


def _output(out):
    rows = [{k: v for k, v in r.items() if k != "audio"} for r in load_from_disk(str(out / "dataset"))]
    return rows, (out / "rejects.jsonl").read_text()




def test_batched_greedy_equals_one_at_a_time(backend):
    conversations = [[{"role": "user", "content": "describe " * k}] for k in range(1, 8)]
    settings = SamplingSettings(max_new_tokens=10)
    batched = backend.generate(conversations, settings)
    assert batched == [backend.generate([c], settings)[0] for c in conversations]


def test_token_budget_batches_hold_the_budget_and_answer_as_fixed_batches(backend):
    from desta.core.generation import budget_batches

    conversations = [[{"role": "user", "content": "describe " * k}] for k in range(1, 12)]
    settings = SamplingSettings(max_new_tokens=10)
    lengths = [len(backend.encode(c)) for c in conversations]
    batches = budget_batches(lengths, 10, token_budget=120)
    assert sorted(i for batch in batches for i in batch) == list(range(11))
    assert all(len(batch) * (max(lengths[i] for i in batch) + 10) <= 120 for batch in batches)
    assert [lengths[i] for batch in batches for i in batch] == sorted(lengths, reverse=True)  # longest first
    assert len(batches) < len(budget_batches(lengths, 10, token_budget=60))
    expected = backend.generate(conversations, settings)
    for cache in ("dynamic", "static"):
        budgeted = TransformersBackend(llm=backend.llm, tokenizer=backend.tokenizer, token_budget=120, cache=cache)
        assert budgeted.generate(conversations, settings) == expected, cache
    with pytest.raises(ValueError, match="sized from free memory needs a CUDA device, not cpu"):
        TransformersBackend(llm=backend.llm, tokenizer=backend.tokenizer, token_budget="memory")


def test_greedy_runs_hand_several_chunks_to_a_token_budget_backend(described, tmp_path, backend):
    from desta.targets import call_groups, prompts_per_call

    class Counting:
        name, model_id, token_budget, calls = backend.name, backend.model_id, 12, []

        def generate(self, conversations, settings):
            Counting.calls.append(len(conversations))
            return backend.generate(conversations, settings)

    chunked = targets(_config(described, tmp_path / "chunked"), backend)  # 6 prompts in chunks of 2
    grouped = targets(_config(described, tmp_path / "grouped"), Counting())
    assert Counting.calls == [6] and grouped == chunked  # 4 x budget 12 / 6 new tokens: 8 prompts per call
    assert _output(tmp_path / "grouped") == _output(tmp_path / "chunked")
    sampled = _config(described, tmp_path, sampling={"temperature": 0.7})
    assert prompts_per_call(sampled, Counting()) == 2  # sampled: per chunk
    assert call_groups([3, 4, 7], [2, 2, 1], per_call=3) == [[3, 4], [7]]
    with pytest.raises(ValueError, match="token_budget: must be at least 1"):
        _config(described, tmp_path, generation={"token_budget": 0})


def test_stage_writes_prompt_response_generator(described, tmp_path, backend):
    summary = targets(_config(described, tmp_path / "t", pool="desta25", prompts_per_clip=2), backend)
    assert summary["inputs"] == 12 and summary["kept"] + summary["rejected"] == 12
    rows, _ = _output(tmp_path / "t")
    assert len(rows) == 12 and len({(r["id"], r["prompt"]) for r in rows}) == 12
    assert all(r["prompt"] in TRAINING_POOLS["desta25"] and r["prompt_pool"] == "desta25" for r in rows)
    generator = json.loads(rows[0]["generator"])
    assert generator["backend"] == "transformers" and generator["max_new_tokens"] == 6 and "temperature" in generator
    assert all(r["flag"] == "cut off at max_new_tokens (6)" or r["flag"] == "" for r in rows)


def test_flagged_answers_go_to_rejects_with_reasons(described, tmp_path, backend):
    summary = targets(_config(described, tmp_path / "t", keep_flagged=False), backend)
    rejects = [json.loads(x) for x in (tmp_path / "t" / "rejects.jsonl").read_text().splitlines()]
    assert summary["kept"] + len(rejects) == summary["inputs"] == 6
    assert all({"id", "prompt", "reason", "response"} <= set(r) for r in rejects)


def test_sampling_is_deterministic_for_a_seed(described, tmp_path, backend):
    first = targets(_config(described, tmp_path / "a", seed=3, sampling={"temperature": 1.0}), backend)
    second = targets(_config(described, tmp_path / "b", seed=3, sampling={"temperature": 1.0}), backend)
    assert first == second and _output(tmp_path / "a") == _output(tmp_path / "b")


def test_interrupted_run_resumes_without_redoing(described, tmp_path, backend):
    targets(_config(described, tmp_path / "full"), backend)

    class DiesOnSecondChunk:
        name, model_id, calls = backend.name, backend.model_id, 0

        def generate(self, conversations, settings):
            DiesOnSecondChunk.calls += 1
            if DiesOnSecondChunk.calls == 2:
                raise KeyboardInterrupt
            return backend.generate(conversations, settings)

    with pytest.raises(KeyboardInterrupt):
        targets(_config(described, tmp_path / "resumed"), DiesOnSecondChunk())
    DiesOnSecondChunk.calls = 10
    targets(_config(described, tmp_path / "resumed"), DiesOnSecondChunk())
    assert DiesOnSecondChunk.calls == 12  # the two chunks left, not all three
    assert _output(tmp_path / "resumed") == _output(tmp_path / "full")


def test_shards_merge_to_the_unsharded_output(described, tmp_path, backend):
    from desta.targets import merge

    targets(_config(described, tmp_path / "one"), backend)
    for index in range(3):
        targets(_config(described, tmp_path / "three", chunking={"num_shards": 3, "shard_index": index}), backend)
    merge(tmp_path / "three")
    assert _output(tmp_path / "three") == _output(tmp_path / "one")


@pytest.mark.parametrize("generation, reason", [
    (Generation("   ", "stop", 0), "empty answer"),
    (Generation("The speaker says", "length", 6), "cut off at max_new_tokens (6)"),
    (Generation("The voice is calm. " * 12, "stop", 60), "repetition loop (compresses"),
    (Generation("a man speaks a man speaks a man speaks a man speaks", "stop", 12), "repetition loop ('a man"),
    (Generation("I'm sorry, but I cannot hear audio files.", "stop", 9), 'ignores the audio: "I cannot hear"'),
    (Generation("As an AI language model, I have no ears.", "stop", 9), "ignores the audio"),
    (Generation("A woman with a British accent asks where the station is.", "stop", 12), None),
])
def test_quality_filter_reasons(generation, reason):
    found = flag(generation, 6, DEFAULT_REFUSAL_PATTERNS)
    assert found == reason if reason is None else found.startswith(reason)


def test_cut_off_answers_can_be_trimmed_to_their_last_sentence():
    from desta.targets import trim_to_sentence

    cut = Generation("A woman speaks. She sounds calm and the clip is short. Then she", "length", 16)
    trimmed = trim_to_sentence(cut)
    assert trimmed.text == "A woman speaks. She sounds calm and the clip is short." and trimmed.finish_reason == "stop"
    assert flag(trimmed, 16, DEFAULT_REFUSAL_PATTERNS) is None
    assert trim_to_sentence(Generation("no sentence end at all here", "length", 6)).finish_reason == "length"
    finished = Generation("Done.", "stop", 2)
    assert trim_to_sentence(finished) is finished




def test_bad_sources_give_clear_errors(tmp_path, backend, described):
    with pytest.raises(FileNotFoundError, match="written by desta describe"):
        targets(_config(tmp_path / "nothing", tmp_path / "t"), backend)
    from datasets import Dataset

    Dataset.from_dict({"id": ["a"], "text": ["b"]}).save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match=r"not a described dataset: no column \['description'\]"):
        targets(_config(tmp_path / "wrong", tmp_path / "t"), backend)
    with pytest.raises(ValueError, match="unknown prompt pool 'desta3'"):
        targets(_config(described, tmp_path / "t2", pool="desta3"), backend)


@pytest.mark.real
def test_real_smollm_answers(real_models, described, tmp_path):
    summary = targets(_config(described, tmp_path / "t", keep_flagged=False,
                              generation={"model": str(real_models / "SmolLM2-135M-Instruct")},
                              sampling={"max_new_tokens": 128, "repetition_penalty": 1.2},
                              chunking={"chunk_size": 128}))
    rows, _ = _output(tmp_path / "t")
    assert summary["inputs"] == 6 and all(r["response"] for r in rows)


def test_all_rejected_still_writes_a_loadable_dataset(described, tmp_path, backend):
    summary = targets(_config(described, tmp_path / "t", keep_flagged=False, sampling={"max_new_tokens": 2}), backend)
    assert summary["kept"] == 0 and summary["rejected"] == 6
    assert len(load_from_disk(str(tmp_path / "t" / "dataset"))) == 0


def test_label_targets_come_from_the_gold_fields_only(described, tmp_path):
    from datasets import load_from_disk

    from desta.targets import label_response

    summary = targets(_config(described, tmp_path / "labels", kind="labels", keep_flagged=False,
                              generation={"model": ""}))
    rows, _ = _output(tmp_path / "labels")
    assert summary["kept"] == 6 and json.loads(rows[0]["generator"])["backend"] == "labels"
    row = load_from_disk(str(described))[0]
    assert rows[0]["response"] == label_response(row) and row["transcript"] in rows[0]["response"]
    assert label_response({**row, "description": "something else entirely"}) == rows[0]["response"]
    other = "Male" if row["gender"] == "Female" else "Female"
    assert label_response({**row, "gender": other}) != rows[0]["response"]


def _reorder(folder):
    """Rewrite a described dataset in place with its rows reversed (same path, same rows)."""
    import shutil

    dataset = load_from_disk(str(folder))
    dataset.select(range(len(dataset) - 1, -1, -1)).save_to_disk(str(folder) + ".new")
    del dataset
    shutil.rmtree(folder)
    shutil.move(str(folder) + ".new", folder)


def test_rerun_after_the_described_set_changed_is_refused_not_mixed_up(described, tmp_path):
    import shutil

    source = tmp_path / "described"
    shutil.copytree(described, source)
    out = tmp_path / "t"
    targets(_config(source, out, kind="labels", generation={"model": ""}))
    _reorder(source)
    with pytest.raises(ValueError, match=r"was made from a different source/settings \(source_fingerprint: .*use a "
                                         r"new --out or --chunking.overwrite"):
        targets(_config(source, out, kind="labels", generation={"model": ""}))
    with pytest.raises(ValueError, match=r"different source/settings \(.*trim_cut_off: false -> true"):
        targets(_config(source, out, kind="labels", trim_cut_off=True, generation={"model": ""},
                        chunking={"overwrite": False}))
    summary = targets(_config(source, out, kind="labels", generation={"model": ""}, chunking={"overwrite": True}))
    rows, _ = _output(out)
    assert summary["kept"] == 6 and all(r["transcript"] in r["response"] for r in rows)  # each its own clip
    assert [r["id"] for r in rows] == load_from_disk(str(source))["id"]


def test_merge_refuses_a_source_changed_after_the_shards_ran(described, tmp_path, backend):
    import shutil

    from desta.targets import merge

    source = tmp_path / "described"
    shutil.copytree(described, source)
    for index in range(2):
        targets(_config(source, tmp_path / "two", kind="labels", generation={"model": ""},
                        chunking={"num_shards": 2, "shard_index": index}))
    _reorder(source)
    with pytest.raises(ValueError, match="was made from a different source/settings"):
        merge(tmp_path / "two")


def test_duplicate_clip_ids_are_refused(tmp_path, backend):
    from datasets import Dataset

    Dataset.from_dict({"id": ["a", "b", "a"], "description": ["x", "y", "z"]}).save_to_disk(str(tmp_path / "dup"))
    with pytest.raises(ValueError, match=r"1 duplicate ids \(e.g. 'a'\)"):
        targets(_config(tmp_path / "dup", tmp_path / "t"), backend)




def test_voice_pool_asks_only_about_fields_the_description_holds(described, tmp_path, backend):
    from datasets import load_from_disk

    pool = training_pool("voice")
    dataset = load_from_disk(str(described))
    dataset = dataset.map(lambda r, i: {"accent": None if i % 2 else r["accent"]}, with_indices=True)
    dataset.save_to_disk(str(tmp_path / "described"))
    summary = targets(_config(tmp_path / "described", tmp_path / "t", pool="voice", prompts_per_clip=4), backend)
    assert summary["inputs"] == 24
    rows, _ = _output(tmp_path / "t")
    category = {p: c for c, phrasings in pool.items() for p in phrasings}
    asked = [(r["id"], category[r["prompt"]]) for r in rows]
    no_accent = {r["id"] for r in rows if r["accent"] is None}
    assert no_accent and not [a for a in asked if a[0] in no_accent and a[1] == "accent"]
    assert len({c for _, c in asked}) >= 5  # open requests and several fields, drawn per clip


def test_field_label_targets_ask_only_that_field_and_name_its_gold_value_alone(described, tmp_path):
    """targets fields=[gender] with kind labels: every prompt is one of the pool's gender phrasings and every
    answer names that clip's gender and nothing else (the sanity ladder's one-field runs rely on it)."""
    from desta.prompts import field_answer

    pool = training_pool("voice")
    targets(_config(described, tmp_path / "t", kind="labels", pool="voice", fields=["gender"], prompts_per_clip=2,
                    generation={"model": ""}))
    rows, _ = _output(tmp_path / "t")
    gold = {r["id"]: r for r in load_from_disk(str(described))}
    assert len(rows) == 12 and all(r["prompt"] in pool["gender"] for r in rows)
    for row in rows:
        assert row["response"] == field_answer("gender", gold[row["id"]]["gender"])
        assert gold[row["id"]]["transcript"] not in row["response"] and gold[row["id"]]["accent"] not in row["response"]


def test_fields_the_pool_lacks_are_refused_naming_the_setting(described, tmp_path):
    with pytest.raises(ValueError, match="fields.*no categories \\['colour'\\]"):
        _config(described, tmp_path / "t", kind="labels", pool="voice", fields=["colour"], generation={"model": ""})
