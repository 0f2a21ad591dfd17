"""Built-in B-LoRA presets, one LyCORIS-format TOML file each (shipped inside the wheel)."""
