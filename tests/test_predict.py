"""--predict: few-shot prediction on a user's own images, for every script. It must agree with the
evaluation code on the same episode, need no training data, and write nothing into the user's folders."""

import argparse
import csv
import shutil

import numpy as np
import pytest
import torch

import anil
import data
import maml
import nil
import reptile
from conftest import _drawing

WAYS = 3


def user_folders(root, classes=WAYS, shots=2, queries=2, seed=1):
    """root/support/<class>/*.png and root/query/<class>/*.png: drawings, as a user would bring them."""
    rng = np.random.default_rng(seed)
    for part, n in (("support", shots), ("query", queries)):
        for c in range(classes):
            d = root / part / f"letter{c}"
            d.mkdir(parents=True)
            for i in range(n):
                _drawing(rng).save(d / f"{i}.png")
    return root / "support", root / "query"


def listing(*folders):
    return sorted(str(p) for f in folders for p in f.rglob("*"))


TRAIN = {"maml": maml.main, "anil": anil.main, "nil": anil.main, "reptile": reptile.main}
PREDICT = {"maml": maml.main, "anil": anil.main, "nil": nil.main, "reptile": reptile.main}


@pytest.mark.parametrize("script", ["maml", "anil", "nil", "reptile"])
def test_predict_agrees_with_the_evaluation_code_needs_no_data_and_writes_nothing(script, omniglot_dir, tmp_path):
    ckpt, out = tmp_path / "m.pt", tmp_path / "preds.csv"
    tiny = ["--iterations", "2", "--meta-batch-size", "2", "--val-tasks", "2", "--test-tasks", "2"]
    if script == "reptile":     # the fixture has 4 drawings per character
        tiny += ["--train-shots", "2", "--inner-steps", "3", "--inner-batch", "3", "--eval-steps", "2",
                 "--eval-inner-batch", "3"]
    TRAIN[script](["--dataset", "omniglot", "--data-dir", str(omniglot_dir), "--ways", str(WAYS), *tiny,
                   "--save", str(ckpt)])
    shutil.rmtree(omniglot_dir)                                  # no training data from here on
    support, query = user_folders(tmp_path / "mine")
    before = listing(support, query)
    r = PREDICT[script](["--load", str(ckpt), "--support", str(support), "--predict", str(query), "--out", str(out)])
    assert listing(support, query) == before
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows] == [p["image"] for p in r["predictions"]] and len(rows) == WAYS * 2
    assert all(row["class"] in r["classes"] and 0 < float(row["probability"]) <= 1 for row in rows)
    # the same episode through the evaluation code
    sets = data.load_prediction_sets(support, [str(query)], 28, 1, True)
    x_s, x_q = (x[None].float() / 255 for x in (sets.x_support, sets.x_query))
    episode = [(x_s, sets.y_support[None], x_q, sets.y_query[None])]
    saved = torch.load(ckpt)
    cfg, params = argparse.Namespace(**saved["config"]), saved["params"]
    problem = maml.make_problem(cfg, torch.device("cpu"), {})
    if script == "reptile":
        expected = reptile.adaptation_curve(params, problem, episode, cfg, saved["inner_state"], ["transductive"],
                                            cfg.seed)["transductive"][-1, 0]
    elif script == "nil":
        expected = nil.nil_accuracy(params, problem, anil.make_net(cfg, problem), episode, WAYS, cfg.bn_mode)[0]
    else:
        problem.forward = anil.make_net(cfg, problem)
        expected = maml.adaptation_curve(params, problem, episode, cfg.inner_lr, cfg.eval_steps, cfg.bn_mode,
                                         anil.adapt if script == "anil" else maml.adapt)[-1, 0]
    assert r["accuracy"] == pytest.approx(float(expected), abs=1e-6)
    assert r["accuracy"] == pytest.approx(np.mean([row["class"] == row["image"].split("/")[-2] for row in rows]))


def test_predict_refuses_a_support_set_that_does_not_fit_the_head(omniglot_dir, tmp_path):
    ckpt = tmp_path / "m.pt"
    maml.main(["--dataset", "omniglot", "--data-dir", str(omniglot_dir), "--ways", str(WAYS), "--iterations", "1",
               "--meta-batch-size", "2", "--val-tasks", "2", "--test-tasks", "2", "--save", str(ckpt)])
    support, query = user_folders(tmp_path / "mine", classes=WAYS + 1)
    with pytest.raises(SystemExit, match=f"has {WAYS + 1} classes, but the model's head has {WAYS}"):
        maml.main(["--load", str(ckpt), "--support", str(support), "--predict", str(query)])
    r = nil.main(["--load", str(ckpt), "--support", str(support), "--predict", str(query)])   # NIL has no head
    assert len(r["classes"]) == WAYS + 1
    with pytest.raises(SystemExit, match="--predict IMAGES needs --support DIR and --load"):
        maml.main(["--predict", str(query)])
    with pytest.raises(SystemExit, match="no such image or folder"):
        maml.main(["--load", str(ckpt), "--support", str(support), "--predict", str(tmp_path / "nope.png")])


def test_an_empty_class_folder_is_refused_not_dropped(omniglot_dir, folder_dir, tmp_path):
    """A class folder the user laid out without images must not vanish from the classes."""
    ckpt = tmp_path / "m.pt"
    maml.main(["--dataset", "omniglot", "--data-dir", str(omniglot_dir), "--ways", str(WAYS), "--iterations", "1",
               "--meta-batch-size", "2", "--val-tasks", "2", "--test-tasks", "2", "--save", str(ckpt)])
    support, query = user_folders(tmp_path / "mine", classes=WAYS - 1)
    (support / "letter_forgotten").mkdir()
    for main in (maml.main, nil.main):          # NIL takes any number of classes: it would have run
        with pytest.raises(SystemExit, match="letter_forgotten: no images"):
            main(["--load", str(ckpt), "--support", str(support), "--predict", str(query)])
    (folder_dir / "group0" / "class_empty").mkdir()
    with pytest.raises(data.DataError, match="class_empty: no images"):
        data.load_image_folder_classes(folder_dir)


@pytest.mark.parametrize("script", ["maml", "anil", "nil", "reptile"])
def test_a_checkpoint_with_nan_parameters_is_refused_before_use(script, omniglot_dir, tmp_path):
    """argmax of NaN logits is class 0: such a model would print an accuracy (or NaN probabilities)
    and exit 0. Every way of using it must stop first."""
    ckpt = tmp_path / "m.pt"
    tiny = ["--iterations", "1", "--meta-batch-size", "2", "--val-tasks", "2", "--test-tasks", "2"]
    if script == "reptile":
        tiny += ["--train-shots", "2", "--inner-steps", "3", "--inner-batch", "3", "--eval-steps", "2",
                 "--eval-inner-batch", "3"]
    TRAIN[script](["--dataset", "omniglot", "--data-dir", str(omniglot_dir), "--ways", str(WAYS), *tiny,
                   "--save", str(ckpt)])
    state = torch.load(ckpt)
    state["params"]["fc.w"][0, 0] = float("nan")
    torch.save(state, ckpt)
    support, query = user_folders(tmp_path / "mine")
    for argv in (["--eval-only", "--load", str(ckpt)], ["--load", str(ckpt), "--support", str(support),
                                                        "--predict", str(query)],
                 ["--resume", str(ckpt), "--iterations", "2"]):
        if script == "nil" and argv[0] == "--resume":
            continue                             # nil.py does not train
        with pytest.raises(SystemExit, match=r"non-finite parameters \(fc.w\)"):
            PREDICT[script](argv)
