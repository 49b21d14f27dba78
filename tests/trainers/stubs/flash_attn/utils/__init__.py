"""flash_attn.utils stand-in (see flash_attn/__init__.py)."""
