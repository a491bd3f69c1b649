"""RayGen (seed 001, spec C): report text -> chest radiograph with a VQ-GAN tokenizer, a BERT text
encoder and a text-conditioned masked-token transformer.

  python -m cxrjax.launch --config configs/raygen.py                 # everything, phantoms, 2 CPU cores
  python -m cxrjax.launch --config configs/raygen.py:tiny            # seconds; what the tests run
  python -m cxrjax.launch --config configs/raygen.py:paper           # the seed's sizes (a GPU job)
  python -m cxrjax.launch --config configs/raygen.py:tokenizer       # part 1: VQ-GAN + text encoder only
  python -m cxrjax.launch --config configs/raygen.py:tokenizer \
      --config.vqgan.init_from=/path/vqgan.ckpt --config.text.init_from=/path/CXR-BERT-dir
                                                                     # published weights: evaluate only
  python -m cxrjax.systems.raygen.generate --workdir <run> --prompt "Large right pleural effusion."

The seed freezes a VQ-GAN and a CXR-BERT that others pretrained (UniXGen's, Microsoft's); nothing is
downloaded here, so by default this system trains both on the phantom world first. Stages:
  classifier  a small DenseNet on the training labels: the VQ-GAN's perceptual network and the
              evaluator of generated images
  vqgan       the VQ-GAN: L1 + perceptual + codebook (+ MaskGIT's entropy term), the PatchGAN
              discriminator from vqgan.disc_start; generator and discriminator are two updates of
              one compiled step, each with its own Adam (beta 0.5, 0.9), as taming's
  wordpiece   a WordPiece vocabulary trained on the training reports (HF tokenizers)
  text        a small BERT pretrained by masked-language modelling on those reports; frozen after
  codes       every split encoded once, cached per tokenizer under <data_dir>/raygen_codes
  generator   the masked-token transformer (the seed's ModelV2) on codes and frozen text states
  downstream_0..2   DenseNet classifiers on real / real + 100 % / real + 50 % synthetic images
results: reconstruction L1 / PSNR / SSIM, code usage, MLM accuracy, FID, MS-SSIM diversity, prompt
fidelity, the downstream table; reconstructions.png, code_usage.png, generations.png,
decoding_steps.png, prompt_fidelity.png.

Deviations from the seed, and why (:paper restores the seed's sizes and switches):
  * CPU sizes: 128 px images, 8x downsampling (16 x 16 = 256 codes), 16 base channels, a 128 x 64
    codebook, batch 4; the seed's VQ-GAN is 512 px, 16x (32 x 32 codes), 128 channels, 1024 x 256.
    (With 512 codes the default's 600 steps used ~100 of them on held-out studies.)
    GroupNorm uses vqgan.norm_groups groups. The generator is 3 layers x 192 (the seed's 6 x 1024),
    the BERT 2 x 256 (CXR-BERT's 12 x 768), the downstream DenseNet the classifier stage's.
  * Perceptual loss: DenseNet features with uniform channel weights instead of LPIPS-VGG (whose
    weights cannot be downloaded); see cxrjax/systems/raygen/perceptual.py.
  * Codebook health: MaskGIT's entropy term (vqgan.entropy_weight) keeps the codebook in use;
    taming has none (0 restores it). Usage and perplexity are logged at every evaluation.
  * Report text: findings and impression (data.report_fields); the seed keeps the IMPRESSION
    only, which the phantom reports keep to the main finding. ('impression',) is the faithful value.
  * Text length 96 tokens (the seed pads to 256; the phantom reports are shorter): text.max_length.
  * Generator: text dropout 0.1 for classifier-free guidance and a key-padding mask on the text
    (generator.text_dropout=0, generator.text_key_padding=False are the seed's); lr 5e-4 for the
    CPU default's 500 steps (the seed's 1e-5 for 740k steps is :paper's).
  * The downstream experiment's synthetic set is capped at downstream.max_synthetic images.
"""
import ml_collections

from cxrjax.core import config_blocks as blocks

VARIANTS = ("default", "tiny", "paper", "tokenizer", "tokenizer_tiny", "tokenizer_paper")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = blocks.variant(arg, VARIANTS, "configs/raygen.py")
  c = ml_collections.ConfigDict()
  c.system = "raygen"
  c.variant = variant
  # 'all': tokenizer, text encoder, generator and the evaluation of generated images;
  # 'tokenizer': the VQ-GAN and the text encoder only (part 1).
  c.stages = "tokenizer" if variant.startswith("tokenizer") else "all"
  c.seed = 0
  c.mesh = dict(data=-1, fsdp=1)
  c.tensorboard = True
  # '' = $JAX_COMPILATION_CACHE_DIR if set, else <workdir>/jax_cache; 'none' = off; else a directory
  c.compile_cache = ""

  c.data = dict(
      builder="cxr_phantoms", data_dir="",  # '' = <workdir>/data
      builder_config=("size=128", "num_studies=3000", "views=frontal"),
      image_size=128, splits=("train", "validation", "test"), views=("PA", "AP"),
      uncertain="ignore", report_fields=("findings", "impression"), read_threads=2)

  # The perceptual network (perceptual.py): trained on the training labels unless init_from names
  # a DenseNet weights file (then intensity says which input range it was trained on).
  c.perceptual = dict(init_from="", intensity="unit", block_config=(2, 2, 2, 2), growth_rate=16,
                      num_init_features=32, blocks=(0, 1, 2))
  c.perceptual.train = blocks.stage(300, 32, blocks.torch_adam(1e-3), logs=5, evals=1,
                                    checkpoints=1)

  # The VQ-GAN (spec C.3; sizes per the CPU deviation above).
  c.vqgan = dict(
      init_from="", ch=16, ch_mult=(1, 2, 4, 8), num_res_blocks=1, attn_resolutions=(),
      z_channels=64, embed_dim=64, n_embed=128, norm_groups=16, beta=0.25, legacy=True,
      pixel_weight=1.0, perceptual_weight=1.0, codebook_weight=1.0,
      entropy_weight=0.1, entropy_temperature=0.01,
      disc_start=300, disc_weight=0.8, disc_ndf=32, disc_layers=3)
  # taming: Adam(beta 0.5, 0.9) for both, lr = 4.5e-6 x batch x GPUs (x accumulation).
  adam = blocks.torch_adam(2e-4, b1=0.5, b2=0.9)
  c.vqgan_train = blocks.stage(600, 4, {"generator": adam, "discriminator": dict(adam)}, logs=12,
                               evals=3, checkpoints=3)

  # The text encoder (spec C.4): a small BERT pretrained by MLM on the reports, frozen after.
  c.text = dict(init_from="", vocab_size=1000, max_length=96, layers=2, hidden=256, heads=4,
                intermediate=512, dropout=0.1, normalize="sequence", mask_rate=0.15)
  c.text_train = blocks.stage(400, 32, blocks.optim(5e-4, weight_decay=0.01, schedule="cosine",
                                                    warmup_steps=40), logs=8, evals=2,
                              checkpoints=2)

  # The generator (spec C.5): the seed's ModelV2 at CPU sizes (its 6 x 1024, 8 heads, FFN 4096 is
  # :paper's). Beyond the seed: text dropout for classifier-free guidance and a key-padding mask
  # on the text (0.0 / False are the seed's).
  c.generator = dict(width=192, depth=3, heads=4, ffn_hidden=768, attention_dropout=0.1,
                     text_key_padding=True, text_dropout=0.1)
  # The seed's Adam without decay and reduce-on-plateau (factor 0.5, patience 4) on the validation
  # loss; lr 1e-5 was set for 740k steps of 16 in fp16, the CPU default's few steps need 5e-4.
  c.generator_train = blocks.stage(
      500, 16, blocks.torch_adam(5e-4), logs=10, evals=5, checkpoints=3,
      plateau=blocks.plateau("val_loss", enabled=True, factor=0.5, patience=4, min_scale=1e-3))
  # Decoding (C.8): the seed's production K=3, T0=1.3, alpha=0.5, no guidance.
  c.sampling = dict(steps=3, temperature=1.3, topk_filter=0.5, variant="raygen",
                    choice_temperature=4.5, guidance_scale=0.0)
  # The downstream experiment (C.9.4): real vs real + synthetic; synthetic images capped on a CPU.
  c.downstream = dict(enabled=True, max_synthetic=600, faithful_label_bug=False)
  c.downstream_train = blocks.stage(300, 32, blocks.torch_adam(1e-3), logs=3, evals=3,
                                    checkpoints=1)
  # n_generate: test reports generated for FID; n_diversity: prompts generated twice (MS-SSIM);
  # n_fidelity: generations per prompt-fidelity prompt; fid_network: a torchxrayvision DenseNet
  # file for the seed's FID features ('' = the phantom classifier's).
  c.eval = dict(batch_size=32, show=8, n_generate=300, n_diversity=64, n_fidelity=48,
                fid_network="", n_bootstrap=1000, alpha=0.05, seed=0)

  if variant in ("paper", "tokenizer_paper"):
    c.data.update(builder_config=("size=512", "num_studies=20000", "views=frontal"), image_size=512,
                  report_fields=("impression",))
    c.vqgan.update(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, embed_dim=256,
                   n_embed=1024, norm_groups=32, entropy_weight=0.0, disc_start=30_001,
                   disc_ndf=64)
    c.vqgan_train.update(steps=100_000, batch_size=4)
    for part in ("generator", "discriminator"):
      c.vqgan_train.optim[part].lr = 4.5e-6 * 4
    blocks.set_counts(c.vqgan_train, logs=1000, evals=20, checkpoints=50)
    c.text.update(vocab_size=30522, max_length=256, layers=12, hidden=768, heads=12,
                  intermediate=3072)
    c.text_train.update(steps=20_000, batch_size=64)
    blocks.set_counts(c.text_train, logs=200, evals=10, checkpoints=10)
    c.perceptual.update(block_config=(6, 12, 24, 16), growth_rate=32, num_init_features=64)
    c.perceptual.train.update(steps=5_000, batch_size=32)
    c.generator.update(width=1024, depth=6, heads=8, ffn_hidden=4096, text_key_padding=False,
                       text_dropout=0.0)
    c.generator_train.update(steps=740_000, batch_size=16)
    c.generator_train.optim.lr = 1e-5
    c.generator_train.plateau.min_scale = 1e-3  # torch's min_lr 1e-8 at lr 1e-5
    blocks.set_counts(c.generator_train, logs=7400, evals=100, checkpoints=100)
    c.downstream.max_synthetic = 4684
    c.downstream_train.update(steps=2930, batch_size=16)  # 10 epochs of 4684
    c.eval.update(n_generate=2568, n_diversity=2568, n_fidelity=256)
  elif variant in ("tiny", "tokenizer_tiny"):
    c.data.update(builder_config=("size=64", "num_studies=120", "views=frontal"), image_size=32)
    c.perceptual.update(block_config=(1, 1, 1, 1), growth_rate=8, num_init_features=8)
    c.perceptual.train.update(steps=4, batch_size=8)
    c.vqgan.update(ch=16, ch_mult=(1, 2, 2, 2), z_channels=8, embed_dim=8, n_embed=32, norm_groups=8,
                   disc_start=3, disc_ndf=8, disc_layers=2)
    c.vqgan_train.update(steps=6, batch_size=4)
    blocks.set_counts(c.vqgan_train, logs=2, evals=2, checkpoints=2)
    c.text.update(vocab_size=200, max_length=48, layers=1, hidden=32, heads=2, intermediate=64)
    c.text_train.update(steps=4, batch_size=8)
    blocks.set_counts(c.text_train, logs=2, evals=1, checkpoints=2)
    c.generator.update(width=32, depth=1, heads=2, ffn_hidden=64)
    c.generator_train.update(steps=6, batch_size=8)
    blocks.set_counts(c.generator_train, logs=2, evals=2, checkpoints=2)
    c.downstream.max_synthetic = 20
    c.downstream_train.update(steps=3, batch_size=8)
    blocks.set_counts(c.downstream_train, logs=1, evals=1, checkpoints=1)
    c.eval.update(batch_size=16, show=4, n_generate=16, n_diversity=4, n_fidelity=4,
                  n_bootstrap=50)
    c.tensorboard = False
  return c
