"""``show``: the HTML page and the PNG of mined tuples tell the truth."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest

from sfmpairs import SfmpairsError
from sfmpairs.show import TILE, _thumbnail, show

from conftest import synth_and_mine


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    return synth_and_mine(tmp_path_factory.mktemp("show"), clusters=3, image_size=(96, 72), seed=1, points=500,
                          descriptor_seed=0, negatives=2, queries_per_cluster=0, val_fraction=0,
                          max_scale_change=3)


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
    from PIL import Image

    rows = show(mined / "pairs.h5", mined / "w", tmp_path / "t.png", count=3, seed=2)
    img = np.asarray(Image.open(tmp_path / "t.png").convert("RGB")).astype(int)
    h_img = TILE * 3 // 4
    cols = max(len(r) for r in rows)
    assert img.shape[1] == cols * TILE and img.shape[0] == len(rows) * (h_img + 58)
    for i, row in enumerate(rows):
        for j, e in enumerate(row):
            tile = img[i * (h_img + 58):i * (h_img + 58) + h_img, j * TILE:(j + 1) * TILE]
            expect = np.asarray(_thumbnail(Path(mined / "w"), e["name"], TILE)).astype(int)
            assert np.abs(tile - expect).max() <= 1


def test_bad_show_input(mined, tmp_path):
    with pytest.raises(SfmpairsError, match=".png or .html"):
        show(mined / "pairs.h5", mined / "w", tmp_path / "x.jpg")
    with pytest.raises(SfmpairsError, match="not a query"):
        show(mined / "pairs.h5", mined / "w", tmp_path / "x.png", query="nope.jpg")
    with pytest.raises(SfmpairsError, match="not a pair file"):
        show(mined / "sfm.h5", mined / "w", tmp_path / "x.png")
