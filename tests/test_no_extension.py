"""An installation without the C++ extension (KL_KERNELS_NO_EXTENSION=1, or a failed build): the package
imports without a warning, says why `cpu` is unavailable in plain words, and every feature runs on the
`reference` backend - the sampling-replay suite included (issue 36: a kept_ids call asked the
dispatcher about an op that was never registered, and crashed).

The extension is hidden from a fresh interpreter by an import hook (the files stay where they are), so
this runs in the same install as the rest of the suite."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HIDE_EXTENSION = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kl_kernels._C" or name.startswith("kl_kernels._cpu_"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE_EXTENSION + code],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200)


def test_the_reason_is_said_and_reference_serves():
    done = _run("""
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # a missing extension is no cause for a warning
    import torch, kl_kernels
    info = {b.name: b for b in kl_kernels.available_backends()}
assert not info["cpu"].available and "not installed" in info["cpu"].reason, info["cpu"]
assert "reference" in info["cpu"].reason and "partially initialized" not in info["cpu"].reason
logits, labels = torch.randn(3, 50), torch.tensor([1, 2, 3])
kept = torch.tensor([[1, 4, -1], [2, 2, 7], [-1, -1, -1]])
out = kl_kernels.kl_penalty(logits.requires_grad_(), labels, ref_logprobs=-torch.ones(3), kept_ids=kept)
out.kl.sum().backward()
print("ok", torch.isfinite(out.kl).all().item())
""")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok True"


@pytest.mark.slow  # a minute: the whole replay suite in a fresh interpreter (the quick check above stays)
def test_the_replay_suite_runs_without_the_extension():
    done = _run("""
import pytest
sys.exit(pytest.main(["tests/test_replay.py", "-q", "-x", "-p", "no:cacheprovider",
                      "--deselect", "tests/test_replay.py::test_a_wide_row_alone_and_in_a_batch[cpu]",
                      "--deselect", "tests/test_replay.py::test_the_cpu_kernel_marks_the_same_entries_as_the_sort"]))
""")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "[cpu]" not in done.stdout
