"""The engines' mask formats read into kept_ids (docs/contract.md section 13): a list of id lists (vLLM's
`CompletionOutput.sampling_mask.token_ids`), CSR (vLLM's SamplingMaskLists: flat ids + offsets), the packed
uint8 bitmask in vLLM's bit order, and a bool [rows, V] mask.

The round trips run vLLM 0.33.0's own code: its Triton kernel that captures each row's kept set from the
processed logits (`_compact_sampling_mask_kernel`, run by `SamplingMaskTensors.from_logits` in Triton's
interpreter) and its conversion to the scheduler's CSR (`SamplingMaskTensors.tolists`, which falls back to
the bitmask for rows wider than the compact width). The module is read from the pinned wheel that
`./run.sh test` downloads (tests/engines/requirements.txt), with vLLM's own SamplingMaskLists record
(kl_kernels/tools/wheel_code.py)."""
import numpy as np
import pytest
import torch

from wheels import engine_or_skip
import kl_kernels


def _vllm_output_module():
    import triton
    import triton.language as tl

    names = ["vllm.v1.outputs", "vllm.v1.worker.gpu.sample.output"]
    return engine_or_skip("vllm", names, {"vllm.triton_utils": dict(triton=triton, tl=tl)})[names[-1]]


def _processed_logits(rows, vocab, generator):
    """Logits as a vLLM sampler leaves them: -inf outside each row's kept set (top-k style, widths 1 to
    the whole vocabulary, a row keeping everything, one keeping ties)."""
    logits = torch.randn(rows, vocab, generator=generator)
    for row in range(rows):
        keep = [1, 3, 7, 40, vocab, 250][row % 6]
        kth = logits[row].topk(keep).values[-1]
        logits[row] = logits[row].masked_fill(logits[row] < kth, float("-inf"))
    return logits


def test_vllm_masks_round_trip():
    output = _vllm_output_module()
    rows, vocab = 12, 300
    logits = _processed_logits(rows, vocab, torch.Generator().manual_seed(0))
    want = [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]
    # compact width 5: wider rows come back through the bitmask, as in vLLM for ties or a huge top_k
    masks = output.SamplingMaskTensors.from_logits(logits, torch.arange(rows, dtype=torch.int32),
                                                   torch.ones(rows, dtype=torch.int32), max_num_kept=5)
    csr = masks.tolists()
    from_csr = kl_kernels.kept_ids_from_csr(torch.from_numpy(csr.token_ids), torch.from_numpy(csr.offsets))
    from_bitmask = kl_kernels.kept_ids_from_bitmask(masks.packed_mask, vocab)
    lists = [csr.token_ids[a:b].tolist() for a, b in zip(csr.offsets[:-1], csr.offsets[1:])]  # SamplingMask.token_ids
    from_lists = kl_kernels.kept_ids_from_lists(lists)
    from_mask = kl_kernels.kept_ids_from_mask(torch.isfinite(logits))
    width = max(len(ids) for ids in want)
    for kept in (from_csr, from_bitmask, from_lists, from_mask):
        assert kept.shape == (rows, width) and kept.dtype == torch.int64
        for row, ids in zip(kept.tolist(), want):
            assert row[:len(ids)] == ids and all(i == -1 for i in row[len(ids):])
    # the engine's log-probs (log_softmax of its processed logits) are what kept_ids gives back
    labels = torch.tensor([ids[len(ids) // 2] for ids in want])
    engine = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    raw = torch.where(torch.isfinite(logits), logits, torch.randn(rows, vocab))  # the trainer's unmasked logits
    torch.testing.assert_close(kl_kernels.token_logprobs(raw, labels, kept_ids=from_csr).double(), engine,
                               rtol=1e-5, atol=1e-5)


def test_converters_edge_cases():
    assert kl_kernels.kept_ids_from_lists([]).shape == (0, 1)
    assert kl_kernels.kept_ids_from_lists([[], []]).tolist() == [[-1], [-1]]  # prompt positions: all -1
    assert kl_kernels.kept_ids_from_csr(torch.tensor([4, 2]), counts=torch.tensor([0, 2]), width=3).tolist() == \
        [[-1, -1, -1], [4, 2, -1]]  # ids kept in their given order
    for bad, words in ((dict(offsets=torch.tensor([0, 3])), "offsets"), (dict(counts=torch.tensor([1])), "counts"),
                       (dict(), "exactly one"), (dict(counts=torch.tensor([2]), width=1), "width")):
        with pytest.raises(ValueError, match=words):
            kl_kernels.kept_ids_from_csr(torch.tensor([4, 2]), **bad)
    with pytest.raises(ValueError, match="packed"):
        kl_kernels.kept_ids_from_bitmask(torch.zeros(2, 3, dtype=torch.uint8), 30)
    with pytest.raises(ValueError, match="mask"):
        kl_kernels.kept_ids_from_mask(torch.zeros(2, 3))
    # a bitmask in numpy's little bit order, in blocks of rows
    mask = torch.rand(7, 29) < 0.3
    packed = torch.from_numpy(np.packbits(mask.numpy(), axis=1, bitorder="little"))
    assert torch.equal(kl_kernels.kept_ids_from_bitmask(packed, 29, block_rows=3), kl_kernels.kept_ids_from_mask(mask))
