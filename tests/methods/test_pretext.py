"""The pretext tasks against independent references: rotation labels of a known image, patch and tile
positions read back from a coordinate image, the permutation set's Hamming distances by brute force, colour
bins of colours with published CIE Lab values; and each objective's loss and gradient on a tiny model."""

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from raysys.config import ConfigError, make_config
from raysys.distributed.trainer import check_colour
from raysys.methods import pretext as P
from raysys.methods.objectives import OBJECTIVES, ObjectiveContext, make_objective
from raysys.models import ContrastiveModel
from raysys.models.io import load_saved, save_model

torch.set_num_threads(1)
PRETEXT = [name for name, objective in OBJECTIVES.items() if not objective.contrastive]


def _coordinates(n: int, size: int) -> torch.Tensor:
    """Images whose every channel holds ``(row * size + col) / size^2``: a pixel's value names its place."""
    code = torch.arange(size * size, dtype=torch.float64).reshape(size, size) / size ** 2
    return code.expand(n, 3, size, size).clone()


def _corner(patches: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch's top-left pixel (the smallest code: any noise channel sits near the
    patch's mean, above it)."""
    code = torch.round(patches[..., 0, 0].min(-1).values * size ** 2).long()
    return code // size, code % size


def test_rotation_labels_move_a_known_pixel():
    size = 8
    x = torch.zeros(1, 3, size, size)
    x[0, :, 0, 0] = 1.0  # top-left
    rotated, labels = P.rotation_batch(x)
    # counter-clockwise by k * 90 degrees: top-left -> bottom-left -> bottom-right -> top-right
    expected = {0: (0, 0), 1: (size - 1, 0), 2: (size - 1, size - 1), 3: (0, size - 1)}
    assert labels.tolist() == [0, 1, 2, 3]
    for image, k in zip(rotated, labels.tolist()):
        assert tuple(torch.nonzero(image[0]).squeeze(0).tolist()) == expected[k]


def test_grid_corners_without_jitter_lie_on_the_grid():
    size = 32  # cells of 10 px, grid centred: 1 px margin
    tops, lefts, patch = P.grid_corners(2, size, P.JIGSAW_TILE, 0, 0)
    assert patch == 9
    assert tops[0].tolist() == [1, 1, 1, 11, 11, 11, 21, 21, 21]
    assert lefts[0].tolist() == [1, 11, 21] * 3
    patches = P.extract_patches(_coordinates(2, size), tops, lefts, patch)
    assert patches.shape == (2, 9, 3, patch, patch)
    rows, cols = _corner(patches, size)
    assert torch.equal(rows, tops) and torch.equal(cols, lefts)
    # every pixel of a patch, not only its corner: patch[i, j] is the pixel at (top + i, left + j)
    code = torch.round(patches[0, 4, 0] * size ** 2).long()
    assert torch.equal(code, (11 + torch.arange(patch))[:, None] * size + (11 + torch.arange(patch)))


def test_relative_position_pairs_are_the_centre_and_the_labelled_neighbour():
    size, n = 32, 64
    pairs, labels = P.relative_position_batch(_coordinates(n, size), torch.Generator().manual_seed(0))
    assert pairs.shape == (2 * n, 3, 7, 7)  # 2/3 of a 10 px cell
    rows, cols = _corner(pairs.reshape(n, 2, 3, 7, 7), size)
    jitter = 1
    centre = 1 + 10 + (10 - 7) // 2
    assert ((rows[:, 0] - centre).abs() <= jitter).all() and ((cols[:, 0] - centre).abs() <= jitter).all()
    cell_row, cell_col = np.divmod(np.array(P.NEIGHBOURS)[labels.numpy()], 3)
    assert ((rows[:, 1] - rows[:, 0] - torch.from_numpy(cell_row - 1) * 10).abs() <= 2 * jitter).all()
    assert ((cols[:, 1] - cols[:, 0] - torch.from_numpy(cell_col - 1) * 10).abs() <= 2 * jitter).all()
    assert len(set(labels.tolist())) == 8


def test_colour_dropping_keeps_one_channel_and_flattens_the_others():
    patches = torch.rand(50, 2, 3, 7, 7)
    dropped = P.drop_colours(patches, torch.Generator().manual_seed(1))
    kept = (dropped == patches).flatten(-2).all(-1)  # [50, 2, 3]: which channels survive unchanged
    assert (kept.sum(-1) == 1).all()
    spread = dropped.flatten(-2).std(-1)  # noise channels: 1/100 of the kept channel's spread
    assert torch.allclose(spread[~kept].reshape(50, 2, 2).max(-1).values, spread[kept].reshape(50, 2) / 100, rtol=0.6)


def test_jigsaw_tiles_follow_the_permutation_of_their_label():
    size, n = 32, 40
    perms = torch.from_numpy(P.permutation_set(10))
    generator = torch.Generator().manual_seed(0)
    cell, tile, _ = P.grid_geometry(size, P.JIGSAW_TILE)
    tops, lefts, tile = P.grid_corners(n, size, P.JIGSAW_TILE, 0, cell - tile, generator)
    labels = torch.randint(0, len(perms), (n,), generator=generator)
    tiles = P.extract_patches(_coordinates(n, size), tops.gather(1, perms[labels]), lefts.gather(1, perms[labels]), tile)
    rows, cols = _corner(tiles, size)
    grid_cell = (rows - 1) // 10 * 3 + (cols - 1) // 10  # where each puzzle tile came from
    assert torch.equal(grid_cell, perms[labels])
    shuffled, batch_labels = P.jigsaw_batch(_coordinates(n, size).float(), perms, torch.Generator().manual_seed(0))
    assert shuffled.shape == (9 * n, 3, tile, tile) and batch_labels.max() < len(perms)
    per_tile = shuffled.reshape(n * 9, -1)  # each tile normalized on its own
    assert torch.allclose(per_tile.mean(1), torch.full((n * 9,), 0.45), atol=1e-4)


def test_permutation_set_is_far_apart_by_brute_force():
    perms = P.permutation_set(100)
    assert perms.shape == (100, 9)
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    distances = [int((a != b).sum()) for a, b in itertools.combinations(perms, 2)]
    assert min(distances) >= 6  # greedy max-min over all 9! permutations reaches 6 (no two classes near-identical)
    assert np.array_equal(P.permutation_set(100), perms)  # fixed: a resumed or evaluated run sees the same classes
    with pytest.raises(ValueError, match="2..1000"):
        P.permutation_set(1)


@pytest.mark.parametrize("rgb, lab, centre", [
    ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20), (80, 70)),  # CIE Lab (D65) of the sRGB primaries, published values
    ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18), (-90, 80)),
    ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86), (80, -110)),
    ((0.5, 0.5, 0.5), (53.39, 0.0, 0.0), (0, 0)),
])
def test_known_colours_quantize_to_their_bins(rgb, lab, centre):
    x = torch.tensor(rgb, dtype=torch.float64).reshape(1, 3, 1, 1)
    assert torch.allclose(P.rgb_to_lab(x).flatten(), torch.tensor(lab, dtype=torch.float64), atol=0.02)
    bins = P.ab_bins()
    ab = P.rgb_to_lab(x.float()).flatten()[1:][None]
    nearest, _ = P.nearest_bins(ab, bins)
    assert bins[nearest[0, 0]].tolist() == list(centre)
    soft, hard = P.soft_encode(ab, bins)
    assert torch.isclose(soft.sum(), torch.tensor(1.0)) and (soft > 0).sum() == P.SOFT_NEIGHBOURS
    assert soft.argmax() == hard[0] == nearest[0, 0]


def test_ab_bins_cover_the_srgb_gamut_once():
    bins = P.ab_bins()
    assert 250 <= len(bins) <= 320  # Zhang et al. count 313 in their gamut
    assert len(torch.unique(bins, dim=0)) == len(bins) and ((bins % P.AB_GRID) == 0).all()


def test_rebalancing_favours_rare_colours_with_unit_mean():
    bins = P.ab_bins()
    counts = torch.ones(len(bins))
    counts[0] = 1000.0  # one very common colour
    kernel = P.smoothing_kernel(bins)
    w = P.rebalancing_weights(counts, kernel)
    smoothed = kernel @ (counts / counts.sum())
    assert torch.isclose((smoothed * w).sum(), torch.tensor(1.0), atol=1e-5)
    assert w[0] < w[1:].min()


def _tiny(framework: str):
    cfg = make_config("smoke", framework=framework).validate()
    objective = cfg.objective
    torch.manual_seed(0)
    model = ContrastiveModel(cfg.backbone, cfg.width, cfg.small_stem, cfg.proj_dim, cfg.proj_layers,
                             head=objective.head(cfg), gray_input=objective.gray_input)
    return cfg, model, make_objective(cfg, model, ObjectiveContext(512, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("framework", PRETEXT)
def test_pretext_objective_trains_backbone_and_head(framework, tmp_path):
    cfg, model, objective = _tiny(framework)
    loss, stats = objective.loss(torch.rand(16, 3, cfg.image_size, cfg.image_size), {})
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= float(stats["task_accuracy"]) <= 1.0
    for part in (model.backbone, model.projector):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    save_model(tmp_path / "model.pt", model.state_dict(), model.spec, cfg.to_dict())
    loaded, _ = load_saved(tmp_path / "model.pt")  # the head's spec rebuilds the same model
    x = torch.rand(4, 3, cfg.image_size, cfg.image_size)
    assert torch.allclose(loaded.features(x), model.eval().features(x))


def test_colorization_sees_luminance_only_and_keeps_its_colour_counts():
    cfg, model, objective = _tiny("colorization")
    model.eval()
    x = torch.rand(4, 3, cfg.image_size, cfg.image_size)
    weights = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma, as torchvision
    gray = ((x * weights).sum(1, keepdim=True) / weights.sum()).expand_as(x)  # no colour, the same luma
    assert torch.allclose(model.features(x), model.features(gray), atol=1e-5)  # colour dropped
    assert not torch.allclose(model.features(x), model.features(0.5 * x))  # luminance kept
    objective.loss(x, {})
    state = objective.state_dict()
    assert state["counts"].sum() == 4 * 4 * 4  # one nearest bin per predicted cell (16 px / 4)
    _, _, fresh = _tiny("colorization")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.counts, state["counts"])


def test_colorization_refuses_a_grayscale_pool(tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"g{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20), dtype=np.uint8), mode="L").save(path)
        paths.append(str(path))
    pool = pa.table({"path": paths})
    with pytest.raises(ConfigError, match="one-channel"):
        check_colour(make_config("smoke", framework="colorization"), pool)
    check_colour(make_config("smoke", framework="rotation"), pool)  # the others do not need colour
    colour = tmp_path / "c.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(colour)
    check_colour(make_config("smoke", framework="colorization"), pa.table({"path": [str(colour)]}))


def test_pretext_methods_take_no_pair_rule():
    with pytest.raises(ConfigError, match="pretext task with no pairs"):
        make_config("smoke", framework="jigsaw", pair_rule="label").validate()
    with pytest.raises(ConfigError, match="jigsaw-permutations"):
        make_config("smoke", framework="jigsaw", jigsaw_permutations=1).validate()
