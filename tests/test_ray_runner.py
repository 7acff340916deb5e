"""bench.run.ray_runner's TorchTrainer: Ray Train as it is, less the per-run DatasetManager actor."""

from __future__ import annotations


def test_trainer_drops_only_the_dataset_manager_and_only_without_datasets():
    """Every fit() of a plain TorchTrainer starts a DatasetManager actor (one Python process per
    running trial) although prefbench hands Ray no datasets. `Trainer` leaves out exactly the callback
    that makes it; with datasets it keeps it. If Ray moves the (private) callback, this fails first."""
    import ray.data
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from bench.run.ray_runner import DatasetsCallback, Trainer

    assert DatasetsCallback is not None, "Ray Train V2's DatasetsCallback moved: update bench.run.ray_runner.Trainer"

    def names(trainer) -> list[str]:
        return [type(cb).__name__ for cb in trainer._create_default_callbacks()]

    scaling = ScalingConfig(num_workers=1)
    plain = names(TorchTrainer(lambda config: None, scaling_config=scaling))
    ours = names(Trainer(lambda config: None, scaling_config=scaling))
    assert "DatasetsCallback" in plain and "PlacementGroupCleanerCallback" in ours
    assert ours == [name for name in plain if name != "DatasetsCallback"]
    with_data = Trainer(lambda config: None, scaling_config=scaling, datasets={"train": ray.data.range(4)})
    assert "DatasetsCallback" in names(with_data)
