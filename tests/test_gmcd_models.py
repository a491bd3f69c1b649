"""Tests for GMCD's networks: models.resnet, resnet_convert, gmcd (spec gmcd.md §2.1, §3.1, §8).

The ResNet-18 reference is models/resnet_torch.py (torchvision's modules and state-dict names,
rebuilt because torchvision does not install beside the pinned torch); the GMCD blocks are checked
against numpy re-computations of the seed's formulas.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn
from torch.nn import functional as F

from cxrjax.core.errors import CheckpointError
from cxrjax.models import gmcd as G
from cxrjax.models import resnet as R
from cxrjax.models import resnet_convert as C
from cxrjax.models.resnet_torch import build_torch_resnet18


# ----------------------------------------------------------------------------- torch reference
def _torch_resnet18(num_classes: int = 7):
  """Random weights (torch's default init) and batch norms away from their trivial 1/0 values."""
  torch.manual_seed(0)
  net = build_torch_resnet18(num_classes)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, tnn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.3, 0.3)
        m.running_var.uniform_(0.5, 2.0)
  return net.eval()


def _flax_to_torch(variables) -> dict:
  """The inverse of the converter, in numpy: a torchvision-layout state dict of `variables`."""
  out = {}
  for collection in ("params", "batch_stats"):
    for kp, v in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      path = tuple(p.key for p in kp)
      v = np.asarray(v)
      if path[-1] == "kernel":
        v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
      out[C.torch_key(path)] = np.ascontiguousarray(v)
  return out


# ----------------------------------------------------------------------------- ResNet-18
def test_resnet18_parity_with_torch_eval(tmp_path):
  from safetensors.torch import save_file
  net = _torch_resnet18(num_classes=7)
  sd = net.state_dict()
  assert sum(v.numel() for v in net.parameters()) == 11_689_512 - 993 * 513  # 7-way fc
  path = str(tmp_path / "resnet18.safetensors")
  save_file({"module." + k: v.contiguous() for k, v in sd.items()}, path)  # DataParallel prefix
  model, variables = C.load_resnet(path)
  assert model.stage_sizes == (2, 2, 2, 2) and model.num_classes == 7
  from_tensors = C.convert_state_dict(sd, model)  # torch tensors straight from the module
  jax.tree.map(np.testing.assert_array_equal, from_tensors, variables)

  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ref_features, ref_logits = (t.numpy() for t in net(xt))
  logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert ref_features.std() > 0.05  # not a degenerate comparison
  np.testing.assert_allclose(aux["features"], ref_features, atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)

  # The headless backbone GMCD grafts drops the file's ImageNet head (strict=False in the seed).
  backbone = R.resnet18(num_classes=None)
  headless = C.convert_state_dict(sd, backbone)
  assert "fc" not in headless["params"]
  jax.tree.map(np.testing.assert_array_equal, headless["batch_stats"], variables["batch_stats"])


def test_resnet_converter_reports_missing_unexpected_and_shapes():
  model = R.resnet18(num_classes=7)
  sd = {k: v.numpy() for k, v in build_torch_resnet18(7).state_dict().items()}
  assert C.infer_config(sd) == {"stage_sizes": (2, 2, 2, 2), "num_classes": 7,
                                "num_init_features": 64, "in_chans": 3}
  broken = dict(sd)
  del broken["layer3.0.downsample.1.running_var"]
  broken["layer2.1.conv2.weight"] = np.zeros((128, 64, 3, 3), np.float32)
  broken["layer4.2.conv1.weight"] = np.zeros((512, 512, 3, 3), np.float32)
  with pytest.raises(CheckpointError) as err:
    C.convert_state_dict(broken, model)
  msg = str(err.value)
  assert "missing (1): layer3.0.downsample.1.running_var" in msg
  assert "unexpected (1): layer4.2.conv1.weight" in msg
  assert "shape mismatch (1): layer2.1.conv2.weight: file (128, 64, 3, 3)" in msg
  with pytest.raises(CheckpointError, match="not a ResNet state dict"):
    C.convert_state_dict({"features.conv0.weight": np.zeros((64, 3, 7, 7))}, model)
  with pytest.raises(CheckpointError, match="Bottleneck"):
    C.infer_config({**sd, "layer1.0.conv3.weight": np.zeros((256, 64, 1, 1))})
  head = C.convert_state_dict(sd, model.clone(num_classes=3), skip=("fc",))
  assert "fc" not in head["params"]
  # The round trip through the inverse mapping is exact.
  again = C.convert_state_dict(_flax_to_torch(head), model.clone(num_classes=3), skip=("fc",))
  jax.tree.map(np.testing.assert_array_equal, again, head)


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5, 2)])
def test_batchnorm_matches_torch_train_and_eval(shape):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
  c = shape[-1]
  bn = tnn.BatchNorm1d(c) if len(shape) == 2 else tnn.BatchNorm2d(c)
  with torch.no_grad():
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-0.2, 0.2)
  variables = {"params": {"scale": bn.weight.detach().numpy().copy(),
                          "bias": bn.bias.detach().numpy().copy()},
               "batch_stats": {"mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}}
  xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
  with torch.no_grad():
    ref_train = np.moveaxis(bn.train()(xt).numpy(), 1, -1)
    ref_eval = np.moveaxis(bn.eval()(xt).numpy(), 1, -1)
  model = R.BatchNorm()
  y, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, ref_train, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], bn.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], bn.running_var.numpy(), atol=1e-5)
  y_eval = model.apply({**variables, **upd}, x, train=False)
  np.testing.assert_allclose(y_eval, ref_eval, atol=1e-5)
  relu = R.BatchNorm(relu=True).apply({**variables, **upd}, x, train=False)
  np.testing.assert_allclose(relu, np.maximum(ref_eval, 0), atol=1e-5)


# ----------------------------------------------------------------------------- GMCD blocks
def test_kronecker_fusion_matches_numpy():
  rng = np.random.default_rng(0)
  o1, o2 = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32)
  got = np.asarray(G.kronecker_fusion(jnp.asarray(o1), jnp.asarray(o2)))
  want = np.stack([np.kron(np.append(a, 1), np.append(b, 1)) for a, b in zip(o1, o2)])
  assert got.shape == (3, 5 * 7)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The unimodal features survive beside the products: the last row/column of each outer product.
  np.testing.assert_allclose(got.reshape(3, 5, 7)[:, :4, 6], o1)
  np.testing.assert_allclose(got.reshape(3, 5, 7)[:, 4, :6], o2)
  assert G.kronecker_fusion(jnp.zeros((2, 128)), jnp.zeros((2, 128))).shape == (2, 16641)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_alpha_dropout_keeps_standard_normal_moments(rate):
  x = np.random.default_rng(0).normal(size=400_000)
  x = ((x - x.mean()) / x.std()).astype(np.float32)  # exactly mean 0, variance 1
  y = np.asarray(G.alpha_dropout(jnp.asarray(x), rate, jax.random.key(1, impl="rbg")))
  # The mask is the only randomness left; at n = 4e5 the standard errors of the output's mean
  # and variance are ~0.002 and ~0.003: the tolerances are about 5 of them.
  assert abs(y.mean()) < 0.01, y.mean()
  assert abs(y.var() - 1.0) < 0.015, y.var()
  q = 1 - rate
  a = (q + G.ALPHA_PRIME ** 2 * q * (1 - q)) ** -0.5
  b = -a * (1 - q) * G.ALPHA_PRIME
  dropped = np.isclose(y, a * G.ALPHA_PRIME + b, atol=1e-6)
  assert abs(dropped.mean() - rate) < 0.005
  np.testing.assert_allclose(y[~dropped], a * x[~dropped] + b, rtol=1e-5, atol=1e-5)


def test_alpha_dropout_constants_match_torch():
  # torch drops to a*alpha' + b and maps kept entries to a*x + b with the same a and b.
  torch.manual_seed(0)
  x = torch.randn(20_000)
  for rate in (0.1, 0.3):
    y = F.alpha_dropout(x, rate, training=True).numpy()
    q = 1 - rate
    a = (q + G.ALPHA_PRIME ** 2 * q * (1 - q)) ** -0.5
    b = -a * (1 - q) * G.ALPHA_PRIME
    kept = np.isclose(y, a * x.numpy() + b, atol=1e-5)
    np.testing.assert_allclose(y[~kept], a * G.ALPHA_PRIME + b, atol=1e-5)
    assert 0.5 * rate < (~kept).mean() < 1.5 * rate


def test_alpha_dropout_module_is_identity_when_deterministic():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32))
  module = G.AlphaDropout(0.5)
  np.testing.assert_array_equal(module.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(G.AlphaDropout(0.5, deterministic=True).apply({}, x), x)
  y = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0, impl="rbg")})
  assert not np.allclose(y, x)


def _numpy_variables(module, *args, seed=0, **kwargs):
  """Variables of `module` drawn in numpy from the abstract tree (no init program to compile:
  threefry draws compile slowly on XLA CPU). Kernels N(0, 1/fan_in), biases N(0, 0.1), batch
  norms away from their trivial 1/0 values."""
  abstract = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **kwargs), *args)
  rng = np.random.default_rng(seed)
  ranges = {"scale": (0.5, 1.5), "mean": (-0.1, 0.1), "var": (0.5, 2.0)}

  def draw(kp, leaf):
    name = kp[-1].key
    if name == "kernel":
      fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) != 3 else leaf.shape[1]
      return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    if name == "bias":
      return (rng.normal(size=leaf.shape) * 0.1).astype(np.float32)
    return rng.uniform(*ranges[name], size=leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _np_dense(p, x):
  return x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def _np_gate(p, v, v1, v2):
  """The seed's gated unit in numpy: ReLU(linear_o(sigmoid(bilinear(v1, v2)) * ReLU(linear_h(v))))
  (dropout off)."""
  h = np.maximum(_np_dense(p["linear_h"], v), 0)
  w = np.asarray(p["linear_z"]["kernel"])  # torch layout (K, I, J)
  z = np.einsum("bi,kij,bj->bk", v1, w, v2) + np.asarray(p["linear_z"]["bias"])
  return np.maximum(_np_dense(p["linear_o"], h / (1 + np.exp(-z))), 0)


def test_gated_attention_matches_numpy_and_torch_bilinear():
  rng = np.random.default_rng(0)
  v1, v2 = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
  gate = G.GatedAttention(features=6)
  variables = _numpy_variables(gate, v2, v1, v2)
  p = variables["params"]
  assert p["linear_z"]["kernel"].shape == (6, 5, 4)  # gated by (v1, v2) whatever v is
  got, got_z = jax.jit(lambda v: (gate.apply(v, v2, v1, v2, train=False),
                                  G.Bilinear(6).apply({"params": v["params"]["linear_z"]}, v1, v2))
                       )(variables)
  np.testing.assert_allclose(got, _np_gate(p, v2, v1, v2), rtol=1e-5, atol=1e-6)
  # torch's nn.Bilinear computes the same z from the same weight layout.
  bil = tnn.Bilinear(5, 4, 6)
  with torch.no_grad():
    bil.weight.copy_(torch.tensor(p["linear_z"]["kernel"]))
    bil.bias.copy_(torch.tensor(p["linear_z"]["bias"]))
    want = bil(torch.from_numpy(v1), torch.from_numpy(v2)).numpy()
  np.testing.assert_allclose(got_z, want, rtol=1e-5, atol=1e-6)


def test_fusion_matches_numpy_in_eval_mode():
  rng = np.random.default_rng(1)
  v1, v2 = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
  fusion = G.GatedBilinearFusion(dim1=5, dim2=3, mmhid=6)
  variables = _numpy_variables(fusion, v1, v2)
  got = jax.jit(lambda v: fusion.apply(v, v1, v2, train=False))(variables)
  p, stats = variables["params"], variables["batch_stats"]
  r1, r2 = np.maximum(v1, 0), np.maximum(v2, 0)
  o1, o2 = _np_gate(p["gate1"], r1, r1, r2), _np_gate(p["gate2"], r2, r1, r2)
  h = np.stack([np.kron(np.append(a, 1), np.append(b, 1)) for a, b in zip(o1, o2)])
  assert p["encoder1"]["kernel"].shape == (6 * 4, 6)
  for i in (1, 2):
    bn, s = p[f"encoder{i}_bn"], stats[f"encoder{i}_bn"]
    h = _np_dense(p[f"encoder{i}"], h)
    h = np.maximum((h - s["mean"]) / np.sqrt(s["var"] + 1e-5) * bn["scale"] + bn["bias"], 0)
  assert got.shape == (4, 6)
  np.testing.assert_allclose(got, h, rtol=1e-4, atol=1e-5)


def test_seed_initialisation():
  fusion, snn = G.GatedBilinearFusion(), G.TabularSNN()
  ones = jnp.ones((2, 128))
  # An unsafe_rbg key: the same distributions as threefry, a fraction of the compile time on CPU.
  fp, sp = jax.jit(lambda k: (fusion.init(k, ones, ones)["params"], snn.init(k, ones[:, :80])[
      "params"]))(jax.random.key(0, impl="unsafe_rbg"))
  # init_max_weights: N(0, 1/fan_in) kernels, zero biases, for every Linear of SNN and fusion.
  for p in (fp["encoder1"], fp["encoder2"], fp["gate1"]["linear_h"], fp["gate2"]["linear_o"],
            sp["encoder1"], sp["encoder4"], sp["classifier"]):
    kernel = np.asarray(p["kernel"])
    assert abs(kernel.std() * np.sqrt(kernel.shape[0]) - 1) < 0.25 and not np.any(p["bias"])
  assert fp["encoder1"]["kernel"].shape == (16641, 128)
  assert [sp[f"encoder{i}"]["kernel"].shape for i in (1, 2, 3, 4)] == [(80, 64), (64, 48),
                                                                       (48, 32), (32, 128)]
  # nn.Bilinear keeps torch's U(+-1/sqrt(in1)) for weights and bias (std bound / sqrt 3).
  z = np.asarray(fp["gate1"]["linear_z"]["kernel"])
  assert np.abs(z).max() <= 128 ** -0.5 and abs(z.std() * np.sqrt(3 * 128) - 1) < 0.02
  with pytest.raises(ValueError, match=r"\(B, 80\)"):
    jax.eval_shape(lambda: snn.init(jax.random.PRNGKey(1), jnp.ones((2, 81))))


# ----------------------------------------------------------------------------- teacher, student
def test_teacher_and_student_output_shapes():
  image = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)
  tabular = jax.ShapeDtypeStruct((4, 80), jnp.float32)
  teacher = G.GMCDTeacher()
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  out, variables = jax.eval_shape(
      lambda x, t: teacher.init_with_output(rngs, x, t, train=True), image, tabular)
  assert {k: v.shape for k, v in out.items()} == {
      "image": (4, 128), "tabular": (4, 128), "fused": (4, 128), "logits_fused": (4, 3),
      "logits_image": (4, 3), "logits_tabular": (4, 3)}
  assert set(variables["params"]) == {"image", "tabular", "fusion", "classifier"}
  assert set(variables["params"]["image"]) == {"backbone", "fc_new1", "fc_new1_bn", "fc_new2"}
  # The backbone's tree is exactly what the converter produces for a headless ResNet-18.
  backbone = C.expected_variables(R.resnet18(num_classes=None), 3)
  for collection in ("params", "batch_stats"):
    assert (jax.tree.map(lambda a: a.shape, variables[collection]["image"]["backbone"])
            == jax.tree.map(lambda a: a.shape, backbone[collection]))

  out = jax.eval_shape(lambda v, x, t: teacher.apply(v, x, t, train=False), variables, image,
                       tabular)
  assert out["fused"].shape == (4, 128) and out["logits_tabular"].shape == (4, 3)

  student = G.GMCDStudent()
  variables = jax.eval_shape(lambda x: student.init(jax.random.PRNGKey(0), x), image)
  feats = [jax.ShapeDtypeStruct((4, 128), jnp.float32)] * 2
  out = jax.eval_shape(lambda v, x, f: student.apply(v, x, train=False, teacher_features=f),
                       variables, image, feats)
  assert {k: v.shape for k, v in out.items()} == {
      "image": (4, 128), "logits_image": (4, 3), "embed_s": (2, 4, 128), "embed_t": (2, 4, 128)}
  assert set(variables["params"]) == {"image", "embed_s_0", "embed_s_1", "embed_t_0", "embed_t_1"}


def test_teacher_and_student_forward_small():
  # A one-stage ResNet and 16 px images keep the compile short; the heads are the real ones.
  rng = np.random.default_rng(0)
  image = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
  tabular = rng.normal(size=(4, 80)).astype(np.float32)
  teacher = G.GMCDTeacher(stage_sizes=(1,))
  student = G.GMCDStudent(stage_sizes=(1,), teacher_dims=(128, 128))
  tv = _numpy_variables(teacher, image, tabular)
  sv = _numpy_variables(student, image, seed=1)

  @jax.jit
  def run(tv, sv, key):
    # As in stage 2: the teacher in train mode (batch statistics, dropout) gives the targets.
    t, upd = teacher.apply(tv, image, tabular, train=True, mutable=["batch_stats"],
                           rngs={"dropout": key})
    s = student.apply(sv, image, train=False, teacher_features=[t["fused"], t["image"]])
    logits = student.apply(sv, s["image"], method="classify")
    proj = student.apply(sv, s["image"], method="project_student")
    return t, upd, s, logits, proj

  t1, upd, s, logits, proj = run(tv, sv, jax.random.key(2, impl="rbg"))
  t2 = run(tv, sv, jax.random.key(3, impl="rbg"))[0]  # the same program, another dropout key
  assert all(np.isfinite(v).all() for v in t1.values())
  assert (np.asarray(t1["image"]) >= 0).all() and (np.asarray(t1["tabular"]) >= 0).all()
  assert not np.allclose(t1["tabular"], t2["tabular"])  # alpha dropout is active in train mode
  assert not np.allclose(t1["fused"], t2["fused"])
  np.testing.assert_array_equal(t1["image"], t2["image"])  # the image branch has no dropout
  assert set(upd["batch_stats"]) == {"image", "fusion"}
  np.testing.assert_allclose(logits, s["logits_image"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(proj, s["embed_s"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(s["embed_t"], axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="2 DSCD instances"):
    jax.eval_shape(lambda: student.apply(sv, image, teacher_features=[t1["fused"]]))
