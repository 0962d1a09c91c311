"""Compiles the fitted stacking pipeline into one ONNX graph (training side; the runtime is
models.onnx_session, which needs only ONNX Runtime and NumPy).

The graph is written here node by node from the fitted trees and coefficients, rather than with
skl2onnx/onnxmltools' converters, because the converters evaluate every tree in float32 (inputs,
thresholds, leaves and sums): on rows near split thresholds that moves P(churn) by up to 0.28
against scikit-learn, and their double mode drops scikit-learn's float32 cast (0.017 on the data
itself). Parity to 1e-6 needs each learner evaluated with the arithmetic its own library uses at
predict time, which ONNX ``TreeEnsemble`` (ai.onnx.ml opset 5: splits, leaves, sums and output in
the input's type) can express exactly:

* scikit-learn trees (RandomForest, GradientBoosting's regression trees) cast X to float32, then
  compare ``x <= threshold`` against float64 thresholds and add float64 leaf values. Here: a Cast
  double->float->double in front of a double TreeEnsemble (BRANCH_LEQ). RF: sum of the trees'
  class-1 fractions in tree order, divided by n_trees (AVERAGE does exactly that). GB: the init
  estimator's log-odds first (a one-leaf tree), then ``learning_rate * value`` of every stage,
  in order, then 1 / (1 + exp(-raw)).
* XGBoost casts X to float32, compares ``x < split`` with float32 splits, adds float32 leaves to
  the float32 base margin tree by tree, then 1.0f / (expf(-m) + 1.0f). Here: a float32
  TreeEnsemble (BRANCH_LT) whose first tree is a single leaf holding the base margin (so the float32
  sum runs in XGBoost's order; the margins are bit-identical), exp in double rounded to float.
* LightGBM compares double features with double thresholds (``x <= threshold``) and adds double
  leaves. Here: a double TreeEnsemble on the uncast X, then 1 / (1 + exp(-raw)).
* The logistic learner (StandardScaler then LogisticRegression) and the meta-learner: Sub, Div,
  MatMul, Add, then 1 / (1 + exp(-z)) in double. The meta-learner's inputs are the base learners'
  log-odds (models.ensemble.LogOdds): Clip, then Log(p) - Log(1 - p), in double.

ONNX Runtime adds the trees in order for each row when it runs on one thread, so all tree sums are
bit-identical to the libraries'. What remains are last-ulp differences of exp (ONNX Runtime's
vectorised exp against libm's) and of the dot products (MLAS against BLAS): ~1e-16 in the double
parts, and one float32 ulp (6e-8) in the XGBoost probability of ~0.02% of rows. Measured: max
|p_compiled - p_sklearn| 2.4e-8 on the 10,000 rows for the full model; about 80% of rows are
bit-identical.

The meta-learner sees P(class 1) of each base learner in estimator order: scikit-learn's
StackingClassifier drops the first predict_proba column in the binary case.

Inputs of the graph: ``numeric`` (double, [N, 8], NUMERIC_FEATURES order) and one string tensor
[N] per categorical feature; the one-hot encoding with the schema's fixed categories is in the
graph (an unknown category is an error, as with ``handle_unknown="error"``). Outputs: ``p_churn``
(double, [N, 1]) and ``base_proba`` (double, [N, n_learners], the meta-learner's inputs).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper, numpy_helper

from models.onnx_session import BASE_OUTPUT, NUMERIC_INPUT, OUTPUT, CompiledModel
from models.schema import BY_NAME, CATEGORICAL_FEATURES, FEATURE_NAMES, NUMERIC_FEATURES

TOLERANCE = 1e-6

ONNX_OPSET = 21  # default domain
ML_OPSET = 5  # ai.onnx.ml: TreeEnsemble, whose splits, leaves and output have the input's type


class UnsupportedModelError(ValueError):
    """The pipeline has a step or learner this compiler does not know how to reproduce exactly."""


# ---------------------------------------------------------------- graph building helpers


class _Graph:
    """Accumulates nodes and initializers with deterministic, readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def name(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self, op: str, inputs: list[str], base: str, domain: str = "", out: str | None = None, **attrs: Any
    ) -> str:
        """Append a node with one output, named `out` if given (a reserved graph output name)."""
        out = out or self.name(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(f"{base}_node"), domain=domain, **attrs))
        return out


class _Trees:
    """Trees of one ensemble, accumulated in ONNX ``TreeEnsemble`` (ai.onnx.ml opset 5) layout.

    Interior nodes and leaves are separate lists; trees are kept in order, and ONNX Runtime sums
    (or averages) them in that order for each row when it runs on one thread.
    """

    _MODES: ClassVar[dict[str, int]] = {"BRANCH_LEQ": 0, "BRANCH_LT": 1}

    def __init__(self) -> None:
        self.roots: list[int] = []
        self.features: list[np.ndarray] = []
        self.modes: list[np.ndarray] = []
        self.splits: list[np.ndarray] = []
        self.true_ids: list[np.ndarray] = []
        self.true_leaf: list[np.ndarray] = []
        self.false_ids: list[np.ndarray] = []
        self.false_leaf: list[np.ndarray] = []
        self.leaf_weights: list[np.ndarray] = []
        self.n_nodes = 0
        self.n_leaves = 0

    def add(
        self,
        left: np.ndarray,
        right: np.ndarray,
        feature: np.ndarray,
        threshold: np.ndarray,
        leaf_value: np.ndarray,
        mode: str,
    ) -> None:
        """One tree in array form: node i is a leaf where left[i] < 0; leaf_value[i] is its output.

        Node 0 is the root. A branch sends x to left[i] when ``x[feature[i]] <mode> threshold[i]``.
        """
        left = np.asarray(left, dtype=np.int64)
        right = np.asarray(right, dtype=np.int64)
        is_leaf = left < 0
        if is_leaf[0]:  # a one-leaf tree: one node whose two branches reach the same leaf
            self.roots.append(self.n_nodes)
            self.features.append(np.zeros(1, np.int64))
            # Same mode as the other nodes: ONNX Runtime has a faster loop for single-mode ensembles.
            self.modes.append(np.full(1, self._MODES[mode], np.uint8))
            self.splits.append(np.zeros(1))
            for ids, leafs in ((self.true_ids, self.true_leaf), (self.false_ids, self.false_leaf)):
                ids.append(np.array([self.n_leaves], np.int64))
                leafs.append(np.ones(1, np.int64))
            self.leaf_weights.append(np.asarray(leaf_value)[:1])
            self.n_nodes += 1
            self.n_leaves += 1
            return
        branch = ~is_leaf
        # Position of every original node among this tree's branches or among its leaves.
        position = np.where(is_leaf, np.cumsum(is_leaf) - 1, np.cumsum(branch) - 1)
        offset = np.where(is_leaf, self.n_leaves, self.n_nodes)
        new_id = position + offset
        self.roots.append(self.n_nodes)
        self.features.append(np.asarray(feature, dtype=np.int64)[branch])
        self.modes.append(np.full(int(branch.sum()), self._MODES[mode], np.uint8))
        self.splits.append(np.asarray(threshold)[branch])
        self.true_ids.append(new_id[left[branch]])
        self.true_leaf.append(is_leaf[left[branch]].astype(np.int64))
        self.false_ids.append(new_id[right[branch]])
        self.false_leaf.append(is_leaf[right[branch]].astype(np.int64))
        self.leaf_weights.append(np.asarray(leaf_value)[is_leaf])
        self.n_nodes += int(branch.sum())
        self.n_leaves += int(is_leaf.sum())

    def add_constant(self, value: float, mode: str) -> None:
        """A one-leaf tree: how a base score enters the sum at the position its library adds it."""
        self.add(np.array([-1]), np.array([-1]), np.array([0]), np.array([0.0]), np.array([value]), mode)

    def node(self, g: _Graph, x: str, base: str, dtype: type, aggregate: str) -> str:
        """Emit a TreeEnsemble over x; splits, leaf weights, sums and output in dtype (x's type)."""
        cat = np.concatenate
        leaf_weights = cat(self.leaf_weights).astype(dtype)
        return g.node(
            "TreeEnsemble",
            [x],
            base,
            domain="ai.onnx.ml",
            n_targets=1,
            aggregate_function={"AVERAGE": 0, "SUM": 1}[aggregate],
            post_transform=0,
            tree_roots=self.roots,
            nodes_featureids=cat(self.features).tolist(),
            nodes_modes=numpy_helper.from_array(cat(self.modes), "nodes_modes"),
            nodes_splits=numpy_helper.from_array(cat(self.splits).astype(dtype), "nodes_splits"),
            nodes_truenodeids=cat(self.true_ids).tolist(),
            nodes_trueleafs=cat(self.true_leaf).tolist(),
            nodes_falsenodeids=cat(self.false_ids).tolist(),
            nodes_falseleafs=cat(self.false_leaf).tolist(),
            leaf_targetids=[0] * len(leaf_weights),
            leaf_weights=numpy_helper.from_array(leaf_weights, "leaf_weights"),
        )


def _logistic_fn(g: _Graph, z: str, name: str, out: str | None = None) -> str:
    """1 / (1 + exp(-z)) in double, the formula of scipy's expit and LightGBM's sigmoid.

    (ONNX Runtime's Sigmoid kernel is a different approximation: last-ulp differences in about
    half of the rows, against ~6% for its Exp.)
    """
    one = g.const(name + "_one", np.array(1.0))
    e = g.node("Exp", [g.node("Neg", [z], name + "_neg")], name + "_exp")
    return g.node("Div", [one, g.node("Add", [one, e], name + "_denominator")], name, out=out)


# ---------------------------------------------------------------- learners


def _check_binary(est: Any, what: str) -> None:
    classes = getattr(est, "classes_", None)
    if classes is None or len(classes) != 2 or list(classes) != [0, 1]:
        raise UnsupportedModelError(f"{what}: only binary classifiers with classes [0, 1] are supported")


def _sk_tree_arrays(tree: Any) -> tuple[np.ndarray, ...]:
    t = tree.tree_
    return t.children_left, t.children_right, t.feature, t.threshold, t.value


def _random_forest(g: _Graph, est: Any, x32d: str, name: str) -> str:
    # ForestClassifier.predict_proba: sum over trees (in order) of tree_.value (class fractions),
    # then / n_estimators; the meta-learner uses the class-1 column.
    trees = _Trees()
    for tree in est.estimators_:
        if tree.n_outputs_ != 1:
            raise UnsupportedModelError(f"{name}: multi-output trees are not supported")
        left, right, feat, thr, value = _sk_tree_arrays(tree)
        trees.add(left, right, feat, thr, value[:, 0, 1], "BRANCH_LEQ")
    return trees.node(g, x32d, name, np.float64, "AVERAGE")


def _gradient_boosting(g: _Graph, est: Any, x32d: str, n_features: int, name: str) -> str:
    # GradientBoostingClassifier: raw = init log-odds, then raw += learning_rate * value per stage
    # (in that order), P(1) = expit(raw).
    if est.estimators_.shape[1] != 1 or getattr(est, "loss", "log_loss") != "log_loss":
        raise UnsupportedModelError(f"{name}: only binary log_loss gradient boosting is supported")
    from sklearn.dummy import DummyClassifier

    if not (isinstance(est.init_, DummyClassifier) or est.init_ == "zero"):
        raise UnsupportedModelError(f"{name}: only the default (constant prior) init estimator is supported")
    # The init log-odds are the same for every row; take scikit-learn's own value.
    init = est._raw_predict_init(np.zeros((1, n_features), dtype=np.float32))
    trees = _Trees()
    trees.add_constant(float(init[0, 0]), "BRANCH_LEQ")
    scale = est.learning_rate
    for tree in est.estimators_[:, 0]:
        left, right, feat, thr, value = _sk_tree_arrays(tree)
        trees.add(left, right, feat, thr, scale * value[:, 0, 0], "BRANCH_LEQ")
    raw = trees.node(g, x32d, name + "_raw", np.float64, "SUM")
    return _logistic_fn(g, raw, name)


def _xgboost_base_margin(est: Any, trees_json: list[dict], n_features: int) -> float:
    """XGBoost's base margin (float32), checked against XGBoost's own margins.

    The model stores base_score as a probability; XGBoost turns it into a margin with
    ``-log(1 / p - 1)`` in float32. That value is checked (and, if libm and numpy disagree by an
    ulp, corrected) by replaying XGBoost's float32 sum on probe rows against its margin output.
    """
    import xgboost

    booster = est.get_booster()
    params = json.loads(booster.save_config())["learner"]["learner_model_param"]
    base_score = np.float32(np.ravel(json.loads(params["base_score"].replace("E", "e")))[0])
    with np.errstate(all="raise"):
        candidate = np.float32(-np.log(np.float32(1.0) / base_score - np.float32(1.0)))
    # Probe rows spread over every feature's split values.
    rng = np.random.default_rng(0)
    splits = [[] for _ in range(n_features)]
    for t in trees_json:
        for left, f, c in zip(t["left_children"], t["split_indices"], t["split_conditions"], strict=True):
            if left >= 0:
                splits[f].append(c)
    probe = np.zeros((64, n_features), dtype=np.float32)
    for f, values in enumerate(splits):
        if values:
            probe[:, f] = rng.choice(np.array(values, dtype=np.float32), 64) + rng.normal(0, 1e-3, 64).astype(
                np.float32
            )
    dmatrix = xgboost.DMatrix(probe, feature_names=booster.feature_names, feature_types=booster.feature_types)
    expected = booster.predict(dmatrix, output_margin=True).astype(np.float32)
    leaf_ids = booster.predict(dmatrix, pred_leaf=True).astype(np.int64).reshape(len(probe), -1)
    leaves = np.stack(
        [np.asarray(t["split_conditions"], np.float32)[leaf_ids[:, j]] for j, t in enumerate(trees_json)], axis=1
    )
    for step in (0, -1, 1, -2, 2):
        base = candidate
        for _ in range(abs(step)):
            base = np.nextafter(base, np.float32(np.inf if step > 0 else -np.inf))
        margin = np.full(len(probe), base, dtype=np.float32)
        for j in range(leaves.shape[1]):
            margin = margin + leaves[:, j]  # float32 + float32, one tree at a time
        if np.array_equal(margin, expected):
            return float(base)
    raise UnsupportedModelError("xgboost: could not reproduce the booster's margins exactly")


def _xgboost(g: _Graph, est: Any, x32: str, n_features: int, name: str) -> str:
    booster = est.get_booster()
    model = json.loads(booster.save_raw("json"))["learner"]
    if model["objective"]["name"] != "binary:logistic":
        raise UnsupportedModelError(f"{name}: objective {model['objective']['name']!r} is not supported")
    gbm = model["gradient_booster"]
    if gbm.get("name") != "gbtree" or model["learner_model_param"].get("num_target", "1") != "1":
        raise UnsupportedModelError(f"{name}: only single-target gbtree boosters are supported")
    trees_json = gbm["model"]["trees"]
    if any(info != 0 for info in gbm["model"]["tree_info"]):
        raise UnsupportedModelError(f"{name}: multi-class boosters are not supported")
    best = getattr(est, "best_iteration", None)
    if best is not None and best + 1 != len(trees_json):
        raise UnsupportedModelError(f"{name}: early-stopped boosters (best_iteration) are not supported")
    trees = _Trees()
    # XGBoost starts every row's float32 sum at the base margin: a one-leaf first tree does the same.
    trees.add_constant(_xgboost_base_margin(est, trees_json, n_features), "BRANCH_LT")
    for t in trees_json:
        if any(t["split_type"]) or t["categories"]:
            raise UnsupportedModelError(f"{name}: categorical splits are not supported")
        if int(t["tree_param"].get("size_leaf_vector", "1")) > 1:
            raise UnsupportedModelError(f"{name}: vector leaves are not supported")
        left = np.array(t["left_children"], dtype=np.int64)
        # For leaves, split_conditions holds the leaf value (float32 in the model).
        cond = np.array(t["split_conditions"], dtype=np.float32)
        trees.add(left, np.array(t["right_children"]), np.array(t["split_indices"]), cond, cond, "BRANCH_LT")
    margin = trees.node(g, x32, name + "_margin", np.float32, "SUM")
    # XGBoost's transform is 1.0f / (expf(-margin) + 1.0f) in float32. ONNX Runtime's float
    # Sigmoid (and its float Exp) are approximations a few float ulps away from that; exp in
    # double rounded to float is libm's expf in all but ~0.02% of inputs (then 1 ulp away).
    neg = g.node(
        "Cast", [g.node("Neg", [margin], name + "_neg_margin")], name + "_neg_margin_f64", to=TensorProto.DOUBLE
    )
    exp32 = g.node("Cast", [g.node("Exp", [neg], name + "_exp_f64")], name + "_exp", to=TensorProto.FLOAT)
    one = g.const(name + "_one", np.array(1.0, dtype=np.float32))
    proba32 = g.node("Div", [one, g.node("Add", [exp32, one], name + "_denominator")], name + "_f32")
    return g.node("Cast", [proba32], name, to=TensorProto.DOUBLE)


def _lightgbm(g: _Graph, est: Any, x: str, name: str) -> str:
    booster = est.booster_
    dump = booster.dump_model()
    objective = str(dump.get("objective", ""))
    parts = objective.split()
    if not parts or parts[0] != "binary" or dump["num_tree_per_iteration"] != 1:
        raise UnsupportedModelError(f"{name}: only binary LightGBM models are supported (got {objective!r})")
    sigmoid = 1.0
    for p in parts[1:]:
        if p.startswith("sigmoid:"):
            sigmoid = float(p.split(":", 1)[1])
    if dump.get("average_output"):
        raise UnsupportedModelError(f"{name}: random-forest mode (average_output) is not supported")
    n_iter = est.best_iteration_ if getattr(est, "best_iteration_", None) else len(dump["tree_info"])
    trees = _Trees()
    for info in dump["tree_info"][:n_iter]:
        left: list[int] = []
        right: list[int] = []
        feat: list[int] = []
        thr: list[float] = []
        val: list[float] = []

        def visit(node: dict, left=left, right=right, feat=feat, thr=thr, val=val) -> int:
            i = len(left)
            left.append(-1)
            right.append(-1)
            if "split_index" not in node:
                feat.append(0)
                thr.append(0.0)
                val.append(float(node["leaf_value"]))
                return i
            if node["decision_type"] != "<=" or node["missing_type"] == "Zero":
                raise UnsupportedModelError(
                    f"{name}: split {node['decision_type']!r} with missing type {node['missing_type']!r} "
                    "is not supported"
                )
            feat.append(int(node["split_feature"]))
            thr.append(float(node["threshold"]))
            val.append(0.0)
            left[i] = visit(node["left_child"])
            right[i] = visit(node["right_child"])
            return i

        visit(info["tree_structure"])
        trees.add(np.array(left), np.array(right), np.array(feat), np.array(thr), np.array(val), "BRANCH_LEQ")
    raw = trees.node(g, x, name + "_raw", np.float64, "SUM")
    if sigmoid != 1.0:
        raw = g.node("Mul", [raw, g.const(name + "_sigmoid", np.array([sigmoid]))], name + "_scaled")
    return _logistic_fn(g, raw, name)


def _logistic(g: _Graph, est: Any, x: str, name: str) -> str:
    """LogisticRegression, optionally behind a StandardScaler in a Pipeline; returns P(1) [N, 1]."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [s for _, s in est.steps if s not in (None, "passthrough")] if isinstance(est, Pipeline) else [est]
    *pre, lr = steps
    if not isinstance(lr, LogisticRegression) or lr.coef_.shape[0] != 1:
        raise UnsupportedModelError(f"{name}: expected a binary LogisticRegression as the last step")
    for step in pre:
        if not isinstance(step, StandardScaler):
            raise UnsupportedModelError(f"{name}: unsupported step {type(step).__name__} before the regression")
        if step.mean_ is not None and step.with_mean:
            x = g.node("Sub", [x, g.const(name + "_mean", step.mean_.astype(np.float64))], name + "_centered")
        if step.scale_ is not None and step.with_std:
            x = g.node("Div", [x, g.const(name + "_scale", step.scale_.astype(np.float64))], name + "_scaled")
    return _linear_proba(g, lr, x, name)


def _linear_proba(g: _Graph, lr: Any, x: str, name: str, out: str | None = None) -> str:
    coef = g.const(name + "_coef", lr.coef_.astype(np.float64).T.copy())
    intercept = g.const(name + "_intercept", np.asarray(lr.intercept_, dtype=np.float64))
    decision = g.node("Add", [g.node("MatMul", [x, coef], name + "_dot"), intercept], name + "_decision")
    return _logistic_fn(g, decision, name, out)


# ---------------------------------------------------------------- the pipeline


def _check_preprocessing(prep: Any) -> None:
    """The ColumnTransformer must be: numeric columns passed through, then the fixed one-hot."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

    if not isinstance(prep, ColumnTransformer):
        raise UnsupportedModelError("the first step must be the ColumnTransformer from models.ensemble")
    fitted = [(n, t, c) for n, t, c in prep.transformers_ if n != "remainder" or t != "drop"]
    if len(fitted) != 2:
        raise UnsupportedModelError(f"unexpected transformers in preprocessing: {[n for n, _, _ in fitted]}")
    (_, num_t, num_cols), (_, cat_t, cat_cols) = fitted
    # A fitted "passthrough" is an identity FunctionTransformer.
    identity = num_t == "passthrough" or (isinstance(num_t, FunctionTransformer) and num_t.func is None)
    if not identity or list(num_cols) != list(NUMERIC_FEATURES):
        raise UnsupportedModelError("preprocessing must pass NUMERIC_FEATURES through unchanged, in schema order")
    if not isinstance(cat_t, OneHotEncoder) or list(cat_cols) != list(CATEGORICAL_FEATURES):
        raise UnsupportedModelError("preprocessing must one-hot encode CATEGORICAL_FEATURES in schema order")
    if cat_t.drop_idx_ is not None:
        raise UnsupportedModelError("one-hot encoding with drop= is not supported")
    for feature, cats in zip(CATEGORICAL_FEATURES, cat_t.categories_, strict=True):
        if tuple(str(c) for c in cats) != BY_NAME[feature].categories:
            raise UnsupportedModelError(f"one-hot categories of {feature} differ from the schema")
    expected = [*NUMERIC_FEATURES, *(f"{c}_{v}" for c in CATEGORICAL_FEATURES for v in BY_NAME[c].categories)]
    if list(prep.get_feature_names_out()) != expected:
        raise UnsupportedModelError(f"preprocessing output columns {list(prep.get_feature_names_out())} != {expected}")


def _learner_names(stack: Any) -> list[str]:
    """Names of the fitted base learners, in the order of stack.estimators_ (dropped ones left out)."""
    return [name for name, est in stack.estimators if not (isinstance(est, str) and est == "drop")]


def _base_learner(g: _Graph, est: Any, name: str, x: str, x32: str, x32d: str, n_features: int) -> str:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    _check_binary(est, name)
    if isinstance(est, RandomForestClassifier):
        return _random_forest(g, est, x32d, name)
    if isinstance(est, GradientBoostingClassifier):
        return _gradient_boosting(g, est, x32d, n_features, name)
    if isinstance(est, Pipeline | LogisticRegression):
        return _logistic(g, est, x, name)
    module = type(est).__module__
    if module.startswith("xgboost") and type(est).__name__ == "XGBClassifier":
        return _xgboost(g, est, x32, n_features, name)
    if module.startswith("lightgbm") and type(est).__name__ == "LGBMClassifier":
        return _lightgbm(g, est, x, name)
    raise UnsupportedModelError(f"{name}: no exact ONNX translation for {type(est).__name__}")


def _meta_learner(final: Any) -> tuple[Any, Any]:
    """(LogisticRegression, LogOdds step or None) of the stack's final estimator: a binary
    LogisticRegression, alone or behind models.ensemble.LogOdds in a Pipeline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from models.ensemble import LogOdds

    log_odds = None
    if isinstance(final, Pipeline):
        steps = [s for _, s in final.steps if s not in (None, "passthrough")]
        if len(steps) != 2 or type(steps[0]) is not LogOdds:
            raise UnsupportedModelError("a Pipeline meta-learner must be LogOdds then LogisticRegression")
        log_odds, final = steps
        if not 0 < log_odds.eps < 0.5:
            raise UnsupportedModelError(f"LogOdds eps {log_odds.eps} must be in (0, 0.5)")
    if not isinstance(final, LogisticRegression) or final.coef_.shape[0] != 1:
        raise UnsupportedModelError("the meta-learner must be a binary LogisticRegression")
    return final, log_odds


def compile_pipeline(pipeline: Any) -> bytes:
    """The fitted Pipeline (models.ensemble.build_pipeline) as a serialized ONNX model.

    Deterministic: the same fitted pipeline always gives the same bytes.
    """
    from sklearn.ensemble import StackingClassifier

    steps = dict(pipeline.steps)
    prep, stack = steps.get("prep"), steps.get("stack")
    if len(pipeline.steps) != 2 or not isinstance(stack, StackingClassifier):
        raise UnsupportedModelError("expected Pipeline([('prep', ColumnTransformer), ('stack', StackingClassifier)])")
    _check_preprocessing(prep)
    _check_binary(stack, "stack")
    if stack.passthrough:
        raise UnsupportedModelError("StackingClassifier(passthrough=True) is not supported")
    final, log_odds = _meta_learner(stack.final_estimator_)

    g = _Graph()
    for name in (NUMERIC_INPUT, *CATEGORICAL_FEATURES, OUTPUT, BASE_OUTPUT):
        g.name(name)
    parts = [NUMERIC_INPUT]
    for feature in CATEGORICAL_FEATURES:
        onehot = g.node(
            "OneHotEncoder",
            [feature],
            f"{feature}_onehot_f32",
            domain="ai.onnx.ml",
            cats_strings=list(BY_NAME[feature].categories),
            zeros=0,  # unknown category -> error, like handle_unknown="error"
        )
        parts.append(g.node("Cast", [onehot], f"{feature}_onehot", to=TensorProto.DOUBLE))
    x = g.node("Concat", parts, "X", axis=1)
    n_features = len(NUMERIC_FEATURES) + sum(len(BY_NAME[c].categories) for c in CATEGORICAL_FEATURES)
    if n_features != stack.n_features_in_:
        raise UnsupportedModelError(
            f"the stack expects {stack.n_features_in_} features, preprocessing gives {n_features}"
        )
    # scikit-learn trees see float32(X) compared in double; XGBoost sees float32(X).
    x32 = g.node("Cast", [x], "X_f32", to=TensorProto.FLOAT)
    x32d = g.node("Cast", [x32], "X_f32_as_f64", to=TensorProto.DOUBLE)

    base = []
    names = _learner_names(stack)
    for name, est, method in zip(names, stack.estimators_, stack.stack_method_, strict=True):
        if method != "predict_proba":
            raise UnsupportedModelError(f"{name}: stack_method {method!r} is not supported")
        base.append(_base_learner(g, est, name, x, x32, x32d, n_features))
    g.nodes.append(helper.make_node("Concat", base, [BASE_OUTPUT], name=g.name("base_concat"), axis=1))
    meta_in = BASE_OUTPUT
    if log_odds is not None:
        # LogOdds.transform: clip to [eps, 1 - eps], then log(p) - log(1 - p), all in double.
        lo, hi = (
            g.const("meta_clip_min", np.array(log_odds.eps)),
            g.const("meta_clip_max", np.array(1.0 - log_odds.eps)),
        )
        p = g.node("Clip", [BASE_OUTPUT, lo, hi], "meta_clipped")
        one = g.const("meta_one", np.array(1.0))
        log_p = g.node("Log", [p], "meta_log_p")
        log_q = g.node("Log", [g.node("Sub", [one, p], "meta_q")], "meta_log_q")
        meta_in = g.node("Sub", [log_p, log_q], "meta_log_odds")
    _linear_proba(g, final, meta_in, "meta", out=OUTPUT)

    inputs = [helper.make_tensor_value_info(NUMERIC_INPUT, TensorProto.DOUBLE, ["N", len(NUMERIC_FEATURES)])]
    inputs += [helper.make_tensor_value_info(f, TensorProto.STRING, ["N"]) for f in CATEGORICAL_FEATURES]
    outputs = [
        helper.make_tensor_value_info(OUTPUT, TensorProto.DOUBLE, ["N", 1]),
        helper.make_tensor_value_info(BASE_OUTPUT, TensorProto.DOUBLE, ["N", len(base)]),
    ]
    graph = helper.make_graph(g.nodes, "churn_stacking_pipeline", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
        producer_name="bank-churn training.onnx_export",
        producer_version="1",
        doc_string="Bank churn stacking pipeline; inputs: numeric (double, NUMERIC_FEATURES order), "
        + ", ".join(f"{c} (string)" for c in CATEGORICAL_FEATURES)
        + "; output p_churn = P(Exited=1).",
    )
    model.ir_version = 10
    helper.set_model_props(
        model,
        {
            "numeric_features": json.dumps(list(NUMERIC_FEATURES)),
            "categorical_features": json.dumps(list(CATEGORICAL_FEATURES)),
            "base_learners": json.dumps(names),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString(deterministic=True)


def _sklearn_proba(pipeline: Any, frame: pd.DataFrame) -> np.ndarray:
    return pipeline.predict_proba(frame[list(FEATURE_NAMES)])[:, 1]


def parity_report(pipeline: Any, compiled: CompiledModel, frame: pd.DataFrame, threshold: float) -> dict:
    """Compare compiled and scikit-learn P(churn) on every row of frame; decisions are p >= threshold."""
    expected = _sklearn_proba(pipeline, frame)
    got = compiled.predict_proba_frame(frame)
    diff = np.abs(got - expected)
    mismatches = int(np.count_nonzero((got >= threshold) != (expected >= threshold)))
    max_diff = float(diff.max()) if len(diff) else 0.0
    return {
        "rows": len(frame),
        "max_abs_diff": max_diff,
        "mean_abs_diff": float(diff.mean()) if len(diff) else 0.0,
        "decision_mismatches": mismatches,
        "passed": bool(max_diff <= TOLERANCE and mismatches == 0 and np.isfinite(got).all()),
        "tolerance": TOLERANCE,
    }


def learner_parity(pipeline: Any, compiled: CompiledModel, frame: pd.DataFrame) -> dict[str, float]:
    """Max |compiled - scikit-learn| of each base learner's P(1) (the meta-learner's inputs)."""
    stack = pipeline.named_steps["stack"]
    x = pipeline.named_steps["prep"].transform(frame[list(FEATURE_NAMES)])
    expected = stack.transform(x)
    got = compiled.base_probas_frame(frame)
    names = _learner_names(stack)
    return {n: float(np.abs(got[:, i] - expected[:, i]).max()) for i, n in enumerate(names)}
