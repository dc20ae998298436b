"""cluster.yaml: Ray's own offline schema check, plus what Ray cannot check for us.

There is no ``ray up --dry-run``. ``prepare_config`` (merge with the AWS defaults) and
``validate_config`` (the autoscaler's JSON schema and cross-field rules) run without AWS credentials
and without boto3; they catch typo'd keys and bad worker counts, not typos inside provider or
node_config (those reach EC2 only at ``ray up``).
"""

import copy
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import REPO
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

CLUSTER_YAML = REPO / "cluster.yaml"
GPU_WORKER = "gpu_worker"

# Shapes of credentials that must never be committed (AWS key ids, secret keys, session tokens,
# private keys, a Ray token = 64 hex digits).
SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA|AROA|AIDA)[0-9A-Z]{16}\b"),
    re.compile(r"aws_(secret_access_key|access_key_id|session_token)", re.I),
    re.compile(r"AWS_(SECRET|SESSION)", re.I),
    re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),  # AWS secret key shape
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b[0-9a-f]{32,}\b"),
    re.compile(r"RAY_AUTH_TOKEN\s*=", re.I),
    re.compile(r"password|passwd", re.I),
]


@pytest.fixture
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_check(cfg, monkeypatch):
    """Ray's offline validation, with boto3/botocore made unimportable to prove no AWS call is needed."""
    monkeypatch.chdir(REPO)  # file_mounts are relative to the repository root, as for `ray up`
    for name in ("boto3", "botocore"):
        monkeypatch.setitem(sys.modules, name, None)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def start_commands(cfg, key):
    return [c for c in cfg[key] if "ray start" in c]


def ray_pin(commands):
    """The ray requirement installed by ``pip install`` in the setup commands (parsed, not grepped)."""
    pins = []
    for command in commands:
        words = shlex.split(command)
        if words[:2] == ["pip", "install"]:
            pins += [Requirement(w) for w in words[2:] if not w.startswith("-") and re.match(r"ray\b", w)]
    return pins


def test_ray_schema_accepts_it_offline(config, monkeypatch):
    prepared = ray_check(config, monkeypatch)
    # prepare_config merged the AWS defaults and folded setup_commands into both node roles.
    assert prepared["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert prepared["worker_setup_commands"] == config["setup_commands"]
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("breakage", ["top_level_typo", "node_type_typo", "unknown_head_type", "min_above_max"])
def test_ray_schema_rejects_broken_copies(config, monkeypatch, breakage):
    broken = copy.deepcopy(config)
    worker = broken["available_node_types"][GPU_WORKER]
    if breakage == "top_level_typo":
        broken["max_worker"] = broken.pop("max_workers")
    elif breakage == "node_type_typo":
        worker["min_worker"] = worker.pop("min_workers")
    elif breakage == "unknown_head_type":
        broken["head_node_type"] = "headnode"
    else:
        worker["min_workers"] = broken["max_workers"] + 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_check(broken, monkeypatch)


def test_gpu_workers_autoscale_from_zero(config):
    types = config["available_node_types"]
    worker, head = types[GPU_WORKER], types[config["head_node_type"]]
    assert worker["resources"]["GPU"] >= 1 and worker["resources"]["CPU"] >= 1
    assert re.match(r"(g|p)\d", worker["node_config"]["InstanceType"])  # an EC2 GPU family
    assert worker["min_workers"] == 0
    assert 1 <= worker["max_workers"] <= config["max_workers"]
    # The head trains nothing: no GPUs offered, a CPU instance type.
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 1
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"])
    assert head.get("min_workers", 0) == 0


def test_no_secrets_in_file():
    text = CLUSTER_YAML.read_text()
    found = [p.pattern for p in SECRET_PATTERNS if p.search(text)]
    assert not found, f"cluster.yaml matches secret patterns {found}"


@pytest.mark.parametrize("planted", [
    "# aws_secret_access_key: x",
    "  AWS_ACCESS_KEY_ID: AKIAIOSFODNN7EXAMPLE",
    "secret: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "  - export RAY_AUTH_TOKEN=" + "ab12" * 16,
])
def test_secret_patterns_catch_planted_secrets(planted):
    text = CLUSTER_YAML.read_text() + "\n" + planted + "\n"
    assert any(p.search(text) for p in SECRET_PATTERNS)


def test_setup_installs_the_pinned_ray_and_the_project(config):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = next(r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "ray")
    pins = ray_pin(config["setup_commands"])
    assert len(pins) == 1, pins
    pin = pins[0]
    assert pin.extras == wanted.extras
    (spec,) = pin.specifier  # exactly one clause ...
    assert spec.operator == "==" and "*" not in spec.version  # ... an exact version: every node the same
    assert wanted.specifier.contains(spec.version), f"{pin} is outside pyproject's {wanted}"
    # The project is installed (with its dependencies) from the mounted code, after Ray.
    install = [i for i, c in enumerate(config["setup_commands"]) if shlex.split(c) == ["pip", "install", "-q", "-e", "~/raysys"]]
    assert install and install[0] > next(i for i, c in enumerate(config["setup_commands"]) if "ray[" in c)
    mounts = config["file_mounts"]
    assert mounts["~/raysys/pyproject.toml"] == "./pyproject.toml" and mounts["~/raysys/raysys"] == "./raysys"


def test_file_mounts_are_code_only(config):
    for remote, local in config["file_mounts"].items():
        assert remote.startswith("~/raysys/")
        assert (REPO / local).exists(), f"{local} missing: run `ray up` from the repository root"
        assert Path(local).parts[-1] not in (".", ".venv", "data", "runs")  # never upload GBs
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("readme")
    if readme:  # pip install -e needs the readme pyproject names
        assert f"~/raysys/{readme}" in config["file_mounts"]


def test_dashboard_only_on_localhost(config):
    (head_start,) = start_commands(config, "head_start_ray_commands")
    words = shlex.split(head_start.split(";")[-1])
    assert "--dashboard-host=127.0.0.1" in words
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def test_token_authentication(config):
    head_cmds, worker_cmds = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    for cmd in start_commands(config, "head_start_ray_commands") + start_commands(config, "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token ray start" in cmd
    # The token is generated on the head before Ray starts there, silently (stdout to /dev/null),
    # private (umask 077) and only when missing (a restart keeps the workers' copy valid).
    (gen,) = [i for i, c in enumerate(head_cmds) if "get-auth-token --generate" in c]
    head_start = next(i for i, c in enumerate(head_cmds) if "ray start --head" in c)
    assert gen < head_start
    assert "> /dev/null" in head_cmds[gen] and "umask 077" in head_cmds[gen]
    assert head_cmds[gen].startswith("test -s ~/.ray/auth_token ||")
    # Workers receive the head's token file when they join, and generate none themselves.
    assert config["cluster_synced_files"] == ["~/.ray/auth_token"]
    assert not any("get-auth-token" in c for c in worker_cmds + config["setup_commands"])
