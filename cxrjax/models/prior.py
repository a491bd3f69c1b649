"""DALLE-2-style diffusion-prior network (CXR embedding -> CTPA embedding).

Re-implements, from the spec (``prior_and_fmkd.md`` §A.2), the ``DiffusionPriorNetwork`` +
``CausalTransformer`` of DALLE2-pytorch v1.15.6 as configured by the CXR->CTPA distillation
paper: pre-LN causal transformer with multi-query cosine-sim attention (scale 16), a learned
null key/value, shared interleaved rotary embeddings (first 32 channels), a shared causal T5
relative-position bias, SwiGLU feed-forward with a normformer LayerNorm, and a final "stable"
LayerNorm + projection. The network reads its x0 prediction from a learned query token.

Shapes: B batch, n tokens (max_text_len + 4 = 81 in the paper), D model width, H heads,
d head width. Params are float32; ``dtype`` is the matmul compute dtype; norms, l2-norms,
rotary and softmax always run in float32 and the residual stream stays float32.
Dropout draws 16-bit keep decisions (``dropout``: p = 0.0500031 for rate 0.05, unbiased).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.extend.random import threefry2x32_p

Array = jax.Array
Dtype = Any


# ----------------------------------------------------------------------------- initialisers
def torch_linear_init(key, shape, dtype=jnp.float32):
    """PyTorch ``nn.Linear`` default kernel init: kaiming-uniform(a=sqrt 5) == U(+-1/sqrt(fan_in)).

    Flax kernels are (fan_in, fan_out), so fan_in = shape[0].
    """
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int):
    """PyTorch ``nn.Linear`` default bias init U(+-1/sqrt(fan_in)) (needs fan_in, hence a closure)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


_normal1 = nn.initializers.normal(stddev=1.0)  # torch.randn / nn.Embedding default


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=torch_linear_init, name=name)


# ----------------------------------------------------------------------------- pure helpers
def rotary_angles(positions: Array, dim_head: int, theta: float = 10000.0) -> Array:
    """Rotary angles phi = p * theta_i, theta_i = theta^(-2i/rot_dim), rot_dim = min(32, dim_head).

    Each frequency is repeated for the interleaved channel pair (2i, 2i+1).
    positions: (n,) -> (n, rot_dim) float32.
    """
    rot_dim = min(32, dim_head)
    inv_freq = theta ** (-jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim)  # (rot_dim/2,)
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.repeat(ang, 2, axis=-1)


def apply_rotary(x: Array, angles: Array) -> Array:
    """Rotate interleaved pairs (a, b) -> (a cos - b sin, b cos + a sin) on the first rot_dim channels.

    x: (..., n, d); angles: (n, rot_dim). Channels >= rot_dim pass through. Computed in float32,
    returned in x.dtype.
    """
    rot_dim = angles.shape[-1]
    xf = x.astype(jnp.float32)
    xr, xp = xf[..., :rot_dim], xf[..., rot_dim:]
    pairs = xr.reshape(*xr.shape[:-1], rot_dim // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    rot_half = jnp.stack([-b, a], axis=-1).reshape(xr.shape)  # (a, b) -> (-b, a)
    xr = xr * jnp.cos(angles) + rot_half * jnp.sin(angles)
    return jnp.concatenate([xr, xp], axis=-1).astype(x.dtype)


def relative_position_bucket(rel: Array, num_buckets: int = 32, max_distance: int = 128) -> Array:
    """Causal T5 bucket of rel = i - j (query minus key index), clipped at 0 (int32, same shape).

    r < num_buckets/2 -> r; else min(nb-1, nb/2 + floor(ln(r/(nb/2)) / ln(max_distance/(nb/2)) * nb/2)).
    """
    max_exact = num_buckets // 2
    r = jnp.maximum(jnp.asarray(rel, jnp.int32), 0)
    safe = jnp.maximum(r, max_exact).astype(jnp.float32)  # avoid log(0); small branch chosen below
    large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)  # trunc == floor (>= 0)
    large = jnp.minimum(large, num_buckets - 1)
    return jnp.where(r < max_exact, r, large)


def causal_bias_buckets(n: int, num_buckets: int = 32, max_distance: int = 128) -> Array:
    """Buckets for queries i in [0, n) vs keys j in [0, n] (key 0 = null key): (n, n+1) int32.

    Faithful to the upstream off-by-one: the raw key index j is used although key j holds token
    j-1, so a query's own token and the one before it both land in bucket 0.
    """
    i = jnp.arange(n)[:, None]
    j = jnp.arange(n + 1)[None, :]
    return relative_position_bucket(i - j, num_buckets, max_distance)


def broadcast_batch(y: Array, b: int) -> Array:
    """``jnp.broadcast_to(y, (b, *y.shape))`` whose transpose (the sum over the new axis) is a GEMV.

    Same forward and same gradient up to float summation order. Why: XLA:CPU lowers the
    reduction over a leading axis that autodiff emits for a batch broadcast poorly (summing a
    (64, 12, 81, 82) gradient over axis 0 takes ~40 ms, ``ones(64) @ g.reshape(64, -1)`` ~1 ms),
    and the rel-pos bias, null-text tokens, learned query and null K/V are all batch broadcasts.
    """
    return _broadcast_batch(y, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_batch(y, b):
    return jnp.broadcast_to(y, (b, *y.shape))


def _broadcast_batch_fwd(y, b):
    return _broadcast_batch(y, b), None


def _broadcast_batch_bwd(b, _, g):
    return (jnp.tensordot(jnp.ones((b,), g.dtype), g, axes=1),)


_broadcast_batch.defvjp(_broadcast_batch_fwd, _broadcast_batch_bwd)


def _keep_threshold(rate: float) -> int:
    """t = round((1 - rate) * 2^16): a 16-bit uniform u keeps its entry iff u < t."""
    return int(round((1.0 - rate) * 65536))


def keep_mask(rng: Array, shape: tuple[int, ...], thresh: int) -> Array:
    """Bool mask of ``shape``, True with probability thresh / 2^16, i.i.d. per entry.

    Each threefry2x32 hash yields 64 bits = four 16-bit uniforms. Why: ``jax.random.bits``
    in partitionable mode (the default) spends one full hash per 32-bit word (it XORs the
    two output words), so this needs half the hashes of 16-bit draws from ``random.bits``;
    the hashes are the bulk of dropout's cost on CPU. The counter pairs (i, i + q), i < q,
    are the ones the non-partitionable ``jax.random.bits`` uses, so the 64-bit outputs are
    independent uniforms. Falls back to ``jax.random.bits`` for non-threefry keys.
    """
    size = math.prod(shape)
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    if data.shape != (2,) or data.dtype != jnp.uint32:  # e.g. an 'rbg' key
        words = jax.random.bits(rng, ((size + 1) // 2,), jnp.uint32)
        u16 = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size]
        return (u16.astype(jnp.int32) < thresh).reshape(shape)
    q = -(-size // 4)  # hashes needed
    count = jax.lax.iota(jnp.uint32, q)
    hi, lo = threefry2x32_p.bind(data[0], data[1], count, count + jnp.uint32(q))  # (q,) each
    t = jnp.uint32(thresh)
    half = jnp.uint32(0xFFFF)
    # Quarters laid end to end (not interleaved): XLA fuses the concat with the hash.
    keep = jnp.concatenate([(hi & half) < t, (hi >> 16) < t, (lo & half) < t, (lo >> 16) < t])
    return keep[:size].reshape(shape)


def dropout(x: Array, rate: float, rng: Array) -> Array:
    """Inverted dropout whose keep decisions are 16-bit uniforms (see ``keep_mask``).

    x is zeroed with probability p = 1 - t/2^16, t = round((1 - rate) * 2^16) (p = 0.0500031
    for rate 0.05), and kept entries are scaled by 2^16/t, so E[out] = x exactly. Why: on CPU
    the threefry bits dominate dropout's cost (~16M draws per layer per step in the paper
    config); 16-bit draws need a quarter of the hashes. ``nn.Dropout`` compares a 23-bit uniform.
    """
    if rate <= 0.0:
        return x
    thresh = _keep_threshold(rate)
    if thresh <= 0:
        return jnp.zeros_like(x)
    keep = keep_mask(rng, x.shape, thresh)
    return jnp.where(keep, x * jnp.asarray(65536.0 / thresh, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """``nn.Dropout`` with 16-bit keep decisions (see ``dropout``); rng collection 'dropout'."""
    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate <= 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


def _l2norm(x: Array) -> Array:
    # F.normalize semantics: x / max(||x||, 1e-12), in float32
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- layers
class LayerNorm(nn.Module):
    """Bias-free LayerNorm, biased variance, eps 1e-5, gain "g" (ones). (..., D) -> (..., D).

    ``stable`` first divides by stop_gradient(max(x, -1)) (plain max, as upstream). Runs in
    float32 and returns ``dtype``.
    """
    eps: float = 1e-5
    stable: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        g = self.param("g", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        if self.stable:
            x = x / jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return ((x - mean) * jax.lax.rsqrt(var + self.eps) * g).astype(self.dtype)


class Attention(nn.Module):
    """Pre-LN multi-query causal cosine-sim attention with a learned null key/value.

    x: (B, n, D); bias: (n, H, n+1) rel-pos bias with the causal mask folded in (-max where key
    j > query i + 1; see ``CausalTransformer``); angles: (n, rot_dim) rotary angles or None.
    Returns (B, n, D), or (B, 1, D) for the last query only when ``last_only``.

    Queries stay in the (B, m, H, d) layout the projection produces: with one shared K/V head
    the score and value einsums are batched GEMMs over B with m*H rows either way, so no
    (B, H, m, d) transpose is materialised (forward or backward).
    """
    dim: int
    heads: int
    dim_head: int = 64
    dropout: float = 0.0
    cosine_sim_scale: float = 16.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, angles, deterministic: bool = True, last_only: bool = False):
        b = x.shape[0]
        h = LayerNorm(dtype=self.dtype, name="norm")(x)
        kv = _dense(2 * self.dim_head, self.dtype, "to_kv")(h)  # one shared K and V head
        k, v = jnp.split(kv, 2, axis=-1)                         # (B, n, d) each
        # The last query needs K/V of every token, but only its own query row.
        hq = h[:, -1:] if last_only else h
        m = hq.shape[1]
        q = _dense(self.heads * self.dim_head, self.dtype, "to_q")(hq)
        q = q.reshape(b, m, self.heads, self.dim_head)  # (B, m, H, d)
        if angles is not None:
            q = apply_rotary(q, (angles[-1:] if last_only else angles)[:, None, :])
            k = apply_rotary(k, angles)
        null_kv = self.param("null_kv", _normal1, (2, self.dim_head), jnp.float32)
        nkv = broadcast_batch(null_kv[:, None, :], b)  # (B, 2, 1, d)
        k = jnp.concatenate([nkv[:, 0].astype(k.dtype), k], axis=1)  # (B, n+1, d); key 0 = null
        v = jnp.concatenate([nkv[:, 1].astype(v.dtype), v], axis=1)  # (not rotated)
        # cosine-sim: the upstream sqrt(scale) on both sides == scale on the product
        qn = _l2norm(q).astype(self.dtype)
        kn = _l2norm(k).astype(self.dtype)
        sim = jnp.einsum("bihd,bjd->bihj", qn, kn, preferred_element_type=jnp.float32)
        # + bias. Masked entries: 16*cos + (-max) rounds to -max, bit-identical to the old
        # where(mask, -max, sim + bias); query n-1 sees every key, so last_only has no mask.
        sim = sim * self.cosine_sim_scale + broadcast_batch(bias[-1:] if last_only else bias, b)
        attn = jax.nn.softmax(sim, axis=-1)  # float32, (B, m, H, n+1)
        attn = Dropout(self.dropout)(attn, deterministic=deterministic)
        out = jnp.einsum("bihj,bjd->bihd", attn.astype(self.dtype), v.astype(self.dtype))
        out = out.reshape(b, m, self.heads * self.dim_head)
        out = _dense(self.dim, self.dtype, "to_out")(out)
        return LayerNorm(dtype=self.dtype, name="out_norm")(out)


class FeedForward(nn.Module):
    """LN -> Dense(2*ff_mult*D) -> SwiGLU (first half * SiLU(second half)) -> [LN] -> Dropout -> Dense(D).

    x: (B, m, D) -> (B, m, D).
    """
    dim: int
    mult: int = 4
    dropout: float = 0.0
    normformer: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        inner = int(self.mult * self.dim)
        h = LayerNorm(dtype=self.dtype, name="norm")(x)
        h = _dense(2 * inner, self.dtype, "proj_in")(h)
        val, gate = jnp.split(h, 2, axis=-1)
        h = val * nn.silu(gate)
        if self.normformer:
            h = LayerNorm(dtype=self.dtype, name="post_norm")(h)
        h = Dropout(self.dropout)(h, deterministic=deterministic)
        return _dense(self.dim, self.dtype, "proj_out")(h)


class Block(nn.Module):
    """x <- Attn(x) + x; x <- FF(x) + x. (B, n, D) -> (B, n, D), or (B, 1, D) when ``last_only``."""
    dim: int
    heads: int
    dim_head: int = 64
    ff_mult: int = 4
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    normformer: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, angles, deterministic: bool = True, last_only: bool = False):
        a = Attention(self.dim, self.heads, self.dim_head, self.attn_dropout, dtype=self.dtype,
                      name="attn")(x, bias, angles, deterministic, last_only)
        x = (x[:, -1:] if last_only else x) + a  # residual stays float32
        f = FeedForward(self.dim, self.ff_mult, self.ff_dropout, self.normformer, self.dtype,
                        name="ff")(x, deterministic)
        return x + f


class CausalTransformer(nn.Module):
    """Pre-LN causal transformer with shared rotary + rel-pos bias, stable final LN and projection.

    x: (B, n, D) -> (B, n, D); with ``last_only`` the last layer only computes token n-1 and the
    result is (B, 1, D) (exactly equivalent: nothing later reads the other tokens).
    """
    dim: int
    depth: int
    heads: int
    dim_head: int = 64
    ff_mult: int = 4
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    normformer: bool = True
    rotary: bool = True
    num_buckets: int = 32
    max_distance: int = 128
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True, last_only: bool = False) -> Array:
        n = x.shape[1]
        x = x.astype(jnp.float32)
        table = self.param("rel_pos_bias", _normal1, (self.num_buckets, self.heads), jnp.float32)
        buckets = causal_bias_buckets(n, self.num_buckets, self.max_distance)
        bias = jnp.transpose(table[buckets], (0, 2, 1))  # (n, H, n+1), shared by every layer
        # Fold the causal mask (key j holds token j-1: keys j > i+1 are in the future) into the
        # shared bias once, instead of a select over (B, n, H, n+1) scores in every layer.
        i = jnp.arange(n)[:, None, None]
        j = jnp.arange(n + 1)[None, None, :]
        bias = jnp.where(j > i + 1, -jnp.finfo(jnp.float32).max, bias)
        angles = rotary_angles(jnp.arange(n), self.dim_head) if self.rotary else None
        block_cls = nn.remat(Block, static_argnums=(4, 5)) if self.remat else Block
        for layer in range(self.depth):
            lo = last_only and layer == self.depth - 1
            x = block_cls(self.dim, self.heads, self.dim_head, self.ff_mult, self.attn_dropout,
                          self.ff_dropout, self.normformer, self.dtype,
                          name=f"block_{layer}")(x, bias, angles, deterministic, lo)
        x = LayerNorm(stable=True, dtype=self.dtype, name="norm_out")(x)
        return _dense(self.dim, self.dtype, "final_proj")(x)


class DiffusionPriorNetwork(nn.Module):
    """x0-predicting prior network: (x_t (B, D), t (B,), cond (B, cond_dim)) -> x0_pred (B, D) float32.

    Token sequence (max_text_len + 4): max_text_len learned null text encodings (no text encodings
    are ever given), cond token (null_text_embeds where not text_keep), time embedding, x_t token
    (null_image_embed where not image_keep), learned query. The output is the final representation
    of the learned query.

    ``cond_dim`` is an extension: the paper's condition is already D=512-d (identity). If set and
    != dim, a Dense(cond_dim -> dim) with PyTorch-default init projects it.
    ``last_layer_shortcut`` computes only the learned-query row in the last layer (exact).
    """
    dim: int
    depth: int
    heads: int
    dim_head: int = 64
    ff_mult: int = 4
    attn_dropout: float = 0.05
    ff_dropout: float = 0.05
    num_timesteps: int = 1000
    max_text_len: int = 77
    normformer: bool = True
    rotary: bool = True
    cond_dim: int | None = None
    remat: bool = False
    last_layer_shortcut: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t: Array, t: Array, cond: Array, *, text_keep: Array | None = None,
                 image_keep: Array | None = None, deterministic: bool = True) -> Array:
        b, d = x_t.shape[0], self.dim
        learned_query = self.param("learned_query", _normal1, (d,), jnp.float32)
        null_text_enc = self.param("null_text_encodings", _normal1, (1, self.max_text_len, d),
                                   jnp.float32)
        null_text_embeds = self.param("null_text_embeds", _normal1, (1, 1, d), jnp.float32)
        null_image_embed = self.param("null_image_embed", _normal1, (1, d), jnp.float32)
        time_table = self.param("time_embed", _normal1, (self.num_timesteps, d), jnp.float32)

        cond = cond.astype(jnp.float32)
        if self.cond_dim is not None and self.cond_dim != d:
            cond = nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32,
                            kernel_init=torch_linear_init,
                            bias_init=torch_bias_init(self.cond_dim), name="cond_proj")(cond)
            cond = cond.astype(jnp.float32)
        cond_tok = cond[:, None, :]
        if text_keep is not None:
            cond_tok = jnp.where(text_keep[:, None, None], cond_tok, null_text_embeds)
        img_tok = x_t.astype(jnp.float32)
        if image_keep is not None:
            img_tok = jnp.where(image_keep[:, None], img_tok, null_image_embed)
        tokens = jnp.concatenate([
            broadcast_batch(null_text_enc[0], b),
            cond_tok,
            time_table[t][:, None, :],
            img_tok[:, None, :],
            broadcast_batch(learned_query[None, :], b),
        ], axis=1)  # (B, max_text_len + 4, D)
        out = CausalTransformer(
            self.dim, self.depth, self.heads, self.dim_head, self.ff_mult, self.attn_dropout,
            self.ff_dropout, self.normformer, self.rotary, remat=self.remat, dtype=self.dtype,
            name="transformer")(tokens, deterministic=deterministic,
                                last_only=self.last_layer_shortcut)
        return out[:, -1].astype(jnp.float32)


# ----------------------------------------------------------------------------- accounting
def num_params(params) -> int:
    """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))


def flops_per_example(dim: int, depth: int, heads: int, dim_head: int = 64, ff_mult: int = 4,
                      seq_len: int = 81, *, cond_dim: int | None = None,
                      last_layer_shortcut: bool = True) -> int:
    """Forward-pass matmul FLOPs (2 x MACs) of one example; norms/softmax/rotary are not counted.

    With n = seq_len, q = heads*dim_head, f = ff_mult*dim, each layer costs per query token
        2*dim*q (W_q) + 2*q*dim (W_o) + 2*dim*2f (W_1) + 2*f*dim (W_2)
        + 2*q*(n+1) (scores) + 2*q*(n+1) (attn @ V)     [dense: masked entries are computed too]
    plus, for all n tokens, 2*dim*2*dim_head (W_kv). Every layer has n query tokens except the last
    one under ``last_layer_shortcut`` (1 query token); final_proj costs 2*dim^2 per output token
    (n, or 1 with the shortcut); cond_proj (if cond_dim != dim) adds 2*cond_dim*dim. A training
    step is ~3x this (backward ~2x forward).
    """
    n = seq_len
    q = heads * dim_head
    f = ff_mult * dim
    per_query = 2 * dim * q + 2 * q * dim + 2 * dim * 2 * f + 2 * f * dim + 4 * q * (n + 1)
    kv = 2 * dim * 2 * dim_head * n
    last_m = 1 if last_layer_shortcut else n
    total = depth * kv + (depth - 1) * n * per_query + last_m * per_query
    total += 2 * dim * dim * last_m
    if cond_dim is not None and cond_dim != dim:
        total += 2 * cond_dim * dim
    return int(total)
