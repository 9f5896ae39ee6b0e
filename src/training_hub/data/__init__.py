"""Training data: formats, validation with file:line errors, chat-template tokenization with exact loss masks.

``check_data`` is cheap (no tokenizer, no torch) and runs before any model is loaded; ``prepare_sft_data``
validates, tokenizes, applies the length policy, summarizes and caches; ``load_preference_data`` returns
validated preference pairs for DPO. See docs/data-formats.md.
"""

from training_hub.data.errors import DataProblem, DataValidationError
from training_hub.data.prepare import PreparedData, prepare_sft_data
from training_hub.data.summary import DataSummary
from training_hub.data.validate import check_data, load_preference_data

__all__ = [
    "DataProblem", "DataSummary", "DataValidationError", "PreparedData", "check_data", "load_preference_data",
    "prepare_sft_data",
]
