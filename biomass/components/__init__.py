"""Importing this package registers every component: each module that fills a registry is imported here, once and
explicitly, so no registry is ever half-filled. `python -m biomass.components` lists them all."""
import biomass.data.folds  # noqa: F401
import biomass.engine.optimizers  # noqa: F401
import biomass.losses  # noqa: F401
import biomass.models.backbones  # noqa: F401
import biomass.models.fusion  # noqa: F401
import biomass.models.heads  # noqa: F401
import biomass.models.poolings  # noqa: F401
import biomass.post  # noqa: F401
import biomass.schedulers  # noqa: F401
