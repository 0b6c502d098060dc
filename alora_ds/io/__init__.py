"""Everything read from or written to disk: atomic writes (`files`), checkpoints, PEFT adapters
(`peft_write`, `peft_read`), task data and templates (`tasks`, `splits`, `examples`), models and
tokenizers (`models`, `pretrained`) and the run directory (`run_dir`).
"""
