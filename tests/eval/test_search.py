"""``raysys search`` against brute-force cosine similarity in numpy: the ranking, the query first, the
same-traverse rate, the command's ranking on features centred by the archive's mean (stored, or computed for
older files), class names, an outside image embedded by its model, the table and the HTML strip, bad ids."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raysys.cli import main as raysys_main
from raysys.data.augment import to_float
from raysys.data.decode import decode_image
from raysys.data.formats import META_CLASSES
from raysys.eval import search
from raysys.models import ContrastiveModel
from raysys.models.io import save_model

torch.set_num_threads(1)
N, D, K = 60, 8, 5
CLASSES = ["sand", "bedrock"]


def _write_embeddings(folder, emb: np.ndarray, traverse: np.ndarray, paths: list[str], with_sums: bool):
    """Two part files as ``raysys embed`` writes them: each footer with the class names and, unless
    ``with_sums`` is off (an older file), the part's own embedding sum."""
    folder.mkdir()
    for part, rows in enumerate((slice(0, 25), slice(25, N))):
        meta = {META_CLASSES: json.dumps(CLASSES).encode()}
        if with_sums:
            meta[search.META_SUM] = json.dumps(emb[rows].sum(axis=0, dtype=np.float64).tolist()).encode()
        table = pa.table({"image_id": [f"im{i:02d}" for i in range(N)][rows], "path": paths[rows],
                          "traverse": pa.array(traverse[rows], pa.int32()),
                          "label": pa.array(traverse[rows] % 2, pa.int32()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb[rows].reshape(-1)), D)})
        pq.write_table(table.replace_schema_metadata(meta), folder / f"part-{part}.parquet")
    return folder


@pytest.fixture
def embeddings(tmp_path):
    """60 embeddings around 4 traverse centres, all shifted one way as ReLU features are (so raw cosines crowd
    near 1), with real thumbnail files; once with the parts' sums, once as an older file without them."""
    rng = np.random.default_rng(0)
    traverse = np.arange(N) % 4
    emb = (rng.normal(0, 1, (4, D))[traverse] + rng.normal(0, 0.4, (N, D)) + 4.0).astype(np.float32)
    (tmp_path / "img").mkdir()
    paths = []
    for i in range(N):
        paths.append(str(tmp_path / "img" / f"im{i:02d}.png"))
        Image.new("RGB", (20, 20), (4 * i, 50 * traverse[i], 90)).save(paths[-1])
    new = _write_embeddings(tmp_path / "emb.parquet", emb, traverse, paths, with_sums=True)
    old = _write_embeddings(tmp_path / "old.parquet", emb, traverse, paths, with_sums=False)
    return new, emb, traverse, old


def _cosine_order(emb: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = emb @ q / (np.linalg.norm(emb, axis=1) * np.linalg.norm(q))
    return np.argsort(-sims, kind="stable"), sims


def test_neighbours_match_brute_force_cosine(embeddings):
    path, emb, traverse, _ = embeddings
    table, read = search.read_embeddings(path)
    np.testing.assert_array_equal(read, emb)
    for row in (0, 17, 59):
        rows, sims = search.nearest(read, read[row], K)
        order, ref = _cosine_order(emb, emb[row])
        assert rows[0] == row and list(rows) == list(order[:K])
        np.testing.assert_allclose(sims, ref[order[:K]], atol=1e-5)
    self_first, same = search.same_group_rate(emb, traverse, k=K)
    brute = np.mean([(traverse[_cosine_order(emb, emb[i])[0][1:K + 1]] == traverse[i]).any() for i in range(N)])
    assert self_first == 1.0 and same == pytest.approx(brute)


def test_stored_mean_is_the_mean_of_every_part(embeddings):
    path, emb, _, old = embeddings
    np.testing.assert_allclose(search.stored_mean(path), emb.astype(np.float64).mean(axis=0), rtol=1e-6)
    assert search.stored_mean(old) is None


@pytest.mark.parametrize("which", ["stored mean", "older file"])
def test_command_ranks_centred_features_prints_class_names_and_writes_the_strip(embeddings, tmp_path, capsys, which):
    path, emb, traverse, old = embeddings
    path = path if which == "stored mean" else old
    out = tmp_path / "strip.html"
    assert raysys_main(["search", "--embeddings", str(path), "--id", "im17", "-k", "8", "--html", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    if which == "older file":  # the mean computed now, said in one line
        said = lines.pop(0)
        assert said.startswith(f"[raysys] {path} stores no mean embedding") and "mean of its 60 rows" in said
    assert lines[0].split() == ["rank", "similarity", "image_id", "traverse", "label", "path"]
    centred = emb.astype(np.float64) - emb.astype(np.float64).mean(axis=0)
    order, sims = _cosine_order(centred, centred[17])
    assert list(order[:8]) != list(_cosine_order(emb, emb[17])[0][:8])  # centring changes this ranking
    shown = [line.split() for line in lines[1:9]]
    assert [cells[2] for cells in shown] == [f"im{i:02d}" for i in order[:8]]
    np.testing.assert_allclose([float(cells[1]) for cells in shown], sims[order[:8]], atol=1e-4)
    assert [cells[4] for cells in shown] == [CLASSES[traverse[i] % 2] for i in order[:8]]
    assert shown[0][:5] == ["1", "1.0000", "im17", str(traverse[17]), CLASSES[traverse[17] % 2]]
    page = out.read_text()
    assert page.count("<img src=\"data:image/png;base64,") == 9  # the query and its 8 neighbours
    assert f"label {CLASSES[traverse[17] % 2]}" in page

    assert raysys_main(["search", "--embeddings", str(path), "--id", "im99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--id 'im99' is not in the embeddings (60 images" in err[0]


def test_outside_image_is_embedded_by_the_model(embeddings, tmp_path):
    """A file the embeddings lack is embedded by --model, exactly as the model's features of that file."""
    path = embeddings[0]
    torch.manual_seed(0)
    model = ContrastiveModel("resnet18", width=0.125, small_stem=True).eval()
    save_model(tmp_path / "run" / "model.pt", model.state_dict(), model.spec, {"image_size": 16})
    image = tmp_path / "outside.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(image)
    q = search.embed_file(image, tmp_path / "run", None)
    with torch.inference_mode():
        ref = model.features(to_float(torch.from_numpy(decode_image(image.read_bytes(), 16)[None].copy()), 16))[0]
    np.testing.assert_allclose(q, ref.numpy(), atol=1e-5)
    table, emb = search.read_embeddings(path)
    got, name = search.query(table, emb, image=table.column("path")[3].as_py())  # a file the table holds
    assert name == "im03" and np.array_equal(got, emb[3])
