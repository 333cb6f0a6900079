"""Recipe: CNN encoder + LSTM decoder captioner, exported as two ONNX models, gated on BLEU-4.

The gate decodes greedily with the exported ONNX pair (what will be served),
and scores with sacrebleu.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from tqdm.auto import tqdm

from optic.export.data import COLORS, SHAPES, make_scenes
from optic.export.models import CaptionDecoderStep, CaptionEncoder
from optic.export.onnx_export import to_onnx
from optic.export.onnx_io import session, set_metadata
from optic.export.recipe import ModelReport, eval_props, finish
from optic.export.train import seed_everything
from optic.server.metadata import InputSpec, ModelMeta
from optic.server.tasks.image import normalize

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
)
MAX_LENGTH = 16  # tokens generated at most, <eos> included
INPUT_SPEC = InputSpec(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
SCENE_ARGS: dict[str, Any] = {"size": 64, "max_distractors": 1, "distractor_scale": (0.4, 0.75)}
TEST_SEED = 4_000_003
ENCODER, DECODER = "captioner_encoder", "captioner_decoder"


@dataclass(frozen=True)
class CaptionerRecipe:
    seed: int = 0
    epochs: int = 10
    train_size: int = 6144
    test_size: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    gate: float = 0.50  # BLEU-4 (sacrebleu, 0..1) with greedy decoding through onnxruntime
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


def bleu4(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(hypotheses, [references]).score / 100.0


def _data(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    scenes = make_scenes(count, seed, **SCENE_ARGS)
    return normalize(np.stack([s.image for s in scenes]), INPUT_SPEC), [s.caption for s in scenes]


def build(out: Path, recipe: CaptionerRecipe | None = None, progress: bool = True) -> ModelReport:
    recipe = recipe or CaptionerRecipe()
    started = time.monotonic()
    seed_everything(recipe.seed)
    x_train, captions = _data(recipe.train_size, recipe.seed)
    x_test, references = _data(recipe.test_size, TEST_SEED)
    encoded = [encode_caption(t) for t in captions]
    length = max(map(len, encoded))
    tokens = torch.tensor([t + [0] * (length - len(t)) for t in encoded], dtype=torch.long)
    x_all = torch.from_numpy(x_train)

    encoder, decoder = CaptionEncoder(), CaptionDecoderStep(len(VOCAB))
    params = [*encoder.parameters(), *decoder.parameters()]
    steps_per_epoch = recipe.train_size // recipe.batch_size
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    bar = tqdm(total=recipe.epochs * steps_per_epoch, desc="captioner", unit="step", disable=not progress)
    encoder.train()
    decoder.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(recipe.train_size)
        for k in range(steps_per_epoch):
            idx = perm[k * recipe.batch_size : (k + 1) * recipe.batch_size]
            seq = tokens[idx]
            features, h, c = encoder(x_all[idx])
            loss = torch.zeros(())
            for t in range(length - 1):  # teacher forcing: the true token goes in at every step
                logits, h, c = decoder(seq[:, t], h, c, features)
                loss = loss + nn.functional.cross_entropy(logits, seq[:, t + 1], ignore_index=0, reduction="sum")
            loss = loss / (seq[:, 1:] != 0).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    encoder.eval()
    decoder.eval()

    enc_proto, dec_proto = export_pair(encoder, decoder, torch.from_numpy(x_test[:2]))
    enc_sess, dec_sess = session(enc_proto), session(dec_proto)
    hypotheses = greedy_decode(enc_sess, dec_sess, x_test)
    value = bleu4(hypotheses, references)
    diff = pair_parity(encoder, decoder, enc_sess, dec_sess, x_test[:7], recipe.seed)
    split = f"{recipe.test_size} synthetic scenes, seed {TEST_SEED}"
    describe_pair(
        (enc_proto, dec_proto),
        INPUT_SPEC,
        VOCAB,
        eval_props("bleu4", value, split, diff),
        "Optic shape captioner, {role} (CNN + LSTM, synthetic scenes)",
    )
    protos = {ENCODER: enc_proto, DECODER: dec_proto}
    return finish("captioner", out, protos, [encoder, decoder], "BLEU-4", value, diff, recipe, started)


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
    for x in (images, rng.normal(0, 1, images.shape).astype(np.float32)):
        expected = [t.numpy() for t in encoder(torch.from_numpy(x))]
        got = enc.run(None, {"images": x})
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True)))
        f, h, c = expected
        token = rng.integers(0, len(VOCAB), len(x)).astype(np.int64)
        for _ in range(3):
            want = [
                t.numpy()
                for t in decoder(torch.from_numpy(token), torch.from_numpy(h), torch.from_numpy(c), torch.from_numpy(f))
            ]
            have = dec.run(None, {"token": token, "h": h, "c": c, "features": f})
            worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(want, have, strict=True)))
            token, h, c = want[0].argmax(1).astype(np.int64), want[1], want[2]
    return worst
