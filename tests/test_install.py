"""loraflow as a downstream team gets it: a non-editable install of the wheel into a fresh venv, used
from a directory outside the checkout. The short demo runs there; then a second host (another
LORAFLOW_HOME, nothing but the bucket) pulls and loads the champion.

The fresh venv reuses the project venv's third-party packages through a .pth line (no network, no
multi-GB torch install); loraflow itself comes only from the wheel: a .pth line adds a directory
to sys.path without running the editable install's finder that lives there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fixtures_assets import make_offline_home

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, *, env, cwd, timeout=900):
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{cmd}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with loraflow installed from its wheel (non-editable); returns its bin/."""
    tmp = tmp_path_factory.mktemp("install")
    # Built from a copy: setuptools leaves build/ in the source tree, and a stale build/lib would
    # both litter the checkout and leak removed modules into later wheels.
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                               ".loraflow", "runs", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist"), str(source)], check=True, capture_output=True)
    [wheel] = (tmp / "dist").glob("loraflow-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
    bin_dir = tmp / "venv" / "bin"
    purelib = Path(subprocess.run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    return bin_dir


def _env(bin_dir: Path, home: Path, **extra: str) -> dict[str, str]:
    # A fresh host: none of this machine's loraflow, AWS or Prefect settings. LORAFLOW_CPU_BF16 stays:
    # the suite pins fp32 on every processor (conftest). The demo's 2-step adapter is gated against
    # the base; in bf16 (a CPU with avx512_bf16) it scored 41.06 against the base's 41.02 perplexity
    # and was not promoted: a gain that small is decided by the precision, not by the code under test.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "LORAFLOW_", "PREFECT_API")) or k == "LORAFLOW_CPU_BF16"}
    # The project venv's bin/ after the new one: console scripts of the reused packages (rclone).
    env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["LORAFLOW_HOME"] = str(home)
    env.update(extra)
    return env


def test_wheel_contents_import_from_the_install_not_the_checkout(installed, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = _env(installed, tmp_path / "home")
    out = _run([installed / "python", "-c",
                "import sys, loraflow, loraflow.registry, loraflow.storage.transfer, loraflow.flows.retrain, "
                "loraflow.tasks.train; print(loraflow.__file__); print(loraflow.flows.retrain.__file__); "
                "print(sorted(m for m in sys.modules if m.startswith('loraflow.demo')))"],
               env=env, cwd=outside)
    lib, flow, demo_modules = out.strip().splitlines()
    assert str(installed.parent) in lib and str(installed.parent) in flow and str(ROOT) not in lib + flow
    assert demo_modules == "[]"  # the production library never imports the embedded demo
    assert "retrain" in _run([installed / "loraflow", "--help"], env=env, cwd=outside)
    assert _run([installed / "python", "-c", "import importlib.resources as r; "
                 "print((r.files('loraflow.demo') / 'demo.yaml').is_file())"], env=env, cwd=outside).strip() == "True"


@pytest.mark.slow
def test_short_demo_from_the_wheel_then_its_printed_commands_and_another_host(installed, tmp_path, asset_wheels):
    import shlex

    from loraflow.demo.s3server import LocalS3Server, local_credentials

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    home = make_offline_home(tmp_path / "home", asset_wheels)
    env = _env(installed, home)
    out = _run([installed / "python", "-m", "loraflow.demo", "--set", "training.max_steps=2",
                "--set", "data.max_eval_samples=8"], env=env, cwd=outside)
    assert "promoted to champion" in out, out[-2000:]
    pull_line = next(line for line in out.splitlines() if "use it" in line)
    printed = pull_line.split("use it", 1)[1].strip()
    assert printed.startswith("loraflow pull smollm2-imdb==")

    # The commands the demo and README print, run as printed in a new shell: no exports, no server
    # to start; they find the local store under LORAFLOW_HOME.
    pulled = Path(_run([installed / "loraflow", *shlex.split(printed)[1:]], env=env, cwd=outside).strip())
    assert (pulled / "adapter_model.safetensors").is_file()
    versions = _run([installed / "loraflow", "versions", "smollm2-imdb"], env=env, cwd=outside)
    assert printed.split("==")[1] in versions and "champion" in versions
    loaded = _run([installed / "python", "-c", "import loraflow; m = loraflow.load_adapter('smollm2-imdb@champion'); "
                   "print(type(m).__name__)"], env=env, cwd=outside)
    assert loaded.strip() == "PeftModelForCausalLM"

    # A second host: its own empty LORAFLOW_HOME, the demo's bucket served to it, nothing else.
    access, secret = local_credentials(home)
    with LocalS3Server(home / "s3", "127.0.0.1:0", access, secret) as server:
        env = _env(installed, tmp_path / "second-host", LORAFLOW_STORAGE__ENDPOINT_URL=server.endpoint_url,
                   AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret)
        pulled = Path(_run([installed / "loraflow", "pull", "smollm2-imdb@champion"], env=env, cwd=outside).strip())
        assert pulled.is_relative_to(tmp_path / "second-host") and (pulled / "adapter_model.safetensors").is_file()
        loaded = _run([installed / "python", "-c", "import loraflow; m = loraflow.load_adapter('smollm2-imdb@champion'); "
                       "print(type(m).__name__, m.peft_config['default'].base_model_name_or_path)"],
                      env=env, cwd=outside)
        assert loaded.split() == ["PeftModelForCausalLM", "s3://loraflow/models/SmolLM2-135M-Instruct"]
        assert (tmp_path / "second-host" / "models" / "s3" / "loraflow").is_dir()  # base fetched from the bucket


def test_the_demo_deployment_runs_the_demo_recipe():
    """`retrain-demo` in prefect.yaml (what the UI's Quick run uses with `make up`) and the packaged
    demo.yaml are two copies of one recipe: they must not drift apart."""
    import yaml

    from loraflow.settings import Settings

    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]}
    demo = Settings.model_validate(yaml.safe_load((ROOT / "src" / "loraflow" / "demo" / "demo.yaml").read_text()))
    deployed = Settings.model_validate(deployments["retrain-demo"]["parameters"]["settings"])
    assert deployed.model_dump(exclude={"prefect"}) == demo.model_dump(exclude={"prefect"})
    assert deployed.prefect.train_deployment == "train-adapter/train-adapter"
    assert deployments["retrain-demo"]["work_pool"]["name"] == "cpu"
