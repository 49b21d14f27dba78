"""Stand-in for flash-attn, which needs CUDA to build: OpenRLHF imports it at module top level
(openrlhf.models.ring_attn_utils). Only names are provided; calling one raises. verl's optional
`flash_attn.ops.triton.cross_entropy` import still fails, so verl takes its own CPU path."""
