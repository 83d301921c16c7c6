"""Domain adaptation loss terms: small modules, each citing its paper.

Domain-adversarial (each owns its domain discriminator; they take the features of a source and a target batch
and the gradient-reversal coefficient ``λ`` and return ``(loss, discriminator accuracy)``, as
Transfer-Learning-Library's ``tllib.alignment`` does):

- :class:`DomainAdversarialLoss`: DANN (Ganin et al., "Domain-Adversarial Training of Neural Networks",
  JMLR 2016), the discriminator sees the features.
- :class:`ConditionalDomainAdversarialLoss`: CDAN (Long et al., "Conditional Adversarial Domain Adaptation",
  NeurIPS 2018), the discriminator sees the features conditioned on the classifier's predictions;
  ``entropy_conditioning=True`` is CDAN+E.

On the target's predictions alone (no parameters; they add to the source-only baseline as well as to DANN/CDAN):

- :class:`MinimumClassConfusionLoss`: MCC (Jin et al., "Minimum Class Confusion for Versatile Domain
  Adaptation", ECCV 2020), the class confusion of the target batch.
- :class:`ConfidenceThresholdedSelfTraining`: FixMatch's pseudo-label loss (Sohn et al., NeurIPS 2020) between a
  weak and a strong view of the target batch; :class:`StrongAugmentBatch` makes the strong view of image batches.

On the network's normalisation:

- :class:`TargetBatchNormStatistics`: BatchNorm running statistics of the target rows alone, swapped in to evaluate
  and predict on the target (AdaBN, Li et al. 2017; gathered during training as in DSBN, Chang et al. 2019).
"""

from tlmodules.alignment.cdan import ConditionalDomainAdversarialLoss
from tlmodules.alignment.dann import DomainAdversarialLoss
from tlmodules.alignment.domain_loss import binary_domain_loss, domain_accuracy
from tlmodules.alignment.mcc import MinimumClassConfusionLoss
from tlmodules.alignment.self_training import ConfidenceThresholdedSelfTraining, StrongAugmentBatch
from tlmodules.alignment.target_batchnorm import TargetBatchNormStatistics

__all__ = [
    "ConditionalDomainAdversarialLoss",
    "ConfidenceThresholdedSelfTraining",
    "DomainAdversarialLoss",
    "MinimumClassConfusionLoss",
    "StrongAugmentBatch",
    "TargetBatchNormStatistics",
    "binary_domain_loss",
    "domain_accuracy",
]
