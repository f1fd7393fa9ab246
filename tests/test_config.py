"""TrainConfig validation, serialisation and the factories."""

import dataclasses

import keras
import numpy as np
import pytest

from tfngd.config import (
    OPTION_HELP,
    ConfigError,
    TrainConfig,
    build_model,
    build_optimizer,
    learning_rate_schedule,
)


def test_defaults_are_valid():
    assert TrainConfig().validate() is not None


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"learning_rate": 0.0}, ["learning_rate", "(0.0, 10.0]"]),
        ({"learning_rate": float("nan")}, ["learning_rate"]),
        ({"batch_size": 0}, ["batch_size", "[1, 65536]"]),
        ({"epochs": 0}, ["epochs", "[1, 1000000]"]),
        ({"ema_decay": 1.0}, ["ema_decay", "[0.0, 1.0)"]),
        ({"dataset": "imagenet"}, ["dataset", "digits", "mnist", "checkerboard"]),
        ({"schedule": "sigmoid"}, ["schedule", "linear", "cosine"]),
        ({"sampler": "euler"}, ["sampler", "ddpm", "ddim"]),
        ({"prediction_type": "score"}, ["prediction_type", "eps", "x0", "v"]),
        ({"optimizer": "lamb"}, ["optimizer", "adam", "sgd"]),
        ({"groups": 7}, ["groups=7", "32"]),
        ({"sample_steps": 2000}, ["sample_steps", "[1, 1000]"]),
        ({"warmup_steps": 10_000}, ["warmup_steps", "3000"]),
        ({"zero_terminal_snr": True}, ["zero_terminal_snr", "'v'"]),
        ({"min_snr_gamma": -1.0}, ["min_snr_gamma"]),
        ({"batch_size": True}, ["batch_size"]),
        ({"kfac_approximation": "pooled"}, ["kfac_approximation", "expand", "reduce"]),
        ({"inverse_method": "svd"}, ["inverse_method", "eigh", "cholesky"]),
    ],
)
def test_invalid_values_name_the_option_and_the_allowed_range(changes, names):
    config = dataclasses.replace(TrainConfig(), **changes)
    with pytest.raises(ConfigError) as err:
        config.validate()
    for name in names:
        assert name in str(err.value)


def test_round_trip_through_json(tmp_path):
    config = TrainConfig(dataset="mnist", channel_mults=(1, 2, 2), min_snr_gamma=5.0)
    path = tmp_path / "config.json"
    config.save(str(path))
    assert TrainConfig.load(str(path)) == config


def test_unknown_keys_and_unreadable_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config options: colour"):
        TrainConfig.from_dict({"colour": "red"})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the run config"):
        TrainConfig.load(str(bad))


def test_learning_rate_schedule_warms_up_then_decays_to_the_final_fraction():
    config = TrainConfig(learning_rate=1e-3, warmup_steps=10, epochs=2, steps_per_epoch=55,
                         final_lr_fraction=0.1).validate()
    lr = learning_rate_schedule(config)
    values = [float(lr(step)) for step in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(values[:3], [0.0, 5e-4, 1e-3], rtol=1e-6)
    # cosine from 1e-3 (step 10) to 1e-4 (step 110): halfway is the mean of both
    np.testing.assert_allclose(values[3], 0.5 * (1e-3 + 1e-4), rtol=1e-5)
    np.testing.assert_allclose(values[4], 1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "kfac"])
def test_optimizers_are_keras_optimizers_with_clipping(name):
    optimizer = build_optimizer(TrainConfig(optimizer=name, global_clipnorm=0.5).validate())
    assert isinstance(optimizer, keras.optimizers.Optimizer)
    assert optimizer.global_clipnorm == 0.5


def test_kfac_options_reach_the_optimizer():
    config = TrainConfig(kfac_approximation="reduce", inverse_method="eigh",
                         statistics_examples=8, kl_clip=0.02).validate()
    optimizer = build_optimizer(config)
    assert (optimizer.approximation, optimizer.inverse_method, optimizer.statistics_examples,
            optimizer.kl_clip) == ("reduce", "eigh", 8, 0.02)
    restored = type(optimizer).from_config(optimizer.get_config())
    assert (restored.approximation, restored.kl_clip) == ("reduce", 0.02)
    assert build_optimizer(TrainConfig().validate()).kl_clip == 1e-3
    assert build_optimizer(TrainConfig(kl_clip=None).validate()).kl_clip is None
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ConfigError, match="kl_clip"):
            TrainConfig(kl_clip=bad).validate()
        with pytest.raises(ConfigError, match="kl_clip_final"):
            TrainConfig(kl_clip_final=bad).validate()


def test_kl_clip_final_ramps_the_clip_geometrically_over_training():
    config = TrainConfig(kl_clip=1e-3, kl_clip_final=1e-1, epochs=2, steps_per_epoch=50,
                         warmup_steps=10).validate()
    kappa = build_optimizer(config).kl_clip
    for step, expected in ((0, 1e-3), (25, 1e-3 * 100**0.25), (50, 1e-2), (100, 1e-1)):
        assert float(kappa(step)) == pytest.approx(expected, rel=1e-5), step
    restored = build_optimizer(config).from_config(build_optimizer(config).get_config())
    assert float(restored.kl_clip(50)) == pytest.approx(1e-2, rel=1e-5)
    assert "kl_clip_final" in OPTION_HELP
    for bad in ({"optimizer": "adam"}, {"kl_clip": None}):
        with pytest.raises(ConfigError, match="kl_clip_final"):
            TrainConfig(kl_clip_final=1e-2, **bad).validate()


@pytest.mark.parametrize("model,expected", [("ddpm", "expand"), ("ndm", "per_example"),
                                            ("score_sde", "expand")])
def test_kfac_approximation_auto_is_per_example_for_ndm_only(model, expected):
    extra = {"prediction_type": "x0"} if model == "ndm" else {}
    config = TrainConfig(model=model, **extra).validate()
    assert config.kfac_approximation == "auto"
    assert config.kfac_approximation_used == expected
    assert build_optimizer(config).approximation == expected
    explicit = TrainConfig(model=model, kfac_approximation="reduce", **extra).validate()
    assert build_optimizer(explicit).approximation == "reduce"


def test_build_model_picks_the_network_from_the_example_shape():
    config = TrainConfig(base_channels=8, groups=4).validate()
    image_model = build_model(config, (8, 8, 1))
    assert image_model.denoiser.name == "unet"
    vector_model = build_model(config, (2,))
    assert vector_model.denoiser.name == "mlp_denoiser"
    conditional = build_model(dataclasses.replace(config, conditional=True), (8, 8, 1), 10)
    assert conditional.num_classes == 10 and len(conditional.denoiser.inputs) == 3
    with pytest.raises(ConfigError, match="no labels"):
        build_model(dataclasses.replace(config, conditional=True), (2,), None)
