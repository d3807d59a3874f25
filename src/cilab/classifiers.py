"""Classifiers on the learned features, keyed by ``eval.classifiers``.

All share one small interface: ``fit(FitData)`` then ``predict(features)``,
where features are the raw 64-d outputs of ``model.features``. Every
classifier of a run is evaluated on the same test features, extracted once
per task. Those fitted on exemplars (all but ``fc``) see L2-normalised
features and only the exemplars, so their classes are balanced (the study,
section 4.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .registry import Registry

CLASSIFIERS: Registry = Registry("classifier")


@dataclass
class FitData:
    features: torch.Tensor  # exemplar features (raw), E x d
    labels: torch.Tensor  # their output indices
    head: torch.nn.Module  # the network's linear head
    n_seen: int  # classes seen so far: outputs [0, n_seen)
    seed: int = 0
    # features of the horizontally flipped exemplars, row i = flip of row i of
    # ``features`` (None: no flips); only NME's class means use them (iCaRL).
    flipped_features: torch.Tensor | None = None


class Classifier:
    needs_memory = True
    uses_flipped_exemplars = False  # fit reads FitData.flipped_features (extracted only if some classifier does)
    config_key: str | None = None  # the eval.<key> sub-section the constructor takes

    def __init__(self, cfg=None):
        self.cfg = cfg

    @property
    def may_predict_unseen(self) -> bool:
        """True when a prediction can be an output >= n_seen (a class not seen yet)."""
        return False

    def settings(self) -> dict:
        """What this classifier computed, recorded beside its accuracies in metrics.json."""
        return {}

    def fit(self, data: FitData) -> None:
        """Fit on the exemplars. Randomness comes from ``data.seed`` alone, never from torch's
        global random streams: training goes on from those after the evaluation, and a run that
        only adds a classifier is evaluated from another run's checkpoints (cilab.reevaluate)."""
        raise NotImplementedError

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def build_classifier(name: str, eval_cfg) -> Classifier:
    cls = CLASSIFIERS[name]
    return cls(getattr(eval_cfg, cls.config_key) if cls.config_key else None)


# eval.fc_scope -> how many of the head's outputs the arg-max runs over, given (head outputs, n_seen)
FC_SCOPES = {
    "all": lambda n_outputs, n_seen: n_outputs,
    "seen": lambda n_outputs, n_seen: n_seen,
}


@CLASSIFIERS.register("fc")
class FCClassifier(Classifier):
    """The network's own head (iCaRL's "hybrid1"): ``argmax_k z_k(x)``.

    ``eval.fc_scope`` says over which outputs k:
    - ``all`` (the study): every output of the head (100 on CIFAR-100), so an
      image can be put in a class that has not been taught yet, and counts as
      an error; the study's notebooks take ``argmax`` of the whole output vector;
    - ``seen``: only outputs [0, n_seen), the classes seen so far, the usual
      class-incremental protocol (an untrained output can never win).
    The two differ only while an unseen output beats every seen one, which
    happens early on with losses that do not push unseen outputs down (CE).
    """

    needs_memory = False
    config_key = "fc_scope"

    def fit(self, data: FitData) -> None:
        self.head, self.n_seen = data.head, data.n_seen

    @property
    def may_predict_unseen(self) -> bool:
        return self.cfg == "all"

    def settings(self) -> dict:
        return {"scope": self.cfg}

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.head(features.float())
        return logits[:, : FC_SCOPES[self.cfg](logits.shape[1], self.n_seen)].argmax(1)


@CLASSIFIERS.register("nme")
class NMEClassifier(Classifier):
    """Nearest mean of exemplars (iCaRL, Rebuffi et al. 2017, algorithm 1).

    The mean of class y over its exemplars P_y, as iCaRL's published code
    computes it, on the exemplars and on their horizontal flips:

        mu_y = normalize( 1/(2|P_y|) * sum_{p in P_y} [ phi(p)/|phi(p)| + phi(flip p)/|phi(flip p)| ] )

    each feature L2-normalised before averaging, the mean normalised again.
    A test feature, normalised, goes to the nearest mean; on unit vectors the
    nearest mean is the one with the largest dot product, so prediction is one
    matrix product and an arg-max on the device. Without flipped features
    (``FitData.flipped_features`` None) the mean is over the exemplars alone.
    """

    uses_flipped_exemplars = True

    def fit(self, data: FitData) -> None:
        f = F.normalize(data.features.float(), dim=1)
        labels = data.labels
        if data.flipped_features is not None:
            f = torch.cat([f, F.normalize(data.flipped_features.float(), dim=1)])
            labels = torch.cat([labels, labels])
        self.with_flips = data.flipped_features is not None
        sums = torch.zeros(data.n_seen, f.shape[1], device=f.device).index_add_(0, labels, f)
        counts = torch.bincount(labels, minlength=data.n_seen).clamp_min(1)
        self.means = F.normalize(sums / counts[:, None], dim=1)

    def settings(self) -> dict:
        return {"class_means": "exemplars and their horizontal flips" if self.with_flips else "exemplars"}

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return (F.normalize(features.float(), dim=1) @ self.means.T).argmax(1)


class SklearnClassifier(Classifier):
    """Fit a scikit-learn estimator on the exemplars' normalised features (on the CPU)."""

    def make(self, seed: int):
        raise NotImplementedError

    def fit(self, data: FitData) -> None:
        x = F.normalize(data.features.float(), dim=1).cpu().numpy()
        self.est = self.make(data.seed).fit(x, data.labels.cpu().numpy())

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features.float(), dim=1).cpu().numpy()
        return torch.as_tensor(np.asarray(self.est.predict(x)), dtype=torch.int64, device=features.device)


@CLASSIFIERS.register("knn")
class KNNClassifier(SklearnClassifier):
    """k nearest exemplars vote (the study: k=5)."""

    config_key = "knn"

    def make(self, seed):
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(n_neighbors=self.cfg.k)


@CLASSIFIERS.register("svm")
class SVMClassifier(SklearnClassifier):
    """Support vector machine (the study: RBF kernel, C=1)."""

    config_key = "svm"

    def make(self, seed):
        from sklearn.svm import SVC

        return SVC(kernel=self.cfg.kernel, C=self.cfg.C, random_state=seed)


@CLASSIFIERS.register("mlp")
class MLPClassifierOnFeatures(SklearnClassifier):
    """One hidden ReLU layer trained with Adam (the study: lr 1e-3, 200 epochs)."""

    config_key = "mlp"

    def make(self, seed):
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        # 200 epochs is the study's fixed budget, not a convergence criterion.
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        return MLPClassifier(
            hidden_layer_sizes=(self.cfg.hidden,), activation="relu", solver="adam",
            learning_rate_init=self.cfg.lr, max_iter=self.cfg.epochs, random_state=seed,
        )
