"""Storage: what lora_lab keeps on disk and serves from it. Files are safetensors + JSON, written atomically,
never over anything that is not lora_lab's own output, read as untrusted input."""
