"""M-VAR generator: the Mamba-2 scan and layer, attention inside a scale, the AdaLN block, the
M-VAR model (and the VAR baseline it is measured against), sampling and the loss.

M-VAR (arXiv 2411.10433) generates an image coarse to fine, one scale of VQ tokens at a time, like
VAR (arXiv 2404.02905). Each block splits VAR's attention in two: attention *inside* a scale, and a
Mamba-2 layer (arXiv 2405.21060) that runs causally over the whole flattened sequence of scales,
at linear cost. The paper calls the second inter-scale modeling: Mamba is the block's only path
from the coarser scales to a finer one (each scale also gets the coarser ones through its input).
What the trained model carries along that path is measured, not assumed: section 5's comment.
Sections, top to bottom: 1 the scan (a loop, then chunked, then as one matrix), 2 the Mamba-2
layer, 3 config, 4 attention, 5 the AdaLN block (M-VAR's, then VAR's), 6 the model (forward pass,
sampler), 7 sampling rules and the loss, 8 the checks of what a user passes in.
FFN and AdaLNBeforeHead keep VAR's names.

Words. A *scale* is one level of the token pyramid, and nothing else. AdaLN computes
LN(x) * (1 + gain) + shift and multiplies a branch's output by a *gate*; attention multiplies
q . k by a *temperature*; classifier-free guidance has a strength, *guidance*.

Shape letters, the sizes in docstrings and shape comments: one meaning each as a size or an index
in the four chapters (mvar.py, tokenizer.py, train.py, sample.py; throwaway names such as a dict
comprehension's k, v are not held to it), written lower case in einsum / einops strings (so h
there is H, the heads), except L, which stays L there so as not to read as l:
  B    batch                                 C     model width (d_model)
  K    number of scales                      V     codebook size (vocab_size)
  pn   side of one scale's token map         Cvae  tokenizer latent channels
  l    pn^2, the tokens of one scale         L     sequence length: the tokens a layer is given
                                                   (all the scales, sum pn^2, when teacher-forced)
  H    heads of the layer at hand: num_heads in attention, expand * C / P in Mamba-2
       (at depth 16: 16 attention heads, 32 SSM heads)
  d    channels per attention head           P     channels per SSM head (headdim)
  N    SSM state size (d_state)              G     groups of SSM heads that share Bm and Cm
  r    SSM heads per group, H / G            Q     chunk length of the parallel scan
  c    number of chunks
Indices: k a scale, i and j token positions (i receives, j sends), h a head (A_h, D_h), m a chunk,
t a step of the loop. Three letters keep a second meaning, listed here: attention's q, k, v
(queries, keys, values: tensors, so k is never an index there); h, w, tokenizer.py's latent height
and width (used here only for f_hat's shape, (B, Cvae, h, w)); and M, here the SSM's (L, L) matrix (ssd_attention_matrix,
the Mamba-2 paper's name), in tokenizer.py a count of vectors. The SSM's matrices, A B C D in the
Mamba-2 paper, are A, Bm, Cm, D here, also inside names (CmBm, Bm_c), so that B and C stay sizes.
A block's residual lines are numbered from 0 in the code (Block.ATTN_LINE = 0, MAMBA_LINE = 1,
FFN_LINE = 2; VARBlock has no Mamba line, so its FFN_LINE is 1) where the paper writes gate_1,
gate_2, gate_3. A name's suffix gives its shape, as
in the official code: pos_1LC is (1, L, C), cond_BC is (B, C). Cimg and S (image channels and
side) are tokenizer.py's.

Map 1, the papers to this file:
  Mamba-2, the SSM recurrence (a scalar decay per head), a loop    ssd_scan_sequential
  Mamba-2 §6, the SSD algorithm: chunked matmuls, and a short      ssd_scan_parallel, segsum
    loop that passes states from chunk to chunk
  Mamba-2 §4-5, state space duality: the SSM as a masked attention ssd_attention_matrix,
    matrix (its "hidden attention", arXiv 2403.01590)              Mamba2.hidden_attention
  Mamba-2 §7, the Mamba-2 layer (projections, conv, gated norm)    Mamba2, GatedRMSNorm
  M-VAR method, intra-scale modeling: bidirectional attention      ScaleAttention.attend (the
    restricted to one scale                                        rule), attention_pairs
  M-VAR method, inter-scale modeling: Mamba over all scales        Block (second residual line)
  M-VAR method, the block: three AdaLN-modulated, gated residual   Block.forward, adaln_modulation
    lines (attention, Mamba, FFN)
  VAR, the baseline's block: block-causal attention, no Mamba      VARBlock
  VAR / M-VAR, next-scale prediction with teacher forcing          MVAR.forward, compute_loss
  VAR / M-VAR sampling: scale by scale, CFG ramp, top-k / top-p    MVAR.sample_tokens,
                                                                   Block.forward_one_scale
Map 2, the official code's names to this file's:
  AdaLNSelfAttn (M-VAR; VAR's of the same name)     Block (VARBlock)
  SelfAttention                                     ScaleAttention
  Mamba2, RMSNormGated (mamba_ssm)                  Mamba2, GatedRMSNorm
  mamba_chunk_scan_combined (mamba_ssm kernel)      ssd_scan_parallel
  ssd_minimal_discrete, segsum_unstable (listing)   ssd_scan_parallel, segsum (the listing takes
                                                    x*dt and A*dt, not x, dt, A; and passes
                                                    states on with one more exp(segsum) matmul
                                                    where this file loops over the chunks)
  selective_state_update (one decoding step)        ssd_scan_sequential with L = 1
  autoregressive_infer_cfg                          MVAR.sample_tokens (it re-runs Mamba over the
                                                    prefix at every scale; this file carries the
                                                    state: benchmarks/rerun_sampler.py keeps the
                                                    official way, as the baseline)
  init_weights                                      MVAR._init_weights
  sample_with_top_k_top_p_, gumbel_softmax_with_rng top_k_top_p_filter, sample_top_k_top_p,
                                                    gumbel_softmax
  DropPath                                          adaln_modulation's gate
  AdaLN's gamma1, scale1, shift1 (and 2, 3)         gate, gain, shift of ATTN_LINE (MAMBA_LINE,
                                                    FFN_LINE)
  cfg (the sampler's argument)                      guidance
State-dict keys are the official ones: among them `scale_mul_1H11` (the log of the attention
temperature), `ada_lin` (the AdaLN rows: gates, gains, shifts), `mat_qkv`, `q_bias`, `v_bias`,
`pos_1LC`, `lvl_embed`, `head_nm`. The released files also carry buffers this model computes
instead (`lvl_1L`, `attn_bias_for_masking`, ...), so they load through
runtime.load_official_checkpoint, which drops those and loads the rest strictly (tested on the
official code's own tiny models, tests/test_golden.py; the released files were never loaded here).
The tokenizer side of the official code (idxBl_to_var_input, get_next_autoregressive_input,
f_to_idxBl_or_fhat) lives in tokenizer.py. Left out: mamba_ssm's fused GPU kernels (everything
here is plain torch, so it runs on any device) and VAR's flash-attention / fused-norm options.
"""

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


# =====================================================================================
# 1. The selective state-space scan (Mamba-2 §6)
# =====================================================================================
# Mamba-2's SSM, per head h with a *scalar* decay A_h < 0 and step sizes dt_t > 0:
#
#     state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * outer(x_t, Bm_t)     state: (P, N)
#     y_t     = state_t @ Cm_t + D_h * x_t                                     y_t:   (P,)
#
# The decay exp(dt_t A_h) is what makes the SSM *selective*: dt_t is computed from the token, so
# a token can decide how much of the past to keep (dt large: forget; dt small: keep). A is one
# number per head in Mamba-2 (a diagonal matrix in Mamba-1), which is what lets §6 rewrite the
# whole recurrence as matmuls.
# `ssd_scan_sequential` is this recurrence written as a loop: the reference, and the one-step
# update Mamba2 uses for a one-token piece (sampling the 1x1 scale; every other scale, sampled or
# teacher-forced, goes through the chunked scan). `ssd_scan_parallel` computes exactly the same
# thing with a few large matmuls (the "SSD" chunked algorithm of Mamba-2 §6), which is what makes
# training fast on any device: it uses only cumsum / exp / masks / batched matmuls and a short loop
# over chunks, no custom kernel. Both check their inputs' shapes first (section 8, at the end of the file).
# tests/test_scan.py holds the parallel scan to the loop in float64 (outputs, final states and
# gradients), and notebook 01 builds it up step by step, with its decay matrix as a picture.


def _state_dtype(dtype):
    """The state accumulates over the whole sequence: keep it in at least float32 (bf16 -> fp32)."""
    return torch.promote_types(dtype, torch.float32)


def ssd_scan_sequential(x, dt, A, Bm, Cm, D=None, initial_state=None):
    """The SSM recurrence as a plain loop over time (reference; one-step update when L = 1).

    x (B, L, H, P), dt (B, L, H) > 0, A (H,) < 0, Bm and Cm (B, L, G, N), D (H,) (the per-head
    skip weight) or None, initial_state (B, H, P, N) or None (zeros)  ->  y (B, L, H, P) in x's
    dtype, final_state (B, H, P, N) in float32 (float64 if x is float64).
    """
    B, L, H, P, G, N = _check_scan_inputs(x, dt, A, Bm, Cm, D, initial_state)
    sdtype = _state_dtype(x.dtype)
    # Head h reads group h // (H / G): repeat each group's Bm and Cm for its H / G heads.
    Bm, Cm = (repeat(tensor, "... g n -> ... (g r) n", r=H // G).to(sdtype)
              for tensor in (Bm, Cm))                                   # (B, L, H, N)
    xs, dts = x.to(sdtype), dt.to(sdtype)
    decay = torch.exp(dts * A.to(sdtype))                       # (B, L, H), in (0, 1]
    state = x.new_zeros(B, H, P, N, dtype=sdtype) if initial_state is None else initial_state.to(sdtype)
    ys = []
    for t in range(L):
        # state_t = exp(dt_t A) state_{t-1} + dt_t x_t Bm_t^T   (outer product: (P, N) per head)
        state = (decay[:, t, :, None, None] * state
                 + (dts[:, t, :, None] * xs[:, t])[..., None] * Bm[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Cm[:, t]))   # y_t = state_t Cm_t
    y = torch.stack(ys, dim=1)                                  # (B, L, H, P)
    if D is not None:
        y = y + D.to(sdtype)[:, None] * xs
    return y.to(x.dtype), state


def segsum(a):
    """Segment sums of a (..., Q) -> (..., Q, Q): out[..., i, j] = a[j+1] + ... + a[i] for j <= i
    (so 0 on the diagonal) and -inf for j > i.

    exp(out) is then the decay from step j to step i of the recurrence, with exact zeros above the
    diagonal. The sums are differences of running sums, cumsum[i] - cumsum[j]. Above the diagonal
    they are >= 0, and large under strong decay, so -inf goes in *before* exp: exp gives exactly
    0 there and so does its gradient (exp first and a mask after would give inf * 0 = nan).

    Precision: each running sum is rounded to float32, an error that grows with its size (about
    1e-4 near -2000), and subtracting two nearby sums leaves that error in a small segment sum.
    So the sums must stay short. ssd_scan_parallel calls this once on all chunks, a of shape
    (..., c, Q): the running sums run along the last dim only, so they restart at every chunk and
    never cover more than Q <= chunk_size steps. (mamba_ssm's ssd_minimal.py, the Mamba-2 paper's
    listing, has both this "segsum_unstable" and a "more stable" segsum that cumsums a masked
    (Q, Q) copy; that one costs about twice the time on a CPU, benchmarks/RESULTS.md.)
    """
    Q = a.shape[-1]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()    # j <= i
    cs = a.cumsum(dim=-1)                                               # a[0] + ... + a[i]
    return (cs[..., :, None] - cs[..., None, :]).masked_fill_(~causal, float("-inf"))


def ssd_scan_parallel(x, dt, A, Bm, Cm, D=None, initial_state=None, chunk_size=64):
    """The same recurrence as `ssd_scan_sequential` (same arguments and results), computed chunk
    by chunk with matmuls; chunk_size caps the chunk length Q (below: Q = ceil(L / c) for the
    c = ceil(L / chunk_size) chunks, so that there is almost no padding).

    Unroll the recurrence: with a_t = dt_t * A (the log of step t's decay, <= 0), and i, j
    positions in the sequence (from 0),

        y_i = sum_{j <= i} exp(a_{j+1} + ... + a_i) * (Cm_i . Bm_j) * dt_j x_j
              + exp(a_0 + ... + a_i) * initial_state @ Cm_i  +  D x_i.

    As a matrix, y = (decay matrix * Cm Bm^T) @ (dt x): causal "attention" with a decay mask
    (Mamba-2's "state space duality", the SSD of its title). Doing that over the whole sequence
    costs L^2; the loop costs L steps that each read and write the whole (P, N) state. SSD cuts
    the sequence into c chunks of Q tokens and uses
      1. the matrix form inside each chunk (one (Q, Q) matmul per chunk and head),
      2. the state at each chunk's end from that chunk's own tokens (one matmul),
      3. a short loop over the c chunk states to pass them on from chunk to chunk,
      4. the entering state's contribution to every token of the chunk (one matmul).
    Steps 1, 2 and 4 are matmuls over all chunks at once; step 3 touches only c states. (In the
    steps' comments below, i and j count from 0 inside each chunk.)
    Work is O(L Q P + L P N) per head plus O(L Q N) per group (Cm Bm^T), and no (B, L, H, P, N)
    tensor is ever built.

    dtypes: the decays (cumsum, segment sums, exp) are computed in float32 (float64 for float64
    inputs) whatever the input dtype; the matmuls run in x's dtype (so bf16 uses bf16 matmuls);
    the chunk-to-chunk states are carried in float32, where errors would compound.
    """
    B, L, H, P, G, N = _check_scan_inputs(x, dt, A, Bm, Cm, D, initial_state, chunk_size)
    # c chunks of equal length Q <= chunk_size, Q chosen from L so that c * Q - L < c: at most a
    # few padding tokens (L = 88 with chunk_size 64 is 2 chunks of 44, not 2 of 64 with 40 padding;
    # a sequence shorter than one chunk, as the sampler's single scales are, is one chunk).
    c = -(-L // chunk_size)
    Q = -(-L // c)
    sdtype, cdtype = _state_dtype(x.dtype), x.dtype

    # 0. Pad L up to c * Q with dt = 0: decay exp(0 * A) = 1 and input 0 * x = 0, so the padded
    #    steps leave the state unchanged; their outputs are cut off at the end. Then lay
    #    everything out as (batch, group, head in group, chunk, position, channel), so that every
    #    product below is a plain batched matmul over the leading dims.
    pad = c * Q - L
    xs, dts, Bm_c, Cm_c = (F.pad(tensor, (0, 0) * (tensor.dim() - 2) + (0, pad))
                          for tensor in (x, dt, Bm, Cm))  # length dim
    a = rearrange(dts.to(sdtype) * A.to(sdtype), "b (c q) (g r) -> b g r c q", q=Q, g=G)
    xdt = rearrange(xs * dts[..., None].to(cdtype),                  # dt_j x_j: step j's input
                    "b (c q) (g r) p -> b g r c q p", q=Q, g=G).contiguous()
    Bm_c, Cm_c = (rearrange(tensor.to(cdtype), "b (c q) g n -> b g 1 c q n", q=Q).contiguous()
                  for tensor in (Bm_c, Cm_c))                    # (B, G, 1, c, Q, N); _c: chunked

    # 1. Inside each chunk: y_i = sum_{j <= i} exp(a_{j+1} + ... + a_i) (Cm_i . Bm_j) dt_j x_j.
    #    decay[..., i, j] is the decay from step j to step i (0 for j > i: causal); CmBm[..., i, j]
    #    is Cm_i . Bm_j, computed once per group and shared by its heads. Their product is each
    #    head's (Q, Q) mixing matrix for the chunk, applied to dt x by one batched matmul.
    decay = torch.exp(segsum(a))                                        # (B, G, r, c, Q, Q)
    CmBm = Cm_c @ Bm_c.transpose(-1, -2)                                # (B, G, 1, c, Q, Q)
    y = (CmBm * decay.to(cdtype)) @ xdt                                 # (B, G, r, c, Q, P)

    # 2. The state each chunk leaves behind from its own tokens (as if it started at zero):
    #    s = sum_j exp(a_{j+1} + ... + a_{Q-1}) dt_j x_j Bm_j^T. The decay from step j to the
    #    chunk's last step is the last row of the decay matrix; it scales Bm_j.
    Bm_to_end = Bm_c * decay[..., -1, :, None].to(cdtype)               # (B, G, r, c, Q, N)
    states = xdt.transpose(-1, -2) @ Bm_to_end                          # (B, G, r, c, P, N)

    # 3. Pass the states from chunk to chunk: state_m = exp(sum of a over chunk m) state_{m-1}
    #    + states[m], the same recurrence again, over c chunk states instead of L tokens: a loop
    #    of c steps (11 for the 256px pyramid). state_in[m] is the state entering chunk m; the
    #    last `state` is the final one. (notebooks/01_parallel_scan.ipynb does this loop in log
    #    depth, and times both: for so few chunks the loop is faster on a CPU.)
    state = (torch.zeros(B, G, H // G, P, N, dtype=sdtype, device=x.device) if initial_state is None
             else rearrange(initial_state.to(sdtype), "b (g r) p n -> b g r p n", g=G))
    chunk_decay = torch.exp(a.sum(dim=-1))[..., None, None]             # (B, G, r, c, 1, 1)
    state_in = []
    for own_m, decay_m in zip(states.to(sdtype).unbind(3), chunk_decay.unbind(3)):
        state_in.append(state)
        state = decay_m * state + own_m
    state_in = torch.stack(state_in, dim=3)                             # (B, G, r, c, P, N)

    # 4. What the entering state adds inside each chunk: y_i += exp(a_0 + ... + a_i) state_in @ Cm_i
    #    (a cumsum from the chunk's start: a sum of terms <= 0, safe to exponentiate; it scales Cm_i).
    Cm_from_start = Cm_c * torch.exp(a.cumsum(dim=-1))[..., None].to(cdtype)   # (B, G, r, c, Q, N)
    y = y + Cm_from_start @ state_in.to(cdtype).transpose(-1, -2)             # (B, G, r, c, Q, P)

    # Back to (B, L, H, P), dropping the padding, plus the skip connection D x.
    y = rearrange(y, "b g r c q p -> b (c q) (g r) p")[:, :L]
    if D is not None:
        y = y + D.to(cdtype)[:, None] * x
    return y.to(x.dtype), rearrange(state, "b g r p n -> b (g r) p n")


def ssd_attention_matrix(dt, A, Bm, Cm):
    """The scan as one matrix: Mamba-2's "hidden attention". dt (B, L, H) > 0, A (H,) < 0, Bm and
    Cm (B, L, G, N) -> M (B, H, L, L), with the scans' y = M @ x + D x (no initial state):

        M[b, h, i, j] = (Cm_i . Bm_j) * exp(a_{j+1} + ... + a_i) * dt_j   for j <= i, 0 above,

    a_t = dt_t A_h. This is ssd_scan_parallel's step 1 over the whole sequence instead of a chunk:
    Mamba-2's duality (SSD) says the layer's SSM *is* this masked linear attention, with Cm as
    the queries, Bm as the keys and x as the values. Like attention weights, row i says how much
    of each token j's value reaches token i; unlike them, rows do not sum to 1 and entries can be
    negative (Cm_i . Bm_j has either sign). Ali, Zimerman and Wolf draw it ("The Hidden Attention
    of Mamba Models", arXiv 2403.01590); notebook 05 sums it scale by scale.
    It costs L^2 per head, so it is for looking at a model, not for running it; and its segment
    sums span the whole sequence (segsum's precision note): pass float64 for long sequences.
    """
    H, G = A.shape[0], Bm.shape[2]
    decay = torch.exp(segsum(rearrange(dt * A, "b L h -> b h L")))          # (B, H, L, L)
    CmBm = repeat(torch.einsum("bign,bjgn->bgij", Cm, Bm), "b g i j -> b (g r) i j", r=H // G)
    return CmBm * decay * rearrange(dt, "b L h -> b h 1 L")               # dt_j scales column j


# =====================================================================================
# 2. The Mamba-2 layer (Mamba-2 §7)
# =====================================================================================
# One Mamba-2 layer around the scan above:
#
#   u -> in_proj -> [z | xBC | dt]
#        xBC -> causal depthwise conv (kernel d_conv) -> SiLU -> split into x, Bm, Cm
#        dt  -> softplus(dt + dt_bias);   A = -exp(A_log)
#        y = scan(x, dt, A, Bm, Cm, D)                        (per head: P = headdim channels)
#        y = rmsnorm(y * silu(z)) * norm.weight               (gated RMSNorm, per group)
#   -> out_proj -> output
#
# Unlike Mamba-1, Mamba-2 computes x, Bm, Cm and dt all at once from the layer's input (one
# in_proj, §7.1), which is what allows the one big projection. Parameter names, shapes and
# initialisation follow mamba_ssm's `Mamba2` module, so M-VAR's released checkpoints load into it.
# The layer is causal, and everything it remembers about the past is a small state: the last
# d_conv - 1 inputs of the convolution and the SSM state. Passing that state between calls lets
# the sampler feed one scale at a time (or one token at a time) and get what the whole-sequence
# forward pass gives (equal up to float round-off: the pieces are chunked differently).


class Mamba2State(NamedTuple):
    """What a Mamba2 layer carries from one piece of a sequence to the next."""
    conv: torch.Tensor  # (B, conv_dim, d_conv - 1): the last d_conv - 1 inputs of the conv
    ssm: torch.Tensor   # (B, H, P, N): the SSM state (float32, or float64 for a float64 model);
    #                     None at the start of a sequence (the scans then start from zeros)


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(y * silu(z)) * weight, the RMS taken over groups of `group_size` channels
    (mamba_ssm's RMSNormGated with norm_before_gate=False). y, z (..., dim) -> (..., dim)."""

    def __init__(self, dim, group_size, eps=1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        fdtype = _state_dtype(y.dtype)                    # normalise in at least float32
        gated = (y * F.silu(z)).to(fdtype).unflatten(-1, (-1, self.group_size))  # (..., groups, size)
        gated = gated * torch.rsqrt(gated.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (gated.flatten(-2) * self.weight.to(fdtype)).to(y.dtype)


class Mamba2(nn.Module):
    """Mamba-2 layer. forward: u (B, L, d_model), state or None -> y (B, L, d_model), new state.

    d_inner = expand * d_model channels are split into H = d_inner / headdim heads of P = headdim
    channels; Bm and Cm (d_state = N each) are shared by the H / ngroups heads of each group.
    MVARConfig checks that headdim divides d_inner (section 8).
    """

    def __init__(self, d_model, d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1,
                 chunk_size=64, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, A_init_range=(1, 16)):
        super().__init__()
        self.d_inner, self.nheads = expand * d_model, expand * d_model // headdim
        self.d_state, self.d_conv, self.headdim, self.ngroups = d_state, d_conv, headdim, ngroups
        self.chunk_size, self.conv_dim = chunk_size, self.d_inner + 2 * ngroups * d_state  # x, Bm, Cm: conv

        # one projection for everything: z (gate), xBC (conv input), dt (one per head)
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        # Depthwise (one filter per channel) and causal: the sequence is left-padded with the
        # carried state (zeros at the start), so no padding inside the module itself.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim)

        # dt = softplus(dt_raw + dt_bias) starts log-uniform in [dt_min, dt_max]: dt_bias is the
        # inverse softplus of such a draw, log(exp(dt) - 1) = dt + log(1 - exp(-dt)).
        log_dt = torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_log) < 0 with -A uniform in A_init_range: per-head decay rates, from a
        # memory of about 1 / (dt |A|) tokens for the fast heads to many more for the slow ones.
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))           # skip connection y += D x
        for param in (self.dt_bias, self.A_log, self.D):
            param._no_weight_decay = True                        # as in mamba_ssm: no weight decay

        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // ngroups, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u, state=None):
        """u (B, L, d_model), state (Mamba2State for batch B, or None = start of the sequence)
        -> y (B, L, d_model), the state after the last token (pass it to the next call)."""
        z, (x, dt, A, Bm, Cm), conv_state = self.scan_inputs(u, state)
        ssm = None if state is None else state.ssm
        # one token (sampling a 1x1 scale): a single step of the recurrence is all it takes
        y, ssm_state = (ssd_scan_sequential(x, dt, A, Bm, Cm, self.D, ssm) if u.shape[1] == 1 else
                        ssd_scan_parallel(x, dt, A, Bm, Cm, self.D, ssm, self.chunk_size))
        y = self.norm(rearrange(y, "... h p -> ... (h p)"), z)
        return self.out_proj(y), Mamba2State(conv_state, ssm_state)

    def scan_inputs(self, u, state=None):
        """Everything before the scan: u (B, L, d_model), state or None -> the gate z (B, L, d_inner),
        the scan's inputs (x (B, L, H, P), dt (B, L, H), A (H,), Bm and Cm (B, L, G, N)), and the
        conv state to carry to the next call."""
        B, L, _ = u.shape
        H, P, N, G = self.nheads, self.headdim, self.d_state, self.ngroups
        conv_in = u.new_zeros(B, self.conv_dim, self.d_conv - 1) if state is None else state.conv
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, H], dim=-1)

        # Causal conv: prepend the last d_conv - 1 inputs of the previous piece (zeros at the start
        # of a sequence); the window then yields exactly L outputs, and its last d_conv - 1 inputs
        # are the next conv state.
        xBC = torch.cat([conv_in.to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)
        conv_state = xBC[:, :, L:]                           # (B, conv_dim, d_conv - 1)
        xBC = F.silu(self.conv1d(xBC)).transpose(1, 2)       # (B, L, conv_dim)
        x, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)

        fdtype = _state_dtype(dt.dtype)                   # dt and A in at least float32
        dt = F.softplus(dt.to(fdtype) + self.dt_bias.to(fdtype))                 # (B, L, H) > 0
        A = -torch.exp(self.A_log.to(fdtype))                                     # (H,) < 0
        x = rearrange(x, "... (h p) -> ... h p", p=P)                            # (B, L, H, P)
        Bm, Cm = (rearrange(tensor, "... (g n) -> ... g n", n=N) for tensor in (Bm, Cm))   # (B, L, G, N)
        return z, (x, dt, A, Bm, Cm), conv_state

    def hidden_attention(self, u):
        """u (B, L, d_model), a sequence from its start -> the SSM's matrix M (B, H, L, L)
        (ssd_attention_matrix) and the values it mixes, x (B, L, H, P): the scan gives M @ x + D x.

        What M leaves out of the layer: before the scan, the causal depthwise conv has already
        mixed each token's x, Bm and Cm with the d_conv - 1 tokens before it, so "token j" in M is
        a short window ending at j; after it, the gate silu(z_i) and the RMSNorm act on each
        token's output alone (they rescale row i, nonlinearly, and mix no tokens); D x_i is a
        skip from each token to itself. M also weighs x_j's *positions*, not their sizes."""
        _, (x, dt, A, Bm, Cm), _ = self.scan_inputs(u)
        return ssd_attention_matrix(dt, A, Bm, Cm), x


# =====================================================================================
# 3. Configuration
# =====================================================================================
# One dataclass holds every choice that changes the network. The defaults are M-VAR-d16's sizes on
# ImageNet 256, the smallest model the M-VAR paper reports;
# the released d16 and d20 checkpoints were trained with attn_l2_norm=False (the official README
# says so; runtime reads it from the file's keys), our default keeps VAR's cosine attention.
# `depth` drives the rest (width = 64*depth, heads = depth), VAR's size rule, which M-VAR keeps,
# so "d16" or "d20" names a whole model.


@dataclasses.dataclass
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
    drop_path: float = -1.0       # max drop-path rate; < 0 means 0.1 * depth / 24 (VAR's rule)
    alng: float = 1e-3            # init multiplier of the AdaLN gate rows (VAR's `alng`)
    aln: float = 0.5              # init multiplier of the AdaLN gain and shift rows (VAR's `aln`)
    head_init: float = 0.02       # init multiplier of the output head (VAR's `hd`)
    # Mamba-2 settings of M-VAR's released models (d_state 64; mamba_ssm's own default is 128);
    # scan_chunk is this file's (mamba_ssm's kernel uses 256). d_inner = expand * width = H * P.
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    scan_chunk: int = 64

    def __post_init__(self):
        self.patch_nums = tuple(int(pn) for pn in self.patch_nums)
        self.width = self.width if self.width > 0 else 64 * self.depth
        self.num_heads = self.num_heads if self.num_heads > 0 else self.depth
        self.drop_path = self.drop_path if self.drop_path >= 0 else 0.1 * self.depth / 24
        _check_config(self)

    @property
    def seq_len(self) -> int:
        """L = sum of pn^2 over scales (680 for the 256px pyramid, 2240 for 512px)."""
        return sum(pn * pn for pn in self.patch_nums)

    def to_dict(self) -> dict:
        """Plain types (patch_nums as a list), as checkpoints and JSON files store it."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, saved: dict) -> "MVARConfig":
        """The inverse of to_dict. A field this version does not know (a checkpoint written by
        another version of mvar.py) is a TypeError that names it."""
        return cls(**saved)


def scale_spans(patch_nums) -> list:
    """[(start, end)] of each scale's tokens in the flattened sequence, e.g. (1,2,3) ->
    [(0,1), (1,5), (5,14)]."""
    ends = [sum(pn * pn for pn in patch_nums[:k + 1]) for k in range(len(patch_nums))]
    return list(zip([0] + ends[:-1], ends))


# =====================================================================================
# 4. Attention: inside one scale (M-VAR) or over all coarser scales (VAR)
# =====================================================================================
# VAR's attention is block-causal: a token sees its own scale and all coarser ones.
# M-VAR's attention is *intra-scale*: token i of scale k attends to exactly the l_k = pn_k^2
# tokens of scale k, in both directions (M-VAR, method section, intra-scale modeling). What scale k
# needs from the coarser scales then reaches it two ways: through its input (the teacher input,
# tokenizer.py: the picture drawn so far) and through the block's Mamba line (section 5). The
# paper motivates the split with an observation on VAR's ImageNet 256 models (d16 and up): most of
# a token's attention falls inside its own scale. Notebook 04 measures it on the shipped
# Fashion-MNIST VAR: more than uniform attention would put there, moderately (benchmarks/RESULTS.md,
# "Does attention stay inside a scale?").
#
# The mask would be block-diagonal; instead of building an L x L mask and wasting (sum l_k)^2 work
# we run one small attention per scale, which costs sum l_k^2 query-key pairs per layer (for the
# 256px pyramid 110,468 pairs, vs 286,434 for VAR's block-causal attention: 2.6x fewer; see
# `attention_pairs`). The same per-scale loop expresses VAR's rule, for the baseline (VARBlock):
# the queries of scale k attend to the keys [0, end_k); while sampling VAR, the keys of the earlier
# scales come from a KV cache (`ScaleAttention.attend`).


def attention_pairs(patch_nums, arch: str) -> int:
    """Number of query-key pairs one attention layer computes over the full sequence: the l_k
    tokens of scale k see l_k keys (M-VAR) or all end_k keys up to their scale's end (VAR)."""
    return sum((end - start) * (end - start if arch == "mvar" else end)
               for start, end in scale_spans(patch_nums))


class ScaleAttention(nn.Module):
    """Multi-head self-attention evaluated scale by scale; H heads of d = C / H channels each.

    The attention logits are temperature * q . k. With `l2_norm` (VAR's cosine attention) q and
    k are unit vectors and the temperature is learned per head: exp(scale_mul_1H11), at most 100
    for stability, starting at 4. Without it the temperature is VAR's fixed 0.25 / sqrt(d), smaller
    than the usual 1 / sqrt(d). Parameter names follow VAR / M-VAR checkpoints: `mat_qkv` (no
    bias), `q_bias`, `v_bias` (k has no bias: without l2_norm a constant added to every key cancels
    in the softmax; VAR keeps k bias-free with l2_norm too), `proj`, `scale_mul_1H11`.
    """

    def __init__(self, C: int, num_heads: int, l2_norm: bool, block_causal: bool):
        super().__init__()
        # block_causal: True for VAR (a scale sees the coarser ones too), False for M-VAR
        self.num_heads, self.l2_norm, self.block_causal = num_heads, l2_norm, block_causal
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.proj = nn.Linear(C, C)
        if l2_norm:   # the log temperature per head; forward multiplies q by its exp
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        # the fixed temperature scaled_dot_product_attention applies: VAR's 0.25 / sqrt(d), or 1
        # when the learned one is already folded into q (l2_norm)
        self.fixed_temperature = 1.0 if l2_norm else 0.25 / math.sqrt(C // num_heads)

    def forward(self, x, spans):
        """x (B, L, C) holds the scales listed in `spans` ([(start, end)] into x) -> (B, L, C)."""
        return self.attend(x, spans)[0]

    def attend(self, x, spans, kv_cache=None):
        """`forward`, with VAR's KV cache: kv_cache, the keys and values (k, v) of the coarser scales
        (each (B, H, tokens, d)) or None, is put in front of x's own; returns the output and the
        (k, v) seen so far, which VAR's sampler passes back with the next scale."""
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = rearrange(F.linear(x, self.mat_qkv.weight, bias),
                            "b L (three h d) -> three b h L d", three=3, h=self.num_heads)
        if self.l2_norm:   # cosine attention: unit q and k, q times its head's temperature
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
            k = F.normalize(k, dim=-1)
        if kv_cache is not None:     # sampling VAR: the coarser scales' keys and values come first
            k, v = torch.cat([kv_cache[0], k], dim=2), torch.cat([kv_cache[1], v], dim=2)
        cached = k.shape[2] - x.shape[1]     # number of cached keys in front of x's own (else 0)
        outs = []
        for start, end in spans:                        # one scale: x's rows start:end
            # the same scale's keys, counted among all the keys (the cached ones come first)
            key_start, key_end = cached + start, cached + end
            # ---- The paper's rule: which keys the queries of one scale see. ----
            # M-VAR (intra-scale): the keys of its own scale, in both directions.
            # VAR (block-causal): its own scale's and every coarser scale's, from key 0.
            first = 0 if self.block_causal else key_start
            outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, first:key_end],
                                                       v[:, :, first:key_end], scale=self.fixed_temperature))
        return self.proj(rearrange(torch.cat(outs, dim=2), "b h L d -> b L (h d)")), (k, v)


class FFN(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (VAR's MLP, ratio 4)."""

    def __init__(self, C: int, mlp_ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(C, int(C * mlp_ratio))
        self.fc2 = nn.Linear(int(C * mlp_ratio), C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# =====================================================================================
# 5. The AdaLN block: attention inside a scale, Mamba-2 across scales, FFN
# =====================================================================================
# The M-VAR block (method section), every branch modulated by the class through AdaLN, as in VAR:
#   x += gate_1 * Attn (LN(x) * (1 + gain_1) + shift_1)     intra-scale, bidirectional
#   x += gate_2 * Mamba(LN(x) * (1 + gain_2) + shift_2)     causal over the whole sequence
#   x += gate_3 * FFN  (LN(x) * (1 + gain_3) + shift_3)
# The 9 modulation vectors come from the class embedding through `ada_lin` (SiLU + Linear),
# ordered gates, gains, shifts as in the official checkpoints (there: gamma, scale, shift). LN
# has no affine parameters: AdaLN supplies them, so the class steers every branch of every block
# (DiT's adaLN, which VAR takes over).
# The Mamba line is the only part of the block that mixes tokens of different scales, so the paper
# calls it inter-scale modeling. It is not only that: Mamba runs over every token, so it also mixes
# tokens *inside* a scale (causally, in raster order), next to the attention. What the trained
# model does with it is measured in notebook 05 and benchmarks/decoupling.py (benchmarks/
# RESULTS.md, "What crosses the scales, retrained").
# The VAR baseline's block (VARBlock, below) is this one without the Mamba line and with
# block-causal attention: the whole difference between the two models is in these two classes.


def adaln_modulation(ada_lin, cond_BC, drop_path_rate: float, training: bool):
    """AdaLN for a block of several residual lines ("branches"): ada_lin(cond_BC) (B, 3 x branches
    x C) -> a gate, a gain and a shift per branch (each (B, 1, branches, C)), and two functions of
    the branch numbered `line` (0, 1, ...; the paper's gate_1, gate_2, ... are lines 0, 1, ...),
    for x, y (B, L, C):
      norm(x, line) = LN(x) (1 + gain) + shift     the branch's input;
      gate(y, line) = gate * y                     its output, before the residual add. In
        training it also drops the branch for some samples (drop-path, or stochastic depth: 0
        with probability drop_path_rate, else divided by 1 - drop_path_rate, which keeps the mean).
    """
    B, C = cond_BC.shape
    gates, gains, shifts = ada_lin(cond_BC).view(B, 1, 3, -1, C).unbind(2)
    norm = lambda x, line: F.layer_norm(x, (C,), eps=1e-6) * (1 + gains[:, :, line]) + shifts[:, :, line]

    def gate(y, line):
        y = y * gates[:, :, line]
        if training and drop_path_rate > 0:
            keep = y.new_empty(B, 1, 1).bernoulli_(1 - drop_path_rate)
            y = y * keep / (1 - drop_path_rate)
        return y
    return norm, gate


class Block(nn.Module):
    """One M-VAR block (the official AdaLNSelfAttn): attention inside each scale, Mamba-2 over the
    whole sequence, and an FFN, each conditioned on the class through AdaLN."""
    ATTN_LINE, MAMBA_LINE, FFN_LINE = 0, 1, 2      # the residual lines, in ada_lin's order

    def __init__(self, cfg: MVARConfig, drop_path_rate: float):
        super().__init__()
        C, self.drop_path_rate = cfg.width, drop_path_rate
        self.attn = ScaleAttention(C, cfg.num_heads, cfg.attn_l2_norm, block_causal=False)
        self.mamba = Mamba2(C, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                            headdim=cfg.headdim, chunk_size=cfg.scan_chunk)
        self.ffn = FFN(C, cfg.mlp_ratio)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 9 * C))       # 3 branches x 3 vectors

    def adaln(self, cond_BC):
        """cond_BC (B, C) -> norm(x, line), gate(y, line) (adaln_modulation)."""
        return adaln_modulation(self.ada_lin, cond_BC, self.drop_path_rate, self.training)

    def forward(self, x, cond_BC, spans):
        """Teacher-forced pass (training, evaluation), the three lines above: x (B, L, C) holds
        every scale listed in `spans`, cond_BC (B, C) is the class embedding -> (B, L, C)."""
        norm, gate = self.adaln(cond_BC)
        x = x + gate(self.attn(norm(x, self.ATTN_LINE), spans), self.ATTN_LINE)    # inside each scale
        x = x + gate(self.mamba(norm(x, self.MAMBA_LINE))[0], self.MAMBA_LINE)     # over the whole sequence
        return x + gate(self.ffn(norm(x, self.FFN_LINE)), self.FFN_LINE)

    def forward_one_scale(self, x, cond_BC, state=None):
        """Sampling: the same three lines on one new scale x (B, l, C), given the Mamba2State the
        earlier scales left (None before the first scale), of fixed size however many came
        before -> (x, the state to carry to the next scale). Its rows equal `forward`'s."""
        norm, gate = self.adaln(cond_BC)
        x = x + gate(self.attn(norm(x, self.ATTN_LINE), [(0, x.shape[1])]), self.ATTN_LINE)   # x: one scale
        y, state = self.mamba(norm(x, self.MAMBA_LINE), state)         # Mamba goes on from its state
        x = x + gate(y, self.MAMBA_LINE)
        return x + gate(self.ffn(norm(x, self.FFN_LINE)), self.FFN_LINE), state


class VARBlock(nn.Module):
    """VAR's block (the official AdaLNSelfAttn of VAR), the baseline: Block without the Mamba line,
    and with VAR's block-causal attention (a scale sees itself and every coarser scale). Two
    branches, so ada_lin gives 6 vectors. The same modules and names otherwise."""
    ATTN_LINE, FFN_LINE = 0, 1

    def __init__(self, cfg: MVARConfig, drop_path_rate: float):
        super().__init__()
        C, self.drop_path_rate = cfg.width, drop_path_rate
        self.attn = ScaleAttention(C, cfg.num_heads, cfg.attn_l2_norm, block_causal=True)
        self.ffn = FFN(C, cfg.mlp_ratio)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))       # 2 branches x 3 vectors

    adaln = Block.adaln                   # the same AdaLN, from this block's own ada_lin

    def forward(self, x, cond_BC, spans):
        """x (B, L, C), cond_BC (B, C) -> (B, L, C), as Block.forward."""
        norm, gate = self.adaln(cond_BC)
        x = x + gate(self.attn(norm(x, self.ATTN_LINE), spans), self.ATTN_LINE)    # own and coarser scales
        return x + gate(self.ffn(norm(x, self.FFN_LINE)), self.FFN_LINE)

    def forward_one_scale(self, x, cond_BC, kv_cache=None):
        """Sampling one new scale x (B, l, C), given the attention's keys and values of the earlier
        scales (None before the first), which grow with every scale -> (x, the grown cache)."""
        norm, gate = self.adaln(cond_BC)
        y, kv_cache = self.attn.attend(norm(x, self.ATTN_LINE), [(0, x.shape[1])], kv_cache)
        x = x + gate(y, self.ATTN_LINE)
        return x + gate(self.ffn(norm(x, self.FFN_LINE)), self.FFN_LINE), kv_cache


class AdaLNBeforeHead(nn.Module):
    """LN(x) * (1 + gain) + shift with (gain, shift) from the class embedding (VAR's `head_nm`)."""

    def __init__(self, C: int):
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond_BC):
        """x: (B, L, C), cond_BC: (B, C) -> (B, L, C)."""
        gain, shift = self.ada_lin(cond_BC).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + gain) + shift


# =====================================================================================
# 6. The model
# =====================================================================================


class MVAR(nn.Module):
    """Class-conditional scale-wise autoregressive generator (M-VAR, or VAR with arch="var").

    Sequence layout (VAR's, kept by M-VAR): L = sum pn^2 tokens, scale 0 first. The input of
    scale 0 is the class token (its `pn_0^2` positions share it); the input of scale k > 0 is the
    tokenizer's running reconstruction f_hat after scales < k, area-downsampled to pn_k x pn_k
    (the "teacher input"), so predicting scale k never sees scale k's own tokens.
    """

    def __init__(self, cfg: MVARConfig):
        super().__init__()
        self.cfg = cfg
        C, K, L = cfg.width, len(cfg.patch_nums), cfg.seq_len
        self.spans = scale_spans(cfg.patch_nums)

        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)   # last row: the null class
        self.pos_start = nn.Parameter(torch.empty(1, cfg.patch_nums[0] ** 2, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(K, C)
        # Scale id of every position; not saved (official checkpoints carry it as `lvl_1L`).
        lvl = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", lvl.view(1, L), persistent=False)

        # drop-path rate grows linearly with depth: 0 for the first block, cfg.drop_path last
        rates = [cfg.drop_path * layer / max(cfg.depth - 1, 1) for layer in range(cfg.depth)]
        block = Block if cfg.arch == "mvar" else VARBlock
        self.blocks = nn.ModuleList(block(cfg, rate) for rate in rates)
        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, cfg.vocab_size)
        self._init_weights(std=math.sqrt(1 / C / 3))

    # ----- initialisation: the official M-VAR init_weights, rule by rule -------------------
    @torch.no_grad()
    def _init_weights(self, std: float):
        cfg, C = self.cfg, self.cfg.width
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):   # 1. every Linear, Mamba's projections too
                nn.init.trunc_normal_(module.weight, std=std)
            elif isinstance(module, nn.Conv1d):                  # 2. every conv (Mamba's conv1d): 0.02
                nn.init.trunc_normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None and isinstance(module, (nn.Linear, nn.Conv1d)):
                module.bias.zero_()                              #    and all their biases 0
        for pos in (self.pos_start, self.pos_1LC):          # 3. position embeddings
            nn.init.trunc_normal_(pos, std=std)
        self.head.weight.mul_(cfg.head_init)                # 4. small logits at the start
        self.head_nm.ada_lin[-1].weight.mul_(cfg.aln)
        residual_div = math.sqrt(2 * cfg.depth)   # 5. a depth-free residual stream: attention's and
        for block in self.blocks:                 # the FFN's outputs (the official code leaves Mamba's)
            block.attn.proj.weight.div_(residual_div)
            block.ffn.fc2.weight.div_(residual_div)
            # 6. AdaLN rows: VAR's block has 6 vectors (2 gates, 2 gains, 2 shifts) and multiplies
            # rows [:2C], its two gates, by alng (so each branch starts near 0), the rest by aln.
            # M-VAR keeps that slice at 2C for its 9 vectors (3 gates, 3 gains, 3 shifts), so the
            # FFN's gate starts at aln, not alng: an accident of the official code, kept here.
            block.ada_lin[-1].weight[:2 * C].mul_(cfg.alng)
            block.ada_lin[-1].weight[2 * C:].mul_(cfg.aln)

    # ----- teacher-forced forward (training and evaluation) -----------------------------
    def forward(self, labels, teacher_input):
        """labels: (B,) in [0, num_classes] (num_classes = the null class);
        teacher_input: (B, L - pn_0^2, Cvae) from tokenizer.idx_to_teacher_input.
        Returns logits (B, L, V). In train mode each label is replaced by the null class
        with probability cond_drop, which teaches the unconditional model used by CFG."""
        cfg, B = self.cfg, labels.shape[0]
        _check_inputs(cfg, labels, teacher_input=teacher_input)
        if self.training and cfg.cond_drop > 0:
            drop = torch.rand(B, device=labels.device) < cfg.cond_drop
            labels = torch.where(drop, torch.full_like(labels, cfg.num_classes), labels)
        cond_BC = self.class_emb(labels)
        # scale 0's input: the class embedding (VAR's "sos", start of sequence) at its positions
        sos = cond_BC.unsqueeze(1) + self.pos_start                  # (B, pn_0^2, C)
        x = torch.cat([sos, self.word_embed(teacher_input.to(sos.dtype))], dim=1)
        x = x + self.lvl_embed(self.lvl_1L) + self.pos_1LC           # (B, L, C)
        for block in self.blocks:
            x = block(x, cond_BC, self.spans)
        return self.head(self.head_nm(x, cond_BC)).float()

    # ----- sampling (VAR's autoregressive_infer_cfg, with Mamba's state carried) ----------
    @torch.no_grad()
    def sample_tokens(self, tokenizer, labels, guidance=1.5, top_k=0, top_p=0.0, more_smooth=False,
                      generator=None, return_scales=False, return_logits=False):
        """Generate token maps scale by scale. labels: (B,) class ids.

        Only the new scale's tokens go through the blocks (`Block.forward_one_scale`, VARBlock's
        for VAR); what they need from earlier scales is carried per block: the Mamba2State (M-VAR,
        fixed size), or the attention KV cache (VAR, grows with the prefix). The official
        sampler's choices stay: CFG with a strength ramped linearly over the scales, top-k /
        top-p, and the gumbel "more smooth" mode for pictures.

        Returns a dict: "idx" list of K (B, l) token maps (with more_smooth, the most likely code of
        each soft mixture; f_hat is built from the mixtures, not from these ids), "f_hat"
        (B, Cvae, h, w) after the last scale, and if asked "scales" (the f_hat after each scale)
        and "logits" (per scale, the raw logits: (2B, l, V), conditional and null halves, when
        guidance > 0, else (B, l, V); notebook 02 checks them against the teacher-forced pass)."""
        cfg, B, K = self.cfg, labels.shape[0], len(self.cfg.patch_nums)
        _check_inputs(cfg, labels, tokenizer=tokenizer)
        if guidance > 0:   # one batch: conditional half, then the null class half
            labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
        cond_BC = self.class_emb(labels)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC                 # (1, L, C)
        x = cond_BC.unsqueeze(1) + self.pos_start + lvl_pos[:, :cfg.patch_nums[0] ** 2]

        # What each block carries from scale to scale (None: nothing seen yet): Block's Mamba2State,
        # or, for the VAR baseline, VARBlock's KV cache; the sampler only passes it on.
        carried = [None] * len(self.blocks)
        f_hat, out = None, {"idx": [], "scales": [], "logits": []}
        for k, pn in enumerate(cfg.patch_nums):
            for layer, block in enumerate(self.blocks):
                x, carried[layer] = block.forward_one_scale(x, cond_BC, carried[layer])
            logits = self.head(self.head_nm(x, cond_BC)).float()              # (2B or B, l, V)
            if return_logits:
                out["logits"].append(logits)
            ratio = k / (K - 1)
            if guidance > 0:   # classifier-free guidance, its strength ramped linearly over scales
                strength = guidance * ratio
                logits = (1 + strength) * logits[:B] - strength * logits[B:]
            if more_smooth:   # soft (gumbel-softmax) code mixture: smoother pictures, not for FID
                tau = max(0.27 * (1 - 0.95 * ratio), 0.005)     # sharper at finer scales
                # a soft mixture over the tokens top-k / top-p keep, turned into a code vector
                probs = gumbel_softmax(top_k_top_p_filter(logits, top_k, top_p) * (1 + ratio), tau, generator)
                z_k = rearrange(probs @ tokenizer.quantize.embedding.weight,   # (B, Cvae, pn, pn)
                                "b (row col) cvae -> b cvae row col", row=pn)
                idx = probs.argmax(-1)
            else:
                idx = sample_top_k_top_p(logits, top_k, top_p, generator)      # (B, l)
                z_k = tokenizer.embed_scale(idx, k)                           # (B, Cvae, pn, pn)
            out["idx"].append(idx)
            f_hat, next_in = tokenizer.next_input(k, f_hat, z_k)
            if return_scales:
                out["scales"].append(f_hat.clone())
            if k + 1 < K:   # the next scale's input, built as in training (tokenizer.next_input)
                start, end = self.spans[k + 1]
                next_in = rearrange(next_in, "b cvae row col -> b (row col) cvae")
                x = self.word_embed(next_in) + lvl_pos[:, start:end]
                x = torch.cat([x, x]) if guidance > 0 else x
        out["f_hat"] = f_hat
        return out

    @torch.no_grad()
    def generate(self, tokenizer, labels, guidance=1.5, top_k=0, top_p=0.0, more_smooth=False,
                 generator=None, return_scales=False):
        """Sample images for `labels` (B,) -> images (B, Cimg, S, S) in [0, 1]; with
        return_scales also a list of K such batches, the picture decoded after each scale."""
        out = self.sample_tokens(tokenizer, labels, guidance, top_k, top_p, more_smooth, generator,
                                 return_scales=return_scales)
        to01 = lambda f: tokenizer.fhat_to_img(f).add(1).mul(0.5).clamp(0, 1)
        images = to01(out["f_hat"])
        return (images, [to01(f) for f in out["scales"]]) if return_scales else images


# =====================================================================================
# 7. Sampling rules and the loss
# =====================================================================================


def top_k_top_p_filter(logits, top_k=0, top_p=0.0):
    """logits (B, l, V) -> a float32 copy with the excluded tokens at -inf.
    top_k > 0 keeps the top_k most likely tokens; 0 < top_p < 1 keeps the smallest set of most
    likely tokens whose probability reaches top_p (always at least the most likely one)."""
    logits = logits.float().clone()
    if top_k > 0:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth_best] = -math.inf
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens *before* it already reach top_p: the best one stays
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        logits.scatter_(-1, order, sorted_logits.masked_fill(drop_sorted, -math.inf))
    return logits


def sample_top_k_top_p(logits, top_k=0, top_p=0.0, generator=None):
    """Draw one token per position from the filtered logits. (B, l, V) -> (B, l) LongTensor."""
    B, l, _ = logits.shape
    probs = top_k_top_p_filter(logits, top_k, top_p).softmax(-1)
    return torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(B, l)


def gumbel_softmax(logits, tau, generator=None):
    """Soft sample: softmax((logits + Gumbel noise) / tau) over the last dim, seedable."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-10, 1 - 1e-10)
    return ((logits.float() - torch.log(-torch.log(uniform))) / tau).softmax(-1)


def compute_loss(logits, idx_list):
    """Cross-entropy over all L tokens (uniform weight, as VAR trains) and per-scale top-1
    accuracy. logits: (B, L, V); idx_list: K LongTensors (B, pn^2). Returns (loss, acc (K,))."""
    target = torch.cat(idx_list, dim=1)                                     # (B, L)
    loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
    with torch.no_grad():
        hit = (logits.argmax(-1) == target).float()                         # (B, L)
        acc = [hits.mean() for hits in hit.split([idx.shape[1] for idx in idx_list], dim=1)]
    return loss, torch.stack(acc)


# =====================================================================================
# 8. Input checks: what a user can get wrong, with the fix in each message
# =====================================================================================
# Kept here, out of the maths' way. The public entry points call them: MVARConfig, MVAR.forward,
# MVAR.sample_tokens (and so generate), and the two scans (which notebook 01 calls directly).


def _check_config(cfg: MVARConfig):
    pn = cfg.patch_nums
    if cfg.arch not in ("mvar", "var"):
        raise ValueError(f"arch must be 'mvar' or 'var', got {cfg.arch!r}")
    if cfg.width % cfg.num_heads or cfg.arch == "mvar" and cfg.expand * cfg.width % cfg.headdim:
        raise ValueError(f"width {cfg.width} must be divisible by num_heads {cfg.num_heads}, and expand * "
                         f"width = {cfg.expand * cfg.width} by headdim {cfg.headdim} (Mamba's heads)")
    if len(pn) < 2 or any(finer <= coarser for coarser, finer in zip(pn, pn[1:])) or pn[0] < 1:
        raise ValueError(f"patch_nums must be two or more strictly increasing sizes, got {pn}")


def _check_inputs(cfg: MVARConfig, labels, teacher_input=None, tokenizer=None):
    """MVAR.forward's inputs (teacher_input given: the null class is a valid label there) or
    sample_tokens' (tokenizer given)."""
    top = cfg.num_classes - (teacher_input is None)
    if labels.numel() and (labels.min() < 0 or labels.max() > top):
        raise ValueError(f"class labels must be in [0, {top}] (num_classes = {cfg.num_classes}); "
                         f"got {labels.min().item()} .. {labels.max().item()}")
    want = (cfg.seq_len - cfg.patch_nums[0] ** 2, cfg.Cvae)
    if teacher_input is not None and teacher_input.shape[1:] != want:
        raise ValueError(f"teacher_input must be (B, {want[0]}, {want[1]}), got {tuple(teacher_input.shape)}")
    tok = tokenizer and tokenizer.cfg
    if tok and (tuple(tok.patch_nums), tok.vocab_size, tok.z_channels) != (cfg.patch_nums, cfg.vocab_size,
                                                                            cfg.Cvae):
        raise ValueError("the tokenizer's patch_nums, vocab_size or Cvae does not match the generator's: "
                         "load the tokenizer it was trained with")


def _check_scan_inputs(x, dt, A, Bm, Cm, D, initial_state, chunk_size=1):
    """The scans' shape checks -> (B, L, H, P, G, N); a ValueError names the input that is off."""
    if x.dim() != 4 or x.shape[1] == 0:
        raise ValueError(f"x must have shape (batch, length >= 1, heads, headdim), got {tuple(x.shape)}")
    (B, L, H, P), (G, N) = x.shape, Bm.shape[-2:]
    want = {"dt": (B, L, H), "A": (H,), "Bm": (B, L, G, N), "Cm": (B, L, G, N), "D": (H,),
            "initial_state": (B, H, P, N)}
    for (name, shape), given in zip(want.items(), (dt, A, Bm, Cm, D, initial_state)):
        if given is not None and given.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(given.shape)}")
    if H % G or chunk_size < 1:
        raise ValueError(f"the {G} groups must divide the {H} heads, and chunk_size ({chunk_size}) be >= 1")
    return B, L, H, P, G, N
