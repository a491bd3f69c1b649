"""RayGen's ModelV2 rebuilt in PyTorch: the reference the JAX ``models.maskgit.TokenTransformer``
is checked and timed against.

Written under the seed's module names (farazali7/multimodal-xray src/models: ``ModelV2`` ->
``TransformerDecoder`` -> ``TransformerDecoderLayer``, ``MultiHeadAttentionBlock`` wrapping
``nn.MultiheadAttention(batch_first=True)`` as ``.mha``, ``FeedForwardNetwork2``), so its state
dict has the seed's keys (``models/maskgit_convert.py`` reads them): no pre-norms around the
attentions, the GEGLU FFN LN -> 2H -> b * gelu(a) -> LN(H) -> H -> D without biases, LayerNorm_3
after every layer, learned positions, a Linear text projector (nn.Identity when the text width
equals the model's, as the seed), the layers' unused ``layer_norm_1`` / ``layer_norm_2`` kept as
the seed's checkpoints have them. Used by the parity tests (tests/test_maskgit_model.py) and the
CPU speed reference (benchmarks/raygen_step.py); needs the ``torch`` extra, imported only when
called.
"""
from __future__ import annotations


def build_seed_model_v2(codebook_size: int, seq_len: int, width: int, depth: int, heads: int,
                        ffn_hidden: int, text_dim: int, dropout: float = 0.1):
  """A torch.nn.Module with ModelV2's structure and names, torch's default initialisation.

  forward(ids (B, N) int64 in [0, codebook_size] (the last id is the mask), text (B, T, text_dim),
  key_padding_mask (B, T) bool, True = padding, or None) -> logits (B, N, codebook_size).
  set_need_weights(flag): the seed calls nn.MultiheadAttention with need_weights left at True (the
  explicit bmm + softmax path that also averages the weights); False takes torch's fused
  scaled_dot_product_attention.
  """
  import torch
  from torch import nn
  from torch.nn import functional as F

  class MultiHeadAttentionBlock(nn.Module):
    def __init__(self):
      super().__init__()
      self.mha = nn.MultiheadAttention(width, num_heads=heads, dropout=dropout, batch_first=True)
      self.need_weights = True

    def forward(self, x, context=None, key_padding_mask=None):
      kv = x if context is None else context
      return self.mha(x, kv, kv, key_padding_mask=key_padding_mask,
                      need_weights=self.need_weights)[0]

  class FeedForwardNetwork2(nn.Module):
    def __init__(self):
      super().__init__()
      self.layer_norm_1 = nn.LayerNorm(width)
      self.linear_1 = nn.Linear(width, ffn_hidden * 2, bias=False)
      self.layer_norm_2 = nn.LayerNorm(ffn_hidden)
      self.linear_2 = nn.Linear(ffn_hidden, width, bias=False)

    def forward(self, x):
      a, gate = self.linear_1(self.layer_norm_1(x)).chunk(2, dim=-1)
      return self.linear_2(self.layer_norm_2(gate * F.gelu(a)))

  class TransformerDecoderLayer(nn.Module):
    def __init__(self):
      super().__init__()
      self.layer_norm_1 = nn.LayerNorm(width)  # unused by the seed's forward
      self.layer_norm_2 = nn.LayerNorm(width)  # unused
      self.layer_norm_3 = nn.LayerNorm(width)
      self.mha = MultiHeadAttentionBlock()
      self.cross_mha = MultiHeadAttentionBlock()
      self.ffn = FeedForwardNetwork2()

    def forward(self, x, context, key_padding_mask):
      x = self.mha(x) + x
      x = self.cross_mha(x, context, key_padding_mask) + x
      return self.layer_norm_3(self.ffn(x) + x)

  class ModelV2(nn.Module):
    def __init__(self):
      super().__init__()
      self.image_embedding = nn.Embedding(codebook_size + 1, width)
      self.image_pos_emb = nn.Module()
      self.image_pos_emb.pos_emb = nn.Parameter(torch.randn(1, seq_len, width))
      self.text_projector = nn.Linear(text_dim, width) if text_dim != width else nn.Identity()
      self.transformer = nn.Module()
      self.transformer.dec_layers = nn.ModuleList(
          [TransformerDecoderLayer() for _ in range(depth)])
      self.final_dense = nn.Linear(width, codebook_size)

    def forward(self, ids, text, key_padding_mask=None):
      x = self.image_embedding(ids) + self.image_pos_emb.pos_emb[:, :ids.shape[1]]
      context = self.text_projector(text)
      for layer in self.transformer.dec_layers:
        x = layer(x, context, key_padding_mask)
      return self.final_dense(x)

    def set_need_weights(self, flag: bool) -> None:
      for m in self.modules():
        if isinstance(m, MultiHeadAttentionBlock):
          m.need_weights = flag

  return ModelV2()
