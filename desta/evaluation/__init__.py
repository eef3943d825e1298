"""Stage 4, eval: unseen speech instructions, scored for the speech model against the same LLM reading the
description, so what the speech model loses is measured as forgetting.

items (the eval set: `desta eval-set`) -> systems (the speech models, the text references, the judge) ->
scoring (one item's score, agreement) -> run (`desta eval`: one loop for eval sets and public benchmarks)
-> report (report.json, report.md, scores.png); chance (what guessing scores on the same items), groups
(trained vs unseen tasks, seen vs unseen voices), hearing (label accuracy from the audio, while training);
compare (`desta compare`: reports side by side); benchmarks/ (one module per public benchmark, each a
`Benchmark` record).
"""

from desta.evaluation.items import EvalSetConfig, build_eval_set, load_eval_set, write_eval_set
from desta.evaluation.run import EvalConfig, evaluate

__all__ = ["EvalConfig", "EvalSetConfig", "build_eval_set", "evaluate", "load_eval_set", "write_eval_set"]
