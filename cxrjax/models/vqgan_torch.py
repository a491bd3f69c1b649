"""taming-transformers' VQModel and the Pix2Pix PatchGAN rebuilt in PyTorch: the reference the JAX
VQ-GAN (models/vqgan.py, models/patchgan.py) is checked and timed against.

taming is not installable beside the pinned torch, so this reproduces its ``Encoder``, ``Decoder``
and ``VectorQuantizer2(legacy=True)`` under taming's state-dict names (``encoder.down.0.block.0
.norm1.weight``, ``quantize.embedding.weight``, ...), channels-first as taming runs, and the
``NLayerDiscriminator`` with BatchNorm and taming's ``weights_init``. Used by the parity tests
(tests/test_vqgan_models.py) and the CPU speed reference (benchmarks/vqgan_step.py); needs the
``torch`` extra, imported only when called.
"""
from __future__ import annotations

from typing import Sequence


def build_taming_vqmodel(ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                         attn_resolutions: Sequence[int], resolution: int, z_channels: int,
                         embed_dim: int, n_embed: int, norm_groups: int = 32, beta: float = 0.25):
  """A torch.nn.Module with taming's VQModel structure and names (no loss module). Methods:
  encode_features(x (B, 3, H, W)) -> z (B, embed_dim, h, w) after quant_conv;
  quantize_codes(z) -> (codes (B, h, w), squared distances (B*h*w, n_embed));
  decode_indices(codes) -> images; forward(x) -> (reconstruction, legacy codebook loss) with the
  straight-through estimator, as a training step runs it."""
  import torch
  from torch import nn
  from torch.nn import functional as F

  def norm(c):
    return nn.GroupNorm(norm_groups, c, eps=1e-6, affine=True)

  class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
      self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
      if cin != cout:
        self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
      h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
      return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h

  class AttnBlock(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.norm = norm(c)
      self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
      b, c, hh, ww = x.shape
      h = self.norm(x)
      q = self.q(h).reshape(b, c, -1).permute(0, 2, 1)
      w = torch.softmax(torch.bmm(q, self.k(h).reshape(b, c, -1)) * c ** -0.5, dim=2)
      out = torch.bmm(self.v(h).reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
      return x + self.proj_out(out)

  class Resample(nn.Module):
    def __init__(self, c, down):
      super().__init__()
      self.down, self.conv = down, nn.Conv2d(c, c, 3, 2 if down else 1, 0 if down else 1)

    def forward(self, x):
      x = (F.pad(x, (0, 1, 0, 1)) if self.down
           else F.interpolate(x, scale_factor=2.0, mode="nearest"))
      return self.conv(x)

  def mid(c):
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return m

  def level(cin, cout, n_blocks, attn, resample):
    lv = nn.Module()
    lv.block = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout) for j in range(n_blocks)])
    lv.attn = nn.ModuleList([AttnBlock(cout) for _ in range(n_blocks)] if attn else [])
    if resample:
      setattr(lv, resample + "sample", Resample(cout, resample == "down"))
    return lv

  def run_level(lv, h, resample):
    for j, block in enumerate(lv.block):
      h = block(h)
      if len(lv.attn):
        h = lv.attn[j](h)
    return getattr(lv, resample)(h) if hasattr(lv, resample) else h

  class VQModel(nn.Module):
    def __init__(self):
      super().__init__()
      n = len(ch_mult)
      attn = [resolution // 2 ** i in attn_resolutions for i in range(n)]
      self.encoder, self.decoder = nn.Module(), nn.Module()
      e, d = self.encoder, self.decoder
      e.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
      widths = [ch] + [ch * m for m in ch_mult]
      e.down = nn.ModuleList([level(widths[i], widths[i + 1], num_res_blocks, attn[i],
                                    "down" if i != n - 1 else None) for i in range(n)])
      e.mid, e.norm_out = mid(widths[-1]), norm(widths[-1])
      e.conv_out = nn.Conv2d(widths[-1], z_channels, 3, 1, 1)
      self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
      self.quantize = nn.Module()
      self.quantize.embedding = nn.Embedding(n_embed, embed_dim)
      self.quantize.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)  # taming's
      self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
      d.conv_in, d.mid = nn.Conv2d(z_channels, widths[-1], 3, 1, 1), mid(widths[-1])
      up, cin = [None] * n, widths[-1]
      for i in reversed(range(n)):  # taming builds coarse to fine and inserts at the front
        up[i] = level(cin, ch * ch_mult[i], num_res_blocks + 1, attn[i], "up" if i != 0 else None)
        cin = ch * ch_mult[i]
      d.up = nn.ModuleList(up)
      d.norm_out, d.conv_out = norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)

    def encode_features(self, x):
      e = self.encoder
      h = e.conv_in(x)
      for lv in e.down:
        h = run_level(lv, h, "downsample")
      h = e.mid.block_2(e.mid.attn_1(e.mid.block_1(h)))
      return self.quant_conv(e.conv_out(F.silu(e.norm_out(h))))

    def quantize_codes(self, z):
      zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
      w = self.quantize.embedding.weight
      dist = zf.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * zf @ w.t()
      return dist.argmin(1).reshape(z.shape[0], z.shape[2], z.shape[3]), dist

    def decode_quantized(self, zq):
      d = self.decoder
      h = d.conv_in(self.post_quant_conv(zq))
      h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(h)))
      for i in reversed(range(len(d.up))):
        h = run_level(d.up[i], h, "upsample")
      return d.conv_out(F.silu(d.norm_out(h)))

    def decode_indices(self, codes):
      return self.decode_quantized(self.quantize.embedding(codes).permute(0, 3, 1, 2))

    def forward(self, x):
      z = self.encode_features(x)
      codes, _ = self.quantize_codes(z)
      zq = self.quantize.embedding(codes).permute(0, 3, 1, 2)
      # legacy: commitment + beta * codebook term, then the straight-through estimator
      qloss = torch.mean((zq.detach() - z) ** 2) + beta * torch.mean((zq - z.detach()) ** 2)
      return self.decode_quantized(z + (zq - z).detach()), qloss

  return VQModel()


def build_nlayer_discriminator(ndf: int = 64, n_layers: int = 3):
  """Pix2Pix NLayerDiscriminator (BatchNorm) with taming's weights_init: (B, 3, H, W) -> patch
  logits; the convolutions and norms sit under ``main.<i>`` as taming names them."""
  import torch
  from torch import nn

  seq, mult = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)], 1
  for n in range(1, n_layers + 1):
    prev, mult = mult, min(2 ** n, 8)
    seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
            nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]

  class NLayerDiscriminator(nn.Module):
    def __init__(self):
      super().__init__()
      self.main = nn.Sequential(*seq, nn.Conv2d(ndf * mult, 1, 4, 1, 1))

    def forward(self, x):
      return self.main(x)

  net = NLayerDiscriminator()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.Conv2d):
        m.weight.normal_(0.0, 0.02)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.normal_(1.0, 0.02)
        m.bias.zero_()
  return net
