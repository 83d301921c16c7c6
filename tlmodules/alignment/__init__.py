"""Domain alignment losses: small modules, each owning its domain discriminator and citing its paper.

- :class:`DomainAdversarialLoss`: DANN (Ganin et al., "Domain-Adversarial Training of Neural Networks",
  JMLR 2016), the discriminator sees the features.
- :class:`ConditionalDomainAdversarialLoss`: CDAN (Long et al., "Conditional Adversarial Domain Adaptation",
  NeurIPS 2018), the discriminator sees the features conditioned on the classifier's predictions;
  ``entropy_conditioning=True`` is CDAN+E.

Both take the features of a source and a target batch and the gradient-reversal coefficient ``λ`` and
return ``(loss, discriminator accuracy)``, as Transfer-Learning-Library's ``tllib.alignment`` does.
"""

from tlmodules.alignment.cdan import ConditionalDomainAdversarialLoss
from tlmodules.alignment.dann import DomainAdversarialLoss
from tlmodules.alignment.domain_loss import binary_domain_loss, domain_accuracy

__all__ = ["ConditionalDomainAdversarialLoss", "DomainAdversarialLoss", "binary_domain_loss", "domain_accuracy"]
