"""The thin Ray layer: Ray Data pipelines that feed the trainers, stage I and stage II in one
TorchTrainer run, the bank's feature extraction through an actor pool, and the per-category driver that
``tocoad train-all`` (and each Ray Tune trial) runs. The math lives in the library; everything
here calls ``Stage1Trainer`` / ``Stage2Trainer``, ``stage{1,2}_sample``, ``pipeline.finish_fit``
and ``pipeline.evaluate`` unchanged."""
