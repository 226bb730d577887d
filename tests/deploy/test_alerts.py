"""deploy/prometheus/alerts.yaml: promtool accepts it and its unit tests (alerts.test.yaml) pass, every alert is
shown firing and held back there, and every expression names only what metrics.py declares."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.support.promtool import MISSING, promql_problems, promtool_run

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yaml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yaml"


def promtool(*args: str | Path) -> tuple[int, str]:
    done = promtool_run(*args)
    if done is None:
        pytest.skip(MISSING)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules():
    code, said = promtool("check", "rules", ALERTS)
    assert code == 0, said
    assert "SUCCESS" in said


def test_the_rules_check_can_fail(tmp_path):
    broken = tmp_path / "alerts.yaml"
    broken.write_text(ALERTS.read_text().replace("(max by (model) (difflens_queue_depth) > 20)",
                                                 "(max by (model) (difflens_queue_depth > 20)", 1))
    code, said = promtool("check", "rules", broken)
    assert code != 0 and "parse error" in said, said


def test_the_alert_unit_tests_pass():
    code, said = promtool("test", "rules", ALERT_TESTS)
    assert code == 0, said


def test_the_alert_unit_tests_can_fail(tmp_path):
    """The same unit tests against rules whose queue-lag floor moved: the case that fires there no longer does."""
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    (tmp_path / "alerts.yaml").write_text(ALERTS.read_text().replace("difflens_queue_depth) > 20)",
                                                                     "difflens_queue_depth) > 200)", 1))
    code, said = promtool("test", "rules", tmp_path / ALERT_TESTS.name)
    assert code != 0 and "DifflensQueueLagGrowing" in said, said


def test_every_alert_is_tested_firing_and_not_firing(rules):
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in rules:
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']}: never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']}: never shown holding back"


def test_the_file_is_a_plain_rules_file(rules):
    """The Helm chart's PrometheusRule takes its groups as they are."""
    assert set(yaml.safe_load(ALERTS.read_text())) == {"groups"}
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)) == 5
    assert all("record" not in rule for rule in rules)


def test_every_alert_has_severity_summary_and_runbook(rules):
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 200, f"{rule['alert']}: say what to check and do"


def test_alert_expressions_name_only_declared_metrics_and_labels(rules):
    problems = {rule["alert"]: promql_problems(rule["expr"], " ".join(rule["annotations"].values()))
                for rule in rules}
    assert {k: v for k, v in problems.items() if v} == {}


def test_no_live_worker_waits_longer_than_a_model_load(rules):
    """A pool scaled to zero has no worker while its first pod starts and loads the model: minutes."""
    rule = next(r for r in rules if r["alert"] == "DifflensNoLiveWorker")
    assert rule["for"].endswith("m") and int(rule["for"][:-1]) >= 10
