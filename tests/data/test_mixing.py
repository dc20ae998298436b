"""Mixed-domain pools: exact counts, shuffling, label separation, the realised ratio over a Ray Data epoch,
and the config/CLI errors."""

import collections

import numpy as np
import pytest

from raysys.config import ConfigError, make_config
from raysys.data import formats
from raysys.data.mixing import mix_domains, mixed_counts
from raysys.data.schema import make_manifest
from raysys.data.simulate import simulate


def _table(n, domain, labels):
    return make_manifest({"path": [f"/{domain}/{i}.png" for i in range(n)], "image_id": [f"{domain}{i}" for i in range(n)],
                          "label": labels, "domain": [domain] * n})


@pytest.mark.parametrize("total,ratio,expected", [(100, 0.0, (100, 0)), (100, 1.0, (0, 100)), (100, 0.25, (75, 25)),
                                                  (7, 0.5, (3, 4))])
def test_counts_hold_the_total(total, ratio, expected):
    assert mixed_counts(total, ratio) == expected


def test_mix_draws_without_replacement_and_shuffles():
    rover = _table(1000, "rover", [i % 7 for i in range(1000)])
    diverse = _table(800, "diverse", [i % 100 for i in range(800)])
    mixed = mix_domains(rover, diverse, 0.3, total=600, seed=1)
    domains = np.array(mixed.column("domain").to_pylist())
    assert mixed.num_rows == 600 and (domains == "diverse").sum() == 180
    assert len(set(mixed.column("image_id").to_pylist())) == 600, "no image twice"
    # Shuffled: every tenth of the pool carries the ratio (a concatenation would put all 180 at the end).
    for part in np.array_split(domains, 10):
        assert 0.05 < (part == "diverse").mean() < 0.6
    labels = np.array(mixed.column("label").to_pylist())
    assert labels[domains == "rover"].max() == 6 and labels[domains == "diverse"].min() == 7, "classes kept apart"


def test_unknown_in_domain_labels_stay_unknown_and_shortage_is_an_error():
    rover = _table(50, "rover", [-1] * 50)
    diverse = _table(20, "diverse", [i % 4 for i in range(20)])
    mixed = mix_domains(rover, diverse, 0.4, seed=0)
    labels = dict(zip(mixed.column("domain").to_pylist(), mixed.column("label").to_pylist()))
    assert mixed.num_rows == 50 and labels["rover"] == -1
    with pytest.raises(formats.DataError, match="needs 30 images from the out-of-domain dataset but it has 20"):
        mix_domains(rover, diverse, 0.6, seed=0)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_config_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(ConfigError, match=r"--mix-ratio must be in \[0, 1\]"):
        make_config("smoke", mix_ratio=ratio).validate()


def test_mix_without_an_out_of_domain_dataset_names_the_fix(tmp_path):
    from raysys.data.sources import resolve_data

    roots = simulate(tmp_path / "data", preset="smoke", count=200, progress=False)
    data = tmp_path / "only-rover"
    data.mkdir()
    (data / formats.ROVER_DIR).symlink_to(roots["rover"])
    with pytest.raises(ConfigError, match="pass --mix-data PATH"):
        resolve_data(make_config("smoke", data=str(data), mix_ratio=0.5, batch_size=16))
    pool = resolve_data(make_config("smoke", data=str(data), batch_size=16))[0].num_rows
    cfg = make_config("smoke", data=str(data), mix_ratio=0.5, batch_size=16, mix_data=str(roots["diverse"]))
    manifest, _ = resolve_data(cfg)
    assert collections.Counter(manifest.column("domain").to_pylist()) == {"rover": pool - round(pool / 2),
                                                                          "diverse": round(pool / 2)}


def test_realised_ratio_over_an_epoch(ray_session, tmp_path):
    """Iterate one epoch of the real two-view pipeline: the out-of-domain share is the configured ratio
    (within 2 points) and the epoch holds exactly the configured total."""
    from raysys.data.sources import resolve_data
    from raysys.distributed.pipeline import pretrain_dataset

    cfg = make_config("smoke", builtin_root=str(tmp_path / "builtin"), mix_ratio=0.25, max_images=400, image_size=8)
    manifest, _ = resolve_data(cfg)
    domains = sorted(set(manifest.column("domain").to_pylist()))
    seen = collections.Counter()
    for batch in pretrain_dataset(manifest, cfg.augment_config, cfg.image_size).iter_batches(batch_size=64):
        seen.update(domains[d] for d in batch["domain"])
    assert sum(seen.values()) == 400
    assert abs(seen["diverse"] / 400 - 0.25) <= 0.02
