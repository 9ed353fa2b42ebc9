"""The classifier kind: an encoder with MoA pools and a label head per task."""

from moa.pipelines.bundle import ModelKind, register_kind
from moa.pipelines.kinds import text_bundle
from moa.pipelines.kinds.classifier import service

KIND = register_kind(ModelKind(
    name=text_bundle.CLASSIFIER,
    service=service.ClassifierService,
    gate=("val/accuracy", "max"),
    signature=service.signature,
    input_example=service.input_example,
    modules=("moa.pipelines.kinds.classifier.module.MoAClassifier",
             "moa.pipelines.kinds.classifier.module.RLOOClassifier"),
))
