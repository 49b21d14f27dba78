"""Every `python` code block of README.md and docs/*.md runs: in order, one namespace per file,
as a reader pasting them into one Python session would. A block that imports a trainer runs where
the pinned trainers are installed (always in CI, see tests/trainers/trainer_env.py)."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
TRAINER_IMPORT = re.compile(r"from kl_kernels\.integrations import (\w+)")


def blocks(path):
    return BLOCK.findall(path.read_text())


def test_the_readme_has_code_to_run():
    assert len(blocks(ROOT / "README.md")) >= 2


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_code_blocks_run(path, monkeypatch):
    from trainers.trainer_env import require

    monkeypatch.chdir(ROOT)
    namespace = {"__name__": f"docs_{path.stem}"}
    for number, code in enumerate(blocks(path), 1):
        for trainer in TRAINER_IMPORT.findall(code):
            require(trainer)
        exec(compile(code, f"{path.name}, python block {number}", "exec"), namespace)  # noqa: S102


def test_the_clone_folder_cannot_shadow_the_package(tmp_path):
    """Issue 38: a clone in a folder named `kl_kernels` (git's default name for this repository), run
    from its parent, is found by `import kl_kernels` as an empty namespace package before the editable
    install. The README's clone command names a folder Python cannot import; the trap is real."""
    import re
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    folder = re.search(r"git clone \S+(?: \S+)* (\S+) && cd \1", readme).group(1)
    assert not folder.isidentifier(), f"the README clones into {folder!r}, an importable name"
    (tmp_path / "kl_kernels" / "kl_kernels").mkdir(parents=True)  # a clone named kl_kernels
    done = subprocess.run([sys.executable, "-c", "import kl_kernels; print(hasattr(kl_kernels, 'kl_penalty'))"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.strip() == "False"  # shadowed: why the README names another folder
    (tmp_path / folder).mkdir()
    done = subprocess.run([sys.executable, "-c", "import kl_kernels; print(hasattr(kl_kernels, 'kl_penalty'))"],
                          capture_output=True, text=True, cwd=tmp_path / folder)
    assert done.stdout.strip() == "True", done.stderr
