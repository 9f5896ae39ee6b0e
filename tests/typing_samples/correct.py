"""A user's script that a type checker must accept (tests/test_public_api.py runs mypy on it)."""

from training_hub import (
    AlgorithmRegistry, Backend, TrainingHubCallback, TrainingResult, create_algorithm, dpo, lora_sft, osft, sft,
)


class Echo(Backend):
    def execute_training(self, algorithm_params: dict) -> dict:
        return {"status": "success", "checkpoint_path": algorithm_params["ckpt_output_dir"]}


AlgorithmRegistry.register_backend("sft", "echo", Echo)
result: TrainingResult = sft(model_path="m", data_path="d.jsonl", ckpt_output_dir="out", num_epochs=3,
                             learning_rate=1e-5, lr_scheduler="cosine", nproc_per_node="auto",
                             callbacks=[TrainingHubCallback()], backend="echo")
print(result.checkpoint_path, result["metrics"], result.metrics.get("final_loss"))
sft("m", "d.jsonl", "out", max_steps=None, validation_frequency=None)  # upstream: None means the default
osft("m", "d.jsonl", "out", unfreeze_rank_ratio=0.25, target_patterns=["self_attn.q_proj"])
lora_sft("m", "d.jsonl", "out", lora_r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], merge=True)
dpo("m", "pairs.jsonl", "out", beta=0.1, loss_type="sigmoid", max_length=512)
create_algorithm("sft", backend_name="echo").train(model_path="m", data_path="d", ckpt_output_dir="o")
