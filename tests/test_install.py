"""`pip install .` (not editable) into a fresh venv gives a working `draft-opd`, run from outside the repository.

The venv gets the project's dependencies from the test environment's site-packages (`--system-site-packages`
cannot see a venv, so a .pth file points at them) and installs only the package itself, without deps: what is
tested is the package's own files (modules, prompt sets, configs), not PyPI.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_package_evaluates_from_another_directory(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    source = tmp_path / "source"  # setuptools builds in the source tree: a copy keeps build/ out of the repo
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info"))
    build = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", str(source)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    installed = purelib / "draft_opd"
    assert (installed / "data" / "prompts" / "gsm8k_test.jsonl").is_file()
    assert (installed / "configs" / "tiny.yaml").is_file()
    assert not any((purelib / name).exists() for name in ("buffer", "launch", "actors", "speculative")), (
        "the package must install under draft_opd/ only, never generic top-level names"
    )

    out = tmp_path / "eval.json"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for config in (str(ROOT / "configs" / "tiny.yaml"), "tiny"):
        run = subprocess.run(
            [
                env_dir / "bin" / "draft-opd",
                "eval",
                config,
                "eval.num_prompts=1",
                "eval.max_new_tokens=8",
                f"eval.out={out}",
            ],
            capture_output=True,
            text=True,
            cwd=elsewhere,
            timeout=600,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        result = json.loads(out.read_text())
        assert result, "eval wrote an empty result"
    where = subprocess.check_output(
        [python, "-c", "import draft_opd.launch.cli as m; print(m.__file__)"], text=True, cwd=elsewhere
    ).strip()
    assert where.startswith(str(purelib)), f"draft_opd imported from {where}, not from the installed copy"
