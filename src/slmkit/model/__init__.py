"""The network: its configuration and presets (config.py), the decoder (llama.py), decoding caches and
inference rewrites (decode.py), LoRA layers (lora.py) and int8 weights (quantize.py)."""
