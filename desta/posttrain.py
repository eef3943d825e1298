"""Text post-training against forgetting: the same core (LLM, generation backends, Trainer, retention
probes) applied to a chat LLM learning a new task.

Reads a new task (instruction, answer rows plus a verifier spec, or the built-in arithmetic task)
and a config naming strategies: plain fine-tuning, LoRA, experience replay, Magpie pseudo replay,
self-output with a verifier, paraphrased targets, token filtering, in any combination ("lora+replay").
Writes OUT/<strategy>/ (the trained model or adapter, the training data it used, metrics.json),
OUT/comparison.json, OUT/comparison.md and OUT/forgetting.png (new-task gain against forgetting).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from desta.generation import Generation, SamplingSettings, TransformersBackend
from desta.verifiers import make_verifier

IGNORE = -100
STRATEGIES = ("sft", "lora", "replay", "magpie", "self_output", "paraphrase", "token_filter")
PARAPHRASE_PROMPT = ("Rewrite the following answer in your own words. Keep every fact and the final result "
                     "exactly the same.\n\nAnswer:\n{answer}")
# General requests whose answers by the base model form the default replay set (old-task stand-in).
GENERAL_PROMPTS = [
    "Give me three tips for a good night's sleep.", "What is photosynthesis? Explain briefly.",
    "Write a short, friendly email declining a meeting invitation.", "Name three famous painters and one work each.",
    "How do I boil an egg?", "Summarize the plot of Little Red Riding Hood in two sentences.",
    "What are the primary colours?", "Suggest a name for a bakery.", "Why do leaves change colour in autumn?",
    "List four ways to stay focused while studying.", "What does a librarian do?",
    "Translate 'good morning' into French and Spanish.", "Describe the water cycle in simple words.",
    "Give two reasons people keep dogs as pets.", "What is the difference between weather and climate?",
    "Write a haiku about the sea.",
]


@dataclass
class TaskSection:
    kind: str = "arithmetic"  # arithmetic (built in) or jsonl
    train: str | None = None  # jsonl with instruction and answer columns (kind jsonl)
    eval: str | None = None  # held-out jsonl (kind jsonl)
    train_size: int = 400  # arithmetic: questions to train on
    eval_size: int = 60  # arithmetic: held-out questions
    verifier: dict = field(default_factory=lambda: {"kind": "last_number"})
    seed: int = 0


@dataclass
class OptimSection:
    lr: float = 2e-5  # full fine-tuning; LoRA uses lora_lr
    lora_lr: float = 2e-4
    max_steps: int = 60
    batch_size: int = 8
    warmup_steps: int = 5
    max_length: int = 256
    seed: int = 42


@dataclass
class PostTrainConfig:
    """Everything `desta posttrain` needs."""

    model: str = ""  # the chat LLM (Hub id or folder)
    output_dir: str = "runs/forgetting"
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))  # e.g. [sft, lora, lora+replay]
    style: str = "sft"  # sft: chat turns, loss on answers; pretrain: raw text, loss on every token
    task: TaskSection = field(default_factory=TaskSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: dict = field(default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                                                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    replay_data: str | None = None  # old-task jsonl (instruction, answer); None: base answers to general prompts
    replay_ratio: float = 0.03  # share of training rows drawn from the replay set
    magpie_count: int = 48  # pseudo-replay rows the model writes itself
    magpie_max_new_tokens: int = 64
    self_output_k: int = 4  # sampled answers per question
    self_output_temperature: float = 0.7
    self_output_fallback: str = "gold"  # gold | drop, for questions with no verified answer
    token_filter_threshold: float = 0.4  # target tokens with base probability below this get no loss
    eval_max_new_tokens: int = 96
    probe_max_new_tokens: int = 96


# ----- the new task -----

def arithmetic_task(size: int, seed: int) -> list[dict[str, str]]:
    """Two- and three-number word problems with worked answers ending in the result.

    >>> arithmetic_task(1, 0)[0]["answer"].split()[-1].rstrip(".").isdigit()
    True
    """
    rng = np.random.default_rng(seed)
    items = ["apples", "books", "marbles", "stamps", "coins", "pencils", "shells", "cards"]
    names = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo"]
    rows = []
    for _ in range(size):
        a, b, c = (int(x) for x in rng.integers(12, 90, size=3))
        name, item = str(rng.choice(names)), str(rng.choice(items))
        if rng.random() < 0.5:
            question = f"{name} has {a} {item}, buys {b} more and gives away {c}. How many {item} are left?"
            result = a + b - c
            work = f"{a} + {b} = {a + b}, then {a + b} - {c} = {result}."
        else:
            question = f"{name} packs {a} {item} into each of {b % 9 + 2} boxes. How many {item} in total?"
            result = a * (b % 9 + 2)
            work = f"{a} x {b % 9 + 2} = {result}."
        rows.append({"instruction": question + " Show the calculation, then give the result.",
                     "answer": f"{work} The answer is {result}.", "gold": str(result)})
    return rows


def load_task(task: TaskSection) -> tuple[list[dict], list[dict]]:
    if task.kind == "arithmetic":
        rows = arithmetic_task(task.train_size + task.eval_size, task.seed)
        return rows[: task.train_size], rows[task.train_size :]
    if task.kind != "jsonl" or not task.train or not task.eval:
        raise ValueError("task.kind must be arithmetic, or jsonl with task.train and task.eval files")
    loaded = []
    for path in (task.train, task.eval):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        bad = [i for i, r in enumerate(rows) if not r.get("instruction") or "answer" not in r]
        if bad or not rows:
            raise ValueError(f"{path}: every row needs instruction and answer ({len(bad)} of {len(rows)} do not)")
        loaded.append([{**r, "gold": r.get("gold", r["answer"])} for r in rows])
    return loaded[0], loaded[1]


# ----- strategies as data transforms -----

def magpie_prefix(tokenizer) -> str:
    """The chat template rendered up to and including the user header, as Magpie samples from it."""
    sentinel = "\u2063MAGPIE\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    return text[: text.index(sentinel)]


def _end_of_turn_ids(tokenizer, llm) -> set[int]:
    eos = llm.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def magpie(backend: TransformersBackend, count: int, max_new_tokens: int = 64, min_words: int = 3,
           seed: int = 0, answer_tokens: int = 160) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Pseudo replay: the model writes instructions from the bare user header (temperature 1.0), then
    answers them greedily. Returns the rows and how many were dropped for each reason."""
    from desta.targets import repeated_ngram  # the same loop test as the targets filter

    tokenizer, llm = backend.tokenizer, backend.llm
    prefix = tokenizer(magpie_prefix(tokenizer), add_special_tokens=False, return_tensors="pt").input_ids
    stops = _end_of_turn_ids(tokenizer, llm)
    torch.manual_seed(seed)
    instructions, dropped = [], {"empty": 0, "too short": 0, "repetition": 0, "duplicate": 0, "unfinished": 0}
    for start in range(0, count, 16):
        n = min(16, count - start)
        out = llm.generate(input_ids=prefix.repeat(n, 1).to(llm.device), attention_mask=torch.ones_like(
            prefix.repeat(n, 1)).to(llm.device), do_sample=True, temperature=1.0, top_p=1.0,
            max_new_tokens=max_new_tokens, pad_token_id=backend.pad_id)
        for row in out[:, prefix.shape[1]:].tolist():
            end = next((k for k, t in enumerate(row) if t in stops), None)
            if end is None:
                dropped["unfinished"] += 1  # no end of the user turn within the budget
                continue
            instructions.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    kept, seen = [], set()
    for text in instructions:
        words = re.findall(r"\w+", text.lower())
        if not text:
            dropped["empty"] += 1
        elif len(words) < min_words:
            dropped["too short"] += 1
        elif repeated_ngram(words):
            dropped["repetition"] += 1
        elif " ".join(words) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(" ".join(words))
            kept.append(text)
    answers = backend.generate([[{"role": "user", "content": t}] for t in kept],
                               SamplingSettings(max_new_tokens=answer_tokens))
    rows = [{"instruction": t, "answer": a.text} for t, a in zip(kept, answers, strict=True) if a.text]
    dropped["empty"] += len(kept) - len(rows)
    return rows, dropped


@torch.no_grad()
def answer_nll(llm, tokenizer, instruction: str, answer: str) -> float:
    """Mean negative log-likelihood per answer token under the model (its perplexity's log)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + answer_ids], device=llm.device)
    logits = llm(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids):]))


def pick_verified(candidates: list[Generation], gold: Any, verifier, nll) -> str | None:
    """Among finished answers the verifier accepts, the one with the lowest `nll` (perplexity); None if none."""
    verified = [g.text for g in candidates if g.finish_reason == "stop" and g.text and verifier(g.text, gold)[0]]
    return min(verified, key=nll) if verified else None


def self_output(backend: TransformersBackend, rows: list[dict], verifier, k: int, temperature: float,
                fallback: str, seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """For each question, k sampled answers; verified ones compete on perplexity; else gold or drop."""
    if fallback not in ("gold", "drop"):
        raise ValueError(f"self_output_fallback must be gold or drop, got {fallback!r}")
    conversations = [[{"role": "user", "content": r["instruction"]}] for r in rows for _ in range(k)]
    samples = backend.generate(conversations, SamplingSettings(max_new_tokens=160, temperature=temperature,
                                                               seed=seed))
    out, counts = [], {"own answer": 0, "gold fallback": 0, "dropped": 0}
    for index, row in enumerate(rows):
        best = pick_verified(samples[index * k : (index + 1) * k], row["gold"], verifier,
                             lambda a, q=row["instruction"]: answer_nll(backend.llm, backend.tokenizer, q, a))
        if best is not None:
            out.append({**row, "answer": best})
            counts["own answer"] += 1
        elif fallback == "gold":
            out.append(row)
            counts["gold fallback"] += 1
        else:
            counts["dropped"] += 1
    return out, counts


def keep_paraphrase(row: dict, rewrite: Generation, verifier) -> str:
    """The rewrite if it finished and still verifies, else the gold answer."""
    ok = rewrite.finish_reason == "stop" and rewrite.text and verifier(rewrite.text, row["gold"])[0]
    return rewrite.text if ok else row["answer"]


def paraphrase(backend: TransformersBackend, rows: list[dict], verifier) -> tuple[list[dict], dict[str, int]]:
    """The model rewrites each gold answer; the rewrite replaces it only if the verifier still accepts it."""
    rewrites = backend.generate([[{"role": "user", "content": PARAPHRASE_PROMPT.format(answer=r["answer"])}]
                                 for r in rows], SamplingSettings(max_new_tokens=160))
    out = [{**row, "answer": keep_paraphrase(row, rewrite, verifier)}
           for row, rewrite in zip(rows, rewrites, strict=True)]
    rewritten = sum(o["answer"] != r["answer"] for o, r in zip(out, rows, strict=True))
    return out, {"rewritten": rewritten, "gold kept": len(rows) - rewritten}


# ----- tokenised examples, token filtering -----

def encode(tokenizer, row: dict, style: str, max_length: int) -> dict[str, list[int]]:
    """SFT: chat turns, labels only on the answer and its end of turn. Pretrain: raw text, every token."""
    if style == "pretrain":
        ids = tokenizer(f"{row['instruction']}\n{row['answer']}{tokenizer.eos_token}",
                        add_special_tokens=False).input_ids[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["answer"]}]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = tokenizer(full, add_special_tokens=False).input_ids
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not render the prompt as a prefix of the full turn")
    answer_ids = tokenizer(row["answer"].strip(), add_special_tokens=False).input_ids
    end = min(len(ids), len(prompt_ids) + len(answer_ids) + 1)  # the answer and the token that ends the turn
    labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) : end] + [IGNORE] * (len(ids) - end)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


@torch.no_grad()
def filter_tokens(llm, examples: list[dict], threshold: float) -> tuple[list[dict], float]:
    """Token filtering: a target token whose probability under the base model is below `threshold`
    gets label -100. Returns the new examples and the share of target tokens masked."""
    masked = total = 0
    out = []
    for example in examples:
        ids = torch.tensor([example["input_ids"]], device=llm.device)
        probs = llm(input_ids=ids).logits[0, :-1].float().softmax(-1)
        labels = list(example["labels"])
        for position in range(1, len(labels)):
            if labels[position] == IGNORE:
                continue
            total += 1
            if float(probs[position - 1, labels[position]]) < threshold:
                labels[position] = IGNORE
                masked += 1
        out.append({**example, "labels": labels})
    return out, masked / max(total, 1)


class TextCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
            mask[row, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mix_replay(train_rows: list[dict], replay_rows: list[dict], ratio: float, seed: int) -> list[dict]:
    """Add replay rows (drawn with replacement, seeded) so they make `ratio` of the result."""
    from desta.train import replay_count

    count = replay_count(len(train_rows), ratio)
    if count and not replay_rows:
        raise ValueError("replay asked for but the replay set is empty")
    picks = np.random.default_rng(seed).integers(0, len(replay_rows), size=count) if count else []
    mixed = train_rows + [replay_rows[int(i)] for i in picks]
    order = np.random.default_rng(seed + 1).permutation(len(mixed))
    return [mixed[int(i)] for i in order]


# ----- measuring -----

def task_accuracy(backend: TransformersBackend, rows: list[dict], verifier, max_new_tokens: int) -> float:
    answers = backend.generate([[{"role": "user", "content": r["instruction"]}] for r in rows],
                               SamplingSettings(max_new_tokens=max_new_tokens))
    return sum(verifier(a.text, r["gold"])[0] for a, r in zip(answers, rows, strict=True)) / len(rows)


def measure(backend: TransformersBackend, eval_rows: list[dict], verifier, config: PostTrainConfig) -> dict:
    from desta.probes import retention_probes

    probes = retention_probes(backend, max_new_tokens=config.probe_max_new_tokens)
    return {"task_accuracy": task_accuracy(backend, eval_rows, verifier, config.eval_max_new_tokens),
            **{k: v for k, v in probes.items() if k != "items"}}


def retained_score(metrics: dict) -> float:
    """One number for kept abilities: mean of format following, JSON validity, refusing harmful and
    answering safe requests (1 - over-refusal)."""
    return (metrics["format_following"] + metrics["json_validity"] + metrics["refusal_rate"]
            + 1 - metrics["over_refusal_rate"]) / 4


# ----- the run -----

def _load_base(model: str):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    from desta.loading import load_causal_lm

    return load_causal_lm(model, dtype=dtype).to(device), AutoTokenizer.from_pretrained(model)


def train_strategy(name: str, config: PostTrainConfig, train_rows: list[dict], eval_rows: list[dict],
                   replay_rows: list[dict], verifier, base_metrics: dict) -> dict[str, Any]:
    parts = set(name.split("+"))
    unknown = parts - set(STRATEGIES)
    if unknown:
        raise ValueError(f"unknown strategies {sorted(unknown)} in {name!r}; choose from {list(STRATEGIES)}")
    out = Path(config.output_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    llm, tokenizer = _load_base(config.model)
    backend = TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=16)
    notes: dict[str, Any] = {}
    rows = list(train_rows)
    if "self_output" in parts:
        rows, notes["self_output"] = self_output(backend, rows, verifier, config.self_output_k,
                                                 config.self_output_temperature, config.self_output_fallback,
                                                 config.optim.seed)
    if "paraphrase" in parts:
        rows, notes["paraphrase"] = paraphrase(backend, rows, verifier)
    if "magpie" in parts:
        pseudo, notes["magpie_dropped"] = magpie(backend, config.magpie_count, config.magpie_max_new_tokens,
                                                 seed=config.optim.seed)
        rows = mix_replay(rows, pseudo, config.replay_ratio, config.optim.seed)
        notes["magpie_rows"] = len(pseudo)
    if "replay" in parts:
        rows = mix_replay(rows, replay_rows, config.replay_ratio, config.optim.seed)
    (out / "train_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = [encode(tokenizer, r, config.style, config.optim.max_length) for r in rows]
    if "token_filter" in parts:
        examples, notes["token_filter_masked_share"] = filter_tokens(llm, examples, config.token_filter_threshold)
    model = llm
    lr = config.optim.lr
    if "lora" in parts:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", **config.lora))
        lr = config.optim.lora_lr
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=config.optim.batch_size,
                             learning_rate=lr, max_steps=config.optim.max_steps, lr_scheduler_type="cosine",
                             warmup_steps=config.optim.warmup_steps, max_grad_norm=1.0, logging_steps=5,
                             save_strategy="no", report_to=[], seed=config.optim.seed, remove_unused_columns=False,
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                             bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=TextCollator(backend.pad_id))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    model.eval()
    trained = TransformersBackend(llm=model, tokenizer=tokenizer, batch_size=16)
    metrics = measure(trained, eval_rows, verifier, config)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    result = {"strategy": name, "train_rows": len(rows), "train_loss_first": losses[0] if losses else None,
              "train_loss_last": losses[-1] if losses else None, "notes": notes, "metrics": metrics,
              "deltas": {k: metrics[k] - base_metrics[k] for k in ("task_accuracy", "format_following",
                                                                   "json_validity", "refusal_rate",
                                                                   "over_refusal_rate", "heldout_loglik")},
              "retained_delta": retained_score(metrics) - retained_score(base_metrics),
              "seconds": round(time.perf_counter() - started, 1)}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def posttrain(config: PostTrainConfig, log=print) -> dict[str, Any]:
    if not config.model:
        raise ValueError("set model: the chat LLM to post-train (Hub id or folder)")
    if config.style not in ("sft", "pretrain"):
        raise ValueError(f"style must be sft or pretrain, got {config.style!r}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    verifier = make_verifier(config.task.verifier)
    train_rows, eval_rows = load_task(config.task)
    started = time.perf_counter()
    llm, tokenizer = _load_base(config.model)
    base = TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=16)
    log(f"base model: measuring the new task ({len(eval_rows)} questions) and the retention probes")
    base_metrics = measure(base, eval_rows, verifier, config)
    if config.replay_data:
        replay_rows = [json.loads(x) for x in Path(config.replay_data).read_text().splitlines() if x.strip()]
    else:  # the base model's own answers to general requests stand in for its old training data
        answers = base.generate([[{"role": "user", "content": p}] for p in GENERAL_PROMPTS],
                                SamplingSettings(max_new_tokens=160))
        replay_rows = [{"instruction": p, "answer": a.text} for p, a in zip(GENERAL_PROMPTS, answers, strict=True)]
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
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2))
    (out / "comparison.md").write_text(render_comparison(comparison))
    plot_forgetting(comparison, out / "forgetting.png")
    return comparison


def render_comparison(comparison: dict) -> str:
    base = comparison["base"]
    lines = [f"# Forgetting comparison: {comparison['model']} ({comparison['style']})", "",
             "Differences are trained minus base. Task: held-out new-task accuracy (verifier). Retained: mean of "
             "format following, JSON validity, refusal of harmful requests and 1 - over-refusal. Log-lik: mean "
             "log-probability per token of held-out text (drops mean forgetting).", "",
             "| strategy | rows | task acc. | Δ task | Δ format | Δ JSON | Δ refusal | Δ over-refusal | "
             "Δ retained | Δ log-lik | notes |", "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| base | - | {base['task_accuracy']:.2f} | - | - | - | - | - | - | - | |"]
    for r in comparison["strategies"]:
        d = r["deltas"]
        notes = "; ".join(f"{k}: {v if not isinstance(v, float) else round(v, 3)}" for k, v in r["notes"].items())
        lines.append(f"| {r['strategy']} | {r['train_rows']} | {r['metrics']['task_accuracy']:.2f} | "
                     f"{d['task_accuracy']:+.2f} | {d['format_following']:+.2f} | {d['json_validity']:+.2f} | "
                     f"{d['refusal_rate']:+.2f} | {d['over_refusal_rate']:+.2f} | {r['retained_delta']:+.3f} | "
                     f"{d['heldout_loglik']:+.3f} | {notes} |")
    lines += ["", f"Total time: {comparison['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot_forgetting(comparison: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in comparison["strategies"]:
        x, y = r["deltas"]["task_accuracy"], -r["deltas"]["heldout_loglik"]
        ax.scatter(x, y, s=60)
        ax.annotate(r["strategy"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.axhline(0, color="#999", lw=0.8)
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_xlabel("new-task gain (accuracy, trained - base)")
    ax.set_ylabel("forgetting (held-out log-lik drop, nats/token)")
    ax.set_title("gain vs forgetting per strategy (lower right is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    from desta.config import load_config

    return posttrain(load_config(PostTrainConfig, config_path, overrides))


