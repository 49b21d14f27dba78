"""The hidden-state head's matmuls (linear.py tiles them): the logits tiles of one model, g(hidden @ weight^T
+ bias), each row's bits its own whatever rows share its tile, and the backward's gradient sums over
vocabulary chunks and token tiles. docs/contract.md sections 9, 11 and 14."""
from __future__ import annotations

import torch

from .contract import compute_dtype

# The backward's vocabulary chunks: this many bytes of float32 weight-gradient rows (2048 rows at
# H = 4096), summed over the token tiles before they are written in the weight's dtype.
PARTIAL_BYTES = 32 << 20
# On a CPU, float32 logits from bf16/fp16 weights (issue 37) upcast this many bytes of weight rows at a
# time: 8 MiB kept kl-bench --linear's peak within 10% of the bf16 head's (N 1024, H 1024, V 32000)
UPCAST_BYTES = 8 << 20
# Sampling replay's kept rows (issue 36) are projected onto their K columns a block of rows at a time:
# this many bytes of [rows, K, H] products (and their gathered weight rows)
KEPT_BYTES = 16 << 20


# Row quanta of the projection's matmuls, for batch invariance (docs/contract.md section 11). A BLAS
# picks its kernels and blocking from the matrix shape, and rows at a block's edge can take another
# micro-kernel: on this CPU (MKL) rows 4-6 of a 7-row fp32 matmul got other bits than the same rows
# inside 2048 (fp64: every row past the last multiple of 4). MKL (fp32, fp64) and oneDNN (bf16, fp16),
# with 1 and 2 threads and H from 100 to 4096, gave every row the same bits for every row count that
# is a multiple of 16 (tests/test_batch_invariance.py holds it), so a CPU tile's matmul is padded to a
# multiple of 16 rows: a 7-token call pays a 16-row matmul, not a 512-row one. cuBLAS chooses its
# kernel (tile shape, split-K) from all three sizes, so on a GPU every matmul has exactly 256 rows.
CPU_ROW_QUANTUM = 16
GPU_MATMUL_ROWS = 256
# The other two sizes matter too (issue 35): with 16 rows, MKL gave a row other bits at another
# position in fp64 whenever the inner or the output size was not a multiple of 4 (H = 17, 65, 4097;
# V = 31, 2265), and in fp32 for small ones (H = 17 with V = 5); a row-strided left operand against a
# transposed right one (the forward's W^T) did it at multiples of 4 too. In random shapes of
# M x K x N with M a multiple of 16, K and N multiples of 4 and a contiguous left operand, every row had
# its bits at every position and every M in fp32, with 1 and 2 threads; in fp64, with 2 threads, only
# at one M (512 rows moved a row's bits against 16). So on a CPU a matmul whose K or N is not a whole
# multiple of 4 is split (_split_matmul), and fp64 matmuls run 16 rows at a time (fp64 is the
# verification dtype: the weight is read once per 16 rows there).
CPU_SIZE_QUANTUM = 4


def row_quantum(device: torch.device) -> int:
    return CPU_ROW_QUANTUM if device.type == "cpu" else GPU_MATMUL_ROWS


def padded_rows(rows: int, device: torch.device) -> int:
    quantum = row_quantum(device)
    return -(-rows // quantum) * quantum


def _matmul(a, b, out, bias=None):
    """out = a @ b (+ bias) with a (contiguous) of a row count that is a whole number of the device's
    quanta: on a CPU one matmul (the ops F.linear runs: addmm with a bias, mm without; 16 rows at a time
    in fp64) when b's sizes are whole multiples of CPU_SIZE_QUANTUM, else _split_matmul; on a GPU
    matmuls of exactly GPU_MATMUL_ROWS rows."""
    if a.device.type == "cpu":
        step = CPU_ROW_QUANTUM if a.dtype == torch.float64 else a.shape[0]
        if b.shape[0] % CPU_SIZE_QUANTUM or b.shape[1] % CPU_SIZE_QUANTUM:
            for r in range(0, a.shape[0], step):
                _split_matmul(a[r:r + step], b, out[r:r + step], bias)
            return out
    else:
        step = GPU_MATMUL_ROWS
    # on a GPU, fp32 logits from bf16/fp16 operands (issue 37) are one GEMM that accumulates and writes
    # fp32 (cuBLAS's out_dtype), with the bias in fp32; on a CPU the operands arrive upcast (_project)
    wide = {} if out.dtype == a.dtype else {"out_dtype": out.dtype}
    bias = bias if bias is None or not wide else bias.to(out.dtype)
    for r in range(0, a.shape[0], step):
        if bias is None:
            torch.mm(a[r:r + step], b, out=out[r:r + step], **wide)
        else:
            torch.addmm(bias, a[r:r + step], b, out=out[r:r + step], **wide)
    return out


def _zero_padded(t, dim: int):
    """t with its size along dim zero-padded to CPU_SIZE_QUANTUM (t holds 1-3 of them): a small copy."""
    shape = list(t.shape)
    shape[dim] = CPU_SIZE_QUANTUM
    padded = t.new_zeros(shape)
    padded.narrow(dim, 0, t.shape[dim]).copy_(t)
    return padded


def _split_matmul(a, b, out, bias):
    """out = a @ b (+ bias) on a CPU from matmuls whose sizes are all whole multiples of CPU_SIZE_QUANTUM:
    the inner size K split into its whole multiple and the 1-3 left over (zero-padded to 4; their
    product added after), the output columns likewise. Each output row's bits depend on its own row only."""
    k, n = b.shape
    k_whole, n_whole = k - k % CPU_SIZE_QUANTUM, n - n % CPU_SIZE_QUANTUM
    for n0, n1 in ((0, n_whole), (n_whole, n)):
        if n1 == n0:
            continue
        columns = b[:, n0:n1] if n0 == 0 else _zero_padded(b[:, n0:n1], 1)
        # the left operand's whole part contiguous: row-strided, against a transposed right operand, its
        # rows' bits moved with their position
        part = torch.mm(a[:, :k_whole].contiguous(), columns[:k_whole]) if k_whole else None
        if k_whole < k:
            tail = torch.mm(_zero_padded(a[:, k_whole:], 1), _zero_padded(columns[k_whole:], 0))
            part = tail if part is None else part.add_(tail)
        if bias is not None:
            part = part[:, :n1 - n0].add_(bias[n0:n1])
        out[:, n0:n1] = part[:, :n1 - n0]
    return out


def _columns(buffer, rows, columns):
    """A contiguous [rows, columns] tensor on the start of buffer: the tile of a narrower vocabulary chunk."""
    return buffer.view(-1)[:rows * columns].view(rows, columns)


class Projection:
    """The logits tiles g(hidden @ weight^T + bias) of one model (the policy, or the frozen reference),
    each row's bits its own. A tile's matmul reads its rows from a padded buffer: the rows to feed as
    they are, every other row (dead: ignored; poisoned: a non-finite hidden state) and the padding as
    zeros, since a NaN row need not stay in its row inside a BLAS kernel (issue 28's fuzz saw a bf16
    matmul here spread one into live rows; not reproduced since, the zero rows make it impossible). Both buffers are reused from tile to tile: a
    CPU tile above glibc's 32 MiB mmap ceiling (fp32, V = 32000, 512 rows: 65 MB) is mapped fresh each
    time otherwise, and the first-touch page faults made 8 such matmuls (H = 1024) 5% slower."""

    def __init__(self, hidden, weight, bias, tile_rows, columns, transform):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.logit_scale, self.softcap = transform.logit_scale, transform.softcap
        # the logits' dtype: the inputs' (as F.linear), or float32 from bf16/fp16 inputs (logits_dtype)
        self.dtype = transform.logits_dtype or hidden.dtype
        rows = padded_rows(tile_rows, hidden.device)
        self.inputs = hidden.new_empty((rows, hidden.shape[1]))
        self.out = hidden.new_empty((rows, columns), dtype=self.dtype)
        self.zero = hidden.new_zeros(())

    def finite_rows(self, at):
        """bool per row of `at` (a slice or an index of rows): the rows whose hidden state is finite."""
        return torch.isfinite(self.hidden[at]).all(-1)

    def tile(self, at, rows, feed, v0=0, v1=None):
        """(z, tanh, inputs) of the `rows` rows `at` (a slice or an index) and vocabulary rows [v0, v1),
        padded to the matmul's rows: z = g(logits), tanh of the scaled logits under a softcap
        (g' = 1 - tanh^2), else None, and the matmul's padded input rows (the weight gradient reads
        them). feed: [rows] bool."""
        v1 = self.weight.shape[0] if v1 is None else v1
        padded = padded_rows(rows, self.hidden.device)
        inputs = self.inputs[:padded]
        torch.where(feed[:, None], self.hidden[at], self.zero, out=inputs[:rows])
        inputs[rows:].zero_()
        z = self._project(inputs, _columns(self.out, padded, v1 - v0), v0, v1)
        return (*self._transform(z), inputs)

    def _transform(self, z):
        """(g(z), tanh or None) of raw logits z."""
        if self.softcap is None and self.logit_scale == 1.0:
            return z, None  # the identity keeps the matmul's dtype: no float copy of the tile
        z = z.to(compute_dtype(z.dtype))
        if self.logit_scale != 1.0:
            z.mul_(self.logit_scale)
        if self.softcap is None:
            return z, None
        tanh = torch.tanh(z.div_(self.softcap))
        return tanh * self.softcap, tanh

    def kept(self, at, columns, feed):
        """g(logits) [rows, K] of rows `at` (an index) at their kept columns only (sampling replay, issue 36):
        O(K H) per row, not O(V H). Each logit is the dot product of the row and the column's weight row
        (+ bias) from exact products in float32 (float64 for float64), summed over H in the order ATen's
        CPU reduction takes along a contiguous last dimension, which depends on H only (a reduction with
        several outputs is split between threads by output; tests/test_replay.py holds it; a GPU's
        reduction is to be checked by bench/gpu_check.sh): each row's bits are its own. In the
        logits' dtype (bf16 rounds as F.linear's output does), then the transform, in the compute dtype.
        A row not fed reads zeros; columns: local ids (an entry that does not count may hold any)."""
        wide = compute_dtype(self.dtype)
        z = torch.empty(columns.shape, dtype=wide, device=self.hidden.device)
        for r0, r1, weights in kept_weights(self.weight, columns, wide):
            h = torch.where(feed[r0:r1, None], self.hidden[at[r0:r1]], self.zero).to(wide)
            part = (weights * h[:, None, :]).sum(-1)
            if self.bias is not None:
                part += self.bias[columns[r0:r1]].to(wide)
            z[r0:r1] = part
        return self._transform(z.to(self.dtype).to(wide))

    def _project(self, inputs, out, v0, v1):
        """out = inputs @ weight[v0:v1]^T + bias[v0:v1], in the logits' dtype. Wider than the inputs (fp32
        logits from bf16/fp16, issue 37): every product of two bf16 (fp16) values is exact in fp32, so a
        GPU GEMM accumulating in fp32 and writing fp32 (_matmul), or on a CPU (which has no such GEMM in
        ATen) a float32 matmul of the upcast operands, gives an fp32 LM head's logits; the weight is upcast one
        chunk of its rows at a time (UPCAST_BYTES of float32, a whole multiple of 4 rows), never whole,
        the tile's rows once."""
        bias = None if self.bias is None else self.bias[v0:v1]
        if self.dtype == self.hidden.dtype or self.hidden.device.type != "cpu":  # a GPU writes fp32 from bf16
            return _matmul(inputs, self.weight[v0:v1].t(), out, bias)
        wide = inputs.to(self.dtype)
        step = max(CPU_SIZE_QUANTUM, UPCAST_BYTES // (4 * self.weight.shape[1]) // CPU_SIZE_QUANTUM * CPU_SIZE_QUANTUM)
        for c0 in range(v0, v1, step):
            c1 = min(c0 + step, v1)
            part = out if (c0, c1) == (v0, v1) else torch.empty((out.shape[0], c1 - c0), dtype=self.dtype,
                                                                 device=out.device)
            _matmul(wide, self.weight[c0:c1].to(self.dtype).t(), part,
                    None if bias is None else bias[c0 - v0:c1 - v0].to(self.dtype))
            if part is not out:
                out[:, c0 - v0:c1 - v0] = part
        return out


def through_transform(dz, tanh, logit_scale):
    """dlogits through the logit transform g: softcap's 1 - tanh^2, then logit_scale."""
    if tanh is not None:
        dz = dz * (1.0 - tanh * tanh)  # dead and poisoned rows were fed zeros: tanh is finite
    if logit_scale != 1.0:
        dz = dz * logit_scale
    return dz


class GradientSums:
    """The backward's gradients of hidden, weight and bias, summed tile by tile over vocabulary chunks.

    Vocabulary chunks outer, token tiles inner, when the weight needs a gradient: each chunk's weight
    gradient is summed over the tiles in a chunk-sized float32 buffer and written once in the weight's
    dtype, so no [V, H] float32 sum is ever held (524 MB at V = 32000, H = 4096). A chunk is a slice of
    the vocabulary to the row kernels (a VocabShard at its offset): p comes from the saved
    whole-vocabulary lse, the label term only in the chunk that holds the label. Without a weight
    gradient: one chunk, the whole vocabulary."""

    def __init__(self, hidden, weight, bias, needs, tile_rows):
        need_hidden, need_weight, need_bias = needs
        (vocab, hidden_size), self.weight, self.hidden, self.bias = weight.shape, weight, hidden, bias
        self.chunk = min(vocab, max(1, PARTIAL_BYTES // (4 * hidden_size))) if need_weight else vocab
        self.single = self.chunk == vocab
        self.wide = compute_dtype(weight.dtype)  # the sums' dtype: float32, float64 for float64
        self.summed_in_place = weight.dtype == self.wide
        # the hidden gradient: written tile by tile (one chunk), else summed over chunks; each tile's rows
        # come from a padded matmul (batch invariance) into hidden_rows
        self.grad_hidden = self.hidden_rows = None
        if need_hidden:
            self.grad_hidden = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if self.single
                                else torch.zeros(hidden.shape, dtype=self.wide, device=hidden.device))
            self.hidden_rows = torch.empty((padded_rows(tile_rows, hidden.device), hidden_size), dtype=weight.dtype,
                                           device=hidden.device)
        self.grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight else None
        # a float32 (float64) weight's gradient is its own sum; a lower dtype's chunk sums in this buffer
        self.chunk_sum = torch.empty((self.chunk, hidden_size), dtype=self.wide, device=weight.device) \
            if need_weight and not self.summed_in_place else None
        self.grad_bias = torch.zeros(bias.shape, dtype=self.wide, device=bias.device) if need_bias else None
        self.weight_sum = None

    def start_chunk(self, v0, v1):
        if self.grad_weight is not None:
            self.weight_sum = self.grad_weight[v0:v1] if self.summed_in_place else self.chunk_sum[:v1 - v0]
            self.weight_sum.zero_()

    def add(self, dz, inputs, at, rows, v0, v1):
        """One tile's dlogits dz [padded rows, v1 - v0] (in the weight's dtype) and its padded input rows:
        the `rows` rows `at` (a slice or an index)."""
        if self.grad_hidden is not None:
            # the matmul in the weight's dtype (as F.linear's backward), summed in float32 over chunks
            _matmul(dz, self.weight[v0:v1], self.hidden_rows[:dz.shape[0]])
            if self.single:
                self.grad_hidden[at] = self.hidden_rows[:rows]
            else:
                self.grad_hidden[at] += self.hidden_rows[:rows]
        if self.weight_sum is not None:
            # the padded input rows: dead and poisoned rows are zeros there (0 * NaN would be NaN)
            if self.summed_in_place:
                self.weight_sum.addmm_(dz.t(), inputs)
            else:
                self.weight_sum += dz.t() @ inputs
        if self.grad_bias is not None:
            self.grad_bias[v0:v1] += dz.to(self.wide).sum(0)

    def add_kept_rows(self, dz, inputs, at, columns):
        """The kept rows' hidden and bias gradients (sampling replay, issue 36): dz [rows, K] their dlogits at
        their columns (through the transform, 0 where an entry does not count), in the sums' dtype; at the
        rows' index; inputs [rows, H] their fed rows. O(K H) per row; each hidden row sums its K terms in
        order (a reduction over K for each of its H outputs): its bits are its own."""
        if self.grad_hidden is not None:
            for r0, r1, weights in kept_weights(self.weight, columns, self.wide):
                rows = (dz[r0:r1, :, None] * weights).sum(1)
                if self.single:
                    self.grad_hidden[at[r0:r1]] = rows.to(self.grad_hidden.dtype)
                else:
                    self.grad_hidden[at[r0:r1]] += rows
        if self.grad_bias is not None:
            self.grad_bias.index_add_(0, columns.reshape(-1), dz.reshape(-1))

    def add_kept_chunk(self, dz, inputs, columns, v0, v1):
        """The kept rows' share of the weight gradient of vocabulary rows [v0, v1): for each entry whose
        column is there, dz * its row, added at the column in a fixed order (index_add_)."""
        if self.weight_sum is None:
            return
        row, entry = ((columns >= v0) & (columns < v1) & (dz != 0)).nonzero(as_tuple=True)
        step = max(1, KEPT_BYTES // (inputs.shape[1] * _bytes(self.wide)))
        for p0 in range(0, row.numel(), step):
            r, e = row[p0:p0 + step], entry[p0:p0 + step]
            self.weight_sum.index_add_(0, columns[r, e] - v0, dz[r, e, None] * inputs[r])

    def end_chunk(self, v0, v1):
        if self.grad_weight is not None and not self.summed_in_place:
            self.grad_weight[v0:v1] = self.weight_sum

    def result(self, nan_rows):
        """(hidden, weight, bias gradients) in their dtypes, NaN where nan_rows (a poisoned row a gradient
        flows from) reach: its hidden gradient row, and the sums over rows as a whole."""
        if self.grad_hidden is not None:
            self.grad_hidden.masked_fill_(nan_rows[:, None], float("nan"))
        any_nan = nan_rows.any()
        # a pass over the [V, H] weight gradient only when a row is poisoned; a CPU asks (no sync to speak
        # of), a GPU and a traced graph fill without asking (no host sync, no data-dependent branch)
        if nan_rows.device.type != "cpu" or torch.compiler.is_compiling() or bool(any_nan):
            for grad in (self.grad_weight, self.grad_bias):
                if grad is not None:
                    grad.masked_fill_(any_nan, float("nan"))
        return cast_like(self.grad_hidden, self.hidden), self.grad_weight, cast_like(self.grad_bias, self.bias)


def cast_like(grad, like):
    return None if grad is None else grad.to(like.dtype)


def _bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kept_weights(weight, columns, dtype):
    """(r0, r1, the weight rows of columns[r0:r1] as [rows, K, H] in dtype) for blocks of kept rows whose
    gathered rows and their products fit KEPT_BYTES (one row at least)."""
    rows, width = columns.shape
    step = max(1, KEPT_BYTES // max(1, width * weight.shape[1] * 3 * _bytes(dtype)))
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows), weight[columns[r0:r0 + step]].to(dtype)
