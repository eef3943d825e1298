"""Stage 1, describe: an audio corpus -> a rich text description per clip (transcript + attributes).

sources (manifests, datasets, lhotse; the corpus mappings) -> attributes (measured from the signal,
normalised from labels) -> description (the one writer and reader of the format) -> run (the resumable,
shardable stage: `desta describe`).
"""

from desta.describe.run import DescribeConfig, describe, merge

__all__ = ["DescribeConfig", "describe", "merge"]
