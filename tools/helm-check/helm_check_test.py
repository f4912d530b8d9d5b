"""helm-check fails where it must: each test breaks a copy of the chart one way and runs
helm_check.py on it, which must exit 1 naming the problem. `make helm-check` runs these."""

import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHART = HERE.parents[1] / "helm" / "presence-gateway"


class HelmCheckFails(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="helm-check-test-"))
        self.chart = self.tmp / "presence-gateway"
        shutil.copytree(CHART, self.chart)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def edit(self, path, old, new):
        file = self.chart / path
        text = file.read_text()
        self.assertIn(old, text, f"{path} changed: update this test")
        file.write_text(text.replace(old, new, 1))

    def check(self):
        """helm_check.py on the copy: (exit code, output)."""
        done = subprocess.run(
            [sys.executable, str(HERE / "helm_check.py"), "--chart", str(self.chart), "--no-scans"],
            capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr

    def assert_fails(self, *expected):
        code, output = self.check()
        self.assertEqual(code, 1, output)
        self.assertIn("helm-check: FAILED", output)
        for text in expected:
            self.assertIn(text, output)
        return output

    def test_the_chart_itself_passes(self):
        code, output = self.check()
        self.assertEqual(code, 0, output)

    def test_template_syntax_error(self):
        self.edit("templates/deployment.yaml", "replicas: {{ .Values.replicaCount }}",
                  "replicas: {{ .Values.replicaCount ")
        self.assert_fails("deployment.yaml")

    def test_template_rendering_invalid_yaml(self):
        self.edit("templates/service.yaml", "  sessionAffinity: None", "  sessionAffinity: None\n   broken: indentation")
        self.assert_fails("service.yaml")

    def test_template_rendering_an_invalid_kubernetes_object(self):
        self.edit("templates/deployment.yaml", "containerPort: {{ .Values.containerPort }}",
                  "containerPorts: {{ .Values.containerPort }}")
        self.assert_fails("kubernetes-validate --strict")

    def test_wrong_value_type(self):
        self.edit("ci/minimal-values.yaml", "secrets:", "replicaCount: three\nsecrets:")
        self.assert_fails("/replicaCount", "want integer")

    def test_drain_longer_than_the_grace_period(self):
        self.edit("ci/minimal-values.yaml", "secrets:", "config:\n  drainSpreadSecs: 60\nsecrets:")
        self.assert_fails("shutdownGraceSecs (30) must be at least")

    def test_alert_rule_that_no_longer_fires(self):
        self.edit("files/alerts.yml", "expr: presence_backend_up == 0", "expr: presence_backend_up == 2")
        self.assert_fails("promtool test rules")

    def test_setting_the_gateway_does_not_have(self):
        self.edit("values.yaml", "  batchMax: 100", "  batchMax: 100\n  batchMaxx: 100")
        self.edit("values.schema.json", '"batchMax": {', '"batchMaxx": {"type": "integer"},\n      "batchMax": {')
        self.assert_fails("PRESENCE_BATCH_MAXX (values.yaml config) is no gateway setting")


if __name__ == "__main__":
    unittest.main(verbosity=2)
