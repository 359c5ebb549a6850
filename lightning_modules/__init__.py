"""finetune-lab's models: backbones, heads, the FineTuneModule, finetuning callbacks and the CLI."""
