import numpy as np
import pytest
from PIL import Image

from edgecl.data import load_image_folder, load_npz, load_source
from edgecl.errors import UserError


def test_npz_source(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 8, 8), np.uint8), y=np.array(["cat", "dog", "cat"]))
    x, y = load_source(str(path))
    assert x.shape == (3, 1, 8, 8) and y == ["cat", "dog", "cat"]


@pytest.mark.parametrize("arrays,message", [
    (dict(x=np.zeros((2, 4, 4), np.uint8)), "needs arrays 'x' and 'y'"),
    (dict(x=np.zeros((2, 4, 4), np.int16), y=np.arange(2)), "uint8 or float32"),
    (dict(x=np.zeros((2, 4, 4), np.uint8), y=np.arange(3)), "one label per sample"),
    (dict(x=np.zeros((2, 4), np.uint8), y=np.arange(2)), "(N, C, H, W)"),
])
def test_bad_npz_is_a_clear_error(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_npz(path)


def test_image_folder_source(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((6, 5), i * 50 + (label == "b") * 100, np.uint8)).save(
                tmp_path / label / f"{i}.png")
    x, y = load_image_folder(tmp_path)
    assert x.shape == (4, 1, 6, 5) and x.dtype == np.uint8
    assert y == ["a", "a", "b", "b"]
    assert x[3, 0, 0, 0] == 150


def test_unknown_source_names_the_choices(tmp_path):
    with pytest.raises(UserError, match="mnist5k"):
        load_source("nonsense")
    with pytest.raises(UserError, match="no such file"):
        load_source(str(tmp_path / "missing.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_source(str(tmp_path / "empty"))
