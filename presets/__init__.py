"""The paper presets, one TOML file each, shipped inside the installed package."""
