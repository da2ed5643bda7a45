"""`kedavra serve` against real HTTP: the `webuiapi` client unchanged, the A1111 response shapes, validation (422
naming the field), the body limit (413), the bounded queue (503 + Retry-After), interrupt and client disconnects,
API keys (401), the Host guard (403), model switching only among listed names, and a small concurrent load test.

Servers run in this process: uvicorn in a thread on a free loopback port, over a Worker owning a tiny
random-weight model in fp32 (scripts/load_test_server.py makes it; the kind tests/test_generate_cli.py uses).
"""

import base64
import contextlib
import importlib.util
import io
import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from kedavra.api import load
from kedavra.cli import main
from kedavra.diffusion.samplers import resolve_sampler
from kedavra.diffusion.samplers.k_diffusion import resolve_k_sampler
from kedavra.formats.png_info import PARAMETERS_KEYWORD, model_hash, parse_parameters
from kedavra.pipeline.inpainting import InpaintOptions
from kedavra.viz.sample_image import draw_sample_image

webuiapi = pytest.importorskip("webuiapi")
uvicorn = pytest.importorskip("uvicorn")
from kedavra.commands.serve import server_config  # noqa: E402
from kedavra.serving.app import ServerConfig, create_app, is_authorized, is_loopback  # noqa: E402
from kedavra.serving.connections import uvicorn_options  # noqa: E402
from kedavra.serving.tasks import Admission  # noqa: E402
from kedavra.serving.worker import ModelCatalog, Worker  # noqa: E402

SIZE = 32  # the tiny preset's image size
STEPS = 2
LONG_STEPS = 150  # the API's maximum (MAX_STEPS): a job for tests that interrupt or cancel it
LONG_BATCHES = 10  # n_iter of a job that must outlast a client's timeout: 150 steps at 32 px take well under a
#                    second on a fast CPU (seen on an AMD EPYC Zen 5), so one batch alone does not
INTERRUPTED_STEPS = 60  # a batch long enough to catch the second of two running
API_KEY = "test-key-0123456789"
BODY_LIMIT = 2**20  # 1 MiB for the main test server
WAIT_S = 30.0  # longest wait for a state the server should reach within a second or two
LOAD_TEST = Path(__file__).resolve().parents[1] / "scripts" / "load_test_server.py"


def import_script(path: Path):
    """A script under scripts/ as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


load_test_server = import_script(LOAD_TEST)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Two tiny models with different weights, and a file that is not a model."""
    folder = tmp_path_factory.mktemp("models")
    load_test_server.make_tiny_model(folder / "tiny.safetensors", seed=0)
    load_test_server.make_tiny_model(folder / "other.safetensors", seed=1)
    (folder / "notes.txt").write_text("not a model")
    return folder


def loader(path):
    return load(path, dtype="fp32")


def make_worker(models_dir: Path, queue_size: int = 8) -> Worker:
    catalog = ModelCatalog(models_dir, initial=models_dir / "tiny.safetensors")
    entry = catalog.identify(catalog.entries()[0])
    return Worker(loader(entry.path), entry, catalog, loader, queue_size=queue_size, preview_every=1)


@contextlib.contextmanager
def serve(worker: Worker, config: ServerConfig):
    """uvicorn serving create_app(worker, config) in a thread on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(worker, config), log_level="warning", lifespan="on",
                                           **uvicorn_options()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


@pytest.fixture(scope="module")
def server(models_dir):
    worker = make_worker(models_dir)
    with serve(worker, ServerConfig(api_key=None, max_body_bytes=BODY_LIMIT)) as url:
        yield url, worker


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], timeout=WAIT_S) as http:
        yield http


def webui(url: str, **auth) -> "webuiapi.WebUIApi":
    port = int(url.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=STEPS, **auth)


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def wait_until(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def start_long_job(url: str, results: list, **fields) -> threading.Thread:
    """POST a LONG_STEPS txt2img in a thread; its (status, json) lands in `results`."""

    def post():
        response = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=WAIT_S * 4,
                              json={"prompt": "long", "steps": LONG_STEPS, "seed": 1, **fields})
        results.append((response.status_code, response.json()))

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def running(worker: Worker) -> bool:
    return worker.progress(want_image=False).state.sampling_step > 0


# ---- the real client ----------------------------------------------------------------------------------------------


def test_webuiapi_txt2img_matches_the_pipeline(server, models_dir):
    url, worker = server
    result = webui(url).txt2img(prompt="a red circle", negative_prompt="blurry", seed=7, steps=STEPS, width=SIZE,
                                height=SIZE, cfg_scale=5, sampler_name="Euler a")
    assert len(result.images) == 1 and result.images[0].size == (SIZE, SIZE)
    info = result.info
    assert (info["seed"], info["all_seeds"], info["width"], info["sampler_name"]) == (7, [7], SIZE, "Euler a")
    text = info["infotexts"][0]
    assert result.images[0].text[PARAMETERS_KEYWORD] == text  # the PNG carries the same parameters
    params = parse_parameters(text)
    assert (params.prompt, params.negative_prompt, params.seed, params.steps, params.sampler, params.cfg_scale) == \
        ("a red circle", "blurry", 7, STEPS, "Euler a", 5.0)
    assert (params.model, params.model_hash) == ("tiny", model_hash(models_dir / "tiny.safetensors"))
    assert result.parameters["prompt"] == "a red circle" and result.parameters["seed"] == 7  # the request echoed
    # A1111's way: Euler a on its own ("Automatic") σ's, noise from the emulated CUDA generator ("GPU")
    assert "Schedule type: Automatic" in text and "RNG: GPU" in text  # A1111 writes Automatic when none applies
    direct = worker.pipeline("a red circle", "blurry", steps=STEPS, sampler="Euler a", schedule_type="Automatic",
                             rng="GPU", guidance_scale=5, seed=7, width=SIZE, height=SIZE).images[0]
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), np.asarray(direct))


def test_batches_and_n_iter_number_the_seeds_as_a1111(server):
    url, _ = server
    result = webui(url).txt2img(prompt="a cat", seed=100, batch_size=2, n_iter=2, steps=STEPS, width=SIZE,
                                height=SIZE)
    assert result.info["all_seeds"] == [100, 101, 102, 103] and len(result.images) == 4
    assert [parse_parameters(t).seed for t in result.info["infotexts"]] == [100, 101, 102, 103]
    assert [image.text[PARAMETERS_KEYWORD] for image in result.images] == result.info["infotexts"]
    again = webui(url).txt2img(prompt="a cat", seed=102, batch_size=2, steps=STEPS, width=SIZE, height=SIZE)
    assert again.images[0].tobytes() == result.images[2].tobytes()  # seed 102 is seed 102, whatever batch it is in
    randomised = webui(url).txt2img(prompt="a cat", seed=-1, batch_size=2, steps=STEPS, width=SIZE, height=SIZE)
    first = randomised.info["seed"]
    assert randomised.info["all_seeds"] == [first, first + 1] and randomised.parameters["seed"] == -1


def test_a1111_noise_settings_act_and_are_recorded(server, client):
    url, worker = server
    api = webui(url)
    base = {"prompt": "a cat", "seed": 11, "steps": STEPS, "width": SIZE, "height": SIZE}
    gpu = api.txt2img(**base)
    cpu = api.txt2img(**base, override_settings={"randn_source": "CPU", "eta_noise_seed_delta": 31337})
    assert gpu.images[0].tobytes() != cpu.images[0].tobytes()
    params = parse_parameters(cpu.info["infotexts"][0])
    assert (params.extra["RNG"], params.extra["ENSD"]) == ("CPU", "31337")
    direct = worker.pipeline("a cat", steps=STEPS, sampler="Euler a", schedule_type="automatic", rng="CPU",
                             eta_noise_seed_delta=31337, seed=11, width=SIZE, height=SIZE).images[0]
    assert np.array_equal(np.asarray(cpu.images[0].convert("RGB")), np.asarray(direct))
    # variation seeds: every image keeps the seed, the variation seeds count up across batches (A1111's numbering)
    varied = api.txt2img(**base, batch_size=2, n_iter=2, subseed=500, subseed_strength=0.3)
    assert varied.info["all_seeds"] == [11] * 4 and varied.info["all_subseeds"] == [500, 501, 502, 503]
    assert varied.info["subseed_strength"] == 0.3
    extras = [parse_parameters(text).extra for text in varied.info["infotexts"]]
    assert [e["Variation seed"] for e in extras] == ["500", "501", "502", "503"]
    single = api.txt2img(**base, subseed=502, subseed_strength=0.3)
    assert single.images[0].tobytes() == varied.images[2].tobytes()
    # the scheduler picks the σ's; an unknown setting is named in the notes; POST /options sets the default
    karras = client.post("/sdapi/v1/txt2img", json={**base, "sampler_name": "Euler", "scheduler": "karras",
                                                    "override_settings": {"sd_vae": "x"}}).json()
    info = json.loads(karras["info"])
    assert info["scheduler"] == "Karras" and "Schedule type: Karras" in info["infotexts"][0]
    assert any("override_settings.sd_vae" in note for note in info["notes"])
    try:
        assert client.post("/sdapi/v1/options", json={"randn_source": "CPU"}).json()["applied"] == \
            {"randn_source": "CPU"}
        assert client.get("/sdapi/v1/options").json()["randn_source"] == "CPU"
        assert client.post("/sdapi/v1/options", json={"randn_source": "TPU"}).status_code == 422
        assert "RNG: CPU" in api.txt2img(**base).info["infotexts"][0]
    finally:
        client.post("/sdapi/v1/options", json={"randn_source": "GPU"})


def test_webuiapi_img2img_and_inpainting(server):
    url, _ = server
    api = webui(url)
    init = draw_sample_image(64)  # resized to the requested 32x32, as A1111's resize_mode 0
    result = api.img2img(images=[init], prompt="a cat", denoising_strength=0.5, seed=3, steps=4, width=SIZE,
                         height=SIZE)
    assert result.images[0].size == (SIZE, SIZE)
    params = parse_parameters(result.info["infotexts"][0])
    assert params.denoising_strength == 0.5 and params.seed == 3
    assert result.parameters["init_images"] is None  # not sent back, as A1111 without include_init_images
    mask = Image.new("L", (SIZE, SIZE))
    mask.paste(255, (8, 8, 24, 24))
    inpainted = api.img2img(images=[init], mask_image=mask, prompt="a ball", seed=3, steps=4, width=SIZE,
                            height=SIZE)
    # webuiapi sends A1111's API defaults: mask blur 4, "only masked" (the output keeps the init image's size), fill
    assert inpainted.images[0].size == init.size
    extra = parse_parameters(inpainted.info["infotexts"][0]).extra
    assert (extra["Mask blur"], extra["Inpaint area"], extra["Masked content"]) == ("4", "Only masked", "fill")
    assert not inpainted.info["notes"]


def test_img2img_takes_bare_base64_and_data_urls(client):
    init = b64_png(draw_sample_image(SIZE))
    answers = [client.post("/sdapi/v1/img2img", json={"init_images": [image], "seed": 5, "steps": 4,
                                                      "denoising_strength": 0.5, "prompt": "x"}).json()
               for image in (init, f"data:image/png;base64,{init}")]
    assert answers[0]["images"] == answers[1]["images"]
    assert json.loads(answers[0]["info"])["width"] == SIZE  # width/height default to the init image's


def test_inverted_mask_paints_where_the_mask_is_black(client):
    init = b64_png(draw_sample_image(SIZE))
    left = Image.new("L", (SIZE, SIZE), 0)
    left.paste(255, (0, 0, SIZE // 2, SIZE))
    request = {"init_images": [init], "seed": 5, "steps": 4, "prompt": "x"}
    for sampler in ("Euler", "DDPM"):  # A1111's (its inpainting settings) and kedavra's (the mask as sent)
        plain = client.post("/sdapi/v1/img2img", json={**request, "sampler_name": sampler,
                                                       "mask": b64_png(ImageOps.invert(left))}).json()
        inverted = client.post("/sdapi/v1/img2img", json={**request, "sampler_name": sampler, "mask": b64_png(left),
                                                          "inpainting_mask_invert": 1}).json()
        assert np.array_equal(*(np.asarray(decode_png(answer["images"][0])) for answer in (plain, inverted)))
        assert ("Mask mode: Inpaint not masked" in json.loads(inverted["info"])["infotexts"][0]) == (sampler == "Euler")


def test_resize_mode_3_and_mask_round_reach_the_pipeline(client, server):
    """resize_mode 3 (latent upscale) and mask_round false are carried out, without a note: the images equal the
    pipeline's with latent_resize / InpaintOptions(resize_mode=3, mask_round=False); what A1111 cannot run with
    them is 422, and override_settings.mask_round (no A1111 setting) is named with the field to use."""
    _, worker = server
    odd = draw_sample_image(48).resize((27, 45))
    mask = Image.new("L", odd.size)
    mask.paste(255, (5, 10, 20, 30))
    base = {"init_images": [b64_png(odd)], "prompt": "x", "seed": 5, "steps": 4, "denoising_strength": 0.5,
            "width": SIZE, "height": SIZE, "sampler_name": "Euler", "resize_mode": 3}
    direct = {"width": SIZE, "height": SIZE, "sampler": "Euler", "schedule_type": "Automatic", "rng": "GPU",
              "steps": 4, "seed": 5, "strength": 0.5, "guidance_scale": 7.0}
    masked = {"mask": b64_png(mask), "mask_round": False, "inpainting_fill": 1, "inpaint_full_res": False}
    options = InpaintOptions(mask_blur_x=4, mask_blur_y=4, resize_mode=3, mask_round=False)
    for fields, settings in (({}, {"latent_resize": True}), (masked, {"mask": mask, "inpaint": options})):
        answer = client.post("/sdapi/v1/img2img", json={**base, **fields}).json()
        assert not json.loads(answer["info"])["notes"]
        expected = worker.pipeline("x", init_image=odd, **settings, **direct).images[0]
        assert np.array_equal(np.asarray(decode_png(answer["images"][0]).convert("RGB")), np.asarray(expected))
    fill = client.post("/sdapi/v1/img2img", json={**base, **masked, "inpainting_fill": 0})
    assert fill.status_code == 422 and "with masked content 'fill' over the whole picture" in fill.text
    ours = client.post("/sdapi/v1/img2img", json={**base, **masked, "sampler_name": "DDPM"})
    assert ours.status_code == 422 and ours.json()["detail"][0]["loc"] == ["body", "resize_mode"]
    setting = client.post("/sdapi/v1/img2img", json={**base, "override_settings": {"mask_round": False}}).json()
    assert "override_settings.mask_round is not supported and was ignored (mask_round is a request field: send it " \
           "beside override_settings)" in json.loads(setting["info"])["notes"]


def test_listing_endpoints_through_webuiapi(server, models_dir):
    url, _ = server
    api = webui(url)
    samplers = api.get_samplers()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert {"DPM2", "LMS", "DPM++ 3M SDE", "Restart", "DDPM"} <= set(names)  # A1111's, then kedavra's others
    for name in names:
        with contextlib.suppress(ValueError):  # an A1111 / ComfyUI sampler, else kedavra's
            resolve_k_sampler(name)
            continue
        resolve_sampler(name)
    assert {"name", "aliases", "options"} <= set(samplers[0])
    models = {m["model_name"]: m for m in api.get_sd_models()}
    assert set(models) == {"tiny", "other"}  # notes.txt is not listed
    assert models["tiny"]["hash"] == model_hash(models_dir / "tiny.safetensors")
    assert models["tiny"]["title"] == f"tiny.safetensors [{models['tiny']['hash']}]"
    assert models["other"]["hash"] is None  # hashed once loaded, as A1111
    assert api.util_get_current_model() == models["tiny"]["title"]
    assert api.util_get_scheduler_names() == sorted([  # A1111 1.10's (webuiapi sorts them)
        "automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
        "align_your_steps", "simple", "normal", "ddim", "beta"])
    idle = api.get_progress()
    assert (idle["progress"], idle["state"]["job_count"], idle["current_image"]) == (0.0, 0, None)


@pytest.mark.parametrize(("body", "loc"), [
    ({"steps": 0}, ["body", "steps"]),
    ({"steps": 151}, ["body", "steps"]),
    ({"width": 31}, ["body", "width"]),  # not a multiple of the tiny VAE factor 2
    ({"height": 4096}, ["body", "height"]),
    ({"batch_size": 9}, ["body", "batch_size"]),
    ({"cfg_scale": 31}, ["body", "cfg_scale"]),
    ({"seed": -2}, ["body", "seed"]),
    ({"sampler_name": "nope"}, ["body", "sampler_name"]),
    ({"scheduler": "nope"}, ["body", "scheduler"]),
    ({"override_settings": {"randn_source": "TPU"}}, ["body", "override_settings"]),
    ({"subseed_strength": 1.5}, ["body", "subseed_strength"]),
    ({"eta": 2}, ["body", "eta"]),
    ({"seed": True}, ["body", "seed"]),
    ({"batch_size": True}, ["body", "batch_size"]),
    ({"cfg_scale": False}, ["body", "cfg_scale"]),
    ({"prompt": "a cat\nNegative prompt: x"}, ["body"]),  # A1111's parameters text could not hold it
    ({"enable_hr": True, "hr_upscaler": "4x-UltraSharp"}, ["body", "hr_upscaler"]),
    ({"enable_hr": True, "hr_upscaler": "/etc/passwd"}, ["body", "hr_upscaler"]),  # no file paths over HTTP
    ({"enable_hr": True, "denoising_strength": 0}, ["body", "denoising_strength"]),
    ({"enable_hr": True, "hr_scale": 5}, ["body", "hr_scale"]),  # 160 px: over 4x the tiny model's 32
    ({"enable_hr": True, "hr_resize_x": 4096}, ["body", "hr_resize_x"]),
    ({"enable_hr": True, "hr_sampler_name": "nope"}, ["body"]),
    ({"enable_hr": True, "hr_second_pass_steps": -1}, ["body", "hr_second_pass_steps"]),
])
def test_bad_txt2img_fields_are_422_naming_the_field(client, body, loc):
    response = client.post("/sdapi/v1/txt2img", json={"steps": STEPS, **body})
    assert response.status_code == 422
    assert loc in [detail["loc"] for detail in response.json()["detail"]]


@pytest.mark.parametrize(("body", "loc"), [
    ({"init_images": ["not base64!"]}, ["body", "init_images", 0]),
    ({"init_images": [base64.b64encode(b"hello").decode()]}, ["body", "init_images", 0]),
    ({"init_images": ["data:image/png,abc"]}, ["body", "init_images", 0]),
    ({"init_images": []}, ["body", "init_images"]),
    ({"denoising_strength": 1.5}, ["body", "denoising_strength"]),
    ({"denoising_strength": 0.1}, ["body", "denoising_strength"]),  # 0.1 of 2 steps runs none
    ({"mask": "????"}, ["body", "mask"]),
    ({"mask": b64_png(Image.new("L", (SIZE // 2, SIZE)))}, ["body", "mask"]),  # not the init image's size
    ({"steps": True}, ["body", "steps"]),  # JSON true is not the number 1
    ({"resize_mode": 4}, ["body", "resize_mode"]),
])
def test_bad_img2img_fields_are_422_naming_the_field(client, body, loc):
    request = {"init_images": [b64_png(draw_sample_image(SIZE))], "steps": STEPS, **body}
    response = client.post("/sdapi/v1/img2img", json=request)
    assert response.status_code == 422
    assert loc in [detail["loc"] for detail in response.json()["detail"]]


def test_requests_beyond_the_models_bounds_are_422_before_any_work(client, server):
    """A 2048x2048 request on the 32-pixel model (minutes of one step) and a batch of too much work are refused
    naming the limit; the worker never sees them."""
    _, worker = server
    done = dict(worker.counts)
    big = client.post("/sdapi/v1/txt2img", json={"width": 2048, "height": 2048, "steps": 1})
    assert big.status_code == 422 and big.json()["detail"][0]["loc"] == ["body", "width"]
    assert "from 2 to 128 (4x this model's native 32; kedavra serve --max-side-factor)" in big.text
    costly = client.post("/sdapi/v1/txt2img", json={"width": 128, "height": 128, "steps": 150, "batch_size": 8})
    assert costly.status_code == 422 and "19200 native-image steps" in costly.text and "--max-cost" in costly.text
    assert worker.counts == done


def test_nan_cfg_scale_is_422(client):
    response = client.post("/sdapi/v1/txt2img", content=b'{"cfg_scale": NaN}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "cfg_scale"]


def test_bodies_over_the_limit_are_413_before_they_are_read(client):
    too_big = b"x" * (BODY_LIMIT + 1)
    declared = client.post("/sdapi/v1/txt2img", content=too_big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413

    def chunks():  # no Content-Length: the limit applies to what arrives
        for start in range(0, len(too_big), 2**16):
            yield too_big[start:start + 2**16]

    streamed = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413


# ---- queue, interrupt, disconnects --------------------------------------------------------------------------------


def test_full_queue_is_503_with_retry_after_and_interrupt_returns_what_is_done(models_dir):
    worker = make_worker(models_dir, queue_size=1)
    with serve(worker, ServerConfig(api_key=None, max_body_bytes=BODY_LIMIT)) as url:
        long_result, waiting_result = [], []
        long_job = start_long_job(url, long_result, n_iter=2)
        wait_until(lambda: running(worker), "the long job to start")
        progress = httpx.get(f"{url}/sdapi/v1/progress").json()
        assert progress["state"]["job_count"] == 2 and 0 < progress["progress"] < 1
        assert progress["state"]["sampling_steps"] == LONG_STEPS
        wait_until(lambda: httpx.get(f"{url}/sdapi/v1/progress").json()["current_image"] is not None, "a preview")
        preview = decode_png(httpx.get(f"{url}/sdapi/v1/progress").json()["current_image"])
        assert preview.size == (SIZE, SIZE)  # the x0 prediction decoded
        waiting = threading.Thread(target=lambda: waiting_result.append(httpx.post(
            f"{url}/sdapi/v1/txt2img", json={"steps": STEPS, "seed": 9, "width": SIZE}, timeout=WAIT_S * 4)))
        waiting.start()
        wait_until(lambda: worker.queued() == 1, "the second request to queue")
        refused = httpx.post(f"{url}/sdapi/v1/txt2img", json={"steps": STEPS})
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert httpx.post(f"{url}/sdapi/v1/interrupt").json() == {"interrupted": True}
        long_job.join(WAIT_S)
        waiting.join(WAIT_S)
        status, interrupted = long_result[0]
        info = json.loads(interrupted["info"])
        assert status == 200 and interrupted["images"] == [] and info["interrupted"] and info["all_seeds"] == []
        assert waiting_result[0].status_code == 200 and json.loads(waiting_result[0].json()["info"])["seed"] == 9
        assert worker.counts["interrupted"] == 1 and worker.counts["rejected"] == 1


def test_interrupt_keeps_the_batches_already_finished(server):
    url, worker = server
    results = []
    job = start_long_job(url, results, n_iter=2, seed=50, steps=INTERRUPTED_STEPS)
    wait_until(lambda: worker.progress(want_image=False).state.job_no == 1, "the second batch to start")
    httpx.post(f"{url}/sdapi/v1/interrupt")
    job.join(WAIT_S)
    status, answer = results[0]
    info = json.loads(answer["info"])
    assert status == 200 and info["interrupted"] and info["all_seeds"] == [50] and len(answer["images"]) == 1
    assert parse_parameters(info["infotexts"][0]).seed == 50


def test_unicode_prompts_travel_in_itxt(client):
    prompt = "un chat qui dort \u2014 \U0001f431"
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "seed": 1, "steps": STEPS}).json()
    assert decode_png(answer["images"][0]).text[PARAMETERS_KEYWORD].startswith(prompt + "\n")


def test_a_client_that_hangs_up_cancels_its_work(server):
    url, worker = server
    before = dict(worker.counts)
    long_result = []
    long_job = start_long_job(url, long_result, n_iter=LONG_BATCHES)  # runs while the next request waits in the queue
    wait_until(lambda: running(worker), "the long job to start")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/sdapi/v1/txt2img", json={"steps": STEPS}, timeout=0.5)
    wait_until(lambda: worker.counts["cancelled"] == before["cancelled"] + 1, "the queued request to be dropped")
    assert worker.queued() == 0
    httpx.post(f"{url}/sdapi/v1/interrupt")
    long_job.join(WAIT_S)

    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):  # now the running job's client leaves
        httpx.post(f"{url}/sdapi/v1/txt2img", json={"steps": LONG_STEPS, "seed": 2, "n_iter": LONG_BATCHES},
                   timeout=1.0)
    wait_until(lambda: worker.counts["interrupted"] == before["interrupted"] + 2, "the running job to stop")
    wait_until(lambda: worker.progress().state.job_count == 0, "the worker to be idle")
    assert time.monotonic() - started < WAIT_S / 2  # far less than LONG_BATCHES x LONG_STEPS steps


def test_small_load_test(server):
    """scripts/load_test_server.py at a small size: 8 clients, 40 requests, every answer checked."""
    url, worker = server
    report = load_test_server.run_load_test(url, clients=8, requests=40, steps=STEPS, size=SIZE, deadline_s=300)
    assert report["problems"] == []
    assert report["completed"] == 40 - report["abandoned"] and report["repeated_seed_requests"] == 10


# ---- security -----------------------------------------------------------------------------------------------------


def test_api_key_is_required_on_the_api(models_dir):
    worker = make_worker(models_dir)
    with serve(worker, ServerConfig(api_key=API_KEY, max_body_bytes=BODY_LIMIT)) as url:
        samplers = f"{url}/sdapi/v1/samplers"
        assert httpx.get(samplers).status_code == 401
        assert httpx.get(samplers, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(samplers, auth=("user", "wrong")).status_code == 401
        assert httpx.get(samplers, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert httpx.get(samplers, auth=("anyone", API_KEY)).status_code == 200
        refused = httpx.post(f"{url}/sdapi/v1/txt2img", json={"steps": STEPS})
        assert refused.status_code == 401 and "WWW-Authenticate" in refused.headers
        # an oversized body is refused unread either way (the body limit answers first when it is declared)
        assert httpx.post(f"{url}/sdapi/v1/txt2img", content=b"x" * (BODY_LIMIT * 4)).status_code in (401, 413)
        assert httpx.get(f"{url}/").status_code == 200  # the page asks for the key itself
        api = webui(url, username="kedavra", password=API_KEY)  # A1111's --api-auth style, as webuiapi sends it
        assert api.txt2img(prompt="x", seed=1, steps=STEPS, width=SIZE, height=SIZE).info["seed"] == 1


def test_authorization_header_forms():
    basic = base64.b64encode(f"user:{API_KEY}".encode()).decode()
    assert is_authorized(f"Bearer {API_KEY}", API_KEY) and is_authorized(f"Basic {basic}", API_KEY)
    for header in (None, "", API_KEY, f"Bearer {API_KEY}x", "Basic !!!", f"Token {API_KEY}"):
        assert not is_authorized(header, API_KEY)


def test_non_loopback_hosts_are_refused(client):
    assert client.get("/sdapi/v1/samplers", headers={"Host": "evil.example:7860"}).status_code == 403
    assert all(is_loopback(h) for h in ("localhost:7860", "127.0.0.1", "127.1.2.3:80", "[::1]:7860", "::1"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "example.com", "10.0.0.1:7860", "", "[::]:7860"))


def test_listening_beyond_the_loopback_needs_a_key(models_dir, capsys, monkeypatch):
    monkeypatch.delenv("KEDAVRA_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--model", str(models_dir / "tiny.safetensors")]) == 2
    assert "--api-key" in capsys.readouterr().err
    assert server_config("0.0.0.0", API_KEY, 20).loopback_only is False
    assert server_config("::1", None, 20, 2, 100).admission == Admission(2.0, 100.0)
    with pytest.raises(ValueError, match="side_factor must be"):
        server_config("::1", None, 20, 0.5)
    assert server_config("::1", None, 20).loopback_only is True
    with pytest.raises(ValueError, match="API key"):
        server_config("192.168.1.5", None, 20)


def test_models_switch_only_among_listed_names(server, models_dir, client):
    url, _ = server
    for name in ("../tiny.safetensors", str(models_dir / "other.safetensors"), "/etc/passwd", "notes.txt"):
        response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
    api = webui(url)
    try:
        switched = api.set_options({"sd_model_checkpoint": "other.safetensors", "some_option": 1})
        assert switched["ignored"] == ["some_option"]
        assert api.util_get_current_model().startswith("other.safetensors [")
        made = api.txt2img(prompt="x", seed=1, steps=STEPS, width=SIZE, height=SIZE)
        assert parse_parameters(made.info["infotexts"][0]).model == "other"
    finally:
        api.set_options({"sd_model_checkpoint": "tiny"})
    assert api.util_get_current_model().startswith("tiny.safetensors [")


def test_page_and_api_description_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="app.js"' in page.text and client.get("/app.js").status_code == 200
    assert client.get("/style.css").status_code == 200
    assert client.get("/index.html").status_code == 404 and client.get("/static/app.js").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/interrupt"} <= set(paths)


def test_kedavra_serve_runs_as_a_process(models_dir):
    """The command itself: `python -m kedavra serve` answers webuiapi, and stops on SIGTERM (uvicorn shuts down,
    then re-raises the signal, so the exit status is -SIGTERM)."""
    port = load_test_server.free_port()
    process = load_test_server.start_server(models_dir / "tiny.safetensors", port, queue_size=2, threads=1)
    try:
        result = webui(f"http://127.0.0.1:{port}").txt2img(prompt="x", seed=4, steps=STEPS, width=SIZE, height=SIZE)
        assert result.info["all_seeds"] == [4] and result.images[0].size == (SIZE, SIZE)
    finally:
        process.terminate()
        assert process.wait(WAIT_S) in (0, -signal.SIGTERM)


def test_a_cancelled_job_stops_between_the_unets_blocks(server):
    """interruptible: once the job is cancelled, the next U-Net block raises Interrupted, inside the step; the
    hooks are gone afterwards."""
    from kedavra.serving.worker import Interrupted, Job, interruptible

    _, worker = server
    pipe = worker.pipeline
    unet = pipe.model.unet
    job = Job(lambda job: None)
    ran = []
    first = unet.down_blocks[0].resnets[0]
    last = unet.up_blocks[-1].resnets[-1]
    def after_first(*args) -> None:  # a forward hook's return value would replace the output: return None
        ran.append("first")
        job.cancelled.set()

    def after_last(*args) -> None:
        ran.append("last")

    watches = [first.register_forward_hook(after_first), last.register_forward_hook(after_last)]
    latents = torch.zeros(1, pipe.config.vae.latent_channels, 8, 8)
    context = torch.zeros(1, pipe.config.tokenizer.max_length, pipe.config.unet.context_dim)
    try:
        with pytest.raises(Interrupted), interruptible(job, pipe), torch.no_grad():
            unet(latents, torch.tensor([500.0]), context)
        assert ran == ["first"]  # stopped after the first block, not at the end of the step
        job.cancelled.clear()
        with torch.no_grad():
            unet(latents, torch.tensor([500.0]), context)  # no hook left behind
        assert ran[-1] == "last"
    finally:
        for watch in watches:
            watch.remove()


def test_a_thousand_unfinished_requests_do_not_starve_a_key_holder(models_dir, monkeypatch):
    """Slow-loris: 1,000 connections that send part of a request line and stop; an authorised request is still
    answered within 2 s, and such a connection is closed once its request is overdue."""
    from kedavra.serving.connections import GuardedH11Protocol

    monkeypatch.setattr(GuardedH11Protocol, "request_timeout", 3.0)
    worker = make_worker(models_dir)
    with serve(worker, ServerConfig(api_key=API_KEY, max_body_bytes=BODY_LIMIT)) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = []
        try:
            for _ in range(1000):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"GET / HTTP/1.1\r\n")
                idle.append(sock)
            start = time.monotonic()
            answer = httpx.get(f"{url}/sdapi/v1/samplers", headers={"Authorization": f"Bearer {API_KEY}"},
                               timeout=10)
            assert answer.status_code == 200 and time.monotonic() - start < 2.0
            idle[0].settimeout(10)
            assert idle[0].recv(1) == b""  # closed by the server once its request was overdue
        finally:
            for sock in idle:
                sock.close()


def test_openai_images_generations(client, server):
    """OpenAI's POST /v1/images/generations: b64 PNGs of the loaded model, the same images as A1111's txt2img with
    the same seed; its own field names in errors."""
    answer = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "size": "32x32",
                                                          "model": "dall-e-3", "seed": 12, "steps": STEPS})
    assert answer.status_code == 200
    body = answer.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert body["data"][0]["revised_prompt"] == "a red circle"
    image = decode_png(body["data"][0]["b64_json"])
    assert image.size == (SIZE, SIZE)
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 12, "steps": STEPS,
                                                    "batch_size": 2, "width": SIZE, "height": SIZE}).json()
    assert a1111["images"][1] == body["data"][1]["b64_json"]
    for request, field in (({"prompt": "x", "response_format": "url"}, "response_format"),
                           ({"prompt": "x", "size": "big"}, "size"), ({"prompt": "x", "n": 20}, "n"),
                           ({"prompt": "x", "size": "31x31"}, "width"), ({"prompt": ""}, "prompt")):
        refused = client.post("/v1/images/generations", json=request)
        assert refused.status_code == 422 and field in str(refused.json()["detail"][0]["loc"]), request


def test_extras_upscale_as_a1111s_extras_tab(client):
    """/upscalers lists None, Lanczos, Nearest and the shipped Real-ESRGAN models; extra-single-image and
    extra-batch-images resize by a factor or to a size (cropping the centre), Real-ESRGAN included."""
    names = [item["name"] for item in client.get("/sdapi/v1/upscalers").json()]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    photo = draw_sample_image(16)
    single = client.post("/sdapi/v1/extra-single-image", json={"image": b64_png(photo), "upscaler_1": "Lanczos",
                                                               "upscaling_resize": 2})
    assert single.status_code == 200 and decode_png(single.json()["image"]).size == (32, 32)
    assert "Postprocess upscaler: Lanczos" in single.json()["html_info"]
    cropped = client.post("/sdapi/v1/extra-single-image", json={
        "image": b64_png(photo.resize((16, 8))), "upscaler_1": "nearest", "resize_mode": 1,
        "upscaling_resize_w": 24, "upscaling_resize_h": 24}).json()
    assert decode_png(cropped["image"]).size == (24, 24)  # scaled to cover 24x24, then the centre cropped
    if "R-ESRGAN 4x+" in names:
        esrgan = client.post("/sdapi/v1/extra-batch-images", json={
            "imageList": [{"data": b64_png(photo), "name": "a"}, {"data": b64_png(photo), "name": "b"}],
            "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 4}).json()
        assert [decode_png(image).size for image in esrgan["images"]] == [(64, 64)] * 2
    unknown = client.post("/sdapi/v1/extra-single-image", json={"image": b64_png(photo), "upscaler_1": "SwinIR"})
    assert unknown.status_code == 422 and "known: None, Lanczos, Nearest" in unknown.text
    faces = client.post("/sdapi/v1/extra-single-image", json={"image": b64_png(photo), "gfpgan_visibility": 1})
    assert faces.status_code == 422 and faces.json()["detail"][0]["loc"] == ["body", "gfpgan_visibility"]


def test_hires_fix_as_a1111s_txt2img(server, client):
    """enable_hr with A1111's fields: the image at the hires size, A1111's infotext keys (Size: the first pass's),
    the same pixels as the pipeline's hires fix, and a pixel upscaler from /sdapi/v1/upscalers."""
    _, worker = server
    body = {"prompt": "a red circle", "seed": 3, "steps": STEPS, "width": SIZE, "height": SIZE, "sampler_name": "Euler",
            "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.5,
            "hr_sampler_name": "Use same sampler", "hr_prompt": "a blue circle"}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    image = decode_png(result["images"][0])
    assert image.size == (48, 48)
    info = json.loads(result["info"])
    assert (info["width"], info["height"], info["denoising_strength"]) == (SIZE, SIZE, 0.5)
    params = parse_parameters(info["infotexts"][0])
    assert (params.width, params.height, params.denoising_strength) == (SIZE, SIZE, 0.5)
    assert {key: value for key, value in params.extra.items() if key.startswith("Hires")} == {
        "Hires upscale": "1.5", "Hires steps": "2", "Hires upscaler": "Latent", "Hires prompt": "a blue circle"}
    from kedavra.pipeline.hires import HiresFix

    direct = worker.pipeline("a red circle", steps=STEPS, sampler="Euler", schedule_type="Automatic", rng="GPU",
                             guidance_scale=7, seed=3, width=SIZE, height=SIZE,
                             hires=HiresFix(scale=1.5, steps=2, strength=0.5, prompt="a blue circle")).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct))
    pixel = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "Lanczos", "hr_resize_x": 40,
                                                   "hr_resize_y": 32})
    assert pixel.status_code == 200, pixel.text
    assert decode_png(pixel.json()["images"][0]).size == (40, 32)  # covered at 40x40, the rows cropped
    assert "Hires resize: 40x32" in json.loads(pixel.json()["info"])["infotexts"][0]
    modes = client.get("/sdapi/v1/latent-upscale-modes").json()
    assert [mode["name"] for mode in modes][:2] == ["Latent", "Latent (antialiased)"] and len(modes) == 6


def test_sigma_churn_as_a1111(server, client):
    """s_churn / s_noise (request fields, or override_settings) reach A1111's Euler as Karras et al. 2022's churn,
    written as A1111's "Sigma churn" / "Sigma noise"; the same pixels as the pipeline with the same Churn."""
    from kedavra.diffusion.samplers.euler import Churn

    _, worker = server
    body = {"prompt": "a red circle", "seed": 4, "steps": 3, "width": SIZE, "height": SIZE, "sampler_name": "Euler",
            "s_churn": 1.5, "override_settings": {"s_noise": 1.01}}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    text = json.loads(response.json()["info"])["infotexts"][0]
    assert "Sigma churn: 1.5" in text and "Sigma noise: 1.01" in text and "Sigma tmax" not in text
    direct = worker.pipeline("a red circle", steps=3, sampler="Euler", schedule_type="Automatic", rng="GPU",
                             guidance_scale=7, seed=4, width=SIZE, height=SIZE,
                             churn=Churn(s_churn=1.5, s_noise=1.01)).images[0]
    assert np.array_equal(np.asarray(decode_png(response.json()["images"][0]).convert("RGB")), np.asarray(direct))
    bad = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"s_noise": "loud"}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "override_settings"]


def test_eta_reaches_a1111s_ancestral_samplers(server, client):
    """A request's eta (or override_settings.eta_ancestral) is the η of A1111's ancestral / SDE samplers, written as
    A1111's "Eta"; the same pixels as the pipeline with that eta_ancestral. Samplers without one get a note."""
    _, worker = server
    body = {"prompt": "a red circle", "seed": 4, "steps": 3, "width": SIZE, "height": SIZE, "sampler_name": "Euler a"}
    answers = [client.post("/sdapi/v1/txt2img", json={**body, **extra}).json()
               for extra in ({"eta": 0.3}, {"override_settings": {"eta_ancestral": 0.3}})]
    for answer in answers:
        assert "Eta: 0.3" in json.loads(answer["info"])["infotexts"][0]
    direct = worker.pipeline("a red circle", steps=3, sampler="Euler a", schedule_type="Automatic", rng="GPU",
                             guidance_scale=7, seed=4, width=SIZE, height=SIZE, eta_ancestral=0.3).images[0]
    for answer in answers:
        assert np.array_equal(np.asarray(decode_png(answer["images"][0]).convert("RGB")), np.asarray(direct))
    euler = client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler", "eta": 0.3}).json()
    assert "Eta" not in json.loads(euler["info"])["infotexts"][0]
