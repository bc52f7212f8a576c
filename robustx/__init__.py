"""robustx: framework-free core of the robust-training method of Woods, Chen & Teuscher (2019).

Layers (half-Huber ReLU), models, the Lipschitz-inspired input-gradient penalty, the adaptive
psi controller and the attack engine. Nothing here imports Lightning or Hydra, so the pieces
can be used inside any training loop.
"""

__version__ = "0.1.0"
