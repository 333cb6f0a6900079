"""Recipe: the shared trunk's spatial tokens + an attention LSTM decoder, exported as two ONNX models.

The encoder gives ``(features, h, c)``: ``features`` are the image tokens ``[N, T, d]`` (strides 16 and 32 of
the pyramid, each with its position), ``h``/``c`` the decoder's initial state. The decoder is one step,
``(token, h, c, features) -> (logits, h_out, c_out)``, attending over ``features`` (Show, Attend and Tell): the
server's caption decoding calls it step by step and passes ``features`` through unchanged. The gate: the
caption names the largest shape and its colour, greedy decoding through onnxruntime on the stress set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from optic.export import evaluate
from optic.export.data import COLORS, SHAPES, make_scenes
from optic.export.models import ExportedCaptionEncoder
from optic.export.onnx_export import to_onnx
from optic.export.onnx_io import session, set_metadata
from optic.export.recipe import ModelReport, finish, gate_props, in_distribution, served_spec
from optic.export.train import TrunkRecipe, trained
from optic.server.metadata import InputSpec, ModelMeta
from optic.server.tasks.image import preprocess

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
VOCAB: tuple[str, ...] = (
    PAD,
    BOS,
    EOS,
    "a",
    "large",
    "small",
    *COLORS,
    *SHAPES,
    "above",
    "below",
    "left",
    "right",
    "of",
    "to",
    "the",
)
MAX_LENGTH = 16  # tokens generated at most, <eos> included
INPUT_SPEC = TrunkRecipe().input_spec
# The simple scenes the examples and end-to-end tests caption (64 x 64, one neighbour at most).
SCENE_ARGS: dict[str, Any] = {"size": 64, "max_distractors": 1, "distractor_scale": (0.4, 0.75)}
TEST_SEED = 4_000_003
ENCODER, DECODER = "captioner_encoder", "captioner_decoder"


@dataclass(frozen=True)
class CaptionerRecipe:
    seed: int = 0
    trunk: TrunkRecipe = field(default_factory=TrunkRecipe)
    test_size: int | None = None  # stress caption scenes (None: evaluate.SLICES' count)
    gate: float = 0.90  # share of captions naming the largest shape and its colour (stress caption slice)
    tolerance: float = 1e-4


def encode_caption(text: str) -> list[int]:
    return [VOCAB.index(BOS), *(VOCAB.index(w) for w in text.split()), VOCAB.index(EOS)]


def greedy_decode(encoder: ort.InferenceSession, decoder: ort.InferenceSession, images: np.ndarray) -> list[str]:
    """Batched greedy decoding with the exported pair; finished rows keep emitting padding."""
    features, h, c = encoder.run(None, {"images": images})
    token = np.full(len(images), VOCAB.index(BOS), dtype=np.int64)
    done = np.zeros(len(images), dtype=bool)
    words: list[list[str]] = [[] for _ in images]
    for _ in range(MAX_LENGTH):
        logits, h, c = decoder.run(None, {"token": token, "h": h, "c": c, "features": features})
        token = logits.argmax(1).astype(np.int64)
        for i in np.flatnonzero(~done):
            if VOCAB[token[i]] == EOS:
                done[i] = True
            else:
                words[i].append(VOCAB[token[i]])
        if done.all():
            break
    return [" ".join(w) for w in words]


def _data(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Simple scenes (``SCENE_ARGS``) as the served encoder's input, and their captions."""
    scenes = make_scenes(count, seed, **SCENE_ARGS)
    return np.stack([preprocess(s.image, INPUT_SPEC)[0] for s in scenes]), [s.caption for s in scenes]


def build(out: Path, recipe: CaptionerRecipe | None = None, progress: bool = True) -> ModelReport:
    recipe = recipe or CaptionerRecipe()
    started = time.monotonic()
    trunk = trained(recipe.trunk, progress)
    spec = served_spec(recipe.trunk.input_spec)
    encoder, decoder = ExportedCaptionEncoder(trunk.net).eval(), trunk.net.decoder.eval()
    rng = np.random.default_rng(recipe.seed)
    sample = torch.from_numpy(rng.uniform(0, 1, (2, 3, *spec.size)).astype(np.float32))
    enc_proto, dec_proto = export_pair(encoder, decoder, sample)
    describe_pair((enc_proto, dec_proto), spec, VOCAB, {}, "")
    enc_sess, dec_sess = session(enc_proto), session(dec_proto)
    results = {"caption": evaluate.captioning(enc_sess, dec_sess, evaluate.stress_samples("caption", recipe.test_size))}
    results["in_distribution"] = evaluate.captioning(enc_sess, dec_sess, in_distribution(recipe.test_size))
    diff = pair_parity(encoder, decoder, enc_sess, dec_sess, sample.numpy(), recipe.seed)
    gates = {"named_largest": (results["caption"]["named_largest"], recipe.gate)}
    props = gate_props(gates, results, diff, "stress caption slice")
    props["optic.eval.bleu4"] = f"{results['caption']['bleu4']:.4f}"
    props["optic.eval.bleu4_stress_wording"] = f"{results['caption']['bleu4_stress_wording']:.4f}"
    describe_pair((enc_proto, dec_proto), spec, VOCAB, props,
                  "Optic shape captioner, {role} (shared trunk tokens + attention LSTM)")
    protos = {ENCODER: enc_proto, DECODER: dec_proto}
    return finish("captioner", out, protos, [encoder, decoder], gates, diff, recipe, started, results)


def export_pair(
    encoder: nn.Module, decoder: nn.Module, sample: torch.Tensor
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The encoder and one decoder step as two ONNX graphs, with the tensor names the server decodes with."""
    enc_proto = to_onnx(encoder, sample, "images", ["features", "h", "c"])
    with torch.no_grad():
        f, h, c = encoder(sample)
    step_args = (torch.tensor([1, 3]), h, c, f)
    dec_proto = to_onnx(decoder, step_args, ["token", "h", "c", "features"], ["logits", "h_out", "c_out"])
    return enc_proto, dec_proto


def describe_pair(
    protos: tuple[onnx.ModelProto, onnx.ModelProto],
    spec: InputSpec,
    vocab: tuple[str, ...],
    extra: dict[str, str],
    doc: str,
) -> None:
    """Write the metadata that lets the server find the pair and decode with it; ``doc`` may use {role}."""
    common = {
        "optic.caption.encoder": ENCODER,
        "optic.caption.decoder": DECODER,
        "optic.caption.bos": BOS,
        "optic.caption.eos": EOS,
        "optic.caption.max_length": str(MAX_LENGTH),
    }
    for proto, role in zip(protos, ("encoder", "decoder"), strict=True):
        meta = ModelMeta(
            task="captioning",
            input=spec if role == "encoder" else None,
            vocab=vocab,
            extra={**common, "optic.caption.role": role, **extra},
        )
        set_metadata(proto, meta.to_props(), doc=doc.format(role=role))


@torch.no_grad()
def pair_parity(
    encoder: nn.Module,
    decoder: nn.Module,
    enc: ort.InferenceSession,
    dec: ort.InferenceSession,
    images: np.ndarray,
    seed: int,
) -> float:
    """Worst |torch - onnxruntime| over the encoder and a few decoder steps, on real and random inputs."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    vocab_size = int(dec.get_outputs()[0].shape[-1]) if isinstance(dec.get_outputs()[0].shape[-1], int) else len(VOCAB)
    for x in (images, rng.normal(0, 1, images.shape).astype(np.float32)):
        expected = [t.numpy() for t in encoder(torch.from_numpy(x))]
        got = enc.run(None, {"images": x})
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True)))
        f, h, c = expected
        token = rng.integers(0, vocab_size, len(x)).astype(np.int64)
        for _ in range(3):
            want = [
                t.numpy()
                for t in decoder(torch.from_numpy(token), torch.from_numpy(h), torch.from_numpy(c), torch.from_numpy(f))
            ]
            have = dec.run(None, {"token": token, "h": h, "c": c, "features": f})
            worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(want, have, strict=True)))
            token, h, c = want[0].argmax(1).astype(np.int64), want[1], want[2]
    return worst
