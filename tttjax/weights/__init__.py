"""The weights library: the one name table of the PyTorch layouts (`layout`), streaming safetensors
I/O (`safetensors_io`), parameter sources read slice by slice (`sources`, `pytorch`), the export
plan and its one writer (`export`), and `loader.open_weights` for any weights path on disk."""
