"""The offline data sets: items of the contracted form, determinism from (seed, index), the held-out split,
the shapes ground truth, the caption grammar, the folder conventions with every bad input, emoji and digits."""

import gzip
import hashlib
import json
import math
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kedavra.data import DATASETS, get_dataset
from kedavra.data import digits as digits_module
from kedavra.data import emoji as emoji_module
from kedavra.data.folder import FolderDataset
from kedavra.data.shapes import (
    BACKGROUNDS,
    BORDER_MARGIN,
    MIN_CONTRAST,
    OBJECT_GAP,
    PALETTE,
    RELATION_DOMINANCE,
    ObjectSpec,
    PromptSpec,
    ShapesConfig,
    ShapesDataset,
    evaluation_prompts,
    parse_prompt,
    prompt_to_scene,
    relation_holds,
)

SHA256_MNIST = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"  # kedavra/assets/LICENSE-mnist.txt


def check_item(item, image_size):
    assert set(item) == {"image", "caption"}
    image = item["image"]
    assert image.dtype == torch.float32 and image.shape == (3, image_size, image_size)
    assert image.min() >= -1 and image.max() <= 1
    assert isinstance(item["caption"], str) and item["caption"]


# --- shapes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_shapes_items_have_the_contracted_form(image_size):
    data = get_dataset("shapes", image_size=image_size, size=20)
    assert len(data) == 20
    for index in range(20):
        check_item(data[index], image_size)
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, image_size, image_size) and len(batch["caption"]) == 4
    copy = pickle.loads(pickle.dumps(data))  # what DataLoader workers receive
    assert torch.equal(copy[3]["image"], data[3]["image"])


def test_shapes_default_sizes_and_names():
    assert DATASETS == ("shapes", "emoji", "digits")
    assert len(get_dataset("shapes")) == 50_000
    assert len(get_dataset("shapes", split="test")) == 1_000


def test_shapes_are_a_pure_function_of_seed_split_and_index():
    first, second = get_dataset("shapes", seed=3), get_dataset("shapes", seed=3)
    later = second[4_321]["image"]  # read out of order: no state carries from one item to the next
    for index in (0, 4_321, 49_999):
        assert first[index]["image"].numpy().tobytes() == second[index]["image"].numpy().tobytes()
        assert first[index]["caption"] == second[index]["caption"]
    assert torch.equal(later, first[4_321]["image"])
    assert torch.equal(first[-1]["image"], first[49_999]["image"])
    other_seed = get_dataset("shapes", seed=4)
    test = get_dataset("shapes", split="test", seed=3)
    assert [first[i]["caption"] for i in range(20)] != [other_seed[i]["caption"] for i in range(20)]
    assert [first[i]["caption"] for i in range(20)] != [test[i]["caption"] for i in range(20)]
    with pytest.raises(IndexError, match="50000"):
        first[50_000]


def test_every_caption_is_in_the_grammar_and_round_trips():
    data = get_dataset("shapes", size=400)
    kinds, canonical = set(), 0
    for index in range(400):
        caption = data[index]["caption"]
        spec = parse_prompt(caption)
        assert spec == data.spec(index) and parse_prompt(spec.caption) == spec
        canonical += spec.caption == caption
        kinds.add(spec.kind)
        assert re.fullmatch(r"[a-z0-9 ]+", caption)
    assert kinds == {"single", "count", "pair", "relation"}
    # paraphrase_probability 0.5, and a paraphrase may draw the canonical wording: well over half are canonical
    assert 200 < canonical < 330
    assert parse_prompt("An  Orange Star") == PromptSpec("single", (ObjectSpec("star", "orange"),))
    assert PromptSpec("single", (ObjectSpec("circle", "red", "large"),)).caption == "a large red circle"
    assert PromptSpec("count", (ObjectSpec("cross", "green"),), count=3).caption == "three green crosses"
    assert PromptSpec("pair", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue"))).caption == \
        "a red circle and a blue square"
    relation = PromptSpec("relation", (ObjectSpec("star", "yellow"), ObjectSpec("diamond", "purple")),
                          relation="above")
    assert relation.caption == "a yellow star above a purple diamond"
    assert parse_prompt("a circle left of a square") == PromptSpec(
        "relation", (ObjectSpec("circle"), ObjectSpec("square")), relation="left of")


def test_scenes_are_the_ground_truth_of_their_images():
    for image_size in (32, 64):
        data = ShapesDataset(ShapesConfig(image_size=image_size), split="test", size=150, seed=1)
        margin, gap = BORDER_MARGIN * image_size, OBJECT_GAP * image_size
        for index in range(150):
            scene = data.scene(index)
            spec, objects = scene.spec, scene.objects
            expected = spec.count if spec.kind == "count" else len(spec.objects)
            assert len(objects) == expected
            pixels = np.asarray(scene.render(), dtype=np.float64)
            assert torch.equal(data[index]["image"], torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)
            for obj in objects:
                x0, y0, x1, y1 = obj.bbox
                assert min(x0, y0) >= margin - 1e-9 and max(x1, y1) <= image_size - margin + 1e-9
                assert math.dist(PALETTE[obj.colour], BACKGROUNDS[scene.background]) >= MIN_CONTRAST
                x, y = obj.centre  # every shape covers the middle of its box: that pixel has the object's colour
                centre_rgb = pixels[int(y), int(x)]
                assert min(PALETTE, key=lambda c: math.dist(PALETTE[c], centre_rgb)) == obj.colour
            corner = pixels[0, 0]
            assert tuple(corner) == BACKGROUNDS[scene.background]
            for i, a in enumerate(objects):
                for b in objects[i + 1:]:
                    ax0, ay0, ax1, ay1 = a.bbox
                    bx0, by0, bx1, by1 = b.bbox
                    assert ax1 + gap <= bx0 + 1e-9 or bx1 + gap <= ax0 + 1e-9 or ay1 + gap <= by0 + 1e-9 \
                        or by1 + gap <= ay0 + 1e-9
            named = [o.colour for o in spec.objects]
            if spec.kind == "count":
                assert {o.colour for o in objects} == set(named) and {o.shape for o in objects} == {
                    spec.objects[0].shape}
            else:
                assert [o.colour for o in objects] == named
                assert [o.shape for o in objects] == [o.shape for o in spec.objects]
            if spec.kind == "relation":
                assert relation_holds(spec.relation, objects[0].centre, objects[1].centre, RELATION_DOMINANCE)
            if spec.kind == "single" and spec.objects[0].size is not None:
                assert objects[0].size == spec.objects[0].size


def test_relation_holds_by_hand():
    assert relation_holds("left of", (2, 5), (10, 6), 2.0)  # dx = -8, dy = -1
    assert not relation_holds("left of", (10, 5), (2, 6), 2.0)
    assert not relation_holds("left of", (2, 0), (10, 6), 2.0)  # dy = -6 is more than half of dx
    assert relation_holds("above", (5, 1), (6, 9), 2.0) and relation_holds("below", (6, 9), (5, 1), 2.0)
    assert relation_holds("right of", (9, 5), (1, 5), 2.0)


def test_train_never_shows_held_out_combinations_and_test_does():
    config = ShapesConfig()
    colours, pairs = config.held_out_colours(), config.held_out_pairs()
    assert colours == {("circle", "orange"), ("square", "yellow"), ("triangle", "green"), ("star", "blue"),
                       ("cross", "purple"), ("diamond", "pink")}
    assert pairs == {frozenset(p) for p in (("circle", "star"), ("square", "cross"), ("triangle", "diamond"))}
    train = ShapesDataset(config, size=1_500)
    for index in range(1_500):
        scene = train.scene(index)
        assert not any((o.shape, o.colour) in colours for o in scene.objects)
        assert frozenset(o.shape for o in scene.objects) not in pairs  # (a count scene's set has one shape)
        assert not config.is_held_out(scene.spec)
    test = ShapesDataset(config, split="test", size=600)
    held = sum(config.is_held_out(test.spec(i)) for i in range(600))
    assert 0.1 * 600 < held < 0.5 * 600  # the test split mixes seen and held-out prompts
    unrestricted = ShapesDataset(ShapesConfig(hold_out=False), size=600)
    assert any(config.is_held_out(unrestricted.spec(i)) for i in range(600))
    held_prompts = evaluation_prompts(per_kind=10, held_out=True)
    assert len(held_prompts) == 40 and all(config.is_held_out(p) for p in held_prompts)
    seen_prompts = evaluation_prompts(per_kind=10, held_out=False)
    assert not any(config.is_held_out(p) for p in seen_prompts)
    assert evaluation_prompts(per_kind=10, seed=5) == evaluation_prompts(per_kind=10, seed=5)


def test_prompt_to_scene_realises_any_prompt_reproducibly():
    scene = prompt_to_scene("four orange circles", np.random.default_rng(0))
    assert [(o.shape, o.colour) for o in scene.objects] == [("circle", "orange")] * 4
    again = prompt_to_scene("four orange circles", np.random.default_rng(0))
    assert again == scene and again.render().tobytes() == scene.render().tobytes()
    open_colours = prompt_to_scene("a star below a cross", np.random.default_rng(1))
    assert [o.shape for o in open_colours.objects] == ["star", "cross"]
    assert all(o.colour in PALETTE for o in open_colours.objects)
    with pytest.raises(ValueError, match="at most 2"):
        prompt_to_scene("three red stars", np.random.default_rng(0), ShapesConfig(max_objects=2))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"image_size": 8}, "image_size must be an integer (smaller shapes are unreadable) >= 16"),
    ({"image_size": 32.0}, "image_size"),
    ({"shapes": ("circle", "hexagon")}, "unknown shape 'hexagon'"),
    ({"colours": ("red", "teal")}, "unknown colour 'teal'"),
    ({"colours": ()}, "colours must be a non-empty"),
    ({"shapes": "circle"}, "shapes must be a sequence"),
    ({"backgrounds": ("white",), "colours": ("white", "red")}, "no background"),
    ({"max_objects": 5}, "max_objects must be an integer from 1 to 4"),
    ({"max_objects": 1}, "allows only 'single'"),
    ({"kind_weights": (0.5, 0.5, 0.5, 0.5)}, "summing to 1"),
    ({"kind_weights": (1.0,)}, "kind_weights"),
    ({"shapes": ("circle",)}, "two-object prompts need at least two shapes"),
    ({"size_word_probability": 1.5}, "size_word_probability"),
])
def test_shapes_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ShapesConfig(**kwargs)


def test_prompt_specs_and_parsing_reject_bad_input():
    with pytest.raises(ValueError, match="cannot parse prompt 'a red hexagon'"):
        parse_prompt("a red hexagon")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_prompt("five red circles")
    with pytest.raises(ValueError, match="need different shapes"):
        PromptSpec("pair", (ObjectSpec("circle", "red"), ObjectSpec("circle", "blue")))
    with pytest.raises(ValueError, match="count must be an integer from 2 to 4"):
        PromptSpec("count", (ObjectSpec("circle"),), count=1)
    with pytest.raises(ValueError, match="unknown relation 'behind'"):
        PromptSpec("relation", (ObjectSpec("circle"), ObjectSpec("square")), relation="behind")
    with pytest.raises(ValueError, match="only 'single' prompts name a size"):
        PromptSpec("pair", (ObjectSpec("circle", size="large"), ObjectSpec("square")))
    with pytest.raises(ValueError, match="unknown prompt kind"):
        PromptSpec("scene", (ObjectSpec("circle"),))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: get_dataset("cifar"), "unknown data set 'cifar'"),
    (lambda: get_dataset("shapes", split="val"), "unknown split 'val'; allowed: train, test"),
    (lambda: get_dataset("shapes", image_size=0), "image_size must be an integer >= 1, got 0"),
    (lambda: get_dataset("shapes", image_size=-32), "got -32"),
    (lambda: get_dataset("shapes", image_size=12),
     "image_size must be an integer (smaller shapes are unreadable) >= 16"),
    (lambda: get_dataset("shapes", image_size=True), "got True"),
    (lambda: get_dataset("shapes", colour="red"), "unknown option(s) ['colour'] for data set 'shapes'"),
    (lambda: get_dataset("shapes", size=0), "size must be an integer >= 1"),
    (lambda: get_dataset("shapes", seed=-1), "seed must be an integer >= 0"),
    (lambda: get_dataset("digits", size=10), "unknown option(s) ['size'] for data set 'digits'"),
])
def test_get_dataset_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# --- folder ---------------------------------------------------------------------------------------------------

def save(path, size=(40, 30), colour=(200, 10, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def snapshot(root):
    return {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_folder_with_metadata_jsonl(tmp_path):
    save(tmp_path / "a.png", (40, 30))
    save(tmp_path / "sub" / "b.jpg", (17, 64), (10, 200, 10))
    save(tmp_path / "c.png", (8, 8), (0, 0, 255, 0), mode="RGBA")  # fully transparent: white after flattening
    save(tmp_path / "d.webp", (33, 33), 90, mode="L")
    records = [{"file_name": "a.png", "text": "a red thing"}, {"file_name": "sub/b.jpg", "text": " green "},
               {"file_name": "c.png", "text": "nothing"}, {"file_name": "d.webp", "text": "grey", "extra": 1}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    before = snapshot(tmp_path)
    data = get_dataset(str(tmp_path), image_size=16)
    assert isinstance(data, FolderDataset) and len(data) == 4
    by_caption = {data[i]["caption"]: data[i]["image"] for i in range(4)}
    assert set(by_caption) == {"a red thing", "green", "nothing", "grey"}
    for image in by_caption.values():
        check_item({"image": image, "caption": "x"}, 16)
    assert torch.allclose(by_caption["nothing"], torch.ones(3, 16, 16))
    assert torch.allclose(by_caption["a red thing"][:, 8, 8], torch.tensor([200, 10, 10]) / 127.5 - 1, atol=0.02)
    assert torch.allclose(by_caption["grey"], torch.full((3, 16, 16), 90 / 127.5 - 1), atol=0.02)
    assert snapshot(tmp_path) == before  # read-only


def test_folder_with_caption_files_and_splits(tmp_path):
    for split in ("train", "test"):
        for stem in ("x", "y"):
            save(tmp_path / split / f"{stem}.png")
            (tmp_path / split / f"{stem}.txt").write_text(f"{split} {stem}\n", encoding="utf-8")
    train, test = get_dataset(tmp_path, image_size=8), get_dataset(tmp_path, split="test", image_size=8)
    assert [train[i]["caption"] for i in range(2)] == ["train x", "train y"]
    assert [test[i]["caption"] for i in range(2)] == ["test x", "test y"]
    flat = tmp_path / "train"
    with pytest.raises(ValueError, match="holds only the train split"):
        FolderDataset(flat, split="test")


def test_folder_lists_unreadable_and_uncaptioned_images(tmp_path):
    save(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("x")
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    (tmp_path / "garbage.txt").write_text("x")
    save(tmp_path / "nocaption.png")
    save(tmp_path / "blank_caption.png")
    (tmp_path / "blank_caption.txt").write_text("  \n")
    (tmp_path / ".hidden.png").write_bytes(b"")  # hidden files are not looked at
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as error:
        FolderDataset(tmp_path)
    message = str(error.value)
    assert "2 unreadable or empty image(s): empty.png, garbage.jpg" in message
    assert "2 image(s) without a caption (no non-empty <stem>.txt beside it): blank_caption.png, nocaption.png" \
        in message
    assert "skip_bad=True" in message
    with pytest.warns(UserWarning, match="leaving out 2 unreadable"):
        data = get_dataset(tmp_path, skip_bad=True)
    assert len(data) == 1 and data[0]["caption"] == "fine"
    assert snapshot(tmp_path) == before


def test_folder_names_the_bad_metadata_line(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    metadata = tmp_path / "metadata.jsonl"
    cases = [
        ('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "ok"\n', "line 2 is not JSON"),
        ('{"file_name": "a.png"}\n', "line 1 lacks a string 'text' field"),
        ('["a.png", "text"]\n', "line 1 must be a JSON object"),
        ('{"file_name": "a.png", "text": "x"}\n\n{"file_name": "zz.png", "text": "x"}\n',
         "line 3: file_name 'zz.png' does not exist"),
        ('{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "y"}\n', "line 2: file_name 'a.png' "
                                                                                      "is listed twice"),
        ('{"file_name": "../a.png", "text": "x"}\n', "outside the folder"),
        ('{"file_name": "a.png", "text": "x"}\n', "1 image(s) without a caption (no line in metadata.jsonl): b.png"),
    ]
    for text, message in cases:
        metadata.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            FolderDataset(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    metadata.write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", "text": "y"}\n'
                        '{"file_name": "notes.txt", "text": "z"}\n')
    with pytest.raises(ValueError, match=re.escape("lists 1 file(s) that are not images")):
        FolderDataset(tmp_path)


def test_folder_rejects_missing_or_empty_folders_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        FolderDataset(tmp_path)
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        FolderDataset(tmp_path / "nowhere")
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="a.txt is not UTF-8"):
        FolderDataset(tmp_path)
    (tmp_path / "a.txt").write_text("ok")
    with pytest.raises(ValueError, match="image_size must be an integer >= 1, got 0"):
        FolderDataset(tmp_path, image_size=0)
    with pytest.raises(ValueError, match=re.escape("unknown option(s) ['size'] for data set 'folder'")):
        get_dataset(tmp_path, size=3)


def test_folder_reports_an_image_that_fails_to_decode(tmp_path):
    path = save(tmp_path / "a.png", (64, 64))
    (tmp_path / "a.txt").write_text("cut short")
    data = FolderDataset(tmp_path)
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixel data cut off after the check
    with warnings.catch_warnings(), pytest.raises(ValueError, match="cannot decode image .*a.png"):
        warnings.simplefilter("ignore")
        data[0]


# --- emoji ----------------------------------------------------------------------------------------------------

needs_font = pytest.mark.skipif(not emoji_module.NOTO_EMOJI_FONT.is_file(),
                                reason=f"Noto Color Emoji is not installed ({emoji_module.INSTALL_COMMAND})")


@needs_font
def test_emoji_items_and_captions():
    train, test = get_dataset("emoji"), get_dataset("emoji", split="test", image_size=64)
    assert len(train) > 1_000 and len(test) == (len(train) + len(test)) // emoji_module.TEST_EVERY
    assert not set(train.codes) & set(test.codes)
    captions = {emoji_module.caption(c) for c in train.codes + test.codes}
    assert {"watermelon", "face with tears of joy", "red apple"} <= captions
    for data, size in ((train, 32), (test, 64)):
        for index in (0, len(data) // 2, len(data) - 1):
            item = data[index]
            check_item(item, size)
            assert item["caption"] == item["caption"].lower()
            assert (item["image"] < 0.5).any()  # something drawn on the white background
            assert item["image"][:, 0, 0].min() > 0.8  # the corner is (nearly) background
    assert pickle.loads(pickle.dumps(test))[5]["caption"] == test[5]["caption"]
    watermelon = train.codes.index(0x1F349)
    assert train[watermelon]["caption"] == "watermelon"
    red = get_dataset("emoji", background=(255, 0, 0))[0]["image"][:, 0, 0]
    assert torch.allclose(red, torch.tensor([1.0, -1.0, -1.0]), atol=0.2)


def test_emoji_without_the_font_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("apt-get install -y fonts-noto-color-emoji")):
        get_dataset("emoji", font_path=str(tmp_path / "missing.ttf"))
    with pytest.raises(ValueError, match="background must be an RGB triple"):
        emoji_module.EmojiDataset(background=(300, 0, 0))


# --- digits ---------------------------------------------------------------------------------------------------

def test_vendored_mnist_is_the_documented_file():
    raw = digits_module.MNIST_FILE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SHA256_MNIST
    assert gzip.decompress(raw).count(b"\n") == 5_000


def test_digits_split_items_and_captions():
    train, test = get_dataset("digits"), get_dataset("digits", split="test", image_size=28)
    assert (len(train), len(test)) == (4_500, 500)
    assert not set(train.rows) & set(test.rows)
    assert np.bincount([test.label(i) for i in range(500)]).tolist() == [50] * 10  # not the file's last 500 nines
    for data, size in ((train, 32), (test, 28)):
        for index in (0, 123, len(data) - 1):
            item = data[index]
            check_item(item, size)
            assert item["caption"] == f"a handwritten digit {digits_module.DIGIT_WORDS[data.label(index)]}"
            image = item["image"]
            assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey, as RGB
            assert image[:, 0, 0].tolist() == [-1.0] * 3 and image.max() > 0.9  # white strokes on black
    images, _ = digits_module.load_mnist()
    raw = test[0]["image"][0]
    assert torch.equal(raw, torch.from_numpy(images[test.rows[0]]).float() / 127.5 - 1)  # 28 px: untouched
    assert train[0]["caption"] == "a handwritten digit zero" and test[499]["caption"] == "a handwritten digit nine"
