"""Bad command-line input stops with one line and exit code 2, before Ray starts."""

import subprocess
import sys

import pytest

from raysys.cli import build_parser
from raysys.config import PRESETS, ConfigError, config_from_args, make_config

BAD = [
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--batch-size", "1"], "--batch-size"),
    (["--backbone", "vgg11"], "--backbone"),
    (["--workers", "0"], "--workers"),
    (["--data", "/no/such/folder"], "--data"),
    (["--batch-size", "10", "--workers", "3"], "divisible"),
]


@pytest.mark.parametrize("argv, needle", BAD)
def test_invalid_values_are_rejected_by_config(argv, needle):
    args = build_parser("pretrain").parse_args(["pretrain", *argv])
    with pytest.raises(ConfigError, match=needle.lstrip("-")) as info:
        config_from_args(args)
    assert "\n" not in str(info.value)


def test_cli_exits_2_with_one_line_before_ray_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raysys.cli", "pretrain", "--temperature", "0", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--temperature" in lines[0]
    assert not (tmp_path / "run").exists(), "nothing may be started or written for a bad value"


def test_presets_apply_and_explicit_values_win():
    cfg = make_config("smoke", epochs=5)
    assert cfg.epochs == 5 and cfg.width == PRESETS["smoke"]["width"]
    assert cfg.augment["size"] == cfg.image_size
    paper = make_config("paper")
    assert (paper.backbone, paper.image_size, paper.epochs, paper.batch_size) == ("resnet50", 224, 400, 128)
    assert (paper.lr, paper.weight_decay, paper.temperature, paper.proj_dim) == (3e-4, 1e-6, 0.5, 128)


def test_help_lists_every_shared_option():
    text = build_parser("pretrain")._subparsers._group_actions[0].choices["pretrain"].format_help()
    for option in ("--data", "--out", "--preset", "--backbone", "--epochs", "--batch-size", "--temperature",
                   "--lr", "--workers", "--gpus-per-worker", "--seed", "--init-weights"):
        assert option in text
