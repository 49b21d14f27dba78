"""Names OpenRLHF imports at module top level; none is called by the CPU paths under test."""
from ..bert_padding import _needs_cuda

all_gather = _needs_cuda
