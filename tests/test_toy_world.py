import random

import numpy as np

from gill.eval.data import load_vist
from gill.toy import world


def test_split_keeps_test_compositions_out_of_training():
    train, test = world.split_compositions(0)
    assert train and test and not (train & test)
    assert len(train | test) == len(world.COLORS) * len(world.SHAPES)
    assert world.split_compositions(0) == (train, test)  # deterministic


def test_render_draws_the_caption():
    im = np.asarray(world.render(world.Scene("red", "square", "large", "left", "white")), dtype=int)
    left, right = im[:, :12].reshape(-1, 3), im[:, 22:].reshape(-1, 3)
    red = (left[:, 0] > 180) & (left[:, 1] < 90) & (left[:, 2] < 90)
    assert red.mean() > 0.3  # the left third is mostly the red square
    assert (np.abs(right - 245) < 10).all()  # the right is white background
    small = np.asarray(world.render(world.Scene("red", "square", "small", "left", "white")), dtype=int)
    assert ((small[..., 0] > 180) & (small[..., 1] < 90)).sum() < ((im[..., 0] > 180) & (im[..., 1] < 90)).sum()


def test_stories_refer_back_and_load_as_vist(tmp_path):
    train, _ = world.split_compositions(0)
    rng = random.Random(1)
    stories = [world.story(rng, train) for _ in range(5)]
    for steps in stories:
        assert len(steps) == 5 and steps[0][1].startswith("a ")
        assert all(caption.startswith("it ") for _, caption in steps[1:])
        assert all(scene.composition in train for scene, _ in steps)
    ann, photos = world.vist_annotations(stories)
    images = tmp_path / "images"
    images.mkdir()
    for photo, scene in photos.items():
        world.render(scene).save(images / f"{photo}.png")
    (tmp_path / "sis.json").write_text(__import__("json").dumps(ann))
    data = load_vist(tmp_path / "sis.json", images)
    assert len(data.examples) == 5 and not data.skipped
    assert data.examples[0].captions == [c for _, c in stories[0]]
