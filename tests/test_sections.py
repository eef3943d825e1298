"""The settings every stage shares live in one section each: generation backend, sampling and chunking (desta.core),
the model's architecture (desta.model.modeling.Architecture). Old flat keys name their new place; a resumed run
compares only what decides its rows."""

import dataclasses
import json

import pytest

from desta.core.args import ConfigError, build, parse_command, setting_docs
from desta.core.chunks import ChunkingSection
from desta.core.generation import GenerationSection, SamplingSection
from desta.describe.run import DescribeConfig
from desta.evaluation.run import EvalConfig
from desta.model.modeling import Architecture, DestaConfig
from desta.targets import TargetsConfig, targets
from desta.train.config import ModelSection, TrainConfig
from tests.conftest import described_dataset


def test_each_stage_takes_the_shared_sections():
    targets_config = build(TargetsConfig, {"source": "s", "out": "o", "generation": {"model": "m"}})
    assert isinstance(targets_config.generation, GenerationSection)
    assert isinstance(targets_config.sampling, SamplingSection)
    assert isinstance(targets_config.chunking, ChunkingSection)
    assert isinstance(build(DescribeConfig, {"source": "s", "out": "o"}).chunking, ChunkingSection)
    assert isinstance(build(EvalConfig, {"checkpoints": ["c"], "eval_set": "e", "out": "o"}).judge, GenerationSection)
    for cls in (TargetsConfig, DescribeConfig, EvalConfig):  # every old key points at a setting that exists, and is
        settings = set(setting_docs(cls))                     # not one itself
        assert set(cls.MOVED.values()) <= settings and not set(cls.MOVED) & settings, cls


def test_an_old_flat_key_names_its_section(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_command(TargetsConfig, ["--source", "s", "--out", "o", "--model", "m", "--max-new-tokens", "96",
                                      "--batch-size", "48", "--chunk-size", "8", "--backend", "http"],
                      check_paths=False)
    assert {"unknown key 'backend'; did you mean 'generation.kind'?",
            "unknown key 'batch_size'; did you mean 'generation.batch_size'?",
            "unknown key 'chunk_size'; did you mean 'chunking.chunk_size'?",
            "unknown key 'max_new_tokens'; did you mean 'sampling.max_new_tokens'?",
            "unknown key 'model'; did you mean 'generation.model'?"} <= set(err.value.problems)
    yaml = tmp_path / "old.yaml"
    yaml.write_text("source: s\nout: o\nnum_shards: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'num_shards'; did you mean 'chunking.num_shards'\?"):
        parse_command(DescribeConfig, [str(yaml)], check_paths=False)
    with pytest.raises(ConfigError, match=r"unknown key 'merge'; did you mean 'chunking.merge'\?"):
        parse_command(DescribeConfig, ["--merge", "--out", "o"], check_paths=False)  # an old flag without a value
    with pytest.raises(ConfigError, match=r"unknown key 'judge_model'; did you mean 'judge.model'\?"):
        parse_command(EvalConfig, ["ckpt", "--eval-set", "e", "--out", "o", "--judge-model", "j"], check_paths=False)
    config = parse_command(TargetsConfig, ["--source", "s", "--out", "o", "--generation.model", "m",
                                           "--sampling.max-new-tokens", "96", "--generation.batch-size", "48",
                                           "--chunking.chunk-size", "8"], check_paths=False)
    assert (config.generation.model, config.sampling.max_new_tokens, config.generation.batch_size,
            config.chunking.chunk_size) == ("m", 96, 48, 8)


def test_section_checks_are_reported_with_their_place():
    with pytest.raises(ConfigError) as err:
        build(TargetsConfig, {"source": "s", "out": "o", "generation": {"model": "m", "kind": "http", "batch_size": 0},
                              "sampling": {"temperature": -1}, "chunking": {"num_shards": 2, "shard_index": 2}})
    problems = " | ".join(err.value.problems)
    for expected in ("generation.base_url: the http backend needs base_url", "generation.batch_size: batch_size",
                     "sampling.temperature: temperature must be 0 or more", "chunking.shard_index: must be in [0, 1]"):
        assert expected in problems


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    return described_dataset(tmp_path_factory.mktemp("sections"), num_clips=3, seed=2)


def test_a_resumed_run_compares_what_decides_the_answers_not_how_fast_they_come(described, tmp_path):
    def config(**generation):
        return build(TargetsConfig, {"source": str(described), "out": str(tmp_path / "t"), "progress": False,
                                     "keep_flagged": True, "generation": {"model": "tiny", **generation},
                                     "sampling": {"max_new_tokens": 4}, "chunking": {"chunk_size": 2}})

    from desta.core.generation import TransformersBackend
    from desta.model.tiny import tiny_llm, tiny_tokenizer

    backend = TransformersBackend(llm=tiny_llm(), tokenizer=tiny_tokenizer(), batch_size=2)
    first = targets(config(batch_size=2), backend)
    job = json.loads((tmp_path / "t" / "parts" / "job.json").read_text())
    # the job file keeps the flat names runs have always written, so earlier runs still resume
    assert {"model": "tiny", "backend": "transformers", "dtype": "auto", "max_new_tokens": 4}.items() <= job.items()
    assert not {"generation", "sampling", "chunking", "batch_size", "out", "progress"} & set(job)
    again = targets(config(batch_size=7, concurrency=3, timeout=5.0), backend)  # throughput only: resumes
    assert again["kept"] == first["kept"]
    with pytest.raises(ValueError, match=r"different source/settings \(dtype: \"auto\" -> \"bfloat16\"\); "
                                         r"use a new --out or --chunking.overwrite"):
        targets(config(dtype="bfloat16"), backend)


def test_the_architecture_has_one_owner():
    names = [f.name for f in dataclasses.fields(Architecture)]
    assert set(names) <= {f.name for f in dataclasses.fields(DestaConfig)}
    assert set(names) <= {f.name for f in dataclasses.fields(ModelSection)}
    section = parse_command(TrainConfig, ["data.train=t", "model.connector=mlp", "model.num_queries=8"],
                            check_paths=False).model
    assert section.architecture() == {**{n: getattr(Architecture(), n) for n in names}, "connector": "mlp",
                                      "num_queries": 8}
    with pytest.raises(ConfigError, match=r"model.num_queries: num_queries and qformer_layers must be at least 1"):
        parse_command(TrainConfig, ["data.train=t", "model.num_queries=0"], check_paths=False)
