"""Dockerfile and cluster/ manifests agree: one pinned image, the same entry point, real config files, Ray's
version and token auth, as far as a CPU machine can check them (parsed, not deployed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
ENTRY = "scripts/train.py"


def _pins() -> dict[str, str]:
    """Exact pins of pyproject.toml (`"name[extra]==version"`), by package name."""
    pins = re.findall(r'"([\w-]+)(?:\[[\w,]+\])?==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    return dict(pins)


def _image_tag() -> str:
    match = re.search(r"docker build -t (\S+) \.", (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile's header must say how it is built and tagged"
    return match.group(1)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


def _ray_cluster_images(spec: dict) -> list[str]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c["image"] for group in groups for c in _containers(group)]


def _train_commands(text: str) -> list[list[str]]:
    """Every `python3 scripts/train.py --config X` command line in a text, as argument lists."""
    return [shlex.split(m.group(0)) for m in re.finditer(r"python3? scripts/train\.py --config \S+", text)]


def test_dockerfile_is_pinned_and_installs_the_gpu_extra_and_bubblewrap():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, flags=re.M).group(1)
    assert base == f"vllm/vllm-openai:v{_pins()['vllm']}", "the base image must carry the gpu extra's vLLM"
    assert '".[gpu]"' in text and "bubblewrap" in text
    assert re.search(r'^ENTRYPOINT \["python3", "scripts/train.py"\]', text, flags=re.M)
    for copied in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / copied).exists(), f"Dockerfile copies {copied}, which does not exist"


def test_every_manifest_runs_the_same_image_and_entry_point_with_token_auth():
    image, ray_version = _image_tag(), _pins()["ray"]
    raycluster = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())
    rayjob = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    ray_up = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    slurm = (CLUSTER / "slurm.sbatch").read_text()

    assert raycluster["kind"] == "RayCluster" and rayjob["kind"] == "RayJob"
    images = _ray_cluster_images(raycluster["spec"]) + _ray_cluster_images(rayjob["spec"]["rayClusterSpec"])
    images += [ray_up["docker"]["image"], re.search(r"IMAGE:-docker://([^}]+)\}", slurm).group(1)]
    assert set(images) == {image}

    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray_version
        assert spec["authOptions"]["mode"] == "token"
    assert "--env RAY_AUTH_MODE=token" in ray_up["docker"]["run_options"]
    assert "export RAY_AUTH_MODE=token" in slurm

    commands = [shlex.split(rayjob["spec"]["entrypoint"])]
    commands += _train_commands((CLUSTER / "ray-up.yaml").read_text()) + _train_commands(slurm.replace('"', ""))
    assert len(commands) >= 3
    for command in commands:
        assert command[1] == ENTRY, command
    for command in commands:
        config = command[command.index("--config") + 1]
        assert config == "$CONFIG" or (ROOT / config).is_file(), f"{config} does not exist"
    assert (ROOT / re.search(r"CONFIG=\$\{1:-(\S+)\}", slurm).group(1)).is_file()


def test_cluster_readme_walks_through_build_cluster_submit():
    text = (CLUSTER / "README.md").read_text()
    for step in (f"docker build -t {_image_tag()} .", "kubectl apply -f cluster/", "sbatch cluster/slurm.sbatch",
                 "ray up cluster/ray-up.yaml", "ray job submit", "RAY_AUTH_MODE=token"):  # fmt: skip
        assert step in text, step


def test_every_gpu_config_fits_one_worker_node_of_the_manifests():
    """The paper and benchmark configs plan (placement.plan) no more GPUs than one worker of the manifests has,
    and no bundle asks for more than a node holds: PACK places each experiment on one worker."""
    from rlhf_refiner import config as config_lib
    from rlhf_refiner import placement

    raycluster = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())
    limits = [c["resources"]["limits"] for c in _containers(raycluster["spec"]["workerGroupSpecs"][0])]
    per_node = int(limits[0]["nvidia.com/gpu"])
    slurm = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", (CLUSTER / "slurm.sbatch").read_text()).group(1))
    assert slurm == per_node
    configs = sorted([*(ROOT / "configs" / "paper").glob("*.yaml"), *(ROOT / "configs" / "bench").glob("*.yaml")])
    assert len(configs) >= 8
    for path in configs:
        layout = placement.plan(config_lib.load(path))
        assert 0 < layout.gpus <= per_node, f"{path.name} plans {layout.gpus} GPUs; a worker has {per_node}"
