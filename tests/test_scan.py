"""Tests for mvar.py sections 1-2: the SSM scans and the Mamba-2 layer.

References: the scan's closed form summed by brute force; the plain loop `ssd_scan_sequential`
(itself checked against the closed form); a mamba_ssm-style whole-sequence forward pass written
here from the paper's description; the official d16 model's key list (tests/reference/
mvar_d16_keys.txt: the keys and shapes of the official code's M-VAR-d16 as its constructor builds it
by default, attn_l2_norm=True; the released d16 / d20 files, trained with attn_l2_norm=False, lack
its blocks.*.attn.scale_mul_1H11).
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mvar import Mamba2, Mamba2State, MVARConfig, ssd_attention_matrix, ssd_scan_parallel, ssd_scan_sequential

KEYS_FILE = Path(__file__).resolve().parent / "reference" / "mvar_d16_keys.txt"


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_inputs(b, L, h, p, g, n, dtype=torch.float64, seed=0, dt_scale=0.5, with_D=True,
                with_init=True):
    """Random scan inputs: x (b,L,h,p), dt (b,L,h) > 0, A (h,) < 0, B, C (b,L,g,n), D, h0."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, B, C = r(b, L, h, p), r(b, L, g, n), r(b, L, g, n)
    dt = torch.rand(b, L, h, generator=gen, dtype=torch.float64) * dt_scale + 1e-3
    A = -(torch.rand(h, generator=gen, dtype=torch.float64) * 4 + 0.2)
    D = r(h) if with_D else None
    h0 = r(b, h, p, n) if with_init else None
    cast = lambda t: None if t is None else t.to(dtype)
    return tuple(cast(t) for t in (x, dt, A, B, C, D, h0))


def closed_form_scan(x, dt, A, B, C, D, h0):
    """y_i = sum_{j<=i} exp(a_{j+1}+...+a_i) (C_i.B_j) dt_j x_j + exp(a_0+...+a_i) h0 C_i + D x_i,
    summed term by term (float64, tiny shapes only). Returns y and the final state."""
    b, L, h, p = x.shape
    g = B.shape[2]
    a = dt * A                                                           # (b, L, h)
    y = torch.zeros_like(x)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for i in range(L):
                for j in range(i + 1):
                    w = torch.exp(a[bi, j + 1:i + 1, hi].sum()) * (C[bi, i, gi] @ B[bi, j, gi])
                    y[bi, i, hi] += w * dt[bi, j, hi] * x[bi, j, hi]
                if h0 is not None:
                    y[bi, i, hi] += torch.exp(a[bi, :i + 1, hi].sum()) * (h0[bi, hi] @ C[bi, i, gi])
                if D is not None:
                    y[bi, i, hi] += D[hi] * x[bi, i, hi]
    return y


# --- the scans ---------------------------------------------------------------------------------

@pytest.mark.parametrize("with_D, with_init", [(True, True), (False, False)])
def test_sequential_matches_closed_form(with_D, with_init):
    args = make_inputs(2, 9, 4, 3, 2, 5, with_D=with_D, with_init=with_init)
    y, _ = ssd_scan_sequential(*args)
    assert rel_err(y, closed_form_scan(*args)) < 1e-12


def random_configs(count, seed):
    """Random (b, L, h, p, g, n, chunk, with_D, with_init): L up to a few hundred, mostly not
    multiples of the chunk, several heads and groups."""
    rng = random.Random(seed)
    configs = [(1, 1, 2, 3, 1, 4, 64, True, True),        # a single token
               (2, 5, 4, 2, 4, 3, 64, False, True)]       # L shorter than one chunk, g = h
    for _ in range(count - len(configs)):
        g = rng.choice([1, 2])
        h = g * rng.choice([1, 2, 3])
        configs.append((rng.choice([1, 2]), rng.randint(2, 300), h, rng.choice([2, 4, 8]), g,
                        rng.choice([2, 4, 8]), rng.choice([4, 16, 32, 64]),
                        rng.random() < 0.5, rng.random() < 0.5))
    return configs


@pytest.mark.parametrize("b, L, h, p, g, n, chunk, with_D, with_init", random_configs(12, seed=1))
def test_parallel_matches_sequential_float64(b, L, h, p, g, n, chunk, with_D, with_init):
    args = make_inputs(b, L, h, p, g, n, with_D=with_D, with_init=with_init, seed=L)
    y_seq, s_seq = ssd_scan_sequential(*args)
    y_par, s_par = ssd_scan_parallel(*args, chunk_size=chunk)
    assert y_par.dtype == s_par.dtype == torch.float64
    assert rel_err(y_par, y_seq) < 1e-10
    assert rel_err(s_par, s_seq) < 1e-10


@pytest.mark.parametrize("chunk", [16, 64, 128])
def test_parallel_matches_sequential_float32(chunk):
    args = make_inputs(2, 150, 4, 16, 2, 16, dtype=torch.float32, dt_scale=0.1, seed=chunk)
    y_ref, s_ref = ssd_scan_sequential(*(None if t is None else t.double() for t in args))
    y_par, s_par = ssd_scan_parallel(*args, chunk_size=chunk)
    assert y_par.dtype == s_par.dtype == torch.float32
    assert rel_err(y_par.double(), y_ref) < 1e-5
    assert rel_err(s_par.double(), s_ref) < 1e-5


def test_parallel_is_accurate_under_strong_decay():
    """dt * A down to about -67 per step: the running sums reach thousands in a chunk, so a decay
    matrix built as exp(cumsum_i) * exp(-cumsum_j), or masked only after exp, would give
    inf * 0 = nan (the latter in the gradients of dt and A). segsum's -inf before exp must keep
    the result accurate and every gradient finite."""
    x, dt, A, B, C, D, h0 = make_inputs(1, 200, 2, 4, 1, 4, dtype=torch.float32, dt_scale=4.0)
    A = A * 4
    for t in (x, dt, A):
        t.requires_grad_(True)
    y_par, s_par = ssd_scan_parallel(x, dt, A, B, C, D, h0, chunk_size=64)
    y_seq, s_seq = ssd_scan_sequential(x, dt, A, B, C, D, h0)
    assert rel_err(y_par, y_seq) < 1e-5 and rel_err(s_par, s_seq) < 1e-5
    grads = torch.autograd.grad(y_par.square().sum(), (x, dt, A))
    assert all(torch.isfinite(g).all() for g in grads)


def test_parallel_strong_then_weak_decay_float32():
    """A hard case for segsum: inside each chunk, 32 steps of decay e^-60 and then 32 steps that
    barely decay. The late steps' decays are differences of running sums near -1900, which float32
    holds to ~1e-4; the result must stay within that of the float64 loop. Running sums over the
    whole 640-step sequence (one chunk of 640) reach -19000 and must miss it: the check can fail."""
    x, dt, A, B, C, D, _ = make_inputs(1, 640, 2, 4, 1, 4, dtype=torch.float32)
    A = -torch.ones(2)
    strong = (torch.arange(640) % 64 < 32)[None, :, None]         # first half of each chunk
    dt = torch.where(strong, 60.0, 0.001).expand_as(dt)
    y_ref, s_ref = ssd_scan_sequential(*(t.double() for t in (x, dt, A, B, C, D)))
    y_par, s_par = ssd_scan_parallel(x, dt, A, B, C, D, chunk_size=64)
    assert rel_err(y_par.double(), y_ref) < 1e-4 and rel_err(s_par.double(), s_ref) < 1e-4
    y_one, _ = ssd_scan_parallel(x, dt, A, B, C, D, chunk_size=640)
    assert rel_err(y_one.double(), y_ref) > 1e-4


def test_parallel_in_pieces_with_carried_state():
    """Scanning [first part] then [second part] from the first part's final state = one scan."""
    x, dt, A, B, C, D, h0 = make_inputs(2, 100, 4, 4, 2, 4)
    y_all, s_all = ssd_scan_parallel(x, dt, A, B, C, D, h0, chunk_size=16)
    y1, s1 = ssd_scan_parallel(x[:, :37], dt[:, :37], A, B[:, :37], C[:, :37], D, h0, chunk_size=16)
    y2, s2 = ssd_scan_parallel(x[:, 37:], dt[:, 37:], A, B[:, 37:], C[:, 37:], D, s1, chunk_size=16)
    assert rel_err(torch.cat([y1, y2], dim=1), y_all) < 1e-12
    assert rel_err(s2, s_all) < 1e-12


@pytest.mark.parametrize("L, chunk, Q", [(88, 64, 44), (65, 64, 33), (680, 64, 62), (130, 32, 26)])
def test_length_not_a_multiple_of_the_chunk(L, chunk, Q):
    """L = 88 (the fashion-mnist pyramid) with chunk 64: equal to the loop, and computed as two
    chunks of 44, not as 128 tokens of which 40 are padding. The matmul FLOPs (counted by torch)
    are those of chunk_size = Q exactly, and fewer than those of the padded length."""
    from torch.utils.flop_counter import FlopCounterMode

    args = make_inputs(1, L, 2, 8, 1, 8, seed=L)
    y_seq, s_seq = ssd_scan_sequential(*args)
    y_par, s_par = ssd_scan_parallel(*args, chunk_size=chunk)
    assert rel_err(y_par, y_seq) < 1e-10 and rel_err(s_par, s_seq) < 1e-10

    def flops(length, chunk_size):
        with FlopCounterMode(display=False) as counter:
            ssd_scan_parallel(*make_inputs(1, length, 2, 8, 1, 8), chunk_size=chunk_size)
        return counter.get_total_flops()
    assert flops(L, chunk) == flops(L, Q)
    padded = -(-L // chunk) * chunk
    if padded > L + L // chunk:
        assert flops(L, chunk) < flops(padded, chunk) * (L + Q) / padded


def test_gradients_agree_float64():
    """Gradients of a random function of (y, final state) w.r.t. every input agree."""
    inputs = make_inputs(2, 45, 4, 3, 2, 5, seed=3)
    gen = torch.Generator().manual_seed(4)
    wy = torch.randn(2, 45, 4, 3, generator=gen, dtype=torch.float64)
    ws = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64)
    grads = []
    for scan in (ssd_scan_sequential, lambda *a: ssd_scan_parallel(*a, chunk_size=16)):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        y, s = scan(*leaves)
        grads.append(torch.autograd.grad((y * wy).sum() + (s * ws).sum(), leaves))
    names = ["x", "dt", "A", "Bm", "Cm", "D", "initial_state"]
    for name, g_seq, g_par in zip(names, *grads):
        assert g_seq.abs().max() > 0, name
        assert rel_err(g_par, g_seq) < 1e-10, name


def test_scans_accept_bf16():
    args = make_inputs(2, 100, 4, 16, 1, 16, dtype=torch.float32, dt_scale=0.1)
    y_ref, s_ref = ssd_scan_sequential(*args)
    bf = [t.bfloat16() for t in args]
    for scan in (ssd_scan_sequential, ssd_scan_parallel):
        y, s = scan(*bf)
        assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert rel_err(y.float(), y_ref) < 3e-2 and rel_err(s, s_ref) < 3e-2


@pytest.mark.parametrize("scan", [ssd_scan_sequential, ssd_scan_parallel])
@pytest.mark.parametrize("broken, message", [
    (lambda a: {**a, "x": a["x"][0]}, "x must have shape"),
    (lambda a: {**a, **{k: a[k][:, :0] for k in ("x", "dt", "Bm", "Cm")}}, "length >= 1"),
    (lambda a: {**a, "dt": a["dt"][:, :-1]}, "dt must have shape"),
    (lambda a: {**a, "A": a["A"][:2]}, "A must have shape"),
    (lambda a: {**a, "Cm": a["Cm"][..., :2]}, "Cm must have shape"),
    (lambda a: {**a, **{k: a[k][:, :, :1].expand(-1, -1, 3, -1) for k in ("Bm", "Cm")}}, "must divide"),
    (lambda a: {**a, "D": a["D"][:1]}, "D must have shape"),
    (lambda a: {**a, "initial_state": a["initial_state"][..., :1]}, "initial_state"),
])
def test_scan_bad_inputs_raise(scan, broken, message):
    names = ["x", "dt", "A", "Bm", "Cm", "D", "initial_state"]
    args = dict(zip(names, make_inputs(2, 10, 4, 3, 2, 5)))
    with pytest.raises(ValueError, match=message):
        scan(**broken(args))


def test_parallel_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan_parallel(*make_inputs(1, 10, 2, 2, 1, 2), chunk_size=0)


# --- the Mamba-2 layer -------------------------------------------------------------------------

def small_mamba(ngroups=1, d_conv=4, chunk_size=8, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = Mamba2(d_model=16, d_state=8, d_conv=d_conv, expand=2, headdim=8, ngroups=ngroups,
               chunk_size=chunk_size).to(dtype)
    with torch.no_grad():               # conv bias and norm weight start at trivial values
        m.conv1d.bias.normal_()
        m.norm.weight.uniform_(0.5, 1.5)
    return m


def reference_mamba2(m, u):
    """Whole-sequence forward written the way mamba_ssm describes it: zero-padded causal conv
    truncated to L, the loop scan, a gated RMSNorm over groups."""
    b, L, _ = u.shape
    H, P, N, G = m.nheads, m.headdim, m.d_state, m.ngroups
    zxbcdt = u @ m.in_proj.weight.T
    z, xBC, dt = zxbcdt[..., :m.d_inner], zxbcdt[..., m.d_inner:-H], zxbcdt[..., -H:]
    xBC = F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1,
                   groups=m.conv_dim)[..., :L].transpose(1, 2)
    xBC = xBC * torch.sigmoid(xBC)
    x, Bm, Cm = xBC[..., :m.d_inner], xBC[..., m.d_inner:m.d_inner + G * N], xBC[..., -G * N:]
    dt = torch.log1p(torch.exp(dt + m.dt_bias))
    y, _ = ssd_scan_sequential(x.reshape(b, L, H, P), dt, -torch.exp(m.A_log),
                               Bm.reshape(b, L, G, N), Cm.reshape(b, L, G, N), m.D)
    y = y.reshape(b, L, G, -1) * (z * torch.sigmoid(z)).reshape(b, L, G, -1)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)
    return (y.reshape(b, L, -1) * m.norm.weight) @ m.out_proj.weight.T


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mamba2_matches_reference_forward(ngroups):
    m = small_mamba(ngroups)
    u = torch.randn(2, 50, 16, dtype=torch.float64)
    y, state = m(u)
    assert rel_err(y, reference_mamba2(m, u)) < 1e-10
    assert isinstance(state, Mamba2State)


@pytest.mark.parametrize("ngroups, d_conv", [(1, 4), (2, 4), (1, 2)])
def test_mamba2_in_pieces_equals_whole(ngroups, d_conv):
    """Random split points (pieces of 1, 2, ... tokens too), state carried: same outputs, same
    final state and same parameter gradients as the whole sequence in one call."""
    m = small_mamba(ngroups, d_conv)
    L = 61
    u = torch.randn(2, L, 16, dtype=torch.float64)
    rng = random.Random(ngroups * 10 + d_conv)
    cuts = sorted(rng.sample(range(1, L), 6) + [1, 2])     # includes 1-token and 2-token pieces
    y_all, s_all = m(u)
    g_all = torch.autograd.grad(y_all.square().sum(), list(m.parameters()))
    state, pieces = None, []
    for lo, hi in zip([0] + cuts, cuts + [L]):
        if hi > lo:
            y, state = m(u[:, lo:hi], state)
            pieces.append(y)
    y_pieces = torch.cat(pieces, dim=1)
    g_pieces = torch.autograd.grad(y_pieces.square().sum(), list(m.parameters()))
    assert rel_err(y_pieces, y_all) < 1e-10
    assert rel_err(state.ssm, s_all.ssm) < 1e-10 and rel_err(state.conv, s_all.conv) < 1e-12
    for ga, gp in zip(g_all, g_pieces):
        assert rel_err(gp, ga) < 1e-10


def test_mamba2_token_by_token_equals_whole():
    m = small_mamba(ngroups=2)
    u = torch.randn(3, 40, 16, dtype=torch.float64)
    y_all, s_all = m(u)
    state, ys = None, []
    for t in range(40):
        y, state = m(u[:, t:t + 1], state)
        ys.append(y)
    assert rel_err(torch.cat(ys, dim=1), y_all) < 1e-10
    assert rel_err(state.ssm, s_all.ssm) < 1e-10


def test_mamba2_bf16_is_close_to_fp32():
    m = small_mamba(dtype=torch.float32)
    u = torch.randn(2, 70, 16)
    y32, _ = m(u)
    y16, state = m.bfloat16()(u.bfloat16())
    assert y16.dtype == torch.bfloat16 and state.ssm.dtype == torch.float32
    assert rel_err(y16.float(), y32) < 5e-2
    y1, _ = m(u[:, :1].bfloat16(), state)                   # one-step path in bf16 as well
    assert torch.isfinite(y1.float()).all()


def test_mamba2_init_follows_mamba_ssm():
    m = Mamba2(d_model=64, headdim=16, dt_min=0.001, dt_max=0.1)
    dt = F.softplus(m.dt_bias)
    assert (dt >= 0.001 - 1e-6).all() and (dt <= 0.1 + 1e-6).all() and dt.std() > 0
    A = -torch.exp(m.A_log)
    assert (A <= -1).all() and (A >= -16).all() and A.std() > 0
    assert torch.equal(m.D, torch.ones(8)) and torch.equal(m.norm.weight, torch.ones(128))
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.dt_bias, m.A_log, m.D))


def test_mamba2_parameters_match_official_checkpoint():
    prefix = "blocks.0.mamba."
    expected = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith(prefix):
            # e.g. "blocks.0.mamba.in_proj.weight [4256, 1024] float32"
            name, rest = line[len(prefix):].split(" ", 1)
            expected[name] = [int(s) for s in rest[rest.index("[") + 1:rest.index("]")].split(",")]
    got = {k: list(v.shape) for k, v in Mamba2(d_model=1024).state_dict().items()}
    assert expected and got == expected


def test_mamba_sizes_that_do_not_split_into_heads_are_refused_by_the_config():
    """Mamba2 itself trusts its arguments; the public entry point, MVARConfig, checks that
    expand * width splits into SSM heads of headdim channels (and width into attention heads)."""
    with pytest.raises(ValueError, match="headdim 48"):
        MVARConfig(depth=2, width=64, num_heads=2, headdim=48)
    with pytest.raises(ValueError, match="num_heads 3"):
        MVARConfig(depth=2, width=64, num_heads=3, headdim=16)
    MVARConfig(arch="var", depth=2, width=64, num_heads=2, headdim=48)    # VAR has no Mamba layer


@pytest.mark.processes
def test_compare_scan_flags_a_version_that_computes_something_else(tmp_path):
    """benchmarks/compare_scan.py, the tool for timing a change to the scan against the code
    before it, must also catch a change that alters the result: a copy of mvar.py whose segsum
    sums a[j] ... a[i-1] instead of a[j+1] ... a[i] is flagged on the segsum and scan rows; the
    repository compared with itself is not. (Timings are not checked; --reps 1 keeps it short.)"""
    repo = Path(__file__).resolve().parents[1]
    source = (repo / "mvar.py").read_text()
    exact = "    cs = a.cumsum(dim=-1)"
    assert exact in source
    (tmp_path / "mvar.py").write_text(source.replace(exact, exact + "\n    cs = cs - a"))

    def run(baseline):
        out = subprocess.run([sys.executable, str(repo / "benchmarks" / "compare_scan.py"),
                              str(baseline), "--reps", "1"], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if "L=" in line]

    same, broken = run(repo), run(tmp_path)
    assert len(same) == len(broken) == 7
    assert not any("disagree" in line for line in same)
    flagged = [line.split()[0] for line in broken if "disagree" in line]
    assert "exp(segsum)" in flagged and "scan" in flagged


@pytest.mark.parametrize("L, chunk", [(150, 64), (88, 64), (40, 64)])
def test_scan_benchmark_times_the_scans_own_matmuls(L, chunk):
    """benchmarks/scan.py's "matmuls Q" rows claim to time ssd_scan_parallel's matmuls alone, at
    its shapes. Counted by FlopCounterMode, the two do the same matmul work (L = 150: 3 chunks of
    50; 88: 2 of 44; 40: one chunk shorter than chunk_size), and the script's floor counts it too."""
    from torch.utils.flop_counter import FlopCounterMode
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scan as bench

    b, h, p, n = 2, 4, 8, 16
    with FlopCounterMode(display=False) as scan_count:
        ssd_scan_parallel(*bench.make_inputs(b, L, h, p, n, "cpu", False), chunk_size=chunk)
    with FlopCounterMode(display=False) as alone_count:
        bench.matmuls_only(*(torch.randn(s) for s in bench.chunked_shapes(b, L, h, p, n, chunk)))
    assert alone_count.get_total_flops() == scan_count.get_total_flops() > 0
    fwd_floor, _ = bench.floors(b, L, h, p, n, chunk, rate=1.0, bw=float("inf"))
    assert fwd_floor == scan_count.get_total_flops()


# ---------------------------------------------------------------------------------------------
# Mamba's hidden attention: the scan as one (L, L) matrix per head
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("g", [1, 2])
def test_attention_matrix_times_x_is_the_scan(g):
    """M @ x + D x equals the chunked scan (no initial state) in float64, over 150 tokens: three
    chunks of 50, so the matrix also reproduces what the scan passes from chunk to chunk."""
    x, dt, A, Bm, Cm, D, _ = make_inputs(2, 150, 4, 3, g, 5, with_init=False)
    M = ssd_attention_matrix(dt, A, Bm, Cm)                                 # (b, h, L, L)
    y = torch.einsum("bhij,bjhp->bihp", M, x) + D[:, None] * x
    y_scan, _ = ssd_scan_parallel(x, dt, A, Bm, Cm, D, chunk_size=64)
    assert rel_err(y, y_scan) < 1e-12
    assert torch.equal(M, M.tril()), "causal: token i receives nothing from a later token"


@pytest.mark.parametrize("ngroups", [1, 2])
def test_hidden_attention_of_a_layer_gives_its_output(ngroups):
    """Mamba2.hidden_attention's matrix and values, put through the layer's gate, norm and
    output projection as the test's own reference_mamba2 does, give the layer's output: the
    matrix is built from the dt, A, Bm, Cm the layer computes. Over 150 tokens, chunk 8."""
    m = small_mamba(ngroups)
    u = torch.randn(2, 150, 16, dtype=torch.float64)
    M, x = m.hidden_attention(u)
    b, L, H, P = x.shape
    y = torch.einsum("bhij,bjhp->bihp", M, x) + m.D[:, None] * x         # the SSM's output
    z = (u @ m.in_proj.weight.T)[..., :m.d_inner]
    G = m.ngroups
    y = y.reshape(b, L, G, -1) * (z * torch.sigmoid(z)).reshape(b, L, G, -1)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)
    out = (y.reshape(b, L, -1) * m.norm.weight) @ m.out_proj.weight.T
    assert rel_err(out, m(u)[0]) < 1e-10
    assert rel_err(out, reference_mamba2(m, u)) < 1e-10
