"""Training: `imgcls.training.fit.fit(cfg)` turns a dataset into a model folder.

The modules, in the order a run uses them:

- fit.py: `fit` and the steps of a run, one screen: prepare, build, plan, probe, epochs, finish;
- prepare.py: index DATA, decode the splits once, split off validation, split.json;
- build.py: the model with its starting weights, optimizer, loss, training precision (`Setup`);
- recipes.py: the fast and generic recipes (`Recipe`), whitening init, lookahead;
- optim.py: the one optimizer builder and its parameter groupings;
- plan.py: how long a run trains (--epochs, time budget, resume) and its `Schedule`;
- budget.py: the time-budget arithmetic (numbers in, a plan out);
- measure.py: timing training steps and evaluation passes (precision trial, budget);
- schedule.py: the learning-rate `Schedule`, the steps-per-epoch rule;
- loop.py: `train_one_epoch` (forward, loss, backward, step, zero_grad) and validation;
- finetune.py: the linear probe and the strategy rule for pretrained backbones;
- checkpoint.py: `TrainState`, checkpoints for --resume, metrics.csv, the run folder;
- distributed.py: DDP under torchrun: the ranks, their shares of each batch, global BatchNorm.

Nothing is imported here: import from the module that defines a name.
"""
