"""The trainers as pip installs them (pinned in tests/trainers/requirements.txt, installed by
run.sh): their functions patched vs unpatched, their own shipped tests under patch(), and a tiny
end-to-end GRPO run. flash-attn cannot be installed without CUDA and OpenRLHF imports it at module
top level: stubs/ holds the names it imports (nothing else is stubbed)."""
import os
import sys

STUBS = os.path.join(os.path.dirname(__file__), "stubs")
sys.path.insert(0, STUBS)
# nothing here may reach a model hub: the tiny models are built in the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
