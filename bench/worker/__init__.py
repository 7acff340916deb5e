"""What runs inside a Ray Train worker (or a Tune trial process), with no Ray imports: bench.run.ray_runner
hands these a plain-dict payload and a `report(metrics, checkpoint=None)` callable (ray.train.report /
ray.tune.report); the rest is plain PyTorch and DeepSpeed, so a stage or a trial can also be run and
debugged in one process.

- engine: the DeepSpeed engine of a stage or trial (one per process), its config, ZeRO-3 gathering,
  saving, and the collectives the worker needs;
- stages: the shared stages (the env's SFT, pairs and references; the learned reward model);
- trial: one trial as an object with named steps (open, context, optimize, log, evaluate,
  checkpoint, finish);
- checkpoints: a trial's restart points; faults: fault injection for the reliability tests.
"""
