"""kept_ids_from_sampler against the engines' own samplers (docs/contract.md section 13), run from their pinned
wheels on this CPU (kl_kernels/tools/wheel_code.py): 0 rows may differ.

vLLM 0.33.0: its SamplingParams (validation and clamps), SamplingStates.add_request, and Sampler.sample, the
Model Runner V2 path that returns the sampling mask: the float32 copy, its Triton temperature and min_p
kernels (Triton's interpreter), apply_top_k_top_p on its PyTorch path (vLLM takes its Triton top-k/top-p
kernel whenever Triton is importable; that kernel does not run in the interpreter: docs/replay.md), the
Gumbel draw; then SamplingMaskTensors.from_logits and tolists, the mask a RequestOutput carries.
SGLang 0.5.23: its SamplingParams (normalisation and verify) and Sampler.forward with the pytorch sampling
backend and the sampling mask on, read from the SamplingMaskOutput it writes."""
import math
import types
import zlib

import numpy as np
import pytest
import torch

from wheels import engine_or_skip
import kl_kernels
from kl_kernels import replay

VOCAB = 500


@pytest.fixture(scope="module")
def vllm():
    import triton
    import triton.language as tl

    class Uva:  # buffer_utils.UvaBackedTensor on a CPU: the numpy view and the "device" tensor share memory
        def __init__(self, size, dtype, max_concurrency=None):
            self.gpu = torch.zeros(size, dtype=dtype)
            self.np = self.gpu.numpy()

        def copy_to_uva(self, n=None):
            return self.gpu

    platform = types.SimpleNamespace(is_cpu=lambda: True, is_cuda_alike=lambda: False)
    values = {"vllm.triton_utils": dict(triton=triton, tl=tl, HAS_TRITON=False),
              "vllm.envs": dict(VLLM_COMPUTE_NANS_IN_LOGITS=False, VLLM_BATCH_INVARIANT=False,
                                VLLM_MAX_N_SEQUENCES=16384),
              "vllm.config.model": dict(PROCESSED_LOGPROBS_MODES=("processed_logprobs", "processed_logits")),
              "vllm.platforms": dict(current_platform=platform),
              "vllm.v1.worker.gpu.buffer_utils": dict(UvaBackedTensor=Uva),
              # a plain base: SamplingParams is a msgspec.Struct, whose metaclass admits no other
              "vllm.v1.serial_utils": dict(PydanticMsgspecMixin=type("PydanticMsgspecMixin", (), {}))}
    names = ["vllm.exceptions", "vllm.v1.outputs", "vllm.sampling_params", "vllm.v1.sample.ops.topk_topp_sampler",
             "vllm.v1.worker.gpu.sample.gumbel", "vllm.v1.worker.gpu.sample.min_p", "vllm.v1.worker.gpu.sample.states",
             "vllm.v1.worker.gpu.sample.output", "vllm.v1.worker.gpu.sample.sampler"]
    engine = engine_or_skip("vllm", names, values)
    return types.SimpleNamespace(active=engine.active, **{name.rsplit(".", 1)[-1]: engine[name] for name in names})


@pytest.fixture(scope="module")
def sglang():
    runtime = types.SimpleNamespace(kernel=types.SimpleNamespace(sampling_backend="pytorch"))
    names = ["sglang.srt.layers.logits_processor", "sglang.kernels.ops.sampling",
             "sglang.srt.sampling.sampling_params", "sglang.srt.layers.sampler"]
    engine = engine_or_skip("sglang", names, {"sglang.srt.runtime_context": dict(get_exec=lambda: runtime)})
    return types.SimpleNamespace(active=engine.active, **{name.rsplit(".", 1)[-1]: engine[name] for name in names})


def vllm_kept(vllm, logits, params):
    """The ids vLLM's sampler keeps in each row (its sampling mask), the rows sampled as one batch."""
    rows, vocab = logits.shape
    requests = [vllm.sampling_params.SamplingParams(**p) for p in params]
    sampler = vllm.sampler.Sampler.__new__(vllm.sampler.Sampler)  # the state Sampler.sample reads
    sampler.sampling_states = vllm.states.SamplingStates(rows, vocab)
    sampler.needs_logits_processing = np.array([sampler.sampling_states.add_request(i, request)
                                                for i, request in enumerate(requests)])
    sampler.sampling_states.apply_staged_writes()
    sampler.logits_processors = []
    sampler.thinking_budget_state = types.SimpleNamespace(apply=lambda logits, context: None)
    sampler.use_flashinfer = sampler.use_xpu_sampler = sampler.use_fp64_gumbel = False
    index = torch.arange(rows, dtype=torch.int32)
    zeros = torch.zeros(rows, dtype=torch.int64)
    _, processed = sampler.sample(logits.clone(), index, index, np.arange(rows), zeros, zeros, zeros.int(),
                                  np.ones(rows, dtype=np.int64))
    widest = int(np.max(sampler.sampling_states.top_k.np[:rows]))
    masks = vllm.output.SamplingMaskTensors.from_logits(processed, index, torch.ones(rows, dtype=torch.int32),
                                                        widest)
    lists = masks.tolists()
    return [lists.token_ids[a:b].tolist() for a, b in zip(lists.offsets[:-1], lists.offsets[1:])]


def sglang_kept(sglang, logits, params):
    """The ids SGLang's sampler keeps in each row (its SamplingMaskOutput), most probable first."""
    rows, vocab = logits.shape
    requests = [sglang.sampling_params.SamplingParams(**p) for p in params]
    for request in requests:
        request.verify(vocab)
    top_k_all = sglang.sampling_params.TOP_K_ALL
    # the fields of SamplingBatchInfo.from_schedule_batch the sampler reads (sampling_batch_info.py)
    info = types.SimpleNamespace(
        temperatures=torch.tensor([r.temperature for r in requests], dtype=torch.float).view(-1, 1),
        top_ps=torch.tensor([r.top_p for r in requests], dtype=torch.float),
        top_ks=torch.tensor([r.top_k for r in requests], dtype=torch.int32),
        min_ps=torch.tensor([r.min_p for r in requests], dtype=torch.float),
        is_all_greedy=all(r.top_k <= 1 for r in requests),
        need_top_p_sampling=any(r.top_p != 1.0 for r in requests),
        need_top_k_sampling=any(r.top_k != top_k_all for r in requests),
        need_min_p_sampling=any(r.min_p > 0 for r in requests),
        max_top_k=max(r.top_k for r in requests), sampling_seed=None, has_custom_logit_processor=False,
        grammars=None, sampling_mask_batch_indices=torch.arange(rows),
        sampling_support_logprobs_capture_indices=None)
    sampler = sglang.sampler.Sampler.__new__(sglang.sampler.Sampler)
    torch.nn.Module.__init__(sampler)
    sampler.rl_on_policy_target, sampler.enable_deterministic = None, False
    sampler.use_log_softmax_logprob = sampler.use_ascend_backend = False
    sampler.sampling_mask_max_tokens = vocab
    output = types.SimpleNamespace(next_token_logits=logits.clone())
    with sglang.active():  # its softmax imports lazily
        sampler.forward(output, info, False, [], [], torch.zeros(rows, dtype=torch.int64))
    mask = output.sampling_mask_output
    assert (mask.statuses == sglang.logits_processor.SamplingMaskStatus.OK).all()
    kept = [ids[:length].tolist() for ids, length in zip(mask.token_ids, mask.lengths)]
    # its padded ids + lengths are CSR with counts (the reading docs/contract.md section 13 gives)
    read = kl_kernels.kept_ids_from_csr(mask.token_ids[torch.arange(mask.token_ids.shape[1]) < mask.lengths[:, None]],
                                        counts=mask.lengths)
    assert [row[row >= 0].tolist() for row in read] == kept
    return kept


def ours(logits, params, engine, block_rows=None, monkeypatch=None):
    if block_rows is not None:
        monkeypatch.setattr(replay, "SAMPLER_BLOCK_ELEMENTS", block_rows * logits.shape[-1])
    # float64 columns: the engines read each request's parameters as Python floats
    columns = {name: torch.tensor([p[name] for p in params], dtype=torch.int64 if name == "top_k" else torch.float64)
               for name in ("temperature", "top_k", "top_p", "min_p")}
    kept = kl_kernels.kept_ids_from_sampler(logits, engine=engine, **columns)
    vocab = logits.shape[-1]
    return [row[row >= 0].tolist() or list(range(vocab)) for row in kept]  # all -1: the whole vocabulary


def random_params(generator, rows, engine):
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    top_ks = [-1, 1, 2, 5, 50, VOCAB - 1, VOCAB, VOCAB + 7] + ([0] if engine == "vllm" else [])
    return [dict(temperature=pick([0.0, 1e-6, 5e-3, 1e-2, 0.3, 0.7, 1.0, 1.0, 1.3, 2.0]), top_k=pick(top_ks),
                 top_p=pick([1.0, 1.0, 0.999, 0.95, 0.8, 0.5, 0.1, 1e-3]), min_p=pick([0.0, 0.0, 0.01, 0.05, 0.1, 0.5]))
            for _ in range(rows)]


def adversarial_logits(generator, rows):
    """Ties at the k-th value (values on a coarse grid), plateaus (a whole row equal, half a row equal), a
    dominant token, tokens within a few float32 steps of the min_p threshold max + log(min_p)."""
    logits = torch.randn(rows, VOCAB, generator=generator) * 3
    for row in range(rows):
        kind = row % 5
        if kind == 0:
            logits[row] = torch.round(logits[row] * 2) / 2
        elif kind == 1:
            logits[row] = 0.25
        elif kind == 2:
            logits[row, : VOCAB // 2] = logits[row].max()
        elif kind == 3:
            logits[row, 7] = 40.0
        else:
            top = logits[row].max()
            for step, min_p in enumerate((0.05, 0.1, 0.5)):
                # the threshold as the engines compute it: float32 log of the float32 min_p, float32 add
                threshold = top + torch.tensor(math.log(float(np.float32(min_p))), dtype=torch.float32)
                for offset in range(-2, 3):
                    value = threshold.clone()
                    for _ in range(abs(offset)):
                        value = torch.nextafter(value, torch.tensor(math.copysign(math.inf, offset)))
                    logits[row, 20 + 5 * step + offset + 2] = value
    return logits


def compare(engine_kept, our_kept):
    differ = [row for row, (a, b) in enumerate(zip(engine_kept, our_kept)) if sorted(a) != sorted(b)]
    assert not differ, f"{len(differ)} rows differ, first {differ[0]}: engine {sorted(engine_kept[differ[0]])[:20]}, " \
                       f"ours {sorted(our_kept[differ[0]])[:20]}"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("case", ["random", "adversarial", "bfloat16", "all greedy", "no truncation"])
def test_the_engines_kept_sets(engine, case, request, monkeypatch):
    runner = request.getfixturevalue(engine)
    engine_kept_of = vllm_kept if engine == "vllm" else sglang_kept
    generator = torch.Generator().manual_seed(zlib.crc32(f"{engine} {case}".encode()))
    rows = 48
    logits = adversarial_logits(generator, rows) if case == "adversarial" else \
        torch.randn(rows, VOCAB, generator=generator) * 3
    if case == "bfloat16":
        logits = logits.bfloat16()
    params = random_params(generator, rows, engine)
    if case == "all greedy":
        params = [p | dict(temperature=0.0) for p in params]
    if case == "no truncation":  # each row at most a temperature: the engines' untruncated path
        params = [dict(temperature=p["temperature"], top_k=-1, top_p=1.0, min_p=0.0) for p in params]
    if case == "adversarial":  # min_p rows at temperature 1 read the thresholds built into the logits
        params = [p | dict(temperature=1.0) if row % 5 == 4 and p["min_p"] else p for row, p in enumerate(params)]
    engine_kept = engine_kept_of(runner, logits, params)
    compare(engine_kept, ours(logits, params, engine))
    compare(engine_kept, ours(logits, params, engine, block_rows=5, monkeypatch=monkeypatch))  # blocks of rows


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_the_engines_order_and_shape(engine, request):
    """vLLM's mask lists ids ascending, SGLang's most probable first; leading dimensions and per-row
    parameters broadcast."""
    runner = request.getfixturevalue(engine)
    logits = torch.randn(2, 3, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    top_p = torch.tensor([[0.5], [0.9]])
    kept = kl_kernels.kept_ids_from_sampler(logits, top_p=top_p, temperature=0.8, engine=engine)
    assert kept.shape[:2] == (2, 3)
    params = [dict(temperature=0.8, top_k=-1, top_p=float(top_p[row // 3, 0]), min_p=0.0) for row in range(6)]
    engine_kept = (vllm_kept if engine == "vllm" else sglang_kept)(runner, logits.reshape(6, VOCAB), params)
    for row, ids in zip(kept.reshape(6, -1), engine_kept):
        assert row[row >= 0].tolist() == ids


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("name, value", [("temperature", -1.0), ("temperature", 2.5), ("temperature", math.nan),
                                         ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 0),
                                         ("min_p", -0.1), ("min_p", 1.1)])
def test_the_values_the_engines_reject(engine, name, value, request):
    """A value raises ValueError naming it exactly where the engine's own SamplingParams rejects it."""
    runner = request.getfixturevalue(engine)
    defaults = dict(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0)
    params = defaults | {name: value}
    try:
        request_params = runner.sampling_params.SamplingParams(**params)
        if engine == "sglang":
            request_params.verify(VOCAB)
        engine_rejects = False
    except (ValueError, getattr(runner, "exceptions", types).__dict__.get("VLLMValidationError", ValueError)):
        engine_rejects = True
    logits = torch.randn(2, VOCAB)
    if engine_rejects:
        with pytest.raises(ValueError, match=name):
            kl_kernels.kept_ids_from_sampler(logits, engine=engine, **{name: value})
        with pytest.raises(ValueError, match=name):  # the same value inside a per-row tensor
            kl_kernels.kept_ids_from_sampler(logits, engine=engine, **{name: torch.tensor([defaults[name], value])})
    else:
        kl_kernels.kept_ids_from_sampler(logits, engine=engine, **{name: value})
