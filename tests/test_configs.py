"""Every Hydra config composes, and config mirrors of dataclasses agree with their defaults."""

from dataclasses import asdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from specdec.control import ControlConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_control_config_mirrors_the_dataclass():
    with initialize_config_dir(config_dir=str(CONF / "control"), version_base="1.3"):
        cfg = compose(config_name="default")
    assert instantiate(cfg) == ControlConfig()
    assert set(cfg) - {"_target_"} == set(asdict(ControlConfig()))


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_top_level_configs_compose_and_resolve(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # as in a run, so ${hydra:...} resolves
        app = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        resolved = OmegaConf.to_container(app, resolve=True)  # every interpolation resolves
    assert resolved


@pytest.mark.parametrize(
    "name", ["distill_draft", "train_medusa", "finetune_medusa", "train_eagle", "train_streams", "build_ngram_memory"]
)
def test_training_configs_never_train_on_evaluation_prompts(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, return_hydra_config=True)
    sources = [*cfg.data.sources, *(cfg.data.get("teacher_forced") or {})]
    assert sources and not [s for s in sources if s.startswith("dev_") or "humaneval" in s]


def test_the_long_context_mix_has_every_key_of_the_mix_and_its_generation_settings():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        mix = compose(config_name="mix").data
        long = compose(config_name="mix", overrides=["data=long_context"]).data
    assert set(long) == set(mix)
    settings = ("max_prompt_tokens", "max_new_tokens", "gen_batch_size", "gen_dtype", "topk")
    assert [long[k] for k in settings] == [mix[k] for k in settings]  # the same answers for the same prompts
    assert not long.sources and set(long.t0) == {"summarization", "context_qa"}
