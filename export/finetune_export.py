"""The export step of ``optic export train``: the default models' wrappers around the fine-tuned net, the parity
check, the self-describing metadata, the val score of the ONNX graph itself, and :func:`optic.export.recipe.finish`
(written only if parity and the gate hold).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOLERANCE = 1e-3  # largest |torch - onnxruntime| on any output (logits, probabilities, caption states)
BOX_TOLERANCE = 1e-2  # detection: input pixels, boxes clipped to the image as the server clips them


def wrappers(net: Any, task: str, spec: Any) -> tuple[Any, ...]:
    """The export wrappers of the default models, around this net: (model,) or (encoder, decoder)."""
    from optic.export.models import ExportedCaptionEncoder, ExportedClassifier, ExportedDetector, ExportedSegmenter

    if task == "classify":
        return (ExportedClassifier(net),)
    if task == "detect":
        return (ExportedDetector(net, spec.size),)
    if task == "segment":
        return (ExportedSegmenter(net, 1),)
    return ExportedCaptionEncoder(net), net.decoder


def export(args: argparse.Namespace, opts: Any, ds: Any, spec: Any, net: Any, models: tuple[Any, ...],
            evaluator: Any, gate: float, sample: Any, source: Any, state: Any, phases: str, started: float
            ) -> tuple[Any, Any]:
    """Export, check parity, score the ONNX graph on val, describe it, and write it if parity and the gate hold."""
    import numpy as np

    from optic.export import evaluate
    from optic.export.captioner import export_pair, pair_parity
    from optic.export.detector import DEFAULTS
    from optic.export.finetune_eval import ort_predictor
    from optic.export.onnx_export import parity, to_onnx
    from optic.export.onnx_io import set_metadata
    from optic.export.recipe import finish, gate_props
    from optic.server.metadata import ModelMeta, task_long_name

    task = opts.task
    rng = np.random.default_rng(args.seed)
    probes = [sample.numpy()[:1], rng.uniform(0, 1, (3, 3, *spec.size)).astype(np.float32)]
    if task == "caption":
        encoder, decoder = models
        protos = dict(zip(opts.entries, export_pair(encoder, decoder, sample), strict=True))
        enc, dec = (evaluate.session(p.SerializeToString()) for p in protos.values())
        metas = _caption_metas(spec, evaluator.vocab, opts.entries, evaluator.max_length)
        for proto, meta in zip(protos.values(), metas, strict=True):
            set_metadata(proto, meta.to_props())
        diff = pair_parity(encoder, decoder, enc, dec, sample.numpy(), args.seed)
        predictor = ort_predictor(enc, dec)
    else:
        (model,) = models
        output = "detections" if task == "detect" else "logits"
        proto = to_onnx(model, sample, "images", output)
        meta = ModelMeta(task=task_long_name(task), labels=ds.names, input=spec,
                         output_kind="probabilities" if task == "detect" else "logits",
                         output_layout="yolov8" if task == "detect" else None,
                         detect=DEFAULTS if task == "detect" else ModelMeta().detect)  # fmt: skip
        metas = [meta]
        protos = {opts.entries[0]: proto}
        sess = evaluate.session(proto.SerializeToString())
        if task == "detect":
            diff = box_parity(model, sess, probes)
        else:
            diff = parity(model, sess, probes, TOLERANCE).max_abs_diff
        predictor = ort_predictor(sess)
    evaluation = evaluator.score(predictor, full=True)
    gates = {evaluation.metric_name: (evaluation.metric, gate)}
    n_val, n_train = len(ds.val), len(ds.train)
    props = gate_props(gates, {}, diff, "")
    props |= {f"optic.eval.{k.replace(' ', '_')}": f"{v:.4f}" for k, v in evaluation.extra.items()}
    props |= {
        "optic.eval.split": f"val split of {Path(args.data).name} ({n_val} images; {ds.report.split})",
        "optic.train.data": f"{ds.report.format}: {Path(args.data).name}, train {n_train} / val {n_val} images",
        "optic.train.from": source.label,
        "optic.train.epochs": f"{state.epoch} (best {state.best_epoch}); {phases}",
        "optic.train.seed": str(args.seed),
    }
    doc = f"Optic {task_long_name(task)} model trained by optic export train on {Path(args.data).name}"
    for proto, meta in zip(protos.values(), metas, strict=True):
        role = meta.extra.get("optic.caption.role")
        set_metadata(proto, {**meta.to_props(), **props}, doc=doc + (f" ({role})" if role else ""))
    recipe = _Tolerance(BOX_TOLERANCE if task == "detect" else TOLERANCE)
    report = finish(args.name, args.out, protos, list(models), gates, diff, recipe, started)
    return report, evaluation


def box_parity(model: Any, sess: Any, probes: list[Any]) -> float:
    """Largest |torch - onnxruntime| of a detector, on class scores and on box corners clipped to the input image
    (what the server keeps): an untrained head's boxes reach hundreds of pixels past the image, where float32's
    last bit is already a hundredth of a pixel."""
    import numpy as np
    import torch

    worst = 0.0
    for x in probes:
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        have = sess.run(None, {"images": x})[0]
        size = x.shape[-1]
        corners = [np.concatenate([o[:, :2] - o[:, 2:4] / 2, o[:, :2] + o[:, 2:4] / 2], 1).clip(0, size)
                   for o in (want, have)]  # fmt: skip
        scores = float(np.abs(want[:, 4:] - have[:, 4:]).max())
        worst = max(worst, float(np.abs(corners[0] - corners[1]).max()), scores)
    return worst


@dataclass(frozen=True)
class _Tolerance:
    tolerance: float


def _caption_metas(spec: Any, vocab: tuple[str, ...], entries: tuple[str, ...], max_length: int) -> list[Any]:
    """The pair's metadata, as :func:`optic.export.captioner.describe_pair` writes it, with this model's names."""
    from optic.export.datasets.text import BOS, EOS
    from optic.server.metadata import ModelMeta

    common = {"optic.caption.encoder": entries[0], "optic.caption.decoder": entries[1], "optic.caption.bos": BOS,
              "optic.caption.eos": EOS, "optic.caption.max_length": str(max_length)}  # fmt: skip
    return [ModelMeta(task="captioning", input=spec if role == "encoder" else None, vocab=vocab,
                      extra={**common, "optic.caption.role": role}) for role in ("encoder", "decoder")]  # fmt: skip
