"""A single run composes its config once, and gets what Hydra's two compositions give it."""

import contextlib
import subprocess
import sys

import pytest
import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import TINY
from runner.compose_once import MODE_RUN, compose_once


@pytest.fixture
def compositions(monkeypatch):
    """The number of full config compositions done so far."""
    count = [0]
    impl = ConfigLoaderImpl._load_configuration_impl

    def counted(self, *args, **kwargs):
        count[0] += 1
        return impl(self, *args, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "_load_configuration_impl", counted)
    return count


def as_hydra_main_runs(overrides):
    """What ``@hydra.main`` does before a job: read the mode, then compose the run's config
    (with ``hydra.mode=RUN`` added when the config leaves the mode unset)."""
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(
        task_name="runner",
        config_search_path=create_automatic_config_search_path("config", None, "pkg://conf"))
    overrides = list(overrides)
    try:
        mode = hydra.get_mode("config", overrides)
        if mode == RunMode.MULTIRUN:
            return mode, None
        if mode is None:
            overrides.append(MODE_RUN)
        cfg = hydra.compose_config("config", overrides, run_mode=RunMode.RUN)
        return mode, OmegaConf.to_container(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("overrides", [
    [],
    ["task=cnn_random_images", "optimizer.lr=0.01", "hydra.job.name=other"],
    ["+device.xla_flags.xla_cpu_enable_fast_math=false", "trainer.steps=7"],
])
def test_one_composition_gives_the_config_of_two(compositions, overrides):
    expected = as_hydra_main_runs(overrides)
    assert compositions[0] == 2
    with compose_once():
        got = as_hydra_main_runs(overrides)
        # after the run's composition, Hydra's own code is back
        assert "compose_once" not in ConfigLoaderImpl.load_configuration.__qualname__
    assert compositions[0] == 3
    assert got == expected
    assert got[1]["hydra"]["mode"] == RunMode.RUN
    assert got[1]["hydra"]["overrides"]["hydra"][-1] == MODE_RUN


def test_a_multirun_mode_from_the_config_still_multiruns(compositions):
    with compose_once():
        assert as_hydra_main_runs(["hydra.mode=MULTIRUN"]) == (RunMode.MULTIRUN, None)
        # the multirun composes as Hydra does: the kept config is not used for it
        GlobalHydra.instance().clear()
        hydra = Hydra.create_main_hydra2(
            task_name="runner",
            config_search_path=create_automatic_config_search_path("config", None,
                                                                   "pkg://conf"))
        cfg = hydra.compose_config("config", ["hydra.mode=MULTIRUN", "optimizer.lr=1,2"],
                                   run_mode=RunMode.MULTIRUN)
        GlobalHydra.instance().clear()
    # composed again, in multirun mode (a run's composition would refuse the sweep "1,2")
    assert compositions[0] == 2 and cfg.hydra.overrides.task == ["optimizer.lr=1,2"]
    assert ConfigLoaderImpl.load_configuration.__name__ == "load_configuration"
    assert "compose_once" not in ConfigLoaderImpl.load_configuration.__qualname__


def test_errors_are_hydras_own(compositions):
    """A sweep without --multirun, a bad option: the same exception as without the shortcut."""
    for overrides in (["optimizer.lr=1e-3,1e-2"], ["task=nope"], ["optimizer.lr=abc"]):
        errors = []
        for shortcut in (False, True):
            with compose_once() if shortcut else contextlib.nullcontext():
                with pytest.raises(Exception) as caught:
                    as_hydra_main_runs(overrides)
            errors.append((type(caught.value), str(caught.value)))
        assert errors[0] == errors[1], overrides




CLI = """
import contextlib, sys
from hydra._internal.config_loader_impl import ConfigLoaderImpl
import runner.compose_once
from runner.__main__ import cli

count = [0]
impl = ConfigLoaderImpl._load_configuration_impl
def counted(self, *args, **kwargs):
    count[0] += 1
    return impl(self, *args, **kwargs)
ConfigLoaderImpl._load_configuration_impl = counted
if sys.argv.pop(1) == "hydra":
    runner.compose_once.compose_once = contextlib.nullcontext
try:
    cli()
finally:
    print("compositions", count[0], file=sys.stderr)
"""


def test_a_cli_run_composes_once_and_records_what_hydra_would(tmp_path):
    """``python -m runner``'s own entry point: one composition instead of two, and the same
    ``.hydra/`` files as with Hydra's two."""
    written = {}
    for way, compositions in (("hydra", 2), ("once", 1)):
        run_dir = tmp_path / way
        proc = subprocess.run(
            [sys.executable, "-c", CLI, way, *TINY, "trainer.log_images=false",
             "optimizer.lr=0.01", f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"compositions {compositions}" in proc.stderr
        hydra_yaml = yaml.safe_load((run_dir / ".hydra/hydra.yaml").read_text())["hydra"]
        hydra_yaml.pop("run")
        hydra_yaml["runtime"].pop("output_dir")
        hydra_yaml["overrides"]["hydra"].remove(f"hydra.run.dir={run_dir}")
        written[way] = (hydra_yaml, (run_dir / ".hydra/config.yaml").read_text(),
                        (run_dir / ".hydra/overrides.yaml").read_text())
    assert written["once"] == written["hydra"]
    assert written["once"][0]["mode"] == "RUN"
    assert written["once"][0]["overrides"]["hydra"] == [MODE_RUN]
