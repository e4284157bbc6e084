"""Training objectives; importing this package registers them in `OBJECTIVES`."""
from vlp_jax.objectives import caption
from vlp_jax.objectives import contrastive
