"""Opt-in integration suite against real WebUIs: `pytest tests/webui --webui-dir DIR [--forge-dir DIR]`.

Without the options every test here is skipped, and the normal test run is unaffected (these options
are only registered when pytest starts in or below tests/webui; elsewhere `getoption` falls back).

--webui-dir: an AUTOMATIC1111 v1.10.1 checkout laid out as the harness in shared/harness/a1111/
expects: <work>/webui (this folder), <work>/venv, <work>/hf_home, <work>/run; the tiny checkpoint in
webui/models/Stable-diffusion. --forge-dir: the same for Forge (shared/harness/forge/); --neo-dir: for
Forge Neo (shared/harness/neo/).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("webui", "integration tests against a real WebUI (opt-in)")
    group.addoption("--webui-dir", default=None, help="AUTOMATIC1111 v1.10.1 checkout (harness layout)")
    group.addoption("--forge-dir", default=None, help="Forge checkout (harness layout)")
    group.addoption("--neo-dir", default=None, help="Forge Neo checkout (shared/harness/neo layout)")
    group.addoption("--neo-model", default=None,
                    help="checkpoint the Neo suite runs on: sd15-random (default) or sdxl-random (in models/Stable-diffusion)")
    group.addoption("--neo-args", default=None,
                    help="extra Neo flags for its launch (NEO_EXTRA_ARGS), e.g. --bf16-unet; default: --bf16-unet for "
                         "sdxl-random on a machine with less than 32 GiB of RAM, else none")
    group.addoption("--webui-port", default=None, help="port for the WebUI under test (default 7871)")


def _dir_option(config: pytest.Config, name: str) -> Path | None:
    value = config.getoption(name, default=None) or os.environ.get(name.lstrip("-").replace("-", "_").upper())
    return Path(value).expanduser().resolve() if value else None


def _checkout(config: pytest.Config, option: str, what: str) -> Path:
    """The checkout named by `option`: skip the test when it is absent, fail when it is no WebUI."""
    path = _dir_option(config, option)
    if path is None:
        pytest.skip(f"{what} integration tests need {option} DIR (see tests/webui/conftest.py)")
    if not (path / "launch.py").is_file():
        pytest.fail(f"{option} {path} is not a WebUI checkout (no launch.py)")
    return path


@pytest.fixture(scope="session")
def webui_dir(request: pytest.FixtureRequest) -> Path:
    return _checkout(request.config, "--webui-dir", "A1111")


@pytest.fixture(scope="session")
def forge_dir(request: pytest.FixtureRequest) -> Path:
    return _checkout(request.config, "--forge-dir", "Forge")


@pytest.fixture(scope="session")
def neo_dir(request: pytest.FixtureRequest) -> Path:
    return _checkout(request.config, "--neo-dir", "Forge Neo")


@pytest.fixture(scope="session")
def neo_model(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--neo-model", default=None) or os.environ.get("NEO_MODEL_NAME") or "sd15-random"


@pytest.fixture(scope="session")
def neo_args(request: pytest.FixtureRequest) -> str | None:
    """Extra Neo launch flags, or None for the suite's default for the model."""
    return request.config.getoption("--neo-args", default=None)


@pytest.fixture(scope="session")
def webui_port(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--webui-port", default=None) or 7871)
