"""Caption decoding over an encoder/decoder ONNX pair: greedy and beam search.

Every decoder step of every request goes through the decoder model's dynamic
batcher, so steps of concurrent requests run as one batch: a request joins the
running batch at its first step and leaves it after its last (continuous
batching), with no coordination beyond the batcher itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from server.errors import InvalidArgument
from server.metadata import ModelMeta

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
class Caption:
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


async def greedy(spec: CaptionSpec, step: Step, f: np.ndarray, h: np.ndarray, c: np.ndarray, max_len: int) -> Caption:
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
    return Caption(tuple(words), tuple(logps), total)


async def beam_search(
    spec: CaptionSpec, step: Step, f: np.ndarray, h: np.ndarray, c: np.ndarray, max_len: int, beams: int
) -> Caption:
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
        next_alive, rows = [], []
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
    return Caption(tuple(spec.vocab[t] for t in tokens), tuple(logps), total)


def _mean(hyp: tuple[list[int], list[float], float]) -> float:
    """Log-probability per token: the ranking that does not favour short captions."""
    return hyp[2] / max(1, len(hyp[0]))
