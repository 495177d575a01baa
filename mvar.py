"""M-VAR generator: parallel scan, Mamba-2, intra-scale attention, AdaLN blocks, the M-VAR model
and VAR baseline, sampling.

M-VAR (arXiv 2411.10433) predicts an image coarse-to-fine, one scale of VQ tokens at a time, like
VAR (arXiv 2404.02905). Each block splits VAR's attention in two: attention *inside* a scale, and a
Mamba-2 state-space layer that runs causally over the whole flattened sequence of scales and carries
information from coarse to fine scales at linear cost. This file reads top to bottom:

  1. The selective state-space scan: a plain loop and a chunked parallel scan (SPEC 4.1)
  2. Mamba-2 layer, with mamba_ssm's parameter names so released weights load (SPEC 4.2)
  then the attention, AdaLN blocks, the M-VAR model, the VAR baseline, and sampling (SPEC 4.3).

Shape letters used in comments and docstrings:
  B  batch                      L  sequence length (tokens of all scales, flattened)
  H  heads (of the SSM)         P  head dimension (SSM: channels per head)
  G  groups of heads sharing B and C (G divides H; head i uses group i // (H // G))
  N  SSM state size (d_state)   Q  chunk size of the parallel scan
  K  number of chunks (L / Q, after padding); in the model K is also the number of scales
  D  model width (d_model)      (in the scan, D is the per-head skip weight, shape (H,))
In the model (sections 3-7), following VAR's code:
  C  model width (= D above)    V  codebook size (vocab_size)     Cvae  tokenizer latent channels
  pn side of one scale's token map; n = pn^2 tokens of that scale; K scales, L = sum of n
In the scan's einsum strings the same letters are lower case, plus c (chunk), i, j (positions in
a chunk: i = output/target, j = input/source) and r (head within its group, r = H // G of them).
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# 1. The selective state-space scan (SPEC 4.1)
# ---------------------------------------------------------------------------------------------
# Mamba-2's SSM, per head h with a *scalar* decay A_h < 0 and step sizes dt_t > 0:
#
#     state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * outer(x_t, B_t)      state: (P, N)
#     y_t     = state_t @ C_t + D_h * x_t                                      y_t:   (P,)
#
# `ssd_scan_sequential` is this recurrence written as a loop: the reference, and the one-step
# update used while sampling. `ssd_scan_parallel` computes exactly the same thing with a few
# large matmuls (the "SSD" chunked algorithm of the Mamba-2 paper, arXiv 2405.21060, section 6),
# which is what makes training fast on any device: it uses only cumsum / exp / einsum / masks.


def _check_scan_inputs(x, dt, A, B, C, D, initial_state):
    """Validate the scan inputs; return (B, L, H, P, G, N). Raises ValueError with a hint."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (batch, length, heads, headdim), got {tuple(x.shape)}")
    b, l, h, p = x.shape
    if l < 1:
        raise ValueError("the sequence is empty (length 0): pass at least one token")
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must have shape (batch, length, heads) = {(b, l, h)}, "
                         f"got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must have shape (heads,) = {(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(f"B and C must both have shape (batch, length, groups, d_state) with "
                         f"batch, length = {(b, l)}; got B {tuple(B.shape)}, C {tuple(C.shape)}")
    g, n = B.shape[2:]
    if g < 1 or h % g != 0:
        raise ValueError(f"the number of groups ({g}) must divide the number of heads ({h})")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must have shape (heads,) = {(h,)} or be None, got {tuple(D.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state must have shape (batch, heads, headdim, d_state) = "
                         f"{(b, h, p, n)}, got {tuple(initial_state.shape)}")
    return b, l, h, p, g, n


def _state_dtype(dtype):
    """The state accumulates over the whole sequence: keep it in at least float32 (bf16 -> fp32)."""
    return torch.promote_types(dtype, torch.float32)


def ssd_scan_sequential(x, dt, A, B, C, D=None, initial_state=None):
    """The SSM recurrence as a plain loop over time (reference; one-step update when L = 1).

    x (B, L, H, P), dt (B, L, H) > 0, A (H,) < 0, B and C (B, L, G, N), D (H,) or None,
    initial_state (B, H, P, N) or None (zeros)  ->  y (B, L, H, P) in x's dtype,
    final_state (B, H, P, N) in float32 (float64 if x is float64).
    """
    b, l, h, p, g, n = _check_scan_inputs(x, dt, A, B, C, D, initial_state)
    sdtype = _state_dtype(x.dtype)
    # Head i reads group i // (H // G): repeat each group's B and C for its H // G heads.
    B = B.repeat_interleave(h // g, dim=2).to(sdtype)           # (B, L, H, N)
    C = C.repeat_interleave(h // g, dim=2).to(sdtype)           # (B, L, H, N)
    xs, dts = x.to(sdtype), dt.to(sdtype)
    decay = torch.exp(dts * A.to(sdtype))                       # (B, L, H), in (0, 1]
    state = (torch.zeros(b, h, p, n, dtype=sdtype, device=x.device) if initial_state is None
             else initial_state.to(sdtype))
    ys = []
    for t in range(l):
        # state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T   (outer product: (P, N) per head)
        state = (decay[:, t, :, None, None] * state
                 + (dts[:, t, :, None] * xs[:, t])[..., None] * B[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))   # y_t = state_t C_t
    y = torch.stack(ys, dim=1)                                  # (B, L, H, P)
    if D is not None:
        y = y + D.to(sdtype)[:, None] * xs
    return y.to(x.dtype), state


def _segsum(a):
    """Segment sums of a (..., T) -> (..., T, T): out[..., i, j] = a[j+1] + ... + a[i] for j <= i
    (so 0 on the diagonal) and -inf for j > i.

    exp(out) is then the decay from step j to step i of the recurrence, with exact zeros above the
    diagonal. It is built as a cumsum of a masked copy, not as cumsum[i] - cumsum[j]: that
    difference of two large numbers loses precision, and exp(cumsum[i]) * exp(-cumsum[j])
    overflows to inf * 0 = nan under strong decay. -inf is put in *before* exp, so exp gives 0 and
    its gradient there is 0 too.
    """
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    z = a[..., :, None].expand(*a.shape, T).masked_fill(~ones.tril(-1), 0)  # a[k] if k > j else 0
    out = z.cumsum(dim=-2)                                                  # sum a[k], j < k <= i
    return out.masked_fill(~ones.tril(0), float("-inf"))


def _shift(t, step, dim):
    """t moved `step` places towards the end along dim, zeros coming in: out[k] = t[k - step].
    (F.pad with a negative pad crops the other end; unlike slicing + cat, its gradient is one op)
    """
    dim = dim % t.dim()
    return F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (step, -step))


def _parallel_linear_scan(s, log_decay):
    """Inclusive scan of h_k = exp(log_decay_k) * h_{k-1} + s_k (h_{-1} = 0) in O(log K) steps.

    s (..., K, P, N), log_decay (..., K)  ->  h (..., K, P, N) with
    h_k = sum_{j <= k} exp(log_decay_{j+1} + ... + log_decay_k) * s_j.

    This is the parallel-scan idea (work-efficient, as in Blelloch 1990, written recursively).
    Each element is an affine map  h -> exp(l) * h + s,  and two consecutive maps compose into
    one map of the same kind: first (l1, s1) then (l2, s2) is (l1 + l2, exp(l2) * s1 + s2).
    Because composing is associative, we may group the steps as we like:
      1. pair up neighbours (0,1), (2,3), ... and compose each pair: K/2 maps, all at once;
      2. scan those K/2 maps, recursively: that gives h at every odd position 1, 3, 5, ...;
      3. fill in the even positions from the odd ones: h_2i = exp(l_2i) h_(2i-1) + s_2i.
    The recursion is log2(K) levels deep and each level does vectorised work on half as many
    elements as the one above, so the total work stays O(K), as for the loop, but the number of
    sequential steps is O(log K): on a GPU each level is one kernel over all its elements. Here
    it only has to pass L / Q chunk states on; the matmuls of `ssd_scan_parallel` do the
    per-token work.
    """
    K = s.shape[-3]
    if K == 1:
        return s
    if K % 2 == 1:  # odd: append an identity step (no decay, no input) and drop its output
        h = _parallel_linear_scan(F.pad(s, (0, 0, 0, 0, 0, 1)), F.pad(log_decay, (0, 1)))
        return h[..., :K, :, :]
    even, odd = s.unflatten(-3, (K // 2, 2)).unbind(-3)          # s_0, s_2, ...  and  s_1, s_3, ...
    l_even, l_odd = log_decay.unflatten(-1, (K // 2, 2)).unbind(-1)
    pairs = odd + torch.exp(l_odd)[..., None, None] * even       # 1. maps 2i, 2i+1 composed
    h_odd = _parallel_linear_scan(pairs, l_even + l_odd)         # 2. h_1, h_3, h_5, ...
    h_prev = _shift(h_odd, 1, dim=-3)                            #    h_-1 (= 0), h_1, h_3, ...
    h_even = even + torch.exp(l_even)[..., None, None] * h_prev  # 3. h_0, h_2, h_4, ...
    return torch.stack([h_even, h_odd], dim=-3).flatten(-4, -3)  # interleave: h_0, h_1, h_2, ...


def ssd_scan_parallel(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """The same recurrence as `ssd_scan_sequential`, computed chunk by chunk with matmuls.

    x (B, L, H, P), dt (B, L, H) > 0, A (H,) < 0, B and C (B, L, G, N), D (H,) or None,
    initial_state (B, H, P, N) or None (zeros), chunk_size Q  ->  y (B, L, H, P) in x's dtype,
    final_state (B, H, P, N) in float32 (float64 if x is float64).

    Unroll the recurrence: with a_t = dt_t * A (the log of step t's decay, <= 0),

        y_i = sum_{j <= i} exp(a_{j+1} + ... + a_i) * (C_i . B_j) * dt_j x_j
              + exp(a_0 + ... + a_i) * initial_state @ C_i  +  D x_i.

    As a matrix, y = (decay matrix * C B^T) @ (dt x): causal "attention" with a decay mask.
    Doing that over the whole sequence costs L^2; the loop costs L steps that each read and
    write the whole (P, N) state. SSD cuts the sequence into K chunks of Q tokens and uses
      1. the matrix form inside each chunk (one (Q, Q) matmul per chunk and head),
      2. the state at each chunk's end from that chunk's own tokens (one matmul),
      3. a short scan over the K chunk states to pass them on from chunk to chunk,
      4. the carried-in state's contribution to every token of the chunk (one matmul).
    Steps 1, 2 and 4 are matmuls over all chunks at once; step 3 touches only K states.
    Work is O(L Q P + L P N) per head, and no (B, L, H, P, N) tensor is ever built.

    dtypes: the decays (cumsum, segment sums, exp) are computed in float32 (float64 for float64
    inputs) whatever the input dtype; the matmuls run in x's dtype (so bf16 uses bf16 matmuls);
    the chunk-to-chunk states are carried in float32, where errors would compound.
    """
    b, l, h, p, g, n = _check_scan_inputs(x, dt, A, B, C, D, initial_state)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    # A sequence shorter than one chunk is one chunk of its own length: no padding work (the
    # sampler feeds single scales of 1, 4, 9, ... tokens).
    Q, r = min(chunk_size, l), h // g
    sdtype, cdtype = _state_dtype(x.dtype), x.dtype

    # 0. Pad L up to a multiple of Q with dt = 0: decay exp(0 * A) = 1 and input 0 * x = 0, so the
    #    padded steps leave the state unchanged; their outputs are cut off at the end. Then lay
    #    everything out head-major, (batch, group, head in group, chunk, position, channel), so
    #    that every einsum below is a plain batched matmul over the leading dims.
    pad = -l % Q
    K = (l + pad) // Q
    xs, dts, Bs, Cs = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    a = (dts.to(sdtype) * A.to(sdtype)).view(b, K, Q, g, r).permute(0, 3, 4, 1, 2)  # B,G,R,K,Q
    xdt = (xs * dts[..., None].to(cdtype)).view(b, K, Q, g, r, p)      # dt_j x_j: step j's input
    xdt = xdt.permute(0, 3, 4, 1, 2, 5).contiguous()                   # (B, G, R, K, Q, P)
    Bs = Bs.to(cdtype).view(b, K, Q, g, n).permute(0, 3, 1, 2, 4)     # (B, G, K, Q, N)
    Cs = Cs.to(cdtype).view(b, K, Q, g, n).permute(0, 3, 1, 2, 4)     # (B, G, K, Q, N)

    # 1. Inside each chunk: y_i = sum_{j <= i} exp(a_{j+1} + ... + a_i) (C_i . B_j) dt_j x_j.
    #    decay[..., i, j] is the decay from step j to step i (0 for j > i: causal); CB[..., i, j]
    #    is C_i . B_j, computed once per group and shared by its R heads. Their product is each
    #    head's (Q, Q) mixing matrix for the chunk, applied to dt x by one batched matmul.
    decay = torch.exp(_segsum(a))                                       # (B, G, R, K, Q, Q)
    CB = torch.einsum("bgcin,bgcjn->bgcij", Cs, Bs)                     # (B, G, K, Q, Q)
    mix = CB[:, :, None] * decay.to(cdtype)                             # (B, G, R, K, Q, Q)
    y = torch.einsum("bgrcij,bgrcjp->bgrcip", mix, xdt)                 # (B, G, R, K, Q, P)

    # 2. The state each chunk leaves behind from its own tokens (as if it started at zero):
    #    s = sum_j exp(a_{j+1} + ... + a_{Q-1}) dt_j x_j B_j^T. The decay from step j to the
    #    chunk's last step is the last row of the decay matrix.
    to_end = decay[..., -1, :, None].to(cdtype)                         # (B, G, R, K, Q, 1)
    states = torch.einsum("bgrcjp,bgcjn->bgrcpn", xdt * to_end, Bs)     # (B, G, R, K, P, N)

    # 3. Pass the states from chunk to chunk: h_k = exp(sum of a over chunk k) h_{k-1} + s_k,
    #    the same recurrence again, but over K chunk states instead of L tokens. Element 0 is
    #    the initial state, so after the scan element k is the state entering chunk k and the
    #    last element is the final state.
    h0 = (torch.zeros(b, g, r, p, n, dtype=sdtype, device=x.device) if initial_state is None
          else initial_state.to(sdtype).view(b, g, r, p, n))
    s = torch.cat([h0[:, :, :, None], states.to(sdtype)], dim=3)       # (B, G, R, K+1, P, N)
    log_decay = F.pad(a.sum(dim=-1), (1, 0))                            # (B, G, R, K+1)
    h_in, final_state = _parallel_linear_scan(s, log_decay).split([K, 1], dim=3)

    # 4. What the carried-in state adds inside chunk k: y_i += exp(a_0 + ... + a_i) h_in C_i
    #    (a cumsum from the chunk's start: a sum of terms <= 0, safe to exponentiate).
    from_start = torch.exp(a.cumsum(dim=-1))[..., None].to(cdtype)    # (B, G, R, K, Q, 1)
    y = y + torch.einsum("bgcin,bgrcpn->bgrcip", Cs, h_in.to(cdtype)) * from_start

    # Back to (B, L, H, P), dropping the padding, plus the skip connection D x.
    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, K * Q, h, p)[:, :l]
    if D is not None:
        y = y + D.to(cdtype)[:, None] * x
    return y.to(x.dtype), final_state.reshape(b, h, p, n)


# ---------------------------------------------------------------------------------------------
# 2. Mamba-2 layer (SPEC 4.2)
# ---------------------------------------------------------------------------------------------
# One Mamba-2 layer (arXiv 2405.21060, section 7) around the scan above:
#
#   u -> in_proj -> [z | xBC | dt]
#        xBC -> causal depthwise conv (kernel d_conv) -> SiLU -> split into x, B, C
#        dt  -> softplus(dt + dt_bias);   A = -exp(A_log)
#        y = scan(x, dt, A, B, C, D)                          (per head: P = headdim channels)
#        y = rmsnorm(y * silu(z)) * norm.weight               (gated RMSNorm, per group)
#   -> out_proj -> output
#
# Parameter names, shapes and initialisation follow mamba_ssm's `Mamba2` module, so M-VAR's
# released checkpoints load into it. The layer is causal, and everything it remembers about the
# past is a small state: the last d_conv - 1 inputs of the convolution and the SSM state. Passing
# that state between calls lets the sampler feed one scale at a time (or one token at a time)
# and get exactly what the whole-sequence forward pass gives.


class Mamba2State(NamedTuple):
    """What a Mamba2 layer carries from one piece of a sequence to the next."""
    conv: torch.Tensor  # (B, conv_dim, d_conv - 1): the last d_conv - 1 inputs of the conv
    ssm: torch.Tensor   # (B, H, P, N): the SSM state (float32, or float64 for a float64 model)


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(y * silu(z)) * weight, the RMS taken over groups of `group_size` channels
    (mamba_ssm's RMSNormGated with norm_before_gate=False). y, z (..., dim) -> (..., dim)."""

    def __init__(self, dim, group_size, eps=1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        fdtype = _state_dtype(y.dtype)                    # normalise in at least float32
        v = (y * F.silu(z)).to(fdtype).unflatten(-1, (-1, self.group_size))  # (..., groups, size)
        v = v * torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (v.flatten(-2) * self.weight.to(fdtype)).to(y.dtype)


class Mamba2(nn.Module):
    """Mamba-2 layer. forward: u (B, L, d_model), state or None -> y (B, L, d_model), new state.

    d_inner = expand * d_model channels are split into H = d_inner / headdim heads of P = headdim
    channels; B and C (d_state = N each) are shared by the H / ngroups heads of each group.
    """

    def __init__(self, d_model, d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1,
                 chunk_size=64, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, A_init_range=(1, 16)):
        super().__init__()
        d_inner = expand * d_model
        if d_inner % headdim != 0:
            raise ValueError(f"expand * d_model = {d_inner} must be a multiple of "
                             f"headdim = {headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups != 0:
            raise ValueError(f"ngroups = {ngroups} must divide the number of heads = {nheads}")
        if d_conv < 1:
            raise ValueError(f"d_conv must be >= 1, got {d_conv}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, "
                             f"got {A_init_range}")
        self.d_model, self.d_state, self.d_conv, self.headdim = d_model, d_state, d_conv, headdim
        self.d_inner, self.nheads, self.ngroups = d_inner, nheads, ngroups
        self.chunk_size = chunk_size
        self.conv_dim = d_inner + 2 * ngroups * d_state          # x, B, C all go through the conv

        # one projection for everything: z (gate), xBC (conv input), dt (one per head)
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + nheads, bias=False)
        # Depthwise (one filter per channel) and causal: the sequence is left-padded with the
        # carried state (zeros at the start), so no padding inside the module itself.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim)

        # dt = softplus(dt_raw + dt_bias) starts log-uniform in [dt_min, dt_max]: dt_bias is the
        # inverse softplus of such a draw, log(exp(dt) - 1) = dt + log(1 - exp(-dt)).
        log_dt = torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_log) < 0 with -A uniform in A_init_range: per-head decay rates.
        self.A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(nheads))                # skip connection y += D x
        for param in (self.dt_bias, self.A_log, self.D):
            param._no_weight_decay = True                        # as in mamba_ssm: no weight decay

        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // ngroups, eps=1e-5)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def init_state(self, batch, device=None, dtype=None):
        """The empty state (all zeros): what a sequence starts from. -> Mamba2State."""
        device = self.A_log.device if device is None else device
        dtype = self.A_log.dtype if dtype is None else dtype
        return Mamba2State(
            conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                            dtype=_state_dtype(dtype)))

    def forward(self, u, state=None):
        """u (B, L, d_model), state (Mamba2State for batch B, or None = start of the sequence)
        -> y (B, L, d_model), the state after the last token (pass it to the next call)."""
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"u must have shape (batch, length, d_model={self.d_model}), "
                             f"got {tuple(u.shape)}")
        b, l, _ = u.shape
        H, P, N, G = self.nheads, self.headdim, self.d_state, self.ngroups
        if state is None:
            state = self.init_state(b, u.device, u.dtype)
        elif (state.conv.shape != (b, self.conv_dim, self.d_conv - 1)
              or state.ssm.shape != (b, H, P, N)):
            raise ValueError(f"state does not fit this layer and batch {b}: expected conv "
                             f"{(b, self.conv_dim, self.d_conv - 1)} and ssm {(b, H, P, N)}, got "
                             f"{tuple(state.conv.shape)} and {tuple(state.ssm.shape)}")

        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, H], dim=-1)

        # Causal conv: prepend the last d_conv - 1 inputs of the previous piece; the window
        # then yields exactly L outputs, and its last d_conv - 1 inputs are the next conv state.
        xBC = torch.cat([state.conv.to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)
        conv_state = xBC[:, :, l:]                           # (B, conv_dim, d_conv - 1)
        xBC = F.silu(self.conv1d(xBC)).transpose(1, 2)       # (B, L, conv_dim)
        x, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)

        fdtype = _state_dtype(dt.dtype)                   # dt and A in at least float32
        dt = F.softplus(dt.to(fdtype) + self.dt_bias.to(fdtype))                 # (B, L, H) > 0
        A = -torch.exp(self.A_log.to(fdtype))                                     # (H,) < 0
        x, Bm, Cm = x.reshape(b, l, H, P), Bm.reshape(b, l, G, N), Cm.reshape(b, l, G, N)
        if l == 1:    # one token (sampling): a single step of the recurrence is all it takes
            y, ssm_state = ssd_scan_sequential(x, dt, A, Bm, Cm, self.D, state.ssm)
        else:
            y, ssm_state = ssd_scan_parallel(x, dt, A, Bm, Cm, self.D, state.ssm, self.chunk_size)

        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y), Mamba2State(conv_state, ssm_state)

# =====================================================================================
# 3. Configuration
# =====================================================================================
# One dataclass holds every choice that changes the network. The defaults are M-VAR-d16 on
# ImageNet 256 (SPEC §4.3); `depth` drives the rest (width = 64*depth, heads = depth), exactly
# like VAR's size rule, so "d16" or "d20" names a whole model.


@dataclass
class MVARConfig:
    arch: str = "mvar"            # "mvar" (attention inside a scale + Mamba-2 across scales) or "var"
    depth: int = 16               # number of blocks
    width: int = 0                # C; 0 means 64 * depth
    num_heads: int = 0            # attention heads; 0 means depth
    num_classes: int = 1000
    vocab_size: int = 4096        # V, must equal the tokenizer's codebook size
    Cvae: int = 32                # tokenizer latent channels (the teacher input's last dim)
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    mlp_ratio: float = 4.0
    cond_drop: float = 0.1        # probability of replacing the class by the null class (CFG)
    attn_l2_norm: bool = True     # cosine attention with a learned per-head temperature
    drop_path: float = -1.0       # max drop-path rate; < 0 means 0.1 * depth / 24 (SPEC §4.3)
    alng: float = 1e-3            # init scale of the AdaLN gate rows (VAR's `alng`)
    aln: float = 0.5              # init scale of the AdaLN scale/shift rows (VAR's `aln`)
    head_init: float = 0.02       # init scale of the output head (VAR's `hd`)
    # Mamba-2 settings (SPEC §4.2); d_inner = expand * width, heads = d_inner / headdim.
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    scan_chunk: int = 64

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if self.arch not in ("mvar", "var"):
            raise ValueError(f"arch must be 'mvar' or 'var', got {self.arch!r}")
        if self.width <= 0:
            self.width = 64 * self.depth
        if self.num_heads <= 0:
            self.num_heads = self.depth
        if self.drop_path < 0:
            self.drop_path = 0.1 * self.depth / 24
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.arch == "mvar" and (self.expand * self.width) % self.headdim:
            raise ValueError(f"Mamba d_inner = expand*width = {self.expand * self.width} is not "
                             f"divisible by headdim {self.headdim}; change headdim or width")
        pn = self.patch_nums
        if len(pn) < 2 or any(b <= a for a, b in zip(pn, pn[1:])) or pn[0] < 1:
            raise ValueError(f"patch_nums must be at least two strictly increasing positive sizes, "
                             f"got {pn}")

    @property
    def seq_len(self) -> int:
        """L = sum of pn^2 over scales (680 for the 256px pyramid, 2240 for 512px)."""
        return sum(p * p for p in self.patch_nums)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MVARConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MVARConfig fields {unknown}: the checkpoint comes from a "
                             f"newer or different version of mvar.py")
        return cls(**d)


def scale_spans(patch_nums) -> list:
    """[(start, end)] of each scale's tokens in the flattened sequence, e.g. (1,2,3) ->
    [(0,1), (1,5), (5,14)]."""
    spans, start = [], 0
    for pn in patch_nums:
        spans.append((start, start + pn * pn))
        start += pn * pn
    return spans


# =====================================================================================
# 4. Attention: inside one scale (M-VAR) or over all coarser scales (VAR)
# =====================================================================================
# M-VAR's observation (paper §3.2, Fig. 2): in VAR's block-causal attention most of a token's
# attention mass stays inside its own scale. So M-VAR's attention is *intra-scale*: token i of
# scale k attends to exactly the n_k = pn_k^2 tokens of scale k, in both directions, and the
# coarse-to-fine information flow is left to Mamba. The mask would be block-diagonal; instead
# of building an L x L mask and wasting (sum n_k)^2 work we run one small attention per scale,
# which costs sum n_k^2 query-key pairs per layer (for the 256px pyramid 110,468 pairs, vs
# 286,434 for VAR's block-causal attention: 2.6x fewer; see `attention_pairs`).
#
# VAR's attention is block-causal: a token sees its own scale and all coarser ones. The same
# per-scale loop expresses it: the queries of scale k attend to keys [0, end_k). While
# sampling, the keys of earlier scales come from a KV cache.


def attention_pairs(patch_nums, arch: str) -> int:
    """Number of query-key pairs one attention layer computes over the full sequence."""
    total, seen = 0, 0
    for pn in patch_nums:
        n = pn * pn
        seen += n
        total += n * (n if arch == "mvar" else seen)
    return total


class ScaleAttention(nn.Module):
    """Multi-head self-attention evaluated scale by scale.

    Parameter names follow VAR / M-VAR checkpoints: `mat_qkv` (no bias), `q_bias`, `v_bias`
    (k has no bias: a constant added to every key cancels in the softmax), `proj`, and with
    `l2_norm` the learned per-head log-temperature `scale_mul_1H11`.
    """

    def __init__(self, C: int, num_heads: int, l2_norm: bool, block_causal: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.block_causal = block_causal   # True: VAR (sees coarser scales); False: M-VAR
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.proj = nn.Linear(C, C)
        self.l2_norm = l2_norm
        if l2_norm:
            # Cosine attention (VAR): q and k are unit vectors, the logit scale is learned per
            # head, initialised at 4 and clamped at 100 for stability.
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.scale = 1.0
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)   # VAR's choice (smaller than 1/sqrt(d))

    def forward(self, x, spans, kv_cache=None):
        """x: (B, L, C) holding the scales listed in `spans` ([(start, end)] into x).
        kv_cache (VAR sampling only): (k, v) of all earlier scales, each (B, H, L_prev, hd).
        Returns (B, L, C) and the updated cache (None unless a cache was given)."""
        B, L, C = x.shape
        H, hd = self.num_heads, self.head_dim
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                        # each (B, H, L, hd)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
            k = F.normalize(k, dim=-1)
        offset = 0                       # number of cached tokens in front of x
        if kv_cache is not None:
            offset = kv_cache[0].shape[2]
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
            kv_cache = (k, v)
        outs = []
        for start, end in spans:
            # M-VAR: keys of this scale only. VAR: keys of this scale and every coarser one.
            k_start = 0 if self.block_causal else offset + start
            outs.append(F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, k_start:offset + end], v[:, :, k_start:offset + end],
                scale=self.scale))
        out = torch.cat(outs, dim=2).transpose(1, 2).reshape(B, L, C)
        return self.proj(out), kv_cache


class FFN(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (VAR's MLP, ratio 4)."""

    def __init__(self, C: int, mlp_ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(C, int(C * mlp_ratio))
        self.fc2 = nn.Linear(int(C * mlp_ratio), C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def drop_path(x, rate: float, training: bool):
    """Stochastic depth: drop a whole residual branch for some samples. x: (B, ...)."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


# =====================================================================================
# 5. The AdaLN block: attention inside a scale, Mamba-2 across scales, FFN
# =====================================================================================
# Paper §3.2, Eq. (4)-(6), SPEC §4.3:
#   x += g1 * Attn (LN(x) * (1 + s1) + b1)     intra-scale, bidirectional
#   x += g2 * Mamba(LN(x) * (1 + s2) + b2)     inter-scale, causal over the whole sequence
#   x += g3 * FFN  (LN(x) * (1 + s3) + b3)
# The 9 modulation vectors come from the class embedding through `ada_lin` (SiLU + Linear),
# ordered g1,g2,g3, s1,s2,s3, b1,b2,b3. LN has no affine parameters: AdaLN supplies them.
# The VAR block is the same without the Mamba line (6 vectors: g1,g2, s1,s2, b1,b2).


class MambaPrefix(NamedTuple):
    """Sampling cache of the official M-VAR method: every earlier Mamba input, (B, L_prev, C)."""
    inputs: torch.Tensor


class Block(nn.Module):
    def __init__(self, cfg: MVARConfig, drop_path_rate: float):
        super().__init__()
        C = cfg.width
        self.is_mvar = cfg.arch == "mvar"
        self.num_branches = 3 if self.is_mvar else 2
        self.drop_path_rate = drop_path_rate
        self.attn = ScaleAttention(C, cfg.num_heads, cfg.attn_l2_norm, block_causal=not self.is_mvar)
        if self.is_mvar:
            self.mamba = Mamba2(C, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                                headdim=cfg.headdim, chunk_size=cfg.scan_chunk)
        self.ffn = FFN(C, cfg.mlp_ratio)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 3 * self.num_branches * C))

    def forward(self, x, cond_BC, spans, cache=None):
        """x: (B, L, C) tokens of the scales in `spans`; cond_BC: (B, C) class embedding.
        cache: None while training. While sampling, what this block carries from earlier
        scales: M-VAR -> the Mamba2State (fixed size); VAR -> the attention KV cache (grows);
        M-VAR with mamba_mode="rerun" -> MambaPrefix (all earlier Mamba inputs).
        Returns (x, cache)."""
        B, L, C = x.shape
        n = self.num_branches
        mods = self.ada_lin(cond_BC).view(B, 1, 3 * n, C)
        gates, scales, shifts = mods[:, :, :n], mods[:, :, n:2 * n], mods[:, :, 2 * n:]

        def modulated(i):     # LN(x) * (1 + s_i) + b_i
            return F.layer_norm(x, (C,), eps=1e-6) * (1 + scales[:, :, i]) + shifts[:, :, i]

        def add(branch_out, i):
            return x + drop_path(branch_out * gates[:, :, i], self.drop_path_rate, self.training)

        attn_cache = cache if not self.is_mvar else None
        a, attn_cache = self.attn(modulated(0), spans, attn_cache)
        x = add(a, 0)
        if self.is_mvar:
            m_in = modulated(1)
            if isinstance(cache, MambaPrefix):
                # The official M-VAR sampler: keep every earlier Mamba input and re-run the
                # layer over the whole prefix at each scale (cost grows with the prefix).
                prefix = torch.cat([cache.inputs, m_in], dim=1)
                m_out = self.mamba(prefix)[0][:, -L:]
                cache = MambaPrefix(prefix)
            else:
                # This project's sampler (and training, with cache=None): carry the state.
                m_out, cache = self.mamba(m_in, cache)
            x = add(m_out, 1)
        else:
            cache = attn_cache
        x = add(self.ffn(modulated(n - 1)), n - 1)
        return x, cache


class AdaLNBeforeHead(nn.Module):
    """LN(x) * (1 + s) + b with (s, b) from the class embedding (VAR's `head_nm`)."""

    def __init__(self, C: int):
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond_BC):
        """x: (B, L, C), cond_BC: (B, C) -> (B, L, C)."""
        scale, shift = self.ada_lin(cond_BC).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


# =====================================================================================
# 6. The model
# =====================================================================================


class MVAR(nn.Module):
    """Class-conditional scale-wise autoregressive generator (M-VAR, or VAR with arch="var").

    Sequence layout (SPEC §4.3): L = sum pn^2 tokens, scale 0 first. The input of scale 0 is
    the class token (its `pn0^2` positions share it); the input of scale k > 0 is the
    tokenizer's running reconstruction f_hat after scales < k, area-downsampled to pn_k x pn_k
    (the "teacher input"), so predicting scale k never sees scale k's own tokens.
    """

    def __init__(self, cfg: MVARConfig):
        super().__init__()
        self.cfg = cfg
        C, K, L = cfg.width, len(cfg.patch_nums), cfg.seq_len
        first = cfg.patch_nums[0] ** 2
        self.spans = scale_spans(cfg.patch_nums)
        init_std = math.sqrt(1 / C / 3)

        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)   # last row: the null class
        self.pos_start = nn.Parameter(torch.empty(1, first, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(K, C)
        # Scale id of every position; not saved (official checkpoints carry it as `lvl_1L`).
        lvl = torch.cat([torch.full((p * p,), k) for k, p in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", lvl.view(1, L), persistent=False)

        # drop-path rate grows linearly with depth: 0 for the first block, cfg.drop_path last
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, cfg.vocab_size)
        self._init_weights(init_std)

    # ----- initialisation (VAR's recipe, SPEC §4.3) -------------------------------------
    @torch.no_grad()
    def _init_weights(self, std: float):
        cfg, C = self.cfg, self.cfg.width
        for m in self.modules():
            if isinstance(m, nn.Linear):          # includes Mamba's in_proj and out_proj
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        self.head.weight.mul_(cfg.head_init)
        self.head_nm.ada_lin[-1].weight.mul_(cfg.aln)
        residual_div = math.sqrt(2 * cfg.depth)   # keep the residual stream's variance ~ depth-free
        for block in self.blocks:
            block.attn.proj.weight.div_(residual_div)
            block.ffn.fc2.weight.div_(residual_div)
            if block.is_mvar:
                block.mamba.out_proj.weight.div_(residual_div)
            n = block.num_branches
            block.ada_lin[-1].weight[:n * C].mul_(cfg.alng)    # gates start near 0
            block.ada_lin[-1].weight[n * C:].mul_(cfg.aln)     # scales and shifts

    # ----- helpers -----------------------------------------------------------------------
    def _check_labels(self, labels, allow_null: bool):
        top = self.cfg.num_classes + (1 if allow_null else 0)
        if labels.dtype not in (torch.int64, torch.int32) or labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= top):
            raise ValueError(f"class labels must be in [0, {self.cfg.num_classes - 1}] "
                             f"(the model has num_classes={self.cfg.num_classes}); got "
                             f"min {labels.min().item()}, max {labels.max().item()}")

    def _logits(self, x, cond_BC):
        """(B, l, C) -> float32 logits (B, l, V)."""
        return self.head(self.head_nm(x, cond_BC)).float()

    # ----- teacher-forced forward (training and evaluation) -----------------------------
    def forward(self, labels, teacher_input):
        """labels: (B,) in [0, num_classes] (num_classes = the null class);
        teacher_input: (B, L - pn0^2, Cvae) from tokenizer.idx_to_teacher_input.
        Returns logits (B, L, V). In train mode each label is replaced by the null class
        with probability cond_drop, which teaches the unconditional model used by CFG."""
        cfg = self.cfg
        self._check_labels(labels, allow_null=True)
        B, first = labels.shape[0], cfg.patch_nums[0] ** 2
        if teacher_input.shape[1:] != (cfg.seq_len - first, cfg.Cvae):
            raise ValueError(f"teacher_input must be (B, {cfg.seq_len - first}, {cfg.Cvae}) for "
                             f"patch_nums {cfg.patch_nums}, got {tuple(teacher_input.shape)}")
        if self.training and cfg.cond_drop > 0:
            drop = torch.rand(B, device=labels.device) < cfg.cond_drop
            labels = torch.where(drop, torch.full_like(labels, cfg.num_classes), labels)
        cond_BC = self.class_emb(labels)
        sos = cond_BC.unsqueeze(1) + self.pos_start                  # (B, first, C)
        x = torch.cat([sos, self.word_embed(teacher_input.to(sos.dtype))], dim=1)
        x = x + self.lvl_embed(self.lvl_1L) + self.pos_1LC           # (B, L, C)
        for block in self.blocks:
            x, _ = block(x, cond_BC, self.spans)
        return self._logits(x, cond_BC)

    # ----- sampling (SPEC §4.3 "Sampling") ------------------------------------------------
    @torch.no_grad()
    def sample_tokens(self, tokenizer, labels, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False,
                      generator=None, mamba_mode="carry", return_scales=False, return_logits=False):
        """Generate token maps scale by scale. labels: (B,) class ids.

        Only the new scale's tokens go through the blocks; what they need from earlier scales
        is carried per block: the Mamba2State (M-VAR, fixed size), or the attention KV cache
        (VAR, grows with the prefix). mamba_mode="rerun" instead re-runs Mamba over the whole
        prefix at every scale, as the official M-VAR sampler does (same result, more work).

        Returns a dict: "idx" list of K (B, pn^2) token maps, "f_hat" (B, Cvae, h, w), and if
        asked "scales" (the f_hat after each scale) and "logits" (per scale, the raw (2B, n, V)
        logits of the conditional and null halves when cfg > 0, else (B, n, V))."""
        c = self.cfg
        self._check_labels(labels, allow_null=False)
        tok_pn = tuple(tokenizer.cfg.patch_nums)
        tc = tokenizer.cfg
        if (tok_pn, tc.vocab_size, tc.z_channels) != (c.patch_nums, c.vocab_size, c.Cvae):
            raise ValueError(f"tokenizer (patch_nums {tok_pn}, vocab {tc.vocab_size}, Cvae "
                             f"{tc.z_channels}) does not match the generator (patch_nums "
                             f"{c.patch_nums}, vocab {c.vocab_size}, Cvae {c.Cvae}); load the "
                             f"tokenizer the generator was trained with")
        if mamba_mode not in ("carry", "rerun"):
            raise ValueError(f"mamba_mode must be 'carry' or 'rerun', got {mamba_mode!r}")
        B, K = labels.shape[0], len(c.patch_nums)
        use_cfg = cfg > 0
        if use_cfg:   # one batch: conditional half, then the null class half
            labels = torch.cat([labels, torch.full_like(labels, c.num_classes)])
        cond_BC = self.class_emb(labels)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC                 # (1, L, C)
        x = cond_BC.unsqueeze(1) + self.pos_start + lvl_pos[:, :c.patch_nums[0] ** 2]

        def empty_cache(block):   # what each block carries before the first scale
            if not block.is_mvar:   # VAR: an empty KV cache, k and v each (B, H, 0, hd)
                kv = x.new_zeros(x.shape[0], c.num_heads, 0, c.width // c.num_heads)
                return (kv, kv)
            if mamba_mode == "rerun":
                return MambaPrefix(x.new_zeros(x.shape[0], 0, c.width))
            return None             # Mamba starts from the zero state

        caches = [empty_cache(b) for b in self.blocks]
        f_hat, out = None, {"idx": [], "scales": [], "logits": []}
        codebook = tokenizer.quantize.embedding.weight                        # (V, Cvae)
        for k, pn in enumerate(c.patch_nums):
            span = [(0, pn * pn)]
            for i, block in enumerate(self.blocks):
                x, caches[i] = block(x, cond_BC, span, caches[i])
            logits = self._logits(x, cond_BC)                                  # (2B or B, n, V)
            if return_logits:
                out["logits"].append(logits)
            ratio = k / (K - 1)
            if use_cfg:   # classifier-free guidance, strength ramped linearly over scales
                t = cfg * ratio
                logits = (1 + t) * logits[:B] - t * logits[B:]
            if more_smooth:   # soft (gumbel-softmax) code mixture: smoother pictures, not for FID
                tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
                probs = gumbel_softmax(logits * (1 + ratio), tau, generator)
                h = (probs @ codebook).transpose(1, 2).reshape(B, c.Cvae, pn, pn)
                idx = probs.argmax(-1)
            else:
                idx = sample_top_k_top_p(logits, top_k, top_p, generator)      # (B, n)
                h = tokenizer.embed_scale(idx, k)
            out["idx"].append(idx)
            f_hat, next_in = tokenizer.next_input(k, f_hat, h)
            if return_scales:
                out["scales"].append(f_hat.clone())
            if k + 1 < K:
                start = sum(p * p for p in c.patch_nums[:k + 1])
                n_next = c.patch_nums[k + 1] ** 2
                x = self.word_embed(next_in.flatten(2).transpose(1, 2)) + lvl_pos[:, start:start + n_next]
                if use_cfg:
                    x = torch.cat([x, x])
        out["f_hat"] = f_hat
        return out

    @torch.no_grad()
    def generate(self, tokenizer, labels, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False,
                 generator=None, return_scales=False, mamba_mode="carry"):
        """Sample images for `labels` (B,). Returns images (B, C, H, W) in [0, 1]; with
        return_scales also a list of K such batches, the picture decoded after each scale."""
        out = self.sample_tokens(tokenizer, labels, cfg, top_k, top_p, more_smooth, generator,
                                 mamba_mode, return_scales=return_scales)
        to01 = lambda f: tokenizer.fhat_to_img(f).add(1).mul(0.5).clamp(0, 1)
        images = to01(out["f_hat"])
        if return_scales:
            return images, [to01(f) for f in out["scales"]]
        return images


# =====================================================================================
# 7. Sampling helpers, loss and checkpoint loading
# =====================================================================================


def sample_top_k_top_p(logits, top_k=0, top_p=0.0, generator=None):
    """Draw one token per position. logits: (B, n, V) -> (B, n) LongTensor.
    top_k > 0 keeps the k most likely tokens; 0 < top_p < 1 keeps the smallest set of most
    likely tokens whose probability reaches top_p (always at least the most likely one)."""
    B, n, V = logits.shape
    logits = logits.float().clone()
    if top_k > 0:
        kth_best = logits.topk(min(top_k, V), dim=-1).values[..., -1:]
        logits[logits < kth_best] = -math.inf
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens *before* it already reach top_p: the best one stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        logits.scatter_(-1, order, sorted_logits.masked_fill(drop_sorted, -math.inf))
    probs = logits.softmax(-1).view(B * n, V)
    return torch.multinomial(probs, 1, generator=generator).view(B, n)


def gumbel_softmax(logits, tau, generator=None):
    """Soft sample: softmax((logits + Gumbel noise) / tau) over the last dim, seedable."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-10, 1 - 1e-10)
    return ((logits.float() - torch.log(-torch.log(u))) / tau).softmax(-1)


def compute_loss(logits, idx_list):
    """Cross-entropy over all L tokens (uniform weight) and per-scale top-1 accuracy.
    logits: (B, L, V); idx_list: K LongTensors (B, pn^2). Returns (loss, acc (K,))."""
    target = torch.cat(idx_list, dim=1)                                     # (B, L)
    loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
    with torch.no_grad():
        hit = (logits.argmax(-1) == target).float()                         # (B, L)
        acc, start = [], 0
        for idx in idx_list:
            acc.append(hit[:, start:start + idx.shape[1]].mean())
            start += idx.shape[1]
    return loss, torch.stack(acc)
