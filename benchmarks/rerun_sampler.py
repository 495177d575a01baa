"""The official M-VAR sampler's way through Mamba, kept as a baseline: re-run the whole prefix.

M-VAR samples scale by scale. At each new scale, every block's Mamba layer must continue from
all the tokens of the coarser scales. The two samplers differ only in how they give it that past:

  * the official sampler (MVAR's `autoregressive_infer_cfg`) keeps every earlier Mamba input and
    runs the layer again over the whole prefix, from an empty state, then keeps the rows of the
    new scale: its work and memory grow with the prefix (the 256px pyramid's last scale re-reads
    all 680 tokens, in every block);
  * mvar.py's sampler (`Block.forward_one_scale`) carries each Mamba layer's state, a fixed size
    (the convolution's last inputs and the SSM state, `Mamba2State`), and feeds the layer only
    the new scale's tokens.

The state after a prefix is everything the causal layer remembers of it, so both give the same
logits (up to float round-off: the scan is chunked differently). tests/test_mvar.py checks both
against the teacher-forced pass, tests/test_golden.py both against the official code's greedy
samples, and benchmarks/generate.py times them side by side.

    sys.path.insert(0, "benchmarks"); from rerun_sampler import sample_tokens
    out = sample_tokens(model, tokenizer, labels, guidance=1.5, top_k=1)   # as model.sample_tokens
"""
import types

import torch


def forward_one_scale_rerun(block, x, cond_BC, prefix=None):
    """`Block.forward_one_scale`, the official way. x (B, l, C): the new scale; prefix (B, tokens
    so far, C): the Mamba inputs of every earlier scale, or None before the first one.
    -> (x after the block, prefix with this scale's Mamba input appended)."""
    norm, gate = block.adaln(cond_BC)
    x = x + gate(block.attn(norm(x, block.ATTN_LINE), [(0, x.shape[1])]), block.ATTN_LINE)   # in the scale
    u = norm(x, block.MAMBA_LINE)
    prefix = u if prefix is None else torch.cat([prefix, u], dim=1)
    # Mamba over the whole prefix from an empty state; only the new scale's rows are kept
    x = x + gate(block.mamba(prefix)[0][:, -x.shape[1]:], block.MAMBA_LINE)
    return x + gate(block.ffn(norm(x, block.FFN_LINE)), block.FFN_LINE), prefix


@torch.no_grad()
def sample_tokens(model, tokenizer, labels, **kwargs):
    """`model.sample_tokens(tokenizer, labels, **kwargs)` with every block stepping the official
    way. The sampler calls `block.forward_one_scale`: an attribute set on the block instance
    shadows the class's method until it is deleted again. VAR has no Mamba line, so a VAR model
    samples as usual (with its KV cache, as the official VAR does)."""
    blocks = model.blocks if model.cfg.arch == "mvar" else []
    for block in blocks:
        block.forward_one_scale = types.MethodType(forward_one_scale_rerun, block)
    try:
        return model.sample_tokens(tokenizer, labels, **kwargs)
    finally:
        for block in blocks:
            del block.forward_one_scale
