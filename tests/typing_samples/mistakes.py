"""A user's script with mistakes a type checker must flag, one per line marked `# error: <code>`."""

from training_hub import dpo, lora_sft, osft, sft

sft(model_path="m", data_path="d.jsonl", ckpt_output_dir="out", num_epoch=3)  # error: call-arg
sft(model_path="m", data_path="d.jsonl", ckpt_output_dir="out", learning_rate="high")  # error: arg-type
sft("m", "d.jsonl", "out", lr_scheduler="cosin")  # error: arg-type
osft("m", "d.jsonl", "out", unfreeze_rank_ratio="0.25")  # error: arg-type
lora_sft("m", "d.jsonl", "out", lora_rank=8)  # error: call-arg
dpo("m", "pairs.jsonl", "out", beta=0.1, max_length="long")  # error: arg-type
sft(data_path="d.jsonl", ckpt_output_dir="out")  # error: call-arg
