"""TrainConfig: defaults (the main job, the paper's optimizer), files, overrides, resume checks.

No JAX computation here: configs only.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from retnet_jax import RetNetConfig
from retnet_jax.baselines import TransformerConfig
from retnet_jax.train import MeshShape, TrainConfig
from retnet_jax.train.config import MAIN_JOB_MODEL


def test_defaults_are_the_main_job_with_the_papers_optimizer():
    cfg = TrainConfig()
    assert (cfg.family, cfg.data, cfg.tokenizer, cfg.mode) == ("retnet", "default", None, "chunkwise")
    assert (cfg.b1, cfg.b2, cfg.weight_decay, cfg.clip_norm, cfg.schedule) == (0.9, 0.98, 0.05, 2.0, "linear")
    model = cfg.model_config(vocab_size=257)
    assert model == RetNetConfig.preset("tiny", **MAIN_JOB_MODEL, vocab_size=320)


def test_vocabulary_rows_are_padded_to_a_multiple_of_64_and_must_hold_the_tokenizer():
    assert TrainConfig(preset="tiny").model_config(257).vocab_size == 320
    assert TrainConfig(preset="tiny").model_config(8000).vocab_size == 8000
    assert TrainConfig(preset="tiny", model={"vocab_size": 300}).model_config(257).vocab_size == 300
    with pytest.raises(ValueError, match=r"model.vocab_size=256 cannot hold the tokenizer's 257 ids"):
        TrainConfig(preset="tiny", model={"vocab_size": 256}).model_config(257)


def test_a_named_preset_takes_only_the_given_overrides():
    cfg = TrainConfig(preset="base", model={"n_layers": 2})
    assert cfg.model_config(257) == RetNetConfig.preset("base", n_layers=2, vocab_size=320)


def test_bfloat16_precision_computes_in_bf16_and_keeps_float32_weights():
    model = TrainConfig(precision="bfloat16").model_config(257)
    assert (model.dtype, model.param_dtype) == (jnp.bfloat16, jnp.float32)


def test_the_transformer_family_is_the_baseline_of_the_same_size():
    cfg = TrainConfig(family="transformer", preset="tiny")
    assert cfg.model_config(257) == TransformerConfig.from_retnet(RetNetConfig.preset("tiny", vocab_size=320))


def test_json_round_trip_and_yaml_file(tmp_path):
    cfg = TrainConfig(steps=7, model={"d_model": 96}, mesh=MeshShape(data=2, tensor=2))
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    (tmp_path / "run.yaml").write_text("steps: 7\nmodel: {d_model: 96}\nmesh: {data: 2, tensor: 2}\n")
    assert TrainConfig.from_file(tmp_path / "run.yaml") == cfg
    (tmp_path / "run.json").write_text(cfg.to_json())
    assert TrainConfig.from_file(tmp_path / "run.json") == cfg


def test_overrides_read_yaml_scalars_into_fields_model_and_mesh():
    cfg = TrainConfig().override(["steps=100", "learning_rate=1e-3", "model.d_model=96",
                                  "mesh.tensor=2", "clip_norm=null", "precision=bfloat16"])
    assert (cfg.steps, cfg.learning_rate, cfg.model, cfg.mesh.tensor, cfg.clip_norm, cfg.precision) == (
        100, 1e-3, {"d_model": 96}, 2, None, "bfloat16")


def test_mesh_flag_parses_axis_sizes():
    assert MeshShape.parse("data=2,fsdp=2,tensor=2") == MeshShape(2, 2, 2)
    assert MeshShape.parse("tensor=4") == MeshShape(None, 1, 4)
    with pytest.raises(ValueError, match=r"write axis=size pairs from data, fsdp, tensor"):
        MeshShape.parse("model=2")


@pytest.mark.parametrize("build, message", [
    (lambda: TrainConfig().override(["stpes=3"]), r"unknown config key 'stpes'"),
    (lambda: TrainConfig.from_dict({"steps": 3, "lr": 1}), r"unknown config key 'lr'"),
    (lambda: TrainConfig().override(["model.d_modle=3"]), r"model: unknown RetNetConfig fields \['d_modle'\]"),
    (lambda: TrainConfig().override(["mesh.model=3"]), r"unknown config key 'mesh.model'"),
    (lambda: TrainConfig(preset="huge"), r"model: unknown preset 'huge'"),
    (lambda: TrainConfig(steps=0), r"steps must be a positive int, got 0"),
    (lambda: TrainConfig(seq_len=-5), r"seq_len must be a positive int, got -5"),
    (lambda: TrainConfig(batch_size=0), r"batch_size must be a positive int, got 0"),
    (lambda: TrainConfig(batch_size=6, micro_batches=4), r"batch_size=6 must be divisible by micro_batches=4"),
    (lambda: TrainConfig(family="rnn"), r"family must be one of \('retnet', 'transformer'\)"),
    (lambda: TrainConfig(mesh=MeshShape(tensor=0)), r"mesh.tensor must be a positive int, got 0"),
    (lambda: TrainConfig().override(["steps"]), r"write key=value"),
])
def test_bad_configs_are_refused_with_a_message_naming_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config: no such file .*nope.yaml"):
        TrainConfig.from_file(tmp_path / "nope.yaml")


def test_differences_name_model_and_data_fields_but_not_run_control():
    saved = TrainConfig(model={"d_model": 96}).to_dict()
    now = TrainConfig(model={"d_model": 192}, steps=5000, mesh=MeshShape(tensor=2), seq_len=512)
    assert now.differences(saved, 257) == ["model.d_model: checkpoint 96, now 192",
                                           "seq_len: checkpoint 256, now 512"]
    assert TrainConfig(steps=9999, eval_every=3).differences(TrainConfig().to_dict(), 257) == []
