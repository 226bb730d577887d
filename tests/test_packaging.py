"""The front's dependency set is its own: requirements-front.txt, the package's base install (pyproject), and the
front image install the same pins, none of them torch; requirements.txt is that set plus the engine's."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = {"torch", "diffusers", "transformers", "safetensors", "pillow", "tritonclient[grpc]", "tqdm"}


def pins(path: Path) -> dict[str, str]:
    """name -> version of each `name==version` line (comments and -r lines aside)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-r"):
            name, _, version = line.partition("==")
            out[name.lower()] = version
    return out


def spec_pins(specs: list[str]) -> dict[str, str]:
    return {name.lower(): version for name, _, version in (s.partition("==") for s in specs)}


def test_the_front_set_has_no_engine_and_is_the_packages_base_install():
    front = pins(ROOT / "requirements-front.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not {n.split("[")[0] for n in front} & {n.split("[")[0] for n in ENGINE}
    assert spec_pins(project["dependencies"]) == front


def test_requirements_is_the_front_set_plus_the_engines_and_the_worker_extra_matches():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = (ROOT / "requirements.txt").read_text()
    assert "-r requirements-front.txt" in text.splitlines()
    own = pins(ROOT / "requirements.txt")
    assert not set(own) & set(pins(ROOT / "requirements-front.txt"))  # each pin in one place
    worker = spec_pins(project["optional-dependencies"]["worker"])
    assert set(worker) == ENGINE and all(own[n] == v for n, v in worker.items())
    assert set(own) - set(worker) == {"grpcio-tools"}  # stub generation: a build step, not a runtime need
