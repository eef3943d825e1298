from pathlib import Path

import pytest

from desta.config import load_config
from desta.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.parent.name for p in ROOT.glob("recipes/*/config.yaml") if p.parent.name != "forgetting")


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_config_is_valid(name):
    config = load_config(TrainConfig, Path(__file__).resolve().parent.parent / "recipes" / name / "config.yaml")
    assert config.optim.max_grad_norm == 1.0 and config.optim.lr > 0


def test_paper_recipes_match_the_papers():
    root = Path(__file__).resolve().parent.parent / "recipes"
    desta2 = load_config(TrainConfig, root / "desta2" / "config.yaml")
    desta25 = load_config(TrainConfig, root / "desta25" / "config.yaml")
    assert (desta2.model.encoder, desta2.model.qformer_layers, desta2.optim.warmup_steps) == (
        "openai/whisper-small", 2, 2000)
    assert (desta25.model.encoder, desta25.model.qformer_layers, desta25.optim.warmup_steps) == (
        "openai/whisper-large-v3", 6, 5000)
    assert desta2.optim.lr == desta25.optim.lr == 1e-4 and desta25.optim.batch_size == 12


def test_forgetting_recipe_is_valid():
    from desta.posttrain import STRATEGIES, PostTrainConfig

    config = load_config(PostTrainConfig, ROOT / "recipes" / "forgetting" / "config.yaml")
    assert config.strategies == list(STRATEGIES) and config.replay_ratio == 0.03
