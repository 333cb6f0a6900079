"""Caption decoding over an encoder/decoder ONNX pair: greedy and beam search.

Every decoder step of every request goes through the decoder model's dynamic
batcher, so steps of concurrent requests run as one batch: a request joins the
running batch at its first step and leaves it after its last (continuous
batching), with no coordination beyond the batcher itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from optic.proto.optic.v1 import vision_pb2 as pb
from optic.server.errors import InvalidArgument
from optic.server.metadata import TASK_NAMES, ModelMeta
from optic.server.tasks import draw
from optic.server.tasks.base import Option, Task, Work, sources_of
from optic.server.tasks.image import ImageSource

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from optic.server.repository import ModelRepository, ServedModel

MAX_BEAMS = 16
Step = Callable[[dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]


@dataclass(frozen=True)
class CaptionSpec:
    """How the pair fits together, from the encoder's metadata."""

    vocab: tuple[str, ...]
    bos: int
    eos: int
    max_length: int
    decoder: str

    @classmethod
    def from_meta(cls, meta: ModelMeta, name: str) -> CaptionSpec:
        extra = meta.extra
        if meta.task != "captioning" or extra.get("optic.caption.role") != "encoder":
            raise InvalidArgument(f"model {name!r} is not a caption encoder")
        vocab = meta.vocab
        try:
            bos, eos = vocab.index(extra["optic.caption.bos"]), vocab.index(extra["optic.caption.eos"])
            max_length = int(extra["optic.caption.max_length"])
            decoder = extra["optic.caption.decoder"]
        except (KeyError, ValueError) as exc:
            raise InvalidArgument(f"caption encoder {name!r} has incomplete optic.caption metadata: {exc}") from None
        return cls(vocab, bos, eos, max_length, decoder)


@dataclass(frozen=True)
class Decoded:
    tokens: tuple[str, ...]
    log_probs: tuple[float, ...]  # per generated token, end token excluded
    total_log_prob: float  # end token included

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _feeds(tokens: np.ndarray, h: np.ndarray, c: np.ndarray, f: np.ndarray) -> dict[str, np.ndarray]:
    return {"token": tokens.astype(np.int64), "h": h, "c": c, "features": f}


async def greedy(spec: CaptionSpec, step: Step, f: np.ndarray, h: np.ndarray, c: np.ndarray, max_len: int) -> Decoded:
    token = np.array([spec.bos], dtype=np.int64)
    words: list[str] = []
    logps: list[float] = []
    total = 0.0
    for _ in range(max_len):
        out = await step(_feeds(token, h, c, f))
        logp = log_softmax(out["logits"][0])
        best = int(logp.argmax())
        total += float(logp[best])
        if best == spec.eos:
            break
        words.append(spec.vocab[best])
        logps.append(float(logp[best]))
        token, h, c = np.array([best]), out["h_out"], out["c_out"]
    return Decoded(tuple(words), tuple(logps), total)


async def beam_search(
    spec: CaptionSpec, step: Step, f: np.ndarray, h: np.ndarray, c: np.ndarray, max_len: int, beams: int
) -> Decoded:
    """Standard beam search; hypotheses are ranked by mean log-probability per token so length is not punished."""
    alive: list[tuple[list[int], list[float], float]] = [([], [], 0.0)]  # tokens, per-token logps, total
    hs, cs = h, c
    finished: list[tuple[list[int], list[float], float]] = []
    for t in range(max_len):
        n = len(alive)
        last = np.array([a[0][-1] if a[0] else spec.bos for a in alive], dtype=np.int64)
        out = await step(_feeds(last, hs, cs, np.repeat(f, n, axis=0)))
        logp = log_softmax(out["logits"])  # (n, V)
        totals = np.array([a[2] for a in alive])[:, None] + logp
        flat = np.argsort(-totals, axis=None, kind="stable")[: beams * 2]
        next_alive: list[tuple[list[int], list[float], float]] = []
        rows: list[int] = []
        for rank, idx in enumerate(flat):
            i, tok = divmod(int(idx), logp.shape[1])
            tokens, logps, _ = alive[i]
            hyp = ([*tokens, tok], [*logps, float(logp[i, tok])], float(totals[i, tok]))
            if tok == spec.eos or t == max_len - 1:
                if rank < beams:  # only an ending that is among the best continuations counts
                    finished.append(hyp)
            elif len(next_alive) < beams:
                next_alive.append(hyp)
                rows.append(i)
        if not next_alive:
            break
        if len(finished) >= beams:
            best_finished = max(_mean(x) for x in finished)
            if best_finished >= max(_mean(a) for a in next_alive):  # totals only fall as hypotheses grow
                break
        alive, hs, cs = next_alive, out["h_out"][rows], out["c_out"][rows]
    pool = finished or alive
    tokens, logps, total = max(pool, key=_mean)
    if tokens and tokens[-1] == spec.eos:
        tokens, logps = tokens[:-1], logps[:-1]
    return Decoded(tuple(spec.vocab[t] for t in tokens), tuple(logps), total)


def _mean(hyp: tuple[list[int], list[float], float]) -> float:
    """Log-probability per token: the ranking that does not favour short captions."""
    return hyp[2] / max(1, len(hyp[0]))


@dataclass(frozen=True)
class Caption:
    text: str
    tokens: tuple[tuple[str, float], ...]  # (token, log-probability)
    log_prob: float


class CaptionTask(Task[Caption]):
    name = "caption"
    long_name = TASK_NAMES["caption"]
    rpc = "Caption"
    request_type = pb.CaptionRequest
    response_type = pb.CaptionResponse
    default_model = "captioner"
    options = (Option("beam_size", "--beam-size", int, "beam search width (default: greedy)"),)

    def resolve(self, repo: ModelRepository, name: str) -> str:
        """The client-facing name ("captioner") or the encoder's own -> the encoder model's name.

        Anything else is returned as it is, for the repository and the task check to refuse.
        """
        for candidate in (name, f"{name}_encoder"):
            loaded = repo.versions.get(candidate)
            if loaded and repo.get(candidate).meta.extra.get("optic.caption.role") == "encoder":
                return candidate
        return name

    def public_name(self, model: ServedModel) -> str | None:
        """The encoder is called by the pair's name ("captioner"); the decoder is never called directly."""
        if model.meta.extra.get("optic.caption.role") != "encoder":
            return None
        return model.name.removesuffix("_encoder")

    def defaults(self, model: ServedModel) -> dict[str, str]:
        spec = CaptionSpec.from_meta(model.meta, model.name)
        return {"beam_size": "1", "max_length": str(spec.max_length)}

    async def handle(self, work: Work, request: pb.CaptionRequest, encoder: ServedModel) -> pb.CaptionResponse:
        spec = CaptionSpec.from_meta(encoder.meta, encoder.name)
        beams = request.beam_size if request.HasField("beam_size") else 1
        if not 1 <= beams <= MAX_BEAMS:
            raise InvalidArgument(f"beam_size {beams} must be 1 to {MAX_BEAMS}")
        max_len = request.max_length if request.HasField("max_length") else spec.max_length
        if not 1 <= max_len <= spec.max_length:
            raise InvalidArgument(f"max_length {max_len} must be 1 to {spec.max_length} for this model")
        sources = sources_of(request)
        work.check(sources)
        with ExitStack() as stack:
            decoder = stack.enter_context(work.repo.use(spec.decoder))

            async def step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return await decoder.infer(feeds, work.remaining())

            async def one(source: ImageSource) -> pb.CaptionResult:
                prepared = await work.prepare(source, encoder)
                started = time.perf_counter()
                enc = await encoder.infer({encoder.inputs[0].name: prepared.tensor[None]}, work.remaining())
                f, h, c = enc["features"], enc["h"], enc["c"]
                if beams == 1:
                    caption = await greedy(spec, step, f, h, c, max_len)
                else:
                    caption = await beam_search(spec, step, f, h, c, max_len, beams)
                work.observe(encoder.name, "inference", time.perf_counter() - started)
                return pb.CaptionResult(
                    text=caption.text,
                    tokens=[
                        pb.Token(text=t, log_prob=p) for t, p in zip(caption.tokens, caption.log_probs, strict=True)
                    ],
                    log_prob=caption.total_log_prob,
                )

            results = await asyncio.gather(*(one(s) for s in sources))
        return pb.CaptionResponse(model=request.model, model_version=encoder.version, results=results)

    # ------------------------------------------------------------------ client side

    def result(self, message: pb.CaptionResult) -> Caption:
        return Caption(message.text, tuple((t.text, t.log_prob) for t in message.tokens), message.log_prob)

    def render(self, result: Caption) -> str:
        return f"  {result.text}  (log p = {result.log_prob:.3f})"

    def to_json(self, result: Caption) -> object:
        return {"text": result.text, "tokens": [list(t) for t in result.tokens], "log_prob": result.log_prob}

    def draw(self, image: PILImage.Image, result: Caption) -> PILImage.Image:
        return draw.with_caption(image, result.text)


TASK = CaptionTask()
