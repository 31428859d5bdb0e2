"""Reading and writing checkpoints: the safetensors format, checkpoints, the sharded writer, free space."""
