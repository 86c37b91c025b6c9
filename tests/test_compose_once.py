"""A single run composes its config once, and gets what Hydra's two compositions give it."""

import contextlib

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

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


