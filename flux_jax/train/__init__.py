"""Flow-matching fine-tuning of FLUX (full and LoRA; text-to-image and Kontext pairs): see trainer.py."""
