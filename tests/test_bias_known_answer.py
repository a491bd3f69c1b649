"""Known answer for the bias analysis (issue 4, spec B.6) on the phantom world.

Two identical small CNNs train on 600 phantoms to predict the 14 labels: one on a world where the
shortcut token is drawn exactly on the studies with a pleural effusion (shortcut_strength 1),
one where the token is drawn at random (strength 0). Both are probed on the same 400 test
phantoms, where the token is random. The bias score of "token vs no token" on their pooled
features must rank the model that could (and did) lean on the token above the one that could
not. Measured (2 CPU cores, ~30 s): 150.0 vs 0.0 (146.4 before the phantoms' mild signs were
made borderline); the bars leave room for renderer changes.
"""

import numpy as np

from cxrjax.core.mesh import create_mesh
from cxrjax.core.predict import sharded_map
from cxrjax.data.phantoms.attributes import PhantomConfig
from cxrjax.evaluate.bias import Comparison, analyse_bias
from cxrjax.models.small_cnn import SmallCNN
from cxrjax.tasks.small_cnn import standardize, train_cnn
from launch_util import load_benchmark



def test_bias_score_ranks_the_shortcut_model_above_the_clean_one(tmp_path):
  pl = load_benchmark("phantom_learnability")
  worlds = {s: PhantomConfig(shortcut_label="Pleural Effusion", shortcut_strength=s)
            for s in (1.0, 0.0)}
  test = pl.make_split(0, np.arange(50_000, 50_400), 64, worlds[0.0])
  token = np.where(test["shortcut"] > 0.5, "token", "none")
  assert 50 < (token == "token").sum() < 350  # both groups well populated
  model = SmallCNN(widths=(8, 16, 32, 64), convs_per_stage=(1, 1, 2, 2))
  features = lambda batch, params: model.apply(
      {"params": params}, standardize(batch["x"]), return_features=True)[1]
  scores = {}
  for strength, world in worlds.items():
    train = pl.make_split(0, np.arange(600), 64, world)
    params = train_cnn(train["images"], pl.training_targets(train, "truth"), model=model,
                       steps=300, batch_size=32, seed=0, workdir=str(tmp_path / f"s{strength}"),
                       name=f"cnn_shortcut_{strength}")
    x = sharded_map(features, {"x": test["images"]}, create_mesh(), batch_size=200, params=params)
    result = analyse_bias(np.asarray(x), {"token": token},
                          comparisons=(Comparison("token", "token", "none"),),
                          balance_key=None, n_simulations=0)
    scores[strength] = result.combined
  assert scores[1.0] >= 100, scores  # the token shows in the leading PCA modes
  assert scores[1.0] > scores[0.0] + 50, scores
