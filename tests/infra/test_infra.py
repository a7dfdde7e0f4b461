"""The infrastructure files: image, KubeRay manifests, cluster-launcher config and schedules.

Fast and offline (no docker, kubectl, cluster or cloud): every YAML parses, the cluster-launcher
config passes Ray's own schema and the checks `ray up` makes before it calls AWS, and every
manifest holds what the code relies on: the image the Dockerfile builds, an entrypoint that runs
`jobs/generate.py` with a config that loads, GPU requests that match Ray's view and the config's
`gpus_per_actor`, autoscaling bounds that can host the config's actors, a dashboard on 8265, token
authentication, valid schedules that cannot overlap, and RBAC limited to what the CronJob needs.
"""

from __future__ import annotations

import configparser
import copy
import datetime as dt
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.core.config import JobConfig, load_config

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
SCHEDULE = INFRA / "schedule"
DOCKERFILE = INFRA / "Dockerfile"
CLUSTER_LAUNCHER = INFRA / "cluster" / "gpu-fleet.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _built_image() -> str:
    """The image name, defined once: the tag in the Dockerfile's `docker build` header comment."""
    found = re.search(r"^#\s+docker build -f infra/Dockerfile -t (\S+) \.$", DOCKERFILE.read_text(), re.MULTILINE)
    if found is None:
        raise AssertionError("infra/Dockerfile's header lost its `docker build -f infra/Dockerfile -t IMAGE .` line")
    return found.group(1)


IMAGE = _built_image()


def _image_ok(name: str) -> bool:
    """The built image, or the same name and tag pushed to a registry (REGISTRY/sdxl-batch:0.1.0)."""
    return name == IMAGE or name.endswith("/" + IMAGE)


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _pinned(requirement_prefix: str) -> str:
    for requirement in PYPROJECT["project"]["dependencies"]:
        if requirement.startswith(requirement_prefix + "=="):
            return str(requirement.split("==", 1)[1])
    raise AssertionError(f"pyproject.toml pins no {requirement_prefix}")


# --- YAML and configs ---------------------------------------------------------------------------

YAML_FILES = sorted(
    [*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml"), *(REPO / "configs").rglob("*.yaml")],
    key=lambda path: str(path),
)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert _yaml_docs(path), f"{path.relative_to(REPO)} holds no YAML document"


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: str(path.relative_to(REPO))
)
def test_every_config_loads(path: Path) -> None:
    load_config(path)


def test_scheduled_config_is_an_unattended_incremental_gpu_job() -> None:
    config = load_config(REPO / "configs" / "scheduled.yaml")
    assert config.manifest.startswith("s3://") and config.manifest.endswith("/"), "a prefix that grows"
    assert config.output.startswith("s3://")
    assert config.on_bad_row == "skip", "one bad row must not stop an unattended run"
    assert config.model.preset == "lightning-4step"
    assert config.resources.gpus_per_actor == 1
    assert isinstance(config.resources.actors, tuple), "an autoscaling [min, max] pool: runs differ in size"


def _gpus_per_actor(config: JobConfig) -> float:
    """GPUs per actor on a GPU cluster (unset means one GPU each there)."""
    per_actor = config.resources.gpus_per_actor
    return 1.0 if per_actor is None else per_actor


def _gpu_configs() -> dict[str, JobConfig]:
    """The GPU job configs in configs/: what the long-lived clusters are sized for."""
    configs = {path.name: load_config(path) for path in sorted((REPO / "configs").glob("*.yaml"))}
    return {name: config for name, config in configs.items() if _gpus_per_actor(config) > 0}


def _most_actors(config: JobConfig) -> int:
    """The most actors a job asks for: `resources.actors`, the top of a [min, max] range, or (unset:
    one per GPU of the cluster) 1."""
    actors: Any = config.resources.actors
    if actors is None or isinstance(actors, int):
        return actors or 1
    assert isinstance(actors, list | tuple) and len(actors) == 2, f"cannot read resources.actors={actors!r}"
    return int(actors[1])


def _check_gpu_fit(where: str, gpus_per_node: int, max_nodes: int, config: JobConfig, name: str) -> None:
    """A node's GPUs divide into whole actors, and the largest cluster can host all the job's actors."""
    per_actor = _gpus_per_actor(config)
    assert gpus_per_node % math.ceil(per_actor) == 0, (
        f"{where}: {gpus_per_node} GPU(s) per node is not a multiple of ceil(gpus_per_actor={per_actor}) of {name}"
    )
    capacity = max_nodes * math.floor(gpus_per_node / per_actor + 1e-9)
    assert capacity >= _most_actors(config), (
        f"{where}: at most {capacity} actors of {per_actor} GPU fit, {name} asks for {_most_actors(config)}"
    )


# --- Dockerfile ---------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, rest = (pending + text).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def _docker(keyword: str) -> list[str]:
    return [rest for instruction, rest in _dockerfile() if instruction == keyword]


def _docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in _docker("ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _docker_user() -> str:
    users = _docker("USER")
    assert users, "the image must not run as root: USER is missing"
    return users[-1].split(":")[0]


def test_dockerfile_builds_on_a_cuda_runtime_image() -> None:
    base = _docker("FROM")[0].split()[0]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-[\w.-]*runtime[\w.-]*", base), base


def test_dockerfile_runs_as_a_non_root_user_with_uid_1000() -> None:
    user = _docker_user()
    assert user not in {"root", "0"}
    runs = " ".join(_docker("RUN"))
    assert re.search(rf"useradd [^&]*--uid 1000 [^&]*\b{user}\b", runs), "the manifests run as uid 1000"
    assert _docker_env()["HOME"] == f"/home/{user}", "the cluster launcher maps ~ through the image's HOME"


def test_dockerfile_keeps_the_model_cache_in_a_volume_the_user_owns() -> None:
    user = _docker_user()
    cache = f"/home/{user}/.cache"
    assert cache in json.loads(_docker("VOLUME")[-1])
    assert _docker_env()["HF_HOME"].startswith(cache + "/")
    runs = " ".join(_docker("RUN"))
    # Created before VOLUME: a fresh volume copies the owner of the image's directory (root otherwise).
    assert f"mkdir -p {cache}" in runs and f"chown {user}:{user} {cache}" in runs


def test_dockerfile_entrypoint_is_the_cli() -> None:
    assert json.loads(_docker("ENTRYPOINT")[-1]) == ["sdxl-batch"]
    assert "sdxl-batch" in PYPROJECT["project"]["scripts"]


def test_dockerfile_pins_torch_as_pyproject_does() -> None:
    pins = re.findall(r"torch==([\w.+]+)", " ".join(_docker("RUN")))
    assert pins == [_pinned("torch")], pins


def test_dockerfile_has_what_kuberay_and_the_cluster_launcher_run() -> None:
    runs = " ".join(_docker("RUN"))
    for tool in ("wget", "rsync", "openssh-client"):  # KubeRay's probes; the launcher's file sync and SSH
        assert re.search(rf"apt-get install [^&]*\b{tool}\b", runs), tool
    assert _docker_env()["RAY_AUTH_MODE"] == "token"


def test_image_tag_is_the_package_version_and_the_context_holds_what_is_copied() -> None:
    version = PYPROJECT["project"]["version"]
    assert IMAGE.split(":") == ["sdxl-batch", version], f"tag the image with the package version {version}"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    for rest in _docker("COPY"):
        sources = [word for word in rest.split() if not word.startswith("--")][:-1]
        for source in sources:
            assert f"!{source}" in ignore, f"COPY {source}, but infra/Dockerfile.dockerignore leaves it out"


# --- KubeRay ------------------------------------------------------------------------------------


def _kuberay_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in _yaml_docs(path)]


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _kuberay_objects() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under infra/kuberay/, found {len(found)}"
    return found[0]


def _embedded_rayjob() -> dict[str, Any]:
    """The RayJob the CronJob creates, held in its ConfigMap."""
    job: dict[str, Any] = yaml.safe_load(_one("ConfigMap")["data"]["rayjob.yaml"])
    return job


def _job_config(entrypoint: str) -> tuple[str, JobConfig]:
    """The config a Ray job entrypoint renders, parsed as jobs/generate.py does (`run --no-progress`)."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "jobs/generate.py"], entrypoint
    args = build_parser().parse_args(["run", "--no-progress", *words[2:]])
    config_path = REPO / args.config
    assert config_path.is_file() and config_path.parent == REPO / "configs", f"{args.config} is not in configs/"
    config = load_config(config_path, manifest=args.manifest, output=args.output, overrides=args.overrides)
    return args.config, config


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = template["spec"]["containers"]
    return containers


def _quantity(value: Any) -> int:
    text = str(value)
    assert text.isdigit(), f"whole GPUs only, got {value!r}"
    return int(text)


def _check_pod(where: str, template: dict[str, Any]) -> None:
    security = template["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000, where
    for container in _containers(template):
        assert _image_ok(container["image"]), f"{where}: image {container['image']}, expected {IMAGE}"


def _check_ray_cluster(where: str, spec: dict[str, Any], configs: dict[str, JobConfig]) -> None:
    """A RayCluster spec: version, auth, autoscaling, head and GPU workers fit for `configs`."""
    assert spec["rayVersion"] == _pinned("ray[data,default,tune]"), f"{where}: rayVersion is not the image's Ray"
    assert spec["authOptions"]["mode"] == "token", f"{where}: token authentication"
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    _check_pod(f"{where} head", head["template"])
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0", where
    ports = {port["containerPort"]: port.get("name") for port in _containers(head["template"])[0]["ports"]}
    assert ports.get(8265) == "dashboard", f"{where}: the head must expose the dashboard (Jobs API) on 8265"
    cache = f"/home/{_docker_user()}/.cache"
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        name = f"{where} worker group {group['groupName']}"
        low, size, high = group["minReplicas"], group.get("replicas", group["minReplicas"]), group["maxReplicas"]
        assert 0 <= low <= size <= high and high >= 1, f"{name}: replicas {low} <= {size} <= {high}, max >= 1"
        _check_pod(name, group["template"])
        worker = _containers(group["template"])[0]
        limit = worker["resources"]["limits"].get("nvidia.com/gpu")
        if limit is None:
            continue
        gpu_groups += 1
        gpus = _quantity(limit)
        requested = worker["resources"].get("requests", {}).get("nvidia.com/gpu", limit)
        assert _quantity(requested) == gpus, f"{name}: GPU request and limit differ"
        if "num-gpus" in group["rayStartParams"]:
            assert _quantity(group["rayStartParams"]["num-gpus"]) == gpus, f"{name}: num-gpus != nvidia.com/gpu"
        for config_name, config in configs.items():
            _check_gpu_fit(name, gpus, high, config, config_name)
        volumes = {volume["name"] for volume in group["template"]["spec"].get("volumes", [])}
        mounts = {mount["mountPath"]: mount["name"] for mount in worker.get("volumeMounts", [])}
        assert mounts.get(cache) in volumes, f"{name}: no volume for the model cache {cache}"
    assert gpu_groups, f"{where}: no GPU worker group"


def _check_ray_job(where: str, spec: dict[str, Any]) -> JobConfig:
    """A RayJob spec (or a RayCronJob's jobTemplate) on its own cluster; returns the config it runs."""
    config_name, config = _job_config(spec["entrypoint"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _docker("WORKDIR")[-1], f"{where}: working_dir is not the image's repo"
    assert spec["shutdownAfterJobFinishes"] is True, f"{where}: the cluster must go away with the job"
    assert spec["ttlSecondsAfterFinished"] > 0, where
    _check_ray_cluster(where, spec["rayClusterSpec"], {config_name: config})
    return config


def test_kuberay_objects_have_the_api_versions_the_operators_serve() -> None:
    versions = {
        "RayCluster": "ray.io/v1",
        "RayJob": "ray.io/v1",
        "RayCronJob": "ray.io/v1",
        "CronJob": "batch/v1",
        "ServiceAccount": "v1",
        "ConfigMap": "v1",
        "Role": "rbac.authorization.k8s.io/v1",
        "RoleBinding": "rbac.authorization.k8s.io/v1",
    }
    objects = [*_kuberay_objects(), ("cronjob-rayjob.yaml (ConfigMap)", _embedded_rayjob())]
    assert {doc["kind"] for _, doc in objects} == set(versions)
    for where, doc in objects:
        assert doc["apiVersion"] == versions[doc["kind"]], f"{where}: {doc['kind']} {doc['apiVersion']}"


def test_raycluster_autoscales_gpu_workers_for_every_gpu_config() -> None:
    cluster = _one("RayCluster")
    _check_ray_cluster("raycluster.yaml", cluster["spec"], _gpu_configs())
    assert cluster["spec"]["authOptions"].get("secretName"), "clients need the token: bring our own Secret"


def test_rayjob_runs_generate_on_its_own_cluster() -> None:
    job = _one("RayJob")
    config = _check_ray_job("rayjob.yaml", job["spec"])
    assert config.model.preset == "lightning-4step"
    assert job["spec"].get("backoffLimit", 0) == 0, "a rerun resumes; a retry on a new cluster only costs"


def test_raycronjob_uses_kuberay_fields_and_cannot_overlap() -> None:
    cron = _one("RayCronJob")
    # KubeRay's RayCronJobSpec (1.6: schedule, jobTemplate, suspend; 1.7 adds timeZone). It has no
    # concurrencyPolicy, so a deadline shorter than the interval is what keeps runs apart.
    assert set(cron["spec"]) <= {"schedule", "jobTemplate", "suspend", "timeZone"}, sorted(cron["spec"])
    template = cron["spec"]["jobTemplate"]
    assert "spec" not in template, "jobTemplate is a RayJob spec inline, without a `spec:` wrapper"
    config = _check_ray_job("raycronjob.yaml", template)
    assert config == load_config(REPO / "configs" / "scheduled.yaml")
    assert cron["spec"].get("suspend", False) is False
    lifetime = template["activeDeadlineSeconds"] + template["ttlSecondsAfterFinished"]
    assert lifetime < _shortest_interval(cron["spec"]["schedule"]), "a run could overlap the next one"


def _cronjob_parts() -> tuple[dict[str, Any], dict[str, Any], str]:
    """The CronJob's pod template, its container and its shell script."""
    cronjob = _one("CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]
    container = _containers(pod)[0]
    script = " ".join(container.get("command", []) + container.get("args", []))
    return pod, container, script


def test_cronjob_forbids_concurrent_runs_and_waits_for_its_rayjob() -> None:
    cronjob = _one("CronJob")
    _shortest_interval(cronjob["spec"]["schedule"])
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod, container, script = _cronjob_parts()
    assert pod["spec"]["restartPolicy"] == "Never" and cronjob["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # The RayJob's own deadline ends before the pod's, so no run outlives the pod that guards it.
    rayjob = _embedded_rayjob()["spec"]
    run_lifetime = rayjob["activeDeadlineSeconds"] + rayjob["ttlSecondsAfterFinished"]
    assert run_lifetime < cronjob["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    # The manifest it creates is the ConfigMap's, mounted where the script reads it.
    configmap = _one("ConfigMap")
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        if volumes[mount["name"]].get("configMap", {}).get("name") == configmap["metadata"]["name"]:
            assert f"kubectl create -f {mount['mountPath']}/rayjob.yaml -o name" in script
            break
    else:
        raise AssertionError("the CronJob's pod does not mount the RayJob's ConfigMap")


def test_cronjob_rayjob_is_new_every_run_and_renders_the_scheduled_config() -> None:
    job = _embedded_rayjob()
    assert "name" not in job["metadata"] and job["metadata"]["generateName"].endswith("-")
    config = _check_ray_job("cronjob-rayjob.yaml (ConfigMap)", job["spec"])
    assert config == load_config(REPO / "configs" / "scheduled.yaml")


def test_cronjob_may_only_create_and_get_rayjobs() -> None:
    account = _one("ServiceAccount")["metadata"]["name"]
    pod, _, _ = _cronjob_parts()
    assert pod["spec"]["serviceAccountName"] == account
    role, binding = _one("Role"), _one("RoleBinding")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]


def _run_cronjob_script(tmp_path: Path, answers: list[str]) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The CronJob's script against a fake kubectl that answers `get` with `answers` in turn
    (ERR:text fails with text on stderr), and a `sleep` that returns at once."""
    script = _containers(_one("CronJob")["spec"]["jobTemplate"]["spec"]["template"])[0]["args"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    fake = f"""#!{sys.executable}
import json, pathlib, sys
state = pathlib.Path({str(tmp_path)!r})
with open(state / "calls", "a") as calls:
    calls.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "create":
    print("rayjob.ray.io/sdxl-batch-scheduled-abcde")
    sys.exit(0)
answers = json.loads((state / "answers.json").read_text())
answer = answers.pop(0)
(state / "answers.json").write_text(json.dumps(answers))
if answer.startswith("ERR:"):
    print(answer[4:], file=sys.stderr)
    sys.exit(1)
print(answer, end="")
"""
    (bin_dir / "kubectl").write_text(fake)
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("kubectl", "sleep"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    return done, (tmp_path / "calls").read_text().splitlines()


@pytest.mark.parametrize(
    ("answers", "exit_code"),
    [
        (["/", "Initializing/", "Running/RUNNING", "Complete/SUCCEEDED"], 0),
        (["Running/RUNNING", "ERR:Unable to connect to the server: timeout", "Complete/FAILED"], 1),
        (["Running/RUNNING", "Failed/"], 1),  # e.g. its activeDeadlineSeconds passed
        (['ERR:Error from server (NotFound): rayjobs.ray.io "x" not found'], 1),
    ],
    ids=["succeeded", "transient-error-then-failed", "deadline", "deleted"],
)
def test_cronjob_script_creates_one_rayjob_and_waits_for_its_end(
    tmp_path: Path, answers: list[str], exit_code: int
) -> None:
    done, calls = _run_cronjob_script(tmp_path, answers)
    assert done.returncode == exit_code, done.stdout + done.stderr
    assert calls[0] == "create -f /etc/sdxl-batch/rayjob.yaml -o name"
    assert all(call.startswith("get rayjob.ray.io/sdxl-batch-scheduled-abcde ") for call in calls[1:])
    assert len(calls) == 1 + len(answers), "polls until the RayJob ends, and not after"


# --- Cron expressions ---------------------------------------------------------------------------

_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_NAMES = {
    3: {name: number for number, name in enumerate(_MONTHS, 1)},
    4: {name: number for number, name in enumerate(_WEEKDAYS)},
}


def _cron_field(text: str, index: int) -> set[int]:
    """The values one field of a 5-field cron expression matches (`*`, `a`, `a-b`, `/step`, lists)."""
    label, low, high = _CRON_FIELDS[index]
    names = _CRON_NAMES.get(index, {})
    values: set[int] = set()
    for part in text.lower().split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if span == "*":
            start, end = low, high
        else:
            first, _, last = span.partition("-")
            start = names[first] if first in names else int(first)
            end = (names[last] if last in names else int(last)) if last else (high if step_text else start)
        if not (low <= start <= end <= high and step >= 1):
            raise ValueError(f"{label} {part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return {0 if index == 4 and value == 7 else value for value in values}


def _shortest_interval(expression: str) -> float:
    """Seconds between the closest two firings of a 5-field cron expression over a year."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r}: a cron schedule has 5 fields")
    minutes, hours, days, months, weekdays = (_cron_field(text, index) for index, text in enumerate(fields))
    day_restricted, weekday_restricted = fields[2] != "*", fields[4] != "*"
    times: list[dt.datetime] = []
    for offset in range(400):
        day = dt.datetime(2030, 1, 1) + dt.timedelta(days=offset)
        by_date, by_weekday = day.day in days, day.isoweekday() % 7 in weekdays
        # cron: when both day fields are restricted, either one matching is enough
        matches = by_date or by_weekday if day_restricted and weekday_restricted else by_date and by_weekday
        if day.month in months and matches:
            times += [day.replace(hour=hour, minute=minute) for hour in sorted(hours) for minute in sorted(minutes)]
    assert len(times) >= 2, f"{expression!r} fires less than twice a year"
    return min((later - earlier).total_seconds() for earlier, later in itertools.pairwise(times))


def test_cron_reader_knows_intervals_and_refuses_nonsense() -> None:
    assert _shortest_interval("0 * * * *") == 3600
    assert _shortest_interval("*/15 * * * *") == 900
    assert _shortest_interval("30 2 * * mon-fri") == 86400
    assert _shortest_interval("0 0,12 1 * 0") == 12 * 3600
    for wrong in ("60 * * * *", "* * * *", "* * 0 * *", "*/0 * * * *", "0 * * * * *"):
        with pytest.raises(ValueError):
            _shortest_interval(wrong)


# --- Cluster launcher (VMs) ---------------------------------------------------------------------


def _ray_schema() -> dict[str, Any]:
    """The cluster-launcher schema shipped in the installed ray package (found without importing ray)."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    schema: dict[str, Any] = json.loads(schema_path.read_text(encoding="utf-8"))
    return schema


def _launcher_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(CLUSTER_LAUNCHER.read_text(encoding="utf-8"))
    return config


def _validate_as_ray_up(config: dict[str, Any]) -> None:
    """Ray's schema on the file as written, then what `ray up` checks before it calls the cloud."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.Draft7Validator(_ray_schema()).validate(config)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_launcher_config_passes_rays_schema() -> None:
    jsonschema.Draft7Validator.check_schema(_ray_schema())
    _validate_as_ray_up(_launcher_config())


def _broken_copies() -> Iterator[tuple[str, dict[str, Any]]]:
    unknown_docker_key = _launcher_config()
    unknown_docker_key["docker"]["gpus"] = "all"
    yield "unknown docker key", unknown_docker_key
    text_workers = _launcher_config()
    text_workers["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    yield "min_workers as text", text_workers
    fractional_gpu = _launcher_config()
    fractional_gpu["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    yield "fractional GPU resource", fractional_gpu


BROKEN_LAUNCHER_CONFIGS = list(_broken_copies())


@pytest.mark.parametrize(
    "config", [config for _, config in BROKEN_LAUNCHER_CONFIGS], ids=[what for what, _ in BROKEN_LAUNCHER_CONFIGS]
)
def test_cluster_launcher_schema_check_rejects_a_broken_copy(config: dict[str, Any]) -> None:
    """The check is real: a copy with one mistake fails it."""
    with pytest.raises(jsonschema.ValidationError):
        _validate_as_ray_up(config)


def test_cluster_launcher_runs_the_image_with_token_auth_and_the_dashboard_on_8265() -> None:
    config = _launcher_config()
    docker = config["docker"]
    assert _image_ok(docker["image"]) and "head_image" not in docker and "worker_image" not in docker
    options = " ".join(docker["run_options"])
    # `docker run ... IMAGE bash`: with the image's ENTRYPOINT that would be `sdxl-batch bash`.
    assert "--entrypoint=" in docker["run_options"], "reset the image's entrypoint for the launcher's bash"
    assert "RAY_AUTH_MODE=token" in options
    assert f":/home/{_docker_user()}/.cache" in options, "the model cache as a named volume"
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "every node needs the token"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head_start
    assert "--dashboard-port=8265" in head_start or "--dashboard-port" not in head_start, "8265: Ray's default"


def test_cluster_launcher_gpu_workers_autoscale_for_every_gpu_config() -> None:
    config = _launcher_config()
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = 0
    for name, node_type in types.items():
        if name == config["head_node_type"]:
            continue
        low, high = node_type.get("min_workers", 0), node_type["max_workers"]
        assert 0 <= low <= high <= config["max_workers"] and high >= 1, f"{name}: {low} <= {high}"
        gpus = node_type["resources"].get("GPU", 0)
        if not gpus:
            continue
        gpu_types += 1
        for config_name, job in _gpu_configs().items():
            _check_gpu_fit(f"gpu-fleet.yaml {name}", gpus, high, job, config_name)
    assert gpu_types, "no GPU worker type"


# --- Schedules on a VM (systemd, cron) ----------------------------------------------------------


SHELL_OPERATORS = {"&&", "||", ";", "|", ">", ">>", "2>&1"}


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((SCHEDULE / name).read_text(encoding="utf-8"))
    return parser


def _env_example() -> dict[str, str]:
    lines = (SCHEDULE / "render.env.example").read_text(encoding="utf-8").splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return {key: value for key, value in pairs}


def _check_submit(command: list[str], where: str) -> None:
    """`sdxl-batch submit CONFIG ... --wait` as the real CLI parses it, with a config that loads."""
    found = [index for index, word in enumerate(command) if Path(word).name == "sdxl-batch"]
    assert found and command[found[0] + 1] == "submit", f"{where}: no `sdxl-batch submit` in {command}"
    words = list(itertools.takewhile(lambda word: word not in SHELL_OPERATORS, command[found[0] + 1 :]))
    env = _env_example()  # the variables the command takes from its environment file
    words = [re.sub(r"\$\{?(\w+)\}?", lambda match: env[match.group(1)], word) for word in words]
    args = build_parser().parse_args(words)
    assert args.address.startswith("http") and args.address.endswith(":8265"), f"{where}: {args.address}"
    assert args.wait, f"{where}: without --wait the run ends at once and nothing keeps runs apart"
    load_config(REPO / args.config, manifest=args.manifest, output=args.output, overrides=args.overrides)
    assert args.config == "configs/scheduled.yaml", where


def test_systemd_service_submits_the_scheduled_config_as_a_non_root_oneshot() -> None:
    service = _unit("sdxl-batch-render.service")["Service"]
    assert service["Type"] == "oneshot", "oneshot + --wait: the unit is active for the whole run"
    assert service["User"] not in {"root", "0"}
    assert service["EnvironmentFile"].startswith("/etc/")
    assert Path(service["WorkingDirectory"]).is_absolute()
    _check_submit(shlex.split(service["ExecStart"]), "sdxl-batch-render.service")
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= set(_env_example()) and _env_example()["RAY_AUTH_MODE"] == "token"


def test_systemd_timer_starts_the_service_hourly_and_catches_up() -> None:
    timer = _unit("sdxl-batch-render.timer")
    assert timer["Timer"]["OnCalendar"] == "hourly"
    assert timer["Timer"]["Persistent"] == "true"
    assert (SCHEDULE / timer["Timer"]["Unit"]).is_file()
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_crontab_runs_under_flock_so_runs_never_overlap() -> None:
    lines = (SCHEDULE / "crontab.example").read_text(encoding="utf-8").splitlines()
    entries = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert len(entries) == 1, entries
    fields = entries[0].split(None, 5)
    _shortest_interval(" ".join(fields[:5]))
    command = shlex.split(fields[5])
    lock = command.index("flock")
    assert "-n" in command[lock : lock + 4], "a tick that finds a run going must give up, not queue"
    _check_submit(command[lock:], "crontab.example")


def test_every_file_the_readme_names_exists() -> None:
    """The README's and the docs pages' commands and text name files of infra/, configs/, docs/,
    benchmarks/, jobs/, pipeline/ and tests/ by their path from the repository root."""
    pattern = r"(?<![\w/.-])((?:infra|configs|docs|benchmarks|jobs|pipeline|tests)/[\w./-]*\w)"
    missing, count = [], 0
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        named = set(re.findall(pattern, page.read_text(encoding="utf-8")))
        count += len(named)
        missing += [f"{page.relative_to(REPO)}: {path}" for path in sorted(named) if not (REPO / path).exists()]
    assert count > 30
    assert not missing, f"the README or docs/ name files that do not exist: {missing}"
