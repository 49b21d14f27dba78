"""The trainers' own tests, as their releases ship them (in the wheels pip installed), run with
patch() active (patch_plugin.py): everything must pass, and the counts say which replaced functions
those tests reached. TRL ships no tests in its wheel or sdist; its own functions are exercised
patched vs unpatched in test_trl_integration.py."""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from trainer_env import STUBS, require

SUITES = {
    "verl": ["tests/trainer/ppo/test_core_algos_on_cpu.py", "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",
             "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",
             "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py",
             "tests/trainer/ppo/test_metric_utils_on_cpu.py", "tests/trainer/ppo/test_rollout_corr.py",
             "tests/trainer/ppo/test_rollout_corr_integration.py"],
    "openrlhf": ["tests/test_actor_entropy_temperature.py", "tests/test_kl_estimator_gradient.py",
                 "tests/test_loss_aggregation.py", "tests/test_experience.py", "tests/test_reward_shaping.py"],
}
# Tests of the shipped suites allowed to fail under patch(), with the reason: none so far.
EXPECTED_FAILURES: dict[str, str] = {}


@pytest.mark.parametrize("trainer", sorted(SUITES))
def test_shipped_suite_passes_under_patch(trainer, tmp_path):
    require(trainer)
    shipped = {str(f): f for f in importlib.metadata.files(trainer)}
    files = [str(shipped[path].locate()) for path in SUITES[trainer]]
    report = tmp_path / "patch.json"
    env = dict(os.environ, KL_KERNELS_PATCH=trainer, KL_KERNELS_PATCH_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), STUBS, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "patch_plugin", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), "-o", "addopts=", *files],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    failed = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("FAILED ")]
    unexpected = [name for name in failed if name.split("::")[-1] not in EXPECTED_FAILURES]
    assert not unexpected and run.returncode in (0, 1), f"{trainer}: {summary}\n{run.stdout[-4000:]}"
    assert " passed" in summary, summary
    patched = json.loads(report.read_text())
    assert patched["replaced"], "patch() replaced nothing"
    print(f"{trainer} shipped tests under patch(): {summary}; fused/original calls: {patched['counts']}")
