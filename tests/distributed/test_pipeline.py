"""The Ray Data two-view pipeline and the decoder behind it, on good and deliberately broken files."""

import io

import numpy as np
import pytest
from helpers import batch_mean_tolerance, same_class_share
from PIL import Image

from raysys.config import make_config
from raysys.data.decode import DecodeError, decode, decode_image
from raysys.data.formats import read_folder
from raysys.data.schema import image_key

SIZE = 16


def _jpeg_bytes(rng, size=24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """10 ordinary JPEGs, 3 unusual-but-valid images, and 3 unreadable files."""
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    good = []
    for i in range(10):
        (root / f"good{i:02d}.jpg").write_bytes(_jpeg_bytes(rng))
        good.append(f"good{i:02d}")
    deep = (np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 160).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep16.png")  # 16-bit grayscale PNG
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(root / "alpha.png")
    odd = ["deep16", "cmyk", "alpha"]
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(_jpeg_bytes(rng, 64)[:400])
    (root / "notes.png").write_text("this is not a picture\n")
    bad = ["empty.jpg", "truncated.jpg", "notes.png"]
    return root, good + odd, odd, bad


def test_decode_converts_unusual_modes(messy_folder):
    root = messy_folder[0]
    deep, mode = decode((root / "deep16.png").read_bytes(), 20)
    assert mode.startswith("I") and deep.dtype == np.uint8 and deep.shape == (20, 20, 3)
    source = np.asarray(Image.open(root / "deep16.png"), dtype=np.float64)
    # 16-bit range scaled to 8 bits, not clipped: the brightest pixel maps near 255 * max / 65535.
    assert abs(deep.max() - 255 * source.max() / 65535) <= 1
    cmyk = decode_image((root / "cmyk.jpg").read_bytes(), 8)
    assert np.allclose(cmyk.mean(axis=(0, 1)), [255, 0, 0], atol=8)  # C=0,M=Y=255 is red
    alpha = decode_image((root / "alpha.png").read_bytes(), 8)
    assert np.allclose(alpha[0, 0], [128, 0, 0], atol=2)  # half-transparent red over black
    for name in messy_folder[3]:
        with pytest.raises(DecodeError):
            decode_image((root / name).read_bytes(), 8)


def test_pipeline_skips_and_reports_bad_files(ray_session, messy_folder, tmp_path):
    from raysys.data.augment import AugmentConfig
    from raysys.distributed.pipeline import (
        FileReport,
        decoded_dataset,
        two_view_dataset,
        write_file_report,
    )

    root, good, odd, bad = messy_folder
    manifest = read_folder(root)
    report = FileReport.remote()
    decoded = decoded_dataset(manifest, SIZE, report, cache=True)
    ds = two_view_dataset(decoded, AugmentConfig(size=SIZE))
    epochs = [ds.take_all() for _ in range(2)]

    expected_ids = sorted(image_key(name) for name in good)
    for rows in epochs:
        assert sorted(int(r["image_id"]) for r in rows) == expected_ids
        for r in rows:  # uint8 views: the worker makes them floats on its device
            assert r["view1"].shape == (3, SIZE, SIZE) and r["view1"].dtype == np.uint8
    first = {int(r["image_id"]): r for r in epochs[0]}
    second = {int(r["image_id"]): r for r in epochs[1]}
    # Noise images only: a flat-colour image (alpha, CMYK) is unchanged by crop and flip, so its two views
    # coincide whenever neither is colour-jittered -- a few percent of draws.
    textured = [image_key(name) for name in good[:10]]
    assert all(not np.allclose(first[k]["view1"], first[k]["view2"]) for k in textured), "the two views must differ"
    fresh = [not np.allclose(first[k]["view1"], second[k]["view1"]) for k in textured]
    assert all(fresh), "every epoch must draw fresh views"

    notes = write_file_report(report, tmp_path)
    assert sorted(p.split("/")[-1] for p, _ in notes["skipped"]) == sorted(bad)
    assert sorted(p.split("/")[-1].split(".")[0] for p, _ in notes["converted"]) == sorted(odd)
    listed = (tmp_path / "skipped-files.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[0].split("/")[-1] for line in listed) == sorted(bad)



def test_training_batches_mix_traverses_like_iid_draws(ray_session, tmp_path):
    """The training stream of a pool listed frame by frame along its traverses, as training builds it (blocks
    sized for the session's CPUs, the smoke preset's shuffle buffer): over many batches, the share of
    same-class pairs matches draws without replacement from the pool, within four standard errors.
    Under-mixed batches would sit far above it."""
    from raysys.data.sources import resolve_data
    from raysys.distributed.pipeline import pretrain_dataset, train_batches

    cfg = make_config("smoke", builtin_root=str(tmp_path / "builtin"), image_size=8, max_images=None)
    # Worst case: frames in capture order, as a rover archive sorted by sol would list them.
    manifest = resolve_data(cfg)[0].sort_by([("traverse", "ascending"), ("frame", "ascending")])
    labels = manifest.column("label").to_numpy()
    expected = same_class_share(labels)
    assert np.mean(labels[1:] == labels[:-1]) > 2 * expected, "the pool must list traverses together"
    stream = pretrain_dataset(manifest, cfg.augment_config, cfg.image_size, cache=True, seed=0)
    measured = [same_class_share(b["label"].numpy()) for _ in range(40)
                for b in train_batches(stream, cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer)]
    tolerance = batch_mean_tolerance(labels, cfg.batch_size, len(measured))
    assert abs(np.mean(measured) - expected) < tolerance, (np.mean(measured), expected, tolerance, len(measured))


def test_blocks_give_every_cpu_several_tasks():
    from raysys.distributed.pipeline import BATCH_ROWS, BLOCKS_PER_CPU, MIN_BLOCK_ROWS, block_count

    for rows, cpus in [(4096, 16), (4096, 2), (100_000, 16), (512, 8), (40, 8), (5, 2)]:
        blocks = block_count(rows, cpus)
        per_block = rows / blocks
        assert per_block <= BATCH_ROWS or blocks == 1
        # several blocks per CPU unless that would make blocks under MIN_BLOCK_ROWS rows
        assert blocks >= BLOCKS_PER_CPU * cpus or per_block < 2 * MIN_BLOCK_ROWS, (rows, cpus, blocks)
    assert block_count(4096, 16) == 64  # the case: 4 blocks of 1,024 rows gave 4 augment tasks


# Its own Ray with 8 logical CPUs (the session's has 2): the training stream, decode cached, two epochs (the
# first starts the 8 worker processes); prints how many augment tasks ran at once in the second, from Ray
# Data's own stats.
_LOGICAL_CPUS = """
import sys, ray
from raysys.data.augment import AugmentConfig
from raysys.data.formats import read_folder
from raysys.distributed.pipeline import peak_tasks, pretrain_dataset
ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
ds = pretrain_dataset(read_folder(sys.argv[1]), AugmentConfig(size=32), 32, cache=True, decode_size=48)
for _ in range(2):
    rows = sum(len(b["view1"]) for b in ds.iter_batches(batch_size=256))
print("rows", rows, "at once", peak_tasks(ds, "two_views_batch"))
"""


@pytest.mark.e2e
def test_augment_stage_runs_a_task_per_logical_cpu(tmp_path):
    """With ``ray.init(num_cpus=8)`` on this machine, the augment stage runs at least 6 tasks at once: the blocks
    and the compact views leave nothing but CPUs to limit it (4,096 rows came as 4 blocks, 4 tasks at most)."""
    import subprocess
    import sys

    rng = np.random.default_rng(1)
    for i in range(2048):
        (tmp_path / f"{i:04d}.jpg").write_bytes(_jpeg_bytes(rng, 48))
    run = subprocess.run([sys.executable, "-c", _LOGICAL_CPUS, str(tmp_path)], capture_output=True, text=True,
                         timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    words = run.stdout.split()
    rows, at_once = int(words[words.index("rows") + 1]), int(words[words.index("once") + 1])
    assert rows == 2048 and at_once >= 6, run.stdout
