"""The deployment files stay true to the code (Docker is not available here to run them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from kvadrupel.cli import _parser
from kvadrupel.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_every_kvadrupel_service_runs_a_real_cli_command() -> None:
    services = compose()["services"]
    commands = {name: svc["command"] for name, svc in services.items()
                if isinstance(svc.get("command"), list) and svc["command"][0] == "kvadrupel"}
    assert set(commands) >= {"migrate", "api", "ingest", "evaluate", "deliver", "scheduler"}
    parser = _parser()
    for name, argv in commands.items():
        parsed = parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown command or flag
        assert parsed.cmd == argv[1], name


def test_compose_environment_names_real_settings() -> None:
    env = compose()["x-kvadrupel"]["environment"]
    fields = {f"KVADRUPEL_{name.upper()}" for name in Settings.model_fields}
    unknown = [k for k in env if k.startswith("KVADRUPEL_") and k not in fields]
    assert not unknown, f"compose sets settings that do not exist: {unknown}"


def test_dockerfile_copies_every_package() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for pkg in ("kvadrupel", "engine", "rules", "channels", "scheduler", "api", "shards"):
        assert f"COPY {pkg} ./{pkg}" in text


def _metric_names_used() -> set[str]:
    names: set[str] = set()
    for path in [DEPLOY / "prometheus" / "alerts.yml", DEPLOY / "grafana" / "kvadrupel.json"]:
        names |= set(re.findall(r"\bkvadrupel_[a-z_]+", path.read_text()))
    return names


def test_alerts_and_dashboard_use_metrics_that_exist(tmp_path: Path) -> None:
    # Given the API app (it registers the request middleware and the control gauges)
    from api.app import create_app
    from kvadrupel.container import Container

    c = Container(Settings(data_dir=tmp_path))
    c.migrate()
    create_app(c)
    exported: set[str] = set()
    for family in REGISTRY.collect():
        # A labelled metric has no samples until used: derive its series names.
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                    "gauge": [""]}.get(family.type, [""])
        exported |= {s.name for s in family.samples} | {family.name + x for x in suffixes}
    used = _metric_names_used()
    missing = sorted(n for n in used if n not in exported)
    c.close()
    assert used and not missing, f"dashboards/alerts use metrics nobody exports: {missing}"


def test_dashboard_is_valid_json_with_panels() -> None:
    dash = json.loads((DEPLOY / "grafana" / "kvadrupel.json").read_text())
    assert dash["panels"] and all(p["targets"] for p in dash["panels"])


@pytest.mark.parametrize("doc", ["alerts.yml", "prometheus.yml"])
def test_prometheus_files_parse(doc: str) -> None:
    assert yaml.safe_load((DEPLOY / "prometheus" / doc).read_text())
