"""Images of every PIL mode become float RGB [3, H, W] in [0, 1], in the loader and in predict.

Each file is written with PIL from known NumPy pixels; the expected RGB values are
computed here from those pixels (not by PIL's own conversion), so a mode that PIL
converts wrongly for us (16-bit greyscale clipped to white) fails.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from minimrcnn.data import CocoInstances
from minimrcnn.data.images import read_rgb_image

HEIGHT, WIDTH = 4, 6
rng = np.random.default_rng(0)
GREY8 = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
RGB8 = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
ALPHA = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
GREY16 = np.array([0, 1, 300, 4095, 32768, 65535] * HEIGHT, dtype=np.uint16).reshape(HEIGHT, WIDTH)
CMYK = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)


def grey(values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.float64)[:, :, None], 3, axis=2)


def make(mode):
    """(PIL image, file suffix, expected float64 [H, W, 3])."""
    if mode == "1":
        bits = GREY8 > 127
        return Image.fromarray(bits), ".png", grey(bits.astype(float))
    if mode == "L":
        return Image.fromarray(GREY8, mode="L"), ".png", grey(GREY8 / 255)
    if mode == "LA":
        return Image.fromarray(np.stack([GREY8, ALPHA], axis=2), mode="LA"), ".png", grey(GREY8 / 255)
    if mode == "RGB":
        return Image.fromarray(RGB8, mode="RGB"), ".png", RGB8 / 255
    if mode == "RGBA":  # alpha dropped, colours kept even where transparent
        return Image.fromarray(np.dstack([RGB8, ALPHA]), mode="RGBA"), ".png", RGB8 / 255
    if mode == "P":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        picture = Image.fromarray(GREY8, mode="L").convert("P")
        picture.putpalette(palette.reshape(-1).tolist())
        return picture, ".png", palette[GREY8] / 255
    if mode == "CMYK":
        c, m, y, k = (CMYK[..., i].astype(np.float64) for i in range(4))
        rgb = np.stack([np.round((255 - v) * (255 - k) / 255) for v in (c, m, y)], axis=2)
        return Image.fromarray(CMYK, mode="CMYK"), ".tif", rgb / 255
    if mode == "I;16":  # 16-bit PNG, as medical and microscopy images come
        return Image.fromarray(GREY16), ".png", grey(GREY16 / 65535)
    if mode == "I;16B":
        picture = Image.frombytes("I;16B", (WIDTH, HEIGHT), GREY16.astype(">u2").tobytes())
        return picture, ".tif", grey(GREY16 / 65535)
    if mode == "I-16bit":  # 32-bit integers holding 16-bit data: divided by 65535 too
        return Image.fromarray(GREY16.astype(np.int32)), ".tif", grey(GREY16 / 65535)
    if mode == "I-wide":  # beyond 16 bits (and negative): min to max
        values = GREY16.astype(np.int32) * 3 - 1000
        return Image.fromarray(values), ".tif", grey((values - values.min()) / (values.max() - values.min()))
    if mode == "F-unit":  # float32 already in [0, 1]: kept
        values = (GREY16 / 65535).astype(np.float32)
        return Image.fromarray(values), ".tif", grey(values)
    if mode == "F-wide":  # float32 outside [0, 1]: min to max
        values = (GREY16.astype(np.float32) - 1000) / 7
        return Image.fromarray(values), ".tif", grey((values.astype(np.float64) - values.min())
                                                     / (values.max() - values.min()))
    raise AssertionError(mode)


MODES = ["1", "L", "LA", "RGB", "RGBA", "P", "CMYK", "I;16", "I;16B", "I-16bit", "I-wide", "F-unit", "F-wide"]


@pytest.fixture(params=MODES)
def image_file(request, tmp_path):
    picture, suffix, expected = make(request.param)
    path = tmp_path / f"image{suffix}"
    picture.save(path)
    with Image.open(path) as reread:  # the file really holds the mode under test
        assert reread.mode == request.param.split("-")[0]
    return path, expected


def test_read_rgb_image(image_file):
    path, expected = image_file
    image = read_rgb_image(path)
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, HEIGHT, WIDTH)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-6, rtol=0)


def test_loader_reads_every_mode(image_file, tmp_path):
    path, expected = image_file
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({
        "images": [{"id": 1, "file_name": path.name, "height": HEIGHT, "width": WIDTH}],
        "annotations": [], "categories": [{"id": 1, "name": "thing"}]}))
    dataset = CocoInstances(tmp_path, annotations)
    dataset.check_image_files()  # the header check agrees with the listed size
    image, _ = dataset[0]
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-6, rtol=0)


def test_sixteen_bit_is_not_white(tmp_path):
    """The reported case: a dim 16-bit greyscale image used to read as almost all white."""
    path = tmp_path / "dim.png"
    Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)).save(path)
    assert float(read_rgb_image(path).max()) == pytest.approx(1000 / 65535)


def test_predict_reads_every_mode_too(monkeypatch, tmp_path):
    """``predict`` goes through the same reader: a 16-bit image reaches the model scaled."""
    from minimrcnn.engine import predict

    seen = []

    class Recorder(torch.nn.Module):
        def predict(self, images):
            seen.extend(images)
            height, width = images[0].shape[-2:]
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                     "scores": torch.zeros(0), "masks": torch.zeros(0, height, width, dtype=torch.bool)}]

    from minimrcnn.config import get_config

    monkeypatch.setattr(predict, "load_model", lambda path, device: (Recorder(), get_config("shapes-cpu")))
    monkeypatch.setattr(predict, "class_names_of", lambda path, n: [str(i) for i in range(n)])
    path = tmp_path / "sixteen.png"
    Image.fromarray(GREY16).save(path)
    predict.predict_images("unused.pth", [path], tmp_path / "out", device="cpu")
    np.testing.assert_allclose(seen[0].permute(1, 2, 0).numpy(), grey(GREY16 / 65535), atol=1e-6)


def test_non_finite_float_image_is_named(tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[0.0, np.nan], [2.0, 3.0]], dtype=np.float32)).save(path)
    with pytest.raises(ValueError, match="nan.tif.*NaN"):
        read_rgb_image(path)
