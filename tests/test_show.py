"""``show``: the HTML page and the PNG of mined tuples tell the truth."""

from __future__ import annotations

from html.parser import HTMLParser

import h5py
import numpy as np
import pytest

from conftest import synth_and_mine
from sfmpairs import SfmpairsError
from sfmpairs.show import show


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    # photos larger than a tile (200 x 150), of another aspect ratio: tiles shrink and centre them
    return synth_and_mine(
        tmp_path_factory.mktemp("show"),
        clusters=3,
        image_size=(300, 220),
        seed=1,
        points=500,
        descriptor_seed=0,
        negatives=2,
        queries_per_cluster=0,
        val_fraction=0,
        max_scale_change=3,
    )


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.stat = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td":
            self.cells.append({"role": a["class"], "name": a["data-name"], "stats": {}})
        elif tag == "img":
            self.cells[-1]["src"] = a["src"]
        elif tag == "span" and "data-key" in a:
            self.stat = a["data-key"]

    def handle_data(self, data):
        if self.stat:
            self.cells[-1]["stats"][self.stat] = float(data.split()[-1])
            self.stat = None


def test_html_references_resolve_and_statistics_match(mined, tmp_path):
    out = tmp_path / "sub" / "tuples.html"
    out.parent.mkdir()
    rows = show(mined / "pairs.h5", mined / "w", out, count=4)
    parser = _Cells()
    parser.feed(out.read_text())
    assert len(parser.cells) == sum(len(r) for r in rows) and len(rows) == 4
    with h5py.File(mined / "pairs.h5") as f:
        names = list(f["images/name"].asstr()[()])
        q, pool = f["train/query"][()], f["train/pool"][()]
        ratio, scale, dist = (f[f"train/pool_{k}"][()] for k in ("inlier_ratio", "scale_change", "distance"))
    query = None
    for cell in parser.cells:
        assert (out.parent / cell["src"]).resolve().is_file()  # relative paths work offline
        if cell["role"] == "query":
            query = names.index(cell["name"])
            continue
        r = list(q).index(query)
        slots = np.flatnonzero(pool[r] == names.index(cell["name"]))
        if cell["role"] == "positive":
            s = slots[0]
            assert cell["stats"]["inlier_ratio"] == pytest.approx(ratio[r, s], abs=1e-4)
            assert cell["stats"]["scale_change"] == pytest.approx(scale[r, s], abs=1e-4)
            assert cell["stats"]["distance"] == pytest.approx(dist[r, s], abs=1e-4)
        else:
            assert "similarity" in cell["stats"]
    one = show(mined / "pairs.h5", mined / "w", tmp_path / "one.html", query=names[q[2]])
    assert len(one) == 1 and one[0][0]["name"] == names[q[2]]
    embedded = show(mined / "pairs.h5", None, tmp_path / "e.html", embed=True, count=1)
    assert embedded and "data:image/jpeg;base64," in (tmp_path / "e.html").read_text()


def test_png_tiles_are_the_right_images(mined, tmp_path):
    """Each tile of the PNG, built here by hand: the photo shrunk by PIL's own
    thumbnail to fit 200 x 150, centred on grey; each row is a tuple of the pair file
    (read with h5py): query, its positive, its negatives."""
    from PIL import Image

    rows = show(mined / "pairs.h5", mined / "w", tmp_path / "t.png", count=3, seed=2)
    img = np.asarray(Image.open(tmp_path / "t.png").convert("RGB"))
    with h5py.File(mined / "pairs.h5") as f:
        names = f["images/name"].asstr()[()]
        q, pos, neg = f["train/query"][()], f["train/positive"][()], f["train/negatives"][()]
    h_img, h_text = 150, 58
    assert len(rows) == 3
    assert img.shape == (3 * (h_img + h_text), max(len(r) for r in rows) * 200, 3)
    for i, row in enumerate(rows):
        r = list(names[q]).index(row[0]["name"])
        assert [e["name"] for e in row] == [names[q[r]], names[pos[r]]] + [names[n] for n in neg[r] if n >= 0]
        assert [e["role"] for e in row] == ["query", "positive"] + ["negative"] * (len(row) - 2)
        for j, e in enumerate(row):
            with Image.open(mined / "w" / e["name"]) as photo:
                photo = photo.convert("RGB")
                assert photo.size == (300, 220)
                photo.thumbnail((200, 150))
            assert photo.width == 200 and photo.height < 150  # shrunk to fit, aspect kept
            expect = np.full((h_img, 200, 3), 60, np.uint8)  # grey where the photo is not
            x, y = (200 - photo.width) // 2, (h_img - photo.height) // 2
            expect[y : y + photo.height, x : x + photo.width] = np.asarray(photo)
            tile = img[i * (h_img + h_text) : i * (h_img + h_text) + h_img, j * 200 : (j + 1) * 200]
            np.testing.assert_array_equal(tile, expect, err_msg=f"row {i}, tile {j}")


def test_bad_show_input(mined, tmp_path):
    with pytest.raises(SfmpairsError, match=".png or .html"):
        show(mined / "pairs.h5", mined / "w", tmp_path / "x.jpg")
    with pytest.raises(SfmpairsError, match="not a query"):
        show(mined / "pairs.h5", mined / "w", tmp_path / "x.png", query="nope.jpg")
    with pytest.raises(SfmpairsError, match="not a pair file"):
        show(mined / "sfm.h5", mined / "w", tmp_path / "x.png")


@pytest.mark.parametrize("bad", ["../../outside.jpg", "/etc/outside.jpg", "C:\\outside.jpg"])
def test_names_that_leave_the_images_root_are_refused(mined, tmp_path, bad):
    import shutil

    pairs = tmp_path / "pairs.h5"
    shutil.copy(mined / "pairs.h5", pairs)
    with h5py.File(pairs, "r+") as f:
        f["images/name"][0] = bad
    out = tmp_path / "page.html"
    with pytest.raises(SfmpairsError) as e:
        show(pairs, mined / "w", out)
    assert str(pairs) in str(e.value) and repr(bad) in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
