"""Testbeds with known features: toy models of superposition (Elhage et al. 2022) and
synthetic activations built from known directions, with scores against the truth.

    from saelab.toys import Instances, train_toy, measure
    inst = Instances.grid(20, [0.0, 0.9], importance_decay=0.7)   # n=20 features
    model, _ = train_toy(inst, d_hidden=5)
    measure(model.W_IFH).n_represented                            # tensor([5, 9])
"""

from saelab.toys.measures import ToyMeasures, measure, second_feature_phase
from saelab.toys.model import Instances, ToyModel, expected_loss, train_toy
from saelab.toys.recovery import (
    DirectionRecovery,
    SupportScores,
    direction_recovery,
    support_scores,
)
from saelab.toys.store import SyntheticTruth, write_store
from saelab.toys.synthetic import (
    SyntheticSpec,
    coherence,
    feature_directions,
    firing_probability,
    sample,
    seeded,
)

__all__ = [
    "DirectionRecovery",
    "Instances",
    "SupportScores",
    "SyntheticSpec",
    "SyntheticTruth",
    "ToyMeasures",
    "ToyModel",
    "coherence",
    "direction_recovery",
    "expected_loss",
    "feature_directions",
    "firing_probability",
    "measure",
    "sample",
    "second_feature_phase",
    "seeded",
    "support_scores",
    "train_toy",
    "write_store",
]
