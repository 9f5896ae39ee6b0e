"""The ``sentence-transformers`` backend of ``embedding_sft``: contrastive fine-tuning, ``SentenceTransformerTrainer``.

sentence-transformers owns the embedding model (transformer + pooling), the contrastive losses and the batch
samplers; this module turns our declared parameters into its trainer and reports the run as every backend does:

* data: :mod:`training_hub.data.labelled` reads and checks the labelled texts (file:line problems) before the model
  loads; ``mnrl`` trains on same-label (anchor, positive) pairs built from the labels, as upstream;
* model: a sentence-transformers directory or hub id loads as it is; a plain Hugging Face encoder or decoder gets
  mean pooling (sentence-transformers' default for such a directory) and, for a decoder, its end-of-text token as
  padding;
* events: the trainer is a ``transformers.Trainer``, so the trl backend's bridge serves it as is: one
  ``metrics.jsonl`` line per step (and per evaluation), ``TrainingHubCallback`` hooks, W&B/TensorBoard/MLflow;
* evaluation (``eval_data_path``): per epoch, the loss on the held-out texts and :func:`label_metrics` (the share
  whose nearest neighbour has the same label, and the mean same-label vs different-label cosine similarity);
* output: the model in ``ckpt_output_dir`` itself (``SentenceTransformer(ckpt_output_dir)`` loads it), written to a
  temporary folder first so that a failed save leaves no complete-looking model; ``training_metrics.jsonl`` gets
  upstream's one-line summary.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Dict

from training_hub.backends.common import BuiltinBackend, availability_of, native_only_problems
from training_hub.config.embedding import LOSS_REGISTRY, TRIPLET_LOSSES, EmbeddingSFTConfig
from training_hub.registry import Availability

logger = logging.getLogger("training_hub")

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "training_metrics.jsonl"  # upstream's one line per run
STATE_DIR = "st_state"
EVALUATOR_NAME = "labels"


def label_metrics(embeddings: Any, labels: list[int]) -> dict[str, float]:
    """How well embeddings separate labels, by cosine similarity (each text against every other text).

    ``nn_accuracy``: share of texts whose nearest other text has the same label (texts whose label has no other
    text are left out); ``same_label_similarity`` / ``different_label_similarity``: mean over the pairs of that kind;
    ``similarity_gap``: their difference (> 0 when labels cluster).
    """
    import torch

    emb = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=-1)
    y = torch.as_tensor(labels)
    sim = emb @ emb.T
    eye = torch.eye(len(y), dtype=torch.bool)
    same = (y[:, None] == y[None, :]) & ~eye
    different = y[:, None] != y[None, :]
    nearest = sim.masked_fill(eye, float("-inf")).argmax(dim=1)
    has_partner = same.any(dim=1)
    hits = (y[nearest] == y)[has_partner]
    same_sim = sim[same].mean().item() if same.any() else float("nan")
    diff_sim = sim[different].mean().item() if different.any() else float("nan")
    return {"nn_accuracy": hits.float().mean().item() if len(hits) else float("nan"),
            "same_label_similarity": same_sim, "different_label_similarity": diff_sim,
            "similarity_gap": same_sim - diff_sim}


def _st_module(*names: str):
    """The first importable of ``names`` (sentence-transformers >= 5.4 nests its modules; 5.0-5.3 do not)."""
    import importlib

    for name in names[:-1]:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return importlib.import_module(names[-1])


def _label_evaluator(texts: list[str], labels: list[int], batch_size: int):
    """A sentence-transformers evaluator reporting :func:`label_metrics` on held-out labelled texts."""
    evaluation = _st_module("sentence_transformers.sentence_transformer.evaluation", "sentence_transformers.evaluation")

    class NearestNeighbourLabelEvaluator(evaluation.SentenceEvaluator):
        def __init__(self):
            super().__init__()
            self.name = EVALUATOR_NAME
            self.primary_metric = "nn_accuracy"

        def __call__(self, model, output_path=None, epoch=-1, steps=-1) -> dict[str, float]:
            embeddings = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
            return self.prefix_name_to_metrics(label_metrics(embeddings.cpu(), labels), self.name)

    return NearestNeighbourLabelEvaluator()


# ------------------------------------------------------------------------------------------------ data


def _datasets(config: EmbeddingSFTConfig):
    """(training dataset, evaluation dataset or None, held-out (texts, labels) or None), checked before any model
    loads. Built-in losses read the text and label columns only; a ``loss_fn`` gets the records as they are."""
    from training_hub.data.labelled import check_triplet_labels, pair_dataset, read_labelled

    need = not config.custom_loss
    train = read_labelled(config.data_path, config.text_column, config.label_column,
                          require_text=need, require_label=need)
    if need and config.loss_type in TRIPLET_LOSSES:
        check_triplet_labels(train, config.label_column, config.loss_type)
    held_out = None
    if config.eval_data_path:
        held_out = read_labelled(config.eval_data_path, config.text_column, config.label_column,
                                 require_text=need, require_label=need)
    if config.pairs:
        return (pair_dataset(train.rows, data_path=config.data_path, seed=config.seed),
                pair_dataset(held_out.rows, data_path=config.eval_data_path, seed=config.seed) if held_out else None,
                held_out)
    return _columns(train, need), _columns(held_out, need) if held_out else None, held_out


def _columns(data, text_and_label: bool):
    dataset = data.dataset()
    if text_and_label:  # any other field would reach the model as a second input column
        dataset = dataset.select_columns(["text", "label"])
    return dataset


# ------------------------------------------------------------------------------------------------ model, arguments


def _load_model(model_path: str):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path)  # a plain HF directory gets Transformer + mean pooling
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "pad_token", "") is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders: batches of texts need padding
    return model


def _rebind(loss, model) -> None:
    """A loss module built on the caller's own copy of the model would train that copy, not the model loaded here
    and saved: every such copy inside it (any attribute name, nested losses too) is replaced by ``model``."""
    modules = getattr(loss, "modules", None)
    if modules is None:
        return
    for module in list(modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, type(model)) and child is not model:
                logger.warning("embedding_sft: loss_fn holds another %s (%s.%s); it now trains the model loaded "
                               "from model_path", type(model).__name__, type(module).__name__, name)
                setattr(module, name, model)


def _loss(config: EmbeddingSFTConfig, model):
    """The loss on ``model``: loss_type's, or loss_fn (a loss module, or a callable the trainer gives the model)."""
    if config.custom_loss:
        loss = config.loss_fn
        _rebind(loss, model)
        return loss
    losses = _st_module("sentence_transformers.sentence_transformer.losses", "sentence_transformers.losses")
    return getattr(losses, LOSS_REGISTRY[config.loss_type])(model)


def _scheduler(config: EmbeddingSFTConfig) -> dict[str, Any]:
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.lr_scheduler]
    ratio = (config.lr_scheduler_kwargs or {}).get("min_lr_ratio")
    if ratio is not None:
        return {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": float(ratio)}}
    return {"lr_scheduler_type": name}


def _warmup(config: EmbeddingSFTConfig) -> dict[str, Any]:
    """warmup_steps when given, else warmup_ratio (transformers 5 takes a fraction < 1 as warmup_steps)."""
    import dataclasses

    from transformers import TrainingArguments

    if config.warmup_steps:
        return {"warmup_steps": config.warmup_steps}
    takes_ratio = "warmup_ratio" in {f.name for f in dataclasses.fields(TrainingArguments)}  # transformers 4
    return {"warmup_ratio" if takes_ratio else "warmup_steps": config.warmup_ratio}


def _arguments(config: EmbeddingSFTConfig, root: Path, has_eval: bool):
    import torch

    from training_hub.backends.trl import _report_to

    module = _st_module("sentence_transformers.sentence_transformer.training_args",
                        "sentence_transformers.training_args")
    samplers = {"group_by_label": module.BatchSamplers.GROUP_BY_LABEL,
                "no_duplicates": module.BatchSamplers.NO_DUPLICATES,
                "default": module.BatchSamplers.BATCH_SAMPLER}
    return module.SentenceTransformerTrainingArguments(
        output_dir=str(root / STATE_DIR), num_train_epochs=config.num_epochs, max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate, adam_beta1=config.beta1, adam_beta2=config.beta2,
        adam_epsilon=config.eps, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm or 0.0,
        seed=config.seed, data_seed=config.seed, batch_sampler=samplers[config.sampler],
        save_strategy="no", eval_strategy="epoch" if has_eval else "no",
        logging_steps=1,  # metrics.jsonl gets every optimizer step
        disable_tqdm=config.disable_progress_bar, report_to=_report_to(config),
        run_name=config.wandb_run_name or config.mlflow_run_name, fp16=False,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **_scheduler(config), **_warmup(config))


# ------------------------------------------------------------------------------------------------ saving


def _save_model(model, root: Path) -> None:
    """Write the model into ``root`` through a temporary folder; modules.json (what makes a folder a
    sentence-transformers model) moves in last."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=root))
    try:
        model.save_pretrained(str(tmp))
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "modules.json"):
            target = root / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train_loss(trainer) -> float | None:
    for entry in reversed(trainer.state.log_history):  # the last entries may be evaluations
        if entry.get("train_loss") is not None:
            return entry["train_loss"]
    return None


# ------------------------------------------------------------------------------------------------ backend


class SentenceTransformersBackend(BuiltinBackend):
    """``embedding_sft`` on sentence-transformers' ``SentenceTransformerTrainer`` (see the module doc)."""

    name = "sentence-transformers"
    algorithm = "embedding_sft"
    needs: ClassVar[tuple[str, ...]] = ("sentence_transformers", "transformers", "datasets", "torch")
    install_hint: ClassVar[str] = "pip install training-hub[embedding]"

    @classmethod
    def is_available(cls) -> Availability:
        if sys.modules.get("sentence_transformers") is not None:  # already imported: nothing to look for
            return availability_of(tuple(n for n in cls.needs if n != "sentence_transformers"), cls.install_hint)
        return availability_of(cls.needs, cls.install_hint)

    @classmethod
    def refusals(cls, config: Any, given: set[str]) -> list[str]:
        return native_only_problems(config)

    @classmethod
    def config_class(cls) -> type:
        return EmbeddingSFTConfig

    def train_config(self, config: Any, given: set[str], options: Dict[str, Any] | None = None) -> Any:
        if (Path(str(config.model_path)).expanduser() / "modules.json").is_file():
            # a sentence-transformers folder (its transformer may sit in a subfolder): it checks its own modules
            return self.run(config, given, options or {})
        return super().train_config(config, given, options)

    def run(self, config: EmbeddingSFTConfig, given: set[str], options: Dict[str, Any]) -> Any:
        train, evaluation, held_out = _datasets(config)  # DataValidationError before the model loads
        if not config.custom_loss and config.loss_type in TRIPLET_LOSSES and config.sampler != "group_by_label":
            logger.warning("embedding_sft: triplet losses need several texts of a label in a batch; "
                           "batch_sampler=%r may give batches without them (group_by_label does)", config.sampler)
        from training_hub.fsutil import claim_directory

        root = Path(config.ckpt_output_dir)
        with claim_directory(root):  # creates root; one live run per output directory
            return self._train(config, root, train, evaluation, held_out)

    def _train(self, config: EmbeddingSFTConfig, root: Path, train, evaluation, held_out) -> Any:
        from sentence_transformers import SentenceTransformerTrainer

        model = _load_model(config.model_path)
        kwargs: Dict[str, Any] = dict(model=model, args=_arguments(config, root, evaluation is not None),
                                      train_dataset=train, eval_dataset=evaluation, loss=_loss(config, model))
        takes = inspect.signature(SentenceTransformerTrainer).parameters
        callback = bridge = None
        if "callbacks" in takes:  # the trl backend's metrics.jsonl writer and hook bridge (a stand-in trainer, as
            # in upstream's tests, may take neither callbacks nor an evaluator)
            from training_hub.backends.trl import _metrics_callback
            from training_hub.backends.trl_bridge import hub_bridge

            callback = _metrics_callback(root / METRICS_FILE, None)
            bridge = hub_bridge(config, callback.record, backend=self.name)
            kwargs["callbacks"] = [callback, bridge]
        if "evaluator" in takes and held_out is not None and not config.custom_loss:
            kwargs["evaluator"] = _label_evaluator([r["text"] for r in held_out.rows],
                                                   [r["label"] for r in held_out.rows], config.batch_size)
        trainer = SentenceTransformerTrainer(**kwargs)
        logger.info("embedding_sft: %d %s, %d epoch(s), batch_size %d, loss %s, sampler %s", len(train),
                    "pairs" if config.pairs else "texts", config.num_epochs, config.batch_size, config.loss_label,
                    config.sampler)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        _save_model(model, root)
        if bridge is not None:
            bridge.saved(root)
        result = self._result(config, root, trainer, len(train), seconds, callback)
        if bridge is not None:
            result.metrics.update(bridge.ctx.extra)  # stopped_by: a hook's stop
            bridge.end(result)
        return result

    def _result(self, config: EmbeddingSFTConfig, root: Path, trainer, samples: int, seconds: float, callback):
        from training_hub.result import TrainingResult

        state = trainer.state
        train_loss = _train_loss(trainer)
        with open(root / SUMMARY_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"max_steps": getattr(state, "max_steps", None), "global_step": state.global_step,
                                "train_loss": train_loss, "epoch": config.num_epochs,
                                "loss": config.loss_label}) + "\n")
        last = callback.last if callback else {}
        validation = callback.last_validation if callback else {}
        metrics = {"final_loss": last.get("loss"), "train_loss_mean": train_loss, "steps": state.global_step,
                   "elapsed_seconds": round(seconds, 4), "engine": "sentence-transformers",
                   "metrics_path": str(root / METRICS_FILE) if callback else None,
                   **{f"validation_{k}": v for k, v in validation.items() if k not in ("type", "step", "elapsed")}}
        state_dir = root / STATE_DIR  # the trainer's output_dir; nothing is saved there (save_strategy="no")
        if state_dir.is_dir() and not any(p.is_file() for p in state_dir.rglob("*")):
            shutil.rmtree(state_dir)
        return TrainingResult(status="success", checkpoint_path=str(root), metrics=metrics, output_dir=str(root),
                              extra={"model_path": config.ckpt_output_dir, "num_samples": samples,
                                     "num_epochs": config.num_epochs, "loss": config.loss_label})
