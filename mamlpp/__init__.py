"""mamlpp's Python API: a trained MAML++ model (a run or an export) on your own few-shot task.

    import mamlpp

    model = mamlpp.load("RUN_ID_or_folder", members="ensemble")   # or "best"
    adapted = model.adapt(support_images, support_labels)       # PIL images, tensors or paths
    probs = adapted.predict_proba(query_images)                 # [queries, classes]
    adapted.classes                                             # the probability columns

Images get the same preprocessing as the run's dataset (size, channels, mean/std). The
implementation is `engine.adapt` (predictions are `MetaLearner.evaluate`'s) and
`engine.model_export`; this package only names the entry point.
"""

from engine.adapt import AdaptedModel, FewShotModel, load

__all__ = ["AdaptedModel", "FewShotModel", "load"]
