"""Pieces both products share: speech-LLM training and text post-training.

args (one way to configure a command), artifacts (the file names stages write), llm (loading a
chat LLM), sequences (chat tokens, labels, padding, end of turn), generation (text backends),
optim (the optimisation settings and the Trainer arguments built from them), chunks (resumable
batch work), quality (repetition checks), instructions (verifiable format instructions and
refusals), replay (mixing old data into new).
"""
