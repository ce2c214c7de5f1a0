"""``ddpm-x0``: the network of ``ddpm`` trained to predict x_0 instead of ε, Chapter 39.

Everything but the regression target is that of the shipped ``ddpm``: the U-Net, the linear schedule,
the optimizer, the 4000 steps and the seed, so the models differ only in what the network outputs
(diffusers' ``prediction_type``; :func:`config` takes any of them, v included) and in the loss
weighting across t that the target implies. The model converts its output to ε
(:mod:`agm.diffusion.parameterization`), so every sampler and the bound of
:func:`agm.diffusion.ddpm.bits_per_dim` apply unchanged.
"""

from __future__ import annotations

from agm.config import to_dict
from agm.diffusion import ddpm
from agm.diffusion.ddpm import DDPMConfig
from agm.registry import ModelSpec, TrainResult, register
from agm.runtime import budget

# registered name -> what its network outputs
PREDICTIONS = {"ddpm-x0": "sample", "ddpm-v": "v_prediction"}
SYMBOLS = {"epsilon": "ε", "sample": "x_0", "v_prediction": "v"}


def config(prediction: str, seed: int = 0) -> DDPMConfig:
    """The configuration of ``ddpm`` with another prediction target."""
    return DDPMConfig(prediction=prediction, train=ddpm.default_training().budgeted(seed))


def trainer(prediction: str):
    def train(seed: int = 0, parents: dict | None = None) -> TrainResult:
        cfg = config(prediction, seed)
        ema_model, _, diagnostics = ddpm.fit(cfg)
        extra = {"loss_per_t": diagnostics["loss_per_t"], "final_loss": diagnostics["history"][-1]["loss"],
                 "history": [{"step": h["step"], "loss": h["loss"]} for h in diagnostics["history"]]}
        return TrainResult(ema_model, to_dict(cfg), steps=cfg.train.steps, extra=extra)

    return train


for _name, _prediction in PREDICTIONS.items():
    register(ModelSpec(
        name=_name, chapter=39,
        summary=f"the ddpm U-Net and budget, trained to predict {SYMBOLS[_prediction]}",
        build=ddpm.build, train=trainer(_prediction), sample=ddpm.sample, evaluate=ddpm.evaluate,
        train_minutes=60.0, add_sample_options=ddpm.add_sample_options,
        metric_sample_options=lambda: {**ddpm.METRIC_SAMPLER, "steps": budget(ddpm.EVAL_STEPS, 5)},
        samples="gray levels",
    ))
