"""A checkpoint read from its headers: the folder, its layer stack, structure keys, the HF cache."""
