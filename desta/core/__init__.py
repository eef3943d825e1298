"""Pieces both products share: speech-LLM training and text post-training.

args (one way to configure a command), artifacts (the file names stages write), summary (what a stage returns:
its figures and the lines its command prints), extras (the optional parts of the install and the `pip install`
each needs), hub (Hub ids and a checkpoint's public name), llm (loading a chat LLM, the GGUF fix), sequences
(chat tokens, labels, padding, end of turn), generation (text backends), optim (the optimisation settings and
the Trainer arguments built from them), chunks (resumable batch work, JSON Lines), cache (answers stored by
what they depend on), digests (content hashes), stats (bootstrap intervals), quality (repetition checks),
instructions (verifiable format instructions and refusals), probes (text retention probes), replay (mixing old
data into new), rules (the rule-based decoding adapter).
"""
