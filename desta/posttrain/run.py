"""`desta posttrain`: measure the base model, train each strategy from it, measure again, compare.

Reads the config (desta.posttrain.config). Writes OUT/<strategy>/ (the trained model or adapter, the
training data it used, metrics.json), OUT/comparison.json, OUT/comparison.md and OUT/forgetting.png.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import Trainer

from desta.core.artifacts import COMPARISON_JSON, COMPARISON_MD, FORGETTING_PLOT
from desta.core.generation import SamplingSettings, TransformersBackend
from desta.core.llm import load_chat_llm
from desta.core.optim import training_arguments
from desta.core.replay import mix
from desta.posttrain.config import PostTrainConfig
from desta.posttrain.probes import retention_probes
from desta.posttrain.report import plot_forgetting, render_comparison
from desta.posttrain.strategies import TextCollator, encode, filter_tokens, magpie, paraphrase, self_output
from desta.posttrain.tasks import load_task, replay_set
from desta.posttrain.verifiers import Verifier, make_verifier

MEASURES = ("task_accuracy", "format_following", "json_validity", "refusal_rate", "over_refusal_rate",
            "heldout_loglik")


def task_accuracy(backend: TransformersBackend, rows: list[dict], verifier: Verifier, max_new_tokens: int) -> float:
    """Share of `rows` whose greedy answer the verifier accepts against the row's gold, in [0, 1]."""
    answers = backend.generate([[{"role": "user", "content": r["instruction"]}] for r in rows],
                               SamplingSettings(max_new_tokens=max_new_tokens))
    return sum(verifier(a.text, r["gold"])[0] for a, r in zip(answers, rows, strict=True)) / len(rows)


def measure(backend: TransformersBackend, eval_rows: list[dict], verifier: Verifier, config: PostTrainConfig) -> dict:
    """The MEASURES of a model: new-task accuracy on `eval_rows` and the retention probes' rates and
    held-out log-likelihood (their per-item answers left out)."""
    probes = retention_probes(backend, max_new_tokens=config.probe_max_new_tokens)
    return {"task_accuracy": task_accuracy(backend, eval_rows, verifier, config.eval_max_new_tokens),
            **{k: v for k, v in probes.items() if k != "items"}}


def retained_score(metrics: dict) -> float:
    """One number for kept abilities: mean of format following, JSON validity, refusing harmful and
    answering safe requests (1 - over-refusal)."""
    return (metrics["format_following"] + metrics["json_validity"] + metrics["refusal_rate"]
            + 1 - metrics["over_refusal_rate"]) / 4


def strategy_data(parts: set[str], backend: TransformersBackend, config: PostTrainConfig, train_rows: list[dict],
                  replay_rows: list[dict], verifier: Verifier) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The rows and tokenised examples a strategy trains on, and notes on what its transforms did."""
    notes: dict[str, Any] = {}
    rows, seed, tokens = list(train_rows), config.optim.seed, config.answer_max_new_tokens
    if "self_output" in parts:
        rows, notes["self_output"] = self_output(backend, rows, verifier, config.self_output_k,
                                                 config.self_output_temperature, config.self_output_fallback,
                                                 seed, tokens)
    if "paraphrase" in parts:
        rows, notes["paraphrase"] = paraphrase(backend, rows, verifier, tokens)
    if "magpie" in parts:
        pseudo, notes["magpie_dropped"] = magpie(backend, config.magpie_count, config.magpie_max_new_tokens,
                                                 seed=seed, answer_tokens=tokens)
        rows = mix(rows, pseudo, config.replay_ratio, seed)
        notes["magpie_rows"] = len(pseudo)
    if "replay" in parts:
        rows = mix(rows, replay_rows, config.replay_ratio, seed)
    examples = [encode(backend.tokenizer, r, config.style, config.max_length) for r in rows]
    if "token_filter" in parts:
        examples, notes["token_filter_masked_share"] = filter_tokens(backend.llm, examples,
                                                                     config.token_filter_threshold)
    return rows, examples, notes


def train_strategy(name: str, config: PostTrainConfig, train_rows: list[dict], eval_rows: list[dict],
                   replay_rows: list[dict], verifier: Verifier, base_metrics: dict) -> dict[str, Any]:
    """Train one strategy from the base model, measure it, save it; returns its metrics and deltas."""
    parts = set(name.split("+"))
    out = Path(config.output_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    llm, tokenizer = load_chat_llm(config.model)
    backend = TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=config.generation_batch_size)
    rows, examples, notes = strategy_data(parts, backend, config, train_rows, replay_rows, verifier)
    (out / "train_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, lr = llm, config.optim.lr
    if "lora" in parts:
        from peft import LoraConfig, get_peft_model

        model, lr = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", **config.lora)), config.lora_lr
    args = training_arguments(config.optim, str(out / "trainer"), learning_rate=lr, logging_steps=5,
                              save_strategy="no", report_to=[], disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=TextCollator(backend.pad_id))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    model.eval()
    trained = TransformersBackend(llm=model, tokenizer=tokenizer, batch_size=config.generation_batch_size)
    metrics = measure(trained, eval_rows, verifier, config)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    result = {"strategy": name, "train_rows": len(rows), "train_loss_first": losses[0] if losses else None,
              "train_loss_last": losses[-1] if losses else None, "notes": notes, "metrics": metrics,
              "deltas": {k: metrics[k] - base_metrics[k] for k in MEASURES},
              "retained_delta": retained_score(metrics) - retained_score(base_metrics),
              "seconds": round(time.perf_counter() - started, 1)}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def posttrain(config: PostTrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the base model, then train and measure each strategy; write the comparison."""
    verifier = make_verifier(config.task.verifier)
    train_rows, eval_rows = load_task(config.task)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    llm, tokenizer = load_chat_llm(config.model)
    base = TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=config.generation_batch_size)
    log(f"base model: measuring the new task ({len(eval_rows)} questions) and the retention probes")
    base_metrics = measure(base, eval_rows, verifier, config)
    replay_rows = replay_set(config.replay_data, base, config.answer_max_new_tokens)
    del llm, base
    results = []
    for name in config.strategies:
        log(f"strategy {name}: training {config.optim.max_steps} steps")
        result = train_strategy(name, config, train_rows, eval_rows, replay_rows, verifier, base_metrics)
        log(f"  task accuracy {base_metrics['task_accuracy']:.2f} -> {result['metrics']['task_accuracy']:.2f}; "
            f"retained abilities {result['retained_delta']:+.3f}; held-out log-lik "
            f"{result['deltas']['heldout_loglik']:+.3f} ({result['seconds']:.0f} s)")
        results.append(result)
    comparison = {"model": config.model, "style": config.style, "base": base_metrics, "strategies": results,
                  "seconds": round(time.perf_counter() - started, 1)}
    (out / COMPARISON_JSON).write_text(json.dumps(comparison, indent=2))
    (out / COMPARISON_MD).write_text(render_comparison(comparison))
    plot_forgetting(comparison, out / FORGETTING_PLOT)
    return comparison
