"""DeepCache (kedavra.networks.step_cache): a cached U-Net call reuses the kept deep feature and skips the deep
blocks, equals the full call where the inputs are the same, follows the 1:N schedule, and travels in the PNG."""

import pytest
import torch
from random_models import tiny_model

from kedavra.networks.step_cache import StepCache
from kedavra.pipeline.infotext import request_parameters
from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.request import GenerationRequest


@pytest.fixture(scope="module")
def model():
    return tiny_model("small").eval()


def inputs(model, batch=2, side=16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 4, side, side), generator=generator)
    context = torch.randn((batch, 77, model.config.unet.context_dim), generator=generator)
    return x, torch.full((batch,), 500.0), context


def counting(module, calls: list):
    return module.register_forward_pre_hook(lambda *_: calls.append(1))


@torch.no_grad()
def test_a_cached_call_reuses_the_deep_feature_and_skips_the_deep_blocks(model):
    unet = model.unet
    x, t, context = inputs(model)
    full = unet(x, t, context)
    for depth in range(unet.num_skips):
        cache = StepCache(interval=3, depth=depth)
        assert torch.equal(unet(x, t, context, cache=cache), full)  # a full call, keeping the feature
        mid, deepest = [], []
        hooks = [counting(unet.mid_block.resnets[0], mid), counting(unet.down_blocks[-1].resnets[-1], deepest)]
        try:
            again = unet(x, t, context, cache=cache)  # cached: same input, so the same output
        finally:
            for hook in hooks:
                hook.remove()
        assert torch.equal(again, full), depth
        assert mid == [], depth  # the mid block did not run, nor the deepest down block unless its skip is kept
        assert deepest == ([] if depth < unet.num_skips - 1 else [1]), depth
        assert cache.full_calls == 1


@torch.no_grad()
def test_cached_calls_follow_the_feature_they_kept(model):
    """A cached call at a new input is the full call's shallow path around the kept deep feature: different from
    both the full call at the new input and the old output."""
    unet = model.unet
    x, t, context = inputs(model)
    cache = StepCache(interval=2)
    old = unet(x, t, context, cache=cache)
    moved = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    cached = unet(moved, t, context, cache=cache)
    fresh = unet(moved, t, context)
    assert not torch.equal(cached, fresh) and not torch.equal(cached, old)
    assert unet(moved, t, context, cache=cache).equal(fresh)  # the interval is 2: the third call is full again
    assert cache.full_calls == 2
    single = unet(moved[:1], t[:1], context[:1], cache=cache)  # another shape: a full call
    assert single.equal(unet(moved[:1], t[:1], context[:1])) and cache.full_calls == 3


def test_the_pipeline_runs_a_full_call_every_n_calls(model):
    pipe = Pipeline(model, dtype="fp32")
    mid = []
    hook = counting(pipe.model.unet.mid_block.resnets[0], mid)
    try:
        plain = pipe("a red circle", steps=7, seed=1, width=16, height=16, sampler="euler")
        assert len(mid) == 7
        mid.clear()
        one = pipe("a red circle", steps=7, seed=1, width=16, height=16, sampler="euler", step_cache=1)
        assert len(mid) == 7 and torch.equal(one.latents, plain.latents)  # 1: every call full, the same image
        mid.clear()
        cached = pipe("a red circle", steps=7, seed=1, width=16, height=16, sampler="euler", step_cache=3)
        assert len(mid) == 3  # calls 0, 3, 6
        assert not torch.equal(cached.latents, plain.latents)
    finally:
        hook.remove()


def test_step_cache_is_checked_and_written():
    with pytest.raises(ValueError, match="step_cache must be an integer >= 0"):
        GenerationRequest.build("a", step_cache=-1)
    with pytest.raises(ValueError, match="step cache interval"):
        StepCache(interval=0)
    request = GenerationRequest.build("a", sampler="euler", step_cache=3)
    assert request_parameters(request, 0, 1, 32, 32, None, None).extra["Step cache"] == "3"
    assert "Step cache" not in request_parameters(request.replace(step_cache=0), 0, 1, 32, 32, None, None).extra
