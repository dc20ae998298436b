"""``raysys embed`` through Ray Data: one row per readable image with embeddings recomputed here from the files,
the sidecar's columns, corrupt files listed, a quiet console, a rerun that embeds only what is new with the
stored mean still the mean of every row, and an object-store budget smaller than the decoded dataset."""

import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import bucket_keys
from PIL import Image

from raysys.cli import main as raysys_main
from raysys.data import formats
from raysys.data.augment import to_float
from raysys.data.decode import decode_image
from raysys.distributed import embed
from raysys.distributed.console import LOG_FILE
from raysys.errors import ConfigError
from raysys.eval.search import stored_mean
from raysys.models import ContrastiveModel
from raysys.models.io import save_model

torch.set_num_threads(1)
SIZE = 16


def _jpeg(rng, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _folder(root, n: int, size: int = 24, seed: int = 0, start: int = 0):
    """``n`` JPEGs ``img<i>.jpg`` under ``root/images``; returns their ids."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (root / "images" / f"img{i:04d}.jpg").write_bytes(_jpeg(rng, size))
    return [f"img{i:04d}" for i in range(start, start + n)]


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    torch.manual_seed(0)
    model = ContrastiveModel("resnet18", width=0.125, small_stem=True)
    run = tmp_path_factory.mktemp("run")
    save_model(run / "model.pt", model.state_dict(), model.spec, {"image_size": SIZE})
    return run, model.eval()


def _reference(model, paths) -> np.ndarray:
    """The model's features of the files, decoded here one by one."""
    images = np.stack([decode_image(open(p, "rb").read(), SIZE) for p in paths])
    with torch.inference_mode():
        return model.features(to_float(torch.from_numpy(images), SIZE)).numpy()


def test_one_row_per_readable_image_then_only_new_ones(ray_session, model_run, tmp_path, s3_bucket, capfd):
    """Through --storage (the live S3-compatible test store): the workers write the parts there, a rerun reads
    what is done from there, and --out gets a copy. The first run is the real command: a few console lines,
    Ray's output in the log beside --out."""
    run, model = model_run
    root = tmp_path / "rover"
    good = _folder(root, 40)
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "truncated.jpg").write_bytes(_jpeg(np.random.default_rng(1), 64)[:300])
    with open(root / "positions.csv", "w", newline="") as f:
        rows = [[f"{name}.jpg", i * 1.5, -i, 10 * i, i % 3, i] for i, name in enumerate(good)]
        csv.writer(f).writerows([["name", "x", "y", "heading", "traverse", "frame"], *rows])
    out = tmp_path / "emb.parquet"

    shared = f"{s3_bucket}/embeddings"
    capfd.readouterr()
    assert raysys_main(["embed", "--model", str(run), "--data", str(root), "--out", str(out), "--storage", shared]) == 0
    console = capfd.readouterr()
    shown = (console.out + console.err).splitlines()
    assert len(shown) <= 10, shown
    started = next(line for line in shown if line.startswith("[raysys] embedding 42 images of"))
    assert f"Ray's own output in {tmp_path / LOG_FILE}" in started
    assert any("skipped 2 image(s)" in line for line in shown)  # raysys's warning stays on the console
    assert shown[-1] == f"embedded 40 images into {out} (0 already there)"
    # Whether Ray Data logs at all depends on what ran before in this process; none of it reaches the console
    # (the redirection itself: test_quiet_console_sends_every_write_of_the_process_to_the_log).
    assert (tmp_path / LOG_FILE).is_file() and not any("streaming_executor" in line for line in shown)
    listed = (out / embed.REPORT_DIR / "skipped-files.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in listed) == ["empty.jpg", "truncated.jpg"]

    table = pq.read_table(out).sort_by("image_id")
    assert table.column("image_id").to_pylist() == good
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), model.feature_dim)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(emb, _reference(model, table.column("path").to_pylist()), atol=1e-5)
    by_name = {r[0].removesuffix(".jpg"): r for r in rows}
    assert table.column("traverse").to_pylist() == [by_name[i][4] for i in good]
    assert table.column("x").to_pylist() == [by_name[i][1] for i in good]
    assert "label" not in table.column_names and "split" not in table.column_names  # the layout has none

    _folder(root, 3, seed=5, start=40)
    more = embed.embed_images(run, root, out, storage_uri=shared, progress=False)
    assert (more["embedded"], more["already"], len(more["skipped"])) == (3, 40, 2)
    everything = pq.read_table(out)
    assert sorted(everything.column("image_id").to_pylist()) == good + ["img0040", "img0041", "img0042"]  # each once
    stored = np.stack(everything.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float64)
    np.testing.assert_allclose(stored_mean(out), stored.mean(axis=0), rtol=1e-6, atol=1e-7)  # both runs' rows
    assert sorted(p.name for p in out.glob("part-*.parquet")) == sorted(
        k.rsplit("/", 1)[1] for k in bucket_keys(s3_bucket) if k.startswith("embeddings/part-"))


def test_object_store_budget_smaller_than_the_decoded_data(ray_session, model_run, tmp_path):
    """400 images decoded at 128 px are 18.75 MiB; Ray Data may keep only 6 MiB in the object store (blocks of
    32 decoded images: 1.5 MiB)."""
    import ray

    torch.manual_seed(1)
    model = ContrastiveModel("resnet18", width=0.125, small_stem=False)  # the standard stem: cheap at 128 px
    save_model(tmp_path / "run" / "model.pt", model.state_dict(), model.spec, {"image_size": 128})
    good = _folder(tmp_path / "big", 400, size=128)
    budget = 6 << 20
    assert len(good) * 128 * 128 * 3 > 3 * budget
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = before.copy(object_store_memory=budget)
    try:
        result = embed.embed_images(tmp_path / "run", tmp_path / "big", tmp_path / "emb.parquet", batch_size=32,
                                    progress=False)
    finally:
        ctx.execution_options.resource_limits = before
    assert result["embedded"] == 400
    assert sorted(pq.read_table(tmp_path / "emb.parquet").column("image_id").to_pylist()) == good


def test_layout_columns_and_bad_input(model_run, tmp_path):
    """An MSL-layout dataset keeps label and split, and its parts record the class names; bad input stops
    before Ray starts and leaves no log behind."""
    ds = tmp_path / "msl-labeled-data-set-v2.1"
    ids = _folder(ds, 3)
    (ds / "class_map.csv").write_text("0,soil\n1,sky\n")
    for split, i in (("train", 0), ("val", 1), ("test", 2)):
        (ds / f"{split}-set-v2.1.txt").write_text(f"{ids[i]}.jpg {i % 2}\n")
    manifest = embed.read_images(tmp_path)
    assert embed.kept_columns(manifest) == ["image_id", "path", "label", "split"]
    part = embed.embedding_table({"image_id": np.array(ids[:1]), "embedding": np.ones((1, 2), np.float32)},
                                 embed.part_metadata(manifest, "d", SIZE, model_run[0]))
    assert formats.class_names(part) == ["soil", "sky"]
    with pytest.raises(ConfigError, match="is a file"):
        embed.embed_images(model_run[0], ds, ds / "class_map.csv")
    with pytest.raises(ConfigError, match="--batch-size must be at least 1"):
        embed.embed_images(model_run[0], ds, tmp_path / "new" / "e", batch_size=0)
    assert not (ds / LOG_FILE).exists() and not (tmp_path / "new").exists()
