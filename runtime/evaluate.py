"""Evaluation: perplexity of a model on a text, and how far a quantized model drifts from its original.

    windows(n, ctx)                     the sliding windows: (start, end, first scored target)
    token_logprobs(model, ids, ctx)     per window, log-softmax of the logits at the scored positions
    perplexity(model, ids, ctx)         exp(mean negative log-likelihood of ids[1:])
    compare(base, other, ids, ctx)      (perplexity of each, mean KL(base || other) per token)
    reference(base, ids, ctx), compare_to(ref, other, ids, ctx)
                                        the same in two steps, so that only one model need be in memory
    read_text(path), eval_ids(model, text)   the text (a file, or BUILTIN_TEXT) and its token ids

Sliding evaluation: the first window scores its ctx - 1 predictions; each next window moves by
stride = ctx // 2 and scores only its last stride tokens, with the ctx - stride tokens before them
as context. Every token but the first is scored exactly once; each window starts from an empty cache.
`mamba-cli perplexity` and `mamba-cli quantize`'s quality report run these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from runtime.errors import MambaCliError

DEFAULT_CTX = 512

# The built-in evaluation text (written for mamba-cli; plain English prose, about 1,000 tokens).
BUILTIN_TEXT = """\
The lighthouse stood at the end of a long spit of sand, and for most of the year the only people who \
came near it were the keeper and the men who brought him oil, bread and news. In winter the sea was \
grey and loud, and the wind came straight off the water with nothing to stop it. The keeper kept a \
logbook in which he wrote the weather, the ships he saw and the state of the lamp. He was not a man \
of many words, and most entries were short: wind from the north-west, heavy swell, two fishing boats \
returning before dark, lamp lit at four.

In spring the birds came back. They arrived in the same order every year, first the small brown ones \
that ran along the edge of the waves, then the gulls, and last the terns, which screamed at anyone who \
walked too close to their nests. The keeper's daughter, who came to stay with him when the school was \
closed, learned their names from a book with faded pictures and counted them each morning. She kept \
her own notes in the back of her father's logbook, in careful small handwriting, and he never told her \
to stop.

Science, she decided one summer, was mostly a matter of writing things down and looking at them again \
later. If you counted the terns every day, you could see that there were more of them in warm years, \
and fewer after a storm had washed over the nesting ground. If you measured the height of the tide \
against the painted marks on the stone steps, you could see that the highest tides came a day or two \
after the full moon, not on the night itself. None of this was new, her father said, but it was new \
to her, and that was what mattered.

The town on the mainland changed slowly. A road was built along the coast, then a railway station, \
and visitors began to arrive in the summer with cameras and folding chairs. Some of them walked out \
along the spit to see the lighthouse, and the keeper showed them the stairs, the lamp room and the \
great glass lens, which turned on a bath of mercury so smoothly that a child could push it with one \
hand. He explained how the light was focused into a beam, and how each lighthouse along the coast \
flashed in its own rhythm, so that sailors could tell them apart in the dark.

Years later, when the light was made automatic and the keeper moved to a small house in the town, his \
daughter became a teacher. She taught arithmetic, geography and a little history, but the lesson her \
pupils remembered best was the one about counting birds. Each spring she took them down to the shore \
with notebooks and pencils, and they wrote down what they saw: how many, what kind, what the weather \
was doing. Back in the classroom they drew charts on large sheets of paper and pinned them to the wall, \
and every year the new charts went up beside the old ones.

It is easy to think that knowledge comes from great discoveries, made by famous people in distant \
laboratories. Much of it, in fact, comes from ordinary people paying close attention to the same \
small piece of the world for a long time, and writing down what they notice. The logbook from the \
lighthouse is now kept in the town museum, open at a page from a windy April morning, with the \
weather in a man's hand at the top and, underneath, a list of birds in a child's.
"""


def windows(n: int, ctx: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored target) for each window over n tokens; targets are ids[1:]."""
    if ctx < 2:
        raise MambaCliError(f"--ctx {ctx}: a window needs at least 2 tokens")
    stride = max(1, ctx // 2)
    out, start, first = [], 0, 1
    while first < n:
        end = min(start + ctx, n)
        out.append((start, end, first))
        first, start = end, end + stride - ctx
    return out


@torch.inference_mode()
def token_logprobs(model, ids: list[int], ctx: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per window: (log-probabilities [S, V] float64 at the S scored positions, their targets [S])."""
    for start, end, first in windows(len(ids), ctx):
        tokens = torch.tensor([ids[start:end]])
        logits = model.forward(tokens)[0, first - start - 1:end - start - 1]  # predicts ids[first:end]
        yield torch.log_softmax(logits.double().cpu(), dim=-1), torch.tensor(ids[first:end])


def perplexity(model, ids: list[int], ctx: int = DEFAULT_CTX) -> float:
    nll, count = 0.0, 0
    for lp, target in token_logprobs(model, ids, ctx):
        nll -= float(lp.gather(1, target[:, None]).sum())
        count += len(target)
    if count == 0:
        raise MambaCliError("the text is too short: it needs at least 2 tokens")
    return math.exp(nll / count)


Progress = Callable[[int, int], None]  # (tokens scored so far, tokens to score)


def _scored(lps: Iterator[tuple[torch.Tensor, torch.Tensor]], total: int, progress: Progress | None):
    done = 0
    for lp, target in lps:
        done += len(target)
        if progress is not None:
            progress(done, total)
        yield lp, target


def reference(base, ids: list[int], ctx: int = DEFAULT_CTX, progress: Progress | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """base's log-probabilities per window, kept (float64, [S, V] each) for compare_to."""
    return list(_scored(token_logprobs(base, ids, ctx), len(ids) - 1, progress))


def compare_to(ref: list[tuple[torch.Tensor, torch.Tensor]], other, ids: list[int], ctx: int = DEFAULT_CTX,
               progress: Progress | None = None) -> tuple[float, float, float]:
    """(perplexity of the reference's model, perplexity of other, mean KL(base || other) per scored token)."""
    nll_a = nll_b = kl = 0.0
    count = 0
    for (la, target), (lb, _) in zip(ref, _scored(token_logprobs(other, ids, ctx), len(ids) - 1, progress),
                                     strict=True):
        nll_a -= float(la.gather(1, target[:, None]).sum())
        nll_b -= float(lb.gather(1, target[:, None]).sum())
        kl += float((la.exp() * (la - lb)).sum())
        count += len(target)
    if count == 0:
        raise MambaCliError("the text is too short: it needs at least 2 tokens")
    return math.exp(nll_a / count), math.exp(nll_b / count), kl / count


def compare(base, other, ids: list[int], ctx: int = DEFAULT_CTX) -> tuple[float, float, float]:
    """(perplexity of base, perplexity of other, mean KL(base || other) in nats per scored token)."""
    return compare_to(reference(base, ids, ctx), other, ids, ctx)


def read_text(path: Path | None) -> str:
    if path is None:
        return BUILTIN_TEXT
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MambaCliError(f"{path}: cannot read the text ({e})") from None


def eval_ids(model, text: str) -> list[int]:
    return model.tokenizer.encode_prompt(text)
