"""The fused launcher is a well-behaved Hydra launcher: Hydra's own launcher test suites (as
Hydra's joblib and submitit plugins run them) pass against it. Their task functions are not
runner's, so it runs their jobs one by one, as the basic launcher does."""

import logging

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra import version
from hydra.version import VersionBase
from pytest import mark


@pytest.fixture(autouse=True)
def as_in_hydras_own_test_session():
    """Hydra's suites run where no app has set Hydra's version base yet (as in its plugins' own
    test sessions; other tests here import runner.cli, whose @hydra.main sets it), and their
    jobs configure logging (root at INFO, their handlers): restored for the tests after."""
    base = VersionBase.instance()
    before = base.version_base
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    version.setbase("1.1")  # what an unset version base means to Hydra 1.3
    yield
    base.version_base = before
    root.setLevel(level)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)


@mark.parametrize("launcher_name, overrides", [("fused", [])])
class TestFusedLauncher(LauncherTestSuite):
    pass


@mark.parametrize("task_launcher_cfg, extra_flags", [
    ({"defaults": [{"override hydra/launcher": "fused"}]}, ["-m"]),
])
class TestFusedLauncherIntegration(IntegrationTestSuite):
    pass
