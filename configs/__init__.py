"""Recipes: `get_config(arg=None)` -> ConfigDict; `python main.py --config=configs/NAME.py[:ARG]`."""
