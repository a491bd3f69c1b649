"""Tests for cxrjax.models.densenet, densenet_ops and densenet_convert (spec B.2, B.7).

Parity tests build the torchvision-equivalent PyTorch DenseNet (cxrjax.models.densenet_torch;
torchvision itself does not install beside torch 2.13), save its state dict as .safetensors and
.pt, convert both and compare.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.core.errors import CheckpointError
from cxrjax.models import densenet as D
from cxrjax.models import densenet_convert as C
from cxrjax.models import densenet_ops as O

SMALL = (2, 2, 2, 2)  # every code path (blocks, transitions, norm5) at a fraction of the cost


def _apply(model, train=False):
  """Jitted apply; in train mode also returns the updated batch_stats."""
  if train:
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def _flax_to_torch(variables) -> dict:
  """The inverse of the converter, in numpy: a torchvision-layout state dict of `variables`."""
  out = {}
  for collection in ("params", "batch_stats"):
    for kp, v in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      path = tuple(p.key for p in kp)
      v = np.asarray(v)
      if path[-1] == "kernel":
        v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
      out[C.torch_key(path)] = np.ascontiguousarray(v)  # safetensors writes raw buffers
  return out


# ----------------------------------------------------------------------------- model, no torch
# torchvision's counts (num_classes=1000, 3 channels); one channel has 2 * 49 * 64 fewer weights.
@pytest.mark.parametrize("depth,count,features", [(121, 7_978_856, 1024), (169, 14_149_480, 1664)])
@pytest.mark.parametrize("chans", [1, 3])
def test_shapes_and_param_counts(depth, count, features, chans):
  model = D.DenseNet(block_config=D.BLOCK_CONFIGS[depth], num_classes=1000)
  x = jax.ShapeDtypeStruct((2, 64, 64, chans), jnp.float32)
  (logits, aux), variables = jax.eval_shape(  # one trace: init and a train-mode forward
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=True), x)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert aux["features"].shape == (2, features)
  assert variables["params"]["conv0"]["kernel"].shape == (7, 7, chans, 64)
  assert D.num_params(variables["params"]) == count - (3 - chans) * 49 * 64
  names = set(variables["params"])
  assert {"conv0", "norm0", "denseblock1", "transition3", "denseblock4", "norm5",
          "classifier"} <= names and "transition4" not in names
  assert set(variables["batch_stats"]["denseblock1"]["denselayer1"]["norm1"]) == {"mean", "var"}


def test_flops_match_torchvision_macs():
  # torchvision lists 2.83 / 3.36 GFLOPS (multiply-adds) at 224 x 224.
  assert D.flops_per_example(D.BLOCK_CONFIGS[121]) / 2e9 == pytest.approx(2.834, abs=1e-3)
  assert D.flops_per_example(D.BLOCK_CONFIGS[169]) / 2e9 == pytest.approx(3.360, abs=1e-3)
  # Pooling before the transition convolutions runs them on a quarter of the pixels: the three
  # transitions of DenseNet-121 at 224 are 3 x 102.8 M MACs before pooling.
  saved = D.flops_per_example(D.BLOCK_CONFIGS[121]) - D.flops_per_example(
      D.BLOCK_CONFIGS[121], pool_first_transitions=True)
  assert saved == 2 * 3 * (56 * 56 * 256 * 128) * 3 // 4


def _random_variables(model, x_shape, seed=0):
  """Variables of `model` drawn in numpy (no init program to compile): kaiming-normal kernels,
  and BN scale/bias/running stats away from their trivial 1/0 values."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  rng = np.random.default_rng(seed)
  ranges = {"scale": (0.5, 1.5), "bias": (-0.2, 0.2), "mean": (-0.3, 0.3), "var": (0.5, 2.0)}

  def draw(kp, leaf):
    name = kp[-1].key
    if name == "kernel":
      return (rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))).astype(np.float32)
    return rng.uniform(*ranges[name], size=leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def small():
  """A reduced DenseNet with non-trivial BN parameters and running stats, and an input batch."""
  model = D.DenseNet(block_config=SMALL, num_classes=5)
  x = np.random.default_rng(1).normal(size=(4, 32, 32, 1)).astype(np.float32)
  return model, _random_variables(model, x.shape), x


def test_fusion_barrier_is_an_unfusable_identity():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32))
  f = lambda x: jnp.sum(jnp.sin(O.fusion_barrier(x * 2.0, O.barrier_predicate(x))) ** 2)
  g = lambda x: jnp.sum(jnp.sin(x * 2.0) ** 2)
  np.testing.assert_array_equal(O.fusion_barrier(x, O.barrier_predicate(x)), x)
  np.testing.assert_array_equal(O.fusion_barrier(x, jnp.array(False)), x)  # either branch
  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-6)
  # It works because XLA keeps the conditional (forward and, differentiated, backward) and
  # never fuses across one; an optimization_barrier would be gone from the CPU program.
  hlo = jax.jit(jax.grad(f)).lower(x).compile().as_text()
  assert hlo.count("conditional(") >= 2


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 5, 2), (1, 2, 3, 1)])
def test_avg_pool_2x2_matches_reduce_window(shape):
  import flax.linen as nn
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
  np.testing.assert_allclose(O.avg_pool_2x2(x), nn.avg_pool(x, (2, 2), strides=(2, 2)),
                             rtol=1e-6, atol=1e-6)


def test_concat_modes_remat_and_bfloat16():
  model = D.DenseNet(block_config=(2, 2), num_classes=3)
  x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  variables = _random_variables(model, x.shape)
  variants = (model.clone(fusion_barriers=True), model.clone(fusion_barriers=False),
              model.clone(concat="buffer"), model.clone(remat=True))
  bf = model.clone(dtype=jnp.bfloat16)

  def grads(m, params):
    def loss(params):
      (logits, _), upd = m.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                 train=True, mutable=["batch_stats"])
      return jnp.sum(logits ** 2), upd
    return jax.grad(loss, has_aux=True)(params)

  @jax.jit  # one program: each compile costs seconds on CPU, the maths is tiny
  def run(variables):
    return ([grads(m, variables["params"]) for m in variants],
            bf.apply(variables, x, train=True, mutable=["batch_stats"]),
            bf.apply(variables, x)[0], model.apply(variables, x)[0])

  (ref, *others), ((bf_logits, bf_aux), bf_upd), bf_eval, fp_eval = run(variables)
  for got in others:
    # Same maths; XLA may order float32 sums differently between the variants.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), got, ref)
  # bfloat16 compute: float32 params, batch stats, logits and features; values close to fp32.
  assert bf_logits.dtype == jnp.float32 and bf_aux["features"].dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(bf_upd))
  assert np.max(np.abs(bf_eval - fp_eval)) < 0.05 * (1 + np.max(np.abs(fp_eval)))


@pytest.mark.parametrize("shape", [(2, 9, 7, 3), (2, 8, 10, 3), (1, 1, 2, 1), (1, 3, 3, 2)])
def test_max_pool_matches_reduce_window_values_and_gradients(shape):
  import flax.linen as nn
  ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32))  # no ties
  np.testing.assert_array_equal(O.max_pool_3x3_s2(x), ref(x))
  w = jnp.asarray(rng.normal(size=ref(x).shape).astype(np.float32))
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * w))(x)
  np.testing.assert_array_equal(grad(O.max_pool_3x3_s2), grad(ref))


def test_max_pool_ties_go_where_torch_sends_them():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).integers(0, 3, size=(2, 9, 8, 4)).astype(np.float32)  # many ties
  w = np.random.default_rng(2).normal(size=(2, 5, 4, 4)).astype(np.float32)
  xt = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)
  out = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
  (out * torch.from_numpy(w.transpose(0, 3, 1, 2).copy())).sum().backward()
  got = jax.grad(lambda x: jnp.sum(O.max_pool_3x3_s2(x) * w))(jnp.asarray(x))
  np.testing.assert_array_equal(out.detach().numpy().transpose(0, 2, 3, 1), O.max_pool_3x3_s2(x))
  np.testing.assert_allclose(np.asarray(got), xt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def test_converter_roundtrip_and_legacy_names(small, tmp_path):
  pytest.importorskip("safetensors")
  from safetensors.numpy import save_file
  model, variables, x = small
  sd = _flax_to_torch(variables)
  # DataParallel prefix, pre-0.4 'norm.1' names, and buffers that are not weights.
  legacy = {"module." + k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
            for k, v in sd.items()}
  legacy["module.features.norm0.num_batches_tracked"] = np.array(3, np.int64)
  legacy["module.op_threshs"] = np.linspace(0.1, 0.9, 5).astype(np.float32)
  assert any(".norm.1." in k for k in legacy)
  path = str(tmp_path / "w.safetensors")
  save_file(legacy, path)
  loaded, converted, extras = C.load_densenet(path)
  assert loaded.block_config == SMALL and loaded.num_classes == 5 and extras["in_chans"] == 1
  np.testing.assert_allclose(extras["op_threshs"], legacy["module.op_threshs"])
  jax.tree.map(np.testing.assert_array_equal, converted, jax.device_get(variables))


def test_converter_reports_missing_unexpected_and_shapes(small):
  model, variables, _ = small
  sd = _flax_to_torch(variables)
  broken = dict(sd)
  del broken["features.denseblock2.denselayer1.norm2.running_var"]
  broken["features.denseblock1.denselayer1.conv1.weight"] = np.zeros((128, 65, 1, 1), np.float32)
  broken["features.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError) as err:
    C.convert_state_dict(broken, model)
  msg = str(err.value)
  assert "missing (1): features.denseblock2.denselayer1.norm2.running_var" in msg
  assert "unexpected (1): features.extra.weight" in msg
  assert "features.denseblock1.denselayer1.conv1.weight: file (128, 65, 1, 1)" in msg
  with pytest.raises(CheckpointError, match="shape mismatch"):  # a 1-channel file, 3-channel model
    C.convert_state_dict(sd, model, in_chans=3)
  with pytest.raises(CheckpointError, match="missing"):
    C.convert_state_dict(sd, model.clone(block_config=(2, 2, 2, 3)))
  head = C.convert_state_dict(sd, model.clone(num_classes=14), skip=("classifier",))
  assert "classifier" not in head["params"]


def test_converter_file_errors(tmp_path, monkeypatch):
  with pytest.raises(CheckpointError, match="does not exist"):
    C.load_state_dict(str(tmp_path / "absent.safetensors"))
  (tmp_path / "w.npz").write_bytes(b"x")
  with pytest.raises(CheckpointError, match="unknown weights format"):
    C.load_state_dict(str(tmp_path / "w.npz"))
  (tmp_path / "w.pt").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(CheckpointError, match=r"needs torch: pip install 'cxrjax\[torch\]'"):
    C.load_state_dict(str(tmp_path / "w.pt"))


# ----------------------------------------------------------------------------- torch parity
def _torch_densenet(block_config, num_classes, in_chans):
  """The torchvision-equivalent reference with non-trivial batch-norm parameters and statistics."""
  import torch
  from cxrjax.models.densenet_torch import build_torch_densenet

  torch.manual_seed(0)
  net = build_torch_densenet(block_config, num_classes, in_chans)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        # torch's default init, smaller than torchvision's Kaiming: in the small test network
        # the last blocks' batch norms see 16 values per channel, and with Kaiming weights they
        # amplify fp32 rounding to ~3e-4 of a gradient, above the 1e-4 the parity checks hold.
        m.reset_parameters()
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.3, 0.3)
        m.running_var.uniform_(0.5, 2.0)
  return net


def _save_both(net, tmp_path):
  import torch
  from safetensors.torch import save_file
  st, pt = str(tmp_path / "w.safetensors"), str(tmp_path / "w.pt")
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, st)
  torch.save(net.state_dict(), pt)
  return st, pt


def _torch_batch_stats(net) -> dict:
  return {k: v.numpy() for k, v in net.state_dict().items() if "running" in k}


def test_parity_small_eval_and_train(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  net = _torch_densenet(SMALL, num_classes=5, in_chans=1).eval()
  st, pt = _save_both(net, tmp_path)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 1)).astype(np.float32) * 50 + 120
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    ref_eval = net(xt).numpy()
  model = D.DenseNet(block_config=SMALL, num_classes=5)
  variables = C.convert_state_dict(C.load_state_dict(st), model)
  from_pt = C.convert_state_dict(C.load_state_dict(pt), model)
  jax.tree.map(np.testing.assert_array_equal, from_pt, variables)
  # One train-mode forward: batch statistics normalise, running stats move by momentum 0.1
  # with the unbiased variance (raw 0..255-scale input exercises the stem's statistics).
  net.train()
  with torch.no_grad():
    ref_train = net(xt).numpy()
  run = jax.jit(lambda v, x: (model.apply(v, x),
                              model.apply(v, x, train=True, mutable=["batch_stats"])))
  (logits, aux), ((train_logits, _), upd) = run(variables, x)
  np.testing.assert_allclose(logits, ref_eval, atol=1e-4, rtol=0)
  assert aux["features"].shape == (4, 128)
  np.testing.assert_allclose(train_logits, ref_train, atol=1e-4, rtol=0)
  got = _flax_to_torch({"params": {}, "batch_stats": upd["batch_stats"]})
  want = _torch_batch_stats(net)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_parity_small_train_gradients(tmp_path):
  # The gradient of a train-mode loss w.r.t. every parameter (BN through batch statistics,
  # max pool, concatenations, transitions) matches torch autograd's.
  torch = pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  net = _torch_densenet(SMALL, num_classes=5, in_chans=1).train()
  st, _ = _save_both(net, tmp_path)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 32, 32, 1)).astype(np.float32)
  weights = rng.normal(size=(4, 5)).astype(np.float32)
  out = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  (out * torch.from_numpy(weights)).sum().backward()
  want = {k: p.grad.numpy() for k, p in net.named_parameters()}
  model = D.DenseNet(block_config=SMALL, num_classes=5)
  variables = C.convert_state_dict(C.load_state_dict(st), model)

  def loss(params):
    (logits, _), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 x, train=True, mutable=["batch_stats"])
    return jnp.sum(logits * weights)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  got = _flax_to_torch({"params": grads, "batch_stats": {}})
  assert set(got) == set(want)
  for k in want:
    scale = np.abs(want[k]).max()
    np.testing.assert_allclose(got[k], want[k], atol=1e-4 * max(scale, 1.0), rtol=0, err_msg=k)


def test_parity_densenet121_eval(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  net = _torch_densenet(D.BLOCK_CONFIGS[121], num_classes=14, in_chans=3).eval()
  st, _ = _save_both(net, tmp_path)
  model, variables, extras = C.load_densenet(st)
  assert model.block_config == (6, 12, 24, 16) and extras["op_threshs"] is None
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(_apply(model)(variables, x)[0], ref, atol=1e-4, rtol=0)


def test_pickled_module_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "model.pt")
  torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), path)  # a pickled module, as xrv ships
  with pytest.raises(CheckpointError, match="weights_only=True"):
    C.load_state_dict(path)
