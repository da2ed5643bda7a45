"""CoordConv inputs of the U-Net (Liu et al. 2018; `UNetConfig.coord_channels`, `kedavra train --coord-channels`):
the coordinate grid's values, a U-Net with them computing what a plain U-Net fed the grid as two more input channels
computes, the config travelling in checkpoints, and a training run that makes and reloads such a model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_training import Squares, small_config

from kedavra.checkpoint import load_model
from kedavra.commands.demo import torch_threads
from kedavra.networks.model import PRESETS, ModelConfig
from kedavra.networks.unet import UNet, coordinate_grid
from kedavra.networks.unet_config import UNetConfig
from kedavra.pipeline.pipeline import Pipeline
from kedavra.training import TrainConfig, train
from kedavra.training.models import model_config_for
from kedavra.training.stages import stage_configs

TINY = UNetConfig.from_preset("tiny")


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def test_coordinate_grid_holds_row_and_column_from_minus_one_to_one():
    grid = coordinate_grid(torch.zeros(3, 5, 4, 6, dtype=torch.bfloat16))
    assert grid.shape == (3, 2, 4, 6) and grid.dtype == torch.bfloat16
    rows, cols = grid[0].float()
    torch.testing.assert_close(rows[:, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]), atol=4e-3, rtol=0)
    torch.testing.assert_close(cols[0], torch.tensor([-1.0, -0.6, -0.2, 0.2, 0.6, 1.0]), atol=4e-3, rtol=0)
    assert torch.equal(rows, rows[:, :1].expand(4, 6)) and torch.equal(cols, cols[:1].expand(4, 6))
    assert torch.equal(grid[2], grid[0])
    assert torch.equal(coordinate_grid(torch.zeros(1, 1, 1, 3))[0, 0], torch.zeros(1, 3))  # a side of one: 0


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 4, 5, 7)])
def test_coord_unet_is_a_plain_unet_fed_the_grid(shape):
    """The known answer: the same weights in a plain U-Net with two more input channels, given cat(x, grid)."""
    coord = dataclasses.replace(TINY, coord_channels=True)
    torch.manual_seed(0)
    ours = UNet(coord).eval()
    assert ours.conv_in.weight.shape[1] == TINY.in_channels + 2
    plain = UNet(dataclasses.replace(TINY, in_channels=TINY.in_channels + 2, out_channels=TINY.out_channels)).eval()
    with torch.no_grad():
        for p in ours.parameters():  # the zero-initialised output conv would hide every difference
            p.normal_(0.0, 0.1)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    context = torch.randn(shape[0], 3, TINY.context_dim)
    t = torch.arange(shape[0]) * 300 + 1
    with torch.no_grad():
        got = ours(x, t, context)
        want = plain(torch.cat([x, coordinate_grid(x)], dim=1), t, context)
        without = plain(torch.cat([x, torch.zeros_like(coordinate_grid(x))], dim=1), t, context)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - without).abs().max() > 1e-3  # the grid reaches the output


def test_coord_channels_config_checks_and_travels():
    assert TINY.coord_channels is False and all(not p.unet.coord_channels for p in PRESETS.values())
    with pytest.raises(ValueError, match="coord_channels"):
        dataclasses.replace(TINY, coord_channels=1)
    config = dataclasses.replace(PRESETS["small"], unet=dataclasses.replace(PRESETS["small"].unet,
                                                                            coord_channels=True))
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert "in=4+xy" in config.describe() and "in=4 " in PRESETS["small"].describe()
    data = PRESETS["small"].to_dict()
    data["unet"].pop("coord_channels")  # a checkpoint saved before the field existed
    assert ModelConfig.from_dict(data).unet.coord_channels is False


@pytest.mark.parametrize("changes", [
    {"stage": "vae"},
    {"stage": "unet", "init": "kedavra-shapes"},
])
def test_train_config_refuses_coord_channels_without_a_unet_from_scratch(tmp_path, changes):
    with pytest.raises(ValueError, match=r"coord_channels=True \(--coord-channels\).*stage 'unet' or 'all'"):
        small_config(tmp_path, coord_channels=True, **changes)
    with pytest.raises(ValueError, match="coord_channels must be"):
        small_config(tmp_path, coord_channels="yes")


def test_stage_all_gives_the_coordinates_to_the_unet_stage_only(tmp_path):
    vae, unet = stage_configs(TrainConfig(preset="small", stage="all", coord_channels=True, out_dir=str(tmp_path)))
    assert (vae.stage, vae.coord_channels, unet.stage, unet.coord_channels) == ("vae", False, "unet", True)
    assert model_config_for(unet).unet.coord_channels is True
    assert model_config_for(dataclasses.replace(unet, coord_channels=False)).unet == PRESETS["small"].unet


def test_a_coord_unet_run_exports_a_model_that_loads_and_draws(tmp_path):
    vae = train(small_config(tmp_path / "vae", steps=2), dataset=Squares())[0].model_path
    result = train(small_config(tmp_path / "unet", stage="unet", vae=str(vae), coord_channels=True, steps=2),
                   dataset=Squares())[0]
    model = load_model(result.model_path)
    assert model.config.unet.coord_channels and model.unet.conv_in.weight.shape[1] == model.config.unet.in_channels + 2
    image = Pipeline(model, dtype=torch.float32)("a red square on the left", steps=2, seed=0, width=16,
                                                 height=24).images[0]
    assert image.size == (16, 24)
