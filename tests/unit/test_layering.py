"""The ingress must never import torch (it runs on cheap CPU replicas)."""
import subprocess
import sys


def test_ingress_app_does_not_import_torch():
    code = ("import sys, ingress.app, ingress.api, deployments.builder; "
            "bad = [m for m in ('torch', 'transformers', 'diffusers', 'sentence_transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
