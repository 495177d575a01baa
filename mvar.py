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
In the scan's einsum strings the same letters are lower case, plus c (chunk), i, j (positions in
a chunk: i = output/target, j = input/source) and r (head within its group, r = H // G of them).
"""

import math
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
    Q, r = chunk_size, h // g
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
