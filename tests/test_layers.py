"""The house's layers (design.md §11.2): the library imports nothing above it and nothing in a circle,
reading frames stays light, and the installed distribution claims no generic names."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sfllava_convert.tiny.command import REPO, run_env
from sfllava_convert.tiny.videos import make_ffv1_video

# The folders and the import names they are installed as (pyproject's package-dir).
FOLDERS = {"sfllava_mlx": "sfllava_mlx", "convert": "sfllava_convert", "app": "sfllava_app"}


def modules(folder: str) -> dict:
    """{module name: path} of every .py file under a top-level folder, by its import name."""
    root = Path(REPO) / folder
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([FOLDERS[folder], *parts])] = path
    return out


def imports_of(name: str, path: Path, known: set) -> set:
    """Every module `name` imports, anywhere in it (functions too), resolved to the modules
    of `known` where it names one: `from . import x` is the submodule x if there is one,
    else the package's __init__ itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out.update(subs or [target])
            if subs and len(subs) < len(node.names):
                out.add(target)
    return out


def graph(folder: str) -> dict:
    mods = modules(folder)
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_the_library_imports_nothing_above_it():
    for name, imported in graph("sfllava_mlx").items():
        upward = {m for m in imported
                  if m.split(".")[0] in ("app", "convert", "sfllava_app", "sfllava_convert", "tests")}
        assert not upward, f"{name} imports {sorted(upward)}"


def test_the_converter_imports_no_command():
    for name, imported in graph("convert").items():
        assert not {m for m in imported if m.split(".")[0] in ("app", "sfllava_app")}, name


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_no_import_cycle_and_no_folder_name_imports(folder):
    g = graph(folder)
    for name, imported in g.items():
        # The folder's own name is not its import name: `import app` would load a second copy.
        wrong = {m for m in imported if m.split(".")[0] in ("app", "convert")}
        assert not wrong, f"{name} imports {sorted(wrong)} (use {FOLDERS[folder]} or a relative import)"
    edges = {n: {m for m in imported if m in g and m != n} for n, imported in g.items()}
    state: dict = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(edges[n]):
            if state.get(m) == "open":
                cycle = path[path.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m, path + [m])
        state[n] = "done"

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])


def test_pyproject_lists_every_package():
    from setuptools.config.pyprojecttoml import read_configuration  # reads TOML on 3.10 too

    config = read_configuration(Path(REPO) / "pyproject.toml")["tool"]["setuptools"]
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}
    found = {name for folder in FOLDERS for name, path in modules(folder).items()
             if path.name == "__init__.py"}
    assert set(config["packages"]) == found


def fresh_python(code: str, tmp_path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=run_env(tmp_path), cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


HEAVY = ("mlx_lm", "transformers", "torch")


def test_reading_frames_imports_neither_mlx_lm_nor_transformers(tmp_path):
    video = tmp_path / "v.mkv"
    make_ffv1_video(video, 20)
    loaded = fresh_python(
        "import json, sys\n"
        "from sfllava_mlx.frames import read_frames\n"
        f"clip = read_frames({str(video)!r}, num_frames=8)\n"
        f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))", tmp_path)
    assert not any(loaded.values()), loaded


def test_sfllava_frames_without_a_model_stays_light(tmp_path):
    video = tmp_path / "v.mkv"
    make_ffv1_video(video, 20)
    loaded = fresh_python(
        "import contextlib, io, json, sys\n"
        "from sfllava_app.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['frames', {str(video)!r}, '--json', '--num-frames', '8']) == 0\n"
        f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))", tmp_path)
    assert not any(loaded.values()), loaded


@pytest.mark.slow
def test_the_wheel_holds_the_three_packages_and_no_generic_names(wheel):
    """What a plain `pip install .` puts into site-packages: sfllava_mlx, sfllava_convert and
    sfllava_app, with every module of the three folders, and an `sfllava` command."""
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == set(FOLDERS.values())
    for folder in FOLDERS:
        for name, path in modules(folder).items():
            inside = "/".join(name.split(".")) + ("/__init__.py" if path.name == "__init__.py" else ".py")
            assert inside in names, f"{inside} is missing from the wheel"
    for page in ("index.html", "page.js", "page.css"):  # the server's page (design.md §7.6)
        assert f"sfllava_app/serve/page/{page}" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sfllava = sfllava_app.cli:entry" in zipfile.ZipFile(wheel).read(entry).decode()
    # MLX has no backend on Linux unless one is asked for: the plain install asks for the CPU one.
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    requires = [line for line in metadata.decode().splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("Requires-Dist: mlx[cpu]") and "linux" in r for r in requires), requires
    assert not any(r.split(":")[1].split(";")[0].strip().startswith(("torch", "transformers"))
                   and "extra ==" not in r for r in requires), "torch is an extra, never needed to chat"


def test_no_dead_code():
    """vulture over the three packages reports nothing beyond vulture_whitelist.py, whose
    every entry says who uses the name (pyproject.toml's [tool.vulture])."""
    import shutil

    exe = shutil.which("vulture", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("vulture is not installed (the test extra has it)")
    r = subprocess.run([exe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout == "", r.stdout
