"""Files: safetensors export/import, the authors' legacy checkpoints, image files and atomic writes."""
