"""A planner process (see :mod:`ingestd.planners`): ``python -m ingestd._planning TOKENIZER CHUNK_SIZES``.

It reads pickled batches of texts from standard input and writes, for each, every text's tokens and names
per level to standard output, in order; the first thing it writes is its pid, once its tokenizer is loaded.
It ends when its input does, which is also when the run that started it dies. Only the tokenizer and the
planner are imported here, so a planner costs the tokenizer's memory and little more.
"""

from __future__ import annotations

import os
import pickle
import sys

from ingestd.plan import plan_levels
from ingestd.tokenize import load_tokenizer


def main(tokenizer_name: str, chunk_sizes: list[int]) -> None:
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    tokenizer = load_tokenizer(tokenizer_name)
    pickle.dump(os.getpid(), answers)
    answers.flush()
    while True:
        try:
            texts = pickle.load(requests)
        except EOFError:
            return
        try:
            # The chunks are cut again by the run: shipping them would cost more than slicing.
            answer: object = [(tokens, [level.names for level in plan_levels(tokens, chunk_sizes)])
                              for tokens in tokenizer.tokenize_batch(texts)]  # fmt: skip
        except Exception as error:  # noqa: BLE001 - the run plans this batch itself, and sees the error there
            answer = error.__class__.__name__
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()


if __name__ == "__main__":
    try:
        main(sys.argv[1], [int(size) for size in sys.argv[2].split(",")])
    except (BrokenPipeError, KeyboardInterrupt):
        pass
