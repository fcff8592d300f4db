"""bench/ is a package: every benchmark runs as `python -m bench.NAME`, says what it does
with `--help` without loading mlx-lm or torch, and imports nothing from tests/ (its helpers
are sfllava_convert.tiny's)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from sfllava_convert.tiny.command import REPO, run_env

BENCHES = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__")
HEAVY = ("mlx_lm", "torch", "transformers")


def test_every_benchmark_answers_help(tmp_path):
    runs = {name: subprocess.Popen([sys.executable, "-m", f"bench.{name}", "--help"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=REPO, env=run_env(tmp_path))
            for name in BENCHES}
    assert len(runs) >= 14
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"bench.{name} --help: {err}"
        assert out.startswith("usage:"), f"bench.{name} --help printed {out[:200]!r}"


def test_importing_the_benchmarks_stays_light(tmp_path):
    code = ("import importlib, json, sys\n"
            f"for name in {BENCHES!r}:\n"
            "    importlib.import_module('bench.' + name)\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env=run_env(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_no_benchmark_edits_sys_path_or_imports_tests():
    for name in BENCHES:
        tree = ast.parse((REPO / "bench" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "tests" for a in node.names), name
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "tests", name
            elif isinstance(node, ast.Attribute) and node.attr == "path":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), \
                    f"bench/{name}.py edits sys.path"
