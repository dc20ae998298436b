"""Bad input, table-driven: every case stops with exit code 2 and one line naming the problem and the fix,
and an existing run folder is left exactly as it was."""

import hashlib
import runpy
from pathlib import Path

import pytest
from helpers import REPO
from PIL import Image

from raysys.cli import main as raysys_main
from raysys.distributed.sweep import main as sweep_main


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 7 % 256, 90, 30)).save(folder / f"img{i:03d}.png")
    return folder


def _msl_with_bad_class(root: Path) -> Path:
    ds = root / "msl-labeled-data-set-v2.1"
    _images(ds / "images", 3)
    (ds / "class_map.csv").write_text("0,soil\n1,sky\n")
    (ds / "train-set-v2.1.txt").write_text("img000.png 0\nimg001.png 7\n")
    (ds / "val-set-v2.1.txt").write_text("img002.png 1\n")
    (ds / "test-set-v2.1.txt").write_text("img002.png 1\n")
    return root


def _rover_missing_y(root: Path) -> Path:
    _images(root / "images", 4)
    (root / "positions.csv").write_text("name,x\nimg000.png,1.0\n")
    return root


def _partial_cluster_ids(root: Path) -> Path:
    _images(root, 40)
    table = root.parent / "clusters.csv"
    table.write_text("image_id,cluster_id\n" + "".join(f"img{i:03d},{i % 3}\n" for i in range(30)))
    return table


# (what is wrong, command, extra setup -> extra argv, expected words in the one line)
CASES = [
    ("K < 2", "sweep_k", lambda t: ["--k", "1"], "--k values must be at least 2"),
    ("K above the pool", "sweep_k", lambda t: ["--k", "100000"], "exceed the"),
    ("temperature 0", "pretrain", lambda t: ["--temperature", "0"], "--temperature must be > 0"),
    ("mix ratio 1.5", "pretrain", lambda t: ["--mix-ratio", "1.5"], "--mix-ratio must be in [0, 1]"),
    ("batch of 1", "pretrain", lambda t: ["--batch-size", "1"], "--batch-size must be at least 2"),
    ("batch above the dataset", "pretrain", lambda t: ["--data", str(_images(t / "small", 10)), "--batch-size", "64"],
     "fewer than one batch"),
    ("unknown backbone", "pretrain", lambda t: ["--backbone", "vgg11"], "--backbone 'vgg11' is unknown"),
    ("unknown preset", "pretrain", lambda t: ["--preset", "huge"], "--preset 'huge' is unknown"),
    ("unknown sweep preset", "sweep_k", lambda t: ["--preset", "huge"], "--preset 'huge' is unknown"),
    ("no workers", "pretrain", lambda t: ["--workers", "0"], "--workers must be at least 1"),
    ("GPUs on a CPU cluster", "pretrain", lambda t: ["--gpus-per-worker", "1"], "needs 1 GPU(s) but the cluster has at most 0"),
    ("unknown storage scheme", "pretrain", lambda t: ["--storage", "ftp://host/x"], "unknown scheme 'ftp://'"),
    ("unknown storage scheme (sweep)", "sweep_k", lambda t: ["--storage", "ftp://host/x"], "unknown scheme 'ftp://'"),
    ("missing bucket", "pretrain", lambda t: ["--storage", "s3://no-such-bucket/run"],
     "bucket 'no-such-bucket' does not exist; create it"),
    ("missing bucket (sweep)", "sweep_k", lambda t: ["--storage", "s3://no-such-bucket/sweep"],
     "bucket 'no-such-bucket' does not exist; create it"),
    ("missing dataset", "pretrain", lambda t: ["--data", str(t / "nowhere")], "does not exist"),
    ("empty dataset", "pretrain", lambda t: ["--data", str((t / "empty").resolve())] if (t / "empty").mkdir() is None else [],
     "is empty"),
    ("class id outside the class map", "pretrain", lambda t: ["--data", str(_msl_with_bad_class(t / "msl"))],
     "class id 7 is not in"),
    ("positions sidecar without y", "pretrain", lambda t: ["--data", str(_rover_missing_y(t / "rover"))], "header row lacks"),
    ("cluster ids not covering the pool", "pretrain",
     lambda t: ["--data", str(t / "pool"), "--pair-rule", "cluster", "--cluster-ids", str(_partial_cluster_ids(t / "pool")),
                "--batch-size", "8"], "covers 30 of 40 pool images"),
    ("cluster rule without ids", "pretrain", lambda t: ["--data", str(_images(t / "pool2", 20)), "--pair-rule", "cluster",
                                                        "--batch-size", "8"], "pass --cluster-ids FILE"),
    ("self-clustering without the cluster rule", "pretrain", lambda t: ["--self-cluster-k", "4"],
     "--self-cluster-k 4: self-clustering needs K >= 2 and --pair-rule cluster"),
    ("self-clustering never reached", "pretrain", lambda t: ["--pair-rule", "cluster", "--self-cluster-k", "4",
                                                             "--self-cluster-warmup", "2", "--epochs", "2"],
     "--self-cluster-warmup 2 must be below the run's 2 epoch(s)"),
    ("no step budget", "pretrain", lambda t: ["--max-steps", "0"], "--max-steps must be at least 1"),
    ("fnc under MoCo", "pretrain", lambda t: ["--pair-rule", "fnc", "--framework", "moco"],
     "--pair-rule fnc detects within the batch's views, which --framework moco lacks"),
    ("fnc with no candidate", "pretrain", lambda t: ["--pair-rule", "fnc", "--fnc-k", "0"], "--fnc-k must be at least 1"),
    ("confident clusters accepting none", "pretrain", lambda t: ["--self-cluster-accept", "0"],
     "--self-cluster-accept 0.0 must be a share in (0, 1]"),
    ("noisy oracle at no steps", "fn_precision", lambda t: ["--steps", "0"], "--steps and --eval-every must be at least 1"),
    ("study without steps", "fn_study", lambda t: ["--steps", "0"], "--steps and --eval-every must be at least 1"),
    ("study with --decoupled", "fn_study", lambda t: ["--decoupled"], "drop --decoupled"),
    ("unknown clustering encoder", "sweep_k", lambda t: ["--encoder", "nosuch"], "--encoder nosuch: no such file"),
    ("two-stage without baselines", "sweep_k", lambda t: ["--encoder", "baseline", "--no-baseline"],
     "drop --no-baseline"),
    ("texture option on another encoder", "sweep_k", lambda t: ["--encoder", "self", "--texture-colour-invariant"],
     "apply only to --encoder texture"),
]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def existing_run(tmp_path):
    """A folder holding earlier results, which a rejected command must not touch."""
    run = tmp_path / "existing"
    (run / "sweep_k").mkdir(parents=True)
    for name, text in (("config.json", '{"epochs": 3}'), ("results.csv", "trial,msl_acc\nbaseline-t0.5-s0,0.7\n"),
                       ("summary.md", "# earlier\n"), ("sweep_k/marker", "tune state")):
        (run / name).write_text(text)
    return run


@pytest.mark.parametrize("what,command,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(ray_session, object_store, tmp_path, existing_run, capsys,
                                                          what, command, extra, expected):
    before = _snapshot(existing_run)
    argv = ["--preset", "smoke", "--out", str(existing_run), *extra(tmp_path)]
    if command == "pretrain":
        code = raysys_main(["pretrain", *argv, "--no-eval"])
    else:
        script = runpy.run_path(str(REPO / "experiments" / f"{command}.py"), run_name="test")
        code = sweep_main(command, "test", script["configure"], [*argv, "--resume"])
    err = capsys.readouterr().err
    # One error line (the built-in data's first-time progress bar may come before it; no traceback).
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, what
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, (what, err)
    assert _snapshot(existing_run) == before, f"{what}: the existing results changed"
