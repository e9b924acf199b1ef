"""GPTQ (Frantar et al., arXiv 2210.17323), reproducing IST-DASLab's reference `GPTQ.fasterquant` step for step.

Symbols follow the paper: W (out × in) is the weight, X the calibration inputs of the layer, H the Hessian of the
layer-wise loss ‖WX − ŴX‖², Hinv the upper Cholesky factor of H⁻¹, Q the quantized (dequantized) weight.

1. Hessian.  H = 2/n · Σ x xᵀ over the calibration rows, kept as a running mean: for a batch of b samples,
   H ← H · n/(n+b) + 2/(n+b) · XᵀX,  n ← n + b   (`add_batch`; n counts samples = leading dim, as the reference).
2. Dead inputs.  diag(H)_j = 0 (an input that is always zero): H_jj = 1, W[:, j] = 0.
3. Row parameters.  Per-row scale/zero on the whole W (used as-is when group_size = −1).
4. Static groups.  With `static_groups`, the parameters of every group [k·g, (k+1)·g) come from the original W.
5. Act-order.  perm = argsort(diag(H), descending): columns with the largest Hessian go first.
6. Damping.  H_ii += percdamp · mean(diag(H)).   Hinv = upper Cholesky factor of H⁻¹ (H⁻¹ from the factor of H).
7. Lazy blocks of `block_size` columns [i1, i2); for each column i:
     group start (dynamic groups): parameters from the *outer* W[:, i : i+g], which holds the updates of earlier
       blocks but not yet those made inside the current block (the reference's behaviour when g < block_size);
     q = s · (clamp(round(w/s) + z, 0, maxq) − z),   err = (w − q) / Hinv_ii,   W1[:, i:] −= err ⊗ Hinv[i, i:]
   then the deferred update of the rest:  W[:, i2:] −= Err1 · Hinv[i1:i2, i2:].
8. Undo the permutation. The layer loss Σ (w − q)² / (2 Hinv_ii²) is returned with the codes.

Computations run in float32 (float64 when the layer is float64: the tests compare against a restatement that way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from spectra.ptq.quantizer import QuantizedWeight, Quantizer

# Weight matrices from this many elements up (a 2048 x 2048 layer) run GPTQ on every intra-op thread, smaller ones on
# one: their column loop is thousands of tiny ops and their factorizations are small, so thread hand-offs cost more
# than they save (on a busy 2-core machine, 30x more: LAPACK's Cholesky inverse of a 1280² H took 20 s on 2 threads),
# while a 4096-wide layer's factorization and block updates are large enough to use them.
THREADED_MIN_ELEMENTS = 2048 * 2048


def threads_for(rows: int, columns: int) -> int:
    """Intra-op threads GPTQ uses on a (rows, columns) weight: 1 below `THREADED_MIN_ELEMENTS`, else all of them."""
    return torch.get_num_threads() if rows * columns >= THREADED_MIN_ELEMENTS else 1


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class GPTQ:
    """Hessian accumulator and quantizer of one linear layer (or of several that share their input, via `H`)."""

    def __init__(self, layer: nn.Linear, H: Tensor | None = None, n_samples: int = 0) -> None:
        self.layer = layer
        self.dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        columns = layer.weight.shape[1]
        if H is None:
            H = torch.zeros(columns, columns, dtype=self.dtype, device=layer.weight.device)
        self.H = H
        self.n_samples = n_samples

    def add_batch(self, X: Tensor) -> None:
        """X: (b, ..., in) inputs of the layer; b counts samples for the running mean."""
        b = X.shape[0] if X.ndim > 1 else 1
        X = X.reshape(-1, X.shape[-1]).to(self.dtype)
        n = self.n_samples + b
        self.H.addmm_(X.T, X, beta=self.n_samples / n, alpha=2 / n)
        self.n_samples = n

    @torch.no_grad()
    def quantize(
        self,
        quantizer: Quantizer,
        *,
        block_size: int = 128,
        percdamp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
    ) -> tuple[Tensor, QuantizedWeight, float]:
        """Returns Q (out, in) in the layer's dtype, its codes and parameters, and the layer loss. H is not modified.

        Threads follow the matrix size (`threads_for`): one for small layers, all for large ones (on a GPU the
        setting only affects the CPU side).
        """
        with _threads(threads_for(*self.layer.weight.shape)):
            return self._quantize(quantizer, block_size, percdamp, act_order, static_groups)

    def _quantize(
        self, quantizer: Quantizer, block_size: int, percdamp: float, act_order: bool, static_groups: bool
    ) -> tuple[Tensor, QuantizedWeight, float]:
        if self.n_samples == 0:
            raise ValueError("GPTQ.quantize needs calibration inputs: call add_batch first")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        W = self.layer.weight.detach().to(self.dtype).clone()
        rows, columns = W.shape
        quantizer.check_columns(columns)
        g = quantizer.group_size
        scale, zero = quantizer.find_params(W)

        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        groups = []
        if static_groups and g != -1:
            groups = [quantizer.find_params(W[:, i : i + g]) for i in range(0, columns, g)]

        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]

        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(columns, device=H.device)
        H[diag, diag] += damp
        try:
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        except torch.linalg.LinAlgError:  # a Hessian of too few distinct inputs, not lifted by the damping
            raise ValueError(f"the layer's Hessian is not positive definite with damping {percdamp} of its mean "
                             "diagonal (calibration inputs that span too few directions); raise --damp (e.g. 0.1) "
                             "or calibrate on more varied text") from None

        Q = torch.zeros_like(W)
        C = torch.zeros_like(W)  # integer codes, permuted order
        loss = torch.zeros((), dtype=self.dtype, device=W.device)
        params: dict[int, tuple[Tensor, Tensor]] = {0: (scale, zero)} if g == -1 else {}
        for i1 in range(0, columns, block_size):
            i2 = min(i1 + block_size, columns)
            count = i2 - i1
            W1 = W[:, i1:i2].T.contiguous()  # (count, rows): row i is column i1 + i, contiguous in the loop
            C1, Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                col = i1 + i
                if g != -1:
                    if static_groups:
                        group = (int(perm[col]) if perm is not None else col) // g
                        scale, zero = params[group] = groups[group]
                    elif col % g == 0:
                        scale, zero = params[col // g] = quantizer.find_params(W[:, col : col + g])
                s, z = scale.view(-1), zero.view(-1)
                w = W1[i]
                C1[i] = quantizer.codes(w, s, z)
                Q1[i] = s * (C1[i] - z)
                Err1[i] = (w - Q1[i]) / Hinv1[i, i]
                W1[i:] -= Hinv1[i, i:, None] * Err1[i]  # err ⊗ Hinv[i, i:], transposed
            C[:, i1:i2], Q[:, i1:i2] = C1.T, Q1.T
            loss += (Err1**2).sum() / 2
            W[:, i2:] -= Err1.T.matmul(Hinv[i1:i2, i2:])

        if perm is not None:
            invperm = torch.argsort(perm)
            Q, C = Q[:, invperm], C[:, invperm]
        G = len(params)
        if g == -1 or static_groups or perm is None:
            g_idx = (torch.zeros(columns, dtype=torch.int32, device=W.device) if g == -1
                     else torch.arange(columns, device=W.device) // g)
        else:  # column perm[j] was quantized j-th, in group j // g
            g_idx = (torch.arange(columns, device=W.device) // g)[invperm]
        result = QuantizedWeight(
            codes=C.to(torch.uint8),
            scales=torch.cat([params[k][0].T for k in range(G)]),
            zeros=torch.cat([params[k][1].T for k in range(G)]).to(torch.int32),
            g_idx=g_idx.to(torch.int32).to(W.device),
            bits=quantizer.bits,
            group_size=g,
            sym=quantizer.sym,
        )
        return Q.to(self.layer.weight.dtype), result, float(loss)

    def free(self) -> None:
        self.H = None
