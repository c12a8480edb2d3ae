"""Text generation with a decoder bundle's KV-cache graph.

The graph (see `ModelSpec.generation`) takes input_ids, attention_mask, position_ids and
past_key_i/past_value_i, and returns logits and present_key_i/present_value_i. The first step
feeds the prompt with an empty cache; every later step feeds one token per row and the cache. An
encoder-decoder's prompts are its source: its encoder part runs once on them, and every decoder
step reads the encoder's output (`memory_*`) and `source_mask`; a speech model's prompts are arrays
of the features its encoder reads (`input_features`, (mels, frames): Whisper's log-mel spectrogram).
Sampling happens here, in numpy, so the ONNX graphs and the PyTorch reference
(`toolkit.reference.run.reference_generator`) run the exact same loop.

Two ways to run it, peers over the same pieces (sampling and rules, the layout, the text stream):
- `Generator` (generator.py): one call's prompts decoded together, start to end, over one of the
  caches of caches.py;
- `Scheduler` (scheduler.py): continuous batching for a server: requests join a running decode
  batch at the next step and leave it when they finish, each in a cache slot of its own (slots.py).
"""

from toolkit.runtime.generate.generator import CACHES, Generator, greedy_tokens, token_agreement
from toolkit.runtime.generate.sampling import Sampling, TokenRules
from toolkit.runtime.generate.scheduler import Busy, Event, Request, Scheduler

__all__ = ["CACHES", "Busy", "Event", "Generator", "Request", "Sampling", "Scheduler", "TokenRules", "greedy_tokens", "token_agreement"]
