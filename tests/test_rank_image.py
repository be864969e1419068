"""The rank map picture: a row per task, a column per layer, each cell the colour of the rank chosen there."""
import numpy as np

from pipeline.more.rank_image import CELL_H, CELL_W, LABEL_W, LEGEND_H, _colour, rank_image, save_rank_image


def test_each_cell_has_its_ranks_colour(tmp_path):
    ranks = {"cola": {"l0": 1, "l1": 8, "l2": 4}, "rte": {"l0": 8, "l1": 1, "l2": 2}}
    img = rank_image(ranks, max_rank=8)
    assert img.dtype == np.uint8 and img.shape[0] == 2 * CELL_H + LEGEND_H and img.shape[2] == 3
    for row, task in enumerate(ranks):
        for col, r in enumerate(ranks[task].values()):
            cell = img[row * CELL_H + CELL_H // 2, LABEL_W + col * CELL_W + CELL_W // 2]
            assert (cell == _colour(np.array((r - 1) / 7))).all(), (task, col, r)
    assert not (_colour(np.array(0.0)) == _colour(np.array(1.0))).all()
    from PIL import Image

    path = save_rank_image(ranks, 8, tmp_path / "rank_map.png")
    assert (np.asarray(Image.open(path).convert("RGB")) == img).all()
