"""The pieces of scripts/lora_new_shape.py (docs/adapters.md, "A LoRA for the embedded model"), not its training:
the hexagon outline and the evaluator's optional candidate templates, the folder it writes, how it scores a hexagon
prompt, and the `kedavra train` command it runs."""

import argparse
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kedavra.cli import build_parser
from kedavra.commands.train import config_from_args
from kedavra.data.folder import FolderDataset, image_to_tensor
from kedavra.data.shape_drawing import OUTLINES, shape_coverage
from kedavra.data.shapes import PALETTE, SHAPES, ShapesDataset, parse_prompt
from kedavra.evaluation.shapes_eval import classify_shape, detect_objects, soft_iou

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lora_new_shape.py"
_spec = importlib.util.spec_from_file_location("lora_new_shape", SCRIPT)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def test_the_hexagon_is_an_outline_but_not_in_the_grammar():
    assert "hexagon" in OUTLINES and "hexagon" not in SHAPES
    with pytest.raises(ValueError, match="cannot parse prompt"):
        parse_prompt("a red hexagon")
    # stretched to its box, the hexagon loses four corner triangles of 1/16 of the box each: 3/4 of the box (Pillow
    # fills the polygon's edges too: 0.752 at 64 px)
    coverage = shape_coverage("hexagon", (0, 0, 64, 64), 64, 64)
    assert coverage.mean() == pytest.approx(0.75, abs=5e-3)
    # flat top and bottom: the top row is covered from x = 16 to 48 (half the width), the middle rows across
    assert coverage[0, 16:48].min() == 1.0 and coverage[0, :15].max() == 0.0 and coverage[0, 49:].max() == 0.0
    assert coverage[63, 16:48].min() == 1.0 and coverage[63, :15].max() == 0.0 and coverage[30:34, 2:62].min() == 1.0


def test_a_drawn_hexagon_is_read_as_one_when_the_hexagon_is_a_candidate():
    rng = np.random.default_rng(3)
    for spec in script.hexagon_prompts(tuple(PALETTE), per_kind=6, seed=3):
        scene = script.hexagon_scene(spec, rng)
        image = scene.render()
        found = detect_objects(image, script.CANDIDATES)
        assert [o.shape for o in found] == ["hexagon"] * len(scene.objects), script.hexagon_caption(spec)
        assert {o.colour for o in found} == {spec.objects[0].colour}
        assert all(script.score_hexagon_prompt(image, spec).values()), script.hexagon_caption(spec)
        # today's candidates by default: never a hexagon, the same detections as naming SHAPES
        assert detect_objects(image) == detect_objects(image, SHAPES)
        assert all(o.shape != "hexagon" for o in detect_objects(image))


def test_the_default_candidates_are_unchanged_on_the_data_sets_images():
    data = ShapesDataset(split="test", size=20, seed=5)
    for index in range(len(data)):
        image = data.scene(index).render()
        assert detect_objects(image) == detect_objects(image, SHAPES)
    box = (0.0, 0.0, 10.0, 10.0)
    circle = shape_coverage("circle", box, 10, 10)
    assert classify_shape(circle, box)[0] == "circle"
    assert classify_shape(circle, box, ("square", "diamond"))[0] in ("square", "diamond")  # only the candidates
    hexagon = shape_coverage("hexagon", box, 10, 10)
    assert classify_shape(hexagon, box, script.CANDIDATES) == ("hexagon", 1.0)
    assert classify_shape(hexagon, box)[0] == "circle"  # the nearest of today's templates
    assert soft_iou(hexagon, circle) > 0.85  # and a close one: what makes hexagons hard to tell from circles


@pytest.mark.parametrize("shapes", [(), ("circle", "circle"), ("circle", "octagon"), "circle"])
def test_bad_candidates_are_refused(shapes):
    with pytest.raises(ValueError, match="shapes must be a non-empty list of distinct names"):
        detect_objects(Image.new("RGB", (32, 32)), shapes)


def test_the_folder_holds_what_it_says(tmp_path):
    folder = tmp_path / "data"
    written = script.write_folder(folder, hexagons=12, grammar=5, seed=2)
    assert len(written) == 17 and len({name for name, _ in written}) == 17
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}{e}" for n, _ in written for e in (".png", ".txt"))
    colours = "|".join(script.TRAINED_COLOURS)
    hexagon = re.compile(rf"an? (?:(?:small|large) )?(?:{colours}) hexagon|(?:two|three|four) (?:{colours}) hexagons")
    assert all(hexagon.fullmatch(caption) for _, caption in written[:12])
    assert not any(c in caption for _, caption in written[:12] for c in script.HELD_OUT_COLOURS)
    data = ShapesDataset(split="train", size=5, seed=2)
    assert [caption for _, caption in written[12:]] == [data.scene(i).caption for i in range(5)]
    read = FolderDataset(folder)  # what `kedavra train --data FOLDER` reads: the same captions and pixels
    by_name = {path.stem: (path, caption) for path, caption in read.items}
    for name, caption in written:
        assert by_name[name][1] == caption
    assert (read[read.items.index(by_name["shapes_0003"])]["image"] == data[3]["image"]).all()
    for index, (name, caption) in enumerate(written[:12]):  # each hexagon image shows its caption, all hexagons
        image = Image.open(folder / f"{name}.png")
        assert (read[read.items.index(by_name[name])]["image"] == image_to_tensor(image)).all()
        words = caption.split()
        count = 1 if words[0] in ("a", "an") else ("two", "three", "four").index(words[0]) + 2
        found = detect_objects(image, script.CANDIDATES)
        assert [(o.shape, o.colour) for o in found] == [("hexagon", words[-2])] * count, (index, caption)
    assert script.write_folder(tmp_path / "again", hexagons=12, grammar=5, seed=2) == written  # reproducible
    with pytest.raises(ValueError, match="is not empty"):
        script.write_folder(folder, hexagons=1, grammar=0)


def test_a_hexagon_prompt_is_scored_on_hexagons_only():
    spec = parse_prompt("two red circles")  # the stand-in of "two red hexagons"
    assert script.hexagon_caption(spec) == "two red hexagons"
    assert script.hexagon_caption(parse_prompt("a large blue circle")) == "a large blue hexagon"
    scene = script.hexagon_scene(spec, np.random.default_rng(0))
    assert script.score_hexagon_prompt(scene.render(), spec) == {"counting": True, "colors": True}
    drawn_circles = script.prompt_to_scene(spec, np.random.default_rng(0))  # the same layout with circles
    assert script.score_hexagon_prompt(drawn_circles.render(), spec) == {"counting": False, "colors": False}


def test_the_training_command_is_a_lora_run_of_the_embedded_model(tmp_path):
    parsed = argparse.Namespace(rank=4, lora_text_encoder=True, lora_conv=False, steps=30, batch_size=8, lr=5e-4,
                                seed=1, threads=1)
    command = script.train_command(parsed, tmp_path / "data", tmp_path / "run")
    config = config_from_args(build_parser().parse_args(command))
    assert (config.init, config.lora_rank, config.lora_text_encoder, config.lora_conv) == ("kedavra-shapes", 4, True,
                                                                                          False)
    assert (config.steps, config.batch_size, config.lr, config.seed, config.stage) == (30, 8, 5e-4, 1, "unet")
    assert config.data == str(tmp_path / "data") and config.out_dir == str(tmp_path / "run")
