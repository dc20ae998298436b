"""``raysys search`` against brute-force cosine similarity in numpy: the ranking, the query first, the
same-traverse rate, an outside image embedded by its model, the table and the HTML strip, bad ids."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raysys.cli import main as raysys_main
from raysys.data.augment import to_float
from raysys.data.decode import decode_image
from raysys.eval import search
from raysys.models import ContrastiveModel
from raysys.models.io import save_model

torch.set_num_threads(1)
N, D, K = 60, 8, 5


@pytest.fixture
def embeddings(tmp_path):
    """60 embeddings around 4 traverse centres, with real thumbnail files, as ``raysys embed`` writes them."""
    rng = np.random.default_rng(0)
    traverse = np.arange(N) % 4
    emb = (rng.normal(0, 1, (4, D))[traverse] + rng.normal(0, 0.4, (N, D))).astype(np.float32)
    (tmp_path / "img").mkdir()
    paths = []
    for i in range(N):
        paths.append(str(tmp_path / "img" / f"im{i:02d}.png"))
        Image.new("RGB", (20, 20), (4 * i, 50 * traverse[i], 90)).save(paths[-1])
    table = pa.table({"image_id": [f"im{i:02d}" for i in range(N)], "path": paths,
                      "traverse": pa.array(traverse, pa.int32()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), D)})
    (tmp_path / "emb.parquet").mkdir()
    pq.write_table(table, tmp_path / "emb.parquet" / "part-0.parquet")
    return tmp_path / "emb.parquet", emb, traverse


def _cosine_order(emb: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = emb @ q / (np.linalg.norm(emb, axis=1) * np.linalg.norm(q))
    return np.argsort(-sims, kind="stable"), sims


def test_neighbours_match_brute_force_cosine(embeddings):
    path, emb, traverse = embeddings
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


def test_command_prints_the_table_and_writes_the_strip(embeddings, tmp_path, capsys):
    path, emb, traverse = embeddings
    out = tmp_path / "strip.html"
    assert raysys_main(["search", "--embeddings", str(path), "--id", "im17", "-k", "4", "--html", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "similarity", "image_id", "traverse", "path"]
    order, _ = _cosine_order(emb, emb[17])
    assert [line.split()[2] for line in lines[1:5]] == [f"im{i:02d}" for i in order[:4]]
    assert lines[1].split()[:4] == ["1", "1.0000", "im17", str(traverse[17])]
    page = out.read_text()
    assert page.count("<img src=\"data:image/png;base64,") == 5  # the query and its 4 neighbours

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
