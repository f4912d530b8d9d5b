#!/usr/bin/env python3
"""`make helm-check`: the Helm chart, the Dockerfile and the alert rules, checked with real tools.

For the chart's defaults and each values file in <chart>/ci/: lint (Helm SDK, strict), render
(Helm SDK), parse every rendered document, validate it against the Kubernetes schemas
(kubernetes-validate --strict; the Prometheus Operator objects against the fields the chart uses),
and scan it with checkov. Then: the chart's PrometheusRule and dashboard ConfigMap hold exactly
files/alerts.yml and files/dashboard.json; the ConfigMap's PRESENCE_* names are the gateway's own
(read from gateway/src/config/mod.rs), with the same defaults; promtool checks and unit-tests
the alert rules; hadolint and checkov scan the Dockerfile. Any failure exits 1 and says which
step failed.

Runs in the venv `make helm-check` makes (tools/helm-check/requirements.txt); promtool comes from
Debian's prometheus package.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "presence-gateway"
BIN = Path(sys.executable).parent

# Findings skipped on purpose. Every other checkov finding fails the check.
CHECKOV_SKIPS = {
    "CKV_K8S_35": "secrets as environment variables: the gateway reads its settings only from "
    "flags and PRESENCE_* variables (one name for each, README); they come from a Secret by "
    "secretKeyRef, so no value is in the pod spec. Reading them from files needs a gateway change.",
}
# Findings skipped for one values file only: the production-like one passes them.
CHECKOV_SKIPS_BY_VALUES = {
    "minimal-values.yaml": {
        "CKV_K8S_43": "image by digest: a chart default cannot know the digest of the image an "
        "operator builds; production-values.yaml sets image.digest and passes.",
        "CKV_K8S_15": "pull policy Always: IfNotPresent is right for a pinned image, and a digest "
        "(production-values.yaml) makes checkov accept it.",
        "CKV2_K8S_6": "NetworkPolicy: opt-in (networkPolicy.enabled), since its egress must name "
        "the operator's Redis and hook targets; production-values.yaml enables it and passes.",
    },
}
DOCKERFILE_SKIPS = {
    "CKV_DOCKER_2": "HEALTHCHECK: the distroless image has no shell or HTTP client to run one; "
    "Kubernetes probes /healthz and /readyz (the chart sets them).",
}

# The chart sets these outside `config`, or never (each for the reason given).
SET_ELSEWHERE = {
    "PRESENCE_LISTEN": "containerPort",
    "PRESENCE_KEY_PREFIX": "redis.keyPrefix",
    "PRESENCE_REDIS_CLUSTER": "redis.cluster",
    "PRESENCE_REDIS_URL": "redis.url, in the Secret",
    "PRESENCE_API_KEY": "secrets.apiKey",
    "PRESENCE_JWT_SECRET": "secrets.jwtSecret",
    "PRESENCE_WEBHOOK_SECRET": "secrets.webhookSecret",
    "PRESENCE_NODE_ID": "never: each pod's id is its name (the gateway's default)",
    "PRESENCE_DEV": "never: laptop mode",
}
# Chart defaults that differ from the gateway's on purpose.
OWN_DEFAULTS = {
    "PRESENCE_LOG_FORMAT": "json: one object per line, for the cluster's log collector",
}

# The fields of the Prometheus Operator objects the chart writes, as the operator's CRDs
# (monitoring.coreos.com/v1) define them; anything else is refused, like --strict does.
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": LABELS, "annotations": LABELS},
    "additionalProperties": False,
}

def crd(kind, spec):
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                       "metadata": METADATA, "spec": spec},
        "additionalProperties": False,
    }


CRD_SCHEMAS = {
    "ServiceMonitor": crd("ServiceMonitor", {
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "selector": {"type": "object", "additionalProperties": False,
                         "properties": {"matchLabels": LABELS}},
            "namespaceSelector": {
                "type": "object", "additionalProperties": False,
                "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                               "interval": DURATION, "scrapeTimeout": DURATION}}},
        },
    }),
    # The groups themselves go through promtool (same_rules_as_file).
    "PrometheusRule": crd("PrometheusRule", {
        "type": "object", "required": ["groups"], "additionalProperties": False,
        "properties": {"groups": {"type": "array", "minItems": 1}},
    }),
}


class Failed(Exception):
    pass


def step(name):
    print(f"helm-check: {name}", flush=True)


def run(cmd, what):
    """Runs a tool; its output is shown only when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise Failed(f"{what} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def values_sets(chart):
    """(file name, values) of each ci/*-values.yaml: minimal-values.yaml is the chart's defaults
    plus the least an install needs."""
    return [(path.name, yaml.safe_load(path.read_text()) or {})
            for path in sorted((chart / "ci").glob("*-values.yaml"))]


def lint(chart, values, label):
    result = helm_python.lint(str(chart), values, strict=True, quiet=True)
    # Helm's severities: 1 info, 2 warning, 3 error; strict lint fails on warnings too.
    problems = list(result.get("errors") or []) + [
        f"{m['path']}: {m['error']}" for m in result.get("messages") or [] if m.get("severity", 0) >= 2
    ]
    if problems:
        raise Failed(f"helm lint ({label}):\n  " + "\n  ".join(map(str, problems)))


def render(chart, values, label):
    """Renders the chart as `helm install presence -n chat` would; returns {template: [objects]}."""
    try:
        out = helm_python.Chart.load(str(chart)).render(
            values, name="presence", namespace="chat", is_install=True)
    except helm_python.HelmError as e:
        raise Failed(f"helm render ({label}): {e}") from e
    objects = {}
    for template, text in sorted(out.items()):
        if template.endswith("NOTES.txt"):
            continue
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            raise Failed(f"{template} ({label}) is not valid YAML:\n{e}") from e
        for d in docs:
            if not isinstance(d, dict) or "kind" not in d:
                raise Failed(f"{template} ({label}) rendered something that is no Kubernetes object: {d!r:.200}")
        objects[template] = docs
    return objects


def write(objects, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    for template, docs in objects.items():
        if docs:
            (out_dir / Path(template).name).write_text(yaml.safe_dump_all(docs, sort_keys=False))


def validate(objects, out_dir, label):
    core = [p for p in sorted(out_dir.glob("*.yaml"))
            if not any(d["kind"] in CRD_SCHEMAS for d in yaml.safe_load_all(p.read_text()))]
    run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", *map(str, core)],
        f"kubernetes-validate --strict ({label})")
    for docs in objects.values():
        for d in docs:
            if d["kind"] in CRD_SCHEMAS:
                try:
                    jsonschema.validate(d, CRD_SCHEMAS[d["kind"]])
                except jsonschema.ValidationError as e:
                    raise Failed(f"{d['kind']} ({label}): {e.message} at {list(e.absolute_path)}") from e


def checkov(args, skips, label):
    done = subprocess.run(
        [str(BIN / "checkov"), *args, "--skip-download", "--quiet", "--compact",
         "--skip-check", ",".join(sorted(skips)) or "NONE", "-o", "json"],
        capture_output=True, text=True)
    try:
        reports = json.loads(done.stdout) if done.stdout.strip() else []
    except json.JSONDecodeError:
        reports = None
    if reports is None or (done.returncode != 0 and not reports):
        raise Failed(f"checkov ({label}) failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    failed = [c for r in (reports if isinstance(reports, list) else [reports])
              for c in r.get("results", {}).get("failed_checks", [])]
    if failed or done.returncode != 0:
        raise Failed(f"checkov ({label}):\n  " + "\n  ".join(
            f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in failed))


def kinds(objects):
    return {d["kind"] for docs in objects.values() for d in docs}


def same_rules_as_file(objects, chart):
    rules = [d for docs in objects.values() for d in docs if d["kind"] == "PrometheusRule"]
    plain = yaml.safe_load((chart / "files" / "alerts.yml").read_text())
    if [r["spec"] for r in rules] != [plain]:
        raise Failed("the PrometheusRule's spec differs from files/alerts.yml")


def same_dashboard_as_file(objects, chart):
    maps = [d for docs in objects.values() for d in docs
            if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    plain = json.loads((chart / "files" / "dashboard.json").read_text())
    if len(maps) != 1 or json.loads(maps[0]["data"]["presence-gateway.json"]) != plain:
        raise Failed("the dashboard ConfigMap does not hold files/dashboard.json")


def gateway_settings():
    """{PRESENCE_NAME: default or None} from the gateway's clap attributes."""
    source = (ROOT / "gateway" / "src" / "config" / "mod.rs").read_text()
    settings = {}
    for attr in re.findall(r"#\[arg\((.*?)\)\]", source, re.S):
        env = re.search(r'env\s*=\s*"(PRESENCE_[A-Z_]+)"', attr)
        if not env:
            continue
        default = None
        if m := re.search(r"default_value_t\s*=\s*([^,\n]+)", attr):
            expr = m.group(1).strip().replace("_", "")
            if re.fullmatch(r"[0-9 <*+]+", expr):
                default = str(eval(expr))  # digits and <<, *, + only (checked above)
            elif re.fullmatch(r"[A-Za-z]+::[A-Za-z]+", expr):
                default = expr.split("::")[1].lower()
            elif expr in ("true", "false"):
                default = expr
        elif m := re.search(r'default_value\s*=\s*"([^"]*)"', attr):
            default = m.group(1)
        settings[env.group(1)] = default
    return settings


def settings_match_gateway(objects, chart):
    gateway = gateway_settings()
    if len(gateway) < 30:
        raise Failed(f"found only {len(gateway)} PRESENCE_* settings in gateway/src/config/mod.rs")
    config = next(d for docs in objects.values() for d in docs
                  if d["kind"] == "ConfigMap" and not d["metadata"]["name"].endswith("-dashboard"))
    chart_values = yaml.safe_load((chart / "values.yaml").read_text())["config"]
    chart_names = {"PRESENCE_" + re.sub(r"([A-Z])", r"_\1", k).upper(): v for k, v in chart_values.items()}
    problems = []
    for name in sorted(set(chart_names) - set(gateway)):
        problems.append(f"{name} (values.yaml config) is no gateway setting")
    for name in sorted(set(gateway) - set(chart_names) - set(SET_ELSEWHERE)):
        problems.append(f"{name} cannot be set through the chart")
    for name in sorted(set(config["data"]) - set(gateway)):
        problems.append(f"the ConfigMap sets {name}, which the gateway does not read")
    for name, default in sorted(gateway.items()):
        ours = config["data"].get(name)
        if default is not None and ours is not None and ours != default and name not in OWN_DEFAULTS:
            problems.append(f"{name}: the chart's default {ours!r} is not the gateway's {default!r}")
    if problems:
        raise Failed("chart settings vs gateway/src/config/mod.rs:\n  " + "\n  ".join(problems))


def values_documented(chart):
    """Every value is in the chart's README table (free-form maps as a whole)."""
    readme = (chart / "README.md").read_text()
    missing = []

    def walk(prefix, values):
        for key, value in values.items():
            path = f"{prefix}{key}"
            if f"`{path}`" in readme:
                continue
            if isinstance(value, dict) and value:
                walk(path + ".", value)
            else:
                missing.append(path)

    walk("", yaml.safe_load((chart / "values.yaml").read_text()))
    if missing:
        raise Failed("values missing from the chart's README.md: " + ", ".join(missing))


def refuses_without_redis(chart):
    try:
        helm_python.Chart.load(str(chart)).render({}, name="presence", namespace="chat", is_install=True)
    except helm_python.HelmError as e:
        if "set redis.url" in str(e):
            return
        raise Failed(f"rendering bare defaults failed for another reason: {e}") from e
    raise Failed("the chart rendered without a Redis: it must refuse (pods would not share presence)")


def check(chart, work, scans):
    step("alert rules: promtool check rules, promtool test rules")
    run(["promtool", "check", "rules", str(chart / "files" / "alerts.yml")], "promtool check rules")
    run(["promtool", "test", "rules", str(chart / "files" / "alerts_test.yml")], "promtool test rules")
    step("chart: every value documented in README.md")
    values_documented(chart)
    step("chart: lint with bare defaults")
    lint(chart, None, "bare defaults")
    step("chart: bare defaults are refused (no Redis)")
    refuses_without_redis(chart)
    production = None
    for label, values in values_sets(chart):
        step(f"chart ({label}): lint, render, kubernetes-validate --strict" + (", checkov" if scans else ""))
        lint(chart, values, label)
        objects = render(chart, values, label)
        out_dir = work / label
        write(objects, out_dir)
        validate(objects, out_dir, label)
        if scans:
            checkov(["-d", str(out_dir), "--framework", "kubernetes"],
                    {**CHECKOV_SKIPS, **CHECKOV_SKIPS_BY_VALUES.get(label, {})}, label)
        if label == "minimal-values.yaml":
            settings_match_gateway(objects, chart)
        if label == "production-values.yaml":
            production = objects
    if production is None:
        raise Failed("ci/production-values.yaml is missing")
    step("chart (production-values.yaml): ServiceMonitor, PrometheusRule, NetworkPolicy, dashboard")
    missing = {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "HorizontalPodAutoscaler",
               "PodDisruptionBudget"} - kinds(production)
    if missing:
        raise Failed(f"production-values.yaml rendered no {', '.join(sorted(missing))}")
    same_rules_as_file(production, chart)
    same_dashboard_as_file(production, chart)
    if scans:
        step("Dockerfile: hadolint, checkov")
        run([str(BIN / "hadolint"), str(ROOT / "Dockerfile")], "hadolint Dockerfile")
        checkov(["-f", str(ROOT / "Dockerfile"), "--framework", "dockerfile"], DOCKERFILE_SKIPS, "Dockerfile")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=CHART, help="chart directory (default: ours)")
    parser.add_argument("--out", type=Path, help="keep the rendered manifests here")
    parser.add_argument("--no-scans", action="store_true", help="skip checkov and hadolint")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="helm-check-"))
    helm_python.disable_logging()
    try:
        check(args.chart.resolve(), work, not args.no_scans)
    except Failed as e:
        print(f"helm-check: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    print("helm-check: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
