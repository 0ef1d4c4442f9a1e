"""Dataset fetch and preparation: sources -> cleaned records -> tokenised, packed rows -> batches.

- `load_records(data, storage, seed=...)`: cleaned `train`/`eval` text splits (sources.py)
- `prepare_dataset(settings, tokenizer, model_max_positions=...)`: cached, collator-ready rows (prepare.py)
- `PackedCollator(pad_token_id)`: batches without attention_mask; run the model with
  `use_cache=False` (FORWARD_KWARGS) so packed documents stay apart (collator.py)
"""

from loraflow.data.collator import FORWARD_KWARGS, IGNORE_INDEX, PackedCollator
from loraflow.data.prepare import PreparedDataset, model_context_length, prepare_dataset
from loraflow.data.sources import clean_text, load_records

__all__ = ["FORWARD_KWARGS", "IGNORE_INDEX", "PackedCollator", "PreparedDataset", "clean_text",
           "load_records", "model_context_length", "prepare_dataset"]
