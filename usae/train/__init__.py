"""Training a USAE.

- ``trainer``: ``Trainer`` (the paper's update rule, dead-latent bookkeeping, save and resume);
- ``history``: ``TrainHistory``, what ``Trainer.fit`` returns;
- ``curves``: loss, R² and dead-latent curves derived from a history, learning-rate schedules;
- ``distributed``: data-parallel training over ranks (``torchrun``).
"""
